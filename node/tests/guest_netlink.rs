//! The node plugin's netlink attach path against the real kernel NBD client.
//!
//! The host kernel has no nbd.ko, so this boots the e2e qemu guest
//! (e2e/guest, Debian's 6.1 kernel) with `r3map_scenario=netlink`: its
//! netlink.sh attaches a volume through `r3map-nbd-probe` (this crate's
//! binary, copied into the initramfs with its libraries), kills the server
//! under a writer and re-attaches with RECONFIGURE, tries RECONFIGURE with
//! the old server alive, detaches, and lets a dead connection expire. This
//! test asserts on the guest's markers. It never skips: without qemu or the
//! kernel package it fails and says what is missing.

mod support;

use support::{finding, require, root};

use std::process::Command;
use std::time::{Duration, Instant};

/// qemu's own timeout; the scenario takes ~60 s of guest time under TCG
/// (30 s of it waiting for the block layer's default request timeout).
const GUEST_TIMEOUT: Duration = Duration::from_secs(420);

/// Builds (or reuses) the guest image with the probe in it.
fn prepare(probe: &str) {
    let script = root().join("e2e/guest/prepare.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("R3MAP_GUEST_EXTRA_BINS", probe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): this test needs the guest kernel and initramfs\nstdout: {}\nstderr: {}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Boots the guest with the netlink scenario.
fn boot(seed: u64) -> (bool, String) {
    support::boot(
        0,
        seed,
        GUEST_TIMEOUT,
        "initramfs-extra.gz",
        "r3map_scenario=netlink",
    )
}

fn secs(console: &str, key: &str) -> f64 {
    finding(console, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric finding {key}; console:\n{console}"))
}

#[test]
fn netlink_attach_survives_a_server_restart() {
    require("qemu-system-x86_64");
    let probe = env!("CARGO_BIN_EXE_r3map-nbd-probe");
    prepare(probe);
    let seed = u64::from(rand::random::<u32>() >> 2) + 1;
    let t = Instant::now();
    let (ok, console) = boot(seed);
    let passed = console.lines().any(|l| l.trim() == "R3MAP-GUEST: PASS");
    assert!(
        ok && passed && !console.contains("R3MAP-GUEST: FAIL"),
        "the guest did not pass (run.sh ok: {ok}); guest console:\n{console}"
    );
    // The script fails on each of these itself; the markers make a silent
    // change of the script visible here.
    for m in [
        "attached nbd",
        "written and read back",
        "restart OK: no writer error",
        "RECONFIGURE with a live server: success reported, socket dropped",
        "dead_conn_timeout expiry gives EIO",
    ] {
        assert!(
            console.contains(m),
            "marker {m:?} missing; console:\n{console}"
        );
    }
    assert_eq!(finding(&console, "reconfigure_while_alive_exit"), Some("4"));
    assert_eq!(finding(&console, "after_detach"), Some("destroyed"));
    // The request in flight at the kill waited for the I/O timeout (5 s),
    // not for the dead-connection timeout (30 s).
    let gap = secs(&console, "restart_writer_max_gap_s");
    assert!(
        gap < 20.0,
        "the writer stalled {gap} s across the restart; console:\n{console}"
    );
    // With nobody coming back, the first I/O fails after dead_conn_timeout (5 s).
    let eio = secs(&console, "after_s");
    assert!(
        (4.0..15.0).contains(&eio),
        "EIO after {eio} s, want ~5 s; console:\n{console}"
    );
    eprintln!(
        "guest netlink scenario passed in {:.1}s; findings:\n{}",
        t.elapsed().as_secs_f64(),
        console
            .lines()
            .filter(|l| l.contains("R3MAP-GUEST: FINDING"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
