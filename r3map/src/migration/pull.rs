//! The destination's bulk pull and its delta check.
//!
//! The pull: a few workers each claim a run of consecutive missing chunks
//! at the head of the mount's pull queue ([`Managed::claim_run`]) and
//! stream it from the seed in one `Read` call, writing each chunk into the
//! cache as soon as its bytes are in, with direct I/O where the file system
//! takes it. Measured on a 1 GiB migration, the page-cache write of the
//! cache file was ~60 % of the destination's CPU (filling fresh page cache
//! is slow on a VM whose host takes free memory back); a direct write
//! costs ~5 % of that, and leaves no dirty pages for the fsync at finalize.
//! When the seed is not the mount's source any more (lost, fallback
//! active), a run is read from the mount's source instead.
//!
//! The delta check: a destination that already holds an older copy of
//! the region claims every missing chunk, asks the seed for chunk hashes
//! (`Hashes`) and hashes its own copy; equal chunks are installed as they
//! are, the others go back to the pull queue.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::pb;
use super::seed::{self, SeedClient, HASH_LEN, MAX_READ};
use crate::backend::Backend;
use crate::managed::{Claim, Managed};
use crate::{Error, Result};

/// Bytes asked for in one `Read` call: large enough that the per-call
/// cost (a stream set-up, a queue lookup) vanishes, small enough that a
/// reader waiting on a claimed chunk after finalize waits a few ms at most.
pub const RUN_BYTES: u64 = 8 << 20;
/// Direct I/O alignment (buffer address, file offset and length).
const ALIGN: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A buffer whose bytes start at an `ALIGN`ed address.
struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        AlignedBuf { v, off, len }
    }

    fn bytes(&self, n: usize) -> &[u8] {
        &self.v[self.off..self.off + n]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Writes one chunk's bytes at `off` of the cache: a hole for zeros (the
/// cache stays sparse, as the mount's own fetches keep it), else through
/// `direct` when it is open and the write is aligned, else buffered.
fn write_chunk(cache: &File, direct: Option<&File>, data: &[u8], off: u64) -> std::io::Result<()> {
    if data.iter().all(|&b| b == 0) {
        return crate::backend::file::punch_hole(cache, off, data.len() as u64)
            .map_err(std::io::Error::from);
    }
    let aligned = off.is_multiple_of(ALIGN as u64)
        && data.len().is_multiple_of(ALIGN)
        && data.as_ptr().align_offset(ALIGN) == 0;
    if let (Some(d), true) = (direct, aligned) {
        match d.write_all_at(data, off) {
            // Some file systems refuse direct I/O only at write time.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
            r => return r,
        }
    }
    cache.write_all_at(data, off)
}

/// Opens the cache for direct writes, where the file system allows it.
pub(super) fn open_direct(cache: &std::path::Path) -> Option<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(cache)
    {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            debug!(error = %e, "migration: no direct I/O on the cache; writing through the page cache");
            None
        }
    }
}

/// The bulk pull of one destination.
pub(super) struct Puller {
    pub managed: Arc<Managed>,
    pub seed: Arc<SeedClient>,
    pub direct: Option<Arc<File>>,
}

impl Puller {
    /// Runs one pull worker until `stop`.
    pub async fn worker(self: Arc<Self>, stop: CancellationToken) {
        let chunk = self.managed.chunk_size();
        let max = (RUN_BYTES / chunk).max(1);
        let mut backoff = BACKOFF_MIN;
        let mut buf = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let claims = self.managed.claim_run(max);
            if claims.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.managed.wait_pull_work() => {}
                }
                continue;
            }
            let r = tokio::select! {
                r = self.fetch_run(claims, &mut buf) => r,
                _ = stop.cancelled() => return,
            };
            match r {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    warn!(error = %e, "migration: pull of a run failed; retrying later");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Fetches and installs one claimed run; on failure the claims not
    /// installed are given back.
    async fn fetch_run(&self, claims: Vec<Claim>, buf: &mut Option<Arc<AlignedBuf>>) -> Result<()> {
        let src = self.managed.source();
        let from_seed = std::ptr::addr_eq(Arc::as_ptr(&src), Arc::as_ptr(&self.seed));
        let chunk = self.managed.chunk_size();
        if !from_seed || self.seed.is_lost() || chunk > MAX_READ {
            return self.fetch_run_from(src, claims).await;
        }
        let mut left: VecDeque<Claim> = claims.into();
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        while let Some(front) = left.front() {
            if self.seed.is_lost() {
                self.managed.unclaim(left.into());
                return Err(Error::Unavailable("migration seed lost".into()));
            }
            let off = front.chunk() * chunk;
            let len: u64 = left.iter().map(|c| self.managed.chunk_len(c.chunk())).sum();
            let r = self.stream_into(off, len, &mut left, buf).await;
            match r {
                Ok(()) => {}
                Err(StreamError::Local(e)) => {
                    // Not the seed's fault: the worker backs off and the
                    // chunks are tried again later.
                    self.managed.unclaim(left.into());
                    return Err(e);
                }
                Err(StreamError::Seed(s))
                    if seed::transient(&s) && start.elapsed() < self.seed.patience() =>
                {
                    debug!(error = %s, "seed read failed; retrying from the chunk reached");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(StreamError::Seed(s)) => {
                    if seed::transient(&s) {
                        self.seed
                            .declare_lost(&format!("reads failing for {:?}: {s}", start.elapsed()));
                    }
                    self.managed.unclaim(left.into());
                    return Err(Error::from(s));
                }
            }
        }
        Ok(())
    }

    /// One `Read` of `len` bytes at `off` (the chunks of `left`, in order):
    /// each chunk is installed once its bytes are in and leaves `left`.
    async fn stream_into(
        &self,
        off: u64,
        len: u64,
        left: &mut VecDeque<Claim>,
        buf: &mut Option<Arc<AlignedBuf>>,
    ) -> Result<(), StreamError> {
        let chunk = self.managed.chunk_size() as usize;
        let mut s = self.seed.open_read(off, len).await?;
        let mut b = take_buf(buf, chunk);
        let mut pos = 0usize;
        let mut want = match left.front() {
            Some(c) => self.managed.chunk_len(c.chunk()) as usize,
            None => return Ok(()),
        };
        while let Some(piece) = s.next().await.map_err(Status::from)? {
            let mut data: Bytes = piece.data;
            while !data.is_empty() {
                let Some(claim) = left.front() else {
                    return Err(Status::internal("seed sent more bytes than asked").into());
                };
                let n = (want - pos).min(data.len());
                Arc::get_mut(&mut b).expect("buffer owned here").bytes_mut()[pos..pos + n]
                    .copy_from_slice(&data[..n]);
                pos += n;
                let _ = data.split_to(n);
                if pos < want {
                    continue;
                }
                let i = claim.chunk();
                let c = left.pop_front().expect("front exists");
                let (bb, direct) = (b.clone(), self.direct.clone());
                let installed = self
                    .managed
                    .install_claimed(c, want as u64, move |cache, o| {
                        write_chunk(cache, direct.as_deref(), bb.bytes(want), o)
                    })
                    .await;
                if let Err(e) = installed {
                    return Err(StreamError::Local(
                        e.context(format!("installing chunk {i}")),
                    ));
                }
                // The install's closure is gone: the buffer is ours again.
                if Arc::get_mut(&mut b).is_none() {
                    b = Arc::new(AlignedBuf::new(chunk));
                }
                pos = 0;
                want = match left.front() {
                    Some(c) => self.managed.chunk_len(c.chunk()) as usize,
                    None => 0,
                };
            }
        }
        *buf = Some(b);
        if !left.is_empty() {
            return Err(StreamError::Seed(Status::unavailable(format!(
                "seed stream ended {} chunks short",
                left.len()
            ))));
        }
        Ok(())
    }

    /// A run read from the mount's current source (the fallback backend
    /// once the seed is lost), in one call.
    async fn fetch_run_from(&self, src: Arc<dyn Backend>, claims: Vec<Claim>) -> Result<()> {
        let chunk = self.managed.chunk_size();
        let first = claims[0].chunk();
        let total: u64 = claims
            .iter()
            .map(|c| self.managed.chunk_len(c.chunk()))
            .sum();
        let mut data = vec![0u8; total as usize];
        if let Err(e) = src.read_at(first * chunk, &mut data).await {
            self.managed.unclaim(claims);
            return Err(e);
        }
        let data = Arc::new(data);
        let mut at = 0usize;
        for c in claims {
            let len = self.managed.chunk_len(c.chunk()) as usize;
            let (d, s) = (data.clone(), at);
            self.managed
                .install_claimed(c, len as u64, move |cache, o| {
                    write_chunk(cache, None, &d[s..s + len], o)
                })
                .await?;
            at += len;
        }
        Ok(())
    }
}

/// Why a streamed run stopped.
enum StreamError {
    /// The seed's read failed (maybe worth retrying).
    Seed(Status),
    /// Writing into the cache failed.
    Local(Error),
}

impl From<Status> for StreamError {
    fn from(s: Status) -> Self {
        StreamError::Seed(s)
    }
}

fn take_buf(buf: &mut Option<Arc<AlignedBuf>>, chunk: usize) -> Arc<AlignedBuf> {
    match buf.take() {
        Some(b) if b.len == chunk => b,
        _ => Arc::new(AlignedBuf::new(chunk)),
    }
}

/// Chunks checked against an older copy, for status and the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeltaOutcome {
    /// Chunks whose local bytes hash like the seed's: kept, not pulled.
    pub reused: u64,
    /// Chunks that differ (pulled).
    pub differ: u64,
}

/// The delta check (see the module docs) over the chunks `claimed` (every
/// chunk still missing, claimed before any pull worker started).
/// Chunks claimed here and not reused go back to the pull queue at once,
/// so the pull of what differs overlaps the check of the rest.
pub(super) async fn reuse_by_hash(
    managed: &Arc<Managed>,
    mut client: seed::Client,
    session: u64,
    claimed: Vec<Claim>,
    stop: &CancellationToken,
) -> Result<DeltaOutcome> {
    let count = managed.chunk_count();
    let chunk = managed.chunk_size();
    let mut claims: Vec<Option<Claim>> = (0..count).map(|_| None).collect();
    for c in claimed {
        let i = c.chunk() as usize;
        claims[i] = Some(c);
    }
    let give_back = |claims: &mut Vec<Option<Claim>>| {
        let rest: Vec<Claim> = claims.iter_mut().filter_map(Option::take).collect();
        managed.unclaim(rest);
    };
    let t = Instant::now();
    let mut out = DeltaOutcome::default();
    let mut s = match client
        .hashes(pb::HashesRequest {
            session,
            first: 0,
            count,
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => {
            give_back(&mut claims);
            return Err(Error::from(e));
        }
    };
    let cache = managed.cache_file();
    loop {
        let batch = tokio::select! {
            m = s.message() => m,
            _ = stop.cancelled() => { give_back(&mut claims); return Ok(out) }
        };
        let batch = match batch {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                give_back(&mut claims);
                return Err(Error::from(e));
            }
        };
        if batch.algorithm != seed::HASH_ALGORITHM || batch.hashes.len() % HASH_LEN != 0 {
            give_back(&mut claims);
            return Err(Error::io(format!(
                "seed sent {} bytes of {:?} hashes; expected {} in 32-byte hashes",
                batch.hashes.len(),
                batch.algorithm,
                seed::HASH_ALGORITHM
            )));
        }
        let n = (batch.hashes.len() / HASH_LEN) as u64;
        if batch.first.checked_add(n).is_none_or(|e| e > count) {
            give_back(&mut claims);
            return Err(Error::io("seed sent hashes past the region's end"));
        }
        // Our side of the batch, off the runtime: read and hash each chunk
        // we claimed.
        let idx: Vec<u64> = (batch.first..batch.first + n)
            .filter(|&i| claims[i as usize].is_some())
            .collect();
        let lens: Vec<u64> = idx.iter().map(|&i| managed.chunk_len(i)).collect();
        let (f, idx2) = (cache.clone(), idx.clone());
        let local = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<[u8; HASH_LEN]>> {
            let mut buf = Vec::new();
            let mut out = Vec::with_capacity(idx2.len());
            for (&i, &len) in idx2.iter().zip(&lens) {
                buf.resize(len as usize, 0);
                f.read_exact_at(&mut buf, i * chunk)?;
                out.push(seed::chunk_hash(&buf));
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::io(e.to_string()))?;
        let local = match local {
            Ok(l) => l,
            Err(e) => {
                give_back(&mut claims);
                return Err(e.into());
            }
        };
        let mut differ = Vec::new();
        for (k, &i) in idx.iter().enumerate() {
            let at = ((i - batch.first) as usize) * HASH_LEN;
            let theirs = &batch.hashes[at..at + HASH_LEN];
            let c = claims[i as usize].take().expect("claimed");
            if local[k][..] == *theirs {
                if managed.install_claimed(c, 0, |_, _| Ok(())).await? {
                    out.reused += 1;
                }
            } else {
                differ.push(c);
            }
        }
        out.differ += differ.len() as u64;
        managed.unclaim(differ);
    }
    // Chunks the seed sent no hash for are pulled like any other.
    give_back(&mut claims);
    info!(
        reused = out.reused,
        differ = out.differ,
        took = ?t.elapsed(),
        "migration: older copy checked by hash; only differing chunks are pulled"
    );
    Ok(out)
}
