//! Live migration with real processes: `r3map serve --seed-listen` as the
//! source, `r3map leech` as the destination, `r3map finalize`, writes from
//! a real NBD client on the source during pre-copy and up to finalize, and
//! the destination read back with nbdcopy against a model of every write
//! that was acknowledged.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{free_port, r3map_bin, require, run, tmp, Proc};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The tests share two cores with each other and with other builds: one
/// migration at a time keeps timings (and the bench) meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_bytes(seed: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn nbd_uri(sock: &Path) -> String {
    format!("nbd+unix:///r3map?socket={}", sock.display())
}

/// Spawns `r3map ARGS` with its stderr (logs at `info`) in `log`.
fn spawn(name: &str, args: &[String], log: &Path) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    let child = Command::new(r3map_bin())
        .args(args)
        .env("R3MAP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Proc {
        child,
        name: name.into(),
    }
}

fn wait_until(what: &str, p: &mut Proc, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("{} exited early ({st}):\n{}", p.name, read_log(log));
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// A source: `r3map serve` on a unix socket with Seed on a loopback port.
struct Source {
    proc: Proc,
    sock: PathBuf,
    seed_port: u16,
    log: PathBuf,
}

fn start_source(dir: &Path, tag: &str, backend: &str, size: u64, chunk: u64) -> Source {
    let args = vec![
        s("serve"),
        s("--backend"),
        s(backend),
        s("--size"),
        s(size),
        s("--chunk-size"),
        s(chunk),
    ];
    start_seeded(dir, tag, "r3map serve (source)", args)
}

/// Runs `r3map ARGS --socket DIR/TAG.sock --seed-listen 127.0.0.1:PORT` and
/// waits until both answer: a migration source, whatever serves it.
fn start_seeded(dir: &Path, tag: &str, name: &str, mut args: Vec<String>) -> Source {
    let sock = dir.join(format!("{tag}.sock"));
    let log = dir.join(format!("{tag}.log"));
    let seed_port = free_port();
    args.extend([
        s("--socket"),
        s(sock.display()),
        s("--seed-listen"),
        format!("127.0.0.1:{seed_port}"),
    ]);
    let mut proc = spawn(name, &args, &log);
    wait_until(name, &mut proc, &log, || {
        UnixStream::connect(&sock).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", seed_port)).is_ok()
    });
    Source {
        proc,
        sock,
        seed_port,
        log,
    }
}

/// A destination: `r3map leech` with its export and control on unix sockets.
struct Dest {
    proc: Proc,
    sock: PathBuf,
    ctl: PathBuf,
    log: PathBuf,
    seed_port: Option<u16>,
}

fn start_leech(dir: &Path, tag: &str, from: &str, extra: &[String]) -> Dest {
    let sock = dir.join(format!("{tag}.sock"));
    let ctl = dir.join(format!("{tag}.ctl"));
    let log = dir.join(format!("{tag}.log"));
    let mut args = vec![
        s("leech"),
        s("--from"),
        s(from),
        s("--cache"),
        s(dir.join(format!("{tag}.cache")).display()),
        s("--socket"),
        s(sock.display()),
        s("--control"),
        s(ctl.display()),
    ];
    args.extend_from_slice(extra);
    let seed_port = extra
        .iter()
        .position(|a| a == "--seed-listen")
        .map(|i| extra[i + 1].rsplit_once(':').unwrap().1.parse().unwrap());
    let mut proc = spawn("r3map leech", &args, &log);
    wait_until("the leech", &mut proc, &log, || {
        UnixStream::connect(&sock).is_ok()
            && UnixStream::connect(&ctl).is_ok()
            && !matches!(seed_port, Some(p) if std::net::TcpStream::connect(("127.0.0.1", p)).is_err())
    });
    Dest {
        proc,
        sock,
        ctl,
        log,
        seed_port,
    }
}

fn finalize(ctl: &Path, extra: &[&str]) -> Output {
    Command::new(r3map_bin())
        .arg("finalize")
        .arg("--leech")
        .arg(ctl)
        .args(extra)
        .output()
        .unwrap()
}

fn finalize_ok(ctl: &Path, extra: &[&str]) -> String {
    let out = finalize(ctl, extra);
    assert!(
        out.status.success(),
        "r3map finalize {extra:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `key=value` of r3map finalize's output.
fn field(out: &str, key: &str) -> u64 {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {out:?}"))
        .parse()
        .unwrap()
}

/// An NBD connection made with the `nbd` crate (one request at a time).
fn nbd_connect(sock: &Path) -> nbd::client::NbdClient<UnixStream> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let e = nbd::client::handshake(&mut s, b"r3map").unwrap();
    nbd::client::NbdClient::new(s, &e)
}

/// Fills `[0, len)` of an export with random data (nbdcopy), returning it.
fn fill(sock: &Path, dir: &Path, len: u64, seed: u64) -> Vec<u8> {
    let data = random_bytes(seed, len);
    let f = dir.join("fill.img");
    std::fs::write(&f, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--allocated")
        .arg(&f)
        .arg(nbd_uri(sock)));
    std::fs::remove_file(&f).unwrap();
    data
}

/// Reads the whole export through nbdcopy.
fn read_export(sock: &Path, dir: &Path) -> Vec<u8> {
    let f = dir.join("readback.img");
    let _ = std::fs::remove_file(&f);
    run(Command::new("nbdcopy").arg(nbd_uri(sock)).arg(&f));
    let v = std::fs::read(&f).unwrap();
    std::fs::remove_file(&f).unwrap();
    v
}

fn assert_same(what: &str, got: &[u8], want: &[u8], chunk: u64) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    if got == want {
        return;
    }
    let bad: Vec<usize> = got
        .chunks(chunk as usize)
        .zip(want.chunks(chunk as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    panic!(
        "{what}: differs first at byte {first}; {} chunks differ: {:?}",
        bad.len(),
        &bad[..bad.len().min(20)]
    );
}

/// Random writers on an export, each in its own stripe of `unit`-sized
/// units, so the model's order of writes is the export's. A write enters
/// the model once acknowledged; a failed write ends its writer.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Option<std::io::Error>>>,
}

fn start_writers(
    sock: &Path,
    model: Arc<Mutex<Vec<u8>>>,
    n: u64,
    unit: u64,
    seed: u64,
    pause: Duration,
) -> Writers {
    let len = model.lock().unwrap().len() as u64;
    start_writers_in(sock, model, 0..len, n, unit, seed, pause)
}

/// Like [`start_writers`], writing only inside the byte range `area`.
fn start_writers_in(
    sock: &Path,
    model: Arc<Mutex<Vec<u8>>>,
    area: std::ops::Range<u64>,
    n: u64,
    unit: u64,
    seed: u64,
    pause: Duration,
) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let (first, units) = (area.start / unit, (area.end - area.start) / unit);
    let handles = (0..n)
        .map(|t| {
            let mut c = nbd_connect(sock);
            let (stop, acked, model) = (stop.clone(), acked.clone(), model.clone());
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed * 1000 + t);
                while !stop.load(Ordering::SeqCst) {
                    let u = first + rng.gen_range(0..units / n) * n + t;
                    let within = rng.gen_range(0..unit / 512) * 512;
                    let len = rng.gen_range(1..=((unit - within) / 512).min(128)) * 512;
                    let off = u * unit + within;
                    let mut data = vec![0u8; len as usize];
                    rng.fill_bytes(&mut data);
                    c.seek(SeekFrom::Start(off)).unwrap();
                    if let Err(e) = c.write_all(&data) {
                        return Some(e);
                    }
                    model.lock().unwrap()[off as usize..(off + len) as usize]
                        .copy_from_slice(&data);
                    acked.fetch_add(1, Ordering::SeqCst);
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
                None
            })
        })
        .collect();
    Writers {
        stop,
        acked,
        handles,
    }
}

impl Writers {
    /// Waits until the writers have had `n` writes acknowledged: pre-copy
    /// is under way with writes landing, however slow the machine.
    fn wait_acked(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "writers made only {} of {n} writes",
                self.acked.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the writers; returns the errors that ended any of them.
    fn stop(self) -> Vec<std::io::Error> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Waits for every writer to end by itself (on an error).
    fn join(self) -> Vec<std::io::Error> {
        self.handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect()
    }
}

/// A read issued on the destination before finalize: it must wait (the
/// export is held) and complete once finalize released it.
fn held_read(sock: &Path, off: u64, len: usize) -> JoinHandle<(Instant, std::io::Result<Vec<u8>>)> {
    let mut c = nbd_connect(sock);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; len];
        c.seek(SeekFrom::Start(off)).unwrap();
        let r = c.read_exact(&mut buf).map(|()| buf);
        (Instant::now(), r)
    })
}

fn relay(dir: &Path, to: u16, rtt: &str) -> (Proc, u16) {
    let port = free_port();
    let log = dir.join(format!("relay-{port}.log"));
    let mut p = spawn(
        "r3map relay",
        &[
            s("relay"),
            s("--listen"),
            format!("127.0.0.1:{port}"),
            s("--to"),
            format!("127.0.0.1:{to}"),
            s("--rtt"),
            s(rtt),
        ],
        &log,
    );
    wait_until("the relay", &mut p, &log, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (p, port)
}

fn kill9(p: &mut Proc) {
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

#[test]
fn writes_up_to_finalize_arrive_byte_for_byte() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (64 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let mut model = vec![0u8; size as usize];
    model[..(size / 2) as usize].copy_from_slice(&fill(&src.sock, dir.path(), size / 2, 1));
    let model = Arc::new(Mutex::new(model));

    let w = start_writers(&src.sock, model.clone(), 2, 64 * KIB, 2, Duration::ZERO);
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{}", src.seed_port),
        &[],
    );
    let reader = held_read(&dst.sock, 0, 64 * 1024);
    w.wait_acked(100);
    let acked_before = w.acked.load(Ordering::SeqCst);
    assert!(
        !reader.is_finished(),
        "a read on the destination completed before finalize"
    );

    let t_fin = Instant::now();
    let out = finalize_ok(&dst.ctl, &[]);
    // Every writer was still writing at finalize: each ends on an EIO.
    let errs = w.join();
    assert_eq!(errs.len(), 2, "each writer must end on an error");
    for e in &errs {
        assert!(e.to_string().contains("EIO"), "writer ended with {e}");
    }
    let (t_read, first) = reader.join().unwrap();
    let first = first.expect("the held read succeeds after finalize");
    // Ordering, not timing: the held read completed after finalize began.
    assert!(t_read >= t_fin, "the held read completed before finalize");
    let downtime = t_read.saturating_duration_since(t_fin);
    let dirty = field(&out, "dirty_chunks");
    println!(
        "migration 64MiB, chunk 256KiB: {} writes acked, {dirty} dirty chunks at finalize, \
         finalize call {} us (leech side {} us), downtime to first read {:?}",
        acked_before,
        field(&out, "call_us"),
        field(&out, "leech_us"),
        downtime
    );
    assert!(dirty > 0, "writes during pre-copy left no dirty chunk");
    let done = finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    assert!(done.contains("complete"), "{done}");
    // Idempotent: the second call reports the same dirty list.
    assert_eq!(field(&done, "dirty_chunks"), dirty);

    let model = model.lock().unwrap().clone();
    assert_eq!(&first[..], &model[..64 * 1024]);
    assert_same(
        "source after finalize",
        &read_export(&src.sock, dir.path()),
        &model,
        chunk,
    );
    assert_same(
        "destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );

    // The destination stands alone once complete.
    let st = src.proc.stop();
    assert!(st.success(), "source exited {st}:\n{}", read_log(&src.log));
    assert_same(
        "destination without its source",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    // It takes writes now.
    let mut c = nbd_connect(&dst.sock);
    c.seek(SeekFrom::Start(MIB)).unwrap();
    c.write_all(&[7u8; 4096]).unwrap();
    let st = dst.proc.stop();
    assert!(st.success(), "leech exited {st}:\n{}", read_log(&dst.log));
    let log = read_log(&dst.log);
    assert!(log.contains("migration: complete"), "{log}");
}

#[test]
fn source_killed_falls_back_to_the_backend() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let img = dir.path().join("region.img");
    let backend = format!("file:{}", img.display());
    let mut src = start_source(dir.path(), "a", &backend, size, chunk);
    let mut model = vec![0u8; size as usize];
    model.copy_from_slice(&fill(&src.sock, dir.path(), size, 3));
    let model = Arc::new(Mutex::new(model));
    // A slow link: the pre-copy is far from done when the source dies.
    let (_relay, rport) = relay(dir.path(), src.seed_port, "40ms");
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{rport}"),
        &[
            s("--backend"),
            backend.clone(),
            s("--pull-workers"),
            s(2),
            s("--seed-timeout"),
            s("1s"),
        ],
    );
    let w = start_writers(
        &src.sock,
        model.clone(),
        2,
        64 * KIB,
        4,
        Duration::from_micros(200),
    );
    std::thread::sleep(Duration::from_millis(800));
    // Every acknowledged write is in the file (page cache) when it dies.
    assert!(w.stop().is_empty());
    kill9(&mut src.proc);

    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log(&dst.log).contains("seed lost") {
        assert!(
            Instant::now() < deadline,
            "the leech never noticed:\n{}",
            read_log(&dst.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A plain finalize needs the seed: it refuses and says what to do.
    let out = finalize(&dst.ctl, &[]);
    assert!(!out.status.success(), "finalize without a seed succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--seed-lost"), "{err}");

    let out = finalize_ok(&dst.ctl, &["--seed-lost", "--wait", "--timeout", "120s"]);
    assert_eq!(field(&out, "dirty_chunks"), size / chunk, "{out}");
    let model = model.lock().unwrap().clone();
    assert_same(
        "destination after fallback",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    let st = dst.proc.stop();
    assert!(st.success(), "leech exited {st}:\n{}", read_log(&dst.log));
}

#[test]
fn source_killed_before_finalize_without_backend_fails_loudly() {
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    fill(&src.sock, dir.path(), size, 5);
    let (_relay, rport) = relay(dir.path(), src.seed_port, "40ms");
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{rport}"),
        &[s("--pull-workers"), s(2), s("--seed-timeout"), s("1s")],
    );
    let reader = held_read(&dst.sock, 0, 4096);
    std::thread::sleep(Duration::from_millis(500));
    kill9(&mut src.proc);

    let t = Instant::now();
    let st = loop {
        if let Some(st) = dst.proc.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the leech did not give up:\n{}",
            read_log(&dst.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = read_log(&dst.log);
    assert!(
        !st.success(),
        "the leech exited 0 without ever having the data:\n{log}"
    );
    assert!(log.contains("seed lost before finalize"), "{log}");
    // The held read never got data: its connection ended instead.
    let (_, r) = reader.join().unwrap();
    assert!(
        r.is_err(),
        "a held read returned data from a dead migration"
    );
}

#[test]
fn source_killed_after_finalize_without_backend_never_serves_stale_data() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let mut model = vec![0u8; size as usize];
    model.copy_from_slice(&fill(&src.sock, dir.path(), size, 6));
    let model = Arc::new(Mutex::new(model));
    let (_relay, rport) = relay(dir.path(), src.seed_port, "40ms");
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{rport}"),
        &[s("--pull-workers"), s(1), s("--seed-timeout"), s("1s")],
    );
    // Writes during pre-copy up to finalize: to the first chunks (pulled
    // early, so pulled and then written) and to the last quarter (likely
    // never pulled); the chunks between are pulled and stay clean.
    let w1 = start_writers_in(
        &src.sock,
        model.clone(),
        0..size / 16,
        1,
        64 * KIB,
        7,
        Duration::from_millis(2),
    );
    let w2 = start_writers_in(
        &src.sock,
        model.clone(),
        size * 3 / 4..size,
        1,
        64 * KIB,
        8,
        Duration::from_millis(2),
    );
    // Some chunks pulled (they must read correctly later), writes landing.
    wait_present(&dst.ctl, 0.1);
    w1.wait_acked(20);
    w2.wait_acked(20);
    let out = finalize_ok(&dst.ctl, &[]);
    assert!(field(&out, "dirty_chunks") > 0);
    let _ = (w1.join(), w2.join());
    kill9(&mut src.proc);

    // Every chunk reads either as the model says, or fails (EIO): never stale.
    let model = model.lock().unwrap().clone();
    let mut c = nbd_connect(&dst.sock);
    let (mut ok, mut failed) = (0, 0);
    for i in 0..size / chunk {
        let mut buf = vec![0u8; chunk as usize];
        c.seek(SeekFrom::Start(i * chunk)).unwrap();
        match c.read_exact(&mut buf) {
            Ok(()) => {
                assert!(
                    buf == model[(i * chunk) as usize..((i + 1) * chunk) as usize],
                    "chunk {i} served stale data after the seed died"
                );
                ok += 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("EIO"), "chunk {i}: {e}");
                failed += 1;
            }
        }
    }
    println!("after the seed died post-finalize: {ok} chunks served (all correct), {failed} EIO");
    assert!(failed > 0, "every chunk was present: the test did not test");
    assert!(ok > 0);
    let out = finalize(&dst.ctl, &["--wait", "--timeout", "5s"]);
    assert!(!out.status.success(), "finalize --wait reported complete");
    assert!(String::from_utf8_lossy(&out.stderr).contains("seed lost"));
    let st = dst.proc.stop();
    assert!(!st.success(), "a leech whose migration failed exited 0");
}

#[test]
fn chain_a_to_b_to_c() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let mut a = start_source(dir.path(), "a", "memory:", size, chunk);
    let mut model = vec![0u8; size as usize];
    model[..(size / 2) as usize].copy_from_slice(&fill(&a.sock, dir.path(), size / 2, 8));
    let model = Arc::new(Mutex::new(model));
    // B pulls slowly, so it finalizes with chunks never pulled, some dirty.
    let (_relay, rport) = relay(dir.path(), a.seed_port, "20ms");
    let b_seed = free_port();
    let mut b = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{rport}"),
        &[
            s("--pull-workers"),
            s(2),
            s("--seed-listen"),
            format!("127.0.0.1:{b_seed}"),
        ],
    );
    let w = start_writers(
        &a.sock,
        model.clone(),
        2,
        64 * KIB,
        9,
        Duration::from_micros(100),
    );
    w.wait_acked(50);
    let out = finalize_ok(&b.ctl, &[]);
    let _ = w.join();
    println!("A->B finalize: {out}");

    // B is the source now: it takes writes while C pulls from it (and B
    // still pulls from A).
    let w = start_writers(
        &b.sock,
        model.clone(),
        2,
        64 * KIB,
        10,
        Duration::from_micros(100),
    );
    let mut c = start_leech(
        dir.path(),
        "c",
        &format!("127.0.0.1:{}", b.seed_port.unwrap()),
        &[],
    );
    w.wait_acked(50);
    let out = finalize_ok(&c.ctl, &[]);
    println!("B->C finalize: {out}");
    let errs = w.join();
    assert!(errs.iter().all(|e| e.to_string().contains("EIO")));
    // B completes (chunks never pulled but dirty are not counted twice),
    // then C; then A and B may go.
    finalize_ok(&b.ctl, &["--wait", "--timeout", "120s"]);
    finalize_ok(&c.ctl, &["--wait", "--timeout", "120s"]);
    let model = model.lock().unwrap().clone();
    assert_same("C", &read_export(&c.sock, dir.path()), &model, chunk);
    assert!(a.proc.stop().success());
    assert!(b.proc.stop().success(), "{}", read_log(&b.log));
    assert_same("C alone", &read_export(&c.sock, dir.path()), &model, chunk);
    assert!(c.proc.stop().success(), "{}", read_log(&c.log));
}

#[test]
fn seed_refuses_wrong_token_and_open_listen_without_one() {
    let _g = serial();
    let dir = tmp();
    // Non-loopback without a token: refused at start.
    let out = Command::new(r3map_bin())
        .args([
            "serve",
            "--backend",
            "memory:",
            "--size",
            "1MiB",
            "--socket",
        ])
        .arg(dir.path().join("x.sock"))
        .args(["--seed-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without authentication"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With a token: a leech with the wrong one is refused before tracking.
    let tok = dir.path().join("token");
    std::fs::write(&tok, "0123456789abcdef0123456789abcdef\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "fedcba9876543210fedcba9876543210\n").unwrap();
    let port = free_port();
    let sock = dir.path().join("a.sock");
    let log = dir.path().join("a.log");
    let mut a = spawn(
        "serve",
        &[
            s("serve"),
            s("--backend"),
            s("memory:"),
            s("--size"),
            s("4MiB"),
            s("--socket"),
            s(sock.display()),
            s("--seed-listen"),
            format!("127.0.0.1:{port}"),
            s("--token-file"),
            s(tok.display()),
        ],
        &log,
    );
    wait_until("serve", &mut a, &log, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let leech = |token: &Path, tag: &str| {
        Command::new(r3map_bin())
            .args(["leech", "--from", &format!("127.0.0.1:{port}"), "--cache"])
            .arg(dir.path().join(format!("{tag}.cache")))
            .arg("--socket")
            .arg(dir.path().join(format!("{tag}.sock")))
            .arg("--control")
            .arg(dir.path().join(format!("{tag}.ctl")))
            .arg("--token-file")
            .arg(token)
            .output()
            .unwrap()
    };
    let out = leech(&bad, "x");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token"), "{err}");
    assert!(
        !read_log(&log).contains("tracking writes"),
        "a refused leech started tracking"
    );
    drop(a);
}

/// Removes the namespaces of a two-hosts run even when the test fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", &self.0])
            .status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/netns/two-hosts.sh")
}

#[test]
fn two_hosts_in_network_namespaces() {
    for t in ["ip", "tc", "nbdcopy", "fio"] {
        require(t);
    }
    assert!(
        run(Command::new("id").arg("-u")).trim() == "0",
        "two_hosts_in_network_namespaces needs root (ip netns); CI runs as root"
    );
    let _g = serial();
    let name = format!("r3t{}", std::process::id() % 100000);
    let _ns = Netns(name.clone());
    // Output to files, not pipes: a process the script leaked must not
    // hang the test; its own process group is killed on timeout.
    let dir = tmp();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new("bash")
        .arg(script())
        .args(["migrate", r3map_bin()])
        .env("NAME", &name)
        .env("SIZE", "128MiB")
        .env("RTT", "2ms")
        .env("RATE", "2gbit")
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t.elapsed() > Duration::from_secs(240) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = read_log(&o);
    println!("{stdout}");
    assert!(
        st.is_some_and(|s| s.success()),
        "two-hosts.sh failed ({st:?}):\n{stdout}\n{}",
        read_log(&e)
    );
    assert!(stdout.contains("identical"), "{stdout}");
    drop(_ns);
    let left = run(Command::new("ip").args(["netns", "list"]));
    assert!(!left.contains(&name), "namespaces left behind: {left}");
}

/// 1 GiB memory region, 5% of its chunks rewritten during pre-copy:
/// total time against what the loopback link could do, and downtime.
/// A benchmark: `cargo test` skips it, `bench/bench-remote` runs it.
#[test]
#[ignore = "benchmark: run by bench/bench-remote (cargo test -- --ignored bench_)"]
fn bench_one_gib_migration() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (1024 * MIB, MIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    // Full of data, so nothing is sparse on either side.
    let f = dir.path().join("fill.img");
    {
        let mut out = std::fs::File::create(&f).unwrap();
        let mut rng = SmallRng::seed_from_u64(11);
        let mut buf = vec![0u8; (16 * MIB) as usize];
        for _ in 0..size / (16 * MIB) {
            rng.fill_bytes(&mut buf);
            out.write_all(&buf).unwrap();
        }
    }
    run(Command::new("nbdcopy").arg(&f).arg(nbd_uri(&src.sock)));
    std::fs::remove_file(&f).unwrap();

    // The link's ceiling in this run: raw TCP over loopback, 1 GiB.
    let loopback = loopback_bandwidth(size);
    let t0 = Instant::now();
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{}", src.seed_port),
        &[],
    );
    // 5% of the chunks, rewritten whole while the pre-copy runs.
    let n_dirty = size / chunk / 20;
    let mut c = nbd_connect(&src.sock);
    let mut rng = SmallRng::seed_from_u64(12);
    let mut buf = vec![0u8; chunk as usize];
    for _ in 0..n_dirty {
        let i = rng.gen_range(0..size / chunk);
        rng.fill_bytes(&mut buf);
        c.seek(SeekFrom::Start(i * chunk)).unwrap();
        c.write_all(&buf).unwrap();
    }
    let t_writes = t0.elapsed();
    // Finalize when the pre-copy is nearly done (a real orchestrator waits
    // for it too), with a read already waiting on the destination.
    let ctl = dst.ctl.clone();
    wait_present(&ctl, 0.95);
    let reader = held_read(&dst.sock, 512 * MIB, 4096);
    std::thread::sleep(Duration::from_millis(50));
    let t_fin = Instant::now();
    let out = finalize_ok(&ctl, &[]);
    let (t_read, r) = reader.join().unwrap();
    r.unwrap();
    let downtime = t_read.saturating_duration_since(t_fin);
    let done = finalize_ok(&ctl, &["--wait", "--timeout", "300s"]);
    let total = t0.elapsed();
    let ideal = Duration::from_secs_f64(size as f64 / loopback);
    println!(
        "BENCH migration 1GiB memory, chunk 1MiB, {n_dirty} chunks (5%) rewritten during pre-copy (in {t_writes:?}): \
         total {total:.2?} = {:.0} MB/s; loopback TCP {:.0} MB/s (ideal {ideal:.2?}, ratio {:.2}); \
         dirty at finalize {}, finalize call {} us, downtime to first read {downtime:?}; {}",
        size as f64 / total.as_secs_f64() / 1e6,
        loopback / 1e6,
        total.as_secs_f64() / ideal.as_secs_f64(),
        field(&out, "dirty_chunks"),
        field(&out, "call_us"),
        done.trim()
    );
    // Correct too: compare both sides by hash, without 2 GiB of files.
    assert_eq!(hash_export(&src.sock), hash_export(&dst.sock));
    assert!(src.proc.stop().success());
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
}

fn wait_present(ctl: &Path, frac: f64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = Command::new(r3map_bin())
            .args(["migration-status", "--leech"])
            .arg(ctl)
            .output()
            .unwrap();
        let o = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if field(&o, "present") as f64 >= frac * field(&o, "total") as f64 {
            return;
        }
        assert!(Instant::now() < deadline, "pre-copy stuck: {o}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hash_export(sock: &Path) -> u64 {
    use std::hash::Hasher;
    let mut child = Command::new("nbdcopy")
        .arg(nbd_uri(sock))
        .arg("-")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    loop {
        let k = out.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        h.write(&buf[..k]);
        n += k as u64;
    }
    assert!(child.wait().unwrap().success());
    h.write_u64(n);
    h.finish()
}

/// Bytes per second of one TCP stream over loopback, sending `n` bytes.
fn loopback_bandwidth(n: u64) -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; MIB as usize];
        let mut got = 0u64;
        while got < n {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            got += k as u64;
        }
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let buf = random_bytes(13, MIB);
    let t = Instant::now();
    for _ in 0..n / MIB {
        s.write_all(&buf).unwrap();
    }
    rx.join().unwrap();
    n as f64 / t.elapsed().as_secs_f64()
}

#[test]
fn mutual_tls_without_token() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let d = dir.path();
    let (size, chunk) = (8 * MIB, 256 * KIB);
    let ca = common::TestCa::new("r3map migration test CA");
    let other = common::TestCa::new("someone else's CA");
    let ca_pem = s(d.join("ca.crt").display());
    std::fs::write(&ca_pem, ca.cert.pem()).unwrap();
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    // "localhost" is the name a unix-socket endpoint is checked against.
    let pems = |(c, k): (PathBuf, PathBuf)| (s(c.display()), s(k.display()));
    let (scert, skey) = pems(ca.issue(d, "server", &["localhost", "127.0.0.1"], ServerAuth));
    let (ccert, ckey) = pems(ca.issue(d, "client", &["node-1"], ClientAuth));
    let (ocert, okey) = pems(other.issue(d, "intruder", &["node-x"], ClientAuth));
    let server_tls = [
        s("--tls-cert"),
        scert.clone(),
        s("--tls-key"),
        skey.clone(),
        s("--client-ca"),
        ca_pem.clone(),
    ];
    let client_tls = [
        s("--ca"),
        ca_pem.clone(),
        s("--cert"),
        ccert.clone(),
        s("--key"),
        ckey.clone(),
    ];

    // TLS without a client CA does not authenticate clients: an open
    // listen is still refused.
    let out = Command::new(r3map_bin())
        .args([
            "serve",
            "--backend",
            "memory:",
            "--size",
            "1MiB",
            "--socket",
        ])
        .arg(d.join("x.sock"))
        .args(["--seed-listen", "0.0.0.0:0"])
        .args(&server_tls[..4])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "open listen with TLS but no client CA"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication"), "{err}");

    let port = free_port();
    let sock = d.join("a.sock");
    let log = d.join("a.log");
    let mut args = vec![
        s("serve"),
        s("--backend"),
        s("memory:"),
        s("--size"),
        s(size),
        s("--chunk-size"),
        s(chunk),
        s("--socket"),
        s(sock.display()),
        s("--seed-listen"),
        format!("127.0.0.1:{port}"),
    ];
    args.extend_from_slice(&server_tls);
    let mut src = spawn("r3map serve (mTLS source)", &args, &log);
    wait_until("the source", &mut src, &log, || {
        UnixStream::connect(&sock).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let first = fill(&sock, d, size, 21);
    let from = format!("127.0.0.1:{port}");

    // Leeches that cannot prove themselves are refused before tracking.
    let refused = |tag: &str, tls: &[&str]| {
        let out = Command::new(r3map_bin())
            .args(["leech", "--from", &from, "--seed-timeout", "1s", "--cache"])
            .arg(d.join(format!("{tag}.cache")))
            .arg("--socket")
            .arg(d.join(format!("{tag}.sock")))
            .arg("--control")
            .arg(d.join(format!("{tag}.ctl")))
            .args(tls)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "leech {tag} was accepted: {err}");
        eprintln!("leech {tag} refused: {}", err.trim());
    };
    refused("plain", &[]);
    refused("nocert", &["--ca", &ca_pem]);
    refused(
        "intruder",
        &["--ca", &ca_pem, "--cert", &ocert, "--key", &okey],
    );
    assert!(
        !read_log(&log).contains("tracking writes"),
        "a refused leech started tracking:\n{}",
        read_log(&log)
    );

    // The leech serves its control endpoint with mTLS too.
    let mut extra: Vec<String> = client_tls.to_vec();
    extra.extend_from_slice(&server_tls);
    let mut dst = start_leech(d, "b", &from, &extra);
    // Writes at the source before finalize must arrive (dirty list over TLS).
    let model = fill(&sock, d, size / 2, 22);
    let mut want = first.clone();
    want[..model.len()].copy_from_slice(&model);

    let ctl = dst.ctl.clone();
    let status = |tls: &[&str]| {
        Command::new(r3map_bin())
            .arg("migration-status")
            .arg("--leech")
            .arg(&ctl)
            .args(tls)
            .output()
            .unwrap()
    };
    let out = status(&["--ca", &ca_pem]);
    assert!(
        !out.status.success(),
        "control answered a client without a certificate"
    );
    let out = status(&["--ca", &ca_pem, "--cert", &ocert, "--key", &okey]);
    assert!(
        !out.status.success(),
        "control answered a certificate from another CA"
    );
    let out = status(&[]);
    assert!(!out.status.success(), "control answered plain HTTP/2");
    let out = status(&["--ca", &ca_pem, "--cert", &ccert, "--key", &ckey]);
    assert!(
        out.status.success(),
        "status with a good certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tls: Vec<&str> = client_tls.iter().map(|a| a.as_str()).collect();
    assert!(!finalize(&dst.ctl, &[]).status.success());
    let mut fin = tls.clone();
    fin.extend(["--wait", "--timeout", "60s"]);
    let done = finalize_ok(&dst.ctl, &fin);
    assert!(done.contains("complete"), "{done}");
    println!(
        "mTLS migration {size} bytes: {} dirty chunks at finalize, finalize call {} us",
        field(&done, "dirty_chunks"),
        field(&done, "call_us")
    );
    assert_same("destination", &read_export(&dst.sock, d), &want, chunk);
    let st = src.stop();
    assert!(st.success(), "source exited {st}:\n{}", read_log(&log));
    assert_same(
        "destination without its source",
        &read_export(&dst.sock, d),
        &want,
        chunk,
    );
    let st = dst.proc.stop();
    assert!(st.success(), "leech exited {st}:\n{}", read_log(&dst.log));
}

// ---------------------------------------------------------------------------
// Fenced hand-over: the source is itself a managed mount over `r3map backend`
// (each node serves its volume from a cache over the region store).

/// `r3map backend` on a dir: store; returns it and its port.
fn start_store(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let log = dir.join("store.log");
    let store = format!("dir:{}", dir.join("store").display());
    let mut p = spawn(
        "r3map backend",
        &[
            s("backend"),
            s("--listen"),
            format!("127.0.0.1:{port}"),
            s("--store"),
            store,
            s("--chunk-size"),
            s(64 * KIB),
        ],
        &log,
    );
    wait_until("the store", &mut p, &log, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (p, port)
}

/// `r3map mount` of `region_uri` with a Seed service: a migration source
/// whose region lives in the store.
fn start_mount_source(
    dir: &Path,
    tag: &str,
    region_uri: &str,
    size: u64,
    chunk: u64,
    durability: &str,
) -> Source {
    let args = vec![
        s("mount"),
        s("--remote"),
        s(region_uri),
        s("--size"),
        s(size),
        s("--chunk-size"),
        s(chunk),
        s("--cache"),
        s(dir.join(format!("{tag}.cache")).display()),
        s("--durability"),
        s(durability),
        // A busy push loop: it runs all through the migration.
        s("--push-interval"),
        s("30ms"),
    ];
    start_seeded(dir, tag, "r3map mount (source)", args)
}

/// The region as the store holds it, read through a read-only export.
fn read_store(dir: &Path, port: u16, region: &str, size: u64) -> Vec<u8> {
    let sock = dir.join("store-read.sock");
    let log = dir.join("store-read.log");
    let mut p = spawn(
        "r3map serve (store reader)",
        &[
            s("serve"),
            s("--backend"),
            format!("r3map://127.0.0.1:{port}/{region}"),
            s("--size"),
            s(size),
            s("--socket"),
            s(sock.display()),
            s("--read-only"),
        ],
        &log,
    );
    wait_until("the store reader", &mut p, &log, || {
        UnixStream::connect(&sock).is_ok()
    });
    let v = read_export(&sock, dir);
    p.stop();
    v
}

/// Writes `data` at `off` through a fresh connection and flushes.
fn write_flush(sock: &Path, off: u64, data: &[u8]) -> std::io::Result<()> {
    let mut c = nbd_connect(sock);
    c.seek(SeekFrom::Start(off))?;
    c.write_all(data)?;
    c.flush()
}

fn fenced_hand_over(durability: &str) {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (16 * MIB, 256 * KIB);
    let (mut store, port) = start_store(dir.path());
    let region = format!("r3map://127.0.0.1:{port}/vol");
    // Node a takes the region (epoch 1) and serves it from its cache.
    let mut src = start_mount_source(
        dir.path(),
        "a",
        &format!("{region}?fence=node-a"),
        size,
        chunk,
        durability,
    );
    let model = Arc::new(Mutex::new(fill(&src.sock, dir.path(), size, 21)));
    let w = start_writers(&src.sock, model.clone(), 2, 64 * KIB, 22, Duration::ZERO);
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{}", src.seed_port),
        &[s("--backend"), region.clone(), s("--owner"), s("node-b")],
    );
    w.wait_acked(50);
    let out = finalize_ok(&dst.ctl, &[]);
    assert_eq!(
        field(&out, "epoch"),
        2,
        "taken over at the source's epoch + 1: {out}"
    );
    if durability == "flush" {
        // The source pushed everything on its finalize flush.
        assert_eq!(field(&out, "unpushed_chunks"), 0, "{out}");
    }
    // Writers on the source end with errors once it finalized.
    let errs = w.join();
    assert!(!errs.is_empty(), "source writers never saw finalize");
    // Writes on the destination right after finalize, flushed.
    let mut rng = SmallRng::seed_from_u64(23);
    for _ in 0..40 {
        let off = rng.gen_range(0..size / 4096) * 4096;
        let mut data = vec![0u8; 4096];
        rng.fill_bytes(&mut data);
        write_flush(&dst.sock, off, &data).unwrap();
        model.lock().unwrap()[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    let done = finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    assert!(done.contains("complete"), "{done}");
    // Give the source's push loop time to try (it must not: it is sealed).
    std::thread::sleep(Duration::from_millis(200));
    let model = model.lock().unwrap().clone();
    assert_same(
        "destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    // SIGTERM: the destination pushes what it has (its writes, and the
    // chunks the source never pushed); the source pushes nothing.
    let st = dst.proc.stop();
    assert!(st.success(), "leech exited {st}:\n{}", read_log(&dst.log));
    let st = src.proc.stop();
    assert!(st.success(), "source exited {st}:\n{}", read_log(&src.log));
    assert_same(
        &format!("store after a {durability} hand-over"),
        &read_store(dir.path(), port, "vol", size),
        &model,
        chunk,
    );

    // The source, restarted after finalize with the epoch it held, cannot
    // write: it comes back sealed, and the store refuses epoch 1 anyway.
    let mut again = start_mount_source(
        dir.path(),
        "a",
        &format!("{region}?epoch=1"),
        size,
        chunk,
        durability,
    );
    let e = write_flush(&again.sock, 0, &[0xEE; 4096]);
    assert!(e.is_err(), "a source restarted after finalize took a write");
    std::thread::sleep(Duration::from_millis(200));
    again.proc.stop();
    assert!(
        read_log(&again.log).contains("handed over before a restart"),
        "{}",
        read_log(&again.log)
    );
    assert_same(
        "store after the old source restarted",
        &read_store(dir.path(), port, "vol", size),
        &model,
        chunk,
    );
    store.stop();
}

#[test]
fn fenced_hand_over_flush_durability() {
    fenced_hand_over("flush");
}

#[test]
fn fenced_hand_over_async_durability() {
    fenced_hand_over("async");
}

/// Abort before finalize: the destination drops its cache and exits, the
/// source stops tracking and keeps serving (and pushing); the store holds
/// exactly what the source wrote.
#[test]
fn abort_leaves_the_source_serving() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (8 * MIB, 256 * KIB);
    let (mut store, port) = start_store(dir.path());
    let region = format!("r3map://127.0.0.1:{port}/vol");
    let mut src = start_mount_source(
        dir.path(),
        "a",
        &format!("{region}?fence=node-a"),
        size,
        chunk,
        "flush",
    );
    let mut model = fill(&src.sock, dir.path(), size, 31);
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{}", src.seed_port),
        &[s("--backend"), region.clone(), s("--owner"), s("node-b")],
    );
    write_flush(&src.sock, MIB, &[5; 4096]).unwrap();
    model[MIB as usize..MIB as usize + 4096].fill(5);
    let out = Command::new(r3map_bin())
        .args(["migration-abort", "--leech"])
        .arg(&dst.ctl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = dst.proc.child.wait().unwrap();
    assert!(!st.success(), "an aborted leech must not exit 0");
    let cache = dir.path().join("b.cache");
    for p in [
        cache.clone(),
        dir.path().join("b.cache.state"),
        dir.path().join("b.cache.migration"),
    ] {
        assert!(!p.exists(), "{} left behind by abort", p.display());
    }
    let src_log = read_log(&src.log);
    assert!(src_log.contains("aborted"), "{src_log}");
    // The source keeps serving and writing.
    write_flush(&src.sock, 2 * MIB, &[6; 4096]).unwrap();
    model[2 * MIB as usize..2 * MIB as usize + 4096].fill(6);
    assert_same(
        "source after abort",
        &read_export(&src.sock, dir.path()),
        &model,
        chunk,
    );
    let st = src.proc.stop();
    assert!(st.success(), "source exited {st}");
    assert_same(
        "store after abort",
        &read_store(dir.path(), port, "vol", size),
        &model,
        chunk,
    );
    store.stop();
}

/// A destination killed mid-pull and started again on the same cache
/// resumes from the chunks it has, and ends byte-exact.
#[test]
fn destination_restarted_mid_pull_resumes() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (64 * MIB, 256 * KIB);
    let img = dir.path().join("region.img");
    let mut src = start_source(
        dir.path(),
        "a",
        &format!("file:{}", img.display()),
        size,
        chunk,
    );
    let model = Arc::new(Mutex::new(fill(&src.sock, dir.path(), size, 41)));
    // A slow link and one pull stream (8 MiB, i.e. 32 chunks, per call),
    // so the kill lands mid-pull.
    let (_relay, rport) = relay(dir.path(), src.seed_port, "40ms");
    let from = format!("127.0.0.1:{rport}");
    let extra = [s("--pull-workers"), s(1)];
    let mut dst = start_leech(dir.path(), "b", &from, &extra);
    let w = start_writers(
        &src.sock,
        model.clone(),
        1,
        64 * KIB,
        42,
        Duration::from_millis(2),
    );
    let status = |ctl: &Path| {
        let out = Command::new(r3map_bin())
            .args(["migration-status", "--leech"])
            .arg(ctl)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let p = field(&status(&dst.ctl), "present");
        if p >= 8 {
            break p;
        }
        assert!(Instant::now() < deadline, "the pull made no progress");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(before < size / chunk, "pulled everything before the kill");
    kill9(&mut dst.proc);
    let mut dst = start_leech(dir.path(), "b", &from, &extra);
    let after = field(&status(&dst.ctl), "present");
    assert!(after >= before, "resumed with {after} chunks, had {before}");
    let log = strip_ansi(&read_log(&dst.log));
    assert!(log.contains("resumed=true"), "{log}");
    std::thread::sleep(Duration::from_millis(200));
    let out = finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    assert!(out.contains("complete"), "{out}");
    w.join();
    let model = model.lock().unwrap().clone();
    assert_same(
        "resumed destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    dst.proc.stop();
    src.proc.stop();
}

/// A log without its terminal colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A destination dropped without finalize or abort frees its mount: no
/// task keeps it (or its cache) alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_destination_frees_its_mount() {
    use r3map::migration::{leech, pb::seed_server::SeedServer, seed::SeedService, Leech, Source};
    use r3map::net;
    let dir = tmp();
    let mem: Arc<dyn r3map::Backend> =
        Arc::new(r3map::backend::memory::Memory::new(8 * MIB, 256 * KIB));
    let source = Source::open(mem, 256 * KIB, None, None).await.unwrap();
    let ep: net::Endpoint = dir
        .path()
        .join("seed.sock")
        .display()
        .to_string()
        .parse()
        .unwrap();
    let l = net::Listener::bind(&ep, None, None).await.unwrap();
    let router = net::server(None, net::Keepalive::MIGRATION)
        .unwrap()
        .add_service(SeedServer::new(SeedService::new(source.clone())));
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(l.serve(router, stop.clone().cancelled_owned()));
    let leech = Leech::start(leech::Config {
        pull_workers: 2,
        ..leech::Config::new(ep, dir.path().join("b.cache"))
    })
    .await
    .unwrap();
    assert!(source.status().session != 0, "the leech started tracking");
    let weak = Arc::downgrade(leech.managed());
    drop(leech);
    let deadline = Instant::now() + Duration::from_secs(10);
    while weak.upgrade().is_some() {
        assert!(
            Instant::now() < deadline,
            "the abandoned leech's mount is still alive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let _ = server.await;
}

// ---------------------------------------------------------------------------
// Iterative pre-copy (rounds) and the delta transfer from an older copy.

/// `r3map migration-status` as its `key=value` line.
fn status(ctl: &Path) -> String {
    let out = Command::new(r3map_bin())
        .args(["migration-status", "--leech"])
        .arg(ctl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `ok(status line)` holds.
fn wait_status(ctl: &Path, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = status(ctl);
        if ok(&o) {
            return o;
        }
        assert!(Instant::now() < deadline, "never {what}: {o}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One migration of a 32 MiB region (256 KiB chunks) under a paced writer
/// spread over the whole region, finalized a while after the first pass:
/// returns (dirty chunks handed over, rounds applied).
fn migrate_under_writer(dir: &Path, tag: &str, leech_args: &[&str]) -> (u64, u64) {
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let mut src = start_source(dir, &format!("{tag}-src"), "memory:", size, chunk);
    let model = Arc::new(Mutex::new(fill(&src.sock, dir, size, 7)));
    let args: Vec<String> = leech_args.iter().map(s).collect();
    let mut dst = start_leech(
        dir,
        &format!("{tag}-dst"),
        &format!("127.0.0.1:{}", src.seed_port),
        &args,
    );
    // One chunk-sized unit per write: each write dirties one chunk.
    let w = start_writers(
        &src.sock,
        model.clone(),
        1,
        chunk,
        8,
        Duration::from_millis(10),
    );
    wait_present(&dst.ctl, 1.0);
    w.wait_acked(20);
    // Long enough after the first pass for the writer to dirty a good part
    // of the region again.
    std::thread::sleep(Duration::from_millis(1500));
    let out = finalize_ok(&dst.ctl, &[]);
    let errs = w.join();
    assert_eq!(errs.len(), 1, "the writer ends on EIO at finalize");
    let done = finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    assert!(done.contains("complete"), "{done}");
    let model = model.lock().unwrap().clone();
    assert_same(
        &format!("{tag}: destination"),
        &read_export(&dst.sock, dir),
        &model,
        chunk,
    );
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
    assert!(src.proc.stop().success());
    (field(&out, "dirty_chunks"), field(&out, "rounds"))
}

#[test]
fn rounds_shrink_the_hand_over_under_a_continuous_writer() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (dirty_without, rounds_without) =
        migrate_under_writer(dir.path(), "norounds", &["--rounds", "0"]);
    let (dirty_with, rounds_with) =
        migrate_under_writer(dir.path(), "rounds", &["--settle", "50ms"]);
    println!(
        "under a paced writer: {dirty_without} dirty chunks handed over without rounds, \
         {dirty_with} with {rounds_with} rounds"
    );
    assert_eq!(rounds_without, 0);
    assert!(rounds_with >= 2, "{rounds_with} rounds");
    assert!(
        dirty_with * 3 < dirty_without,
        "rounds did not shorten the hand-over: {dirty_with} vs {dirty_without}"
    );
}

#[test]
fn hot_chunks_rewritten_during_their_rounds_arrive_byte_for_byte() {
    // Two writers hammer 4 chunks while the destination pulls them again
    // round after round, through a link with a round-trip time (so a
    // re-pull is in flight while the next write lands): a chunk written
    // after its round was taken must still be handed over.
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (16 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let model = Arc::new(Mutex::new(fill(&src.sock, dir.path(), size, 3)));
    let (_relay, port) = relay(dir.path(), src.seed_port, "4ms");
    let w = start_writers_in(
        &src.sock,
        model.clone(),
        0..MIB,
        2,
        64 * KIB,
        4,
        Duration::ZERO,
    );
    let mut dst = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{port}"),
        &[s("--settle"), s("10ms"), s("--rounds"), s("5")],
    );
    let st = wait_status(&dst.ctl, "3 rounds", |o| field(o, "rounds") >= 3);
    let out = finalize_ok(&dst.ctl, &[]);
    assert_eq!(w.join().len(), 2, "both writers end on EIO");
    finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    println!("hot chunks: {st} then {}", out.trim());
    let model = model.lock().unwrap().clone();
    assert_same(
        "destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
    assert!(src.proc.stop().success());
}

/// Starts `r3map leech` like [`start_leech`], with extra environment.
fn start_leech_env(
    dir: &Path,
    tag: &str,
    from: &str,
    extra: &[String],
    env: &[(&str, &str)],
) -> Dest {
    let sock = dir.join(format!("{tag}.sock"));
    let ctl = dir.join(format!("{tag}.ctl"));
    let log = dir.join(format!("{tag}.log"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&ctl);
    let mut args = vec![
        s("leech"),
        s("--from"),
        s(from),
        s("--cache"),
        s(dir.join(format!("{tag}.cache")).display()),
        s("--socket"),
        s(sock.display()),
        s("--control"),
        s(ctl.display()),
    ];
    args.extend_from_slice(extra);
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let child = Command::new(r3map_bin())
        .args(&args)
        .envs(env.iter().copied())
        .env("R3MAP_LOG", "info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut proc = Proc {
        child,
        name: "r3map leech".into(),
    };
    wait_until("the leech", &mut proc, &log, || {
        UnixStream::connect(&sock).is_ok() && UnixStream::connect(&ctl).is_ok()
    });
    Dest {
        proc,
        sock,
        ctl,
        log,
        seed_port: None,
    }
}

#[test]
fn destination_crashed_between_a_round_and_its_record_resumes() {
    // The seed answered round 2 and forgot those chunks; the destination
    // dies before marking them missing (failpoint: abort right there). It
    // restarts without rounds and finalizes: the seed must fold round 2
    // into the hand-over, or those chunks stay stale.
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let model = Arc::new(Mutex::new(fill(&src.sock, dir.path(), size, 5)));
    let w = start_writers(
        &src.sock,
        model.clone(),
        1,
        chunk,
        6,
        Duration::from_millis(2),
    );
    w.wait_acked(10);
    let from = format!("127.0.0.1:{}", src.seed_port);
    let mut dst = start_leech_env(
        dir.path(),
        "b",
        &from,
        &[s("--settle"), s("50ms")],
        &[("R3MAP_FAILPOINT", "leech-crash-after-dirty:2")],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        if let Some(st) = dst.proc.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the failpoint never fired");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success(), "the leech aborted at the failpoint ({st})");
    assert!(
        read_log(&dst.log).contains("failpoint"),
        "{}",
        read_log(&dst.log)
    );
    // Resumed on the same cache, no rounds: finalize right away.
    let mut dst = start_leech_env(dir.path(), "b", &from, &[s("--rounds"), s("0")], &[]);
    // Resumed (not started over): the record's last applied round is 1.
    assert_eq!(field(&status(&dst.ctl), "rounds"), 1);
    wait_present(&dst.ctl, 1.0);
    let out = finalize_ok(&dst.ctl, &[]);
    assert_eq!(field(&out, "rounds"), 1, "round 2 was never applied: {out}");
    assert_eq!(w.join().len(), 1, "the writer ends on EIO");
    finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    let model = model.lock().unwrap().clone();
    assert_same(
        "destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
    assert!(src.proc.stop().success());
}

#[test]
fn destination_killed_mid_rounds_resumes() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let model = Arc::new(Mutex::new(fill(&src.sock, dir.path(), size, 9)));
    let w = start_writers(&src.sock, model.clone(), 2, 64 * KIB, 10, Duration::ZERO);
    let from = format!("127.0.0.1:{}", src.seed_port);
    let mut dst = start_leech(dir.path(), "b", &from, &[s("--settle"), s("5ms")]);
    wait_status(&dst.ctl, "2 rounds", |o| field(o, "rounds") >= 2);
    kill9(&mut dst.proc);
    let mut dst = start_leech_env(dir.path(), "b", &from, &[s("--settle"), s("5ms")], &[]);
    wait_status(&dst.ctl, "another round", |o| field(o, "rounds") >= 3);
    let out = finalize_ok(&dst.ctl, &[]);
    assert_eq!(w.join().len(), 2, "both writers end on EIO");
    finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    println!("killed mid-rounds, resumed: {}", out.trim());
    let model = model.lock().unwrap().clone();
    assert_same(
        "destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
    assert!(src.proc.stop().success());
}

#[test]
fn older_copy_transfers_only_changed_chunks_and_a_corrupt_one() {
    // The volume leaves node A for node B and comes back: A still holds
    // its cache from before. Only what B changed (and a chunk of A's copy
    // that rotted meanwhile) crosses the link again.
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (32 * MIB, 256 * KIB);
    let n = size / chunk;
    let mut s0 = start_source(dir.path(), "s", "memory:", size, chunk);
    fill(&s0.sock, dir.path(), size, 21);
    // S -> A, then A -> B (A serves Seed: it is a source for the next hop).
    let pa = free_port();
    let mut a = start_leech(
        dir.path(),
        "a",
        &format!("127.0.0.1:{}", s0.seed_port),
        &[s("--seed-listen"), format!("127.0.0.1:{pa}")],
    );
    finalize_ok(&a.ctl, &["--wait", "--timeout", "120s"]);
    assert!(s0.proc.stop().success());
    let pb = free_port();
    let mut b = start_leech(
        dir.path(),
        "b",
        &format!("127.0.0.1:{pa}"),
        &[s("--seed-listen"), format!("127.0.0.1:{pb}")],
    );
    finalize_ok(&b.ctl, &["--wait", "--timeout", "120s"]);
    assert!(a.proc.stop().success(), "{}", read_log(&a.log));
    // B changes 10 whole chunks.
    let mut rng = SmallRng::seed_from_u64(22);
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < 10 {
        changed.insert(rng.gen_range(0..n));
    }
    let mut c = nbd_connect(&b.sock);
    for &i in &changed {
        c.seek(SeekFrom::Start(i * chunk)).unwrap();
        c.write_all(&random_bytes(100 + i, chunk)).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    // A's copy rots in one byte of a chunk B left alone.
    let rotten = (0..n).find(|i| !changed.contains(i) && *i > 3).unwrap();
    let a_cache = dir.path().join("a.cache");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&a_cache)
            .unwrap();
        let mut byte = [0u8; 1];
        let at = rotten * chunk + 1234;
        f.read_exact_at(&mut byte, at).unwrap();
        byte[0] ^= 0x5a;
        f.write_all_at(&byte, at).unwrap();
    }
    // B -> A again, A reusing its cache in place.
    let mut a2 = start_leech(
        dir.path(),
        "a",
        &format!("127.0.0.1:{pb}"),
        &[s("--reuse"), s(a_cache.display())],
    );
    let done = finalize_ok(&a2.ctl, &["--converged", "--wait", "--timeout", "120s"]);
    let pulled = field(&done, "bytes_pulled");
    let reused = field(&done, "reused");
    println!(
        "older copy: {reused} chunks reused, {pulled} bytes pulled ({} chunks changed + 1 rotten)",
        changed.len()
    );
    assert_eq!(
        pulled,
        (changed.len() as u64 + 1) * chunk,
        "only the changed and the rotten chunks are pulled"
    );
    assert_eq!(reused, n - changed.len() as u64 - 1);
    let want = read_export(&b.sock, dir.path());
    assert_same(
        "destination with an older copy",
        &read_export(&a2.sock, dir.path()),
        &want,
        chunk,
    );
    assert!(a2.proc.stop().success(), "{}", read_log(&a2.log));
    assert!(b.proc.stop().success(), "{}", read_log(&b.log));
}

/// Finalize releases the destination before the hand-over's record is
/// durable (the commit is delayed here by a failpoint): a read waiting on
/// the held export is answered at once, but a flush issued after it is
/// acknowledged only once the record is committed.
#[test]
fn finalize_releases_before_its_record_is_durable_but_flushes_wait_for_it() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (8 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let mut model = fill(&src.sock, dir.path(), size, 11);
    let from = format!("127.0.0.1:{}", src.seed_port);
    let delay = Duration::from_millis(1500);
    let mut dst = start_leech_env(
        dir.path(),
        "b",
        &from,
        &[],
        &[("R3MAP_FAILPOINT", "leech-commit-delay:1500")],
    );
    wait_present(&dst.ctl, 1.0);
    let held = held_read(&dst.sock, 0, 4096);
    std::thread::sleep(Duration::from_millis(100));
    let ctl = dst.ctl.clone();
    let fin = std::thread::spawn(move || {
        let out = finalize_ok(&ctl, &[]);
        (Instant::now(), out)
    });
    let t0 = Instant::now();
    let (t_read, r) = held.join().unwrap();
    assert_eq!(r.unwrap(), model[..4096], "the held read's bytes");
    assert!(
        t_read - t0 < delay / 2,
        "the held read waited {:?}: released only after the record",
        t_read - t0
    );
    let data = random_bytes(12, 64 * KIB);
    let sock = dst.sock.clone();
    let (d2, off) = (data.clone(), 3 * chunk + 100);
    let flusher = std::thread::spawn(move || {
        let r = write_flush(&sock, off, &d2);
        (Instant::now(), r)
    });
    let (t_fin, out) = fin.join().unwrap();
    let (t_flush, r) = flusher.join().unwrap();
    r.unwrap();
    assert!(
        t_flush - t_read >= delay * 2 / 3,
        "the flush was acknowledged {:?} after the release, before the record was durable ({out})",
        t_flush - t_read
    );
    assert!(
        t_fin - t0 >= delay * 2 / 3,
        "finalize returned early: {out}"
    );
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    assert_same(
        "destination",
        &read_export(&dst.sock, dir.path()),
        &model,
        chunk,
    );
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
    assert!(src.proc.stop().success());
}

/// The destination dies after finalize released it and before the record
/// is committed, with a write and a flush of the application in between:
/// the flush must not have been acknowledged, and the destination started
/// again on the same cache finalizes again (the seed repeats its answer)
/// into a byte-exact copy (the unflushed write may be there or not).
#[test]
fn destination_crashed_after_release_before_its_record_finalizes_again() {
    require("nbdcopy");
    let _g = serial();
    let dir = tmp();
    let (size, chunk) = (8 * MIB, 256 * KIB);
    let mut src = start_source(dir.path(), "a", "memory:", size, chunk);
    let model = fill(&src.sock, dir.path(), size, 13);
    let from = format!("127.0.0.1:{}", src.seed_port);
    let mut dst = start_leech_env(
        dir.path(),
        "b",
        &from,
        &[],
        &[(
            "R3MAP_FAILPOINT",
            "leech-commit-delay:700,leech-crash-before-commit:1",
        )],
    );
    wait_present(&dst.ctl, 1.0);
    let held = held_read(&dst.sock, 0, 4096);
    std::thread::sleep(Duration::from_millis(100));
    let ctl = dst.ctl.clone();
    let fin = std::thread::spawn(move || finalize(&ctl, &[]));
    let (_, r) = held.join().unwrap();
    assert_eq!(r.unwrap(), model[..4096]);
    let data = random_bytes(14, 64 * KIB);
    let off = 5 * chunk;
    let flushed = write_flush(&dst.sock, off, &data);
    assert!(
        flushed.is_err(),
        "a flush was acknowledged before the finalized record was durable, and the destination then crashed"
    );
    let out = fin.join().unwrap();
    assert!(
        !out.status.success(),
        "finalize answered although the leech died"
    );
    let st = dst.proc.child.wait().unwrap();
    assert!(!st.success(), "the leech aborted at the failpoint ({st})");
    let mut dst = start_leech_env(dir.path(), "b", &from, &[], &[]);
    finalize_ok(&dst.ctl, &["--wait", "--timeout", "120s"]);
    let got = read_export(&dst.sock, dir.path());
    let r = off as usize..off as usize + data.len();
    assert!(
        got[r.clone()] == model[r.clone()] || got[r.clone()] == data[..],
        "the unflushed write's range holds neither version"
    );
    let mut want = model.clone();
    want[r.clone()].copy_from_slice(&got[r]);
    assert_same("destination", &got, &want, chunk);
    assert!(dst.proc.stop().success(), "{}", read_log(&dst.log));
    assert!(src.proc.stop().success());
}
