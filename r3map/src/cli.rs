//! Flags and parsers the `r3map` subcommands share (`serve`, `mount`,
//! `backend`, `leech`, `finalize`, ...): one definition each, so a flag
//! means the same thing on every command. CLI only: the library takes
//! typed values ([`ServerTls`], [`ClientTls`], [`Duration`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::auth::{ClientTls, ServerTls};

/// Parses a human duration (`20s`, `10ms`, `1h`) for clap.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// TLS of a server (`r3map backend`, and the migration services Seed and
/// Leech control): the same flags, the same meaning everywhere.
#[derive(Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// TLS certificate chain (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (mutual TLS)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The TLS setup, when a certificate and key were given.
    pub fn get(&self) -> Option<ServerTls> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            _ => None,
        }
    }

    /// Whether any of the flags was given (for commands that refuse them).
    pub fn given(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.client_ca.is_some()
    }
}

/// TLS of a client of the migration services, as the `ca`, `cert`, `key`
/// and `tls-name` parameters of an `r3map://` URI.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// Use TLS; the server's certificate must chain to this CA (PEM)
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server with --client-ca
    #[arg(long, value_name = "PEM", requires = "ca", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name the server's certificate carries, when not the host dialled
    #[arg(long, value_name = "NAME", requires = "ca")]
    pub tls_name: Option<String>,
}

impl ClientTlsArgs {
    /// The TLS setup, when a CA was given.
    pub fn get(&self) -> Option<ClientTls> {
        self.ca.as_ref().map(|ca| ClientTls {
            ca: ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.tls_name.clone(),
        })
    }
}
