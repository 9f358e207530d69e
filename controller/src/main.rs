//! `r3map-csi-controller`: the CSI controller plugin of r3map-csi. It
//! provisions volumes as regions of an `r3map backend` region service and
//! records which nodes hold them.

mod controller;
mod identity;
mod region;
mod state;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use csi::pb::controller_server::ControllerServer;
use csi::pb::identity_server::IdentityServer;
use r3map::auth::ClientTls;
use r3map::remote::client::ConnectOptions;

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
    /// Directory of the controller's state file
    #[arg(long)]
    state_dir: PathBuf,
    /// Largest volume, e.g. 1TiB
    #[arg(long, value_parser = r3map::size::parse, default_value = "16TiB")]
    max_volume_size: u64,
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
    let ctl = controller::ControllerService::new(
        &a.state_dir,
        regions.clone(),
        a.max_volume_size,
        Duration::from_millis(a.test_hold_ms),
    )?;
    let ident = identity::IdentityService {
        name: a.drivername.clone(),
        regions,
    };
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(ident))
        .add_service(ControllerServer::new(ctl));
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
    Ok(())
}
