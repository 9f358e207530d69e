//! CSI endpoints: `unix:///path` (or `unix:/path`) sockets, served by a
//! tonic router until a shutdown future completes.

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

/// Errors of parsing or serving an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not a `unix://` endpoint with an absolute path.
    #[error("invalid endpoint {0:?}: expected unix:///ABSOLUTE/PATH")]
    Invalid(String),
    /// Binding, removing a stale socket, or serving failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The socket path of `unix:///path` or `unix:/path`.
pub fn parse(endpoint: &str) -> Result<PathBuf, EndpointError> {
    let rest = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| EndpointError::Invalid(endpoint.to_string()))?;
    let p = Path::new(rest);
    if !p.is_absolute() || p.file_name().is_none() {
        return Err(EndpointError::Invalid(endpoint.to_string()));
    }
    Ok(p.to_path_buf())
}

/// Binds `path`, first removing a stale socket left by an earlier run (a
/// path that is not a socket is left alone and the bind fails).
pub fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |what, source| EndpointError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path).map_err(|e| io("removing stale socket", e))?;
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    UnixListener::bind(path).map_err(|e| io("binding", e))
}

/// Serves `router` on the unix socket of `endpoint` until `shutdown`
/// completes, then removes the socket.
pub async fn serve<F>(router: Router, endpoint: &str, shutdown: F) -> Result<(), EndpointError>
where
    F: Future<Output = ()>,
{
    let path = parse(endpoint)?;
    let listener = bind(&path)?;
    tracing::info!(path = %path.display(), "serving CSI");
    let r = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    r.map_err(EndpointError::from)
}

/// A client channel to the unix socket of `endpoint` (what a CO, a
/// sidecar or `r3map-csi-call` dials).
pub async fn connect(endpoint: &str) -> Result<tonic::transport::Channel, EndpointError> {
    let sock = parse(endpoint)?;
    let ch = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await?;
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            parse("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        for bad in [
            "/csi/csi.sock",
            "tcp://127.0.0.1:1",
            "unix://rel/x",
            "unix:///",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stale_socket_removed_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = bind(&sock).unwrap();
            drop(l); // the socket file stays behind, as after a crash
            assert!(sock.exists());
            let _l = bind(&sock).unwrap();
        });
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        rt.block_on(async { assert!(bind(&plain).is_err()) });
        assert!(plain.exists());
    }
}
