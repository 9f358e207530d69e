//! The managed mount: a local cache in front of a remote backend.
//!
//! [`Managed`] is a [`Backend`] over a *source* (where missing chunks are
//! pulled from), an optional *sink* (where written chunks are pushed; for a
//! plain mount the sink is the source) and a local sparse cache file with a
//! chunk-state file beside it ([`state`]). Reads of a missing chunk fetch
//! it at once; background workers pull the rest, in an order callers can
//! bump ([`Managed::prioritize`]); written chunks are pushed every push
//! interval and, with [`Durability::Flush`], on every flush.
//!
//! Crash safety comes from the order of state writes: a chunk is recorded
//! Dirty before its data reaches the cache, and Local only after its data
//! was pushed and the sink flushed. A restarted process therefore pushes
//! Dirty chunks again (harmless), reuses Local ones and pulls Missing ones.
//! A `kill -9` keeps every state write (they sit in the page cache). After
//! a host crash only what a flush covered is guaranteed: the kernel may
//! write back an unflushed chunk's new bytes but not its Dirty mark, so a
//! chunk written since the last flush can come back Local with bytes the
//! sink lacks — bytes no flush ever acknowledged.
//!
//! Concurrency: all chunk state lives under one small mutex that is never
//! held across network I/O (only across the one-byte state write). A
//! striped lock per chunk keeps a fetched chunk from being installed over a
//! write; a per-chunk write generation keeps a chunk written while it was
//! being pushed Dirty; a per-chunk epoch discards fetches made stale by
//! [`Managed::mark_missing`] or by a write covering the whole chunk.

pub mod cli;
pub mod state;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify, OwnedRwLockWriteGuard, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::backend::{check_range, chunk_spans, Backend, Error, Result};
pub use state::{state_path, ChunkState};

/// Default chunk size: 1 MiB, the chunk size of the chunked backends
/// ([`crate::backend::DEFAULT_CHUNK_SIZE`]), so one managed chunk is one
/// redis key or one `dir:` file and a push never read-modify-writes at the
/// remote. Large enough that a sequential pull is a few requests per MiB
/// over a high-RTT link, small enough that a first access costs ~1 MiB of
/// transfer and the state file stays at 1 byte per MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Default background pull workers: 32 chunks of 1 MiB in flight hide
/// ~30 ms of RTT at 1 GB/s while bounding buffers to 32 MiB.
pub const DEFAULT_PULL_WORKERS: usize = 32;
/// Default push workers.
pub const DEFAULT_PUSH_WORKERS: usize = 16;
/// Default interval between background pushes (r3map's).
pub const DEFAULT_PUSH_INTERVAL: Duration = Duration::from_secs(20);
/// Chunks after an on-demand fetch moved to the head of the pull queue, so
/// a sequential reader finds its next chunks already coming.
const READAHEAD: u64 = 8;
/// Queue keys at or above this are retries, taken after every other chunk.
const RETRY_BASE: i64 = i64::MAX / 2;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a flush promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// A flush returns once every chunk written before it is pushed to the
    /// sink and the sink flushed: an acknowledged fsync survives the host.
    #[default]
    Flush,
    /// A flush only makes the local cache durable; chunks reach the sink at
    /// the push interval. UNSAFE if the host dies: writes since the last
    /// push are lost to the sink (r3map's behaviour).
    Async,
}

/// Tuning of a [`Managed`] mount.
#[derive(Debug, Clone)]
pub struct Options {
    pub chunk_size: u64,
    /// Background pull workers; 0 pulls only on demand.
    pub pull_workers: usize,
    pub push_workers: usize,
    pub push_interval: Duration,
    pub durability: Durability,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pull_workers: DEFAULT_PULL_WORKERS,
            push_workers: DEFAULT_PUSH_WORKERS,
            push_interval: DEFAULT_PUSH_INTERVAL,
            durability: Durability::Flush,
        }
    }
}

/// Counters of a mount, as of one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub chunks_total: u64,
    pub chunks_local: u64,
    pub chunks_dirty: u64,
    pub chunks_missing: u64,
    pub chunks_in_flight: u64,
    /// Chunks pushed to the sink and recorded Local.
    pub chunks_pushed: u64,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    /// Fetches started by a read or write rather than the background pull.
    pub on_demand_fetches: u64,
    pub fetch_errors: u64,
    pub push_errors: u64,
}

impl Progress {
    /// One JSON object, for status files and logs.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"chunks_total\":{},\"chunks_local\":{},\"chunks_dirty\":{},\"chunks_missing\":{},\
             \"chunks_in_flight\":{},\"chunks_pushed\":{},\"bytes_pulled\":{},\"bytes_pushed\":{},\
             \"on_demand_fetches\":{},\"fetch_errors\":{},\"push_errors\":{}}}",
            self.chunks_total,
            self.chunks_local,
            self.chunks_dirty,
            self.chunks_missing,
            self.chunks_in_flight,
            self.chunks_pushed,
            self.bytes_pulled,
            self.bytes_pushed,
            self.on_demand_fetches,
            self.fetch_errors,
            self.push_errors
        )
    }
}

/// Result of a fetch, shared with every reader waiting on it.
type FetchResult = Option<std::result::Result<(), String>>;

struct Fetch {
    id: u64,
    tx: watch::Sender<FetchResult>,
}

struct Meta {
    state: ChunkState,
    /// Bumped when a write starts and when it ends: a push marks the chunk
    /// Local only if this did not move while it pushed.
    gen: u64,
    /// Writes in progress on the chunk.
    writers: u32,
    /// Bumped when a fetch in flight must be discarded.
    epoch: u64,
    fetch: Option<Fetch>,
    /// Key of the chunk in the pull queue, if queued.
    qkey: Option<i64>,
}

struct Shared {
    chunks: Vec<Meta>,
    /// Pull queue: (priority, chunk), lowest first.
    queue: BTreeSet<(i64, u64)>,
    /// Chunks in state Dirty, so a flush does not scan every chunk.
    dirty_set: BTreeSet<u64>,
    /// Last priority handed out by a bump (decreasing).
    bump: i64,
    retry_seq: i64,
    next_fetch_id: u64,
    local: u64,
    dirty: u64,
    missing: u64,
    in_flight: u64,
}

impl Shared {
    fn enqueue(&mut self, i: u64, key: i64) {
        let m = &mut self.chunks[i as usize];
        if let Some(old) = m.qkey.replace(key) {
            self.queue.remove(&(old, i));
        }
        self.queue.insert((key, i));
    }

    /// Registers a fetch of chunk `i`; returns its id and the epoch it ran in.
    fn claim(&mut self, i: u64) -> (u64, u64, watch::Receiver<FetchResult>) {
        let id = self.next_fetch_id;
        self.next_fetch_id += 1;
        let (tx, rx) = watch::channel(None);
        let m = &mut self.chunks[i as usize];
        m.fetch = Some(Fetch { id, tx });
        self.in_flight += 1;
        (id, m.epoch, rx)
    }
}

#[derive(Default)]
struct Counters {
    chunks_pushed: AtomicU64,
    bytes_pulled: AtomicU64,
    bytes_pushed: AtomicU64,
    on_demand: AtomicU64,
    fetch_errors: AtomicU64,
    push_errors: AtomicU64,
}

const STRIPES: usize = 1024;

struct Inner {
    size: u64,
    chunk: u64,
    count: u64,
    opts: Options,
    cache: Arc<File>,
    state: Arc<state::StateFile>,
    shared: Mutex<Shared>,
    /// Held exclusively while a fetched chunk is installed, shared by writes.
    stripes: Box<[RwLock<()>]>,
    source: std::sync::RwLock<Arc<dyn Backend>>,
    sink: Option<Arc<dyn Backend>>,
    gate: Arc<RwLock<()>>,
    held: tokio::sync::Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    /// One push round at a time; mark_missing waits for it too.
    push_lock: tokio::sync::Mutex<()>,
    /// One fetched chunk lands in the cache at a time: concurrent pwrites to
    /// one file contend on its inode lock, and the kernel spins a CPU on it
    /// that the network side needs (measured: ~13 % of a 2-CPU machine).
    install_lock: tokio::sync::Mutex<()>,
    queue_notify: Notify,
    present_notify: Notify,
    counters: Counters,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// A managed mount; see the module documentation. Background tasks stop
/// when it is dropped or [`Managed::close`]d.
pub struct Managed {
    inner: Arc<Inner>,
}

fn eio(msg: String) -> Error {
    Error::io(msg)
}

impl Managed {
    /// Opens (or creates) the cache at `cache` for a region the size of
    /// `source`, and starts the background pull and push. Must be called
    /// inside a tokio runtime. The mount serves I/O at once, while pulling.
    ///
    /// A cache whose state file was made for another region size or chunk
    /// size is refused, as is a cache file holding data but no state file.
    pub fn open(
        cache: &Path,
        source: Arc<dyn Backend>,
        sink: Option<Arc<dyn Backend>>,
        opts: Options,
    ) -> Result<Managed> {
        // Every fetch and push moves ~1 MiB buffers (mount, leech).
        crate::remote::tune_allocator();
        let size = source.size();
        let chunk = opts.chunk_size;
        if chunk == 0 {
            return Err(Error::InvalidArgument("chunk size must be positive".into()));
        }
        if opts.push_workers == 0 {
            return Err(Error::InvalidArgument(
                "push workers must be at least 1".into(),
            ));
        }
        if opts.push_interval.is_zero() {
            return Err(Error::InvalidArgument(
                "push interval must be positive".into(),
            ));
        }
        if let Some(s) = &sink {
            if s.size() != size {
                return Err(Error::InvalidArgument(format!(
                    "sink holds {} bytes, source {size}",
                    s.size()
                )));
            }
        }
        let spath = state_path(cache);
        let (cache_file, state, states) = if spath.exists() {
            let (st, states) = state::StateFile::open_existing(&spath, chunk, size)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(cache)
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "state file {} exists but its cache {} cannot be opened: {e}",
                        spath.display(),
                        cache.display()
                    ))
                })?;
            let len = f.metadata()?.len();
            if len != size {
                return Err(Error::FailedPrecondition(format!(
                    "cache {} holds {len} bytes, its state file describes {size}",
                    cache.display()
                )));
            }
            (f, st, states)
        } else {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(cache)?;
            let md = f.metadata()?;
            // Without a state file nothing says which bytes are valid: only
            // an empty (all-hole) file, e.g. one we made before a crash, is taken.
            if md.blocks() > 0 {
                return Err(Error::FailedPrecondition(format!(
                    "cache {} holds data but has no state file {}; remove it to start over",
                    cache.display(),
                    spath.display()
                )));
            }
            f.set_len(size)?;
            f.sync_all()?;
            let st = state::StateFile::create(&spath, chunk, size)?;
            let count = size.div_ceil(chunk) as usize;
            (f, st, vec![ChunkState::Missing; count])
        };

        let count = states.len() as u64;
        let mut sh = Shared {
            chunks: Vec::with_capacity(states.len()),
            queue: BTreeSet::new(),
            dirty_set: BTreeSet::new(),
            bump: 0,
            retry_seq: 0,
            next_fetch_id: 0,
            local: 0,
            dirty: 0,
            missing: 0,
            in_flight: 0,
        };
        for (i, st) in states.into_iter().enumerate() {
            match st {
                ChunkState::Missing => {
                    sh.missing += 1;
                    sh.queue.insert((i as i64, i as u64));
                }
                ChunkState::Local => sh.local += 1,
                ChunkState::Dirty => {
                    sh.dirty += 1;
                    sh.dirty_set.insert(i as u64);
                }
            }
            sh.chunks.push(Meta {
                state: st,
                gen: 0,
                writers: 0,
                epoch: 0,
                fetch: None,
                qkey: (st == ChunkState::Missing).then_some(i as i64),
            });
        }
        let inner = Arc::new(Inner {
            size,
            chunk,
            count,
            cache: Arc::new(cache_file),
            state: Arc::new(state),
            shared: Mutex::new(sh),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            source: std::sync::RwLock::new(source),
            sink,
            gate: Arc::new(RwLock::new(())),
            held: tokio::sync::Mutex::new(None),
            push_lock: tokio::sync::Mutex::new(()),
            install_lock: tokio::sync::Mutex::new(()),
            queue_notify: Notify::new(),
            present_notify: Notify::new(),
            counters: Counters::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            opts,
        });
        for _ in 0..inner.opts.pull_workers {
            inner.tasks.spawn(inner.clone().pull_worker());
        }
        if inner.sink.is_some() {
            let leftover = inner.shared.lock().unwrap().dirty > 0;
            inner.tasks.spawn(inner.clone().push_loop(leftover));
        }
        Ok(Managed { inner })
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk
    }

    pub fn chunk_count(&self) -> u64 {
        self.inner.count
    }

    pub fn chunk_state(&self, i: u64) -> Option<ChunkState> {
        let sh = self.inner.shared.lock().unwrap();
        sh.chunks.get(i as usize).map(|m| m.state)
    }

    pub fn progress(&self) -> Progress {
        self.inner.progress()
    }

    /// Where missing chunks are fetched from now.
    pub fn source(&self) -> Arc<dyn Backend> {
        self.inner.source.read().unwrap().clone()
    }

    /// Moves these chunks, in this order, to the head of the pull queue.
    pub fn prioritize(&self, chunks: &[u64]) {
        self.inner.prioritize(chunks);
    }

    /// Makes these chunks Missing again (their cached bytes are stale), with
    /// any fetch of them in flight discarded, and puts them first in the
    /// pull queue. Local writes to them are dropped: call it while the gate
    /// is held ([`Managed::hold`]). Waits for a push round in progress.
    pub async fn mark_missing(&self, chunks: &[u64]) -> Result<()> {
        self.inner.mark_missing(chunks).await
    }

    /// Switches where missing chunks are fetched from (same size required).
    /// Fetches already in flight finish from the old source.
    pub fn set_source(&self, source: Arc<dyn Backend>) -> Result<()> {
        if source.size() != self.inner.size {
            return Err(Error::FailedPrecondition(format!(
                "new source holds {} bytes, the mount {}",
                source.size(),
                self.inner.size
            )));
        }
        *self.inner.source.write().unwrap() = source;
        // Chunks that failed against the old source are worth retrying now.
        self.inner.queue_notify.notify_waiters();
        Ok(())
    }

    /// Closes the gate: I/O started from now on waits (does not fail) until
    /// [`Managed::release`]. Returns once I/O already in progress is done.
    /// Background pull and push go on.
    pub async fn hold(&self) {
        let mut h = self.inner.held.lock().await;
        if h.is_none() {
            *h = Some(self.inner.gate.clone().write_owned().await);
        }
    }

    /// Opens the gate closed by [`Managed::hold`].
    pub async fn release(&self) {
        self.inner.held.lock().await.take();
    }

    /// Waits until no chunk is Missing.
    pub async fn wait_complete(&self) {
        loop {
            let n = self.inner.present_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.inner.shared.lock().unwrap().missing == 0 {
                return;
            }
            n.await;
        }
    }

    /// Pushes every Dirty chunk to the sink and flushes it, whatever the
    /// durability mode (for a clean shutdown).
    pub async fn sync(&self) -> Result<()> {
        if !self.inner.push_round().await? {
            self.inner.sync_local().await?;
        }
        Ok(())
    }

    /// Stops the background tasks and waits for them.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl Inner {
    fn chunk_len(&self, i: u64) -> u64 {
        (self.size - i * self.chunk).min(self.chunk)
    }

    fn stripe(&self, i: u64) -> &RwLock<()> {
        &self.stripes[i as usize % STRIPES]
    }

    /// Records a state change: the byte is written before memory changes,
    /// under the state mutex so the file sees transitions in their order.
    fn transition(&self, sh: &mut Shared, i: u64, to: ChunkState) -> Result<()> {
        let from = sh.chunks[i as usize].state;
        if from == to {
            return Ok(());
        }
        self.state.set(i, to)?;
        sh.chunks[i as usize].state = to;
        if from == ChunkState::Dirty {
            sh.dirty_set.remove(&i);
        } else if to == ChunkState::Dirty {
            sh.dirty_set.insert(i);
        }
        for (st, d) in [(from, -1i64), (to, 1)] {
            let c = match st {
                ChunkState::Missing => &mut sh.missing,
                ChunkState::Local => &mut sh.local,
                ChunkState::Dirty => &mut sh.dirty,
            };
            *c = c.wrapping_add_signed(d);
        }
        Ok(())
    }

    fn progress(&self) -> Progress {
        let (local, dirty, missing, in_flight) = {
            let sh = self.shared.lock().unwrap();
            (sh.local, sh.dirty, sh.missing, sh.in_flight)
        };
        let c = &self.counters;
        Progress {
            chunks_total: self.count,
            chunks_local: local,
            chunks_dirty: dirty,
            chunks_missing: missing,
            chunks_in_flight: in_flight,
            chunks_pushed: c.chunks_pushed.load(Relaxed),
            bytes_pulled: c.bytes_pulled.load(Relaxed),
            bytes_pushed: c.bytes_pushed.load(Relaxed),
            on_demand_fetches: c.on_demand.load(Relaxed),
            fetch_errors: c.fetch_errors.load(Relaxed),
            push_errors: c.push_errors.load(Relaxed),
        }
    }

    fn prioritize(&self, chunks: &[u64]) {
        let mut sh = self.shared.lock().unwrap();
        let todo: Vec<u64> = chunks
            .iter()
            .copied()
            .filter(|&i| i < self.count && sh.chunks[i as usize].state == ChunkState::Missing)
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
    fn start_fetch(self: &Arc<Self>, i: u64) -> Option<watch::Receiver<FetchResult>> {
        let mut sh = self.shared.lock().unwrap();
        let m = &sh.chunks[i as usize];
        if m.state != ChunkState::Missing {
            return None;
        }
        if let Some(f) = &m.fetch {
            return Some(f.tx.subscribe());
        }
        let (id, epoch, rx) = sh.claim(i);
        drop(sh);
        self.counters.on_demand.fetch_add(1, Relaxed);
        // Its own task: a reader that goes away must not strand the others.
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.run_fetch(i, id, epoch).await;
        });
        Some(rx)
    }

    /// Ensures chunk `i` is present: fetches it at once if Missing, or waits
    /// for the fetch already in flight. A failed fetch is an error (EIO).
    async fn ensure(self: &Arc<Self>, i: u64) -> Result<()> {
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
    async fn run_fetch(&self, i: u64, id: u64, epoch: u64) -> std::result::Result<(), String> {
        let src = self.source.read().unwrap().clone();
        let len = self.chunk_len(i);
        let mut buf = vec![0u8; len as usize];
        let res = match src.read_at(i * self.chunk, &mut buf).await {
            Ok(()) => self.install(i, id, epoch, &buf).await,
            Err(e) => Err(e.to_string()),
        };
        if res.is_err() {
            self.counters.fetch_errors.fetch_add(1, Relaxed);
        }
        let mut sh = self.shared.lock().unwrap();
        let mine = sh.chunks[i as usize].fetch.as_ref().map(|f| f.id) == Some(id);
        if mine {
            let f = sh.chunks[i as usize].fetch.take().unwrap();
            sh.in_flight -= 1;
            if res.is_err()
                && sh.chunks[i as usize].state == ChunkState::Missing
                && self.opts.pull_workers > 0
            {
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

    async fn install(
        &self,
        i: u64,
        id: u64,
        epoch: u64,
        buf: &[u8],
    ) -> std::result::Result<(), String> {
        let current = |sh: &Shared| {
            let m = &sh.chunks[i as usize];
            m.epoch == epoch
                && m.state == ChunkState::Missing
                && m.fetch.as_ref().map(|f| f.id) == Some(id)
        };
        // Exclusive: no write to this chunk runs while its old bytes land.
        let _x = self.stripe(i).write().await;
        if !current(&self.shared.lock().unwrap()) {
            return Ok(()); // superseded: a write covered it, or it was marked missing
        }
        {
            let _w = self.install_lock.lock().await;
            self.cache
                .write_all_at(buf, i * self.chunk)
                .map_err(|e| format!("writing chunk {i} to the cache: {e}"))?;
        }
        let mut sh = self.shared.lock().unwrap();
        if !current(&sh) {
            return Ok(());
        }
        self.transition(&mut sh, i, ChunkState::Local)
            .map_err(|e| e.to_string())?;
        drop(sh);
        self.counters
            .bytes_pulled
            .fetch_add(buf.len() as u64, Relaxed);
        self.present_notify.notify_waiters();
        Ok(())
    }

    async fn pull_worker(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let n = self.queue_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            let job = {
                let mut sh = self.shared.lock().unwrap();
                let mut job = None;
                while let Some((_, i)) = sh.queue.pop_first() {
                    let m = &mut sh.chunks[i as usize];
                    m.qkey = None;
                    if m.state == ChunkState::Missing && m.fetch.is_none() {
                        let (id, epoch, _) = sh.claim(i);
                        job = Some((i, id, epoch));
                        break;
                    }
                }
                job
            };
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

    async fn mark_missing(&self, chunks: &[u64]) -> Result<()> {
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
                let m = &mut sh.chunks[i as usize];
                m.epoch += 1;
                m.gen += 1;
                // Its waiters see the channel close and fetch again.
                if m.fetch.take().is_some() {
                    sh.in_flight -= 1;
                }
                self.transition(&mut sh, i, ChunkState::Missing)?;
            }
        }
        self.prioritize(chunks);
        Ok(())
    }

    /// Runs a mutation of the cache bytes `within..within+n` of chunk `i`
    /// (`op` does the I/O), keeping the state file ahead of the data.
    async fn mutate(
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
                let need = match sh.chunks[i as usize].state {
                    // Read-modify-write: the rest of the chunk must come first.
                    ChunkState::Missing if !full => true,
                    ChunkState::Missing => {
                        // Covered whole: a fetch in flight is now stale.
                        sh.chunks[i as usize].epoch += 1;
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
                    let m = &mut sh.chunks[i as usize];
                    m.writers += 1;
                    m.gen += 1;
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
                let m = &mut sh.chunks[i as usize];
                m.writers -= 1;
                m.gen += 1;
            }
            if became_present {
                self.present_notify.notify_waiters();
            }
            return r.map_err(Error::Io);
        }
    }

    /// Reads bytes of chunk `i` into `out`, fetching the chunk if needed;
    /// never returns bytes of a chunk that is not present.
    async fn read_chunk(self: &Arc<Self>, i: u64, within: u64, out: &mut [u8]) -> Result<()> {
        loop {
            self.ensure(i).await?;
            let epoch = {
                let sh = self.shared.lock().unwrap();
                let m = &sh.chunks[i as usize];
                if m.state == ChunkState::Missing {
                    continue;
                }
                m.epoch
            };
            read_exact_at(&self.cache, out, i * self.chunk + within)?;
            let sh = self.shared.lock().unwrap();
            let m = &sh.chunks[i as usize];
            if m.epoch == epoch && m.state != ChunkState::Missing {
                return Ok(());
            }
        }
    }

    /// fdatasync of the state file and the cache.
    async fn sync_local(&self) -> Result<()> {
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
    async fn push_round(self: &Arc<Self>) -> Result<bool> {
        let Some(sink) = self.sink.clone() else {
            return Ok(false); // nowhere to push: Dirty stays Dirty
        };
        let _p = self.push_lock.lock().await;
        // Snapshot before the cache sync: whatever a snapshot covers was
        // written before it, so it is durable in the cache once we mark Local.
        let snap: Vec<(u64, u64, bool)> = {
            let sh = self.shared.lock().unwrap();
            sh.dirty_set
                .iter()
                .map(|&i| {
                    let m = &sh.chunks[i as usize];
                    (i, m.gen, m.writers == 0)
                })
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
                            err.get_or_insert(format!("pushing chunk {i}: {e}"));
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
            if let Some(e) = e {
                err.get_or_insert(e);
            }
        }
        if !done.is_empty() {
            sink.flush().await?;
            let mut pushed = 0u64;
            let mut bytes = 0u64;
            {
                let mut sh = self.shared.lock().unwrap();
                for (i, gen) in done {
                    let m = &sh.chunks[i as usize];
                    if m.state == ChunkState::Dirty && m.gen == gen && m.writers == 0 {
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
            Some(e) => Err(eio(e)),
            None => Ok(true),
        }
    }

    async fn push_loop(self: Arc<Self>, leftover: bool) {
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
            if let Err(e) = self.push_round().await {
                warn!(error = %e, "background push failed; chunks stay dirty");
            }
        }
    }
}

fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
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
}
