//! `r3map-csi-node`: the CSI node plugin of r3map-csi. Stages volumes as
//! kernel NBD devices served in this process by the r3map engine, and
//! re-attaches them after a restart (docs/csi.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use csi::pb::identity_server::IdentityServer;
use csi::pb::node_server::NodeServer;
use r3map::auth::ClientTls;
use r3map::remote::client::ConnectOptions;
use r3map_csi_node::plugin::identity::IdentityService;
use r3map_csi_node::plugin::migrate::{MigrationConfig, MigrationListener};
use r3map_csi_node::plugin::node::{Config, NodeService};

/// Command line.
#[derive(Parser, Debug)]
#[command(version, about = "CSI node plugin of r3map-csi")]
struct Args {
    /// CSI endpoint, unix:///PATH
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's id (NodeGetInfo; the owner of the regions it fences)
    #[arg(long, env = "NODE_ID")]
    nodeid: String,
    /// Driver name reported by GetPluginInfo
    #[arg(long, default_value = "r3map.csi.r3map.io")]
    drivername: String,
    /// Directory of the per-volume records, caches and credential files
    #[arg(long)]
    state_dir: PathBuf,
    /// The kubelet's directory: staging and target paths must be under it
    #[arg(long, default_value = csi::validate::KUBELET_DIR)]
    kubelet_dir: PathBuf,
    /// Region service, HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    region_service: String,
    /// Bearer token file for the region service
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA (PEM) of the region service's certificate: turns TLS on
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS
    #[arg(long, requires = "ca", requires = "key")]
    cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS
    #[arg(long, requires = "ca", requires = "cert")]
    key: Option<PathBuf>,
    /// Name the region service's certificate carries, when not the host
    #[arg(long, requires = "ca")]
    tls_name: Option<String>,
    /// Socketpairs (kernel connections) per device
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    connections: u16,
    /// Address of the migration service (other nodes pull volumes from
    /// here; the controller finalizes migrations): mutual TLS unless on
    /// loopback. Absent: no migration, unstaged volumes close at once
    #[arg(long, value_name = "HOST:PORT")]
    migration_listen: Option<String>,
    #[command(flatten)]
    migration_auth: csi::migration::PeerAuthArgs,
    /// How long an unstaged volume's region is kept for the next node
    #[arg(long, default_value = "5m", value_parser = r3map::cli::duration)]
    retain_for: Duration,
    /// How long reads from a migration source are retried before it counts as lost
    #[arg(long, default_value = "30s", value_parser = r3map::cli::duration)]
    migration_patience: Duration,
    /// Serve Prometheus /metrics (and /healthz) on HOST:PORT; none when
    /// absent. No authentication: metrics carry no secrets, but bind where
    /// only the scraper reaches (docs/metrics.md)
    #[arg(long, env = "METRICS_ADDRESS", value_name = "HOST:PORT")]
    metrics_address: Option<String>,
    /// Testing only: hold each mutating call's volume guard this long
    #[arg(long, hide = true, default_value_t = 0)]
    test_hold_ms: u64,
    /// Testing only: on SIGUSR1, end one kernel connection of every
    /// attached volume (the guest test of the connection supervisor)
    #[arg(long, hide = true)]
    test_cut_on_usr1: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("R3MAP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    csi::endpoint::parse(&a.endpoint)?;
    csi::validate::node_id(&a.nodeid)?;
    if !a.kubelet_dir.is_absolute() {
        return Err(format!("--kubelet-dir {} is not absolute", a.kubelet_dir.display()).into());
    }
    let region = ConnectOptions {
        addr: a.region_service.clone(),
        token_file: a.token_file.clone(),
        tls: a.ca.clone().map(|ca| ClientTls {
            ca,
            cert: a.cert.clone(),
            key: a.key.clone(),
            server_name: a.tls_name.clone(),
        }),
    };
    let node = Arc::new(NodeService::new(Config {
        node_id: a.nodeid.clone(),
        state_dir: a.state_dir.clone(),
        kubelet_dir: a.kubelet_dir.clone(),
        region,
        connections: usize::from(a.connections),
        hold: Duration::from_millis(a.test_hold_ms),
        migration: a.migration_listen.as_ref().map(|l| MigrationConfig {
            listen: l.clone(),
            auth: a.migration_auth.get(),
            retain_for: a.retain_for,
            patience: a.migration_patience,
        }),
    })?);
    let stop_bg = tokio_util::sync::CancellationToken::new();
    // Bound before recovery: kept regions are served to their next node
    // as soon as they are reopened.
    let migration = match &node.config().migration {
        Some(m) => {
            let l = MigrationListener::bind(m).await?;
            println!("r3map-csi-node: migration service on {}", l.local_addr());
            tracing::info!(addr = %l.local_addr(), "migration service");
            Some(l)
        }
        None => None,
    };
    // Before serving: the devices of recorded volumes wait (I/O paused, up
    // to the dead-connection timeout) for exactly this.
    for line in node.recover().await {
        // On stdout too: the e2e guest greps it.
        println!("r3map-csi-node: {line}");
        tracing::info!("{line}");
    }
    if let Some(l) = migration {
        let n = node.clone();
        let stop = stop_bg.clone();
        tokio::spawn(async move {
            if let Err(e) = l.serve(n, stop.cancelled_owned()).await {
                tracing::error!("migration service: {e}");
            }
        });
    }
    node.spawn_housekeeping(stop_bg.clone());
    if a.test_cut_on_usr1 {
        let n = node.clone();
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                for line in n.cut_one_connection_each().await {
                    // On stdout: the e2e guest greps it.
                    println!("r3map-csi-node: {line}");
                }
            }
        });
    }
    // Counted whether or not they are exported: cheap, and one server type.
    let calls = csi::metrics::CallMetrics::default();
    if let Some(addr) = &a.metrics_address {
        // Displayed, not Debug-printed, by main's error exit.
        let listener = csi::metrics::bind(addr).await.map_err(|e| e.to_string())?;
        tracing::info!(addr = %listener.local_addr()?, "serving metrics");
        let mut reg = prometheus_client::registry::Registry::default();
        calls.register(&mut reg);
        let n = node.clone();
        let exporter = csi::metrics::Exporter::new(reg).with_snapshot(move || {
            let n = n.clone();
            async move { r3map_csi_node::metrics::registry(n.volume_metrics().await) }
        });
        tokio::spawn(csi::metrics::serve(
            listener,
            Arc::new(exporter),
            std::future::pending(),
        ));
    }
    let router = tonic::transport::Server::builder()
        .add_service(calls.wrap(IdentityServer::new(IdentityService {
            name: a.drivername.clone(),
        })))
        .add_service(calls.wrap(NodeServer::from_arc(node)));
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // Staged volumes stay attached: the devices wait for the next
        // plugin process to RECONFIGURE them.
        tracing::info!("signalled; stopping, volumes stay attached");
    };
    csi::endpoint::serve(router, &a.endpoint, stop).await?;
    stop_bg.cancel();
    Ok(())
}
