//! Listeners: unix socket, TCP, and sockets handed over already connected
//! (the socketpair whose other end the node plugin gives to the kernel).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::export::{Export, Limits};
use super::{handshake, transmission};

/// A set of named exports and the connections served from them.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    exports: HashMap<String, Export>,
    default: Option<String>,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Server {
    /// A server offering one export, also reachable as the default ("") name.
    pub fn single(export: Export) -> Self {
        Self::new(vec![export], Limits::default())
    }

    /// A server of `exports`; the first also answers the empty name.
    pub fn new(exports: Vec<Export>, limits: Limits) -> Self {
        let default = exports.first().map(|e| e.name.clone());
        let exports = exports.into_iter().map(|e| (e.name.clone(), e)).collect();
        Server {
            inner: Arc::new(Inner {
                exports,
                default,
                limits,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    fn lookup(&self, name: &str) -> Option<Export> {
        let name = if name.is_empty() {
            self.inner.default.as_deref()?
        } else {
            name
        };
        self.inner.exports.get(name).cloned()
    }

    /// Serves one connection: handshake, then transmission.
    pub async fn serve_stream<S>(&self, mut stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let neg = tokio::time::timeout(
            self.inner.limits.handshake_timeout,
            handshake::negotiate(&mut stream, |n| self.lookup(n), &self.inner.limits),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake took too long"))??;
        let Some(neg) = neg else { return Ok(()) };
        debug!(export = %neg.export.name, structured = neg.structured, "transmission");
        let (rd, wr) = tokio::io::split(stream);
        transmission::serve(
            rd,
            wr,
            neg.export,
            neg.structured,
            self.inner.limits,
            self.inner.shutdown.clone(),
        )
        .await
    }

    /// Serves a socket that skips the handshake: the kernel NBD client,
    /// configured through ioctl/netlink, speaks transmission at once. Any
    /// stream type (the socketpair end the node plugin keeps, a TCP or
    /// in-memory stream in tests). Ends when the peer hangs up, or sends
    /// DISC, or [`Server::shutdown`] fires; requests in flight are answered
    /// first.
    pub async fn serve_transmission<S>(&self, stream: S, export_name: &str) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_transmission_until(stream, export_name, self.inner.shutdown.clone())
            .await
    }

    /// [`Server::serve_transmission`], also ending when `stop` fires (a
    /// child of the server's shutdown token stops one connection only).
    pub async fn serve_transmission_until<S>(
        &self,
        stream: S,
        export_name: &str,
        stop: CancellationToken,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let export = self.lookup(export_name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no export {export_name:?}"),
            )
        })?;
        let (rd, wr) = tokio::io::split(stream);
        transmission::serve(rd, wr, export, false, self.inner.limits, stop).await
    }

    /// Serves a handshake-less stream ([`Server::serve_transmission`]) in a
    /// task of this server, so [`Server::wait`] waits for it. It stops on
    /// [`Server::shutdown`] or when the returned token is cancelled.
    pub fn spawn_transmission<S>(
        &self,
        stream: S,
        export_name: &str,
    ) -> (tokio::task::JoinHandle<io::Result<()>>, CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stop = self.inner.shutdown.child_token();
        let (this, name, s) = (self.clone(), export_name.to_string(), stop.clone());
        let h = self.inner.tracker.spawn(
            async move { this.serve_transmission_until(stream, &name, s).await }
                .instrument(info_span!("nbd_conn", peer = "kernel")),
        );
        (h, stop)
    }

    /// Connection tasks still running (served streams not yet ended).
    pub fn connections(&self) -> usize {
        self.inner.tracker.len()
    }

    /// The export named `name` ("" for the default one).
    pub fn export(&self, name: &str) -> Option<Export> {
        self.lookup(name)
    }

    /// Serves a connected socket (handshake included) in the background.
    pub fn spawn_connected(&self, stream: UnixStream) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        self.inner.tracker.spawn(
            async move {
                if let Err(e) = this.serve_stream(stream).await {
                    warn!(error = %e, "connection ended with an error");
                }
            }
            .instrument(info_span!("nbd_conn", peer = "fd")),
        )
    }

    /// Accepts TCP connections until [`Server::shutdown`].
    pub async fn listen_tcp(&self, listener: TcpListener) -> io::Result<()> {
        info!(addr = %listener.local_addr()?, "serving NBD over TCP");
        loop {
            let (sock, peer) = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r?,
            };
            sock.set_nodelay(true)?;
            self.spawn_conn(sock, peer.to_string());
        }
    }

    /// Accepts unix-socket connections until [`Server::shutdown`].
    pub async fn listen_unix(&self, listener: UnixListener) -> io::Result<()> {
        info!(path = ?listener.local_addr()?.as_pathname(), "serving NBD on a unix socket");
        let mut n = 0u64;
        loop {
            let (sock, _) = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r?,
            };
            n += 1;
            self.spawn_conn(sock, format!("unix#{n}"));
        }
    }

    fn spawn_conn<S>(&self, sock: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        self.inner.tracker.spawn(
            async move {
                debug!("connected");
                match this.serve_stream(sock).await {
                    Ok(()) => debug!("disconnected"),
                    // Clients often hang up without DISC (the kernel, nbdcopy):
                    // not worth a warning; requests in flight were finished.
                    Err(e) if is_hangup(&e) => debug!(error = %e, "client hung up"),
                    Err(e) => warn!(error = %e, "connection ended with an error"),
                }
            }
            .instrument(info_span!("nbd_conn", %peer)),
        );
    }

    /// Accepts on `l` in the background until [`Server::shutdown`].
    pub fn spawn_accept(&self, l: NbdListener) -> tokio::task::JoinHandle<io::Result<()>> {
        let srv = self.clone();
        tokio::spawn(async move {
            match l {
                NbdListener::Unix(l, _file) => srv.listen_unix(l).await,
                NbdListener::Tcp(l) => srv.listen_tcp(l).await,
            }
        })
    }

    /// Stops accepting and reading new requests; requests in flight finish.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Waits until every connection task has ended (after [`Server::shutdown`]).
    pub async fn wait(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    /// Stops the server, then waits up to 10 s for its connections to end;
    /// false when some were still busy (the caller flushes anyway).
    pub async fn drain(&self) -> bool {
        self.shutdown();
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), self.wait())
            .await
            .is_ok();
        if !done {
            info!("connections still busy after 10 s");
        }
        done
    }

    /// Flushes every export's backend.
    pub async fn flush_all(&self) -> crate::Result<()> {
        for e in self.inner.exports.values() {
            e.backend.flush().await?;
        }
        Ok(())
    }
}

fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

/// Binds a TCP listener, refusing addresses other hosts could reach: NBD
/// has no authentication here, so it stays on loopback.
pub async fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing to serve NBD on {addr}: only loopback addresses (NBD here has no TLS or authentication)"),
        ));
    }
    TcpListener::bind(addr).await
}

/// Binds a unix socket at `path`, replacing a stale socket file left by a
/// previous process (but never a regular file).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    UnixListener::bind(path)
}

/// A bound NBD listener: a unix socket (its file removed when the
/// listener is dropped) or a loopback TCP port.
pub enum NbdListener {
    /// A unix socket and the file to remove.
    Unix(UnixListener, SocketFile),
    /// A loopback TCP port.
    Tcp(TcpListener),
}

impl NbdListener {
    /// Binds the unix socket at `socket` if given, else the loopback TCP
    /// address `listen` (the CLI requires one of them).
    pub async fn bind(
        socket: Option<&Path>,
        listen: Option<SocketAddr>,
    ) -> io::Result<NbdListener> {
        match (socket, listen) {
            (Some(path), _) => Ok(NbdListener::Unix(
                bind_unix(path)?,
                SocketFile(path.to_path_buf()),
            )),
            (None, Some(addr)) => Ok(NbdListener::Tcp(bind_tcp(addr).await?)),
            (None, None) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "give a unix socket path or a loopback TCP address",
            )),
        }
    }
}

/// Removes the socket file on drop.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits for SIGINT or SIGTERM and says which; the way every long-running
/// r3map command ends cleanly.
pub async fn termination_signal() -> io::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let which = tokio::select! {
        r = tokio::signal::ctrl_c() => { r?; "SIGINT" }
        _ = term.recv() => "SIGTERM",
    };
    info!("{which}");
    Ok(which)
}
