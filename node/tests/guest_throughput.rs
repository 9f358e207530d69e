//! Informational numbers for issue 7: how long the node plugin's NodeStage
//! takes until /dev/nbdN is ready, and mmap throughput through that device,
//! beside `nbdkit memory` attached through the same kernel NBD client.
//!
//! Boots the e2e qemu guest with `r3map_scenario=throughput`
//! (e2e/guest/throughput.sh): the region service (`r3map backend`, TLS and
//! a token) runs here on the host as in guest_csi.rs; in the guest
//! `r3map-csi-node` stages and publishes a volume, then nbdkit's memory
//! plugin is served on a unix socket and attached by `nbd-client`. On each
//! device `mmapcheck mbench` times an mmap write + msync(MS_SYNC) and, after
//! dropping the caches, an mmap read of the same bytes.
//!
//! Under TCG the numbers say little about real hardware, so nothing here
//! asserts on them beyond "measured and positive": the test fails only if
//! a path did not run, a byte did not read back (in the guest with
//! O_DIRECT, and for r3map in the region here), or a number is missing. It
//! prints the markdown table docs/benchmarks.md quotes. Without qemu,
//! nbdkit or its memory plugin it fails and says what is missing.

mod support;

use support::{credentials, finding, pat, prepare, require, root, RegionService};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// qemu's own timeout; the scenario takes well under a minute under TCG.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The region, the same size as the nbdkit disk (throughput.sh SIZE).
const SIZE: u64 = 64 << 20;
/// Benchmarked bytes at offset 0; mirrored in throughput.sh (LEN, seeds
/// r3map_seed + 31 for r3map).
const LEN: u64 = 32 << 20;

/// nbdkit's memory plugin, which nbdkit dlopens: ldd of nbdkit does not
/// list it, so prepare.sh copies it (and its libraries) explicitly.
fn nbdkit_memory_plugin() -> PathBuf {
    let out = Command::new("nbdkit")
        .arg("--dump-config")
        .output()
        .expect("run nbdkit --dump-config");
    assert!(out.status.success(), "nbdkit --dump-config failed");
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("plugindir=").map(str::to_owned))
        .expect("no plugindir in nbdkit --dump-config");
    let p = Path::new(&dir).join("nbdkit-memory-plugin.so");
    assert!(
        p.is_file(),
        "{} is missing: run 'bash .ci/install-deps' (as root)",
        p.display()
    );
    p
}

fn which(tool: &str) -> PathBuf {
    require(tool);
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap()
}

/// A positive number from the FINDING `key`.
fn seconds(console: &str, key: &str) -> f64 {
    let v: f64 = finding(console, key)
        .unwrap_or_else(|| panic!("finding {key} missing; console:\n{console}"))
        .parse()
        .unwrap_or_else(|e| panic!("finding {key}: {e}"));
    assert!(v > 0.0, "{key}={v}: not measured; console:\n{console}");
    v
}

#[test]
fn stage_to_ready_and_mmap_throughput_beside_nbdkit_memory() {
    require("qemu-system-x86_64");
    let nbdkit = which("nbdkit");
    let plugin = nbdkit_memory_plugin();
    // Its own credentials and image: the other guest tests may run at the
    // same time.
    let cache = root().join("e2e/.cache/throughput");
    std::fs::create_dir_all(&cache).unwrap();
    let (ca, cert, key, token) = credentials(&cache);

    let svc = RegionService::start(&ca, &cert, &key, &token);
    let vol = svc.create("tp", SIZE);

    prepare(
        "initramfs-throughput.gz",
        &[
            Path::new(env!("CARGO_BIN_EXE_r3map-csi-node")),
            Path::new(env!("CARGO_BIN_EXE_r3map-csi-call")),
            &nbdkit,
        ],
        &[&plugin],
        &[&ca, &token],
    );
    let seed = u64::from(rand::random::<u32>() >> 2) + 1;
    let t = Instant::now();
    let (ok, console) = support::boot(
        svc.port,
        seed,
        GUEST_TIMEOUT,
        "initramfs-throughput.gz",
        &format!("r3map_scenario=throughput r3map_vol={vol}"),
    );
    let boot_s = t.elapsed().as_secs_f64();
    let passed = console.lines().any(|l| l.trim() == "R3MAP-GUEST: PASS");
    assert!(
        ok && passed && !console.contains("R3MAP-GUEST: FAIL"),
        "the guest did not pass (run.sh ok: {ok}); guest console:\n{console}"
    );
    for m in ["r3map verified", "r3map unstaged", "nbdkit verified"] {
        assert!(
            console.contains(m),
            "marker {m:?} missing; console:\n{console}"
        );
    }
    assert_eq!(
        finding(&console, "bench_bytes"),
        Some(LEN.to_string().as_str())
    );

    // The r3map bytes reached the region (unstage pushed them); the rest
    // of it is still zero.
    let buf = svc.read(&vol, SIZE);
    for (i, &got) in buf.iter().enumerate() {
        let off = i as u64;
        let want = if off < LEN { pat(off, seed + 31) } else { 0 };
        assert_eq!(got, want, "region byte {off}: got {got:#x}, want {want:#x}");
    }

    let mib = LEN as f64 / f64::from(1u32 << 20);
    let mut table = format!(
        "| path ({} MiB, qemu TCG, 2 vCPUs) | NodeStage / attach to device ready (s) | mmap write + msync (MiB/s) | mmap read, caches dropped (MiB/s) |\n|---|---|---|---|\n",
        mib
    );
    for (path, label) in [
        ("r3map", "r3map-csi-node (region service on the host, TLS)"),
        (
            "nbdkit",
            "`nbdkit memory` in the guest + nbd-client, unix socket",
        ),
    ] {
        let ready = seconds(&console, &format!("{path}_ready_s"));
        let w = seconds(&console, &format!("{path}_write_s"));
        let r = seconds(&console, &format!("{path}_read_s"));
        table.push_str(&format!(
            "| {label} | {ready:.2} | {:.1} | {:.1} |\n",
            mib / w,
            mib / r
        ));
    }
    eprintln!(
        "guest throughput scenario passed in {boot_s:.1}s (informational, TCG emulation):\n\n{table}\nfindings:\n{}",
        console
            .lines()
            .filter(|l| l.contains("R3MAP-GUEST: FINDING"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
