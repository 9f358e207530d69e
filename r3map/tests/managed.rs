//! The managed mount: in-process against a probed memory remote (latency
//! and failure injection, call counters), and as a real `r3map mount`
//! process driven by nbdcopy, killed with SIGKILL and restarted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{r3map_bin, require, run, tmp, Proc};
use r3map::backend::memory::Memory;
use r3map::backend::{Backend, Result};
use r3map::managed::{ChunkState, Durability, Managed, Options};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn random_bytes(seed: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A memory remote that counts calls and can be slowed down or broken.
struct Probe {
    mem: Memory,
    reads: AtomicU64,
    /// Bytes handed out by reads (counted once they are copied).
    bytes_read: AtomicU64,
    /// Reads that returned their bytes (after the delay).
    reads_done: AtomicU64,
    writes_started: AtomicU64,
    writes: AtomicU64,
    trims: AtomicU64,
    flushes: AtomicU64,
    /// Applied after the bytes are read, so a slow read returns the bytes
    /// of when it started (what a stale in-flight fetch looks like).
    read_delay_ms: AtomicU64,
    write_delay_ms: AtomicU64,
    fail_reads: AtomicBool,
}

impl Probe {
    fn new(size: u64, chunk: u64) -> Arc<Probe> {
        Arc::new(Probe {
            mem: Memory::new(size, chunk),
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            reads_done: AtomicU64::new(0),
            writes_started: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            read_delay_ms: AtomicU64::new(0),
            write_delay_ms: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
        })
    }

    /// A probe holding `data`.
    async fn with(data: &[u8], chunk: u64) -> Arc<Probe> {
        let p = Probe::new(data.len() as u64, chunk);
        p.mem.write_at(0, data).await.unwrap();
        p
    }

    async fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.mem.size() as usize];
        self.mem.read_at(0, &mut v).await.unwrap();
        v
    }
}

#[async_trait]
impl Backend for Probe {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(1, SeqCst);
        if self.fail_reads.load(SeqCst) {
            return Err(std::io::Error::other("injected read failure").into());
        }
        self.mem.read_at(offset, buf).await?;
        self.bytes_read.fetch_add(buf.len() as u64, SeqCst);
        let d = self.read_delay_ms.load(SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        self.reads_done.fetch_add(1, SeqCst);
        Ok(())
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.writes_started.fetch_add(1, SeqCst);
        let d = self.write_delay_ms.load(SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        self.mem.write_at(offset, data).await?;
        self.writes.fetch_add(1, SeqCst);
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, SeqCst);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.trims.fetch_add(1, SeqCst);
        self.mem.trim(offset, len).await
    }
}

/// Polls `cond` until it holds; fails after a bound generous enough for a
/// loaded 2-core runner, so only a hang fails it.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn opts(chunk: u64, pull: usize) -> Options {
    Options {
        chunk_size: chunk,
        pull_workers: pull,
        push_workers: 4,
        push_interval: Duration::from_secs(3600),
        durability: Durability::Flush,
    }
}

fn plain(cache: &Path, p: &Arc<Probe>, o: Options) -> Managed {
    Managed::open(cache, p.clone(), Some(p.clone()), o).unwrap()
}

async fn read(m: &Managed, off: u64, len: u64) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    m.read_at(off, &mut v).await?;
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_read_is_served_before_the_background_pull_reaches_it() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(1, 32 * chunk);
    let p = Probe::with(&data, chunk).await;
    p.read_delay_ms.store(100, SeqCst);
    // One slow worker, ascending: chunk 31 would come after ~3 s. What
    // proves the read did not wait for it is the counters, not a clock:
    // one on-demand fetch, and most chunks still missing.
    let m = plain(&d.path().join("c"), &p, opts(chunk, 1));
    let got = read(&m, 31 * chunk + 100, 1000).await.unwrap();
    assert_eq!(got, &data[(31 * chunk + 100) as usize..][..1000]);
    let pr = m.progress();
    assert!(pr.chunks_missing > 20, "{pr:?}");
    assert_eq!(pr.on_demand_fetches, 1, "{pr:?}");
    assert_eq!(m.chunk_state(31), Some(ChunkState::Local));

    // And with no background pull at all, only what is read is fetched.
    let d2 = tmp();
    let p2 = Probe::with(&data, chunk).await;
    let m2 = plain(&d2.path().join("c"), &p2, opts(chunk, 0));
    assert_eq!(
        read(&m2, 5 * chunk, chunk).await.unwrap(),
        &data[(5 * chunk) as usize..][..chunk as usize]
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pr = m2.progress();
    assert_eq!(
        (pr.chunks_local, pr.chunks_missing, pr.bytes_pulled),
        (1, 31, chunk),
        "{pr:?}"
    );
    assert_eq!(p2.reads.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_one_chunk_fetch_it_once() {
    let d = tmp();
    let chunk = 256 * KIB;
    let data = random_bytes(2, 8 * chunk);
    let p = Probe::with(&data, chunk).await;
    p.read_delay_ms.store(150, SeqCst);
    let m = Arc::new(plain(&d.path().join("c"), &p, opts(chunk, 0)));
    let mut tasks = Vec::new();
    for k in 0..16u64 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            let off = 3 * chunk + k * 4096;
            (off, read(&m, off, 4096).await.unwrap())
        }));
    }
    for t in tasks {
        let (off, got) = t.await.unwrap();
        assert_eq!(got, &data[off as usize..][..4096]);
    }
    assert_eq!(p.reads.load(SeqCst), 1, "one fetch for 16 readers");
    assert_eq!(m.progress().on_demand_fetches, 1);
}

async fn wait_in_flight(m: &Managed) {
    wait_for("a fetch to start", || m.progress().chunks_in_flight > 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_joins_a_background_fetch_in_flight() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(3, 4 * chunk);
    let p = Probe::with(&data, chunk).await;
    p.read_delay_ms.store(300, SeqCst);
    let m = plain(&d.path().join("c"), &p, opts(chunk, 1));
    wait_in_flight(&m).await; // the worker took chunk 0
                              // Joined, not refetched: the counter says so (a bound on the time
                              // taken would only say the machine was not busy).
    assert_eq!(read(&m, 0, 10).await.unwrap(), &data[..10]);
    assert_eq!(m.progress().on_demand_fetches, 0, "joined, not refetched");
    m.wait_complete().await;
    assert_eq!(p.reads.load(SeqCst), 4);
}

/// Random writes (partial, whole-chunk, across chunks, on missing chunks)
/// and trims against a model; after flush the sink holds exactly the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_then_flush_land_in_the_sink() {
    let d = tmp();
    let chunk = 64 * KIB;
    let size = 64 * chunk + 12345; // a short last chunk
    let mut model = random_bytes(4, size);
    let p = Probe::with(&model, chunk).await;
    let m = Arc::new(plain(&d.path().join("c"), &p, opts(chunk, 2)));
    let mut rng = SmallRng::seed_from_u64(5);
    for k in 0..300 {
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(1..=(3 * chunk).min(size - off));
        if k % 10 == 9 {
            m.trim(off, len).await.unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let buf = random_bytes(1000 + k, len);
            m.write_at(off, &buf).await.unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&buf);
        }
        if k % 50 == 25 {
            m.flush().await.unwrap();
        }
    }
    // A write covering a whole chunk that was never fetched.
    let last_full = size / chunk - 1;
    let buf = random_bytes(9, chunk);
    m.write_at(last_full * chunk, &buf).await.unwrap();
    model[(last_full * chunk) as usize..][..chunk as usize].copy_from_slice(&buf);
    m.flush().await.unwrap();
    let sink = p.contents().await;
    assert!(
        sink == model,
        "sink differs at byte {:?}",
        sink.iter().zip(&model).position(|(a, b)| a != b)
    );
    assert_eq!(read(&m, 0, size).await.unwrap(), model);
    let pr = m.progress();
    assert_eq!(pr.chunks_dirty, 0, "{pr:?}");
    assert!(pr.chunks_pushed > 0 && p.flushes.load(SeqCst) > 0, "{pr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_does_not_push_on_flush() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(6, 8 * chunk);
    let p = Probe::with(&data, chunk).await;
    let mut o = opts(chunk, 2);
    o.durability = Durability::Async;
    let m = plain(&d.path().join("c"), &p, o);
    m.write_at(100, b"hello").await.unwrap();
    m.flush().await.unwrap();
    assert_eq!(p.writes_started.load(SeqCst), 0);
    assert_eq!(&p.contents().await[100..105], &data[100..105]);
    assert_eq!(m.chunk_state(0), Some(ChunkState::Dirty));
    m.sync().await.unwrap();
    assert_eq!(&p.contents().await[100..105], b"hello");
    assert_eq!(m.chunk_state(0), Some(ChunkState::Local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_push_runs_at_the_interval() {
    let d = tmp();
    let chunk = 64 * KIB;
    let p = Probe::with(&random_bytes(7, 8 * chunk), chunk).await;
    let mut o = opts(chunk, 2);
    o.durability = Durability::Async;
    o.push_interval = Duration::from_millis(300);
    let m = plain(&d.path().join("c"), &p, o);
    m.write_at(3 * chunk, b"interval").await.unwrap();
    let t = Instant::now();
    while m.chunk_state(3) != Some(ChunkState::Local) {
        assert!(t.elapsed() < Duration::from_secs(5), "never pushed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        &p.contents().await[(3 * chunk) as usize..][..8],
        b"interval"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_written_while_pushed_stays_dirty() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(8, 4 * chunk);
    let p = Probe::with(&data, chunk).await;
    let m = Arc::new(plain(&d.path().join("c"), &p, opts(chunk, 2)));
    m.wait_complete().await;
    m.write_at(10, b"first").await.unwrap();
    p.write_delay_ms.store(300, SeqCst);
    let flush = {
        let m = m.clone();
        tokio::spawn(async move { m.flush().await })
    };
    while p.writes_started.load(SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    m.write_at(10, b"second").await.unwrap(); // lands while "first" is being pushed
    flush.await.unwrap().unwrap();
    assert_eq!(&p.contents().await[10..15], b"first");
    assert_eq!(
        m.chunk_state(0),
        Some(ChunkState::Dirty),
        "rewritten during push"
    );
    p.write_delay_ms.store(0, SeqCst);
    m.flush().await.unwrap();
    assert_eq!(&p.contents().await[10..16], b"second");
    assert_eq!(m.chunk_state(0), Some(ChunkState::Local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_is_an_error_not_zeros_and_is_retried() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(9, 8 * chunk);
    let p = Probe::with(&data, chunk).await;
    p.fail_reads.store(true, SeqCst);
    let m = plain(&d.path().join("c"), &p, opts(chunk, 0));
    let e = read(&m, 2 * chunk, 4096).await.unwrap_err();
    assert_eq!(
        r3map::nbd::proto::errno_of(&e),
        r3map::nbd::proto::NBD_EIO,
        "{e}"
    );
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(m.chunk_state(2), Some(ChunkState::Missing));
    // A partial write needs the chunk: it fails too, and leaves it Missing.
    assert!(m.write_at(2 * chunk + 1, b"x").await.is_err());
    assert_eq!(m.chunk_state(2), Some(ChunkState::Missing));
    p.fail_reads.store(false, SeqCst);
    assert_eq!(
        read(&m, 2 * chunk, 4096).await.unwrap(),
        &data[(2 * chunk) as usize..][..4096]
    );
    drop(m);

    // The background pull retries with backoff until the source is back.
    let d2 = tmp();
    p.fail_reads.store(true, SeqCst);
    let m = plain(&d2.path().join("c"), &p, opts(chunk, 2));
    wait_for("two failed fetches", || m.progress().fetch_errors >= 2).await;
    let pr = m.progress();
    assert!(pr.fetch_errors >= 2 && pr.chunks_missing == 8, "{pr:?}");
    p.fail_reads.store(false, SeqCst);
    tokio::time::timeout(Duration::from_secs(20), m.wait_complete())
        .await
        .expect("pull resumed after the source came back");
    assert_eq!(read(&m, 0, 8 * chunk).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_makes_io_wait_and_release_lets_it_through() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(10, 4 * chunk);
    let p = Probe::with(&data, chunk).await;
    let m = Arc::new(plain(&d.path().join("c"), &p, opts(chunk, 2)));
    m.hold().await;
    // Each I/O notes whether release had happened when it completed: the
    // ordering is the proof, however long the machine takes.
    let released = Arc::new(AtomicBool::new(false));
    let r = {
        let (m, released) = (m.clone(), released.clone());
        tokio::spawn(async move {
            let r = read(&m, 0, 100).await;
            (r, released.load(SeqCst))
        })
    };
    let w = {
        let (m, released) = (m.clone(), released.clone());
        tokio::spawn(async move {
            let r = async {
                m.write_at(chunk, b"held").await?;
                m.flush().await
            }
            .await;
            (r, released.load(SeqCst))
        })
    };
    // Background pull goes on while held.
    tokio::time::timeout(Duration::from_secs(20), m.wait_complete())
        .await
        .unwrap();
    // A moment for held I/O to slip through, if the gate leaked.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.writes_started.load(SeqCst), 0, "a write passed the gate");
    released.store(true, SeqCst);
    m.release().await;
    let (got, after) = r.await.unwrap();
    assert_eq!(got.unwrap(), &data[..100]);
    assert!(after, "a read went through a held gate");
    let (res, after) = w.await.unwrap();
    res.unwrap();
    assert!(after, "a write went through a held gate");
    assert_eq!(&p.contents().await[chunk as usize..][..4], b"held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_missing_pulls_again_and_discards_a_stale_fetch() {
    let d = tmp();
    let chunk = 64 * KIB;
    let data = random_bytes(11, 8 * chunk);
    let p = Probe::with(&data, chunk).await;
    let m = Arc::new(plain(&d.path().join("c"), &p, opts(chunk, 2)));
    m.wait_complete().await;
    let pulled = m.progress().bytes_pulled;
    assert_eq!(pulled, 8 * chunk);

    // The source changes behind the cache: the cache serves its copy until told.
    p.mem.write_at(2 * chunk, b"new!").await.unwrap();
    assert_eq!(
        read(&m, 2 * chunk, 4).await.unwrap(),
        &data[(2 * chunk) as usize..][..4]
    );
    m.mark_missing(&[2]).await.unwrap(); // (a background worker may pull it at once)
    assert_eq!(read(&m, 2 * chunk, 4).await.unwrap(), b"new!");
    assert_eq!(m.progress().bytes_pulled, pulled + chunk);

    // A fetch in flight when its chunk is marked missing carries old bytes:
    // it must be thrown away.
    m.mark_missing(&[5]).await.unwrap();
    wait_for("the background to refetch chunk 5", || {
        m.chunk_state(5) == Some(ChunkState::Local)
    })
    .await;
    m.hold().await; // as the migration does
    p.read_delay_ms.store(300, SeqCst);
    let before = p.bytes_read.load(SeqCst);
    m.mark_missing(&[5]).await.unwrap();
    while p.bytes_read.load(SeqCst) == before {
        tokio::time::sleep(Duration::from_millis(1)).await; // until a worker holds the old bytes
    }
    let stale_done = p.reads_done.load(SeqCst) + 1;
    p.mem.write_at(5 * chunk, b"late").await.unwrap();
    // The new fetch is much slower than the stale one: the stale one
    // lands first, and is the one to throw away. Wait for that landing
    // (an event), then look while the new fetch is still seconds away.
    p.read_delay_ms.store(3000, SeqCst);
    m.mark_missing(&[5]).await.unwrap();
    m.release().await;
    wait_for("the stale fetch to land", || {
        p.reads_done.load(SeqCst) >= stale_done
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // its install step
    assert_eq!(
        m.chunk_state(5),
        Some(ChunkState::Missing),
        "stale fetch installed"
    );
    assert_eq!(read(&m, 5 * chunk, 4).await.unwrap(), b"late");
    p.read_delay_ms.store(0, SeqCst);
    m.wait_complete().await;
    assert_eq!(read(&m, 5 * chunk, 4).await.unwrap(), b"late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prioritize_moves_chunks_ahead() {
    let d = tmp();
    let chunk = 64 * KIB;
    let p = Probe::with(&random_bytes(12, 64 * chunk), chunk).await;
    p.read_delay_ms.store(20, SeqCst);
    let m = plain(&d.path().join("c"), &p, opts(chunk, 1));
    m.prioritize(&[60, 61]);
    wait_for("chunk 61", || m.chunk_state(61) == Some(ChunkState::Local)).await;
    let pr = m.progress();
    assert!(pr.chunks_local < 10, "61 came late: {pr:?}");
    assert_eq!(pr.on_demand_fetches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_reuses_the_cache_pushes_dirty_and_refuses_a_mismatch() {
    let d = tmp();
    let cache = d.path().join("c");
    let chunk = 64 * KIB;
    let data = random_bytes(13, 16 * chunk);
    let p = Probe::with(&data, chunk).await;
    let mut o = opts(chunk, 4);
    o.durability = Durability::Async;
    {
        let m = plain(&cache, &p, o.clone());
        m.wait_complete().await;
        m.write_at(7 * chunk + 3, b"unpushed").await.unwrap();
        m.flush().await.unwrap(); // local only
        m.close().await;
    }
    assert_eq!(
        &p.contents().await[(7 * chunk + 3) as usize..][..8],
        &data[(7 * chunk + 3) as usize..][..8]
    );
    let reads = p.reads.load(SeqCst);

    // A different chunk size or region size is refused, with the reason.
    let e = Managed::open(&cache, p.clone(), Some(p.clone()), opts(2 * chunk, 0))
        .err()
        .unwrap();
    assert!(e.to_string().contains("chunk size"), "{e}");
    let small = Probe::new(8 * chunk, chunk);
    let e = Managed::open(&cache, small.clone(), Some(small), opts(chunk, 0))
        .err()
        .unwrap();
    assert!(e.to_string().contains("region"), "{e}");

    let m = plain(&cache, &p, opts(chunk, 4));
    wait_for("the dirty chunk to be pushed on restart", || {
        m.chunk_state(7) == Some(ChunkState::Local)
    })
    .await;
    assert_eq!(
        &p.contents().await[(7 * chunk + 3) as usize..][..8],
        b"unpushed"
    );
    let mut want = data.clone();
    want[(7 * chunk + 3) as usize..][..8].copy_from_slice(b"unpushed");
    assert_eq!(read(&m, 0, 16 * chunk).await.unwrap(), want);
    assert_eq!(
        p.reads.load(SeqCst),
        reads,
        "cache reused: nothing fetched again"
    );
    assert_eq!(m.progress().bytes_pulled, 0);
}

/// A benchmark: `cargo test` skips it, `bench/bench-remote` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by bench/bench-remote (cargo test -- --ignored bench_)"]
async fn bench_first_access_latency_of_a_missing_chunk() {
    // Numbers for the report: a memory remote, no background pull.
    for chunk in [256 * KIB, r3map::managed::DEFAULT_CHUNK_SIZE] {
        let d = tmp();
        let p = Probe::with(&random_bytes(14, 64 * chunk), chunk).await;
        let m = plain(&d.path().join("c"), &p, opts(chunk, 0));
        let mut lat = Vec::new();
        for i in 0..64 {
            let t = Instant::now();
            read(&m, i * chunk + 512, 4096).await.unwrap();
            lat.push(t.elapsed());
        }
        let mut hit = Vec::new();
        for i in 0..64 {
            let t = Instant::now();
            read(&m, i * chunk + 8192, 4096).await.unwrap();
            hit.push(t.elapsed());
        }
        lat.sort();
        hit.sort();
        println!(
            "first 4 KiB read of a missing {} KiB chunk (memory remote): median {:?}, p90 {:?}; \
             once cached: median {:?}",
            chunk / KIB,
            lat[32],
            lat[57],
            hit[32]
        );
        assert_eq!(p.reads.load(SeqCst), 64);
        // Only a hang fails: the numbers above are the point.
        assert!(lat[32] < Duration::from_secs(5), "{lat:?}");
    }
}

// ---- real processes ----

fn field(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    json[at + pat.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

fn progress_file(cache: &Path) -> PathBuf {
    r3map::managed::cli::progress_path(cache)
}

/// Waits until the status file beside `cache` satisfies `ok`; returns it.
fn wait_progress(p: &mut Proc, cache: &Path, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("r3map mount exited early: {st}");
        }
        if let Ok(s) = std::fs::read_to_string(progress_file(cache)) {
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
        } else {
            assert!(Instant::now() < deadline, "no progress file for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mount(sock: &Path, remote: &str, size: &str, cache: &Path, extra: &[&str]) -> Proc {
    let _ = std::fs::remove_file(progress_file(cache));
    let child = Command::new(r3map_bin())
        .args(["mount", "--remote", remote, "--size", size, "--cache"])
        .arg(cache)
        .arg("--socket")
        .arg(sock)
        .args(extra)
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn r3map mount");
    let mut p = Proc {
        child,
        name: "r3map mount".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("r3map mount exited early: {st}");
        }
        assert!(Instant::now() < deadline, "r3map mount did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///r3map?socket={}", sock.display())
}

fn sigkill(p: &mut Proc) {
    p.child.kill().unwrap(); // SIGKILL: no flush, no push, no cleanup
    p.child.wait().unwrap();
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// nbdcopy writes through the mount (with --flush, one FLUSH at the end): the remote
/// file holds the data at once. SIGKILL, restart on the same cache: the
/// data reads back and nothing is pulled again.
#[test]
fn mount_flushed_data_survives_sigkill_and_the_cache_is_reused() {
    require("nbdcopy");
    let d = tmp();
    let size = 32 * MIB;
    let remote = d.path().join("remote.img");
    let orig = random_bytes(20, size);
    std::fs::write(&remote, &orig).unwrap();
    let remote_uri = format!("file:{}", remote.display());
    let cache = d.path().join("cache.img");
    let sock = d.path().join("m.sock");
    let args = ["--chunk-size", "256KiB", "--push-interval", "1h"];

    let mut p = mount(&sock, &remote_uri, "32MiB", &cache, &args);
    wait_progress(&mut p, &cache, "full pull", |s| {
        field(s, "chunks_missing") == 0
    });
    let new = random_bytes(21, size);
    let src = d.path().join("new.img");
    std::fs::write(&src, &new).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(uri(&sock)));
    // Flush mode: nbdcopy's final flush pushed everything.
    let r = std::fs::read(&remote).unwrap();
    assert_eq!(first_diff(&r, &new), None, "remote lacks flushed data");
    sigkill(&mut p);

    let mut p = mount(&sock, &remote_uri, "32MiB", &cache, &args);
    let out = d.path().join("out.img");
    run(Command::new("nbdcopy").arg(uri(&sock)).arg(&out));
    assert_eq!(first_diff(&std::fs::read(&out).unwrap(), &new), None);
    let s = wait_progress(&mut p, &cache, "status", |_| true);
    assert_eq!(field(&s, "bytes_pulled"), 0, "cache not reused: {s}");
    assert_eq!(field(&s, "chunks_missing"), 0, "{s}");
    assert!(p.stop().success());
}

/// Async mode: a flush does not push; after SIGKILL the chunks are still
/// Dirty in the state file and the restarted mount pushes them.
#[test]
fn mount_async_dirty_chunks_are_pushed_after_sigkill_restart() {
    require("nbdcopy");
    let d = tmp();
    let size = 16 * MIB;
    let remote = d.path().join("remote.img");
    let orig = random_bytes(30, size);
    std::fs::write(&remote, &orig).unwrap();
    let remote_uri = format!("file:{}", remote.display());
    let cache = d.path().join("cache.img");
    let sock = d.path().join("m.sock");
    let async_args = ["--durability", "async", "--push-interval", "1h"];

    let mut p = mount(&sock, &remote_uri, "16MiB", &cache, &async_args);
    wait_progress(&mut p, &cache, "full pull", |s| {
        field(s, "chunks_missing") == 0
    });
    let new = random_bytes(31, size);
    let src = d.path().join("new.img");
    std::fs::write(&src, &new).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(uri(&sock)));
    assert_eq!(
        first_diff(&std::fs::read(&remote).unwrap(), &orig),
        None,
        "async mode pushed on flush"
    );
    sigkill(&mut p);

    // Restart: the Dirty chunks go out first thing.
    let mut p = mount(&sock, &remote_uri, "16MiB", &cache, &async_args);
    wait_progress(&mut p, &cache, "dirty pushed", |s| {
        field(s, "chunks_dirty") == 0
    });
    assert_eq!(first_diff(&std::fs::read(&remote).unwrap(), &new), None);
    let s = wait_progress(&mut p, &cache, "status", |_| true);
    assert_eq!(field(&s, "bytes_pulled"), 0, "{s}");
    assert_eq!(field(&s, "chunks_pushed"), 16, "{s}");

    // Writes then SIGTERM: a clean exit pushes even in async mode.
    let newer = random_bytes(32, size);
    std::fs::write(&src, &newer).unwrap();
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(uri(&sock)));
    assert!(p.stop().success());
    assert_eq!(first_diff(&std::fs::read(&remote).unwrap(), &newer), None);

    // A restart with another chunk size is refused, naming the reason.
    let out = Command::new(r3map_bin())
        .args([
            "mount",
            "--remote",
            &remote_uri,
            "--size",
            "16MiB",
            "--chunk-size",
            "64KiB",
            "--cache",
        ])
        .arg(&cache)
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk size"), "{err}");
}

/// Cold sequential read of 256 MiB through the mount from a memory remote.
/// A benchmark: `cargo test` skips it, `bench/bench-remote` runs it.
#[test]
#[ignore = "benchmark: run by bench/bench-remote (cargo test -- --ignored bench_)"]
fn bench_mount_cold_sequential_read_throughput() {
    require("nbdcopy");
    let d = tmp();
    let cache = d.path().join("cache.img");
    let sock = d.path().join("m.sock");
    // Background pull off: every byte is an on-demand fetch.
    for (label, workers) in [("on-demand only", "0"), ("with 32 pull workers", "32")] {
        let _ = std::fs::remove_file(&cache);
        let _ = std::fs::remove_file(r3map::managed::state_path(&cache));
        let mut p = mount(
            &sock,
            "memory:",
            "256MiB",
            &cache,
            &["--pull-workers", workers],
        );
        let t = Instant::now();
        run(Command::new("nbdcopy").arg(uri(&sock)).arg("null:"));
        let secs = t.elapsed().as_secs_f64();
        let s = wait_progress(&mut p, &cache, "all local", |s| {
            field(s, "chunks_missing") == 0
        });
        println!(
            "cold sequential read 256 MiB ({label}): {:.2} s, {:.0} MiB/s; status {s}",
            secs,
            256.0 / secs
        );
        assert!(p.stop().success());
    }
}

/// A region never written is pulled whole, yet the cache stays sparse:
/// zero chunks become holes, not 1 MiB of zeros each on the node's disk;
/// a chunk with data takes space, and a stale chunk pulled again as zeros
/// loses its old bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_zero_chunks_keep_the_cache_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmp();
    let (size, chunk) = (8 * MIB, MIB);
    let p = Probe::new(size, chunk);
    p.mem.write_at(3 * MIB, &[7u8; 4096]).await.unwrap();
    let cache = dir.path().join("c");
    let m = plain(&cache, &p, opts(chunk, 4));
    m.wait_complete().await;
    let blocks = std::fs::metadata(&cache).unwrap().blocks() * 512;
    assert!(
        blocks <= 2 * MIB,
        "{blocks} bytes allocated for one chunk of data in an 8 MiB region"
    );
    assert!(blocks >= 4096, "the chunk with data is not in the cache");
    assert_eq!(read(&m, 3 * MIB, 4096).await.unwrap(), vec![7u8; 4096]);
    // Chunk 3 becomes zeros at the source and is pulled again.
    p.mem.trim(3 * MIB, MIB).await.unwrap();
    m.hold().await;
    m.mark_missing(&[3]).await.unwrap();
    m.release().await;
    assert_eq!(read(&m, 3 * MIB, 4096).await.unwrap(), vec![0u8; 4096]);
    m.close().await;
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * KIB
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_tib_mount_opens_without_per_chunk_bookkeeping() {
    // A million 1 MiB chunks: opening must not build a record or a queue
    // entry per chunk (it did: ~100 MiB and a quarter of a second), only
    // read the 1 MiB state file; the background pull then walks the
    // chunks in order.
    let dir = tmp();
    let size = 1 << 40;
    let p = Probe::new(size, MIB);
    p.mem.write_at(size / 2, &[5u8; 4096]).await.unwrap();
    let before = rss_bytes();
    let m = plain(&dir.path().join("c"), &p, opts(MIB, 0));
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 16 * MIB,
        "opening a 1 TiB mount grew RSS by {} MiB",
        grown / MIB
    );
    assert_eq!(m.chunk_count(), 1 << 20);
    assert_eq!(read(&m, size / 2, 4096).await.unwrap(), vec![5u8; 4096]);
    assert_eq!(m.chunk_state((size / 2) / MIB), Some(ChunkState::Local));
    m.write_at(size - 10, &[9u8; 10]).await.unwrap();
    m.flush().await.unwrap();
    assert_eq!(m.chunk_state((size - 1) / MIB), Some(ChunkState::Local));
    let mut tail = [0u8; 10];
    p.mem.read_at(size - 10, &mut tail).await.unwrap();
    assert_eq!(tail, [9u8; 10], "the write reached the sink");
    m.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_window_grows_to_cover_a_long_round_trip() {
    // 50 ms per fetch: 16 fetches at a time (the starting window) move
    // 16 chunks per 50 ms, a bandwidth-delay product the window must
    // outgrow until it reaches its bound.
    let d = tmp();
    let chunk = 64 * KIB;
    let p = Probe::with(&random_bytes(21, 512 * chunk), chunk).await;
    p.read_delay_ms.store(50, SeqCst);
    let m = plain(&d.path().join("c"), &p, opts(chunk, 64));
    m.wait_complete().await;
    let pr = m.progress();
    assert_eq!(pr.pull_window, 64, "{pr:?}");
    assert!(pr.pull_rtt_us >= 50_000, "{pr:?}");
    assert!(read(&m, 0, 512 * chunk).await.unwrap() == random_bytes(21, 512 * chunk));
    m.close().await;
}
