//! The CSI node plugin end to end against the real kernel NBD client.
//!
//! The host kernel has no nbd.ko, so this boots the e2e qemu guest
//! (e2e/guest, Debian's 6.1 kernel) with `r3map_scenario=csi`:
//! `r3map backend` (the region service) runs here on the host; the guest
//! reaches it at 10.0.2.2:PORT, which qemu's user network maps to the
//! host's 127.0.0.1. The connection is TLS (a throwaway CA made here, the
//! server certificate names localhost, 127.0.0.1 and 10.0.2.2) with a
//! bearer token: the engine's client refuses plain HTTP/2 to a host that
//! is not loopback, and 10.0.2.2 is not loopback from the guest's side.
//!
//! In the guest (e2e/guest/csi.sh) `r3map-csi-node` stages and publishes
//! the volume, a "pod" mmaps the published device and msyncs piece after
//! piece while the plugin is killed with SIGKILL and restarted; then the
//! volume moves to a second plugin instance (another node id) while the
//! first one's plugin is down, and the first one's restarted plugin must
//! refuse to re-attach (fenced). Here the test asserts on the guest's markers, then reads
//! the region back and checks every byte the pod msync'd, and that the
//! second node holds the region. It never skips: without qemu or the
//! kernel package it fails and says what is missing.

mod support;

use support::{credentials, finding, pat, prepare, require, root, RegionService};

use std::path::Path;

use std::time::{Duration, Instant};

/// qemu's own timeout. Under TCG the scenario boots in ~10 s; the pause
/// across the restart is up to NODE_IO_TIMEOUT (30 s) on top of the
/// restart, and every msync pushes to the host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);

/// The region: small, TCG is slow.
const SIZE: u64 = 32 << 20;
/// The pod's writes; mirrored in e2e/guest/csi.sh (OFF, PIECE, COUNT,
/// SEED = r3map_seed + 11).
const OFF: u64 = 1 << 20;
const PIECE: u64 = 256 << 10;
const COUNT: u64 = 48;

/// Boots the guest with the csi scenario for volume `vol`.
fn boot(port: u16, seed: u64, vol: &str) -> (bool, String) {
    support::boot(
        port,
        seed,
        GUEST_TIMEOUT,
        "initramfs-csi.gz",
        &format!("r3map_scenario=csi r3map_vol={vol}"),
    )
}

#[test]
fn node_plugin_survives_a_restart_under_an_mmap_writer() {
    require("qemu-system-x86_64");
    let cache = root().join("e2e/.cache/csi");
    std::fs::create_dir_all(&cache).unwrap();
    let (ca, cert, key, token) = credentials(&cache);

    let svc = RegionService::start(&ca, &cert, &key, &token);
    let vol = svc.create("csi", SIZE);

    prepare(
        "initramfs-csi.gz",
        &[
            Path::new(env!("CARGO_BIN_EXE_r3map-csi-node")),
            Path::new(env!("CARGO_BIN_EXE_r3map-csi-call")),
        ],
        &[],
        &[&ca, &token],
    );
    let seed = u64::from(rand::random::<u32>() >> 2) + 1;
    let t = Instant::now();
    let (ok, console) = boot(svc.port, seed, &vol);
    let passed = console.lines().any(|l| l.trim() == "R3MAP-GUEST: PASS");
    assert!(
        ok && passed && !console.contains("R3MAP-GUEST: FAIL"),
        "the guest did not pass (run.sh ok: {ok}); guest console:\n{console}"
    );
    for m in [
        "staged ",
        "published at ",
        &format!("reattached {vol}"),
        "restart OK: the pod saw no error",
        "unstaged on node-a",
        "node-b read the volume back",
        "node-a fenced: re-attach refused, stage FAILED_PRECONDITION, unstage cleaned up",
        "node-b unstaged",
    ] {
        assert!(
            console.contains(m),
            "marker {m:?} missing; console:\n{console}"
        );
    }
    assert_eq!(
        finding(&console, "pod_pieces"),
        Some(COUNT.to_string().as_str())
    );
    let killed: u64 = finding(&console, "killed_plugin_after_pieces")
        .and_then(|v| v.parse().ok())
        .expect("killed_plugin_after_pieces finding");
    assert!(
        killed < COUNT,
        "the plugin was killed after the pod finished ({killed} pieces): the restart was not under load"
    );

    // The pod paused (the msync in flight at the kill waits for the
    // kernel's I/O timeout, NODE_IO_TIMEOUT = 30 s, to be resent), but far
    // less than the dead-connection timeout (120 s), after which it would
    // have seen EIO.
    let gap: f64 = finding(&console, "pod_max_gap_s")
        .and_then(|v| v.parse().ok())
        .expect("pod_max_gap_s finding");
    assert!(
        gap < 90.0,
        "the pod stalled {gap} s across the restart; console:\n{console}"
    );

    // Every byte the pod msync'd is in the region; the rest is zero.
    let buf = svc.read(&vol, SIZE);
    let want_seed = seed + 11;
    for (i, &got) in buf.iter().enumerate() {
        let off = i as u64;
        let want = if (OFF..OFF + PIECE * COUNT).contains(&off) {
            pat(off, want_seed)
        } else {
            0
        };
        assert_eq!(got, want, "region byte {off}: got {got:#x}, want {want:#x}");
    }
    // The second node took the region over at stage: node-a fenced it at
    // epochs 1 and 2, node-b at 3.
    let reg = svc.rt.block_on(svc.client.get_region(&vol)).unwrap();
    assert_eq!(reg.owner, "node-b", "region {reg:?}");
    assert_eq!(reg.epoch, 3, "region {reg:?}");
    eprintln!(
        "guest csi scenario passed in {:.1}s; findings:\n{}",
        t.elapsed().as_secs_f64(),
        console
            .lines()
            .filter(|l| l.contains("R3MAP-GUEST: FINDING"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
