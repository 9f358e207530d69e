//! The real Linux kernel NBD client against `r3map serve`.
//!
//! The host kernel has no nbd.ko and loads no modules, so a small qemu guest
//! (Debian's 6.1 kernel, busybox, nbd-client; built by e2e/guest/prepare.sh)
//! connects /dev/nbd0 to the server through qemu's user network, writes with
//! O_DIRECT, mmap+msync, buffered+fsync (FLUSH), and over two connections,
//! then reconnects and reads it all back. This test then checks every byte
//! of the backing file on the host against the same pattern generator.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{serve, Addr};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// What the guest's /init writes: (offset, length, seed offset from the
/// per-run seed). Must match e2e/guest/init.
const REGIONS: &[(&str, u64, u64, u64)] = &[
    ("R1 O_DIRECT dd", MIB, MIB, 1),
    ("R2 O_DIRECT 512-byte sectors", 30 * MIB + 512, 1536, 2),
    ("R3 mmap+msync", 8 * MIB + 12288, 3 * MIB + 8192, 3),
    ("R4 buffered+fsync", 20 * MIB, 256 * 1024, 4),
    ("R5 mmap+msync, 2 connections", 40 * MIB, 2 * MIB, 5),
    ("R6 O_DIRECT, 2 connections", 48 * MIB, 2 * MIB, 6),
    ("R7 last 4 KiB", SIZE - 4096, 4096, 7),
];

/// Budget for the guest (qemu's own timeout) and for the whole run; TCG is slow.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// The murmur3 64-bit finalizer, as in e2e/guest/mmapcheck.c.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ceb9fe1a85ec53);
    k ^= k >> 33;
    k
}

/// The byte the guest writes at device offset `off` (mmapcheck.c's `pat`).
fn pat(off: u64, seed: u64) -> u8 {
    let w = fmix64((off >> 3).wrapping_add(seed.wrapping_mul(0x9E3779B97F4A7C15)));
    (w >> ((off & 7) * 8)) as u8
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds (or reuses) the guest kernel and initramfs; returns their directory.
fn prepare() -> PathBuf {
    let script = root().join("e2e/guest/prepare.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): the kernel e2e test needs it\nstdout: {}\nstderr: {}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The guest helper and this file must agree on the pattern, or a failure
/// later would be hard to read: run the (static) helper on the host.
fn check_generator_matches(guest_dir: &std::path::Path) {
    let (off, len, seed) = (8 * MIB + 12288 - 5, 70_001u64, 123_456_789u64);
    let out = Command::new(guest_dir.join("mmapcheck"))
        .args(["gen", &off.to_string(), &len.to_string(), &seed.to_string()])
        .output()
        .expect("run mmapcheck gen on the host");
    assert!(out.status.success(), "mmapcheck gen failed: {out:?}");
    let out = out.stdout;
    assert_eq!(out.len() as u64, len);
    for (i, b) in out.iter().enumerate() {
        assert_eq!(
            *b,
            pat(off + i as u64, seed),
            "mmapcheck and kernel.rs disagree at {}",
            off + i as u64
        );
    }
}

/// Boots the guest against `port`; returns (exit success, console).
fn boot_guest(port: u16, seed: u64) -> (bool, String) {
    let mut child = Command::new("bash")
        .arg(root().join("e2e/guest/run.sh"))
        .arg(port.to_string())
        .arg(seed.to_string())
        .env("R3MAP_GUEST_TIMEOUT", GUEST_TIMEOUT.as_secs().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so a timeout can end qemu along with run.sh.
        .process_group(0)
        .spawn()
        .expect("spawn e2e/guest/run.sh");
    let console = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|r| {
        let console = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                console.lock().unwrap().push_str(&line);
                console.lock().unwrap().push('\n');
            }
        })
    })
    .collect();
    let deadline = Instant::now() + GUEST_TIMEOUT + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        let _ = r.join();
    }
    let console = console.lock().unwrap().clone();
    (status.is_some_and(|s| s.success()), console)
}

#[test]
fn kernel_nbd_client_writes_land_in_the_backing_file() {
    let t0 = Instant::now();
    common::require("qemu-system-x86_64");
    let guest_dir = prepare();
    let t_prepared = t0.elapsed();
    check_generator_matches(&guest_dir);

    let dir = common::tmp();
    let disk = dir.path().join("disk.img");
    let port = common::free_port();
    // A fresh seed each run: stale data from an earlier run cannot pass.
    let seed = u64::from(rand::random::<u32>() >> 2) + 1;
    let mut server = serve(
        &Addr::Tcp(port),
        &[
            "--backend",
            &format!("file:{}", disk.display()),
            "--size",
            "64MiB",
        ],
    );

    let t_boot = Instant::now();
    let (ok, console) = boot_guest(port, seed);
    let guest_time = t_boot.elapsed();
    let passed = console.lines().any(|l| l.trim() == "R3MAP-GUEST: PASS");
    assert!(
        ok && passed && !console.contains("R3MAP-GUEST: FAIL"),
        "the guest did not pass (run.sh ok: {ok}); guest console:\n{console}"
    );

    // SIGTERM: the server must flush and exit 0.
    let st = server.stop();
    assert!(
        st.success(),
        "r3map serve exited with {st} after SIGTERM; guest console:\n{console}"
    );

    let got = std::fs::read(&disk).expect("read the backing file");
    assert_eq!(got.len() as u64, SIZE, "backing file size");
    let mut want = vec![0u8; SIZE as usize];
    for &(_, off, len, s) in REGIONS {
        for o in off..off + len {
            want[o as usize] = pat(o, seed + s);
        }
    }
    if let Some(bad) = (0..got.len()).find(|&i| got[i] != want[i]) {
        let bad = bad as u64;
        let region = REGIONS
            .iter()
            .find(|r| (r.1..r.1 + r.2).contains(&bad))
            .map_or("outside every written region (want zero)", |r| r.0);
        let wrong = (0..got.len()).filter(|&i| got[i] != want[i]).count();
        panic!(
            "backing file differs at offset {bad} ({region}): got {:#04x}, want {:#04x}; \
             {wrong} bytes differ in all (seed {seed}); guest console:\n{console}",
            got[bad as usize], want[bad as usize]
        );
    }

    let booted = console
        .lines()
        .find_map(|l| l.split("R3MAP-GUEST: booted at ").nth(1))
        .unwrap_or("?");
    eprintln!(
        "kernel e2e: prepare {:.1}s, guest kernel reached /init at {booted} (guest uptime), \
         guest run {:.1}s, total {:.1}s; {} regions verified byte for byte",
        t_prepared.as_secs_f64(),
        guest_time.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        REGIONS.len()
    );
}
