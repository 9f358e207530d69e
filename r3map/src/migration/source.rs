//! The source side of a migration as a library: a [`Source`] wraps the
//! region a host serves (always, so a migration can start at any time),
//! and the `Seed` service drives it: track, finalize, abort.
//!
//! When the region is a managed mount over a fenced store (each node serves
//! its volume from a cache over `r3map backend`), finalize also *seals* the
//! mount: it stops pushing, so no old chunk can land in the store after the
//! destination took the region over, and the chunks it wrote but never
//! pushed are handed over for the destination to push.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::info;

use super::record::{self, Handover, SourceRecord};
use super::tracked::{ChunkSet, Tracked};
use crate::backend::Backend;
use crate::managed::Managed;
use crate::{Error, Result};

/// What [`Source::status`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceStatus {
    /// The tracking session (0: not tracking).
    pub session: u64,
    /// Chunks recorded as written since Track (since the last pre-copy
    /// round, once rounds started).
    pub dirty_chunks: u64,
    /// The last pre-copy round answered (0: none).
    pub round: u64,
    /// Finalized: writes are closed; the destination owns the region.
    pub finalized: bool,
}

/// The source side of a migration; see the module docs.
pub struct Source {
    tracked: Arc<Tracked>,
    managed: Option<Arc<Managed>>,
    record: Option<PathBuf>,
    session: Mutex<u64>,
    handover: tokio::sync::Mutex<Option<Handover>>,
}

fn to_set(runs: &[(u64, u64)], len: u64) -> ChunkSet {
    let mut s = ChunkSet::new(len);
    for &(f, c) in runs {
        s.insert_range(f, c);
    }
    s
}

/// `(first, count)` runs of a list of chunk indices, ascending.
pub(crate) fn runs(chunks: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = chunks.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in v {
        match out.last_mut() {
            Some((f, c)) if *f + *c == i => *c += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

impl Source {
    /// Wraps `backend` (tracked at `chunk` bytes). `managed` is the mount
    /// behind it, if it is one (sealed at finalize). `record` is where the
    /// finalize answer is persisted (normally `CACHE.migration`, see
    /// [`record::record_path`]); a record found there means this source was
    /// finalized before a restart: it comes back closed to writes, sealed,
    /// answering Finalize as before.
    pub async fn open(
        backend: Arc<dyn Backend>,
        chunk: u64,
        managed: Option<Arc<Managed>>,
        record: Option<PathBuf>,
    ) -> Result<Arc<Source>> {
        if chunk == 0 {
            return Err(Error::InvalidArgument("chunk size must be positive".into()));
        }
        let tracked = Arc::new(Tracked::new(backend, chunk));
        let mut handover = None;
        let mut session = 0;
        if let Some(p) = &record {
            let p2 = p.clone();
            let rec: Option<SourceRecord> =
                tokio::task::spawn_blocking(move || {
                    match record::load::<serde_json::Value>(&p2)? {
                        Some(v) if v.get("role").and_then(|r| r.as_str()) == Some("source") => {
                            serde_json::from_value(v)
                                .map(Some)
                                .map_err(|e| Error::io(format!("{}: {e}", p2.display())))
                        }
                        _ => Ok(None),
                    }
                })
                .await
                .map_err(|e| Error::io(e.to_string()))??;
            // A destination's record (a volume that arrived here) is not ours.
            let rec = rec.filter(|r| r.role == "source");
            if let Some(rec) = rec {
                let n = tracked.size().div_ceil(chunk);
                tracked.restore_finalized(to_set(&rec.handover.dirty, n));
                if let Some(m) = &managed {
                    m.seal().await?;
                }
                session = rec.handover.session;
                info!(
                    session,
                    "migration: this region was handed over before a restart; writes stay closed"
                );
                handover = Some(rec.handover);
            }
        }
        Ok(Arc::new(Source {
            tracked,
            managed,
            record,
            session: Mutex::new(session),
            handover: tokio::sync::Mutex::new(handover),
        }))
    }

    /// The region to serve: writes go through the tracker.
    pub fn backend(&self) -> Arc<dyn Backend> {
        self.tracked.clone()
    }

    /// The tracker (for the `Seed` service's reads).
    pub fn tracked(&self) -> &Arc<Tracked> {
        &self.tracked
    }

    /// Starts (or joins) tracking; returns the session.
    pub async fn track(&self) -> Result<u64> {
        if self.tracked.is_finalized() {
            return Ok(*self.session.lock().unwrap());
        }
        self.tracked.track().await;
        let mut s = self.session.lock().unwrap();
        if *s == 0 {
            *s = new_session();
            info!(session = *s, "migration: tracking writes");
        }
        Ok(*s)
    }

    /// Current state.
    pub fn status(&self) -> SourceStatus {
        SourceStatus {
            session: *self.session.lock().unwrap(),
            dirty_chunks: self.tracked.dirty_count(),
            round: self.tracked.round(),
            finalized: self.tracked.is_finalized(),
        }
    }

    fn check_session(&self, session: u64) -> Result<()> {
        let cur = *self.session.lock().unwrap();
        if cur == 0 {
            return Err(Error::FailedPrecondition(
                "not tracking: the destination never started (or aborted)".into(),
            ));
        }
        if session != 0 && session != cur {
            return Err(Error::FailedPrecondition(format!(
                "session {session} is not the one tracking ({cur}): the source restarted or another migration started"
            )));
        }
        Ok(())
    }

    /// One pre-copy round (see [`Tracked::take_round`]): the chunks written
    /// since the previous round, as runs.
    pub fn dirty_round(&self, session: u64, round: u64) -> Result<Vec<(u64, u64)>> {
        self.check_session(session)?;
        Ok(self.tracked.take_round(round)?.ranges())
    }

    /// Checks that `session` is the one tracking now (0: any), before the
    /// seed hashes chunks for it.
    pub fn check_tracking(&self, session: u64) -> Result<()> {
        if self.tracked.is_finalized() {
            return Err(Error::FailedPrecondition(
                "finalized: the region belongs to the destination".into(),
            ));
        }
        self.check_session(session)
    }

    /// [`Source::finalize_after`] for a destination that applied no
    /// pre-copy round (or does not say: then, if rounds were taken, every
    /// chunk is handed over as dirty, which is correct if slow).
    pub async fn finalize(&self, session: u64) -> Result<Handover> {
        self.finalize_after(session, 0).await
    }

    /// Flushes, closes writes, seals a managed mount, persists the answer
    /// and returns it. `round` is the last pre-copy round the destination
    /// applied: the dirty list holds what was written since (see
    /// [`Tracked::finalize`]). Idempotent (across restarts too).
    pub async fn finalize_after(&self, session: u64, round: u64) -> Result<Handover> {
        let mut done = self.handover.lock().await;
        if let Some(h) = &*done {
            if session != 0 && session != h.session {
                return Err(Error::FailedPrecondition(format!(
                    "finalized for session {}, not {session}",
                    h.session
                )));
            }
            return Ok(h.clone());
        }
        self.check_session(session)?;
        let set = self.tracked.finalize(round).await?;
        let unpushed = match &self.managed {
            Some(m) => m.seal().await?,
            None => Vec::new(),
        };
        let h = Handover {
            session: *self.session.lock().unwrap(),
            dirty: set.ranges(),
            unpushed: runs(unpushed),
            epoch: self.tracked.epoch(),
        };
        if let Some(p) = &self.record {
            let rec = SourceRecord {
                role: "source".into(),
                handover: h.clone(),
            };
            // Persisted before the answer leaves: a restarted source must
            // not take writes the destination's copy lacks.
            record::store_async(p.clone(), rec).await?;
        }
        *done = Some(h.clone());
        Ok(h)
    }

    /// Gives the migration up before finalize: stops tracking; the region
    /// keeps serving and taking writes.
    pub async fn abort(&self, session: u64) -> Result<()> {
        if self.tracked.is_finalized() {
            return Err(Error::FailedPrecondition(
                "the migration was finalized: the region belongs to the destination".into(),
            ));
        }
        {
            let cur = *self.session.lock().unwrap();
            if cur == 0 {
                return Ok(()); // nothing to abort: idempotent
            }
            if session != 0 && session != cur {
                return Err(Error::FailedPrecondition(format!(
                    "session {session} is not the one tracking ({cur})"
                )));
            }
        }
        self.tracked.abort().await?;
        *self.session.lock().unwrap() = 0;
        info!("migration: aborted; tracking stopped, the region keeps serving");
        Ok(())
    }
}

/// A random non-zero session id.
fn new_session() -> u64 {
    loop {
        let s: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (std::process::id() as u64).rotate_left(32);
        if s != 0 {
            return s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::Memory;

    #[test]
    fn runs_of_chunks() {
        assert_eq!(runs([5, 1, 2, 3, 9, 2]), vec![(1, 3), (5, 1), (9, 1)]);
        assert!(runs([]).is_empty());
    }

    #[tokio::test]
    async fn finalize_persists_and_a_restart_stays_closed() {
        let d = tempfile::tempdir().unwrap();
        let rec = d.path().join("c.migration");
        let mem: Arc<dyn Backend> = Arc::new(Memory::new(8 * 4096, 4096));
        let s = Source::open(mem.clone(), 4096, None, Some(rec.clone()))
            .await
            .unwrap();
        assert!(s.finalize(0).await.is_err(), "finalize before track");
        let session = s.track().await.unwrap();
        assert_eq!(s.track().await.unwrap(), session, "track joins the session");
        s.backend().write_at(4096 * 3, &[1; 10]).await.unwrap();
        assert!(s.finalize(session + 1).await.is_err(), "wrong session");
        let h = s.finalize(session).await.unwrap();
        assert_eq!(h.dirty, vec![(3, 1)]);
        assert!(s.abort(session).await.is_err(), "no abort after finalize");
        assert!(s.backend().write_at(0, &[2; 1]).await.is_err());
        drop(s);
        // Restarted: closed to writes, same answer.
        let s = Source::open(mem, 4096, None, Some(rec)).await.unwrap();
        assert!(s.status().finalized);
        assert!(s.backend().write_at(0, &[2; 1]).await.is_err());
        assert_eq!(s.finalize(0).await.unwrap(), h);
    }

    #[tokio::test]
    async fn abort_keeps_serving() {
        let mem: Arc<dyn Backend> = Arc::new(Memory::new(8 * 4096, 4096));
        let s = Source::open(mem, 4096, None, None).await.unwrap();
        s.abort(0)
            .await
            .expect("abort without a session is a no-op");
        let session = s.track().await.unwrap();
        s.backend().write_at(0, &[1; 10]).await.unwrap();
        s.abort(session).await.unwrap();
        assert_eq!(s.status(), SourceStatus::default());
        s.backend().write_at(0, &[2; 10]).await.unwrap();
        let again = s.track().await.unwrap();
        assert!(s.finalize(again).await.is_ok());
    }
}
