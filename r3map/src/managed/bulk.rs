//! Fetches made by the mount's owner rather than by its pull workers: a
//! migration destination streams runs of chunks from its seed in one call
//! and writes them into the cache its own way (direct I/O), or verifies a
//! chunk already in the cache by its hash. The owner *claims* chunks (as a
//! pull worker would: readers of a claimed chunk wait for it), then
//! installs or gives back each claim.
//!
//! The same rules as the pull workers' fetches hold, so the mount's
//! guarantees do too: a claim carries the chunk's epoch, and an install is
//! dropped when [`Managed::mark_missing`] or a write covering the chunk
//! made it stale; the bytes land under the chunk's stripe lock, so no
//! write to the chunk runs meanwhile.

use std::fs::File;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::*;

/// A chunk claimed for a fetch made outside the mount (see the module
/// docs). Give it back with [`Managed::install_claimed`] or
/// [`Managed::unclaim`]; a claim dropped otherwise leaves the chunk
/// claimed until [`Managed::mark_missing`] names it.
#[derive(Debug)]
pub struct Claim {
    i: u64,
    id: u64,
    epoch: u64,
}

impl Claim {
    /// The chunk claimed.
    pub fn chunk(&self) -> u64 {
        self.i
    }
}

/// How often [`Managed::wait_pull_work`] looks for Missing chunks that no
/// queue entry names (a failed on-demand fetch is not queued again when
/// the mount has no pull workers).
const SWEEP: Duration = Duration::from_millis(100);

impl Managed {
    /// Claims the chunk at the head of the pull queue and up to `max - 1`
    /// chunks after it that are Missing and not being fetched: one run, to
    /// be fetched in one call. Empty when nothing is queued.
    pub fn claim_run(&self, max: u64) -> Vec<Claim> {
        let inner = &self.inner;
        let mut sh = inner.shared.lock().unwrap();
        let mut out = Vec::new();
        // The head: bumped chunks, then the in-order pass, then retries.
        let Some((first, id, epoch)) = sh.next_pull() else {
            return out;
        };
        out.push(Claim {
            i: first,
            id,
            epoch,
        });
        let mut j = first + 1;
        while (out.len() as u64) < max && j < inner.count {
            if !sh.claimable(j) {
                break;
            }
            if let Some(k) = sh.qkeys.remove(&j) {
                sh.queue.remove(&(k, j));
            }
            let (id, epoch, _) = sh.claim(j);
            out.push(Claim { i: j, id, epoch });
            j += 1;
        }
        // The in-order pass need not look at the run again.
        if sh.cursor > first && sh.cursor < j {
            sh.cursor = j;
        }
        out
    }

    /// Claims those of `chunks` that are Missing and not being fetched (in
    /// the order given), taking them off the pull queue.
    pub fn claim(&self, chunks: &[u64]) -> Vec<Claim> {
        let inner = &self.inner;
        let mut sh = inner.shared.lock().unwrap();
        let mut out = Vec::with_capacity(chunks.len());
        for &i in chunks {
            if i >= inner.count {
                continue;
            }
            if !sh.claimable(i) {
                continue;
            }
            if let Some(k) = sh.qkeys.remove(&i) {
                sh.queue.remove(&(k, i));
            }
            let (id, epoch, _) = sh.claim(i);
            out.push(Claim { i, id, epoch });
        }
        out
    }

    /// The cache file (for reading chunks the owner checks by hash).
    pub fn cache_file(&self) -> Arc<File> {
        self.inner.cache.clone()
    }

    /// Length of chunk `i` in bytes (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> u64 {
        self.inner.chunk_len(i)
    }

    /// Installs a claimed chunk: unless the claim went stale, runs
    /// `write(cache, offset)` on a blocking thread, under the chunk's lock,
    /// to put its bytes into the cache file (`counted`: bytes fetched, for
    /// the progress counters; 0 when the bytes were already there), then
    /// records the chunk present. Returns whether it was installed. Readers
    /// waiting on the chunk are woken either way.
    pub async fn install_claimed<F>(&self, c: Claim, counted: u64, write: F) -> Result<bool>
    where
        F: FnOnce(&File, u64) -> std::io::Result<()> + Send + 'static,
    {
        let inner = &self.inner;
        let current = |sh: &Shared| {
            sh.epochs[c.i as usize] == c.epoch
                && sh.state(c.i) == ChunkState::Missing
                && sh.fetch_id(c.i) == Some(c.id)
        };
        let res: Result<bool> = async {
            // Exclusive: no write to this chunk runs while its bytes land.
            let _x = inner.stripe(c.i).write().await;
            if !current(&inner.shared.lock().unwrap()) {
                return Ok(false);
            }
            let file = inner.cache.clone();
            let off = c.i * inner.chunk;
            tokio::task::spawn_blocking(move || write(&file, off))
                .await
                .map_err(|e| Error::io(format!("installing chunk {}: {e}", c.i)))??;
            let mut sh = inner.shared.lock().unwrap();
            if !current(&sh) {
                return Ok(false);
            }
            let to = if sh.push_on_install.remove(&c.i) {
                ChunkState::Dirty
            } else {
                ChunkState::Local
            };
            inner.transition(&mut sh, c.i, to)?;
            Ok(true)
        }
        .await;
        if matches!(res, Ok(true)) {
            inner.counters.bytes_pulled.fetch_add(counted, Relaxed);
            inner.present_notify.notify_waiters();
        }
        match &res {
            Ok(_) => self.finish_claim(&c, Some(Ok(()))),
            Err(e) => {
                inner.counters.fetch_errors.fetch_add(1, Relaxed);
                self.finish_claim(&c, Some(Err(e.to_string())));
                self.requeue_front(&[c.i]);
            }
        }
        res
    }

    /// Gives claims back unfetched: their chunks go back to the front of
    /// the pull queue, and readers waiting on them fetch them at once.
    pub fn unclaim(&self, claims: Vec<Claim>) {
        let chunks: Vec<u64> = claims.iter().map(|c| c.i).collect();
        for c in &claims {
            self.finish_claim(c, None);
        }
        self.requeue_front(&chunks);
    }

    /// Ends the fetch a claim registered, if it is still the chunk's;
    /// `None` closes the channel without a result (waiters look again).
    fn finish_claim(&self, c: &Claim, result: FetchResult) {
        let mut sh = self.inner.shared.lock().unwrap();
        if sh.fetch_id(c.i) != Some(c.id) {
            return; // mark_missing took it over
        }
        let f = sh.fetches.remove(&c.i).expect("checked above");
        sh.in_flight -= 1;
        drop(sh);
        if let Some(r) = result {
            f.tx.send_replace(Some(r));
        }
    }

    fn requeue_front(&self, chunks: &[u64]) {
        self.inner.prioritize(chunks);
    }

    /// Waits until the pull queue holds a chunk (or `SWEEP` passed); a
    /// Missing chunk that is neither queued nor being fetched is queued
    /// again first, so an owner that pulls through [`Managed::claim_run`]
    /// on a mount without pull workers never leaves one behind.
    pub async fn wait_pull_work(&self) {
        let inner = &self.inner;
        let n = inner.queue_notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        {
            let mut sh = inner.shared.lock().unwrap();
            // Queued chunks, or the in-order pass not done yet.
            if !sh.queue.is_empty() || sh.cursor < inner.count {
                return;
            }
            if sh.missing > sh.in_flight {
                let stranded: Vec<u64> = (0..inner.count)
                    .filter(|&i| sh.claimable(i) && !sh.qkeys.contains_key(&i))
                    .collect();
                for i in &stranded {
                    sh.enqueue(*i, *i as i64);
                }
                if !stranded.is_empty() {
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(SWEEP, n).await;
    }
}
