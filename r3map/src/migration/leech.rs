//! The destination side: a [`Managed`] cache whose source is the seed,
//! held (I/O waits) until finalize, and the `Leech` control service that
//! finalizes it.
//!
//! Never stale, by construction: every chunk the seed reports written
//! since Track is made Missing (in-flight fetches of it discarded) before
//! the export is released; if the seed is lost before finalize, nothing
//! pulled from it is trusted and every chunk is taken again from the
//! fallback backend; without a fallback the destination refuses to serve.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use super::net::{self, Endpoint, Token};
use super::pb::{self, leech_server};
use super::seed::{dirty_chunks, SeedClient};
use crate::backend::Backend;
use crate::managed::{self, Managed};

#[derive(Debug, thiserror::Error)]
pub enum LeechError {
    #[error("{0}")]
    Net(#[from] net::NetError),
    #[error("seed: {0}")]
    Seed(#[from] Status),
    #[error("{0}")]
    Backend(#[from] crate::Error),
    #[error("{0}")]
    Config(String),
}

/// How to start a leech.
pub struct Config {
    pub from: Endpoint,
    pub token: Option<Token>,
    /// TLS to the seed (with a client certificate for mutual TLS).
    pub tls: Option<super::net::ClientTls>,
    pub cache: PathBuf,
    /// The region's own backend URI: where chunks come from if the seed is
    /// lost, and where the destination pushes its writes.
    pub fallback: Option<String>,
    /// How long seed reads are retried before the seed is declared lost.
    pub patience: Duration,
    pub pull_workers: usize,
}

/// What happened to the migration, for `Status` and the process exit code.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub finalized: bool,
    pub seed_lost: bool,
    pub fallback_active: bool,
    /// Set when the destination can no longer complete the migration.
    pub fatal: Option<String>,
}

pub struct Leech {
    managed: Arc<Managed>,
    seed: Arc<SeedClient>,
    control: super::seed::Client,
    fallback: Option<Arc<dyn Backend>>,
    chunk: u64,
    /// Serializes Finalize calls; holds the reply of the one that succeeded.
    finalize: tokio::sync::Mutex<Option<pb::LeechFinalizeReply>>,
    phase: watch::Sender<Phase>,
    started: Instant,
    complete_at: Mutex<Option<Duration>>,
}

impl Leech {
    /// Connects to the seed, starts its tracking, and starts pulling into a
    /// new cache with the export held. The cache must not exist: a cache
    /// left by an earlier attempt has no record of what changed since.
    pub async fn start(cfg: Config) -> Result<Arc<Leech>, LeechError> {
        let state = managed::state_path(&cfg.cache);
        for p in [&cfg.cache, &state] {
            if p.exists() {
                return Err(LeechError::Config(format!(
                    "{} exists: a migration starts from an empty cache (remove it)",
                    p.display()
                )));
            }
        }
        let (token, tls) = (cfg.token.as_ref(), cfg.tls.as_ref());
        let ch = net::connect(&cfg.from, token, tls).await?;
        // Control calls get their own connection: on the data connection
        // Finalize's reply would queue behind megabytes of chunk data in
        // the HTTP/2 window, and that wait is downtime.
        let control = pb::seed_client::SeedClient::new(net::connect(&cfg.from, token, tls).await?);
        let seed = SeedClient::connect(pb::seed_client::SeedClient::new(ch), cfg.patience).await?;
        let (size, chunk) = (seed.size(), seed.chunk_size());
        let fallback = match &cfg.fallback {
            Some(uri) => Some(crate::backend::open(uri, size, chunk).await?),
            None => None,
        };
        // Track before the first read: every write the seed acknowledges
        // after this is in the dirty list.
        control.clone().track(pb::TrackRequest {}).await?;
        let seed = Arc::new(seed);
        let opts = managed::Options {
            chunk_size: chunk,
            pull_workers: cfg.pull_workers,
            ..Default::default()
        };
        let source: Arc<dyn Backend> = seed.clone();
        let m = Managed::open(&cfg.cache, source, fallback.clone(), opts)?;
        m.hold().await;
        let leech = Arc::new(Leech {
            managed: Arc::new(m),
            seed,
            control,
            fallback,
            chunk,
            finalize: tokio::sync::Mutex::new(None),
            phase: watch::channel(Phase::default()).0,
            started: Instant::now(),
            complete_at: Mutex::new(None),
        });
        info!(from = %cfg.from, size, chunk, "migration: pulling from the seed; export held");
        tokio::spawn(leech.clone().watch_seed());
        tokio::spawn(leech.clone().watch_complete());
        Ok(leech)
    }

    pub fn managed(&self) -> &Arc<Managed> {
        &self.managed
    }

    pub fn size(&self) -> u64 {
        self.seed.size()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Reacts to the seed being declared lost (reads failing past patience).
    async fn watch_seed(self: Arc<Self>) {
        let mut lost = self.seed.lost_watch();
        if lost.wait_for(|l| *l).await.is_err() {
            return;
        }
        let finalized = self.phase.borrow().finalized;
        match &self.fallback {
            Some(fb) => {
                warn!(
                    finalized,
                    "migration: seed lost; fetching what is missing from the fallback backend"
                );
                if let Err(e) = self.managed.set_source(fb.clone()) {
                    self.fail(format!("cannot switch to the fallback backend: {e}"));
                    return;
                }
                self.phase.send_modify(|p| {
                    p.seed_lost = true;
                    p.fallback_active = true;
                });
                if !finalized {
                    warn!("migration: finalize with --seed-lost once the source is known dead (fenced): everything is then re-read from the backend");
                }
            }
            None if finalized => {
                self.phase.send_modify(|p| p.seed_lost = true);
                self.fail(
                    "seed lost after finalize and no --backend to fall back to: reads of chunks not yet pulled fail with EIO".into(),
                );
            }
            None => {
                self.phase.send_modify(|p| p.seed_lost = true);
                self.fail(
                    "seed lost before finalize and no --backend to fall back to: the destination has no complete copy and will not serve".into(),
                );
            }
        }
    }

    fn fail(&self, msg: String) {
        error!("migration: {msg}");
        self.phase.send_modify(|p| {
            p.fatal.get_or_insert(msg);
        });
    }

    async fn watch_complete(self: Arc<Self>) {
        self.managed.wait_complete().await;
        // Only a finalized migration is complete: before it, chunks may
        // still turn Missing again.
        let mut ph = self.phase.subscribe();
        if ph.wait_for(|p| p.finalized).await.is_err() {
            return;
        }
        self.managed.wait_complete().await;
        let t = self.started.elapsed();
        *self.complete_at.lock().unwrap() = Some(t);
        let p = self.managed.progress();
        info!(
            chunks = p.chunks_total,
            bytes_pulled = p.bytes_pulled,
            took = ?t,
            "migration: complete; the source may stop"
        );
    }

    /// The finalize step; see the module docs. Idempotent.
    pub async fn finalize(&self, seed_lost: bool) -> Result<pb::LeechFinalizeReply, Status> {
        let mut done = self.finalize.lock().await;
        if let Some(r) = &*done {
            return Ok(*r);
        }
        if let Some(f) = &self.phase.borrow().fatal {
            return Err(Status::failed_precondition(f.clone()));
        }
        let t = Instant::now();
        let count = self.managed.chunk_count();
        // Even with --seed-lost the seed is asked first: if it answers, the
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
            match tokio::time::timeout(patience, c.finalize(pb::FinalizeRequest {})).await {
                Ok(r) => r.map(|r| r.into_inner()),
                Err(_) => Err(Status::deadline_exceeded("seed finalize timed out")),
            }
        };
        let (dirty, lost) = match asked {
            Ok(reply) => {
                let d = dirty_chunks(&reply, count).map_err(Status::internal)?;
                (d, false)
            }
            Err(e) if !seed_lost => {
                return Err(Status::unavailable(format!(
                    "seed finalize failed: {e}; if the source is dead (and fenced), finalize with --seed-lost{}",
                    if self.fallback.is_some() { "" } else { " (needs the leech started with --backend)" }
                )));
            }
            Err(e) => {
                let Some(fb) = &self.fallback else {
                    return Err(Status::failed_precondition(format!(
                        "seed finalize failed ({e}) and the leech has no --backend: nothing to take the data from"
                    )));
                };
                self.seed.declare_lost("finalize with --seed-lost");
                self.managed
                    .set_source(fb.clone())
                    .map_err(|e| Status::internal(e.to_string()))?;
                // Nothing pulled from the seed can be trusted: any chunk may
                // have been written after we pulled it.
                ((0..count).collect(), true)
            }
        };
        self.managed
            .mark_missing(&dirty)
            .await
            .map_err(|e| Status::internal(format!("mark_missing: {e}")))?;
        self.managed.release().await;
        let elapsed = t.elapsed();
        self.phase.send_modify(|p| {
            p.finalized = true;
            if lost {
                p.seed_lost = true;
                p.fallback_active = true;
            }
        });
        info!(
            dirty_chunks = dirty.len(),
            seed_lost = lost,
            took = ?elapsed,
            "migration: finalized; export released, missing chunks fetched on demand"
        );
        let reply = pb::LeechFinalizeReply {
            dirty_chunks: dirty.len() as u64,
            elapsed_us: elapsed.as_micros() as u64,
            seed_lost: lost,
        };
        *done = Some(reply);
        Ok(reply)
    }

    pub fn status(&self) -> pb::StatusReply {
        let p = self.managed.progress();
        let ph = self.phase.borrow().clone();
        let complete = ph.finalized && p.chunks_missing == 0 && p.chunks_in_flight == 0;
        pb::StatusReply {
            size: self.size(),
            chunk_size: self.chunk,
            chunks_total: p.chunks_total,
            chunks_present: p.chunks_local + p.chunks_dirty,
            finalized: ph.finalized,
            complete,
            seed_lost: ph.seed_lost,
            fallback: ph.fallback_active,
            error: ph.fatal.unwrap_or_default(),
        }
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
        let r = self.0.finalize(req.into_inner().seed_lost).await?;
        Ok(Response::new(r))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(self.0.status()))
    }
}
