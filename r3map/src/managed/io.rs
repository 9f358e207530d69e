//! The mount's [`Backend`] face: reads that fetch what is missing, writes
//! that keep the state file ahead of the data.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::backend::{check_range, chunk_spans};

impl Inner {
    /// Refuses writes once the mount was sealed or fenced off.
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.sealed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::FailedPrecondition(
                "the region was handed over to another host: writes are closed".into(),
            ));
        }
        self.check_fenced()
    }

    /// Runs a mutation of the cache bytes `within..within+n` of chunk `i`
    /// (`op` does the I/O), keeping the state file ahead of the data.
    pub(super) async fn mutate(
        self: &Arc<Self>,
        i: u64,
        within: u64,
        n: u64,
        op: &(dyn Fn() -> std::io::Result<()> + Sync),
    ) -> Result<()> {
        let full = within == 0 && n == self.chunk_len(i);
        let mut became_present = false;
        loop {
            let stripe = self.stripe(i).read().await;
            let need_fetch = {
                let mut sh = self.shared.lock().unwrap();
                let need = match sh.state(i) {
                    // Read-modify-write: the rest of the chunk must come first.
                    ChunkState::Missing if !full => true,
                    ChunkState::Missing => {
                        // Covered whole: a fetch in flight is now stale.
                        sh.epochs[i as usize] += 1;
                        self.transition(&mut sh, i, ChunkState::Dirty)?;
                        became_present = true;
                        false
                    }
                    ChunkState::Local => {
                        self.transition(&mut sh, i, ChunkState::Dirty)?;
                        false
                    }
                    ChunkState::Dirty => false,
                };
                if !need {
                    sh.writers[i as usize] += 1;
                    sh.gens[i as usize] += 1;
                }
                need
            };
            if need_fetch {
                drop(stripe);
                self.ensure(i).await?;
                continue;
            }
            let r = op();
            {
                let mut sh = self.shared.lock().unwrap();
                sh.writers[i as usize] -= 1;
                sh.gens[i as usize] += 1;
            }
            if became_present {
                self.present_notify.notify_waiters();
            }
            return r.map_err(Error::Io);
        }
    }

    /// Reads bytes of chunk `i` into `out`, fetching the chunk if needed;
    /// never returns bytes of a chunk that is not present.
    pub(super) async fn read_chunk(
        self: &Arc<Self>,
        i: u64,
        within: u64,
        out: &mut [u8],
    ) -> Result<()> {
        loop {
            self.ensure(i).await?;
            let epoch = {
                let sh = self.shared.lock().unwrap();
                if sh.state(i) == ChunkState::Missing {
                    continue;
                }
                sh.epochs[i as usize]
            };
            read_exact_at(&self.cache, out, i * self.chunk + within)?;
            let sh = self.shared.lock().unwrap();
            if sh.epochs[i as usize] == epoch && sh.state(i) != ChunkState::Missing {
                return Ok(());
            }
        }
    }
}

pub(super) fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cache file shorter than the region",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for Managed {
    fn size(&self) -> u64 {
        self.inner.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        check_range(offset, buf.len() as u64, inner.size)?;
        let _g = inner.gate.read().await;
        let spans: Vec<_> = chunk_spans(offset, buf.len() as u64, inner.chunk).collect();
        // Start every missing chunk of the request at once, then read in order.
        let mut last_missing = None;
        for &(i, ..) in &spans {
            if inner.start_fetch(i).is_some() {
                last_missing = Some(i);
            }
        }
        if let Some(l) = last_missing {
            let next: Vec<u64> = (l + 1..(l + 1 + READAHEAD).min(inner.count)).collect();
            inner.prioritize(&next);
        }
        for (i, within, pos, n) in spans {
            inner
                .read_chunk(i, within, &mut buf[pos as usize..(pos + n) as usize])
                .await?;
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let inner = &self.inner;
        check_range(offset, data.len() as u64, inner.size)?;
        let _g = inner.gate.read().await;
        inner.check_writable()?;
        let spans: Vec<_> = chunk_spans(offset, data.len() as u64, inner.chunk).collect();
        // Partial edge chunks that are missing are fetched concurrently.
        for &(i, within, _, n) in [spans.first(), spans.last()].into_iter().flatten() {
            if !(within == 0 && n == inner.chunk_len(i)) {
                inner.start_fetch(i);
            }
        }
        for (i, within, pos, n) in spans {
            let piece = &data[pos as usize..(pos + n) as usize];
            let off = i * inner.chunk + within;
            let cache = &inner.cache;
            inner
                .mutate(i, within, n, &|| cache.write_all_at(piece, off))
                .await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let inner = &self.inner;
        let _g = inner.gate.read().await;
        inner.check_fenced()?;
        super::barrier::pass(&inner.barrier).await?;
        let synced = match inner.opts.durability {
            Durability::Flush => inner.push_round().await?,
            Durability::Async => false,
        };
        if !synced {
            inner.sync_local().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let inner = &self.inner;
        check_range(offset, len, inner.size)?;
        let _g = inner.gate.read().await;
        inner.check_writable()?;
        for (i, within, _, n) in chunk_spans(offset, len, inner.chunk) {
            let off = i * inner.chunk + within;
            let cache = &inner.cache;
            inner
                .mutate(i, within, n, &|| {
                    crate::backend::file::punch_hole(cache, off, n).map_err(std::io::Error::from)
                })
                .await?;
        }
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        let inner = &self.inner;
        check_range(offset, len, inner.size)?;
        let chunks: Vec<u64> = chunk_spans(offset, len, inner.chunk).map(|s| s.0).collect();
        inner.prioritize(&chunks);
        Ok(())
    }

    fn flush_is_global(&self) -> bool {
        true
    }

    /// The sink's epoch: the mount writes the region only through it.
    fn epoch(&self) -> Option<u64> {
        self.inner.sink.as_ref().and_then(|s| s.epoch())
    }

    async fn fence(&self, epoch: u64, owner: &str) -> Result<()> {
        match &self.inner.sink {
            Some(s) => s.fence(epoch, owner).await,
            None => Err(Error::FailedPrecondition(
                "a mount without a sink writes no region: nothing to fence".into(),
            )),
        }
    }
}
