//! The migration commands: `serve --seed-listen` (the source side),
//! `r3map leech` (the destination) and `r3map finalize` (tells a leech to
//! finalize). See docs/migration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tracing::{info, warn};

use super::leech::{self, Leech, LeechService};
use super::pb::{self, leech_server::LeechServer, seed_server::SeedServer};
use super::seed::SeedService;
use super::source::Source;
use crate::backend::Backend;
use crate::cli::{ClientTlsArgs, ServerTlsArgs};
use crate::nbd::{server, Export, Server};
use crate::net::{self, Endpoint, Keepalive, Listener, ServerAuth, ServerTls, Token};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| e.to_string())
}

/// Options of `r3map serve` that make it a migration source.
#[derive(Args, Debug, Clone, Default)]
pub struct SeedArgs {
    /// Also serve the migration `Seed` service here (HOST:PORT or a unix
    /// socket path), so a destination can `r3map leech --from` this region.
    /// A non-loopback address needs --token-file or --client-ca.
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub seed_listen: Option<Endpoint>,
    /// File holding the shared bearer token of the migration services.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS of the Seed service.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
}

/// The running Seed service of a `serve`; stops when dropped.
pub struct SeedHandle {
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for SeedHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Spawns the Seed service over `region` on a bound listener.
fn spawn_seed(
    l: Listener,
    region: Arc<Source>,
    token: Option<&Token>,
    tls: Option<&ServerTls>,
) -> Result<SeedHandle, BoxError> {
    let stop = tokio_util::sync::CancellationToken::new();
    let router = net::server(tls, Keepalive::MIGRATION)?.add_service(SeedServer::with_interceptor(
        SeedService::new(region),
        ServerAuth::new(token),
    ));
    let where_ = l.describe();
    let s = stop.clone();
    tokio::spawn(async move {
        info!(on = %where_, "migration: serving Seed");
        if let Err(e) = l.serve(router, s.cancelled_owned()).await {
            warn!(error = %e, "Seed service ended");
        }
    });
    Ok(SeedHandle { stop })
}

/// For `serve` and `mount`: with `--seed-listen`, serves the `Seed`
/// service over the volume's migration source (every volume has one);
/// without it, nothing (and the auth flags are refused).
pub async fn serve_seed(a: &SeedArgs, source: Arc<Source>) -> Result<Option<SeedHandle>, BoxError> {
    let Some(ep) = &a.seed_listen else {
        if a.token_file.is_some() || a.tls.given() {
            return Err(
                "--token-file, --tls-cert, --tls-key and --client-ca are for --seed-listen".into(),
            );
        }
        return Ok(None);
    };
    let token = net::token(a.token_file.as_deref())?;
    let tls = a.tls.get();
    let l = Listener::bind(ep, token.as_ref(), tls.as_ref()).await?;
    Ok(Some(spawn_seed(l, source, token.as_ref(), tls.as_ref())?))
}

/// Flags of `r3map leech`.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("transport").required(true).args(["socket", "listen"]))]
pub struct LeechArgs {
    /// The source's Seed service (HOST:PORT or unix socket path)
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub from: Endpoint,
    /// Local cache file for the region; its chunk states go to PATH.state
    /// and the migration record to PATH.migration (a leech started again
    /// on the same cache resumes)
    #[arg(long, value_name = "PATH")]
    pub cache: PathBuf,
    /// Serve the destination's NBD export on this unix socket
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve the destination's NBD export on this loopback address
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// Control endpoint (`Leech` service: finalize, status), HOST:PORT or a
    /// unix socket path
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub control: Endpoint,
    /// The region's own backend: where missing chunks come from if the seed
    /// is lost, and where this destination pushes its writes
    #[arg(long, value_name = "URI")]
    pub backend: Option<String>,
    /// Bearer token file: sent to the seed, and required by this leech's
    /// own control and Seed services
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS to the seed (--from)
    #[command(flatten)]
    pub from_tls: ClientTlsArgs,
    /// TLS of this leech's own control and Seed services
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Also serve Seed, so the next migration can pull from here (chains)
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub seed_listen: Option<Endpoint>,
    /// This destination's name as a writer of the region (recorded by a
    /// fenced store at finalize); random if not given
    #[arg(long, value_name = "NAME")]
    pub owner: Option<String>,
    /// Pull streams (each pulls runs of up to 8 MiB of missing chunks in
    /// one call)
    #[arg(long, default_value_t = leech::DEFAULT_PULL_STREAMS)]
    pub pull_workers: usize,
    /// An older copy of the region (e.g. the cache this node kept when the
    /// region left it; may be --cache itself): it becomes the cache, and
    /// only chunks whose hash differs from the seed's are pulled
    #[arg(long, value_name = "PATH")]
    pub reuse: Option<PathBuf>,
    /// Pre-copy rounds before the migration counts as converged even if
    /// they still shrink; 0 turns rounds off
    #[arg(long, default_value_t = leech::Precopy::default().max_rounds)]
    pub rounds: u32,
    /// A pre-copy round naming at most this many bytes converges
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    pub converge: u64,
    /// Once converged, interval between rounds
    #[arg(long, default_value = "500ms", value_parser = crate::cli::duration)]
    pub settle: Duration,
    /// How long failing seed reads are retried before the seed is declared lost
    #[arg(long, default_value = "5s", value_parser = crate::cli::duration)]
    pub seed_timeout: Duration,
    /// Export name; clients asking for the empty name get this export too
    #[arg(long, default_value = "r3map")]
    pub name: String,
}

/// `r3map leech`: runs until SIGINT/SIGTERM. Fails (exit non-zero) when the
/// migration cannot complete before finalize, or was stopped before it.
pub async fn run_leech(a: LeechArgs) -> Result<(), BoxError> {
    let token = net::token(a.token_file.as_deref())?;
    let tls = a.tls.get();
    if a.pull_workers == 0 {
        return Err("--pull-workers must be at least 1: a migration pulls everything".into());
    }
    // Bind every listener before contacting the seed: a bad flag must not
    // start tracking at the source.
    let ctl = Listener::bind(&a.control, token.as_ref(), tls.as_ref()).await?;
    let seed_l = match &a.seed_listen {
        Some(ep) => Some(Listener::bind(ep, token.as_ref(), tls.as_ref()).await?),
        None => None,
    };
    // Bound before the leech starts, so a busy address fails at once.
    let nbd_l = server::NbdListener::bind(a.socket.as_deref(), a.listen).await?;

    let leech = Leech::start(leech::Config {
        from: a.from.clone(),
        token: token.clone(),
        tls: a.from_tls.get(),
        cache: a.cache.clone(),
        fallback: a.backend.clone(),
        owner: a.owner.clone(),
        patience: a.seed_timeout,
        pull_workers: a.pull_workers,
        volume: None,
        reuse: a.reuse.clone(),
        precopy: leech::Precopy {
            max_rounds: a.rounds,
            converge_bytes: a.converge,
            settle: a.settle,
        },
    })
    .await?;

    // Writes go through a Source so this host can seed the next migration.
    let region = Source::open(
        leech.managed().clone() as Arc<dyn Backend>,
        leech.chunk_size(),
        Some(leech.managed().clone()),
        None,
    )
    .await?;
    let srv = Server::single(Export::new(a.name.clone(), region.backend()));
    let accept = srv.spawn_accept(nbd_l);
    let stop = tokio_util::sync::CancellationToken::new();
    let control = {
        let router = net::server(tls.as_ref(), Keepalive::MIGRATION)?.add_service(
            LeechServer::with_interceptor(
                LeechService(leech.clone()),
                ServerAuth::new(token.as_ref()),
            ),
        );
        let s = stop.clone();
        info!(on = %ctl.describe(), "migration: serving Leech control");
        tokio::spawn(async move {
            if let Err(e) = ctl.serve(router, s.cancelled_owned()).await {
                warn!(error = %e, "Leech control service ended");
            }
        })
    };
    let _seed = match seed_l {
        Some(l) => Some(spawn_seed(l, region.clone(), token.as_ref(), tls.as_ref())?),
        None => None,
    };
    println!(
        "r3map: leech of {} ({} bytes) serving export {:?}, held until finalize",
        a.from,
        leech.size(),
        a.name
    );

    let mut phase = leech.phase();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let res: Result<(), BoxError> = tokio::select! {
        _ = tokio::signal::ctrl_c() => { info!("SIGINT"); Ok(()) }
        _ = term.recv() => { info!("SIGTERM"); Ok(()) }
        r = accept => r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())).map_err(Into::into),
        // Before finalize a fatal error means the data can never be served.
        r = phase.wait_for(|p| (p.fatal.is_some() && !p.finalized) || p.aborted) => {
            let p = r.map(|p| p.clone()).unwrap_or_default();
            Err(p.fatal.unwrap_or_else(|| "migration aborted".into()).into())
        }
    };
    stop.cancel();
    // Graceful: a call in flight (the Abort that ended us) gets its answer.
    let _ = tokio::time::timeout(Duration::from_secs(5), control).await;
    srv.shutdown();
    let ph = leech.phase().borrow().clone();
    if res.is_ok() || ph.finalized {
        srv.drain().await;
        if ph.finalized {
            // Push what was written here to the region's backend, if any.
            if let Err(e) = leech.managed().sync().await {
                warn!(error = %e, "sync at exit failed");
            }
        }
    }
    leech.managed().close().await;
    res?;
    if let Some(f) = ph.fatal {
        return Err(f.into());
    }
    if !ph.finalized {
        return Err("stopped before finalize: the migration did not happen".into());
    }
    if ph.aborted {
        return Err("migration aborted".into());
    }
    if !leech.status().complete {
        warn!("stopped before every chunk was pulled: the rest is still on the source");
    }
    Ok(())
}

/// Flags of `r3map finalize`.
#[derive(Args, Debug)]
pub struct FinalizeArgs {
    /// The leech's control endpoint (its --control)
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub leech: Endpoint,
    /// Bearer token file, if the leech has one
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS to the leech's control endpoint.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// The source is dead and fenced: finalize without its dirty list,
    /// taking every chunk again from the leech's --backend
    #[arg(long)]
    pub seed_lost: bool,
    /// After finalizing, wait until every chunk is at the destination
    #[arg(long)]
    pub wait: bool,
    /// Before finalizing, wait until the pre-copy converged (its rounds
    /// are small or stopped shrinking), so the hand-over list is short
    #[arg(long)]
    pub converged: bool,
    /// Give up waiting after this long
    #[arg(long, default_value = "1h", value_parser = crate::cli::duration)]
    pub timeout: Duration,
}

/// A client of a leech's control endpoint, as `finalize`,
/// `migration-status` and `migration-abort` reach it.
async fn leech_client(
    leech: &Endpoint,
    token_file: Option<&Path>,
    tls: &ClientTlsArgs,
) -> Result<pb::leech_client::LeechClient<net::AuthedChannel>, BoxError> {
    let token = net::token(token_file)?;
    let tls = tls.get();
    let ch = net::connect(leech, token.as_ref(), tls.as_ref(), Keepalive::MIGRATION).await?;
    Ok(pb::leech_client::LeechClient::new(ch))
}

/// `r3map finalize`: prints one line of `key=value`s, and with --wait a
/// second one when the destination holds every chunk.
pub async fn run_finalize(a: FinalizeArgs) -> Result<(), BoxError> {
    let mut c = leech_client(&a.leech, a.token_file.as_deref(), &a.tls).await?;
    if a.converged {
        let deadline = Instant::now() + a.timeout;
        loop {
            let s = c
                .status(pb::StatusRequest {})
                .await
                .map_err(|s| format!("status: {}", s.message()))?
                .into_inner();
            if !s.error.is_empty() {
                return Err(format!("migration failed: {}", s.error).into());
            }
            if s.converged || s.finalized {
                println!(
                    "converged rounds={} last_round_chunks={}",
                    s.rounds, s.last_round_chunks
                );
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("not converged after {:?}", a.timeout).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let t = Instant::now();
    let r = c
        .finalize(pb::LeechFinalizeRequest {
            seed_lost: a.seed_lost,
        })
        .await
        .map_err(|s| format!("finalize: {}", s.message()))?
        .into_inner();
    println!(
        "finalized dirty_chunks={} unpushed_chunks={} epoch={} leech_us={} call_us={} seed_lost={} rounds={}",
        r.dirty_chunks,
        r.unpushed_chunks,
        r.epoch,
        r.elapsed_us,
        t.elapsed().as_micros(),
        r.seed_lost,
        r.rounds
    );
    if !a.wait {
        return Ok(());
    }
    let deadline = Instant::now() + a.timeout;
    loop {
        let s = c
            .status(pb::StatusRequest {})
            .await
            .map_err(|s| format!("status: {}", s.message()))?
            .into_inner();
        if !s.error.is_empty() {
            return Err(format!("migration failed: {}", s.error).into());
        }
        if s.aborted {
            return Err("migration aborted".into());
        }
        if s.complete {
            println!(
                "complete chunks={} wait_us={} bytes_pulled={} after_finalize={} reused={}",
                s.chunks_total,
                t.elapsed().as_micros(),
                s.bytes_pulled,
                s.bytes_pulled - s.bytes_pulled_at_finalize.min(s.bytes_pulled),
                s.chunks_reused
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not complete after {:?}: {}/{} chunks",
                a.timeout, s.chunks_present, s.chunks_total
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Flags of `r3map migration-status` and `migration-abort`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The leech's control endpoint (its --control)
    #[arg(long, value_name = "HOST:PORT|PATH")]
    pub leech: Endpoint,
    /// Bearer token file, if the leech has one
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS to the leech's control endpoint.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// `r3map migration-status`: one line of `key=value`s.
pub async fn run_status(a: StatusArgs) -> Result<(), BoxError> {
    let s = leech_client(&a.leech, a.token_file.as_deref(), &a.tls)
        .await?
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| format!("status: {}", s.message()))?
        .into_inner();
    println!(
        "size={} chunk_size={} total={} present={} finalized={} complete={} seed_lost={} fallback={} aborted={} epoch={} rounds={} last_round={} converged={} pulled={} reused={} error={:?}",
        s.size,
        s.chunk_size,
        s.chunks_total,
        s.chunks_present,
        s.finalized,
        s.complete,
        s.seed_lost,
        s.fallback,
        s.aborted,
        s.epoch,
        s.rounds,
        s.last_round_chunks,
        s.converged,
        s.bytes_pulled,
        s.chunks_reused,
        s.error
    );
    Ok(())
}

/// `r3map migration-abort`: gives a migration up before finalize.
pub async fn run_abort(a: StatusArgs) -> Result<(), BoxError> {
    leech_client(&a.leech, a.token_file.as_deref(), &a.tls)
        .await?
        .abort(pb::LeechAbortRequest {})
        .await
        .map_err(|s| format!("abort: {}", s.message()))?;
    println!("aborted");
    Ok(())
}
