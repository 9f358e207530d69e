//! Getting chunks into the cache: the pull queue and its workers,
//! on-demand fetches shared by every reader waiting on them, installation
//! that a write or [`Managed::mark_missing`] can make stale.

use std::fs::File;
use std::io::IoSlice;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::*;

/// Queue keys at or above this are retries, taken after every other chunk.
pub(super) const RETRY_BASE: i64 = i64::MAX / 2;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Inner {
    pub(super) fn prioritize(&self, chunks: &[u64]) {
        let mut sh = self.shared.lock().unwrap();
        let todo: Vec<u64> = chunks
            .iter()
            .copied()
            .filter(|&i| i < self.count && sh.state(i) == ChunkState::Missing)
            .collect();
        if todo.is_empty() {
            return;
        }
        let base = sh.bump - todo.len() as i64;
        for (k, &i) in todo.iter().enumerate() {
            sh.enqueue(i, base + k as i64);
        }
        sh.bump = base;
        drop(sh);
        self.queue_notify.notify_waiters();
    }

    /// Starts an on-demand fetch of chunk `i` unless it is present; returns
    /// the receiver of the fetch's result (new or already in flight).
    pub(super) fn start_fetch(self: &Arc<Self>, i: u64) -> Option<watch::Receiver<FetchResult>> {
        let mut sh = self.shared.lock().unwrap();
        if sh.state(i) != ChunkState::Missing {
            return None;
        }
        if let Some(f) = sh.fetches.get(&i) {
            return Some(f.tx.subscribe());
        }
        let (id, epoch, rx) = sh.claim(i);
        drop(sh);
        self.counters.on_demand.fetch_add(1, Relaxed);
        // Its own task: a reader that goes away must not strand the others.
        // Tracked, so close waits for it like for the background workers.
        let this = self.clone();
        self.tasks.spawn(async move {
            let _ = this.run_fetch(i, id, epoch).await;
        });
        Some(rx)
    }

    /// Ensures chunk `i` is present: fetches it at once if Missing, or waits
    /// for the fetch already in flight. A failed fetch is an error (EIO).
    pub(super) async fn ensure(self: &Arc<Self>, i: u64) -> Result<()> {
        loop {
            let Some(mut rx) = self.start_fetch(i) else {
                return Ok(());
            };
            // A closed channel means the fetch was discarded: look again.
            let failed = match rx.wait_for(|v| v.is_some()).await {
                Ok(r) => match &*r {
                    Some(Err(msg)) => Some(msg.clone()),
                    _ => None,
                },
                Err(_) => None,
            };
            if let Some(msg) = failed {
                return Err(eio(format!("fetching chunk {i} from the source: {msg}")));
            }
        }
    }

    /// Fetches chunk `i` from the source and installs it in the cache,
    /// unless the fetch was made stale meanwhile; publishes the result.
    pub(super) async fn run_fetch(
        &self,
        i: u64,
        id: u64,
        epoch: u64,
    ) -> std::result::Result<(), String> {
        let src = self.source.read().unwrap().clone();
        let len = self.chunk_len(i);
        let t0 = std::time::Instant::now();
        // The pieces as received go into the cache: no chunk-sized buffer
        // to zero, fill and copy out of again.
        let res = match src.read_pieces(i * self.chunk, len).await {
            Ok(pieces) => {
                // Every fetch counts toward the pull rate, on-demand ones
                // too: they move the same link.
                self.window.record(len, t0.elapsed());
                self.install(i, id, epoch, &pieces).await
            }
            Err(e) => Err(e.to_string()),
        };
        if res.is_err() {
            self.counters.fetch_errors.fetch_add(1, Relaxed);
        }
        let mut sh = self.shared.lock().unwrap();
        let mine = sh.fetch_id(i) == Some(id);
        if mine {
            let f = sh.fetches.remove(&i).expect("checked above");
            sh.in_flight -= 1;
            if res.is_err() && sh.state(i) == ChunkState::Missing && self.opts.pull_workers > 0 {
                // Retried by the background pull, after everything else.
                let key = RETRY_BASE + sh.retry_seq;
                sh.retry_seq += 1;
                sh.enqueue(i, key);
                drop(sh);
                self.queue_notify.notify_waiters();
            } else {
                drop(sh);
            }
            f.tx.send_replace(Some(res.clone()));
        }
        res
    }

    pub(super) async fn install(
        &self,
        i: u64,
        id: u64,
        epoch: u64,
        pieces: &[bytes::Bytes],
    ) -> std::result::Result<(), String> {
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        if len != self.chunk_len(i) {
            return Err(format!(
                "the source returned {len} bytes for chunk {i} of {}",
                self.chunk_len(i)
            ));
        }
        let current = |sh: &Shared| {
            sh.epochs[i as usize] == epoch
                && sh.state(i) == ChunkState::Missing
                && sh.fetch_id(i) == Some(id)
        };
        // Exclusive: no write to this chunk runs while its old bytes land.
        let _x = self.stripe(i).write().await;
        if !current(&self.shared.lock().unwrap()) {
            return Ok(()); // superseded: a write covered it, or it was marked missing
        }
        {
            let _w = self.install_lock.lock().await;
            let off = i * self.chunk;
            if pieces.iter().all(|p| p.iter().all(|&b| b == 0)) {
                // Never-written chunks arrive as zeros: a hole keeps the
                // cache sparse (a fresh 1 GiB volume would otherwise fill
                // 1 GiB of the node's disk) and reads back as zeros.
                crate::backend::file::punch_hole(&self.cache, off, len)
                    .map_err(|e| format!("punching chunk {i} in the cache: {e}"))?;
            } else {
                write_pieces_at(&self.cache, pieces, off)
                    .map_err(|e| format!("writing chunk {i} to the cache: {e}"))?;
            }
        }
        let mut sh = self.shared.lock().unwrap();
        if !current(&sh) {
            return Ok(());
        }
        // A chunk handed over unpushed goes out with the next push.
        let to = if sh.push_on_install.remove(&i) {
            ChunkState::Dirty
        } else {
            ChunkState::Local
        };
        self.transition(&mut sh, i, to).map_err(|e| e.to_string())?;
        drop(sh);
        self.counters.bytes_pulled.fetch_add(len, Relaxed);
        self.present_notify.notify_waiters();
        Ok(())
    }

    /// Background worker `idx`: pulls while `idx` is inside the window.
    pub(super) async fn pull_worker(self: Arc<Self>, idx: usize) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if idx >= self.window.size() {
                let g = self.window.grown.notified();
                tokio::pin!(g);
                g.as_mut().enable();
                if idx >= self.window.size() {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = g => {}
                    }
                }
                continue;
            }
            let n = self.queue_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            let job = self.shared.lock().unwrap().next_pull();
            match job {
                Some((i, id, epoch)) => match self.run_fetch(i, id, epoch).await {
                    Ok(()) => backoff = BACKOFF_MIN,
                    Err(e) => {
                        warn!(chunk = i, error = %e, "background pull failed; retrying later");
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                },
                None => tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = n => {}
                },
            }
            if self.stop.is_cancelled() {
                return;
            }
        }
    }

    pub(super) async fn mark_missing(&self, chunks: &[u64]) -> Result<()> {
        // No push of these chunks may be in flight: it could land their
        // stale bytes in the sink after they became Missing.
        let _p = self.push_lock.lock().await;
        {
            let mut sh = self.shared.lock().unwrap();
            for &i in chunks {
                if i >= self.count {
                    return Err(Error::OutOfRange {
                        offset: i * self.chunk,
                        len: self.chunk,
                        size: self.size,
                    });
                }
                sh.epochs[i as usize] += 1;
                sh.gens[i as usize] += 1;
                // Its waiters see the channel close and fetch again.
                if sh.fetches.remove(&i).is_some() {
                    sh.in_flight -= 1;
                }
                self.transition(&mut sh, i, ChunkState::Missing)?;
            }
        }
        self.prioritize(chunks);
        Ok(())
    }
}

/// Writes `pieces` back to back at `off`: one `pwritev` for a whole chunk
/// (looping only if the kernel takes less).
fn write_pieces_at(f: &File, pieces: &[bytes::Bytes], off: u64) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    let mut at = off;
    while !rest.is_empty() {
        let n = match nix::sys::uio::pwritev(f, rest, at as i64) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
