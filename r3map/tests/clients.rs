//! `r3map serve` driven by real NBD clients written by others (libnbd's
//! nbdinfo/nbdcopy, qemu-img, fio's nbd engine, the `nbd` crate), the way
//! users would drive it.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, require, run, serve, sock, tmp, Addr, Proc, RedisServer};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

/// `n` pseudo-random bytes: incompressible and without zero runs, so no
/// client can take a sparse shortcut.
fn random_bytes(seed: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Compares two files byte for byte without dumping 256 MiB into the log.
fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i} ({:#x} vs {:#x})",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}

/// The raw text of a scalar field of nbdinfo's (or fio's) JSON output:
/// enough to read flags and sizes without a JSON dependency.
fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\"");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in:\n{json}"));
    let rest = json[at + pat.len()..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .expect("colon after key")
        .trim_start();
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// nbdcopy SRC DST, with extra arguments, failing the test on error.
fn nbdcopy(extra: &[&str], src: &str, dst: &str) {
    run(Command::new("nbdcopy").args(extra).arg(src).arg(dst));
}

/// Writes `size` random bytes into the export through nbdcopy and copies
/// them back out to another file; both copies must be equal.
fn nbdcopy_round_trip(addr: &Addr, size: u64, seed: u64, in_args: &[&str], out_args: &[&str]) {
    require("nbdcopy");
    let dir = tmp();
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    std::fs::write(&src, random_bytes(seed, size)).unwrap();
    nbdcopy(in_args, src.to_str().unwrap(), &addr.uri());
    nbdcopy(out_args, &addr.uri(), dst.to_str().unwrap());
    assert_same_file(&src, &dst);
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    require("nbdinfo");
    let dir = tmp();
    let addr = Addr::Unix(sock(dir.path()));
    let _srv = serve(&addr, &["--backend", "memory:", "--size", "48MiB"]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(addr.uri()));
    assert_eq!(json_field(&out, "export-size"), (48 * MIB).to_string());
    assert_eq!(json_field(&out, "export-name"), "\"r3map\"");
    for (flag, want) in [
        ("is_read_only", "false"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_trim", "true"),
        ("can_zero", "true"),
        ("can_multi_conn", "true"),
    ] {
        assert_eq!(json_field(&out, flag), want, "{flag} in:\n{out}");
    }
    assert_eq!(json_field(&out, "block_size_minimum"), "1");
    assert_eq!(json_field(&out, "block_size_preferred"), "4096");
    assert_eq!(
        json_field(&out, "block_size_maximum"),
        (32 * MIB).to_string()
    );

    // The default (empty) export name reaches the same export.
    let path = sock(dir.path());
    let out = run(Command::new("nbdinfo")
        .arg("--json")
        .arg(format!("nbd+unix:///?socket={}", path.display())));
    assert_eq!(json_field(&out, "export-size"), (48 * MIB).to_string());
}

#[test]
fn read_only_export_is_reported_and_refuses_writes() {
    require("nbdinfo");
    require("nbdcopy");
    let dir = tmp();
    let addr = Addr::Tcp(free_port());
    let img = dir.path().join("ro.img");
    std::fs::write(&img, random_bytes(7, 8 * MIB)).unwrap();
    let backend = format!("file:{}", img.display());
    let _srv = serve(
        &addr,
        &["--backend", &backend, "--size", "8MiB", "--read-only"],
    );

    let out = run(Command::new("nbdinfo").arg("--json").arg(addr.uri()));
    assert_eq!(json_field(&out, "is_read_only"), "true", "{out}");
    assert_eq!(json_field(&out, "can_trim"), "false", "{out}");
    assert_eq!(json_field(&out, "can_zero"), "false", "{out}");
    assert_eq!(json_field(&out, "export-size"), (8 * MIB).to_string());

    // Writing must fail, and the backing file must be untouched.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, random_bytes(8, 8 * MIB)).unwrap();
    let st = Command::new("nbdcopy")
        .arg(&other)
        .arg(addr.uri())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "nbdcopy into a read-only export succeeded");
    assert!(
        std::fs::read(&img).unwrap() == random_bytes(7, 8 * MIB),
        "read-only file changed"
    );

    // Reading still works.
    let back = dir.path().join("back.bin");
    nbdcopy(&[], &addr.uri(), back.to_str().unwrap());
    assert_same_file(&img, &back);
}

#[test]
fn nbdcopy_256mib_memory_over_unix_socket() {
    let dir = tmp();
    let addr = Addr::Unix(sock(dir.path()));
    let _srv = serve(&addr, &["--backend", "memory:", "--size", "256MiB"]);
    // In with one connection, out with four (the server advertises multi-conn).
    nbdcopy_round_trip(
        &addr,
        256 * MIB,
        1,
        &["--connections=1"],
        &["--connections=4"],
    );
}

#[test]
fn nbdcopy_256mib_file_over_tcp() {
    let dir = tmp();
    let img = dir.path().join("disk.img");
    let addr = Addr::Tcp(free_port());
    let backend = format!("file:{}", img.display());
    let mut srv = serve(&addr, &["--backend", &backend, "--size", "256MiB"]);
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    std::fs::write(&src, random_bytes(2, 256 * MIB)).unwrap();
    nbdcopy(&["--connections=4"], src.to_str().unwrap(), &addr.uri());
    nbdcopy(&["--connections=1"], &addr.uri(), dst.to_str().unwrap());
    assert_same_file(&src, &dst);
    assert!(srv.stop().success(), "r3map serve did not exit cleanly");
    // The backend is the file itself.
    assert_same_file(&src, &img);
}

#[test]
fn nbdcopy_round_trip_dir_backend() {
    let dir = tmp();
    let chunks = dir.path().join("chunks");
    let addr = Addr::Unix(sock(dir.path()));
    let backend = format!("dir:{}", chunks.display());
    let _srv = serve(
        &addr,
        &[
            "--backend",
            &backend,
            "--size",
            "64MiB",
            "--chunk-size",
            "1MiB",
        ],
    );
    nbdcopy_round_trip(&addr, 64 * MIB, 3, &["--connections=4"], &[]);
    assert!(
        std::fs::read_dir(&chunks).unwrap().count() > 0,
        "no chunk files in {}",
        chunks.display()
    );
}

#[test]
fn nbdcopy_round_trip_redis_backend() {
    let redis = RedisServer::start();
    let addr = Addr::Tcp(free_port());
    let backend = format!("{}?prefix=t1", redis.url(0));
    let _srv = serve(&addr, &["--backend", &backend, "--size", "64MiB"]);
    nbdcopy_round_trip(
        &addr,
        64 * MIB,
        4,
        &["--connections=4"],
        &["--connections=2"],
    );
}

#[test]
fn nbdcopy_round_trip_s3_backend() {
    let s3 = common::S3Server::start();
    let addr = Addr::Tcp(free_port());
    let backend = s3.uri(common::S3_BUCKET, "nbdcopy");
    let _srv = serve(&addr, &["--backend", &backend, "--size", "32MiB"]);
    nbdcopy_round_trip(
        &addr,
        32 * MIB,
        5,
        &["--connections=4"],
        &["--connections=2"],
    );
}

#[test]
fn qemu_img_compare_sees_equal_and_detects_difference() {
    require("qemu-img");
    let dir = tmp();
    let addr = Addr::Unix(sock(dir.path()));
    let img = dir.path().join("disk.img");
    let backend = format!("file:{}", img.display());
    let _srv = serve(&addr, &["--backend", &backend, "--size", "64MiB"]);
    let local = dir.path().join("local.img");
    std::fs::write(&local, random_bytes(5, 64 * MIB)).unwrap();

    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&local)
        .arg(addr.uri()));
    let compare = || {
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(addr.uri())
            .arg(&local)
            .output()
            .unwrap()
    };
    let out = compare();
    assert!(
        out.status.success(),
        "qemu-img compare found a difference: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // One flipped byte in the local copy must be found, at its offset.
    let flip_at = 40 * MIB + 12345;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&local)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(flip_at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(flip_at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
    drop(f);
    let out = compare();
    // Exit status 1 means "images differ" (2 would be an error).
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare missed a flipped byte"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&(flip_at & !511).to_string()) || text.contains(&flip_at.to_string()),
        "qemu-img compare reported another offset: {text}"
    );
}

/// Runs fio's nbd engine: random writes then a crc32c verify pass, and
/// checks it wrote and verified every byte without error.
fn fio_verify(uri: &str, size: u64, bs_args: &[&str]) {
    require("fio");
    let out = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=json",
            // No verify-state file left in the working directory.
            "--verify_state_save=0",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--size={size}"))
        .args(bs_args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {bs_args:?} on {uri} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // fio prints "connected to NBD server" before its JSON.
    let json = &stdout[stdout.find('{').expect("fio printed no JSON")..];
    assert_eq!(json_field(json, "error"), "0", "fio job error:\n{json}");
    let read = &json[json.find("\"read\" :").expect("read stats")..];
    let write = &json[json.find("\"write\" :").expect("write stats")..];
    // Writing every byte once, then reading every byte back to verify it.
    assert_eq!(json_field(write, "io_bytes"), size.to_string(), "{json}");
    assert_eq!(json_field(read, "io_bytes"), size.to_string(), "{json}");
    assert!(!json.contains("verify failed"), "{json}");
}

fn fio_all_ways(backend: &str, size: &str, bytes: u64) {
    let dir = tmp();
    let unix = Addr::Unix(sock(dir.path()));
    let tcp = Addr::Tcp(free_port());
    let _u = serve(&unix, &["--backend", backend, "--size", size]);
    // Only the memory backend can be served twice at once; files get one server each.
    let backend2 = backend.replace("disk.img", "disk2.img");
    let _t = serve(&tcp, &["--backend", &backend2, "--size", size]);
    for addr in [&unix, &tcp] {
        fio_verify(&addr.uri(), bytes, &["--bs=4k"]);
        fio_verify(&addr.uri(), bytes, &["--bssplit=512/10:4k/40:64k/30:1m/20"]);
    }
}

#[test]
fn fio_verify_memory_backend() {
    fio_all_ways("memory:", "64MiB", 64 * MIB);
}

#[test]
fn fio_verify_file_backend() {
    let dir = tmp();
    let backend = format!("file:{}", dir.path().join("disk.img").display());
    fio_all_ways(&backend, "64MiB", 64 * MIB);
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let dir = tmp();
    let img = dir.path().join("disk.img");
    let addr = Addr::Unix(sock(dir.path()));
    let backend = format!("file:{}", img.display());
    let mut srv = serve(&addr, &["--backend", &backend, "--size", "16MiB"]);
    let data = random_bytes(9, 8 * MIB);

    // Writes without any flush, over a connection still open at SIGTERM.
    let mut s = std::os::unix::net::UnixStream::connect(sock(dir.path())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let export = nbd::client::handshake(&mut s, b"r3map").unwrap();
    assert_eq!(export.size, 16 * MIB);
    let mut c = nbd::client::NbdClient::new(&mut s, &export);
    c.seek(SeekFrom::Start(4 * MIB)).unwrap();
    for chunk in data.chunks(MIB as usize) {
        c.write_all(chunk).unwrap();
    }

    let t0 = Instant::now();
    let st = srv.stop();
    assert!(st.success(), "r3map serve exited with {st} on SIGTERM");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t0.elapsed()
    );
    assert!(!sock(dir.path()).exists(), "socket file left behind");
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(on_disk.len() as u64, 16 * MIB);
    assert!(
        on_disk[4 * MIB as usize..12 * MIB as usize] == data[..],
        "written data not in the file"
    );
    assert!(
        on_disk[..4 * MIB as usize].iter().all(|&b| b == 0),
        "bytes before the write changed"
    );
}

#[test]
fn fd_transport_serves_an_inherited_socket() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut cmd = Command::new(common::r3map_bin());
    cmd.args([
        "serve",
        "--backend",
        "memory:",
        "--size",
        "8MiB",
        "--fd",
        "3",
    ])
    .env("R3MAP_LOG", "warn")
    .stdout(Stdio::null());
    // SAFETY: dup2/fcntl are async-signal-safe; they run in the child between fork
    // and exec, and leaves fd 3 without CLOEXEC so the server inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself keeps CLOEXEC: clear it by hand.
                use nix::fcntl::{fcntl, FcntlArg, FdFlag};
                fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
            } else {
                nix::unistd::dup2(fd, 3).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut srv = Proc {
        child: cmd.spawn().expect("spawn r3map serve --fd 3"),
        name: "r3map serve --fd".into(),
    };
    drop(theirs); // only the server holds that end now

    let mut s = ours;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let export = nbd::client::handshake(&mut s, b"r3map").unwrap();
    assert_eq!(export.size, 8 * MIB);
    assert!(!export.readonly);
    let data = random_bytes(11, 3 * MIB);
    {
        let mut c = nbd::client::NbdClient::new(&mut s, &export);
        c.seek(SeekFrom::Start(MIB + 512)).unwrap();
        for chunk in data.chunks(256 << 10) {
            c.write_all(chunk).unwrap();
        }
        c.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        c.seek(SeekFrom::Start(MIB + 512)).unwrap();
        c.read_exact(&mut back).unwrap();
        assert!(back == data, "read back differs from what was written");
        let mut head = vec![0xffu8; 4096];
        c.seek(SeekFrom::Start(0)).unwrap();
        c.read_exact(&mut head).unwrap();
        assert!(head.iter().all(|&b| b == 0), "unwritten bytes are not zero");
    }
    // When its one connection ends, the server flushes and exits on its own.
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(15);
    let st = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "r3map serve --fd did not exit after its connection closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "r3map serve --fd exited with {st}");
}

/// A `memory:` export served in-process (no migration wrapper), so READ
/// replies go out as slices of the backend's chunks: nbdcopy (structured
/// replies) and a raw client (simple replies, pipelined 32 MiB reads of
/// 4 KiB chunks: 8,192 pieces a reply, more than one writev takes) get
/// exactly the bytes written, holes as zeros.
#[test]
fn memory_reads_as_lent_pieces() {
    use r3map::backend::{memory::Memory, Backend};
    use r3map::nbd::{Export, Server};
    use std::sync::Arc;
    require("nbdcopy");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let size = 64 * MIB;
    let mem = Arc::new(Memory::new(size, 4096));
    let mut model = vec![0u8; size as usize];
    let data = random_bytes(77, 5 * MIB);
    model[(MIB + 100) as usize..(6 * MIB + 100) as usize].copy_from_slice(&data);
    model[(40 * MIB) as usize..(40 * MIB + 3) as usize].copy_from_slice(&[1, 2, 3]);
    rt.block_on(async {
        mem.write_at(MIB + 100, &data).await.unwrap();
        mem.write_at(40 * MIB, &[1, 2, 3]).await.unwrap();
    });
    assert!(mem.lends_pieces());
    let srv = Server::single(Export::new("r3map", mem.clone()));
    let listener = rt
        .block_on(r3map::nbd::server::bind_tcp("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let s2 = srv.clone();
    rt.spawn(async move { s2.listen_tcp(listener).await });

    let dir = tmp();
    let out = dir.path().join("out.img");
    run(Command::new("nbdcopy").args([
        &format!("nbd://127.0.0.1:{port}/r3map"),
        out.to_str().unwrap(),
    ]));
    let got = std::fs::read(&out).unwrap();
    assert!(got == model, "nbdcopy read back other bytes");

    rt.block_on(async {
        use common::raw::RawClient;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let s3 = srv.clone();
        let conn = tokio::spawn(async move { s3.serve_transmission(a, "r3map").await });
        let mut c = RawClient::new(b);
        let max = 32 * MIB as u32;
        for (cookie, off) in [(1u64, 0u64), (2, 7), (3, 32 * MIB - 5)] {
            c.read(cookie, off, max).await;
        }
        for _ in 0..3 {
            let r = c.reply().await;
            assert_eq!(r.error, 0);
            let off = [0, 7, 32 * MIB - 5][r.cookie as usize - 1] as usize;
            assert!(
                r.data[..] == model[off..off + max as usize],
                "read {} returned other bytes",
                r.cookie
            );
        }
        drop(c);
        conn.await.unwrap().unwrap();
    });
    srv.shutdown();
}
