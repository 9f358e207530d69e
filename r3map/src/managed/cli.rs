//! `r3map mount`: serve a remote backend through a managed local cache.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tracing::{debug, info, warn};

use super::{
    Durability, Managed, Options, DEFAULT_CHUNK_SIZE, DEFAULT_PULL_WORKERS, DEFAULT_PUSH_WORKERS,
};
use crate::nbd::server;
use crate::volume::{Mode, Volume, VolumeSpec};

/// Flags of `r3map mount`.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("transport").required(true).args(["socket", "listen"]))]
pub struct MountArgs {
    /// Where the bytes live: any backend URI (memory:, file:PATH, dir:PATH, redis://...)
    #[arg(long, value_name = "URI")]
    pub remote: String,
    /// Size of the region, e.g. 1GiB
    #[arg(long, value_parser = crate::size::parse)]
    pub size: u64,
    /// Local cache file (sparse, the size of the region); its chunk states
    /// are kept in PATH.state, and counters in PATH.progress.json
    #[arg(long, value_name = "PATH")]
    pub cache: PathBuf,
    /// Serve on a unix socket at this path
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Serve over TCP on this loopback address, e.g. 127.0.0.1:10809
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// Chunk size of the cache (and of a chunked remote)
    #[arg(long, value_parser = crate::size::parse, default_value_t = DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Most background fetches at once; the window adapts below it to the
    /// measured bandwidth-delay product (0: fetch on demand only)
    #[arg(long, default_value_t = DEFAULT_PULL_WORKERS)]
    pub pull_workers: usize,
    /// Concurrent chunk pushes
    #[arg(long, default_value_t = DEFAULT_PUSH_WORKERS)]
    pub push_workers: usize,
    /// Interval between background pushes of written chunks
    #[arg(long, value_parser = crate::cli::duration, default_value = "20s")]
    pub push_interval: Duration,
    /// flush: an fsync returns once the data is pushed to the remote;
    /// async: fsync only syncs the local cache (writes since the last push
    /// are lost if the host dies)
    #[arg(long, value_enum, default_value_t = Durability::Flush)]
    pub durability: Durability,
    /// Export name; clients asking for the empty name get this export too
    #[arg(long, default_value = "r3map")]
    pub name: String,
    /// Migration source: `--seed-listen` and its auth (see `r3map serve`).
    /// The finalize answer is kept in PATH.migration: a mount restarted
    /// after handing its region over stays closed to writes and never pushes.
    #[command(flatten)]
    pub seed: crate::migration::cli::SeedArgs,
}

/// Path of the status file: counters as JSON, rewritten every second.
pub fn progress_path(cache: &Path) -> PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".progress.json");
    PathBuf::from(s)
}

fn write_progress(path: &Path, m: &Managed) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let r = std::fs::write(&tmp, m.progress().to_json() + "\n")
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        warn!(path = %path.display(), error = %e, "cannot write the progress file");
    }
}

/// How long a clean exit may take to drain, push and flush before giving
/// up: long enough for a large push over a slow link, bounded so a stuck
/// remote cannot keep the process forever.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(600);

/// Runs `r3map mount` until SIGINT/SIGTERM, then pushes everything and exits.
pub async fn run(a: MountArgs) -> Result<(), Box<dyn std::error::Error>> {
    let opts = Options {
        chunk_size: a.chunk_size,
        pull_workers: a.pull_workers,
        push_workers: a.push_workers,
        push_interval: a.push_interval,
        durability: a.durability,
    };
    let spec = VolumeSpec {
        mode: Mode::Managed {
            cache: a.cache.clone(),
            options: opts,
        },
        chunk_size: a.chunk_size,
        ..VolumeSpec::direct(a.name.clone(), a.remote.as_str(), a.size)
    };
    // Pulling starts here, before the export is reachable.
    let vol = Volume::open(spec).await?;
    let m = vol.managed().expect("a managed volume").clone();
    let _seed = crate::migration::cli::serve_seed(&a.seed, vol.source().clone())
        .await
        .map_err(|e| e as Box<dyn std::error::Error>)?;

    let accept = vol
        .server()
        .spawn_accept(server::NbdListener::bind(a.socket.as_deref(), a.listen).await?);
    let ppath = progress_path(&a.cache);
    let reporter = {
        let (m, ppath) = (m.clone(), ppath.clone());
        tokio::spawn(async move {
            loop {
                write_progress(&ppath, &m);
                debug!(progress = %m.progress().to_json(), "managed mount");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    println!(
        "r3map: mounting {} ({} bytes, cache {}) as export {:?}",
        a.remote,
        a.size,
        a.cache.display(),
        a.name
    );

    tokio::select! {
        r = crate::nbd::server::termination_signal() => { r?; }
        r = accept => { r??; }
    }
    // Whatever the durability mode, a clean exit leaves nothing unpushed
    // (a sealed mount pushes nothing: its region lives elsewhere now).
    let res = vol.close(std::time::Instant::now() + EXIT_DEADLINE).await;
    reporter.abort();
    write_progress(&ppath, &m);
    let p = m.progress();
    info!(
        pulled = p.bytes_pulled,
        pushed = p.bytes_pushed,
        dirty = p.chunks_dirty,
        "exiting"
    );
    res?;
    Ok(())
}
