//! `r3map backend`: serve a store of regions over gRPC until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;

use super::{RegionService, Store, DEFAULT_MAX_REQUEST};
use crate::auth::{check_listen, ServerAuth, Token};
use crate::backend::DEFAULT_CHUNK_SIZE;
use crate::cli::ServerTlsArgs;
use crate::net::{self, Keepalive};

/// Flags of `r3map backend`.
#[derive(clap::Args, Debug)]
pub struct BackendArgs {
    /// Address to serve on, e.g. 127.0.0.1:7100. Other than loopback only
    /// with --token-file or --client-ca.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: SocketAddr,
    /// Where regions live: dir:PATH, memory: or redis://HOST:PORT/DB?prefix=NAME
    #[arg(long, value_name = "URI")]
    pub store: String,
    /// Clients must send this token (file holding at least 16 characters)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS of the service
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Largest read or write of one call, e.g. 32MiB
    #[arg(long, value_parser = crate::size::parse, default_value_t = DEFAULT_MAX_REQUEST)]
    pub max_request: u64,
    /// Chunk size of the regions' backends (dir, redis, memory)
    #[arg(long, value_parser = crate::size::parse, default_value_t = DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
}

/// Runs `r3map backend` until SIGINT/SIGTERM, then flushes every region.
pub async fn run(a: BackendArgs) -> Result<(), Box<dyn std::error::Error>> {
    let token = a.token_file.as_deref().map(Token::from_file).transpose()?;
    let tls = a.tls.get();
    // Refused before anything is opened or bound.
    check_listen(a.listen, token.as_ref(), tls.as_ref())?;

    let store = Store::open(&a.store).await?;
    let svc = RegionService::open(store, a.chunk_size, a.max_request).await?;
    let mut builder = net::server(tls.as_ref(), Keepalive::REGION)?;
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    let addr = listener.local_addr()?;
    println!(
        "r3map backend: serving {} ({} regions) on {addr}{}{}",
        a.store,
        svc.len(),
        if tls.is_some() { ", TLS" } else { "" },
        if token.is_some() { ", token" } else { "" },
    );

    let router = builder.add_service(InterceptedService::new(
        svc.server(),
        ServerAuth::new(token.as_ref()),
    ));
    let signalled = std::sync::Arc::new(tokio::sync::Notify::new());
    let stop = {
        let signalled = signalled.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                _ = term.recv() => tracing::info!("SIGTERM"),
            }
            signalled.notify_one();
        }
    };
    let serve = net::Listener::Tcp(listener).serve(router, stop);
    tokio::pin!(serve);
    // Graceful shutdown waits for calls in flight; a stuck one must not
    // keep the regions from being flushed.
    tokio::select! {
        r = &mut serve => r?,
        _ = async {
            signalled.notified().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        } => tracing::warn!("calls still running 10 s after the signal; flushing anyway"),
    }
    svc.flush_all().await?;
    tracing::info!("flushed; exiting");
    Ok(())
}
