//! gRPC transport shared by the remote region service ([`crate::remote`])
//! and the migration services ([`crate::migration`]): where a service
//! listens and how clients reach it (a unix socket path or HOST:PORT), with
//! a bearer token and/or (mutual) TLS from [`crate::auth`]. A TCP listener
//! on a non-loopback address is refused unless clients must authenticate
//! (a token or a client CA).
//!
//! One builder for channels and one for servers, so both services get the
//! same HTTP/2 windows; only their keepalives differ ([`Keepalive`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;

use crate::channel::{Dialer, H2Channel, TlsDial};

pub use crate::auth::{ClientAuth, ClientTls, ServerAuth, ServerTls, Token};

/// Why a listener or a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A bad address, token, certificate or TLS setting.
    #[error("{0}")]
    Config(String),
    /// Binding or setting up a socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer could not be reached (or the handshake failed).
    #[error("cannot connect to {to}: {source}")]
    Connect {
        /// The endpoint dialled.
        to: String,
        /// Why: the socket, TLS or HTTP/2 error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// HTTP/2 keepalive of one kind of service, the same on its clients and
/// its servers: how soon a peer that vanished without closing is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Interval between pings.
    pub interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub timeout: Duration,
    /// Whether clients ping a connection with no call in flight too.
    pub while_idle: bool,
}

impl Keepalive {
    /// `r3map backend` regions: calls are short and frequent, so a dead
    /// server shows up as a failing call soon enough.
    pub const REGION: Keepalive = Keepalive {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(10),
        while_idle: false,
    };
    /// Migration: a leech waits on long streams and must notice a lost
    /// seed quickly, idle or not.
    pub const MIGRATION: Keepalive = Keepalive {
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
        while_idle: true,
    };
}

/// Large HTTP/2 windows keep a streamed read moving across a round-trip
/// time without waiting for window updates.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Splits `HOST:PORT` (an IPv6 host in brackets) into the host, without
/// brackets, and the port; `None` when it is not of that form.
pub fn host_port(s: &str) -> Option<(&str, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    let port = p.parse::<u16>().ok()?;
    if h.is_empty() {
        return None;
    }
    Some((h.trim_start_matches('[').trim_end_matches(']'), port))
}

/// A unix socket path (anything containing a `/`) or HOST:PORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// HOST:PORT, resolved when dialled or bound.
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        match host_port(s) {
            Some(_) => Ok(Endpoint::Tcp(s.to_string())),
            None => Err(format!(
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

/// A channel that sends the bearer token (if any) with every call.
pub type AuthedChannel = InterceptedService<H2Channel, ClientAuth>;

/// The host part of an endpoint, which the server's certificate must name
/// (unless `--tls-name` says otherwise). A unix socket has no host:
/// "localhost" stands in.
fn tls_host(ep: &Endpoint) -> &str {
    match ep {
        Endpoint::Tcp(a) => host_port(a).map_or(a.as_str(), |(h, _)| h),
        Endpoint::Unix(_) => "localhost",
    }
}

/// Opens a channel to `ep`, over TLS when `tls` is given, sending `token`
/// with every call.
pub async fn connect(
    ep: &Endpoint,
    token: Option<&Token>,
    tls: Option<&ClientTls>,
    keepalive: Keepalive,
) -> Result<AuthedChannel, NetError> {
    connect_volume(ep, token, tls, keepalive, None).await
}

/// [`connect`], naming `volume` in every call (the
/// [`crate::auth::VOLUME_HEADER`] metadata) for servers that serve several
/// volumes behind one address.
pub async fn connect_volume(
    ep: &Endpoint,
    token: Option<&Token>,
    tls: Option<&ClientTls>,
    keepalive: Keepalive,
    volume: Option<&str>,
) -> Result<AuthedChannel, NetError> {
    let mut auth = ClientAuth::new(token);
    if let Some(v) = volume {
        auth = auth
            .with_volume(v)
            .map_err(|e| NetError::Config(e.to_string()))?;
    }
    let tls = tls.map(|t| TlsDial::new(t, tls_host(ep))).transpose()?;
    let ch = H2Channel::connect(Dialer {
        endpoint: ep.clone(),
        tls,
        keepalive,
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
    })
    .await?;
    Ok(InterceptedService::new(ch, auth))
}

/// A bound listener for a gRPC server.
pub enum Listener {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A unix socket listener; its file is removed when this is dropped.
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
                router
                    .serve_with_incoming_shutdown(tcp_incoming(l), stop)
                    .await
            }
            Listener::Unix(l, _file) => {
                let s = tokio_stream::wrappers::UnixListenerStream::new(l);
                router.serve_with_incoming_shutdown(s, stop).await
            }
        }
    }
}

/// The accepted sockets of `l`, with Nagle's algorithm off. The server
/// builder's `tcp_nodelay` applies only to listeners tonic binds itself;
/// with Nagle on, a reply's last small write (the trailers) waits for the
/// client's delayed ACK, 40 ms, which was the stage-latency p99
/// (docs/benchmarks.md).
pub fn tcp_incoming(l: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    // from_listener only stores its arguments.
    tonic::transport::server::TcpIncoming::from_listener(l, true, None)
        .expect("TcpIncoming::from_listener cannot fail")
}

/// A server builder with windows matching the client's, serving TLS when
/// `tls` is given (with a client CA: only clients holding a certificate
/// it signed complete the handshake).
pub fn server(
    tls: Option<&ServerTls>,
    keepalive: Keepalive,
) -> Result<tonic::transport::Server, NetError> {
    let s = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(keepalive.interval))
        .http2_keepalive_timeout(Some(keepalive.timeout))
        // Clients' streamed writes (pushed chunks) in large frames too;
        // see crate::channel for why.
        .max_frame_size(crate::channel::MAX_FRAME)
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

    /// Served sockets must have Nagle off (see [`tcp_incoming`]).
    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        use tokio_stream::StreamExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut inc = tcp_incoming(l);
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let s = inc.next().await.unwrap().unwrap();
        assert!(s.nodelay().unwrap(), "an accepted socket has Nagle on");
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_port("h:1"), Some(("h", 1)));
        assert_eq!(host_port("[::1]:7000"), Some(("::1", 7000)));
        assert_eq!(host_port(":1"), None);
        assert_eq!(host_port("h:x"), None);
        assert_eq!(host_port("h"), None);
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
