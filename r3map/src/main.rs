//! `r3map`: serve a storage backend as an NBD export.

use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use r3map::backend::DEFAULT_CHUNK_SIZE;
use r3map::managed::cli::EXIT_DEADLINE;
use r3map::nbd::server;
use r3map::volume::{BackendSpec, Volume, VolumeSpec};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "r3map",
    version,
    about = "Remote mmap: any storage backend as a Linux block device over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a backend as an NBD export until SIGINT/SIGTERM, then flush and exit.
    Serve(ServeArgs),
    /// Relay TCP connections to a target, adding a round-trip time (latency injection for tests and bench).
    Relay(RelayArgs),
    /// Serve a store of regions over gRPC (for r3map://HOST:PORT/REGION backends) until SIGINT/SIGTERM.
    Backend(r3map::remote::cli::BackendArgs),
    /// Serve a remote backend through a local cache: pull in the background, push written chunks.
    Mount(r3map::managed::cli::MountArgs),
    /// Migration destination: pull a region from a source's Seed, serve it once finalized.
    // Boxed: by far the largest set of flags (clippy::large_enum_variant).
    Leech(Box<r3map::migration::cli::LeechArgs>),
    /// Tell a leech to finalize its migration (the source stops taking writes).
    Finalize(r3map::migration::cli::FinalizeArgs),
    /// Progress of a leech: chunks present, finalized, complete.
    MigrationStatus(r3map::migration::cli::StatusArgs),
    /// Give a migration up before finalize (the source keeps serving, the leech drops its cache).
    MigrationAbort(r3map::migration::cli::StatusArgs),
}

#[derive(Args)]
struct RelayArgs {
    /// Loopback address to accept on, e.g. 127.0.0.1:20000
    #[arg(long)]
    listen: SocketAddr,
    /// Where to connect for each accepted connection
    #[arg(long)]
    to: SocketAddr,
    /// Round-trip time to add, e.g. 10ms (half in each direction)
    #[arg(long, value_parser = r3map::cli::duration)]
    rtt: Duration,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("transport").required(true).args(["socket", "listen", "fd"]))]
struct ServeArgs {
    /// Where the bytes live: memory:, file:PATH, dir:PATH or redis://HOST:PORT/DB?prefix=NAME
    #[arg(long, value_name = "URI")]
    backend: String,
    /// Size of the export, e.g. 1GiB, 512MiB, 4096
    #[arg(long, value_parser = r3map::size::parse)]
    size: u64,
    /// Serve on a unix socket at this path
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Serve over TCP on this loopback address, e.g. 127.0.0.1:10809
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Serve one already-connected socket inherited as this file descriptor
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// Refuse writes, trims and zeroing
    #[arg(long)]
    read_only: bool,
    /// Chunk size of chunked backends (dir, redis, memory)
    #[arg(long, value_parser = r3map::size::parse, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Export name; clients asking for the empty name get this export too
    #[arg(long, default_value = "r3map")]
    name: String,
    #[command(flatten)]
    seed: r3map::migration::cli::SeedArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("R3MAP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Process-wide allocator tuning is the program's choice, made once
    // here before the runtime's threads start allocating.
    r3map::remote::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Relay(a) => relay(a).await,
            Cmd::Backend(a) => r3map::remote::cli::run(a).await,
            Cmd::Mount(a) => r3map::managed::cli::run(a).await,
            Cmd::Leech(a) => r3map::migration::cli::run_leech(*a)
                .await
                .map_err(|e| e as _),
            Cmd::Finalize(a) => r3map::migration::cli::run_finalize(a)
                .await
                .map_err(|e| e as _),
            Cmd::MigrationStatus(a) => r3map::migration::cli::run_status(a)
                .await
                .map_err(|e| e as _),
            Cmd::MigrationAbort(a) => r3map::migration::cli::run_abort(a)
                .await
                .map_err(|e| e as _),
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("r3map: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(a: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let backend = r3map::uri::open_backend(&a.backend, a.size, a.chunk_size).await?;
    let vol = Volume::open(VolumeSpec {
        read_only: a.read_only,
        chunk_size: a.chunk_size,
        ..VolumeSpec::direct(a.name.clone(), BackendSpec::Open(backend), a.size)
    })
    .await?;
    let _seed = r3map::migration::cli::serve_seed(&a.seed, vol.source().clone())
        .await
        .map_err(|e| e as Box<dyn std::error::Error>)?;
    let srv = vol.server();

    let accept = if let Some(fd) = a.fd {
        // SAFETY: the caller handed us this descriptor to own.
        let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        std.set_nonblocking(true)?;
        let conn = srv.spawn_connected(tokio::net::UnixStream::from_std(std)?);
        // One connection: serve until it ends.
        tokio::spawn(async move { conn.await.map_err(std::io::Error::other) })
    } else {
        srv.spawn_accept(server::NbdListener::bind(a.socket.as_deref(), a.listen).await?)
    };
    println!(
        "r3map: serving {} ({} bytes) as export {:?}",
        a.backend, a.size, a.name
    );

    tokio::select! {
        r = server::termination_signal() => { r?; }
        r = accept => { r??; }
    }
    vol.close(Instant::now() + EXIT_DEADLINE).await?;
    info!("flushed; exiting");
    Ok(())
}

async fn relay(a: RelayArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !a.listen.ip().is_loopback() {
        return Err(format!("refusing to relay on {}: loopback only", a.listen).into());
    }
    let l = tokio::net::TcpListener::bind(a.listen).await?;
    tokio::select! {
        r = r3map::relay::run(l, a.to, a.rtt) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
