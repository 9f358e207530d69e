//! Getting written chunks to the sink: push rounds (on flush with
//! [`Durability::Flush`], at the push interval otherwise) that record a
//! chunk Local only once the sink flushed it and no write touched it since.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::io::read_exact_at;
use super::*;

impl Inner {
    /// fdatasync of the state file and the cache.
    pub(super) async fn sync_local(&self) -> Result<()> {
        let (c, s) = (self.cache.clone(), self.state.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            s.sync()?;
            c.sync_data()?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }

    /// Pushes every Dirty chunk to the sink with the push workers, flushes
    /// the sink, then records the chunks Local — each only if no write
    /// touched it since its snapshot was taken — and syncs the state file.
    /// Returns whether it synced the cache (it does when anything was dirty).
    pub(super) async fn push_round(self: &Arc<Self>) -> Result<bool> {
        let Some(sink) = self.sink.clone() else {
            return Ok(false); // nowhere to push: Dirty stays Dirty
        };
        // Nothing leaves for the store before the owner's state is durable.
        super::barrier::pass(&self.barrier).await?;
        let _p = self.push_lock.lock().await;
        if self.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(false); // the region moved on: its new host pushes
        }
        self.check_fenced()?;
        // Snapshot before the cache sync: whatever a snapshot covers was
        // written before it, so it is durable in the cache once we mark Local.
        let snap: Vec<(u64, u64, bool)> = {
            let sh = self.shared.lock().unwrap();
            sh.dirty_set
                .iter()
                .map(|&i| (i, sh.gens[i as usize], sh.writers[i as usize] == 0))
                .collect()
        };
        if snap.is_empty() {
            return Ok(false);
        }
        self.sync_local().await?;
        let snap = Arc::new(snap);
        let next = Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..self.opts.push_workers.min(snap.len()) {
            let (this, snap, next, sink) = (self.clone(), snap.clone(), next.clone(), sink.clone());
            set.spawn(async move {
                let mut done = Vec::new();
                let mut err = None;
                let mut buf = vec![0u8; this.chunk as usize];
                loop {
                    if matches!(&err, Some(e) if is_fenced(e)) {
                        break; // the region is someone else's now
                    }
                    let k = next.fetch_add(1, Relaxed);
                    let Some(&(i, gen, quiet)) = snap.get(k) else {
                        break;
                    };
                    let len = this.chunk_len(i);
                    let off = i * this.chunk;
                    let b = &mut buf[..len as usize];
                    let r = match read_exact_at(&this.cache, b, off) {
                        Err(e) => Err(Error::Io(e)),
                        // An all-zero chunk is trimmed: the sink may free it.
                        Ok(()) if b.iter().all(|&x| x == 0) => sink.trim(off, len).await,
                        Ok(()) => sink.write_at(off, b).await,
                    };
                    match r {
                        Ok(()) if quiet => done.push((i, gen)),
                        Ok(()) => {}
                        Err(e) => {
                            this.counters.push_errors.fetch_add(1, Relaxed);
                            err.get_or_insert(e.context(format!("pushing chunk {i}")));
                        }
                    }
                }
                (done, err)
            });
        }
        let mut done = Vec::new();
        let mut err = None;
        while let Some(r) = set.join_next().await {
            let (d, e) = r.map_err(|e| Error::Io(std::io::Error::other(e)))?;
            done.extend(d);
            // A fence outranks any other error: it stops the mount.
            if let Some(e) = e {
                if err.is_none() || is_fenced(&e) {
                    err = Some(e);
                }
            }
        }
        if let Some(e) = err.take_if(|e| is_fenced(e)) {
            return Err(self.record_fenced(e));
        }
        if !done.is_empty() {
            if let Err(e) = sink.flush().await {
                return Err(if is_fenced(&e) {
                    self.record_fenced(e)
                } else {
                    e
                });
            }
            let mut pushed = 0u64;
            let mut bytes = 0u64;
            {
                let mut sh = self.shared.lock().unwrap();
                for (i, gen) in done {
                    if sh.state(i) == ChunkState::Dirty
                        && sh.gens[i as usize] == gen
                        && sh.writers[i as usize] == 0
                    {
                        self.transition(&mut sh, i, ChunkState::Local)?;
                        pushed += 1;
                        bytes += self.chunk_len(i);
                    }
                }
            }
            self.counters.chunks_pushed.fetch_add(pushed, Relaxed);
            self.counters.bytes_pushed.fetch_add(bytes, Relaxed);
            let s = self.state.clone();
            tokio::task::spawn_blocking(move || s.sync())
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))??;
            debug!(chunks = pushed, bytes, "pushed");
        }
        match err {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// Refuses with the recorded fence, if there is one.
    pub(super) fn check_fenced(&self) -> Result<()> {
        match &*self.fenced.lock().unwrap() {
            Some(why) => Err(Error::Fenced(why.clone())),
            None => Ok(()),
        }
    }

    /// Records that the sink fenced this mount off; returns the error.
    fn record_fenced(&self, e: Error) -> Error {
        let mut f = self.fenced.lock().unwrap();
        if f.is_none() {
            tracing::error!(error = %e, "fenced: another writer holds the region now; this mount stops pushing and writing");
            *f = Some(e.to_string());
        }
        e
    }

    pub(super) async fn push_loop(self: Arc<Self>, leftover: bool) {
        // Dirty chunks left by a previous process go out at once.
        let mut wait = if leftover {
            Duration::ZERO
        } else {
            self.opts.push_interval
        };
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = self.opts.push_interval;
            match self.push_round().await {
                Err(e) if is_fenced(&e) => return, // said so in record_fenced
                Err(e) => warn!(error = %e, "background push failed; chunks stay dirty"),
                Ok(_) => {}
            }
        }
    }
}

fn is_fenced(e: &Error) -> bool {
    e.kind() == crate::ErrorKind::Fenced
}
