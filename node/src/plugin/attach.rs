//! The data path of one staged volume: socketpairs, netlink CONNECT /
//! RECONFIGURE / DISCONNECT run on blocking threads (neli is synchronous),
//! and the checks a re-attach must pass (docs/nbd-netlink.md).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use csi::CsiError;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use r3map::volume::{KernelConn, Volume};

use crate::device::sysfs::NbdSysfs;
use crate::device::{
    ConnectConfig, Error as NlError, NbdNetlink, ReconfigureConfig, NODE_DEAD_CONN_TIMEOUT,
    NODE_IO_TIMEOUT,
};

/// A netlink failure as a CSI error: a kernel without nbd.ko is a node
/// that cannot attach anything (FAILED_PRECONDITION, saying what to load);
/// anything else is INTERNAL with the kernel's errno.
pub fn nl_error(e: NlError) -> CsiError {
    match e {
        NlError::FamilyMissing => CsiError::FailedPrecondition(format!(
            "{e}: this node cannot attach NBD devices (modprobe nbd)"
        )),
        other => CsiError::Internal(other.to_string()),
    }
}

/// Runs `f` with a fresh netlink socket on a blocking thread.
pub async fn netlink<T, F>(f: F) -> Result<T, CsiError>
where
    T: Send + 'static,
    F: FnOnce(&mut NbdNetlink) -> crate::device::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut nl = NbdNetlink::open()?;
        f(&mut nl)
    })
    .await
    .map_err(|e| CsiError::Internal(format!("netlink task: {e}")))?
    .map_err(nl_error)
}

/// `n` stream socketpairs: (the kernel's ends, ours). Close-on-exec and
/// blocking: the kernel does its own waiting; ours go to tokio.
pub fn pairs(n: usize) -> Result<(Vec<OwnedFd>, Vec<OwnedFd>), CsiError> {
    let mut k = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..n.max(1) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| CsiError::Internal(format!("socketpair: {e}")))?;
        k.push(a);
        ours.push(b);
    }
    Ok((k, ours))
}

/// Serves each of our ends as one kernel connection of `vol`.
pub fn serve(vol: &Volume, ours: Vec<OwnedFd>) -> Result<Vec<KernelConn>, CsiError> {
    let mut conns = Vec::new();
    for fd in ours {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)
            .map_err(|e| CsiError::Internal(format!("socket: {e}")))?;
        let s = tokio::net::UnixStream::from_std(std)
            .map_err(|e| CsiError::Internal(format!("socket: {e}")))?;
        conns.push(vol.serve_kernel(s));
    }
    Ok(conns)
}

/// CONNECT with the kernel ends; returns the device index the kernel
/// picked. The kernel ends are closed afterwards (the kernel holds its own
/// references; ours would keep a dropped socket looking alive).
pub async fn connect(kernel: Vec<OwnedFd>, cfg: ConnectConfig) -> Result<u32, CsiError> {
    netlink(move |nl| {
        let fds: Vec<_> = kernel.iter().map(|f| f.as_fd()).collect();
        let r = nl.connect(&fds, &cfg);
        drop(fds);
        drop(kernel);
        r
    })
    .await
}

/// RECONFIGURE device `index` with the kernel ends, then checks that the
/// kernel kept them: it reports success even when it dropped a socket
/// because no connection of the device was dead (the old server still
/// alive), and a dropped socket shows as POLLHUP on our end.
pub async fn reconfigure(
    index: u32,
    kernel: Vec<OwnedFd>,
    ours: &[OwnedFd],
    cfg: ReconfigureConfig,
) -> Result<(), CsiError> {
    netlink(move |nl| {
        let fds: Vec<_> = kernel.iter().map(|f| f.as_fd()).collect();
        let r = nl.reconfigure(index, &fds, &cfg);
        drop(fds);
        drop(kernel);
        r
    })
    .await?;
    let mut pfds: Vec<_> = ours
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::empty()))
        .collect();
    poll(&mut pfds, PollTimeout::from(200u16))
        .map_err(|e| CsiError::Internal(format!("poll: {e}")))?;
    let dropped = pfds
        .iter()
        .filter(|p| {
            p.revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        })
        .count();
    if dropped > 0 {
        return Err(CsiError::FailedPrecondition(format!(
            "nbd{index}: the kernel dropped {dropped} of {} new sockets at RECONFIGURE \
             (a connection of the device is still alive: is an old plugin still serving it?)",
            ours.len()
        )));
    }
    Ok(())
}

/// DISCONNECT device `index`; a device the kernel no longer has is fine.
pub async fn disconnect(index: u32) -> Result<(), CsiError> {
    match netlink(move |nl| nl.disconnect(index)).await {
        Ok(()) => Ok(()),
        Err(e) if !NbdSysfs::new(index).exists() => {
            tracing::info!(index, "device already gone: {e}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The index of the nbd device whose backend identifier is `id`, under
/// `sys_block` (/sys/block).
pub fn find_by_identifier(sys_block: &Path, id: &str) -> Option<u32> {
    let rd = std::fs::read_dir(sys_block).ok()?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name.strip_prefix("nbd").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if NbdSysfs::under(sys_block, n)
            .backend()
            .ok()
            .flatten()
            .as_deref()
            == Some(id)
        {
            return Some(n);
        }
    }
    None
}

/// Writes back the device's page cache and sends FLUSH (fsync of the
/// block device), so that nothing written through it is left in the
/// kernel when the device is disconnected. A device that is gone is fine.
pub async fn flush_device(index: u32, timeout: Duration) -> Result<(), CsiError> {
    let dev = format!("/dev/nbd{index}");
    let task = tokio::task::spawn_blocking(move || {
        match std::fs::OpenOptions::new().write(true).open(&dev) {
            Ok(f) => f.sync_all().map_err(|e| format!("fsync {dev}: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("opening {dev}: {e}")),
        }
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(m))) => Err(CsiError::Internal(m)),
        Ok(Err(e)) => Err(CsiError::Internal(format!("flush task: {e}"))),
        Err(_) => Err(CsiError::Unavailable(format!(
            "flushing nbd{index} took longer than {timeout:?}"
        ))),
    }
}

/// Keeps a device's connections served: when one ends while the volume is
/// attached (the kernel marked it dead, e.g. its I/O timeout fired on a
/// slow request, and shut it down), it makes a new socketpair and
/// RECONFIGUREs the device with it, retrying (100 ms, growing to 1 s). Cancelling
/// `stop` ends the replacing (teardown, before DISCONNECT); the task then
/// waits for the remaining connections to end.
pub struct Supervisor {
    stop: CancellationToken,
    cut: Arc<Notify>,
    live: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Supervisor {
    /// Supervises `conns` of device `index` of `vol`.
    pub fn start(vol: Arc<Volume>, index: u32, identifier: String, conns: Vec<KernelConn>) -> Self {
        let stop = CancellationToken::new();
        let cut = Arc::new(Notify::new());
        let live = Arc::new(AtomicUsize::new(conns.len()));
        let task = tokio::spawn(supervise(
            Supervised {
                vol,
                index,
                identifier,
                stop: stop.clone(),
                cut: cut.clone(),
                live: live.clone(),
            },
            conns,
        ));
        Supervisor {
            stop,
            cut,
            live,
            task,
        }
    }

    /// Stops replacing connections (they go on serving).
    pub fn stop_replacing(&self) {
        self.stop.cancel();
    }

    /// Testing only: ends one served connection the way a dying server
    /// would (our end closes; the kernel marks the connection dead), so
    /// that the replacing can be watched against the real kernel.
    pub fn cut_one(&self) {
        self.cut.notify_one();
    }

    /// How many connections are being served right now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Stops replacing and waits up to `wait` for every connection to end
    /// (after DISCONNECT); past it the task is aborted, which leaves the
    /// connections to the volume's close.
    pub async fn finish(self, wait: Duration) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(wait, &mut task).await.is_err() {
            tracing::warn!("kernel connections still open {wait:?} after DISCONNECT");
            task.abort();
            let _ = task.await;
        }
    }
}

async fn replace_one(vol: &Volume, index: u32, identifier: &str) -> Result<KernelConn, CsiError> {
    let (kernel, ours) = pairs(1)?;
    let cfg = ReconfigureConfig {
        identifier: Some(identifier.to_string()),
        io_timeout: Some(NODE_IO_TIMEOUT),
        dead_conn_timeout: Some(NODE_DEAD_CONN_TIMEOUT),
        client_flags: None,
    };
    reconfigure(index, kernel, &ours, cfg).await?;
    Ok(serve(vol, ours)?.remove(0))
}

/// What the supervising task works with.
struct Supervised {
    vol: Arc<Volume>,
    index: u32,
    identifier: String,
    stop: CancellationToken,
    cut: Arc<Notify>,
    live: Arc<AtomicUsize>,
}

async fn supervise(s: Supervised, conns: Vec<KernelConn>) {
    let index = s.index;
    let want = conns.len();
    let mut set = JoinSet::new();
    // Each connection's stop token by task, for the test hook's cut.
    let mut stops = HashMap::new();
    for c in conns {
        let t = c.stop_token();
        stops.insert(set.spawn(c).id(), t);
    }
    let mut missing = 0usize;
    // Retry delay: short first, as the usual failure is a RECONFIGURE that
    // came before the kernel marked the slot dead (it notices the closed
    // socket asynchronously) and was dropped; up to 1 s while it persists.
    let mut delay = Duration::from_millis(100);
    loop {
        s.live.store(set.len(), Ordering::Relaxed);
        if missing > 0 && !s.stop.is_cancelled() {
            match replace_one(&s.vol, index, &s.identifier).await {
                Ok(c) => {
                    let t = c.stop_token();
                    stops.insert(set.spawn(c).id(), t);
                    missing -= 1;
                    delay = Duration::from_millis(100);
                    tracing::info!(
                        index,
                        "replaced a dead connection of nbd{index}: {} of {want} served",
                        set.len()
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(index, "replacing a connection of nbd{index}: {e}; retrying");
                    tokio::select! {
                        _ = s.stop.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        tokio::select! {
            _ = s.stop.cancelled() => break,
            _ = s.cut.notified() => {
                // One not cut already (still ending): each cut ends one more.
                if let Some(t) = stops.values().find(|t| !t.is_cancelled()) {
                    tracing::warn!(index, "test hook: cutting a connection of nbd{index}");
                    t.cancel();
                }
            }
            Some(r) = set.join_next_with_id() => {
                stops.remove(&match &r {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                });
                if s.stop.is_cancelled() {
                    break;
                }
                tracing::warn!(index, "a kernel connection of nbd{index} ended while attached ({r:?})");
                missing += 1;
            }
            else => break,
        }
    }
    s.live.store(0, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_device_by_identifier() {
        let root = tempfile::tempdir().unwrap();
        for (n, id) in [(0, Some("pvc-a")), (3, Some("pvc-b")), (5, None)] {
            let d = root.path().join(format!("nbd{n}"));
            std::fs::create_dir(&d).unwrap();
            if let Some(id) = id {
                std::fs::write(d.join("backend"), format!("{id}\n")).unwrap();
            }
        }
        std::fs::create_dir(root.path().join("sda")).unwrap();
        assert_eq!(find_by_identifier(root.path(), "pvc-b"), Some(3));
        assert_eq!(find_by_identifier(root.path(), "pvc-a"), Some(0));
        assert_eq!(find_by_identifier(root.path(), "pvc-c"), None);
        assert_eq!(find_by_identifier(&root.path().join("none"), "pvc-a"), None);
    }

    #[test]
    fn missing_family_is_failed_precondition() {
        let e = nl_error(NlError::FamilyMissing);
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("nbd"), "{e}");
    }
}
