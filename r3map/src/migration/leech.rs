//! The destination side: a [`Managed`] cache whose source is the seed,
//! held (I/O waits) until finalize, and the `Leech` control service that
//! finalizes it.
//!
//! Never stale, by construction: every chunk the seed reports written
//! since Track is made Missing (in-flight fetches of it discarded) before
//! the export is released; if the seed is lost before finalize, nothing
//! pulled from it is trusted and every chunk is taken again from the
//! fallback backend; without a fallback the destination refuses to serve.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use super::pb::{self, leech_server};
use super::record::{self, Handover, LeechRecord};
use super::seed::{handover_of, SeedClient};
use crate::backend::Backend;
use crate::managed::{self, Managed};
use crate::net::{self, Endpoint, Keepalive, Token};
use crate::{Error, Result};

/// How to start (or resume) a leech.
pub struct Config {
    /// The source's `Seed` endpoint.
    pub from: Endpoint,
    /// Bearer token for the seed.
    pub token: Option<Token>,
    /// TLS to the seed (with a client certificate for mutual TLS).
    pub tls: Option<crate::net::ClientTls>,
    /// Local cache; its chunk states go to `CACHE.state`, the migration
    /// record to `CACHE.migration`.
    pub cache: PathBuf,
    /// The region's own backend URI: where chunks come from if the seed is
    /// lost, and where the destination pushes its writes.
    pub fallback: Option<String>,
    /// This destination's name as a writer of a fenced region (recorded by
    /// the store at finalize). A random one is chosen and recorded if none.
    pub owner: Option<String>,
    /// How long seed reads are retried before the seed is declared lost.
    pub patience: Duration,
    /// Background pull workers.
    pub pull_workers: usize,
    /// The volume to ask for when the seed's server serves several (sent
    /// as [`crate::auth::VOLUME_HEADER`] with every call).
    pub volume: Option<String>,
}

/// What happened to the migration, for status and the process exit code.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Finalize succeeded: the export is released.
    pub finalized: bool,
    /// The seed was declared lost.
    pub seed_lost: bool,
    /// Missing chunks come from the fallback backend.
    pub fallback_active: bool,
    /// The migration was given up ([`Leech::abort`]).
    pub aborted: bool,
    /// Set when the destination can no longer complete the migration.
    pub fatal: Option<String>,
}

/// Typed status of a destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationStatus {
    /// Region size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Chunks in the region.
    pub chunks_total: u64,
    /// Chunks held here (local or written here).
    pub chunks_present: u64,
    /// Finalize succeeded.
    pub finalized: bool,
    /// Finalized and every chunk is here: the source may stop.
    pub complete: bool,
    /// The seed was declared lost.
    pub seed_lost: bool,
    /// Missing chunks come from the fallback backend.
    pub fallback: bool,
    /// Given up.
    pub aborted: bool,
    /// The epoch this destination took the region over at, if fenced.
    pub epoch: Option<u64>,
    /// Why the migration cannot complete, if it cannot.
    pub error: Option<String>,
    /// The cache's counters.
    pub progress: crate::managed::Progress,
}

/// What finalize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FinalizeOutcome {
    /// Chunks written at the source since Track (pulled again first).
    pub dirty_chunks: u64,
    /// Chunks the source never pushed (pushed from here).
    pub unpushed_chunks: u64,
    /// Time inside the call, request to release, in microseconds.
    pub elapsed_us: u64,
    /// Finalized without the seed (every chunk from the fallback).
    pub seed_lost: bool,
    /// The epoch the region was taken over at, if fenced.
    pub epoch: Option<u64>,
}

/// The destination of a migration; see the module docs.
pub struct Leech {
    managed: Arc<Managed>,
    seed: Arc<SeedClient>,
    control: super::seed::Client,
    fallback: Option<Arc<dyn Backend>>,
    chunk: u64,
    cache: PathBuf,
    record_path: PathBuf,
    /// The record; its lock also serializes finalize and abort.
    record: tokio::sync::Mutex<LeechRecord>,
    outcome: Mutex<Option<FinalizeOutcome>>,
    phase: watch::Sender<Phase>,
    started: Instant,
    complete_at: Mutex<Option<Duration>>,
    stop: CancellationToken,
}

impl Drop for Leech {
    fn drop(&mut self) {
        // Watchers hold no Arc of the leech: they end here, and with them
        // the last references to the mount, whose tasks then stop.
        self.stop.cancel();
    }
}

fn leech_err(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("seed: {e}"))
}

fn random_owner() -> String {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    format!("leech-{:016x}", u64::from_be_bytes(b))
}

/// Removes the cache, its state file and the migration record.
fn remove_cache(cache: &Path) -> Result<()> {
    for p in [cache.to_path_buf(), managed::state_path(cache)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    record::remove(&record::record_path(cache))
}

impl Leech {
    /// Starts a migration into a new cache, or resumes the one recorded
    /// beside `cfg.cache`:
    /// - nothing there: Track at the seed, pull with the export held;
    /// - a record of the same tracking session, not finalized: reopen the
    ///   cache (its chunk states say what was pulled) and keep pulling;
    /// - a record of another session (the source restarted and lost its
    ///   record of writes): the cache cannot be trusted; start over;
    /// - a record of a finalized migration: serve at once, fetching what
    ///   is missing from the seed, with the epoch taken at finalize.
    pub async fn start(cfg: Config) -> Result<Arc<Leech>> {
        if cfg.pull_workers == 0 {
            return Err(Error::InvalidArgument(
                "a migration needs at least one pull worker".into(),
            ));
        }
        let rpath = record::record_path(&cfg.cache);
        let rp = rpath.clone();
        let mut rec: Option<LeechRecord> = tokio::task::spawn_blocking(move || record::load(&rp))
            .await
            .map_err(|e| Error::io(e.to_string()))??;
        if rec.is_none() {
            let state = managed::state_path(&cfg.cache);
            for p in [&cfg.cache, &state] {
                if p.exists() {
                    return Err(Error::FailedPrecondition(format!(
                        "{} exists but no migration record does: a migration starts from an empty cache (remove it)",
                        p.display()
                    )));
                }
            }
        }
        let (token, tls) = (cfg.token.as_ref(), cfg.tls.as_ref());
        let vol = cfg.volume.as_deref();
        let ch = net::connect_volume(&cfg.from, token, tls, Keepalive::MIGRATION, vol)
            .await
            .map_err(leech_err)?;
        // Control calls get their own connection: on the data connection
        // Finalize's reply would queue behind megabytes of chunk data in
        // the HTTP/2 window, and that wait is downtime.
        let control = pb::seed_client::SeedClient::new(
            net::connect_volume(&cfg.from, token, tls, Keepalive::MIGRATION, vol)
                .await
                .map_err(leech_err)?,
        );
        let seed = SeedClient::connect(pb::seed_client::SeedClient::new(ch), cfg.patience)
            .await
            .map_err(Error::from)?;
        let (size, chunk) = (seed.size(), seed.chunk_size());
        let info = control
            .clone()
            .info(pb::InfoRequest {})
            .await
            .map_err(Error::from)?
            .into_inner();
        let fallback = match &cfg.fallback {
            Some(uri) => Some(crate::uri::open(uri, size, chunk).await?),
            None => None,
        };
        // A record of another session: nothing pulled can be trusted.
        if let Some(r) = &rec {
            if r.handover.is_none() && (r.session != info.session || !info.tracking) {
                warn!(
                    recorded = r.session,
                    seed = info.session,
                    "migration: the seed's tracking session changed (source restarted?); starting over"
                );
                let c = cfg.cache.clone();
                tokio::task::spawn_blocking(move || remove_cache(&c))
                    .await
                    .map_err(|e| Error::io(e.to_string()))??;
                rec = None;
            }
        }
        let resumed = rec.is_some();
        let rec = match rec {
            Some(r) => r,
            None => {
                // Track before the first read: every write the seed
                // acknowledges after this is in the dirty list.
                let session = control
                    .clone()
                    .track(pb::TrackRequest {})
                    .await
                    .map_err(Error::from)?
                    .into_inner()
                    .session;
                let r = LeechRecord {
                    role: "destination".into(),
                    from: cfg.from.to_string(),
                    session,
                    owner: cfg.owner.clone().unwrap_or_else(random_owner),
                    ..Default::default()
                };
                record::store_async(rpath.clone(), r.clone()).await?;
                r
            }
        };
        let seed = Arc::new(seed);
        let opts = managed::Options {
            chunk_size: chunk,
            pull_workers: cfg.pull_workers,
            ..Default::default()
        };
        let source: Arc<dyn Backend> = seed.clone();
        let (cache, fb) = (cfg.cache.clone(), fallback.clone());
        let m = tokio::task::spawn_blocking(move || {
            // Managed::open spawns its workers: enter the caller's runtime.
            Managed::open(&cache, source, fb, opts)
        });
        let m = Arc::new(m.await.map_err(|e| Error::io(e.to_string()))??);
        let finalized = rec.handover.is_some();
        if !finalized {
            m.hold().await;
        }
        let leech = Arc::new(Leech {
            managed: m,
            seed,
            control,
            fallback,
            chunk,
            cache: cfg.cache.clone(),
            record_path: rpath,
            record: tokio::sync::Mutex::new(rec),
            outcome: Mutex::new(None),
            phase: watch::channel(Phase::default()).0,
            started: Instant::now(),
            complete_at: Mutex::new(None),
            stop: CancellationToken::new(),
        });
        if finalized {
            leech.resume_finalized().await?;
        }
        info!(from = %cfg.from, size, chunk, resumed, finalized, "migration: pulling from the seed");
        tokio::spawn(watch_seed(
            Arc::downgrade(&leech),
            leech.seed.lost_watch(),
            leech.stop.clone(),
        ));
        tokio::spawn(watch_complete(
            Arc::downgrade(&leech),
            leech.managed.clone(),
            leech.phase.subscribe(),
            leech.stop.clone(),
        ));
        Ok(leech)
    }

    /// The destination's mount (serve it; it is held until finalize).
    pub fn managed(&self) -> &Arc<Managed> {
        &self.managed
    }

    /// Region size in bytes.
    pub fn size(&self) -> u64 {
        self.seed.size()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Changes of the phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    fn fail(&self, msg: String) {
        error!("migration: {msg}");
        self.phase.send_modify(|p| {
            p.fatal.get_or_insert(msg);
        });
    }

    /// Takes the region over in the store (fenced stores): raises its epoch
    /// past the source's for this destination's owner name; idempotent.
    async fn take_over(&self, rec: &mut LeechRecord, h: &Handover) -> Result<Option<u64>> {
        let Some(fb) = &self.fallback else {
            return Ok(None);
        };
        let Some(mine) = fb.epoch() else {
            return Ok(None); // a store without fencing: see docs/fencing.md
        };
        let epoch = match rec.epoch {
            Some(e) => e,
            None => {
                let e = h.epoch.unwrap_or(0).max(mine) + 1;
                rec.epoch = Some(e);
                // Recorded before the fence: a restart re-fences with the
                // same epoch and owner, which the store accepts as a repeat.
                record::store_async(self.record_path.clone(), rec.clone()).await?;
                e
            }
        };
        fb.fence(epoch, &rec.owner).await?;
        info!(epoch, owner = %rec.owner, "migration: took the region over");
        Ok(Some(epoch))
    }

    /// Applies a hand-over to the cache: chunks written at the source since
    /// Track are pulled again, those it never pushed are pushed from here.
    async fn apply(&self, h: &Handover) -> Result<()> {
        let expand = |runs: &[(u64, u64)]| -> Vec<u64> {
            runs.iter().flat_map(|&(f, c)| f..f + c).collect()
        };
        self.managed.mark_missing(&expand(&h.dirty)).await?;
        self.managed.mark_dirty(&expand(&h.unpushed))?;
        self.managed.sync_local().await
    }

    /// After a restart past finalize: fence again (a repeat), apply the
    /// hand-over if that was cut short, and serve.
    async fn resume_finalized(&self) -> Result<()> {
        let mut rec = self.record.lock().await;
        let h = rec.handover.clone().expect("finalized");
        let epoch = self.take_over(&mut rec, &h).await?;
        if rec.applied {
            // Chunks never pushed and not yet fetched again go out once fetched.
            let unpushed: Vec<u64> = h.unpushed.iter().flat_map(|&(f, c)| f..f + c).collect();
            self.managed.mark_dirty(&unpushed)?;
        } else {
            // Never released: no local write exists yet.
            self.apply(&h).await?;
            rec.applied = true;
            record::store_async(self.record_path.clone(), rec.clone()).await?;
        }
        self.managed.release().await;
        *self.outcome.lock().unwrap() = Some(FinalizeOutcome {
            dirty_chunks: h.dirty.iter().map(|r| r.1).sum(),
            unpushed_chunks: h.unpushed.iter().map(|r| r.1).sum(),
            elapsed_us: 0,
            seed_lost: false,
            epoch,
        });
        self.phase.send_modify(|p| p.finalized = true);
        Ok(())
    }

    /// The finalize step; see the module docs. Idempotent.
    pub async fn finalize(&self, seed_lost: bool) -> Result<FinalizeOutcome> {
        let mut rec = self.record.lock().await;
        if let Some(o) = *self.outcome.lock().unwrap() {
            return Ok(o);
        }
        let ph = self.phase.borrow().clone();
        if ph.aborted {
            return Err(Error::FailedPrecondition(
                "the migration was aborted".into(),
            ));
        }
        if let Some(f) = ph.fatal {
            return Err(Error::FailedPrecondition(f));
        }
        let t = Instant::now();
        let count = self.managed.chunk_count();
        // Even with seed_lost the seed is asked first: if it answers, the
        // normal path is both correct and cheaper.
        let patience = if seed_lost {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(60)
        };
        let asked = if self.seed.is_lost() {
            Err(Status::unavailable("seed already declared lost"))
        } else {
            let mut c = self.control.clone();
            let req = pb::FinalizeRequest {
                session: rec.session,
            };
            match tokio::time::timeout(patience, c.finalize(req)).await {
                Ok(r) => r.map(|r| r.into_inner()),
                Err(_) => Err(Status::deadline_exceeded("seed finalize timed out")),
            }
        };
        let (h, lost) = match asked {
            Ok(reply) => (handover_of(&reply, count).map_err(Error::io)?, false),
            Err(e) if !seed_lost => {
                return Err(Error::Unavailable(format!(
                    "seed finalize failed: {e}; if the source is dead (and fenced), finalize with --seed-lost (seed_lost){}",
                    if self.fallback.is_some() { "" } else { " (needs a fallback backend)" }
                )));
            }
            Err(e) => {
                let Some(fb) = &self.fallback else {
                    return Err(Error::FailedPrecondition(format!(
                        "seed finalize failed ({e}) and the leech has no fallback backend: nothing to take the data from"
                    )));
                };
                self.seed.declare_lost("finalize with seed_lost");
                self.managed.set_source(fb.clone())?;
                // Nothing pulled from the seed can be trusted: any chunk may
                // have been written after we pulled it.
                let h = Handover {
                    session: rec.session,
                    dirty: vec![(0, count)],
                    unpushed: Vec::new(),
                    epoch: None,
                };
                (h, true)
            }
        };
        rec.handover = Some(h.clone());
        record::store_async(self.record_path.clone(), rec.clone()).await?;
        let epoch = self.take_over(&mut rec, &h).await?;
        self.apply(&h).await?;
        rec.applied = true;
        record::store_async(self.record_path.clone(), rec.clone()).await?;
        self.managed.release().await;
        let elapsed = t.elapsed();
        self.phase.send_modify(|p| {
            p.finalized = true;
            if lost {
                p.seed_lost = true;
                p.fallback_active = true;
            }
        });
        let o = FinalizeOutcome {
            dirty_chunks: h.dirty.iter().map(|r| r.1).sum(),
            unpushed_chunks: h.unpushed.iter().map(|r| r.1).sum(),
            elapsed_us: elapsed.as_micros() as u64,
            seed_lost: lost,
            epoch,
        };
        info!(
            dirty_chunks = o.dirty_chunks,
            unpushed_chunks = o.unpushed_chunks,
            seed_lost = lost,
            ?epoch,
            took = ?elapsed,
            "migration: finalized; export released, missing chunks fetched on demand"
        );
        *self.outcome.lock().unwrap() = Some(o);
        Ok(o)
    }

    /// Gives the migration up before finalize: the seed stops tracking (if
    /// it answers; it keeps serving either way), the pull stops, and the
    /// cache, its state and the record are removed. Idempotent.
    pub async fn abort(&self) -> Result<()> {
        let rec = self.record.lock().await;
        if rec.handover.is_some() {
            return Err(Error::FailedPrecondition(
                "the migration was finalized: the region lives here now".into(),
            ));
        }
        if self.phase.borrow().aborted {
            return Ok(());
        }
        self.phase.send_modify(|p| p.aborted = true);
        let req = pb::AbortRequest {
            session: rec.session,
        };
        match tokio::time::timeout(Duration::from_secs(5), self.control.clone().abort(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "migration: the seed refused abort; it stops tracking when it restarts")
            }
            Err(_) => warn!("migration: the seed did not answer abort"),
        }
        self.stop.cancel();
        self.managed.close().await;
        let c = self.cache.clone();
        tokio::task::spawn_blocking(move || remove_cache(&c))
            .await
            .map_err(|e| Error::io(e.to_string()))??;
        info!("migration: aborted; cache removed");
        Ok(())
    }

    /// Typed status.
    pub fn status(&self) -> MigrationStatus {
        let p = self.managed.progress();
        let ph = self.phase.borrow().clone();
        let o = *self.outcome.lock().unwrap();
        let complete = ph.finalized && p.chunks_missing == 0 && p.chunks_in_flight == 0;
        MigrationStatus {
            size: self.size(),
            chunk_size: self.chunk,
            chunks_total: p.chunks_total,
            chunks_present: p.chunks_local + p.chunks_dirty,
            finalized: ph.finalized,
            complete,
            seed_lost: ph.seed_lost,
            fallback: ph.fallback_active,
            aborted: ph.aborted,
            epoch: o.and_then(|o| o.epoch),
            error: ph.fatal,
            progress: p,
        }
    }

    /// Time from start to every chunk being here, once that happened.
    pub fn completed_after(&self) -> Option<Duration> {
        *self.complete_at.lock().unwrap()
    }
}

/// Reacts to the seed being declared lost (reads failing past patience).
async fn watch_seed(leech: Weak<Leech>, mut lost: watch::Receiver<bool>, stop: CancellationToken) {
    tokio::select! {
        r = lost.wait_for(|l| *l) => if r.is_err() { return },
        _ = stop.cancelled() => return,
    }
    let Some(this) = leech.upgrade() else { return };
    let finalized = this.phase.borrow().finalized;
    match &this.fallback {
        Some(fb) => {
            warn!(
                finalized,
                "migration: seed lost; fetching what is missing from the fallback backend"
            );
            if let Err(e) = this.managed.set_source(fb.clone()) {
                this.fail(format!("cannot switch to the fallback backend: {e}"));
                return;
            }
            this.phase.send_modify(|p| {
                p.seed_lost = true;
                p.fallback_active = true;
            });
            if !finalized {
                warn!("migration: finalize with seed_lost once the source is known dead (fenced): everything is then re-read from the backend");
            }
        }
        None if finalized => {
            this.phase.send_modify(|p| p.seed_lost = true);
            this.fail(
                "seed lost after finalize and no fallback backend: reads of chunks not yet pulled fail with EIO".into(),
            );
        }
        None => {
            this.phase.send_modify(|p| p.seed_lost = true);
            this.fail(
                "seed lost before finalize and no fallback backend: the destination has no complete copy and will not serve".into(),
            );
        }
    }
}

async fn watch_complete(
    leech: Weak<Leech>,
    managed: Arc<Managed>,
    mut phase: watch::Receiver<Phase>,
    stop: CancellationToken,
) {
    let done = async {
        managed.wait_complete().await;
        // Only a finalized migration is complete: before it, chunks may
        // still turn Missing again.
        if phase.wait_for(|p| p.finalized).await.is_err() {
            return false;
        }
        managed.wait_complete().await;
        true
    };
    tokio::select! {
        d = done => if !d { return },
        _ = stop.cancelled() => return,
    }
    let Some(this) = leech.upgrade() else { return };
    let t = this.started.elapsed();
    *this.complete_at.lock().unwrap() = Some(t);
    let p = this.managed.progress();
    info!(
        chunks = p.chunks_total,
        bytes_pulled = p.bytes_pulled,
        took = ?t,
        "migration: complete; the source may stop"
    );
}

/// The `Leech` control service.
pub struct LeechService(pub Arc<Leech>);

#[tonic::async_trait]
impl leech_server::Leech for LeechService {
    async fn finalize(
        &self,
        req: Request<pb::LeechFinalizeRequest>,
    ) -> Result<Response<pb::LeechFinalizeReply>, Status> {
        let o = self.0.finalize(req.into_inner().seed_lost).await?;
        Ok(Response::new(pb::LeechFinalizeReply {
            dirty_chunks: o.dirty_chunks,
            elapsed_us: o.elapsed_us,
            seed_lost: o.seed_lost,
            unpushed_chunks: o.unpushed_chunks,
            epoch: o.epoch.unwrap_or(0),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.0.status();
        Ok(Response::new(pb::StatusReply {
            size: s.size,
            chunk_size: s.chunk_size,
            chunks_total: s.chunks_total,
            chunks_present: s.chunks_present,
            finalized: s.finalized,
            complete: s.complete,
            seed_lost: s.seed_lost,
            fallback: s.fallback,
            error: s.error.unwrap_or_default(),
            aborted: s.aborted,
            epoch: s.epoch.unwrap_or(0),
        }))
    }

    async fn abort(
        &self,
        _: Request<pb::LeechAbortRequest>,
    ) -> Result<Response<pb::LeechAbortReply>, Status> {
        self.0.abort().await?;
        Ok(Response::new(pb::LeechAbortReply {}))
    }
}
