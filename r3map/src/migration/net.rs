//! Where the migration services listen and how clients reach them: a unix
//! socket path or HOST:PORT, with a bearer token and/or (mutual) TLS, the
//! same `crate::auth` helpers as the remote region service. A TCP listener
//! on a non-loopback address is refused unless clients must authenticate
//! (a token or a client CA).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

pub use crate::auth::{ClientAuth, ClientTls, ServerAuth, ServerTls, Token};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot connect to {to}: {source}")]
    Connect {
        to: String,
        source: tonic::transport::Error,
    },
}

/// A unix socket path (anything containing a `/`) or HOST:PORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(s.to_string()))
            }
            _ => Err(format!(
                "{s:?} is neither HOST:PORT nor a unix socket path (a path needs a '/')"
            )),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => f.write_str(a),
        }
    }
}

/// Reads the token file, if one is given.
pub fn token(path: Option<&Path>) -> Result<Option<Token>, NetError> {
    path.map(Token::from_file)
        .transpose()
        .map_err(|e| NetError::Config(e.to_string()))
}

pub type AuthedChannel = InterceptedService<Channel, ClientAuth>;

/// The host part of an endpoint, which the server's certificate must name
/// (unless `--tls-name` says otherwise). A unix socket has no host:
/// "localhost" stands in.
fn tls_host(ep: &Endpoint) -> &str {
    match ep {
        Endpoint::Tcp(a) => {
            let h = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
            h.trim_start_matches('[').trim_end_matches(']')
        }
        Endpoint::Unix(_) => "localhost",
    }
}

/// Opens a channel to `ep`, over TLS when `tls` is given. Large HTTP/2
/// windows keep chunk streams moving across a round-trip time; keepalives
/// notice a peer that vanished without closing its connection.
pub async fn connect(
    ep: &Endpoint,
    token: Option<&Token>,
    tls: Option<&ClientTls>,
) -> Result<AuthedChannel, NetError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = match ep {
        Endpoint::Tcp(a) => format!("{scheme}://{a}"),
        // The authority is ignored: the connector below dials the socket
        // (and tonic layers TLS over it for https).
        Endpoint::Unix(_) => format!("{scheme}://localhost"),
    };
    let mut e = TonicEndpoint::from_shared(uri)
        .map_err(|e| NetError::Config(format!("{ep}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(64 << 20);
    if let Some(t) = tls {
        let c = t
            .config(tls_host(ep))
            .map_err(|e| NetError::Config(e.to_string()))?;
        e = e
            .tls_config(c)
            .map_err(|e| NetError::Config(format!("{ep}: TLS: {e}")))?;
    }
    let wrap = |source| NetError::Connect {
        to: ep.to_string(),
        source,
    };
    let ch = match ep {
        Endpoint::Tcp(_) => e.connect().await.map_err(wrap)?,
        Endpoint::Unix(p) => {
            let p = p.clone();
            e.connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .map_err(wrap)?
        }
    };
    Ok(InterceptedService::new(ch, ClientAuth::new(token)))
}

/// A bound listener for a gRPC server.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, crate::nbd::server::SocketFile),
}

impl Listener {
    /// Binds `ep`. Refuses a TCP address other hosts can reach unless a
    /// token or a client CA guards it; a unix socket is made owner-only.
    pub async fn bind(
        ep: &Endpoint,
        token: Option<&Token>,
        tls: Option<&ServerTls>,
    ) -> Result<Listener, NetError> {
        match ep {
            Endpoint::Tcp(a) => {
                let addr: SocketAddr = tokio::net::lookup_host(a.as_str())
                    .await?
                    .next()
                    .ok_or_else(|| NetError::Config(format!("{a} resolves to nothing")))?;
                crate::auth::check_listen(addr, token, tls)
                    .map_err(|e| NetError::Config(e.to_string()))?;
                Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?))
            }
            Endpoint::Unix(p) => {
                use std::os::unix::fs::PermissionsExt;
                let l = crate::nbd::server::bind_unix(p)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(l, crate::nbd::server::SocketFile(p.clone())))
            }
        }
    }

    /// The local address, for logs (and tests binding port 0).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, f) => format!("unix:{}", f.0.display()),
        }
    }

    /// Serves `router` until `stop` resolves. The socket file (if any) is
    /// removed when this returns.
    pub async fn serve(
        self,
        router: tonic::transport::server::Router,
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        match self {
            Listener::Tcp(l) => {
                let s = tokio_stream::wrappers::TcpListenerStream::new(l);
                router.serve_with_incoming_shutdown(s, stop).await
            }
            Listener::Unix(l, _file) => {
                let s = tokio_stream::wrappers::UnixListenerStream::new(l);
                router.serve_with_incoming_shutdown(s, stop).await
            }
        }
    }
}

/// A server builder with windows matching the client's, serving TLS when
/// `tls` is given (with a client CA: only clients holding a certificate
/// it signed complete the handshake).
pub fn server(tls: Option<&ServerTls>) -> Result<tonic::transport::Server, NetError> {
    let s = tonic::transport::Server::builder()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(64 << 20)
        .http2_keepalive_interval(Some(Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .tcp_nodelay(true);
    match tls {
        None => Ok(s),
        Some(t) => {
            let c = t.config().map_err(|e| NetError::Config(e.to_string()))?;
            s.tls_config(c)
                .map_err(|e| NetError::Config(format!("TLS: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "127.0.0.1:7000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:7000".into())
        );
        assert_eq!(
            "/run/x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "./x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("./x.sock".into())
        );
        assert!("x.sock".parse::<Endpoint>().is_err());
        assert!("host:notaport".parse::<Endpoint>().is_err());
    }

    #[test]
    fn tls_hosts() {
        let h = |s: &str| tls_host(&s.parse().unwrap()).to_string();
        assert_eq!(h("node-1.example:7000"), "node-1.example");
        assert_eq!(h("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(h("[::1]:7000"), "::1");
        assert_eq!(h("/run/x.sock"), "localhost");
    }
}
