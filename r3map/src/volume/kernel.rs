//! Serving streams that skip the handshake: the socketpair end the node
//! plugin keeps after handing the other end to the kernel (netlink
//! NBD_CMD_CONNECT, or RECONFIGURE after a restart).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Volume;
use crate::{Error, Result};

/// One stream being served; see [`Volume::serve_kernel`]. Awaiting it
/// gives how the connection ended. Dropping it leaves the connection
/// running (it belongs to the volume; [`Volume::close`] drains it).
pub struct KernelConn {
    task: JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
}

impl KernelConn {
    /// Stops reading requests from this stream; requests already read are
    /// answered, then the connection ends (the stream is dropped). Other
    /// streams of the volume go on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// A token that stops this connection when cancelled (for a caller
    /// that hands the [`KernelConn`] itself to a waiting task).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// True once the connection has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Future for KernelConn {
    /// Ok when the peer hung up or sent DISC or the connection was stopped;
    /// an error when the stream failed or broke the protocol.
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        Pin::new(&mut self.task).poll(cx).map(|r| match r {
            Ok(Ok(())) => Ok(()),
            // The kernel hanging up without DISC is how a device goes away.
            Ok(Err(e)) if is_hangup(&e) => Ok(()),
            Ok(Err(e)) => Err(Error::Io(e)),
            Err(e) => Err(Error::io(format!("connection task failed: {e}"))),
        })
    }
}

fn is_hangup(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
    )
}

impl Volume {
    /// Serves `stream` in transmission mode at once (no handshake: the
    /// kernel was told size and flags through netlink), in a task the
    /// volume tracks. Several streams may be served at once (a multi-
    /// connection device), and a new stream may take over from one that
    /// died (the node plugin's restart path: a new socketpair, then netlink
    /// RECONFIGURE); the data is the volume's either way.
    pub fn serve_kernel<S>(&self, stream: S) -> KernelConn
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (task, stop) = self.server.spawn_transmission(stream, &self.name);
        KernelConn { task, stop }
    }
}
