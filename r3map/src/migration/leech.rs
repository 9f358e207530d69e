//! The destination side: a [`Managed`] cache whose source is the seed,
//! held (I/O waits) until finalize, and the `Leech` control service that
//! finalizes it.
//!
//! Never stale, by construction: every chunk the seed reports written
//! since Track is made Missing (in-flight fetches of it discarded) before
//! the export is released; if the seed is lost before finalize, nothing
//! pulled from it is trusted and every chunk is taken again from the
//! fallback backend; without a fallback the destination refuses to serve.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::pb::{self, leech_server};
use super::pull::{self, Puller};
use super::record::{self, Handover, LeechRecord};
use super::seed::{chunk_list, handover_of, SeedClient};
use crate::backend::Backend;
use crate::managed::{self, Managed};
use crate::net::{self, Endpoint, Keepalive, Token};
use crate::{Error, Result};

/// How to start (or resume) a leech.
pub struct Config {
    /// The source's `Seed` endpoint.
    pub from: Endpoint,
    /// Bearer token for the seed.
    pub token: Option<Token>,
    /// TLS to the seed (with a client certificate for mutual TLS).
    pub tls: Option<crate::net::ClientTls>,
    /// Local cache; its chunk states go to `CACHE.state`, the migration
    /// record to `CACHE.migration`.
    pub cache: PathBuf,
    /// The region's own backend URI: where chunks come from if the seed is
    /// lost, and where the destination pushes its writes.
    pub fallback: Option<String>,
    /// This destination's name as a writer of a fenced region (recorded by
    /// the store at finalize). A random one is chosen and recorded if none.
    pub owner: Option<String>,
    /// How long seed reads are retried before the seed is declared lost.
    pub patience: Duration,
    /// Pull streams: each pulls runs of consecutive missing chunks (up to
    /// 8 MiB) in one call.
    pub pull_workers: usize,
    /// The volume to ask for when the seed's server serves several (sent
    /// as [`crate::auth::VOLUME_HEADER`] with every call).
    pub volume: Option<String>,
    /// An older copy of the region (a cache this node kept when the region
    /// left it, or any file holding the region's bytes as they once were).
    /// It becomes the cache (renamed, so on the same file system; it may be
    /// `cache` itself), every chunk is checked against the seed's hash and
    /// only the differing ones are pulled. Ignored on a resume past its
    /// check. A file of another size is cut or extended to the region's.
    pub reuse: Option<PathBuf>,
    /// Iterative pre-copy.
    pub precopy: Precopy,
}

impl Config {
    /// A configuration with the defaults: no token, TLS, fallback or old
    /// copy, a random owner, 5 s of patience, 8 pull streams, default
    /// pre-copy rounds.
    pub fn new(from: Endpoint, cache: PathBuf) -> Config {
        Config {
            from,
            token: None,
            tls: None,
            cache,
            fallback: None,
            owner: None,
            patience: Duration::from_secs(5),
            pull_workers: DEFAULT_PULL_STREAMS,
            reuse: None,
            precopy: Precopy::default(),
            volume: None,
        }
    }
}

/// Default pull streams of a destination: enough to keep a 10 ms link
/// busy at 1 GB/s (8 x 8 MiB in flight), few enough not to thrash 2 CPUs.
pub const DEFAULT_PULL_STREAMS: usize = 8;

/// Iterative pre-copy (Silo's approach): after the first pass, rounds of
/// the chunks written at the source meanwhile, each re-pulled, until a
/// round is small or stops shrinking: then the migration is *converged*
/// and a finalize hands over only what was written since the last round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Precopy {
    /// Rounds before the migration counts as converged even if the rounds
    /// still shrink; 0 turns rounds off (finalize hands over every chunk
    /// written since Track).
    pub max_rounds: u32,
    /// A round naming at most this many bytes of chunks converges.
    pub converge_bytes: u64,
    /// Once converged, rounds go on at this interval (so the hand-over list
    /// stays short whenever finalize comes) rather than back to back (a
    /// chunk the source rewrites all the time would be pulled again and
    /// again).
    pub settle: Duration,
}

impl Default for Precopy {
    fn default() -> Self {
        Precopy {
            max_rounds: 10,
            converge_bytes: 16 << 20,
            settle: Duration::from_millis(500),
        }
    }
}

/// What happened to the migration, for status and the process exit code.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Finalize succeeded: the export is released.
    pub finalized: bool,
    /// The seed was declared lost.
    pub seed_lost: bool,
    /// Missing chunks come from the fallback backend.
    pub fallback_active: bool,
    /// The migration was given up ([`Leech::abort`]).
    pub aborted: bool,
    /// Set when the destination can no longer complete the migration.
    pub fatal: Option<String>,
    /// The pre-copy rounds converged (see [`Precopy`]).
    pub converged: bool,
}

/// Typed status of a destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationStatus {
    /// Region size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Chunks in the region.
    pub chunks_total: u64,
    /// Chunks held here (local or written here).
    pub chunks_present: u64,
    /// Finalize succeeded.
    pub finalized: bool,
    /// Finalized and every chunk is here: the source may stop.
    pub complete: bool,
    /// The seed was declared lost.
    pub seed_lost: bool,
    /// Missing chunks come from the fallback backend.
    pub fallback: bool,
    /// Given up.
    pub aborted: bool,
    /// The epoch this destination took the region over at, if fenced.
    pub epoch: Option<u64>,
    /// Why the migration cannot complete, if it cannot.
    pub error: Option<String>,
    /// Pre-copy rounds applied.
    pub rounds: u64,
    /// Chunks the last round named.
    pub last_round_chunks: u64,
    /// The rounds are small or stopped shrinking: finalize now.
    pub converged: bool,
    /// Bytes pulled as of finalize (the rest of `progress.bytes_pulled`
    /// came after the hand-over).
    pub bytes_pulled_at_finalize: Option<u64>,
    /// Chunks taken from an older copy after a hash check.
    pub chunks_reused: u64,
    /// The cache's counters.
    pub progress: crate::managed::Progress,
}

/// What finalize did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FinalizeOutcome {
    /// Chunks written at the source since Track (pulled again first).
    pub dirty_chunks: u64,
    /// Chunks the source never pushed (pushed from here).
    pub unpushed_chunks: u64,
    /// Time inside the call, request to release, in microseconds.
    pub elapsed_us: u64,
    /// Finalized without the seed (every chunk from the fallback).
    pub seed_lost: bool,
    /// The epoch the region was taken over at, if fenced.
    pub epoch: Option<u64>,
    /// Pre-copy rounds applied before finalize.
    pub rounds: u64,
}

/// Where the pre-copy rounds stand.
#[derive(Debug, Default)]
struct Rounds {
    /// Chunks named by the last round, and by the one before.
    last: u64,
    prev: u64,
    applied: u64,
    converged: bool,
    /// Rounds that named each chunk (saturating): the least-written are
    /// pulled first.
    writes: Vec<u8>,
    /// The seed predates rounds (`Dirty` unimplemented): none are taken,
    /// finalize hands over every chunk written since Track.
    unsupported: bool,
}

/// The destination of a migration; see the module docs.
pub struct Leech {
    managed: Arc<Managed>,
    seed: Arc<SeedClient>,
    control: super::seed::Client,
    fallback: Option<Arc<dyn Backend>>,
    chunk: u64,
    cache: PathBuf,
    record_path: PathBuf,
    /// The record; its lock also serializes finalize and abort.
    record: tokio::sync::Mutex<LeechRecord>,
    outcome: Mutex<Option<FinalizeOutcome>>,
    phase: watch::Sender<Phase>,
    started: Instant,
    complete_at: Mutex<Option<Duration>>,
    stop: CancellationToken,
    /// The pull workers, the rounds and the delta check.
    tasks: TaskTracker,
    precopy: Precopy,
    rounds: Mutex<Rounds>,
    reused: AtomicU64,
    pulled_at_finalize: Mutex<Option<u64>>,
}

impl Drop for Leech {
    fn drop(&mut self) {
        // Watchers hold no Arc of the leech: they end here, and with them
        // the last references to the mount, whose tasks then stop.
        self.stop.cancel();
    }
}

fn leech_err(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("seed: {e}"))
}

fn random_owner() -> String {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    format!("leech-{:016x}", u64::from_be_bytes(b))
}

/// Makes the older copy at `old` the cache at `cache` (renamed; `old` may
/// be `cache`), the size of the region, with a fresh state file: every
/// chunk Missing, so nothing of it is trusted before its hash check. Safe
/// to run again after a crash at any step. Blocking.
fn adopt(old: &Path, cache: &Path, chunk: u64, size: u64) -> Result<()> {
    {
        // Nobody may be using the old copy: a mount of it would keep writing.
        let _lock = managed::CacheLock::acquire(old)?;
        if old != cache {
            if old.exists() && !cache.exists() {
                std::fs::rename(old, cache)?;
            }
            // They describe the old copy as it was, at its old path.
            for p in [managed::state_path(old), record::record_path(old)] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    if !cache.exists() {
        // Gone before the rename: the mount makes a new cache.
        let s = managed::state_path(cache);
        return match std::fs::remove_file(&s) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        };
    }
    let f = std::fs::OpenOptions::new().write(true).open(cache)?;
    if f.metadata()?.len() != size {
        f.set_len(size)?;
    }
    f.sync_all()?;
    // Replaces the old state file atomically (written aside, renamed).
    managed::state::StateFile::create(&managed::state_path(cache), chunk, size)?;
    Ok(())
}

/// Removes the cache, its state file and the migration record.
fn remove_cache(cache: &Path) -> Result<()> {
    for p in [cache.to_path_buf(), managed::state_path(cache)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    record::remove(&record::record_path(cache))
}

impl Leech {
    /// Starts a migration into a new cache, or resumes the one recorded
    /// beside `cfg.cache`:
    /// - nothing there: Track at the seed, pull with the export held;
    /// - a record of the same tracking session, not finalized: reopen the
    ///   cache (its chunk states say what was pulled) and keep pulling;
    /// - a record of another session (the source restarted and lost its
    ///   record of writes): the cache cannot be trusted; start over;
    /// - a record of a finalized migration: serve at once, fetching what
    ///   is missing from the seed, with the epoch taken at finalize.
    pub async fn start(cfg: Config) -> Result<Arc<Leech>> {
        if cfg.pull_workers == 0 {
            return Err(Error::InvalidArgument(
                "a migration needs at least one pull worker".into(),
            ));
        }
        let rpath = record::record_path(&cfg.cache);
        let rp = rpath.clone();
        let found: Option<serde_json::Value> =
            tokio::task::spawn_blocking(move || record::load(&rp))
                .await
                .map_err(|e| Error::io(e.to_string()))??;
        let reuse_in_place = cfg.reuse.as_deref() == Some(cfg.cache.as_path());
        let mut reuse_path = cfg.reuse.clone();
        let mut rec: Option<LeechRecord> = match found {
            None => None,
            Some(v) if v.get("role").and_then(|r| r.as_str()) == Some("destination") => Some(
                serde_json::from_value(v)
                    .map_err(|e| Error::io(format!("{}: {e}", rpath.display())))?,
            ),
            // The record of a source that handed this region over: the
            // cache is an older copy, usable only through a hash check.
            Some(_) if reuse_in_place => None,
            Some(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} belongs to a region this node handed over; pass the cache as the older copy to reuse, or remove it",
                    rpath.display()
                )))
            }
        };
        if rec.is_none() && !reuse_in_place {
            let state = managed::state_path(&cfg.cache);
            for p in [&cfg.cache, &state] {
                if p.exists() {
                    return Err(Error::FailedPrecondition(format!(
                        "{} exists but no migration record does: a migration starts from an empty cache or an older copy given as reuse (remove it)",
                        p.display()
                    )));
                }
            }
        }
        let (token, tls) = (cfg.token.as_ref(), cfg.tls.as_ref());
        let vol = cfg.volume.as_deref();
        let ch = net::connect_volume(&cfg.from, token, tls, Keepalive::MIGRATION, vol)
            .await
            .map_err(leech_err)?;
        // Control calls get their own connection: on the data connection
        // Finalize's reply would queue behind megabytes of chunk data in
        // the HTTP/2 window, and that wait is downtime.
        let control = pb::seed_client::SeedClient::new(
            net::connect_volume(&cfg.from, token, tls, Keepalive::MIGRATION, vol)
                .await
                .map_err(leech_err)?,
        );
        let seed = SeedClient::connect(ch, cfg.patience)
            .await
            .map_err(Error::from)?;
        let (size, chunk) = (seed.size(), seed.chunk_size());
        let info = control
            .clone()
            .info(pb::InfoRequest {})
            .await
            .map_err(Error::from)?
            .into_inner();
        let fallback = match &cfg.fallback {
            Some(uri) => Some(crate::uri::open(uri, size, chunk).await?),
            None => None,
        };
        // A record of another session: nothing pulled can be trusted.
        if let Some(r) = &rec {
            let other = r.session != info.session || !info.tracking;
            if reuse_in_place && other {
                // The cache is an older copy (e.g. of a migration that
                // ended here before the region left again): checked by
                // hash, never resumed as it is.
                info!(
                    recorded = r.session,
                    seed = info.session,
                    "migration: the cache holds an older copy; checking it against the seed"
                );
                record::remove_async(rpath.clone()).await?;
                rec = None;
            } else if r.handover.is_none() && other {
                warn!(
                    recorded = r.session,
                    seed = info.session,
                    "migration: the seed's tracking session changed (source restarted?); starting over"
                );
                // An older copy already adopted stays: it is checked by
                // hash again, never trusted as it is.
                let keep = r.adopted || reuse_in_place;
                if keep {
                    reuse_path = Some(cfg.cache.clone());
                }
                let c = cfg.cache.clone();
                tokio::task::spawn_blocking(move || {
                    if keep {
                        record::remove(&record::record_path(&c))
                    } else {
                        remove_cache(&c)
                    }
                })
                .await
                .map_err(|e| Error::io(e.to_string()))??;
                rec = None;
            }
        }
        let resumed = rec.is_some();
        let mut rec = match rec {
            Some(r) => r,
            None => {
                // Track before the first read (and the first hash): every
                // write the seed acknowledges after this is in the dirty list.
                let session = control
                    .clone()
                    .track(pb::TrackRequest {})
                    .await
                    .map_err(Error::from)?
                    .into_inner()
                    .session;
                let reuse = match &reuse_path {
                    Some(p) if p.exists() => Some(p.clone()),
                    Some(p) => {
                        warn!(path = %p.display(), "migration: no older copy there; pulling everything");
                        None
                    }
                    None => None,
                };
                let r = LeechRecord {
                    role: "destination".into(),
                    from: cfg.from.to_string(),
                    session,
                    owner: cfg.owner.clone().unwrap_or_else(random_owner),
                    reuse,
                    ..Default::default()
                };
                record::store_async(rpath.clone(), r.clone()).await?;
                r
            }
        };
        if rec.handover.is_none() && !rec.adopted {
            if let Some(old) = rec.reuse.clone() {
                let cache = cfg.cache.clone();
                tokio::task::spawn_blocking(move || adopt(&old, &cache, chunk, size))
                    .await
                    .map_err(|e| Error::io(e.to_string()))??;
                rec.adopted = true;
                record::store_async(rpath.clone(), rec.clone()).await?;
            }
        }
        let seed = Arc::new(seed);
        let opts = managed::Options {
            chunk_size: chunk,
            // The pull is ours (`pull.rs`): runs of chunks per call.
            pull_workers: 0,
            ..Default::default()
        };
        let source: Arc<dyn Backend> = seed.clone();
        let (cache, fb) = (cfg.cache.clone(), fallback.clone());
        let m = tokio::task::spawn_blocking(move || {
            // Managed::open spawns its workers: enter the caller's runtime.
            Managed::open(&cache, source, fb, opts)
        });
        let m = Arc::new(m.await.map_err(|e| Error::io(e.to_string()))??);
        let finalized = rec.handover.is_some();
        if !finalized {
            m.hold().await;
        }
        let c = cfg.cache.clone();
        let direct = tokio::task::spawn_blocking(move || pull::open_direct(&c))
            .await
            .map_err(|e| Error::io(e.to_string()))?;
        let delta = rec.adopted && !rec.delta_done && !finalized;
        // Claimed before any pull worker starts, so none pulls a chunk the
        // older copy may already hold.
        let delta_claims = if delta {
            let all: Vec<u64> = (0..m.chunk_count()).collect();
            m.claim(&all)
        } else {
            Vec::new()
        };
        let leech = Arc::new(Leech {
            managed: m,
            seed,
            control,
            fallback,
            chunk,
            cache: cfg.cache.clone(),
            record_path: rpath,
            rounds: Mutex::new(Rounds {
                applied: rec.round,
                ..Default::default()
            }),
            record: tokio::sync::Mutex::new(rec),
            outcome: Mutex::new(None),
            phase: watch::channel(Phase::default()).0,
            started: Instant::now(),
            complete_at: Mutex::new(None),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            precopy: cfg.precopy.clone(),
            reused: AtomicU64::new(0),
            pulled_at_finalize: Mutex::new(None),
        });
        if finalized {
            leech.resume_finalized().await?;
        }
        info!(from = %cfg.from, size, chunk, resumed, finalized, delta, "migration: pulling from the seed");
        // The leech's own tasks log under one span naming the migration.
        let span = info_span!("leech", from = %cfg.from, cache = %cfg.cache.display());
        if delta {
            leech
                .tasks
                .spawn(run_delta(Arc::downgrade(&leech), delta_claims).instrument(span.clone()));
        }
        let puller = Arc::new(Puller {
            managed: leech.managed.clone(),
            seed: leech.seed.clone(),
            direct,
        });
        for _ in 0..cfg.pull_workers {
            leech.tasks.spawn(
                puller
                    .clone()
                    .worker(leech.stop.clone())
                    .instrument(span.clone()),
            );
        }
        if !finalized {
            leech.tasks.spawn(
                precopy_rounds(
                    Arc::downgrade(&leech),
                    leech.managed.clone(),
                    leech.stop.clone(),
                )
                .instrument(span),
            );
        }
        tokio::spawn(watch_seed(
            Arc::downgrade(&leech),
            leech.seed.lost_watch(),
            leech.stop.clone(),
        ));
        tokio::spawn(watch_complete(
            Arc::downgrade(&leech),
            leech.managed.clone(),
            leech.phase.subscribe(),
            leech.stop.clone(),
        ));
        Ok(leech)
    }

    /// The destination's mount (serve it; it is held until finalize).
    pub fn managed(&self) -> &Arc<Managed> {
        &self.managed
    }

    /// Region size in bytes.
    pub fn size(&self) -> u64 {
        self.seed.size()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Changes of the phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    fn fail(&self, msg: String) {
        error!("migration: {msg}");
        self.phase.send_modify(|p| {
            p.fatal.get_or_insert(msg);
        });
    }

    /// Takes the region over in the store (fenced stores): raises its epoch
    /// past the source's for this destination's owner name; idempotent.
    async fn take_over(&self, rec: &mut LeechRecord, h: &Handover) -> Result<Option<u64>> {
        let Some(fb) = &self.fallback else {
            return Ok(None);
        };
        let Some(mine) = fb.epoch() else {
            return Ok(None); // a store without fencing: see docs/fencing.md
        };
        let epoch = match rec.epoch {
            Some(e) => e,
            None => {
                let e = h.epoch.unwrap_or(0).max(mine) + 1;
                rec.epoch = Some(e);
                // Recorded before the fence: a restart re-fences with the
                // same epoch and owner, which the store accepts as a repeat.
                record::store_async(self.record_path.clone(), rec.clone()).await?;
                e
            }
        };
        fb.fence(epoch, &rec.owner).await?;
        info!(epoch, owner = %rec.owner, "migration: took the region over");
        Ok(Some(epoch))
    }

    /// Applies a hand-over to the cache: chunks written at the source since
    /// Track are pulled again, those it never pushed are pushed from here.
    async fn apply(&self, h: &Handover) -> Result<()> {
        self.mark(h).await?;
        self.managed.sync_local().await
    }

    /// [`Leech::apply`] without the sync.
    async fn mark(&self, h: &Handover) -> Result<()> {
        let expand = |runs: &[(u64, u64)]| -> Vec<u64> {
            runs.iter().flat_map(|&(f, c)| f..f + c).collect()
        };
        *self.pulled_at_finalize.lock().unwrap() = Some(self.managed.progress().bytes_pulled);
        let dirty = self.least_written_first(expand(&h.dirty));
        self.managed.mark_missing(&dirty).await?;
        self.managed.mark_dirty(&expand(&h.unpushed))
    }

    /// After a restart past finalize: fence again (a repeat), apply the
    /// hand-over if that was cut short, and serve.
    async fn resume_finalized(&self) -> Result<()> {
        let mut rec = self.record.lock().await;
        let h = rec.handover.clone().expect("finalized");
        let epoch = self.take_over(&mut rec, &h).await?;
        if rec.applied {
            // Chunks never pushed and not yet fetched again go out once fetched.
            let unpushed: Vec<u64> = h.unpushed.iter().flat_map(|&(f, c)| f..f + c).collect();
            self.managed.mark_dirty(&unpushed)?;
        } else {
            // Never released: no local write exists yet.
            self.apply(&h).await?;
            rec.applied = true;
            record::store_async(self.record_path.clone(), rec.clone()).await?;
        }
        self.managed.release().await;
        *self.outcome.lock().unwrap() = Some(FinalizeOutcome {
            dirty_chunks: h.dirty.iter().map(|r| r.1).sum(),
            unpushed_chunks: h.unpushed.iter().map(|r| r.1).sum(),
            elapsed_us: 0,
            seed_lost: false,
            epoch,
            rounds: rec.round,
        });
        self.phase.send_modify(|p| p.finalized = true);
        Ok(())
    }

    /// The finalize step; see the module docs. Idempotent.
    pub async fn finalize(&self, seed_lost: bool) -> Result<FinalizeOutcome> {
        let mut rec = self.record.lock().await;
        if let Some(o) = *self.outcome.lock().unwrap() {
            return Ok(o);
        }
        let ph = self.phase.borrow().clone();
        if ph.aborted {
            return Err(Error::FailedPrecondition(
                "the migration was aborted".into(),
            ));
        }
        if let Some(f) = ph.fatal {
            return Err(Error::FailedPrecondition(f));
        }
        let t = Instant::now();
        let count = self.managed.chunk_count();
        // Even with seed_lost the seed is asked first: if it answers, the
        // normal path is both correct and cheaper.
        let patience = if seed_lost {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(60)
        };
        let asked = if self.seed.is_lost() {
            Err(Status::unavailable("seed already declared lost"))
        } else {
            let mut c = self.control.clone();
            let req = pb::FinalizeRequest {
                session: rec.session,
                round: rec.round,
            };
            match tokio::time::timeout(patience, c.finalize(req)).await {
                Ok(r) => r.map(|r| r.into_inner()),
                Err(_) => Err(Status::deadline_exceeded("seed finalize timed out")),
            }
        };
        let (h, lost) = match asked {
            Ok(reply) => (handover_of(&reply, count).map_err(Error::io)?, false),
            Err(e) if !seed_lost => {
                return Err(Error::Unavailable(format!(
                    "seed finalize failed: {e}; if the source is dead (and fenced), finalize with --seed-lost (seed_lost){}",
                    if self.fallback.is_some() { "" } else { " (needs a fallback backend)" }
                )));
            }
            Err(e) => {
                let Some(fb) = &self.fallback else {
                    return Err(Error::FailedPrecondition(format!(
                        "seed finalize failed ({e}) and the leech has no fallback backend: nothing to take the data from"
                    )));
                };
                self.seed.declare_lost("finalize with seed_lost");
                self.managed.set_source(fb.clone())?;
                // Nothing pulled from the seed can be trusted: any chunk may
                // have been written after we pulled it.
                let h = Handover {
                    session: rec.session,
                    dirty: vec![(0, count)],
                    unpushed: Vec::new(),
                    epoch: None,
                };
                (h, true)
            }
        };
        let t_seed = t.elapsed();
        // Not stored on its own: until `applied` is, a restarted destination
        // is still held and finalizes again, and the seed repeats its
        // answer. One record write (two fsyncs) less in the downtime. A
        // fenced take-over stores it with the epoch, before the fence.
        rec.handover = Some(h.clone());
        let epoch = self.take_over(&mut rec, &h).await?;
        self.mark(&h).await?;
        let t_apply = t.elapsed();
        // The application resumes now; what makes the hand-over durable
        // runs behind it, and no flush is acknowledged (nothing pushed)
        // before it is done (managed/barrier.rs says why that is safe).
        let barrier = self.managed.release_before_durable().await;
        let elapsed = t.elapsed();
        // The new chunk states and the record written aside are synced side
        // by side (the file system batches the two), then the record is
        // committed: `applied` is durable only after the states are.
        rec.applied = true;
        let durable = async {
            if let Some(ms) = failpoint("leech-commit-delay") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let (synced, prepared) = tokio::join!(
                self.managed.sync_local(),
                record::prepare_async(self.record_path.clone(), rec.clone())
            );
            synced?;
            prepared?;
            if failpoint("leech-crash-before-commit").is_some() {
                error!("failpoint leech-crash-before-commit: aborting");
                std::process::abort();
            }
            record::commit_async(self.record_path.clone()).await
        }
        .await;
        if let Err(e) = durable {
            // Writes were let in: applying the hand-over again would drop
            // them, so this destination cannot finalize any more.
            let why = format!("recording the finalized migration failed: {e}");
            barrier.fail(&why);
            self.phase.send_modify(|p| p.fatal = Some(why));
            return Err(e);
        }
        barrier.open();
        debug!(?t_seed, ?t_apply, released = ?elapsed, durable = ?t.elapsed(), "migration: finalize steps (seed answered, hand-over applied, released, recorded)");
        self.phase.send_modify(|p| {
            p.finalized = true;
            if lost {
                p.seed_lost = true;
                p.fallback_active = true;
            }
        });
        let o = FinalizeOutcome {
            dirty_chunks: h.dirty.iter().map(|r| r.1).sum(),
            unpushed_chunks: h.unpushed.iter().map(|r| r.1).sum(),
            elapsed_us: elapsed.as_micros() as u64,
            seed_lost: lost,
            epoch,
            rounds: rec.round,
        };
        info!(
            dirty_chunks = o.dirty_chunks,
            unpushed_chunks = o.unpushed_chunks,
            seed_lost = lost,
            ?epoch,
            took = ?elapsed,
            "migration: finalized; export released, missing chunks fetched on demand"
        );
        *self.outcome.lock().unwrap() = Some(o);
        Ok(o)
    }

    /// Gives the migration up before finalize: the seed stops tracking (if
    /// it answers; it keeps serving either way), the pull stops, and the
    /// cache, its state and the record are removed. Idempotent.
    pub async fn abort(&self) -> Result<()> {
        let rec = self.record.lock().await;
        if rec.handover.is_some() {
            return Err(Error::FailedPrecondition(
                "the migration was finalized: the region lives here now".into(),
            ));
        }
        if self.phase.borrow().aborted {
            return Ok(());
        }
        self.phase.send_modify(|p| p.aborted = true);
        // Nothing pulls or checks any more once abort returns. The rounds
        // take the record lock: let go of it while they end (a finalize
        // from now on sees `aborted`).
        let session = rec.session;
        drop(rec);
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let req = pb::AbortRequest { session };
        match tokio::time::timeout(Duration::from_secs(5), self.control.clone().abort(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "migration: the seed refused abort; it stops tracking when it restarts")
            }
            Err(_) => warn!("migration: the seed did not answer abort"),
        }
        self.stop.cancel();
        self.managed.close().await;
        let c = self.cache.clone();
        tokio::task::spawn_blocking(move || remove_cache(&c))
            .await
            .map_err(|e| Error::io(e.to_string()))??;
        info!("migration: aborted; cache removed");
        Ok(())
    }

    /// Typed status.
    pub fn status(&self) -> MigrationStatus {
        let p = self.managed.progress();
        let ph = self.phase.borrow().clone();
        let o = *self.outcome.lock().unwrap();
        let complete = ph.finalized && p.chunks_missing == 0 && p.chunks_in_flight == 0;
        let (rounds, last_round_chunks, converged) = {
            let r = self.rounds.lock().unwrap();
            (r.applied, r.last, r.converged)
        };
        MigrationStatus {
            rounds,
            last_round_chunks,
            converged,
            bytes_pulled_at_finalize: *self.pulled_at_finalize.lock().unwrap(),
            chunks_reused: self.reused.load(Ordering::Relaxed),
            size: self.size(),
            chunk_size: self.chunk,
            chunks_total: p.chunks_total,
            chunks_present: p.chunks_local + p.chunks_dirty,
            finalized: ph.finalized,
            complete,
            seed_lost: ph.seed_lost,
            fallback: ph.fallback_active,
            aborted: ph.aborted,
            epoch: o.and_then(|o| o.epoch),
            error: ph.fatal,
            progress: p,
        }
    }

    /// Chunk indices ordered by how many rounds named them, fewest first
    /// (stable): chunks the source rewrites all the time are pulled last,
    /// when they are least likely to change again.
    fn least_written_first(&self, mut chunks: Vec<u64>) -> Vec<u64> {
        let r = self.rounds.lock().unwrap();
        chunks.sort_by_key(|&i| r.writes.get(i as usize).copied().unwrap_or(0));
        chunks
    }

    /// Waits until the pre-copy converged (see [`Precopy`]), or returns at
    /// once when it is finalized, aborted or failed. A caller that
    /// finalizes right after hands over only what was written since the
    /// last round.
    pub async fn wait_converged(&self) {
        let mut ph = self.phase.subscribe();
        loop {
            {
                let p = ph.borrow_and_update();
                if p.converged || p.finalized || p.aborted || p.fatal.is_some() {
                    return;
                }
            }
            // The rounds task bumps the phase when it converges.
            if ph.changed().await.is_err() {
                return;
            }
        }
    }

    /// Time from start to every chunk being here, once that happened.
    pub fn completed_after(&self) -> Option<Duration> {
        *self.complete_at.lock().unwrap()
    }
}

/// Reacts to the seed being declared lost (reads failing past patience).
async fn watch_seed(leech: Weak<Leech>, mut lost: watch::Receiver<bool>, stop: CancellationToken) {
    tokio::select! {
        r = lost.wait_for(|l| *l) => if r.is_err() { return },
        _ = stop.cancelled() => return,
    }
    let Some(this) = leech.upgrade() else { return };
    let finalized = this.phase.borrow().finalized;
    match &this.fallback {
        Some(fb) => {
            warn!(
                finalized,
                "migration: seed lost; fetching what is missing from the fallback backend"
            );
            if let Err(e) = this.managed.set_source(fb.clone()) {
                this.fail(format!("cannot switch to the fallback backend: {e}"));
                return;
            }
            this.phase.send_modify(|p| {
                p.seed_lost = true;
                p.fallback_active = true;
            });
            if !finalized {
                warn!("migration: finalize with seed_lost once the source is known dead (fenced): everything is then re-read from the backend");
            }
        }
        None if finalized => {
            this.phase.send_modify(|p| p.seed_lost = true);
            this.fail(
                "seed lost after finalize and no fallback backend: reads of chunks not yet pulled fail with EIO".into(),
            );
        }
        None => {
            this.phase.send_modify(|p| p.seed_lost = true);
            this.fail(
                "seed lost before finalize and no fallback backend: the destination has no complete copy and will not serve".into(),
            );
        }
    }
}

async fn watch_complete(
    leech: Weak<Leech>,
    managed: Arc<Managed>,
    mut phase: watch::Receiver<Phase>,
    stop: CancellationToken,
) {
    let done = async {
        managed.wait_complete().await;
        // Only a finalized migration is complete: before it, chunks may
        // still turn Missing again.
        if phase.wait_for(|p| p.finalized).await.is_err() {
            return false;
        }
        managed.wait_complete().await;
        true
    };
    tokio::select! {
        d = done => if !d { return },
        _ = stop.cancelled() => return,
    }
    let Some(this) = leech.upgrade() else { return };
    let t = this.started.elapsed();
    *this.complete_at.lock().unwrap() = Some(t);
    let p = this.managed.progress();
    info!(
        chunks = p.chunks_total,
        bytes_pulled = p.bytes_pulled,
        took = ?t,
        "migration: complete; the source may stop"
    );
}

/// The delta check of an adopted older copy (see `pull.rs`), then the
/// record says it is done (a resume does not check again).
async fn run_delta(leech: Weak<Leech>, claims: Vec<crate::managed::Claim>) {
    let Some(this) = leech.upgrade() else {
        return;
    };
    let session = this.record.lock().await.session;
    let (managed, client, stop) = (this.managed.clone(), this.seed.client(), this.stop.clone());
    drop(this);
    let r = pull::reuse_by_hash(&managed, client, session, claims, &stop).await;
    let Some(this) = leech.upgrade() else {
        return;
    };
    match r {
        Ok(o) => {
            this.reused.fetch_add(o.reused, Ordering::Relaxed);
            if stop.is_cancelled() {
                return;
            }
            // Durable before the record says so: a resume must not find
            // chunks recorded Local whose state byte was lost.
            if let Err(e) = this.managed.sync_local().await {
                warn!(error = %e, "migration: syncing the cache after the delta check");
                return;
            }
            let mut rec = this.record.lock().await;
            rec.delta_done = true;
            if let Err(e) = record::store_async(this.record_path.clone(), rec.clone()).await {
                warn!(error = %e, "migration: recording the delta check");
            }
        }
        Err(e) => {
            // Not fatal: what was not checked is pulled whole.
            warn!(error = %e, "migration: the hash check of the older copy failed; pulling the rest");
        }
    }
}

/// A test hook: `R3MAP_FAILPOINT=NAME:N` makes the process abort at the
/// point NAME for N, as a crash there would: `leech-crash-after-dirty:N`
/// right after the seed answered pre-copy round N, before it is applied;
/// `leech-crash-before-commit:1` in finalize after the export was released,
/// before the record is committed. `leech-commit-delay:MS` only delays that
/// commit. Used by the tests of crash-resume; unset, it costs one
/// environment lookup per round. Several: NAME:N,NAME:N.
fn failpoint(name: &str) -> Option<u64> {
    let v = std::env::var("R3MAP_FAILPOINT").ok()?;
    v.split(',').find_map(|one| {
        let (n, at) = one.split_once(':')?;
        (n == name).then(|| at.parse().ok()).flatten()
    })
}

/// Iterative pre-copy: each time every chunk is here, ask the seed for the
/// chunks written since the last round and make them Missing again (they
/// are pulled again, least-written first), until finalize.
async fn precopy_rounds(leech: Weak<Leech>, managed: Arc<Managed>, stop: CancellationToken) {
    let mut backoff = RoundBackoff::default();
    loop {
        tokio::select! {
            _ = managed.wait_complete() => {}
            _ = stop.cancelled() => return,
        }
        let Some(this) = leech.upgrade() else {
            return;
        };
        {
            let p = this.phase.borrow();
            if p.finalized || p.aborted || p.fatal.is_some() || p.seed_lost {
                return;
            }
        }
        let pc = this.precopy.clone();
        let converged = {
            let mut r = this.rounds.lock().unwrap();
            let chunk_bytes = this.chunk.max(1);
            let now = pc.max_rounds == 0
                || r.unsupported
                || (r.applied > 0 && r.last.saturating_mul(chunk_bytes) <= pc.converge_bytes)
                || (r.applied > 1 && r.last >= r.prev)
                || r.applied >= pc.max_rounds as u64;
            if now && !r.converged {
                r.converged = true;
                info!(
                    rounds = r.applied,
                    last_round_chunks = r.last,
                    "migration: pre-copy converged; finalize hands over what is written from now on"
                );
            }
            r.converged
        };
        if converged {
            this.phase.send_modify(|p| p.converged = true);
            if pc.max_rounds == 0 || this.rounds.lock().unwrap().unsupported {
                return;
            }
            drop(this);
            tokio::select! {
                _ = tokio::time::sleep(pc.settle) => {}
                _ = stop.cancelled() => return,
            }
            let Some(t) = leech.upgrade() else { return };
            if t.phase.borrow().finalized {
                return;
            }
            drop(t);
            continue_round(&leech, &mut backoff).await;
        } else {
            drop(this);
            continue_round(&leech, &mut backoff).await;
        }
    }
}

/// Failed rounds in a row: when, and how long to wait before the next.
struct RoundBackoff {
    wait: Duration,
    failing_since: Option<Instant>,
}

impl Default for RoundBackoff {
    fn default() -> Self {
        RoundBackoff {
            wait: Duration::from_millis(50),
            failing_since: None,
        }
    }
}

/// Takes and applies one round; on a failed call waits (doubling). A
/// seed that stays unreachable for the read patience is declared lost,
/// as a failing read would: once the pull is done, the rounds are what
/// notices a dead source before finalize.
async fn continue_round(leech: &Weak<Leech>, b: &mut RoundBackoff) {
    let Some(this) = leech.upgrade() else {
        return;
    };
    match this.one_round().await {
        Ok(()) => *b = RoundBackoff::default(),
        Err(e) => {
            debug!(error = %e, "migration: pre-copy round failed; trying again");
            if e.kind() == crate::ErrorKind::Unavailable {
                let since = *b.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= this.seed.patience() {
                    this.seed.declare_lost(&format!(
                        "pre-copy rounds failing for {:?}: {e}",
                        since.elapsed()
                    ));
                    return;
                }
            }
            let (w, stop) = (b.wait, this.stop.clone());
            drop(this);
            tokio::select! {
                _ = tokio::time::sleep(w) => {}
                _ = stop.cancelled() => {}
            }
            b.wait = (b.wait * 2).min(Duration::from_secs(1));
        }
    }
}

impl Leech {
    /// One pre-copy round: ask, mark the chunks Missing (unless finalize
    /// came first: then its dirty list holds them), make that durable,
    /// record the round. A crash before the record leaves the round to be
    /// asked again (the seed repeats its answer) or folded into finalize.
    async fn one_round(&self) -> Result<()> {
        let (session, round) = {
            let rec = self.record.lock().await;
            if rec.handover.is_some() {
                return Ok(());
            }
            (rec.session, rec.round + 1)
        };
        let crash_after = failpoint("leech-crash-after-dirty");
        let t = Instant::now();
        let mut c = self.control.clone();
        let call = tokio::time::timeout(
            Duration::from_secs(30),
            c.dirty(pb::DirtyRequest { session, round }),
        );
        let reply = tokio::select! {
            r = call => r,
            _ = self.stop.cancelled() => return Ok(()),
        };
        let reply = match reply {
            Err(_) => return Err(Error::Unavailable("seed Dirty timed out".into())),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                warn!("migration: the seed predates pre-copy rounds; finalize hands over every chunk written since the start");
                self.rounds.lock().unwrap().unsupported = true;
                return Ok(());
            }
            Ok(r) => r.map_err(Error::from)?.into_inner(),
        };
        if crash_after == Some(round) {
            error!(round, "failpoint leech-crash-after-dirty: aborting");
            std::process::abort();
        }
        let count = self.managed.chunk_count();
        let chunks =
            chunk_list("dirty", &reply.dirty, reply.dirty_chunks, count).map_err(Error::io)?;
        let n = chunks.len() as u64;
        {
            let rec = self.record.lock().await;
            if rec.handover.is_some() || rec.round >= round {
                return Ok(());
            }
            let order = self.least_written_first(chunks.clone());
            // The export is still held (no handover under this lock): no
            // local write exists that this could drop.
            self.managed.mark_missing(&order).await?;
        }
        {
            let mut r = self.rounds.lock().unwrap();
            if r.writes.len() as u64 != count {
                r.writes = vec![0; count as usize];
            }
            for &i in &chunks {
                let w = &mut r.writes[i as usize];
                *w = w.saturating_add(1);
            }
        }
        // The Missing marks reach the disk before the record says applied.
        self.managed.sync_local().await?;
        {
            let mut rec = self.record.lock().await;
            if rec.handover.is_none() && rec.round < round {
                rec.round = round;
                record::store_async(self.record_path.clone(), rec.clone()).await?;
            }
        }
        {
            let mut r = self.rounds.lock().unwrap();
            r.prev = r.last;
            r.last = n;
            r.applied = round;
        }
        debug!(round, chunks = n, took = ?t.elapsed(), "migration: pre-copy round applied");
        Ok(())
    }
}

/// The `Leech` control service.
pub struct LeechService(pub Arc<Leech>);

#[tonic::async_trait]
impl leech_server::Leech for LeechService {
    async fn finalize(
        &self,
        req: Request<pb::LeechFinalizeRequest>,
    ) -> Result<Response<pb::LeechFinalizeReply>, Status> {
        let o = self.0.finalize(req.into_inner().seed_lost).await?;
        Ok(Response::new(pb::LeechFinalizeReply {
            dirty_chunks: o.dirty_chunks,
            elapsed_us: o.elapsed_us,
            seed_lost: o.seed_lost,
            unpushed_chunks: o.unpushed_chunks,
            epoch: o.epoch.unwrap_or(0),
            rounds: o.rounds,
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.0.status();
        Ok(Response::new(pb::StatusReply {
            size: s.size,
            chunk_size: s.chunk_size,
            chunks_total: s.chunks_total,
            chunks_present: s.chunks_present,
            finalized: s.finalized,
            complete: s.complete,
            seed_lost: s.seed_lost,
            fallback: s.fallback,
            error: s.error.unwrap_or_default(),
            aborted: s.aborted,
            epoch: s.epoch.unwrap_or(0),
            rounds: s.rounds,
            last_round_chunks: s.last_round_chunks,
            converged: s.converged,
            bytes_pulled: s.progress.bytes_pulled,
            bytes_pulled_at_finalize: s.bytes_pulled_at_finalize.unwrap_or(0),
            chunks_reused: s.chunks_reused,
        }))
    }

    async fn abort(
        &self,
        _: Request<pb::LeechAbortRequest>,
    ) -> Result<Response<pb::LeechAbortReply>, Status> {
        self.0.abort().await?;
        Ok(Response::new(pb::LeechAbortReply {}))
    }
}
