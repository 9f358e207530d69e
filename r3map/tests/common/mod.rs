//! Shared by the integration tests: start the real `r3map` binary and the
//! real peers (redis-server), and stop them when the test ends.
#![allow(dead_code)]

pub mod raw;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the `r3map` binary built for this test run.
pub fn r3map_bin() -> &'static str {
    env!("CARGO_BIN_EXE_r3map")
}

/// A free loopback TCP port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test with a clear message when a required tool is missing:
/// tests never skip silently.
pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed: run `bash .ci/install-deps` (as root)"
    );
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Where a served export can be reached.
pub enum Addr {
    Unix(PathBuf),
    Tcp(u16),
}

impl Addr {
    /// NBD URI for libnbd tools (nbdinfo, nbdcopy) and qemu-img.
    pub fn uri(&self) -> String {
        match self {
            Addr::Unix(p) => format!("nbd+unix:///r3map?socket={}", p.display()),
            Addr::Tcp(port) => format!("nbd://127.0.0.1:{port}/r3map"),
        }
    }
}

/// Starts `r3map serve` with `args` (backend, size, ...) on `addr`, and waits
/// until it accepts connections.
pub fn serve(addr: &Addr, args: &[&str]) -> Proc {
    let mut cmd = Command::new(r3map_bin());
    cmd.arg("serve").args(args);
    match addr {
        Addr::Unix(p) => cmd.arg("--socket").arg(p),
        Addr::Tcp(port) => cmd.arg("--listen").arg(format!("127.0.0.1:{port}")),
    };
    cmd.env("R3MAP_LOG", "warn").stdout(Stdio::null());
    let child = cmd.spawn().expect("spawn r3map serve");
    let mut p = Proc {
        child,
        name: "r3map serve".into(),
    };
    wait_ready(&mut p, addr);
    p
}

/// Like [`serve`], with the server's stderr (logs at `warn`) written to
/// `log`, so a test can look for panics afterwards.
pub fn serve_logged(addr: &Addr, args: &[&str], log: &Path) -> Proc {
    let mut cmd = Command::new(r3map_bin());
    cmd.arg("serve").args(args);
    match addr {
        Addr::Unix(p) => cmd.arg("--socket").arg(p),
        Addr::Tcp(port) => cmd.arg("--listen").arg(format!("127.0.0.1:{port}")),
    };
    let err = std::fs::File::create(log).expect("create server log");
    cmd.env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(err);
    let child = cmd.spawn().expect("spawn r3map serve");
    let mut p = Proc {
        child,
        name: "r3map serve".into(),
    };
    wait_ready(&mut p, addr);
    p
}

fn wait_ready(p: &mut Proc, addr: &Addr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("{} exited early: {st}", p.name);
        }
        let up = match addr {
            Addr::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            Addr::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        };
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not start listening",
            p.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real redis-server on a loopback port, with its data in a temp dir.
pub struct RedisServer {
    pub proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        require("redis-server");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut proc = Proc {
            child,
            name: "redis-server".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                proc.child.try_wait().unwrap().is_none(),
                "redis-server exited early"
            );
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            proc,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }
}

/// A real S3 server (s3s-fs) on a loopback port, its data in a temp dir,
/// with one bucket `r3map-test` and fixed credentials.
pub struct S3Server {
    pub proc: Proc,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// A credentials file for the server's keys.
    pub creds: PathBuf,
}

/// The bucket every [`S3Server`] has.
pub const S3_BUCKET: &str = "r3map-test";

impl S3Server {
    pub fn start() -> S3Server {
        require("s3s-fs");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join(S3_BUCKET)).unwrap();
        let creds = dir.path().join("creds");
        std::fs::write(
            &creds,
            "access_key_id = r3mapaccess\nsecret_access_key = r3mapsecretkey0123\n",
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                "r3mapaccess",
                "--secret-key",
                "r3mapsecretkey0123",
            ])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs");
        let mut proc = Proc {
            child,
            name: "s3s-fs".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                proc.child.try_wait().unwrap().is_none(),
                "s3s-fs exited early"
            );
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server {
            proc,
            port,
            dir,
            creds,
        }
    }

    /// `s3://BUCKET/PREFIX?...` for this server with its credentials.
    pub fn uri(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&credentials-file={}",
            self.port,
            self.creds.display()
        )
    }
}

/// Runs a command, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temp dir for sockets and files of one test.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn sock(dir: &Path) -> PathBuf {
    dir.join("nbd.sock")
}

/// A certificate authority for TLS tests (rcgen), issuing server and
/// client certificates into files.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// Issues a certificate for `names` and writes DIR/NAME.crt and
    /// DIR/NAME.key, returning their paths.
    pub fn issue(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(names).unwrap();
        p.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}
