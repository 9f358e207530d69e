//! The demo's processes: each component is a real process of its own
//! binary, its output in a log file, stopped (SIGTERM, then SIGKILL) when
//! the demo ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One running component.
pub struct Proc {
    /// Its name in messages.
    pub name: String,
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin args` with stdout and stderr to `logs/NAME.log`.
    pub fn start(name: &str, bin: &Path, args: &[String], logs: &Path) -> Result<Proc, Error> {
        std::fs::create_dir_all(logs)?;
        let log = logs.join(format!("{name}.log"));
        let f = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(args)
            .env(
                "R3MAP_LOG",
                std::env::var("R3MAP_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Fails if the process has exited.
    pub fn check(&mut self) -> Result<(), Error> {
        if let Some(st) = self.child.try_wait()? {
            return Err(format!("{} exited ({st}); see {}", self.name, self.log.display()).into());
        }
        Ok(())
    }

    /// Waits until `ready()` holds, the process dies, or `within` passes.
    pub fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<(), Error> {
        let t = Instant::now();
        while !ready() {
            self.check()?;
            if t.elapsed() > within {
                return Err(format!("{}: no {what} after {within:?}", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits up to `within` for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus, Error> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t.elapsed() > within {
                let _ = self.child.kill();
                return Err(format!("{} did not finish within {within:?}", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to `within` for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus, Error> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t.elapsed() > within {
                let _ = self.child.kill();
                return Err(format!("{} did not stop within {within:?}", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate(Duration::from_secs(10));
        }
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}
