//! Authentication between r3map hosts, shared by every gRPC service (remote
//! regions, migration, CSI): a bearer token read from a file, checked in
//! constant time by a server interceptor, and mutual TLS (rustls through
//! tonic) with a client CA.
//!
//! A server that other hosts can reach must authenticate its clients:
//! [`check_listen`] refuses a non-loopback address without a token or a
//! client CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Why a token or TLS setup could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A token, certificate or key file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Which file it was ("token file", "TLS key", ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error reading it.
        source: std::io::Error,
    },
    /// A weak token or an inconsistent TLS setup.
    #[error("{0}")]
    Config(String),
}

/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// A shared secret, read from a file (surrounding whitespace ignored).
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<secret>)")
    }
}

impl Token {
    /// A token from its text; must be printable ASCII of at least
    /// [`MIN_TOKEN_LEN`] characters (it travels in an HTTP header).
    pub fn new(secret: &str) -> Result<Token, AuthError> {
        let s = secret.trim();
        if s.len() < MIN_TOKEN_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Config(format!(
                "a token needs at least {MIN_TOKEN_LEN} printable ASCII characters and no spaces"
            )));
        }
        Ok(Token(s.to_string()))
    }

    /// A token from a file (see [`Token::new`]).
    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let s = read(path, "token file")?;
        let s = String::from_utf8(s)
            .map_err(|_| AuthError::Config(format!("token file {}: not UTF-8", path.display())))?;
        Token::new(&s).map_err(|e| AuthError::Config(format!("token file {}: {e}", path.display())))
    }

    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Server side: refuses every call without `authorization: Bearer TOKEN`
/// when a token is configured; lets everything through otherwise.
#[derive(Clone, Default)]
pub struct ServerAuth(Option<Vec<u8>>);

impl ServerAuth {
    /// Checks for `token`; `None` lets every call through.
    pub fn new(token: Option<&Token>) -> Self {
        ServerAuth(token.map(|t| t.header().into_bytes()))
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(got, want) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// Compares without an early exit, so the time taken does not tell an
/// attacker how many leading bytes were right. The length is not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Metadata key naming the volume a call is for, on servers that serve
/// several volumes' migration services behind one address (the CSI node
/// plugin).
pub const VOLUME_HEADER: &str = "r3map-volume";

/// Client side: adds `authorization: Bearer TOKEN` to every call, and the
/// volume ([`VOLUME_HEADER`]) when one is set.
#[derive(Clone, Default)]
pub struct ClientAuth {
    token: Option<MetadataValue<Ascii>>,
    volume: Option<MetadataValue<Ascii>>,
}

impl ClientAuth {
    /// Sends `token`; `None` sends nothing.
    pub fn new(token: Option<&Token>) -> Self {
        ClientAuth {
            // A Token is printable ASCII, which is always valid metadata.
            token: token.map(|t| t.header().parse().expect("token is valid metadata")),
            volume: None,
        }
    }

    /// Also names `volume` in every call; refused unless it is valid
    /// metadata (visible ASCII).
    pub fn with_volume(mut self, volume: &str) -> Result<Self, AuthError> {
        let v = volume
            .parse()
            .map_err(|_| AuthError::Config(format!("volume {volume:?} is not valid metadata")))?;
        self.volume = Some(v);
        Ok(self)
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.token {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(v) = &self.volume {
            req.metadata_mut().insert(VOLUME_HEADER, v.clone());
        }
        Ok(req)
    }
}

/// PEM files of a TLS server: its certificate chain and key, and the CA
/// that client certificates must chain to (mutual TLS) when given.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA that clients' certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// With a client CA, a client without a certificate signed by it fails
    /// the handshake.
    pub fn config(&self) -> Result<ServerTlsConfig, AuthError> {
        let id = Identity::from_pem(
            read(&self.cert, "TLS certificate")?,
            read(&self.key, "TLS key")?,
        );
        let mut c = ServerTlsConfig::new().identity(id);
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(c)
    }
}

/// PEM files of a TLS client: the CA the server's certificate must chain
/// to, and the client's own certificate and key for mutual TLS.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA the server's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// Client certificate (PEM), for a server that wants one.
    pub cert: Option<PathBuf>,
    /// Private key of `cert` (PEM).
    pub key: Option<PathBuf>,
    /// Name the server's certificate must carry; the host dialled otherwise.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The tonic setup for dialling `host` (the name its certificate must
    /// carry unless `server_name` says otherwise).
    pub fn config(&self, host: &str) -> Result<ClientTlsConfig, AuthError> {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca, "CA")?))
            .domain_name(self.server_name.clone().unwrap_or_else(|| host.to_string()));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                c = c.identity(Identity::from_pem(
                    read(cert, "TLS certificate")?,
                    read(key, "TLS key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(AuthError::Config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ))
            }
        }
        Ok(c)
    }
}

/// Refuses to serve on an address other hosts can reach unless clients
/// must authenticate, by a token or by a certificate from the client CA.
/// (TLS without a client CA only proves the server to the client.)
pub fn check_listen(
    addr: SocketAddr,
    token: Option<&Token>,
    tls: Option<&ServerTls>,
) -> Result<(), AuthError> {
    let mtls = tls.is_some_and(|t| t.client_ca.is_some());
    if addr.ip().is_loopback() || token.is_some() || mtls {
        return Ok(());
    }
    Err(AuthError::Config(format!(
        "refusing to listen on {addr} without authentication: give --token-file or \
         --tls-cert/--tls-key/--client-ca, or listen on a loopback address"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    #[test]
    fn token_checked() {
        let t = Token::new(SECRET).unwrap();
        let mut s = ServerAuth::new(Some(&t));
        let mut req = Request::new(());
        ClientAuth::new(Some(&t)).call(Request::new(())).unwrap();
        req.metadata_mut()
            .insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
        assert!(s.call(req).is_ok());
        let mut bad = Request::new(());
        bad.metadata_mut()
            .insert("authorization", "Bearer 0123456789abcdeX".parse().unwrap());
        assert_eq!(
            s.call(bad).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            s.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(ServerAuth::new(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn weak_tokens_refused() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("0123456789 abcdef").is_err());
        assert!(Token::new("  0123456789abcdef\n").is_ok());
    }

    #[test]
    fn exposed_listener_needs_auth() {
        let t = Token::new(SECRET).unwrap();
        let open: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let tls = ServerTls {
            cert: "c".into(),
            key: "k".into(),
            client_ca: None,
        };
        assert!(check_listen(lo, None, None).is_ok());
        assert!(check_listen(open, None, None).is_err());
        assert!(check_listen(open, None, Some(&tls)).is_err());
        assert!(check_listen(open, Some(&t), None).is_ok());
        let mtls = ServerTls {
            client_ca: Some("ca".into()),
            ..tls
        };
        assert!(check_listen(open, None, Some(&mtls)).is_ok());
    }

    #[test]
    fn compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
