//! The embeddable volume (`r3map::volume`): the kernel path over a
//! socketpair with every command, FLUSH reaching the remote store, the
//! cache lock against a second open (same process and another process),
//! a new stream taking over from a dead one, close waiting for every task
//! (and reporting what was busy past its deadline), and the embed example.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::raw::{RawClient, TIMEOUT};
use common::{r3map_bin, tmp, Proc};
use r3map::backend::memory::Memory;
use r3map::managed::{Durability, Options};
use r3map::nbd::proto::*;
use r3map::remote::client::ConnectOptions;
use r3map::remote::{Client, RegionService, Store, DEFAULT_MAX_REQUEST};
use r3map::volume::{BackendSpec, Mode};
use r3map::{Backend, ErrorKind, Result, Volume, VolumeSpec};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn pattern(seed: u64, n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| ((i.wrapping_mul(31).wrapping_add(seed * 17)) % 251) as u8)
        .collect()
}

fn deadline() -> Instant {
    Instant::now() + TIMEOUT
}

/// An in-process region service on a loopback port; stops when dropped.
struct Remote {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Remote {
    async fn start() -> Remote {
        let svc = RegionService::open(
            Store::open("memory:").await.unwrap(),
            64 * KIB,
            DEFAULT_MAX_REQUEST,
        )
        .await
        .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        // Served the way `r3map backend` serves (r3map::net::Listener).
        tokio::spawn(r3map::net::Listener::Tcp(l).serve(
            tonic::transport::Server::builder().add_service(svc.server()),
            stop.clone().cancelled_owned(),
        ));
        Remote { addr, stop }
    }

    fn uri(&self, region: &str) -> String {
        format!("r3map://{}/{region}", self.addr)
    }

    /// A fresh client's view of a region: not through the volume's cache.
    async fn read(&self, region: &str, offset: u64, len: usize) -> Vec<u8> {
        let c = Client::connect(&ConnectOptions::plain(self.addr.to_string()))
            .await
            .unwrap();
        let b = c.backend(region).await.unwrap();
        let mut buf = vec![0u8; len];
        b.read_at(offset, &mut buf).await.unwrap();
        buf
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn managed_spec(
    name: &str,
    backend: impl Into<BackendSpec>,
    size: u64,
    cache: &Path,
    o: Options,
) -> VolumeSpec {
    VolumeSpec {
        mode: Mode::Managed {
            cache: cache.to_path_buf(),
            options: o,
        },
        chunk_size: 64 * KIB,
        ..VolumeSpec::managed(name, backend, size, cache)
    }
}

fn opts(pull: usize) -> Options {
    Options {
        chunk_size: 64 * KIB,
        pull_workers: pull,
        push_workers: 4,
        push_interval: Duration::from_secs(3600),
        durability: Durability::Flush,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_serves_every_command_and_flush_reaches_the_store() {
    let remote = Remote::start().await;
    let d = tmp();
    let size = 4 * MIB;
    let vol = Volume::open(managed_spec(
        "vol1",
        remote.uri("vol1"),
        size,
        &d.path().join("cache"),
        opts(2),
    ))
    .await
    .unwrap();
    let (kernel, ours) = UnixStream::pair().unwrap();
    let conn = vol.serve_kernel(ours);
    let mut c = RawClient::new(kernel);

    // WRITE, then READ it back through the volume.
    let a = pattern(1, 100 * KIB);
    c.write(1, 0, 10 * KIB, &a).await;
    c.expect_ok(1).await;
    assert_eq!(c.read_back(2, 10 * KIB, a.len() as u32).await, a);
    // Durability Flush and a push interval of an hour: only a FLUSH (or
    // FUA) can have put bytes at the remote. Before it, nothing is there.
    assert_eq!(
        remote.read("vol1", 10 * KIB, a.len()).await,
        vec![0u8; a.len()],
        "bytes reached the remote before any flush"
    );
    c.send(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    c.expect_ok(3).await;
    assert_eq!(
        remote.read("vol1", 10 * KIB, a.len()).await,
        a,
        "FLUSH returned before the bytes reached the remote"
    );

    // WRITE with FUA: durable at the remote when answered.
    let b = pattern(2, 64 * KIB);
    c.write(4, CMD_FLAG_FUA, MIB, &b).await;
    c.expect_ok(4).await;
    assert_eq!(
        remote.read("vol1", MIB, b.len()).await,
        b,
        "FUA write not at the remote"
    );

    // TRIM and WRITE_ZEROES read back as zeros (after a flush, at the remote too).
    c.send(CMD_TRIM, 0, 5, 10 * KIB, 20 * KIB as u32, &[]).await;
    c.expect_ok(5).await;
    c.send(CMD_WRITE_ZEROES, 0, 6, MIB + 4 * KIB, 8 * KIB as u32, &[])
        .await;
    c.expect_ok(6).await;
    assert_eq!(
        c.read_back(7, 10 * KIB, 20 * KIB as u32).await,
        vec![0u8; 20 * KIB as usize]
    );
    assert_eq!(
        c.read_back(8, MIB + 4 * KIB, 8 * KIB as u32).await,
        vec![0u8; 8 * KIB as usize]
    );
    c.send(CMD_FLUSH, 0, 9, 0, 0, &[]).await;
    c.expect_ok(9).await;
    let mut want = a.clone();
    want[..20 * KIB as usize].fill(0);
    assert_eq!(remote.read("vol1", 10 * KIB, a.len()).await, want);
    assert_eq!(
        remote.read("vol1", MIB + 4 * KIB, 8 * KIB as usize).await,
        vec![0u8; 8 * KIB as usize]
    );

    // CACHE is a hint: answered with success.
    c.send(CMD_CACHE, 0, 10, 2 * MIB, 256 * KIB as u32, &[])
        .await;
    c.expect_ok(10).await;

    // Counters, per command.
    let s = vol.stats();
    assert_eq!(s.name, "vol1");
    assert_eq!(s.connections, 1);
    assert_eq!(
        (s.nbd.write.requests, s.nbd.write.bytes),
        (2, a.len() as u64 + b.len() as u64)
    );
    assert_eq!(s.nbd.read.requests, 3);
    assert_eq!(s.nbd.read.bytes, a.len() as u64 + 28 * KIB);
    assert_eq!(s.nbd.flush.requests, 2);
    assert_eq!((s.nbd.trim.requests, s.nbd.trim.bytes), (1, 20 * KIB));
    assert_eq!(
        (s.nbd.write_zeroes.requests, s.nbd.write_zeroes.bytes),
        (1, 8 * KIB)
    );
    assert_eq!((s.nbd.cache.requests, s.nbd.cache.bytes), (1, 256 * KIB));
    for cmd in [
        &s.nbd.read,
        &s.nbd.write,
        &s.nbd.flush,
        &s.nbd.trim,
        &s.nbd.write_zeroes,
        &s.nbd.cache,
    ] {
        assert_eq!(cmd.errors, 0);
        assert_eq!(cmd.latency.count(), cmd.requests, "one latency per request");
    }
    let m = s.managed.as_ref().expect("managed progress");
    assert_eq!(m.chunks_total, size / (64 * KIB));
    assert!(m.bytes_pushed > 0, "{m:?}");
    // A request beyond the end is an error, and counted as one.
    c.read(11, size, 4096).await;
    let r = c.reply().await;
    assert_eq!((r.cookie, r.error), (11, NBD_EINVAL));
    assert_eq!(vol.stats().nbd.read.errors, 1);
    // The JSON round-trips.
    let back: r3map::VolumeStats = serde_json::from_str(&s.to_json()).unwrap();
    assert_eq!(back, s);

    // DISC ends the connection cleanly.
    c.send(CMD_DISC, 0, 12, 0, 0, &[]).await;
    tokio::time::timeout(TIMEOUT, conn)
        .await
        .expect("DISC did not end the connection")
        .unwrap();
    vol.close(deadline()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_open_of_a_cache_is_busy_in_this_process() {
    let d = tmp();
    let cache = d.path().join("cache");
    let spec = managed_spec("v", "memory:", MIB, &cache, opts(1));
    let v1 = Volume::open(spec.clone()).await.unwrap();
    let e = Volume::open(spec.clone())
        .await
        .err()
        .expect("second open must fail");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(
        e.to_string().contains(&cache.display().to_string()),
        "names the cache: {e}"
    );
    // Closed, the cache is free again.
    v1.close(deadline()).await.unwrap();
    Volume::open(spec)
        .await
        .unwrap()
        .close(deadline())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_cache_is_busy_both_ways() {
    let d = tmp();
    let cache = d.path().join("cache");
    let sock = d.path().join("nbd.sock");
    let size = MIB.to_string();
    let mount = |cache: &Path| {
        let mut cmd = Command::new(r3map_bin());
        cmd.args([
            "mount",
            "--remote",
            "memory:",
            "--size",
            &size,
            "--chunk-size",
            "64KiB",
        ])
        .arg("--cache")
        .arg(cache)
        .arg("--socket")
        .arg(&sock)
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        cmd
    };

    // This process holds the cache: `r3map mount` on it fails, saying why.
    let v = Volume::open(managed_spec("v", "memory:", MIB, &cache, opts(1)))
        .await
        .unwrap();
    let mut cmd = mount(&cache);
    let out = tokio::time::timeout(TIMEOUT, tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("r3map mount hung on a busy cache")
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "r3map mount started on a locked cache: {err}"
    );
    assert!(
        err.contains("busy") && err.contains(&cache.display().to_string()),
        "{err}"
    );
    v.close(deadline()).await.unwrap();

    // The other way round: a running `r3map mount` holds it.
    let child = mount(&cache).stderr(Stdio::null()).spawn().unwrap();
    let mut p = Proc {
        child,
        name: "r3map mount".into(),
    };
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(p.child.try_wait().unwrap().is_none(), "r3map mount exited");
        assert!(t.elapsed() < TIMEOUT, "r3map mount did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = Volume::open(managed_spec("v", "memory:", MIB, &cache, opts(1)))
        .await
        .err()
        .expect("open of a cache a mount holds must fail");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(p.stop().success());
    // The process is gone, and its lock with it.
    Volume::open(managed_spec("v", "memory:", MIB, &cache, opts(1)))
        .await
        .unwrap()
        .close(deadline())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_stream_serves_the_same_data_after_one_dies_mid_io() {
    let d = tmp();
    let size = 2 * MIB;
    let vol = Volume::open(managed_spec(
        "v",
        "memory:",
        size,
        &d.path().join("cache"),
        opts(2),
    ))
    .await
    .unwrap();
    let data = pattern(7, 300 * KIB);

    let (k1, s1) = UnixStream::pair().unwrap();
    let conn1 = vol.serve_kernel(s1);
    let mut c1 = RawClient::new(k1);
    c1.write(1, 0, 5 * KIB, &data).await;
    c1.expect_ok(1).await;
    // Mid-I/O: reads in flight, and a WRITE whose payload stops halfway.
    c1.read(2, 0, MIB as u32).await;
    c1.read(3, MIB, MIB as u32).await;
    let half = pattern(9, 64 * KIB);
    c1.send(CMD_WRITE, 0, 4, MIB, 128 * KIB as u32, &half).await;
    drop(c1); // the "kernel" end dies
    let r = tokio::time::timeout(TIMEOUT, conn1)
        .await
        .expect("dead stream not noticed");
    assert!(r.is_ok(), "a hang-up is a normal end: {r:?}");

    // The restart path: a new socketpair for the same volume.
    let (k2, s2) = UnixStream::pair().unwrap();
    let (k3, s3) = UnixStream::pair().unwrap();
    let (conn2, conn3) = (vol.serve_kernel(s2), vol.serve_kernel(s3));
    let (mut c2, mut c3) = (RawClient::new(k2), RawClient::new(k3));
    assert_eq!(c2.read_back(1, 5 * KIB, data.len() as u32).await, data);
    // Two streams at once (multi-connection): a write on one is read on the other.
    let more = pattern(11, 64 * KIB);
    c3.write(1, 0, MIB + 64 * KIB, &more).await;
    c3.expect_ok(1).await;
    assert_eq!(
        c2.read_back(2, MIB + 64 * KIB, more.len() as u32).await,
        more
    );
    assert_eq!(vol.stats().connections, 2);

    // Stopping one stream leaves the other serving.
    conn3.stop();
    tokio::time::timeout(TIMEOUT, conn3)
        .await
        .expect("stop did not end it")
        .unwrap();
    assert_eq!(c2.read_back(3, 5 * KIB, data.len() as u32).await, data);
    drop((c2, c3));
    tokio::time::timeout(TIMEOUT, conn2).await.unwrap().unwrap();
    vol.close(deadline()).await.unwrap();
}

/// A source whose reads wait for a gate, each holding a token while it
/// runs, and reporting that it started.
struct Gated {
    mem: Memory,
    open: watch::Sender<bool>,
    token: Arc<()>,
    entered: mpsc::UnboundedSender<u64>,
    reads: AtomicU64,
}

#[async_trait]
impl Backend for Gated {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _t = self.token.clone();
        self.reads.fetch_add(1, SeqCst);
        let _ = self.entered.send(offset);
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|o| *o).await;
        self.mem.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.mem.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        self.mem.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.mem.trim(offset, len).await
    }
}

const CHUNK: u64 = 64 * KIB;

async fn gated(chunks: u64) -> (Arc<Gated>, mpsc::UnboundedReceiver<u64>, Vec<u8>) {
    let size = chunks * CHUNK;
    let mem = Memory::new(size, CHUNK);
    let data = pattern(3, size);
    mem.write_at(0, &data).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let g = Arc::new(Gated {
        mem,
        open: watch::channel(false).0,
        token: Arc::new(()),
        entered: tx,
        reads: AtomicU64::new(0),
    });
    (g, rx, data)
}

/// Waits until source reads have started at each of `offsets`; returns
/// every offset seen.
async fn entered(rx: &mut mpsc::UnboundedReceiver<u64>, offsets: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    while !offsets.iter().all(|o| v.contains(o)) {
        let off = tokio::time::timeout(TIMEOUT, rx.recv())
            .await
            .expect("source reads did not start")
            .unwrap();
        v.push(off);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_fetches_in_flight_and_no_task_outlives_it() {
    let d = tmp();
    let (src, mut rx, data) = gated(16).await;
    // Two background pull workers plus on-demand fetches from reads of
    // chunks 8..12, all stuck on the source.
    let vol = Volume::open(managed_spec(
        "v",
        BackendSpec::Open(src.clone()),
        16 * CHUNK,
        &d.path().join("cache"),
        opts(2),
    ))
    .await
    .unwrap();
    let (k, s) = UnixStream::pair().unwrap();
    let conn = vol.serve_kernel(s);
    let mut c = RawClient::new(k);
    for i in 8..12u64 {
        c.read(i, i * CHUNK, CHUNK as u32).await;
    }
    let wanted: Vec<u64> = (8..12).map(|i| i * CHUNK).collect();
    entered(&mut rx, &wanted).await;
    // (The pull workers may have joined in: readahead after the first
    // on-demand fetch moves 9.. to the head of their queue.)
    assert!(Arc::strong_count(&src.token) > 4, "source reads in flight");

    // The "kernel" reads replies as they come, as the real one does (a
    // reply nobody reads would hold its connection, and close, forever).
    let replies = tokio::spawn(async move {
        let mut got = std::collections::HashMap::new();
        for _ in 8..12 {
            let r = c.reply().await;
            assert_eq!(r.error, 0);
            got.insert(r.cookie, r.data);
        }
        got
    });
    // Close must wait: the reads are answered only once the source answers.
    // Proven by ordering: when close returns, the source must be open.
    let mut closing = {
        let open = src.open.subscribe();
        tokio::spawn(async move {
            let r = vol.close(deadline()).await;
            (r, *open.borrow())
        })
    };
    // A moment for close to return early, if it would.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut closing)
            .await
            .is_err(),
        "close returned while fetches were in flight"
    );
    src.open.send_replace(true);
    let (closed, source_was_open) = tokio::time::timeout(TIMEOUT, &mut closing)
        .await
        .expect("close hung")
        .unwrap();
    closed.unwrap();
    assert!(
        source_was_open,
        "close returned while fetches were in flight"
    );
    // Every read read before close was answered, with the source's bytes.
    let got = replies.await.unwrap();
    for i in 8..12u64 {
        assert_eq!(
            got[&i],
            data[(i * CHUNK) as usize..][..CHUNK as usize],
            "chunk {i}"
        );
    }
    assert!(
        conn.is_finished(),
        "close returned before the connection ended"
    );
    // Nothing the volume started still runs: no source read is in
    // progress, and no task holds the mount (each holds the source).
    assert_eq!(
        Arc::strong_count(&src.token),
        1,
        "a source read outlived close"
    );
    assert_eq!(
        Arc::strong_count(&src),
        1,
        "a task of the volume outlived close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_past_its_deadline_says_what_is_busy_and_keeps_the_cache_locked() {
    let d = tmp();
    let cache = d.path().join("cache");
    let (src, mut rx, data) = gated(4).await;
    let spec = managed_spec(
        "v",
        BackendSpec::Open(src.clone()),
        4 * CHUNK,
        &cache,
        opts(0),
    );
    let vol = Volume::open(spec.clone()).await.unwrap();
    let (k, s) = UnixStream::pair().unwrap();
    let _conn = vol.serve_kernel(s);
    let mut c = RawClient::new(k);
    // A write that lands (chunk 3 is written whole: no fetch), then a read
    // stuck on the source.
    let w = pattern(5, CHUNK);
    c.write(1, 0, 3 * CHUNK, &w).await;
    c.expect_ok(1).await;
    c.read(2, 0, 4096).await;
    entered(&mut rx, &[0]).await;

    let t = Instant::now();
    let e = vol
        .close(Instant::now() + Duration::from_millis(300))
        .await
        .expect_err("close cannot finish while a fetch is stuck");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "close overran its deadline"
    );
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("draining") && msg.contains("1 connection"),
        "{msg}"
    );

    // The stuck task still runs, so the cache is still locked.
    let busy = Volume::open(spec.clone())
        .await
        .err()
        .expect("cache still in use");
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");

    // Once the source answers, the read is answered and the lock freed.
    src.open.send_replace(true);
    assert_eq!(c.expect_ok(2).await, data[..4096]);
    let t = Instant::now();
    let vol = loop {
        match Volume::open(spec.clone()).await {
            Ok(v) => break v,
            Err(e) if e.kind() == ErrorKind::Busy => {
                assert!(t.elapsed() < TIMEOUT, "the cache stayed locked: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    // Nothing written before the failed close was lost: the cache kept it.
    let (k, s) = UnixStream::pair().unwrap();
    let _conn = vol.serve_kernel(s);
    let mut c = RawClient::new(k);
    assert_eq!(c.read_back(1, 3 * CHUNK, CHUNK as u32).await, w);
    drop(c);
    vol.close(deadline()).await.unwrap();
    assert_eq!(
        &src.mem_contents(3 * CHUNK, CHUNK).await,
        &w,
        "pushed at close"
    );
}

impl Gated {
    async fn mem_contents(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.mem.read_at(offset, &mut b).await.unwrap();
        b
    }
}

/// The `embed` example, as `cargo test` built it: examples land in
/// `<profile dir>/examples/`, and this test runs from `<profile dir>/deps/`.
/// (`cargo run --example` would relink it, about a minute on a small runner.)
fn embed_example() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from <target>/<profile>/deps");
    let bin = profile.join("examples").join("embed");
    assert!(
        bin.is_file(),
        "{} not found: `cargo test` builds examples; run this through cargo test \
         (or `cargo build --release --example embed` first)",
        bin.display()
    );
    bin
}

#[test]
fn embed_example_runs_and_reports() {
    let out = Command::new(embed_example())
        .env("R3MAP_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "WRITE 1048576 bytes at 3149824: ok",
        "FLUSH: ok",
        "READ 1048576 bytes at 3149824: same bytes",
        "migrated: dirty_chunks=1 epoch=1",
        "second volume reads the bytes written during the migration: yes",
        "source refuses writes after the hand-over: yes",
        "closed the destination volume",
        "connection ended after DISC",
        "closed volume",
        "remote region holds the written bytes: yes",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no line {line:?} in:\n{stdout}"
        );
    }
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("stats "))
        .unwrap_or_else(|| panic!("no stats line in:\n{stdout}"));
    let s: r3map::VolumeStats = serde_json::from_str(json).unwrap();
    assert_eq!(s.name, "vol1");
    assert_eq!((s.nbd.write.requests, s.nbd.write.bytes), (1, MIB));
    assert_eq!((s.nbd.read.requests, s.nbd.read.bytes), (1, MIB));
    assert_eq!(s.nbd.flush.requests, 1);
    let m = s.managed.expect("managed progress");
    // The write straddles chunks 3 and 4 (1 MiB each): both pushed whole.
    assert_eq!(
        m.bytes_pushed,
        2 * MIB,
        "the flush pushed the chunks written"
    );
    assert_eq!(m.chunks_dirty, 0);
}

/// The process's resident set size in KiB (Linux /proc).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Bench (run by bench/bench-csi): the user-space part of NodeStage — a
/// managed volume over a 1 GiB region of an in-process region service,
/// from `Volume::open` to serving its first request on a socketpair —
/// while 100 such volumes stay open and idle; then the RSS they cost.
/// Pulling is on demand (pull workers 0), as an idle volume's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_stage_1gib_and_100_idle_volumes() {
    const GIB: u64 = 1 << 30;
    let remote = Remote::start().await;
    let dir = tmp();
    let rss0 = rss_kib();
    let mut vols = Vec::new();
    let mut times = Vec::new();
    // The two parts of a stage: Volume::open, then the first request.
    let (mut opens, mut firsts) = (Vec::new(), Vec::new());
    for i in 0..100 {
        let region = format!("v{i}");
        let spec = VolumeSpec {
            mode: Mode::Managed {
                cache: dir.path().join(format!("{region}.cache")),
                options: Options {
                    pull_workers: 0,
                    ..Default::default()
                },
            },
            ..VolumeSpec::direct(region.clone(), remote.uri(&region).as_str(), GIB)
        };
        let t = Instant::now();
        let vol = Volume::open(spec).await.unwrap();
        let opened = t.elapsed();
        let (a, b) = UnixStream::pair().unwrap();
        let conn = vol.serve_kernel(b);
        let mut c = RawClient::new(a);
        c.send(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
        assert_eq!(c.reply().await.error, 0);
        times.push(t.elapsed());
        opens.push(opened);
        firsts.push(t.elapsed() - opened);
        vols.push((vol, conn, c));
    }
    let rss = rss_kib();
    let first = times[0];
    times.sort();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| stage (user space) of the first 1 GiB volume | {:.2} ms |",
        first.as_secs_f64() * 1e3
    );
    println!(
        "| stage p50 with up to 99 others open | {:.2} ms |",
        pct(&times, 0.5).as_secs_f64() * 1e3
    );
    println!(
        "| stage p99 with up to 99 others open | {:.2} ms |",
        pct(&times, 0.99).as_secs_f64() * 1e3
    );
    opens.sort();
    firsts.sort();
    println!(
        "| of which Volume::open p50 / p99 | {:.2} / {:.2} ms |",
        pct(&opens, 0.5).as_secs_f64() * 1e3,
        pct(&opens, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| of which the first request (FLUSH) p50 / p99 | {:.2} / {:.2} ms |",
        pct(&firsts, 0.5).as_secs_f64() * 1e3,
        pct(&firsts, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| RSS of 100 idle 1 GiB volumes (this process, less its start) | {} MiB |",
        (rss - rss0) / 1024
    );
    println!("| RSS per idle volume | {} KiB |", (rss - rss0) / 100);
    for (vol, conn, _c) in vols {
        conn.stop();
        let _ = conn.await;
        vol.close(deadline()).await.unwrap();
    }
}
