//! The README's "run" command end to end: `r3map-csi-demo --guest --all`
//! as a user runs it, on this host (no nbd.ko here) booting the qemu
//! guest, where the region service, the controller and two node plugins
//! run against the guest kernel's NBD client. It provisions a volume,
//! attaches it on node-a, where an application mmaps the device and keeps
//! writing, rolls a migration to node-b back, migrates live to node-b,
//! checks every byte there, hands the volume back to node-a (the RWO way)
//! and checks every byte again. This test asserts on the demo's summary.
//! It never skips: without qemu or the guest's packages it fails and says
//! what is missing.

mod support;

use std::process::Command;

use support::require;

fn summary_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    let line = out.lines().find(|l| l.starts_with("summary: "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
}

#[test]
fn demo_migrates_live_and_back_with_every_byte() {
    require("qemu-system-x86_64");
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("r3map-csi-demo");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(["--guest", "--all"])
        .output()
        .expect("run r3map-csi-demo");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("demo: PASS"),
        "the demo failed ({}):\n{text}\n{err}",
        out.status
    );
    let size = 64u64 << 20;
    assert_eq!(
        summary_value(&text, "verified"),
        Some(size.to_string().as_str()),
        "{text}"
    );
    assert_eq!(
        summary_value(&text, "handed_back"),
        Some(size.to_string().as_str()),
        "{text}"
    );
    assert_eq!(summary_value(&text, "rolled_back"), Some("true"), "{text}");
    for k in [
        "stage_ms",
        "precopy_ms",
        "finalize_ms",
        "downtime_ms",
        "postcopy_ms",
    ] {
        let v: f64 = summary_value(&text, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in the summary:\n{text}"));
        assert!(v > 0.0, "{k}={v}");
    }
    // The walkthrough's steps, in order.
    let mut at = 0;
    for step in [
        "1/7",
        "2/7",
        "3/7",
        "4/7",
        "(rollback",
        "5/7",
        "pre-copy 100%",
        "6/7",
        "7/7",
        "(hand-over",
    ] {
        let i = text[at..]
            .find(step)
            .unwrap_or_else(|| panic!("step {step:?} missing or out of order:\n{text}"));
        at += i;
    }
}
