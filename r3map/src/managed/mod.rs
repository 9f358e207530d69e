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

mod barrier;
mod bulk;
mod cache;
pub mod cli;
mod fetch;
mod io;
pub mod lock;
mod progress;
mod push;
pub mod state;
mod window;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedRwLockWriteGuard, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, Error, Result};
pub use barrier::FlushBarrier;
pub use bulk::Claim;
pub use lock::{lock_path, CacheLock};
pub use progress::Progress;
pub use state::{state_path, ChunkState};

/// Default chunk size: 1 MiB, the chunk size of the chunked backends
/// ([`crate::backend::DEFAULT_CHUNK_SIZE`]), so one managed chunk is one
/// redis key or one `dir:` file and a push never read-modify-writes at the
/// remote. Large enough that a sequential pull is a few requests per MiB
/// over a high-RTT link, small enough that a first access costs ~1 MiB of
/// transfer and the state file stays at 1 byte per MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Default bound of the background pull's window (the fetches in flight
/// at once, sized from the measured bandwidth-delay product: see
/// `window.rs`): 64 chunks of 1 MiB cover ~30 ms of RTT at 1 GB/s with
/// the window's twofold headroom, and bound buffers to 64 MiB.
pub const DEFAULT_PULL_WORKERS: usize = 64;
/// Default push workers.
pub const DEFAULT_PUSH_WORKERS: usize = 16;
/// Default interval between background pushes (r3map's).
pub const DEFAULT_PUSH_INTERVAL: Duration = Duration::from_secs(20);
/// Chunks after an on-demand fetch moved to the head of the pull queue, so
/// a sequential reader finds its next chunks already coming.
const READAHEAD: u64 = 8;

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
    /// Unit of pulling, pushing and state tracking.
    pub chunk_size: u64,
    /// Most background fetches at once (the pull's window adapts below
    /// it to the link); 0 pulls only on demand.
    pub pull_workers: usize,
    /// Chunks pushed concurrently.
    pub push_workers: usize,
    /// Interval between background pushes of written chunks.
    pub push_interval: Duration,
    /// What a flush promises (see [`Durability`]).
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

/// Result of a fetch, shared with every reader waiting on it.
type FetchResult = Option<std::result::Result<(), String>>;

struct Fetch {
    id: u64,
    tx: watch::Sender<FetchResult>,
}

/// Chunk bookkeeping, under the mount's state mutex.
///
/// Open costs no per-chunk work beyond reading the state file: the dense
/// per-chunk counters are allocated zeroed (their pages are not touched
/// until a chunk is written or refetched), fetches in flight and queued
/// chunks live in small maps, and the background pull walks the chunks in
/// order with a cursor instead of queueing every one of them. Measured on
/// a 1 TiB mount (a million chunks): a B-tree of every chunk and 64-byte
/// records were 80 % of a 250 ms open and 100 MiB of RSS.
struct Shared {
    /// State of each chunk, as recorded in the state file.
    states: Vec<ChunkState>,
    /// Per chunk: bumped when a write starts and when it ends; a push
    /// marks the chunk Local only if this did not move while it pushed.
    gens: Vec<u64>,
    /// Per chunk: bumped when a fetch in flight must be discarded.
    epochs: Vec<u64>,
    /// Per chunk: writes in progress.
    writers: Vec<u32>,
    /// Fetches in flight, by chunk.
    fetches: HashMap<u64, Fetch>,
    /// Chunks that become Dirty rather than Local once fetched: their
    /// bytes are not in the sink yet (a migration source handed them over
    /// unpushed).
    push_on_install: HashSet<u64>,
    /// Chunks queued out of order: (priority, chunk), lowest first. Bumped
    /// chunks have negative priorities and go before the in-order pass,
    /// retries go after it (`fetch::RETRY_BASE`).
    queue: BTreeSet<(i64, u64)>,
    /// Priority of each chunk in `queue`.
    qkeys: HashMap<u64, i64>,
    /// Next chunk the background pull's in-order pass looks at.
    cursor: u64,
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
    fn state(&self, i: u64) -> ChunkState {
        self.states[i as usize]
    }

    fn enqueue(&mut self, i: u64, key: i64) {
        if let Some(old) = self.qkeys.insert(i, key) {
            self.queue.remove(&(old, i));
        }
        self.queue.insert((key, i));
    }

    /// Whether a background worker may start fetching chunk `i`.
    fn claimable(&self, i: u64) -> bool {
        self.state(i) == ChunkState::Missing && !self.fetches.contains_key(&i)
    }

    /// The next chunk for the background pull: bumped chunks, then the
    /// in-order pass, then retries; registered as fetched like `claim`.
    fn next_pull(&mut self) -> Option<(u64, u64, u64)> {
        let take = |sh: &mut Shared, below: i64| {
            while let Some(&(k, i)) = sh.queue.first() {
                if k >= below {
                    break;
                }
                sh.queue.pop_first();
                sh.qkeys.remove(&i);
                if sh.claimable(i) {
                    return Some(i);
                }
            }
            None
        };
        let i = take(self, 0).or_else(|| {
            while (self.cursor as usize) < self.states.len() {
                let i = self.cursor;
                self.cursor += 1;
                if self.claimable(i) {
                    return Some(i);
                }
            }
            None
        });
        let i = i.or_else(|| take(self, i64::MAX))?;
        let (id, epoch, _) = self.claim(i);
        Some((i, id, epoch))
    }

    /// Registers a fetch of chunk `i`; returns its id and the epoch it ran in.
    fn claim(&mut self, i: u64) -> (u64, u64, watch::Receiver<FetchResult>) {
        let id = self.next_fetch_id;
        self.next_fetch_id += 1;
        let (tx, rx) = watch::channel(None);
        self.fetches.insert(i, Fetch { id, tx });
        self.in_flight += 1;
        (id, self.epochs[i as usize], rx)
    }

    /// The id of the fetch of chunk `i` in flight, if any.
    fn fetch_id(&self, i: u64) -> Option<u64> {
        self.fetches.get(&i).map(|f| f.id)
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
    /// How many background fetches run at once ([`window`]).
    window: window::Window,
    present_notify: Notify,
    counters: Counters,
    /// Set when the sink refused a push because another writer took the
    /// region over (a newer epoch): nothing is pushed or written again.
    fenced: Mutex<Option<String>>,
    /// Set by [`Managed::seal`]: a migration handed this mount's region to
    /// another host; writes and pushes stop for good.
    sealed: std::sync::atomic::AtomicBool,
    /// Flushes and pushes wait while it is pending ([`barrier`]).
    barrier: Arc<watch::Sender<barrier::State>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Dropped with the last reference, i.e. after every task that can
    /// touch the cache has ended.
    _lock: CacheLock,
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
    /// The cache is locked ([`CacheLock`]) until the mount and every task
    /// it started have ended: a second open of it fails with
    /// [`Error::Busy`]. A cache whose state file was made for another
    /// region size or chunk size is refused, as is a cache file holding
    /// data but no state file.
    ///
    /// Blocks on file I/O (open, fsync, reading the state file); from async
    /// code prefer [`Managed::open_async`].
    pub fn open(
        cache: &Path,
        source: Arc<dyn Backend>,
        sink: Option<Arc<dyn Backend>>,
        opts: Options,
    ) -> Result<Managed> {
        check(&source, &sink, &opts)?;
        let opened = cache::open(cache, opts.chunk_size, source.size())?;
        Ok(Self::start(opened, source, sink, opts))
    }

    /// [`Managed::open`], with the file work (lock, open, fsync, reading
    /// the state file) on a blocking thread, so a runtime thread serving
    /// other volumes never waits on the disk.
    pub async fn open_async(
        cache: &Path,
        source: Arc<dyn Backend>,
        sink: Option<Arc<dyn Backend>>,
        opts: Options,
    ) -> Result<Managed> {
        check(&source, &sink, &opts)?;
        let (path, chunk, size) = (cache.to_path_buf(), opts.chunk_size, source.size());
        let opened = tokio::task::spawn_blocking(move || cache::open(&path, chunk, size))
            .await
            .map_err(|e| Error::io(format!("opening cache {}: {e}", cache.display())))??;
        Ok(Self::start(opened, source, sink, opts))
    }

    /// Builds the mount over an opened cache and starts its tasks.
    fn start(
        opened: cache::Opened,
        source: Arc<dyn Backend>,
        sink: Option<Arc<dyn Backend>>,
        opts: Options,
    ) -> Managed {
        let size = source.size();
        let chunk = opts.chunk_size;
        let cache::Opened {
            lock,
            file: cache_file,
            state,
            states,
            handed_over,
        } = opened;
        let count = states.len() as u64;
        let n = states.len();
        let mut sh = Shared {
            states: Vec::new(),
            // Zeroed allocations: pages stay untouched until used.
            gens: vec![0; n],
            epochs: vec![0; n],
            writers: vec![0; n],
            fetches: HashMap::new(),
            push_on_install: HashSet::new(),
            queue: BTreeSet::new(),
            qkeys: HashMap::new(),
            cursor: 0,
            dirty_set: BTreeSet::new(),
            bump: 0,
            retry_seq: 0,
            next_fetch_id: 0,
            local: 0,
            dirty: 0,
            missing: 0,
            in_flight: 0,
        };
        for (i, &st) in states.iter().enumerate() {
            match st {
                ChunkState::Missing => sh.missing += 1,
                ChunkState::Local => sh.local += 1,
                ChunkState::Dirty => {
                    sh.dirty += 1;
                    sh.dirty_set.insert(i as u64);
                }
            }
        }
        sh.states = states;
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
            barrier: Arc::new(watch::channel(barrier::State::Open).0),
            window: window::Window::new(opts.pull_workers, chunk),
            present_notify: Notify::new(),
            counters: Counters::default(),
            fenced: Mutex::new(None),
            sealed: std::sync::atomic::AtomicBool::new(handed_over),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            _lock: lock,
            opts,
        });
        for idx in 0..inner.opts.pull_workers {
            inner.tasks.spawn(inner.clone().pull_worker(idx));
        }
        if inner.sink.is_some() {
            let leftover = inner.shared.lock().unwrap().dirty > 0;
            inner.tasks.spawn(inner.clone().push_loop(leftover));
        }
        Managed { inner }
    }

    /// Chunk size of the cache.
    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk
    }

    /// Number of chunks (the last may be short).
    pub fn chunk_count(&self) -> u64 {
        self.inner.count
    }

    /// State of chunk `i`; `None` past the end.
    pub fn chunk_state(&self, i: u64) -> Option<ChunkState> {
        let sh = self.inner.shared.lock().unwrap();
        sh.states.get(i as usize).copied()
    }

    /// Counters as of now.
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

    /// Stops pushing and writing for good (a migration handed the region to
    /// another host, which now pushes what this mount had not): waits for a
    /// push round in progress, makes the cache and its state durable, and
    /// returns the chunks written here but not pushed to the sink.
    /// Idempotent. Reads keep working (the destination pulls from here).
    pub async fn seal(&self) -> Result<Vec<u64>> {
        let inner = &self.inner;
        inner
            .sealed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A write in flight finishes first; none starts after this.
        drop(inner.gate.write().await);
        let _p = inner.push_lock.lock().await;
        inner.sync_local().await?;
        let sh = inner.shared.lock().unwrap();
        Ok(sh.dirty_set.iter().copied().collect())
    }

    /// True once [`Managed::seal`] was called.
    pub fn is_sealed(&self) -> bool {
        self.inner.sealed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Why the sink fenced this mount off, if it did: another writer holds
    /// the region at a newer epoch, and this mount neither pushes nor takes
    /// writes any more.
    pub fn fenced(&self) -> Option<String> {
        self.inner.fenced.lock().unwrap().clone()
    }

    /// Makes these chunks Dirty, so the next push sends them: at once for a
    /// present chunk, once fetched for a Missing one (a migration source
    /// handed them over unpushed). Call it while the gate is held.
    pub fn mark_dirty(&self, chunks: &[u64]) -> Result<()> {
        let inner = &self.inner;
        let mut sh = inner.shared.lock().unwrap();
        for &i in chunks {
            if i >= inner.count {
                return Err(Error::OutOfRange {
                    offset: i * inner.chunk,
                    len: inner.chunk,
                    size: inner.size,
                });
            }
            match sh.state(i) {
                ChunkState::Missing => {
                    sh.push_on_install.insert(i);
                }
                ChunkState::Local => {
                    // A push of it in flight must not record it Local.
                    sh.gens[i as usize] += 1;
                    inner.transition(&mut sh, i, ChunkState::Dirty)?;
                }
                ChunkState::Dirty => {}
            }
        }
        Ok(())
    }

    /// Makes the cache and its chunk-state file durable (no push).
    pub async fn sync_local(&self) -> Result<()> {
        self.inner.sync_local().await
    }

    /// Stops the background tasks and waits for them, on-demand fetches
    /// included.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Tasks of the mount still running: background pull and push workers
    /// and on-demand fetches (0 once [`Managed::close`] has returned).
    pub fn tasks_running(&self) -> usize {
        self.inner.tasks.len()
    }
}

/// Refuses options and backends a mount cannot work with, before any file
/// is touched.
fn check(source: &Arc<dyn Backend>, sink: &Option<Arc<dyn Backend>>, opts: &Options) -> Result<()> {
    let size = source.size();
    if opts.chunk_size == 0 {
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
    if let Some(s) = sink {
        if s.size() != size {
            return Err(Error::InvalidArgument(format!(
                "sink holds {} bytes, source {size}",
                s.size()
            )));
        }
    }
    Ok(())
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
        let from = sh.state(i);
        if from == to {
            return Ok(());
        }
        self.state.set(i, to)?;
        sh.states[i as usize] = to;
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
}
