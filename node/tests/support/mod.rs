// Each guest test uses a part of the harness.
#![allow(dead_code)]

//! The guest harness the guest tests share: the repository root, the
//! tool check, booting e2e/guest/run.sh with a scenario and collecting its
//! console under a deadline, reading the FINDING markers; the region
//! service's credentials, its binary and the writers' byte pattern.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// The host's `r3map` binary (the region service), built beside the test.
pub fn r3map_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("r3map");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
        p.display()
    );
    p
}

/// mmapcheck's generator (e2e/guest/mmapcheck.c).
pub fn pat(off: u64, seed: u64) -> u8 {
    let mut k = (off >> 3).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    (k >> ((off & 7) * 8)) as u8
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA, a server certificate for the names the backend is reached by, and
/// a token, written into `dir`.
pub fn credentials(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "r3map-csi e2e CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "10.0.2.2".to_string(),
    ];
    let mut s = rcgen::CertificateParams::new(names).unwrap();
    s.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = s.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("token"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    let token: String = (0..32)
        .map(|_| char::from(b'a' + (rand::random::<u8>() % 26)))
        .collect();
    std::fs::write(&paths.3, token).unwrap();
    (paths.0, paths.1, paths.2, paths.3)
}

/// Builds (or reuses) the guest image `image` with `bins` (and the
/// libraries ldd lists), `libs` (shared objects loaded at run time, with
/// their libraries) and `files` (to /etc/r3map) in it: e2e/guest/prepare.sh.
pub fn prepare(image: &str, bins: &[&Path], libs: &[&Path], files: &[&Path]) {
    let script = root().join("e2e/guest/prepare.sh");
    let join = |ps: &[&Path]| {
        ps.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let out = Command::new("bash")
        .arg(&script)
        .env("R3MAP_GUEST_EXTRA_BINS", join(bins))
        .env("R3MAP_GUEST_EXTRA_LIBS", join(libs))
        .env("R3MAP_GUEST_EXTRA_FILES", join(files))
        .env("R3MAP_GUEST_IMAGE", image)
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

/// The region service (`r3map backend`, memory store, 256 KiB chunks) on
/// the host, with TLS and a token as the guest reaches it at 10.0.2.2, and
/// a client of it. Stopped when dropped.
pub struct RegionService {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// The runtime the client's calls run on.
    pub rt: tokio::runtime::Runtime,
    /// A client over TLS with the token.
    pub client: r3map::remote::client::Client,
    _proc: Proc,
}

impl RegionService {
    /// Starts it with the credentials [`credentials`] wrote and waits
    /// until it listens.
    pub fn start(ca: &Path, cert: &Path, key: &Path, token: &Path) -> RegionService {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let backend = Command::new(r3map_bin())
            .args(["backend", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--store", "memory:", "--chunk-size", "256KiB"])
            .arg("--token-file")
            .arg(token)
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .env("R3MAP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn r3map backend");
        let proc = Proc(backend);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "r3map backend did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let opts = r3map::remote::client::ConnectOptions {
            addr: format!("127.0.0.1:{port}"),
            token_file: Some(token.to_path_buf()),
            tls: Some(r3map::auth::ClientTls {
                ca: ca.to_path_buf(),
                cert: None,
                key: None,
                server_name: Some("localhost".into()),
            }),
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = rt
            .block_on(r3map::remote::client::Client::connect(&opts))
            .expect("connect to the backend");
        RegionService {
            port,
            rt,
            client,
            _proc: proc,
        }
    }

    /// Creates a region of `size` bytes named `PREFIX-e2e-RANDOM`; returns
    /// its name.
    pub fn create(&self, prefix: &str, size: u64) -> String {
        let vol = format!("{prefix}-e2e-{:08x}", rand::random::<u32>());
        self.rt
            .block_on(self.client.create_region(Some(&vol), size))
            .expect("create the region");
        vol
    }

    /// The region's bytes `0..size`.
    pub fn read(&self, vol: &str, size: u64) -> Vec<u8> {
        use r3map::backend::Backend;
        let b = self.rt.block_on(self.client.backend(vol)).unwrap();
        let mut buf = vec![0u8; size as usize];
        self.rt.block_on(b.read_at(0, &mut buf)).unwrap();
        buf
    }
}
