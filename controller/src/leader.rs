//! Leader election over a `coordination.k8s.io/v1` Lease, so that of
//! several controller replicas only one changes records and regions.
//!
//! The rules are client-go's (`tools/leaderelection`):
//! - a candidate takes the Lease when it is absent, free, or has not
//!   changed for `lease_duration` **as measured by the candidate's own
//!   clock**, from the moment it first saw the current version. Comparing
//!   the holder's `renewTime` with the local wall clock would let clock
//!   skew between nodes hand the Lease over early;
//! - every write carries the resourceVersion read, so of two candidates
//!   racing for an expired Lease one gets 409 Conflict and stays a
//!   follower;
//! - the holder counts itself leader only until `renew_deadline` after the
//!   *start* of its last successful renewal. `renew_deadline` is shorter
//!   than `lease_duration`, and a candidate's wait starts no earlier than
//!   that renewal was written, so the old leader has stepped down before
//!   anyone else can take over (given clocks that run at the same rate;
//!   nothing here depends on them agreeing on the time).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::task::JoinHandle;

/// Settings of an election.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// How long a Lease that stopped changing stays its holder's.
    pub lease_duration: Duration,
    /// How long the holder counts itself leader after a renewal started.
    /// Must be shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's defaults (15 s, 10 s, 2 s).
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaderConfig {
        LeaderConfig {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate last saw of the Lease.
#[derive(Debug, Default)]
struct Seen {
    /// The Lease's spec as last read or written.
    spec: Option<LeaseSpec>,
    /// When (local clock) that spec was first seen.
    at: Option<Instant>,
    /// Start of the last successful acquire or renewal by this candidate.
    renewed: Option<Instant>,
}

/// A candidate in one election. Cheap to clone.
#[derive(Clone)]
pub struct Leader {
    api: Api<Lease>,
    cfg: Arc<LeaderConfig>,
    seen: Arc<Mutex<Seen>>,
}

/// The parts of a Lease that say who holds it and whether it changed
/// (resourceVersion aside).
fn same_record(a: &LeaseSpec, b: &LeaseSpec) -> bool {
    a.holder_identity == b.holder_identity
        && a.renew_time == b.renew_time
        && a.acquire_time == b.acquire_time
        && a.lease_transitions == b.lease_transitions
}

impl Leader {
    /// A candidate; nothing happens until [`Leader::try_acquire_or_renew`]
    /// or [`Leader::spawn`].
    pub fn new(client: Client, cfg: LeaderConfig) -> Leader {
        Leader {
            api: Api::namespaced(client, &cfg.namespace),
            cfg: Arc::new(cfg),
            seen: Arc::new(Mutex::new(Seen::default())),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A panic while holding this lock cannot leave it inconsistent
        // (plain field stores), so a poisoned lock is still usable.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this candidate leads now: its last renewal started less
    /// than `renew_deadline` ago. Computed at each call, so a renewal loop
    /// that stalled cannot leave a stale "yes" behind.
    pub fn is_leader(&self) -> bool {
        self.seen()
            .renewed
            .is_some_and(|t| t.elapsed() < self.cfg.renew_deadline)
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.cfg.identity
    }

    /// One round: creates, takes over or renews the Lease when allowed.
    /// Returns whether this candidate leads afterwards. An error (the API
    /// server unreachable) leaves leadership to expire on its own.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let start = Instant::now();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let me = self.cfg.identity.clone();
        let secs = i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let pp = PostParams::default();
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            let spec = LeaseSpec {
                holder_identity: Some(me),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            return match self.api.create(&pp, &l).await {
                Ok(_) => Ok(self.won(spec, start)),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        {
            let mut seen = self.seen();
            let changed = seen.spec.as_ref().is_none_or(|s| !same_record(s, &spec));
            if changed {
                seen.spec = Some(spec.clone());
                seen.at = Some(start);
            }
            if !holder.is_empty() && holder != me {
                // Someone else holds it: whatever this candidate thought,
                // it does not lead now.
                seen.renewed = None;
                let held = seen
                    .at
                    .is_some_and(|at| start.duration_since(at) < self.cfg.lease_duration);
                if held {
                    return Ok(false);
                }
            }
        }
        let ours = holder == me;
        let next = LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(secs),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 }),
            ..spec
        };
        let mut l = lease;
        l.spec = Some(next.clone());
        match self.api.replace(&self.cfg.name, &pp, &l).await {
            Ok(_) => Ok(self.won(next, start)),
            // Someone else wrote first: a follower this round; a holder
            // keeps leading until its renew deadline and tries again.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(self.is_leader()),
            Err(e) => Err(e),
        }
    }

    fn won(&self, spec: LeaseSpec, start: Instant) -> bool {
        let mut seen = self.seen();
        if seen.renewed.is_none() {
            tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
        }
        seen.spec = Some(spec);
        seen.at = Some(start);
        seen.renewed = Some(start);
        true
    }

    /// Gives the Lease up (clears the holder) when this candidate holds
    /// it, so a successor need not wait out the lease duration. Called on
    /// an orderly shutdown; a crash just lets the Lease expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let was = self.is_leader();
        self.seen().renewed = None;
        if !was {
            return Ok(());
        }
        let Some(mut l) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let mut spec = l.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        l.spec = Some(spec);
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &l)
            .await?;
        Ok(())
    }

    /// Runs rounds every `retry_period` until the task is aborted.
    pub fn spawn(&self) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut was = false;
            loop {
                let now = match me.try_acquire_or_renew().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(lease = %me.cfg.name, "lease round failed: {e}");
                        me.is_leader()
                    }
                };
                if was && !me.is_leader() {
                    tracing::warn!(lease = %me.cfg.name, "lost leadership");
                }
                was = now;
                tokio::time::sleep(me.cfg.retry_period).await;
            }
        })
    }
}
