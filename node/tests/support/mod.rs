// Each guest test uses a part of the harness.
#![allow(dead_code)]

//! The guest harness both guest tests share: the repository root, the
//! tool check, booting e2e/guest/run.sh with a scenario and collecting its
//! console under a deadline, and reading the FINDING markers.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: this test boots a qemu guest; run 'bash .ci/install-deps' (as root)"
    );
}

/// Boots the guest (`run.sh PORT SEED`) with `initramfs` and the kernel
/// command line `append`, qemu limited to `timeout`; returns (run.sh
/// success, console).
pub fn boot(
    port: u16,
    seed: u64,
    timeout: Duration,
    initramfs: &str,
    append: &str,
) -> (bool, String) {
    let mut child = Command::new("bash")
        .arg(root().join("e2e/guest/run.sh"))
        .arg(port.to_string())
        .arg(seed.to_string())
        .env("R3MAP_GUEST_TIMEOUT", timeout.as_secs().to_string())
        .env("R3MAP_GUEST_INITRAMFS", initramfs)
        .env("R3MAP_GUEST_APPEND", append)
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
                let mut c = console.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        })
    })
    .collect();
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
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

/// The value of `key=` in the FINDING markers.
pub fn finding<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("R3MAP-GUEST: FINDING "))
        .flat_map(|l| l.split(' '))
        .find_map(|kv| kv.strip_prefix(pat.as_str()))
}
