//! What the controller and node plugins share about migration between
//! nodes (docs/migration.md, "Driven by attach and detach"): the publish
//! context keys that tell a node where to pull a volume from, the
//! credentials of the node-to-node migration service, and how to dial it.
//!
//! The rule on credentials: across hosts only mutual TLS; a bearer token
//! only on loopback, where nothing else can read it on the wire.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use r3map::auth::{ClientTls, ServerTls, Token};
use r3map::net::{self, AuthedChannel, Endpoint, Keepalive};

use crate::nodepb::node_migration_client::NodeMigrationClient;
use crate::{CsiError, CsiResult};

/// publish_context: the migration service of the node to pull from.
pub const CTX_MIGRATE_FROM: &str = "migrateFrom";
/// publish_context: the node id of that node.
pub const CTX_MIGRATE_FROM_NODE: &str = "migrateFromNode";
/// publish_context: [`LIVE`] or [`HANDOVER`].
pub const CTX_MIGRATION: &str = "migration";
/// The source still writes: pre-copy with the device held until finalize.
pub const LIVE: &str = "live";
/// The source no longer writes (it was unstaged and kept the region):
/// take it over at once and fetch the rest on demand.
pub const HANDOVER: &str = "handover";

/// How a migration was asked for in a publish context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateFrom {
    /// The source node's migration service, HOST:PORT.
    pub endpoint: String,
    /// The source node's id.
    pub node: String,
    /// True for [`LIVE`], false for [`HANDOVER`].
    pub live: bool,
}

impl MigrateFrom {
    /// The keys of a publish context.
    pub fn to_context(&self, ctx: &mut std::collections::HashMap<String, String>) {
        ctx.insert(CTX_MIGRATE_FROM.into(), self.endpoint.clone());
        ctx.insert(CTX_MIGRATE_FROM_NODE.into(), self.node.clone());
        let mode = if self.live { LIVE } else { HANDOVER };
        ctx.insert(CTX_MIGRATION.into(), mode.into());
    }

    /// Reads a publish context: `None` when it names no migration,
    /// InvalidArgument when it names one badly.
    pub fn from_context(
        ctx: &std::collections::HashMap<String, String>,
    ) -> CsiResult<Option<MigrateFrom>> {
        let Some(endpoint) = ctx.get(CTX_MIGRATE_FROM) else {
            return Ok(None);
        };
        if net::host_port(endpoint).is_none() {
            return Err(CsiError::InvalidArgument(format!(
                "publish_context {CTX_MIGRATE_FROM} {endpoint:?} is not HOST:PORT"
            )));
        }
        let node = ctx.get(CTX_MIGRATE_FROM_NODE).cloned().unwrap_or_default();
        crate::validate::node_id(&node)?;
        let live = match ctx.get(CTX_MIGRATION).map(String::as_str) {
            Some(LIVE) => true,
            Some(HANDOVER) => false,
            other => {
                return Err(CsiError::InvalidArgument(format!(
                    "publish_context {CTX_MIGRATION} {other:?} is neither {LIVE:?} nor {HANDOVER:?}"
                )))
            }
        };
        Ok(Some(MigrateFrom {
            endpoint: endpoint.clone(),
            node,
            live,
        }))
    }
}

/// Credentials of the migration service, both ways: a node serves with
/// them and dials peers with them; the controller dials nodes.
#[derive(Debug, Clone, Default)]
pub struct PeerAuth {
    /// Bearer token file (loopback only).
    pub token_file: Option<PathBuf>,
    /// CA every peer's certificate must chain to (PEM).
    pub ca: Option<PathBuf>,
    /// This side's certificate (PEM): served, and shown as a client.
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// Name every peer's certificate carries (they share one), instead of
    /// the address dialled.
    pub tls_name: Option<String>,
}

fn bad(msg: String) -> CsiError {
    CsiError::InvalidArgument(msg)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl PeerAuth {
    /// Mutual TLS is set up (CA, certificate and key).
    pub fn mtls(&self) -> bool {
        self.ca.is_some() && self.cert.is_some() && self.key.is_some()
    }

    fn token(&self) -> CsiResult<Option<Token>> {
        self.token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()
            .map_err(|e| bad(format!("migration token: {e}")))
    }

    /// The server side for `listen`: mutual TLS, or a token on loopback.
    pub fn server(&self, listen: &str) -> CsiResult<(Option<Token>, Option<ServerTls>)> {
        let (host, _) = net::host_port(listen)
            .ok_or_else(|| bad(format!("migration listen {listen:?} is not HOST:PORT")))?;
        let tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.ca.clone(),
            }),
            _ => None,
        };
        if !is_loopback(host) && !self.mtls() {
            return Err(bad(format!(
                "migration listen {listen}: other hosts can reach it, so it needs mutual TLS \
                 (--migration-ca, --migration-cert, --migration-key); a token is for loopback only"
            )));
        }
        Ok((self.token()?, tls))
    }

    /// Dials `endpoint` (HOST:PORT) naming `volume` in every call, for the
    /// engine's Seed service behind a node's migration address.
    pub async fn channel(&self, endpoint: &str, volume: Option<&str>) -> CsiResult<AuthedChannel> {
        let (host, _) = net::host_port(endpoint)
            .ok_or_else(|| bad(format!("migration endpoint {endpoint:?} is not HOST:PORT")))?;
        let tls = self.client_tls();
        if tls.is_none() && !is_loopback(host) {
            return Err(CsiError::FailedPrecondition(format!(
                "migration endpoint {endpoint} is not on loopback and no TLS is set up \
                 (--migration-ca, --migration-cert, --migration-key)"
            )));
        }
        let token = if tls.is_none() { self.token()? } else { None };
        let ep = Endpoint::Tcp(endpoint.to_string());
        let ch = tokio::time::timeout(
            Duration::from_secs(10),
            net::connect_volume(
                &ep,
                token.as_ref(),
                tls.as_ref(),
                Keepalive::MIGRATION,
                volume,
            ),
        )
        .await
        .map_err(|_| CsiError::Unavailable(format!("node {endpoint}: connect timed out")))?
        .map_err(|e| CsiError::Unavailable(format!("node {endpoint}: {e}")))?;
        Ok(ch)
    }

    /// The client TLS setup, when a CA is given.
    pub fn client_tls(&self) -> Option<ClientTls> {
        self.ca.as_ref().map(|ca| ClientTls {
            ca: ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.tls_name.clone(),
        })
    }

    /// The token to send, on loopback without TLS only.
    pub fn client_token(&self, endpoint: &str) -> CsiResult<Option<Token>> {
        let loopback = net::host_port(endpoint).is_some_and(|(h, _)| is_loopback(h));
        if self.ca.is_none() && loopback {
            self.token()
        } else {
            Ok(None)
        }
    }

    /// A client of the NodeMigration service at `endpoint`.
    pub async fn node_client(
        &self,
        endpoint: &str,
    ) -> CsiResult<NodeMigrationClient<AuthedChannel>> {
        Ok(NodeMigrationClient::new(
            self.channel(endpoint, None).await?,
        ))
    }
}

/// Command-line flags of the migration service's credentials, the same on
/// both binaries.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PeerAuthArgs {
    /// CA (PEM) of the node plugins' migration certificates (mutual TLS)
    #[arg(long, value_name = "PEM")]
    pub migration_ca: Option<PathBuf>,
    /// Certificate (PEM) this process shows to peers, as server and client
    #[arg(long, value_name = "PEM", requires = "migration_key")]
    pub migration_cert: Option<PathBuf>,
    /// Key (PEM) of --migration-cert
    #[arg(long, value_name = "PEM", requires = "migration_cert")]
    pub migration_key: Option<PathBuf>,
    /// Name the peers' certificates carry
    #[arg(long, value_name = "NAME", default_value = "r3map-node")]
    pub migration_tls_name: String,
    /// Bearer token file for the migration service (loopback only)
    #[arg(long, value_name = "FILE")]
    pub migration_token_file: Option<PathBuf>,
}

impl PeerAuthArgs {
    /// The credentials.
    pub fn get(&self) -> PeerAuth {
        PeerAuth {
            token_file: self.migration_token_file.clone(),
            ca: self.migration_ca.clone(),
            cert: self.migration_cert.clone(),
            key: self.migration_key.clone(),
            tls_name: Some(self.migration_tls_name.clone()),
        }
    }
}

/// Parses `NODE=HOST:PORT` (the controller's `--node-endpoint`).
pub fn parse_node_endpoint(s: &str) -> Result<(String, String), String> {
    let (node, ep) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NODE=HOST:PORT"))?;
    crate::validate::node_id(node).map_err(|e| e.to_string())?;
    net::host_port(ep).ok_or_else(|| format!("{ep:?} is not HOST:PORT"))?;
    Ok((node.to_string(), ep.to_string()))
}

/// Node id -> migration endpoint, from `--node-endpoint` flags.
pub fn node_endpoints(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn context_round_trip_and_errors() {
        let m = MigrateFrom {
            endpoint: "10.0.0.1:7443".into(),
            node: "node-a".into(),
            live: true,
        };
        let mut ctx = HashMap::new();
        m.to_context(&mut ctx);
        assert_eq!(MigrateFrom::from_context(&ctx).unwrap(), Some(m));
        assert_eq!(MigrateFrom::from_context(&HashMap::new()).unwrap(), None);
        ctx.insert(CTX_MIGRATION.into(), "sideways".into());
        let e = MigrateFrom::from_context(&ctx).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        ctx.insert(CTX_MIGRATION.into(), HANDOVER.into());
        ctx.insert(CTX_MIGRATE_FROM.into(), "nohost".into());
        assert!(MigrateFrom::from_context(&ctx).is_err());
    }

    #[test]
    fn token_only_on_loopback() {
        let a = PeerAuth {
            token_file: Some("/nonexistent".into()),
            ..PeerAuth::default()
        };
        let e = a.server("0.0.0.0:7443").unwrap_err();
        assert!(e.to_string().contains("mutual TLS"), "{e}");
        // On loopback the token is used (and this one cannot be read).
        assert!(a.server("127.0.0.1:7443").is_err());
        let none = PeerAuth::default();
        assert!(none.server("127.0.0.1:0").is_ok());
        assert!(none.server("[::1]:0").is_ok());
    }

    #[test]
    fn node_endpoint_flag() {
        assert_eq!(
            parse_node_endpoint("node-a=127.0.0.1:7001").unwrap(),
            ("node-a".into(), "127.0.0.1:7001".into())
        );
        assert!(parse_node_endpoint("node-a").is_err());
        assert!(parse_node_endpoint("node-a=nohost").is_err());
    }
}
