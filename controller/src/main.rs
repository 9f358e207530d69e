//! `r3map-csi-controller`: the CSI controller plugin of r3map-csi. It
//! provisions volumes as regions of an `r3map backend` region service and
//! records which nodes hold them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use csi::pb::controller_server::ControllerServer;
use csi::pb::identity_server::IdentityServer;
use r3map::auth::ClientTls;
use r3map::remote::client::ConnectOptions;
use r3map_csi_controller::leader::{Leader, LeaderConfig};
use r3map_csi_controller::migrate::{self, KubeNodes, NodeDirectory, Peers, StaticNodes};
use r3map_csi_controller::records::{FileRecords, KubeOptions, KubeRecords, Records};
use r3map_csi_controller::{controller, identity, metrics, region};

/// Where the controller keeps its volume records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RecordStore {
    /// The state file under --state-dir (one host).
    File,
    /// R3mapVolume objects in the cluster (in-cluster config).
    Kubernetes,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(version, about = "CSI controller plugin of r3map-csi")]
struct Args {
    /// CSI endpoint, unix:///PATH
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// Driver name reported by GetPluginInfo
    #[arg(long, default_value = "r3map.csi.r3map.io")]
    drivername: String,
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
    /// Directory of the controller's state file and region credentials
    #[arg(long)]
    state_dir: PathBuf,
    /// Where the volume records live
    #[arg(long, value_enum, default_value = "file")]
    records: RecordStore,
    /// Serve mutating calls only while holding a coordination.k8s.io Lease
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the Lease and of the Events
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Name of the Lease
    #[arg(long, default_value = "r3map-csi-controller")]
    leader_election_lease_name: String,
    /// This replica's identity in the election (unique: the pod name)
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Largest volume, e.g. 1TiB
    #[arg(long, value_parser = r3map::size::parse, default_value = "16TiB")]
    max_volume_size: u64,
    /// A node's migration service, NODE=HOST:PORT (repeat for each node)
    #[arg(long = "node-endpoint", value_name = "NODE=HOST:PORT", value_parser = csi::migration::parse_node_endpoint)]
    node_endpoints: Vec<(String, String)>,
    /// Port of the node plugins' migration service on each Node's
    /// InternalIP (in a cluster; the node plugins use the host network)
    #[arg(long, value_name = "PORT")]
    node_migration_port: Option<u16>,
    #[command(flatten)]
    migration_auth: csi::migration::PeerAuthArgs,
    /// How often migrations in progress are looked at
    #[arg(long, default_value = "2s", value_parser = r3map::cli::duration)]
    reconcile_interval: Duration,
    /// Serve Prometheus /metrics (and /healthz) on HOST:PORT; none when
    /// absent. No authentication: metrics carry no secrets, but bind where
    /// only the scraper reaches (docs/metrics.md)
    #[arg(long, env = "METRICS_ADDRESS", value_name = "HOST:PORT")]
    metrics_address: Option<String>,
    /// Testing only: hold each mutating call's volume guard this long
    #[arg(long, hide = true, default_value_t = 0)]
    test_hold_ms: u64,
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
    let opts = ConnectOptions {
        addr: a.region_service.clone(),
        token_file: a.token_file.clone(),
        tls: a.ca.clone().map(|ca| ClientTls {
            ca,
            cert: a.cert.clone(),
            key: a.key.clone(),
            server_name: a.tls_name.clone(),
        }),
    };
    let regions = region::Regions::new(opts, a.state_dir.join("credentials"));
    let needs_kube = a.records == RecordStore::Kubernetes
        || a.leader_election
        || a.node_migration_port.is_some();
    let client = if needs_kube {
        // In-cluster configuration: the service account token and CA the
        // kubelet mounts, and KUBERNETES_SERVICE_HOST/PORT.
        Some(kube::Client::try_default().await?)
    } else {
        None
    };
    let identity = a.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "r3map-csi-controller".into())
    });
    let retries = metrics::WriteRetries::default();
    let records: Arc<dyn Records> = match (a.records, &client) {
        (RecordStore::Kubernetes, Some(c)) => {
            let mut o = KubeOptions::new(&a.region_service);
            o.events_namespace = a.namespace.clone();
            o.instance = identity.clone();
            o.write_retries = retries.clone();
            Arc::new(KubeRecords::new(c.clone(), o))
        }
        _ => Arc::new(FileRecords::open(&a.state_dir)?),
    };
    let leader = match (&client, a.leader_election) {
        (Some(c), true) => {
            let l = Leader::new(
                c.clone(),
                LeaderConfig::new(&a.namespace, &a.leader_election_lease_name, &identity),
            );
            l.spawn();
            Some(l)
        }
        _ => None,
    };
    let nodes: Option<Arc<dyn NodeDirectory>> = match (&client, a.node_migration_port) {
        (Some(c), Some(port)) => Some(Arc::new(KubeNodes::new(c.clone(), port))),
        _ if !a.node_endpoints.is_empty() => Some(Arc::new(StaticNodes(
            csi::migration::node_endpoints(&a.node_endpoints),
        ))),
        _ => None,
    };
    let peers = nodes.map(|nodes| {
        Arc::new(Peers {
            nodes,
            auth: a.migration_auth.get(),
            timeout: Duration::from_secs(120),
        })
    });
    // Bound before serving CSI, so a bad address stops the start.
    let metrics_listener = match &a.metrics_address {
        // Displayed, not Debug-printed, by main's error exit.
        Some(addr) => Some(csi::metrics::bind(addr).await.map_err(|e| e.to_string())?),
        None => None,
    };
    // Counted whether or not they are exported: cheap, and one server type.
    let calls = csi::metrics::CallMetrics::default();
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics");
        let list_errors = prometheus_client::metrics::counter::Counter::default();
        let mut reg = prometheus_client::registry::Registry::default();
        calls.register(&mut reg);
        metrics::register(&mut reg, &retries, &list_errors);
        let src = match (a.records, &client) {
            (RecordStore::Kubernetes, Some(c)) => metrics::VolumeSource::Kube(c.clone()),
            _ => metrics::VolumeSource::Records(records.clone()),
        };
        let leader = leader.clone();
        let exporter = csi::metrics::Exporter::new(reg).with_snapshot(move || {
            metrics::snapshot(src.clone(), leader.clone(), list_errors.clone())
        });
        tokio::spawn(csi::metrics::serve(
            listener,
            Arc::new(exporter),
            std::future::pending(),
        ));
    }
    let mut ctl = controller::ControllerService::new(
        records.clone(),
        leader.clone(),
        regions.clone(),
        a.max_volume_size,
        Duration::from_millis(a.test_hold_ms),
    )?;
    if let Some(p) = &peers {
        ctl = ctl.with_peers(p.clone());
        // Follows migrations to their end (progress, completion); only
        // the leader writes.
        let (p, records, leader, every) = (
            p.clone(),
            records.clone(),
            leader.clone(),
            a.reconcile_interval,
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if leader.as_ref().is_some_and(|l| !l.is_leader()) {
                    continue;
                }
                if let Err(e) = migrate::reconcile_once(records.as_ref(), &p).await {
                    tracing::warn!("reconciling migrations: {e}");
                }
            }
        });
    }
    let ident = identity::IdentityService {
        name: a.drivername.clone(),
        regions,
    };
    let router = tonic::transport::Server::builder()
        .add_service(calls.wrap(IdentityServer::new(ident)))
        .add_service(calls.wrap(ControllerServer::new(ctl)));
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signalled; stopping");
    };
    csi::endpoint::serve(router, &a.endpoint, stop).await?;
    if let Some(l) = leader {
        // Hand over at once instead of after the lease duration.
        if let Err(e) = l.release().await {
            tracing::warn!("releasing the lease: {e}");
        }
    }
    Ok(())
}
