//! The HTTP/2 connection under every gRPC client ([`crate::net::connect`]):
//! one connection per channel, dialled at once and again on the first call
//! after it dropped, with large frames.
//!
//! Why not tonic's own `Channel`: its HTTP/2 client advertises the
//! protocol's default 16 KiB maximum frame size and has no setting for it,
//! so the server cuts every streamed 1 MiB read piece into 64 DATA frames,
//! one `writev` each on the sender and one or more `recv`s each on the
//! receiver. Measured on a cold 1 GiB read through `r3map mount`: 65,000
//! `writev` calls in the region server and 131,000 `recvfrom` plus 37,000
//! cross-thread wake-ups in the mount; with 1 MiB frames 1,500 and 2,900,
//! and a quarter less CPU in both processes (docs/benchmarks.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::body::BoxBody;
use tonic::codegen::http::{self, uri::PathAndQuery, Uri};
use tracing::debug;

use crate::auth::ClientTls;
use crate::net::{Endpoint, Keepalive, NetError};

/// Largest HTTP/2 frame this client accepts: a whole read piece (1 MiB of
/// data and its few bytes of framing) fits in one, with room to spare.
pub const MAX_FRAME: u32 = 4 << 20;

/// How long dialling (TCP or unix connect, TLS and HTTP/2 handshakes) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The error type calls fail with (tonic turns it into a `Status`).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a channel dials: where, over what, with which HTTP/2 settings.
pub(crate) struct Dialer {
    pub endpoint: Endpoint,
    pub tls: Option<TlsDial>,
    pub keepalive: Keepalive,
    pub stream_window: u32,
    pub connection_window: u32,
}

/// A client TLS setup, built once from the PEM files.
pub(crate) struct TlsDial {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsDial {
    /// Reads the CA and client certificate files of `tls`; the server's
    /// certificate must name `host` unless `tls.server_name` says otherwise.
    pub fn new(tls: &ClientTls, host: &str) -> Result<TlsDial, NetError> {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p)
                .map_err(|e| NetError::Config(format!("reading {what} {}: {e}", p.display())))
        };
        let bad = |what: &str, e: &dyn std::fmt::Display| NetError::Config(format!("{what}: {e}"));
        let mut roots = RootCertStore::empty();
        let ca = read(&tls.ca, "CA")?;
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots
                .add(c.map_err(|e| bad("CA certificate", &e))?)
                .map_err(|e| bad("CA certificate", &e))?;
        }
        if roots.is_empty() {
            return Err(NetError::Config(format!(
                "CA file {} holds no certificate",
                tls.ca.display()
            )));
        }
        let b = ClientConfig::builder().with_root_certificates(roots);
        let mut config = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&read(cert, "TLS certificate")?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("TLS certificate", &e))?;
                let key = PrivateKeyDer::from_pem_slice(&read(key, "TLS key")?)
                    .map_err(|e| bad("TLS key", &e))?;
                b.with_client_auth_cert(chain, key)
                    .map_err(|e| bad("client certificate", &e))?
            }
            (None, None) => b.with_no_client_auth(),
            _ => {
                return Err(NetError::Config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ))
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = tls.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| bad(&format!("TLS server name {name:?}"), &e))?;
        Ok(TlsDial {
            config: Arc::new(config),
            name,
        })
    }
}

/// A tonic client transport: one HTTP/2 connection, redialled on the first
/// call after it closed (as tonic's `Channel` does). Cheap to clone; the
/// clones share the connection.
#[derive(Clone)]
pub struct H2Channel {
    inner: Arc<Inner>,
}

struct Inner {
    dialer: Dialer,
    /// Scheme and authority put on every request (h2 needs both).
    origin: (http::uri::Scheme, http::uri::Authority),
    /// The live connection, if any.
    live: Mutex<Option<SendRequest<BoxBody>>>,
    /// Held while dialling, so concurrent calls share one new connection.
    dialling: tokio::sync::Mutex<()>,
}

impl H2Channel {
    /// Dials at once, so a wrong address or TLS setup fails here.
    pub(crate) async fn connect(dialer: Dialer) -> Result<H2Channel, NetError> {
        let scheme = if dialer.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        };
        let authority = match &dialer.endpoint {
            Endpoint::Tcp(a) => a.parse(),
            Endpoint::Unix(_) => "localhost".parse(),
        }
        .map_err(|e| NetError::Config(format!("{}: {e}", dialer.endpoint)))?;
        let ch = H2Channel {
            inner: Arc::new(Inner {
                dialer,
                origin: (scheme, authority),
                live: Mutex::new(None),
                dialling: tokio::sync::Mutex::new(()),
            }),
        };
        let tx = ch.inner.dial().await.map_err(|source| NetError::Connect {
            to: ch.inner.dialer.endpoint.to_string(),
            source,
        })?;
        *ch.inner.live.lock().unwrap() = Some(tx);
        Ok(ch)
    }
}

impl Inner {
    fn current(&self) -> Option<SendRequest<BoxBody>> {
        self.live
            .lock()
            .unwrap()
            .as_ref()
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    /// The live connection, or a new one.
    async fn sender(&self) -> Result<SendRequest<BoxBody>, BoxError> {
        if let Some(tx) = self.current() {
            return Ok(tx);
        }
        let _d = self.dialling.lock().await;
        if let Some(tx) = self.current() {
            return Ok(tx); // another call dialled meanwhile
        }
        let tx = self.dial().await.map_err(|e| {
            // Like tonic's channel: a server that cannot be reached is UNAVAILABLE.
            Box::new(tonic::Status::unavailable(format!(
                "cannot connect to {}: {e}",
                self.dialer.endpoint
            ))) as BoxError
        })?;
        *self.live.lock().unwrap() = Some(tx.clone());
        Ok(tx)
    }

    async fn dial(&self) -> Result<SendRequest<BoxBody>, BoxError> {
        let d = &self.dialer;
        let io: Box<dyn Io> = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let plain: Box<dyn Io> = match &d.endpoint {
                Endpoint::Tcp(a) => {
                    let s = tokio::net::TcpStream::connect(a.as_str()).await?;
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
                Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
            };
            let io: Box<dyn Io> = match &d.tls {
                None => plain,
                Some(t) => {
                    let s = tokio_rustls::TlsConnector::from(t.config.clone())
                        .connect(t.name.clone(), plain)
                        .await?;
                    if s.get_ref().1.alpn_protocol() != Some(b"h2") {
                        return Err(std::io::Error::other("the server did not agree to HTTP/2"));
                    }
                    Box::new(s)
                }
            };
            Ok::<_, std::io::Error>(io)
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        let mut b = http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .initial_stream_window_size(d.stream_window)
            .initial_connection_window_size(d.connection_window)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(d.keepalive.interval)
            .keep_alive_timeout(d.keepalive.timeout)
            .keep_alive_while_idle(d.keepalive.while_idle);
        let (tx, conn) = tokio::time::timeout(CONNECT_TIMEOUT, b.handshake(TokioIo::new(io)))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP/2 handshake timed out")
            })??;
        let to = d.endpoint.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%to, error = %e, "HTTP/2 connection ended");
            }
        });
        Ok(tx)
    }
}

/// A dialled byte stream: TCP or unix, maybe under TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl tower::Service<http::Request<BoxBody>> for H2Channel {
    type Response = http::Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is checked per call, on the connection it goes out on.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<BoxBody>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (scheme, authority) = inner.origin.clone();
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query(pq)
                .build()?;
            let mut tx = inner.sender().await?;
            // Waits while the server's limit of concurrent streams is reached.
            std::future::poll_fn(|cx| tx.poll_ready(cx)).await?;
            Ok(tx.send_request(req).await?.map(tonic::body::boxed))
        })
    }
}
