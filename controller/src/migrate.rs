//! Migration driven by attach and detach (docs/migration.md): the
//! decisions ControllerPublish and ControllerUnpublish take about a
//! volume's owner and migration, as pure functions of its record (so a
//! record write refused with 409 is simply decided again on what is there
//! now), the node directory that says where each node's migration service
//! listens, and the reconciler that follows a migration to its end.
//!
//! The rules:
//! - publish to a node while none holds the volume: that node owns it;
//! - publish to a second node while the owner is attached (a
//!   multi-node-multi-writer block volume): a live migration, the target
//!   pulls while the owner writes, its device held until finalize;
//! - unpublish the owner while a live migration runs (its NodeUnstage
//!   flushed): finalize, the target writes the region from now on;
//! - unpublish the target before finalize: roll back, the owner serves on;
//! - publish to a node after the owner was unpublished (the pod moved): a
//!   hand-over from the node that kept the region, post-copy;
//! - the target holds every chunk: the migration is complete.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use csi::migration::{MigrateFrom, PeerAuth};
use csi::nodepb::migration_status::Role;
use csi::nodepb::{FinalizeReply, FinalizeRequest, ReleaseRequest, VolumeRequest};
use csi::{CsiError, CsiResult};
use tonic::Code;

use crate::crd::MigrationPhase;
use crate::records::Records;
use crate::state::{Migration, VolumeRecord};

/// Where each node's migration service listens.
#[async_trait]
pub trait NodeDirectory: Send + Sync {
    /// HOST:PORT of `node`'s migration service, if known.
    async fn endpoint(&self, node: &str) -> CsiResult<Option<String>>;
}

/// A fixed map (`--node-endpoint NODE=HOST:PORT`).
pub struct StaticNodes(pub BTreeMap<String, String>);

#[async_trait]
impl NodeDirectory for StaticNodes {
    async fn endpoint(&self, node: &str) -> CsiResult<Option<String>> {
        Ok(self.0.get(node).cloned())
    }
}

/// The Node objects of the cluster: a node plugin runs on the host
/// network, so its migration service is at the node's InternalIP and
/// `--node-migration-port`.
pub struct KubeNodes {
    api: kube::Api<k8s_openapi::api::core::v1::Node>,
    port: u16,
}

impl KubeNodes {
    /// Nodes through `client`.
    pub fn new(client: kube::Client, port: u16) -> KubeNodes {
        KubeNodes {
            api: kube::Api::all(client),
            port,
        }
    }
}

#[async_trait]
impl NodeDirectory for KubeNodes {
    async fn endpoint(&self, node: &str) -> CsiResult<Option<String>> {
        let n = match self.api.get_opt(node).await {
            Ok(n) => n,
            Err(e) => return Err(CsiError::Unavailable(format!("reading Node {node}: {e}"))),
        };
        let ip = n
            .and_then(|n| n.status)
            .and_then(|s| s.addresses)
            .and_then(|a| a.into_iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address);
        Ok(ip.map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]:{}", self.port)
            } else {
                format!("{ip}:{}", self.port)
            }
        }))
    }
}

/// The controller's way to the node plugins' migration services.
pub struct Peers {
    /// Where each node listens.
    pub nodes: Arc<dyn NodeDirectory>,
    /// Credentials (mutual TLS across hosts).
    pub auth: PeerAuth,
    /// Deadline of one control call.
    pub timeout: Duration,
}

impl Peers {
    async fn client(
        &self,
        node: &str,
    ) -> CsiResult<csi::nodepb::node_migration_client::NodeMigrationClient<r3map::net::AuthedChannel>>
    {
        let ep = self.nodes.endpoint(node).await?.ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "the migration endpoint of node {node} is unknown"
            ))
        })?;
        self.auth.node_client(&ep).await
    }

    async fn call<T, F>(&self, what: &str, node: &str, f: F) -> CsiResult<T>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(CsiError::from(s).context(&format!("{what} on node {node}"))),
            Err(_) => Err(CsiError::Unavailable(format!(
                "{what} on node {node}: no answer in {:?}",
                self.timeout
            ))),
        }
    }

    /// The migration service endpoint of `node`.
    pub async fn endpoint(&self, node: &str) -> CsiResult<Option<String>> {
        self.nodes.endpoint(node).await
    }

    /// Finalize on the target.
    pub async fn finalize(
        &self,
        node: &str,
        id: &str,
        seed_lost: bool,
    ) -> CsiResult<FinalizeReply> {
        let mut c = self.client(node).await?;
        let req = FinalizeRequest {
            volume_id: id.to_string(),
            seed_lost,
        };
        self.call("Finalize", node, c.finalize(req)).await
    }

    /// Abort on either side.
    pub async fn abort(&self, node: &str, id: &str) -> CsiResult<()> {
        let mut c = self.client(node).await?;
        let req = VolumeRequest {
            volume_id: id.to_string(),
        };
        self.call("Abort", node, c.abort(req)).await.map(|_| ())
    }

    /// Release on the node that kept the region.
    pub async fn release(&self, node: &str, id: &str) -> CsiResult<()> {
        let mut c = self.client(node).await?;
        let req = ReleaseRequest {
            volume_id: id.to_string(),
        };
        self.call("Release", node, c.release(req)).await.map(|_| ())
    }

    /// Status on a node.
    pub async fn status(&self, node: &str, id: &str) -> CsiResult<csi::nodepb::MigrationStatus> {
        let mut c = self.client(node).await?;
        let req = VolumeRequest {
            volume_id: id.to_string(),
        };
        self.call("Status", node, c.status(req)).await
    }
}

/// What a publish to `node` does to the record: the record wanted (equal
/// to `cur` for a repeat), or the error to answer.
pub fn on_publish(
    cur: &VolumeRecord,
    id: &str,
    node: &str,
    read_only: bool,
    single_node: bool,
) -> CsiResult<VolumeRecord> {
    match cur.published.get(node) {
        Some(&ro) if ro == read_only => return Ok(cur.clone()),
        Some(_) => {
            return Err(CsiError::AlreadyExists(format!(
                "volume {id:?} is published to node {node:?} with readonly={}",
                !read_only
            )))
        }
        None => {}
    }
    let others: Vec<&String> = cur.published.keys().collect();
    let mut next = cur.clone();
    next.published.insert(node.to_string(), read_only);
    match others.as_slice() {
        [] => {
            match &cur.owner {
                Some(prev) if prev != node => {
                    // The pod moved: the previous node may keep the region
                    // (with writes not pushed yet, in async durability).
                    next.migration = Some(Migration {
                        source: prev.clone(),
                        target: node.to_string(),
                        live: false,
                        phase: MigrationPhase::PostCopy,
                        chunks_present: 0,
                        chunks_total: 0,
                        epoch: 0,
                    });
                }
                _ => {
                    // Back on the node that kept it, or the first owner: a
                    // migration still in post-copy toward this node goes on.
                    if cur.migration.as_ref().is_some_and(|m| m.target != node) {
                        next.migration = None;
                    }
                }
            }
            next.owner = Some(node.to_string());
            Ok(next)
        }
        [owner] if !single_node => {
            if cur.migration.as_ref().is_some_and(|m| m.phase == MigrationPhase::PreCopy) {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} is being migrated already; one migration at a time"
                )));
            }
            let source = cur.owner.clone().unwrap_or_else(|| (*owner).clone());
            next.owner = Some(source.clone());
            next.migration = Some(Migration {
                source,
                target: node.to_string(),
                live: true,
                phase: MigrationPhase::PreCopy,
                chunks_present: 0,
                chunks_total: 0,
                epoch: 0,
            });
            Ok(next)
        }
        _ if single_node => Err(CsiError::FailedPrecondition(format!(
            "volume {id:?} is published to node {}; unpublish it there first",
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        _ => Err(CsiError::FailedPrecondition(format!(
            "volume {id:?} is published to nodes {}: a second node is a migration target, a third is refused",
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The publish context's migration part for `node`, if it is the target
/// of the record's migration (`endpoint`: the source's, resolved).
pub fn migrate_from(rec: &VolumeRecord, node: &str, endpoint: &str) -> Option<MigrateFrom> {
    let m = rec.migration.as_ref().filter(|m| m.target == node)?;
    Some(MigrateFrom {
        endpoint: endpoint.to_string(),
        node: m.source.clone(),
        live: m.live,
    })
}

/// What an unpublish from `node` needs done at the nodes before the record
/// changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnpublishStep {
    /// Nothing: not a party to a live migration.
    Plain,
    /// The source of a live migration leaves: finalize on the target.
    Finalize {
        /// The target.
        target: String,
    },
    /// The target of a live migration leaves before finalize (or every
    /// node is unpublished at once): roll back.
    RollBack {
        /// The source, which keeps the region.
        source: String,
        /// The target, whose pull is given up.
        target: String,
    },
}

/// The step an unpublish from `node` takes.
pub fn unpublish_step(rec: &VolumeRecord, node: &str) -> UnpublishStep {
    match &rec.migration {
        Some(m) if m.phase == MigrationPhase::PreCopy && m.source == node => {
            UnpublishStep::Finalize {
                target: m.target.clone(),
            }
        }
        // Every node at once (an empty node id): the live migration cannot
        // finish, and the target's pull must end too.
        Some(m) if m.phase == MigrationPhase::PreCopy && (m.target == node || node.is_empty()) => {
            UnpublishStep::RollBack {
                source: m.source.clone(),
                target: m.target.clone(),
            }
        }
        _ => UnpublishStep::Plain,
    }
}

/// The record once the live migration to `target` was finalized at
/// `epoch`, as a target's Status shows when the record missed it (the
/// controller died between Finalize and its write): the target owns the
/// region, post-copy. Any other record is returned as it is.
pub fn on_finalized(cur: &VolumeRecord, target: &str, epoch: u64) -> VolumeRecord {
    let mut next = cur.clone();
    if let Some(m) = next
        .migration
        .as_mut()
        .filter(|m| m.target == target && m.phase == MigrationPhase::PreCopy)
    {
        m.phase = MigrationPhase::PostCopy;
        m.epoch = epoch;
        next.owner = Some(target.to_string());
    }
    next
}

/// The record after an unpublish from `node` (empty: every node) whose
/// step succeeded; `epoch`: what finalize answered.
pub fn on_unpublish(cur: &VolumeRecord, node: &str, epoch: Option<u64>) -> VolumeRecord {
    let mut next = cur.clone();
    if node.is_empty() {
        next.published.clear();
    } else {
        next.published.remove(node);
    }
    match unpublish_step(cur, node) {
        UnpublishStep::Finalize { target } => {
            next.owner = Some(target);
            if let Some(m) = next.migration.as_mut() {
                m.phase = MigrationPhase::PostCopy;
                m.epoch = epoch.unwrap_or(m.epoch);
            }
        }
        UnpublishStep::RollBack { source, .. } => {
            next.owner = Some(source);
            next.migration = None;
        }
        UnpublishStep::Plain => {}
    }
    next
}

/// Follows every migration in progress one step: progress from the
/// target, completion when it holds every chunk. Returns how many are
/// still in progress.
pub async fn reconcile_once(records: &dyn Records, peers: &Peers) -> CsiResult<usize> {
    let all = records.list().await?;
    let mut open = 0;
    for (id, rec) in all {
        let Some(m) = rec.migration.clone() else {
            continue;
        };
        open += 1;
        let st = match peers.status(&m.target, &id).await {
            Ok(st) => st,
            Err(e) => {
                tracing::debug!(volume = %id, target = %m.target, "migration status: {e}");
                continue;
            }
        };
        // A target that holds the volume and pulls nothing (it staged
        // from the region service because the previous node kept nothing,
        // or its pull ended before it restarted) has the migration behind
        // it; "none" is a target not staged yet.
        let pulls = st.role == Role::Target as i32;
        let done = st.complete || (!pulls && st.phase != "none");
        let complete = done && m.phase == MigrationPhase::PostCopy;
        // Finalized on the target while the record says pre-copy: the
        // controller died between Finalize and its record write.
        let repair = pulls && st.finalized && m.phase == MigrationPhase::PreCopy;
        let (present, total, epoch) = (st.chunks_present, st.chunks_total, st.epoch);
        let target = m.target.clone();
        let r = records
            .update(&id, &|cur| {
                let v = cur?;
                let Some(mm) = v.migration.as_ref().filter(|mm| mm.target == target) else {
                    return Some(v.clone());
                };
                if repair && mm.phase == MigrationPhase::PreCopy {
                    // Recorded as finalized first; completion (if so) is
                    // the next pass's: pre-copy straight to none would
                    // read as a roll-back.
                    return Some(on_finalized(v, &target, epoch));
                }
                let mut v = v.clone();
                if complete && mm.phase == MigrationPhase::PostCopy {
                    v.migration = None;
                } else if let Some(mm) = v.migration.as_mut() {
                    mm.chunks_present = present;
                    mm.chunks_total = total;
                    // A hand-over's target took the region over when it
                    // staged (no Finalize call told us the epoch).
                    if mm.phase == MigrationPhase::PostCopy && pulls && epoch > mm.epoch {
                        mm.epoch = epoch;
                    }
                }
                Some(v)
            })
            .await;
        match r {
            Ok(Some(v)) if v.migration.is_none() => {
                open -= 1;
                tracing::info!(volume = %id, target = %m.target, "migration complete");
            }
            Ok(_) if repair => {
                tracing::warn!(volume = %id, target = %m.target, epoch, "recorded a finalize the record had missed");
            }
            Ok(_) => {}
            Err(e) if e.code() == Code::NotFound => {}
            Err(e) => tracing::warn!(volume = %id, "recording migration progress: {e}"),
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> VolumeRecord {
        VolumeRecord {
            name: "pvc".into(),
            size: 1 << 20,
            ..VolumeRecord::default()
        }
    }

    #[test]
    fn first_publish_owns_and_repeat_is_idempotent() {
        let r = on_publish(&rec(), "v", "a", false, true).unwrap();
        assert_eq!(r.owner.as_deref(), Some("a"));
        assert_eq!(r.migration, None);
        assert_eq!(on_publish(&r, "v", "a", false, true).unwrap(), r);
        let e = on_publish(&r, "v", "a", true, true).unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        let e = on_publish(&r, "v", "b", false, true).unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
    }

    #[test]
    fn live_migration_finalize_and_rollback() {
        let a = on_publish(&rec(), "v", "a", false, false).unwrap();
        let ab = on_publish(&a, "v", "b", false, false).unwrap();
        let m = ab.migration.clone().unwrap();
        assert_eq!(
            (m.source.as_str(), m.target.as_str(), m.live),
            ("a", "b", true)
        );
        assert_eq!(ab.owner.as_deref(), Some("a"));
        assert_eq!(migrate_from(&ab, "b", "h:1").unwrap().node, "a");
        assert_eq!(migrate_from(&ab, "a", "h:1"), None);
        // A third node is refused, and so is a second migration.
        assert!(on_publish(&ab, "v", "c", false, false).is_err());
        // The source leaves: finalize.
        assert_eq!(
            unpublish_step(&ab, "a"),
            UnpublishStep::Finalize { target: "b".into() }
        );
        let b = on_unpublish(&ab, "a", Some(5));
        assert_eq!(b.owner.as_deref(), Some("b"));
        let m = b.migration.clone().unwrap();
        assert_eq!((m.phase, m.epoch), (MigrationPhase::PostCopy, 5));
        // The target leaves first instead: roll back.
        assert_eq!(
            unpublish_step(&ab, "b"),
            UnpublishStep::RollBack {
                source: "a".into(),
                target: "b".into()
            }
        );
        // Every node at once: a roll-back too (the target's pull ends).
        assert_eq!(
            unpublish_step(&ab, ""),
            UnpublishStep::RollBack {
                source: "a".into(),
                target: "b".into()
            }
        );
        let back = on_unpublish(&ab, "b", None);
        assert_eq!(back.owner.as_deref(), Some("a"));
        assert_eq!(back.migration, None);
        assert_eq!(back.published.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn moved_pod_is_a_hand_over_and_coming_back_is_not() {
        let a = on_publish(&rec(), "v", "a", false, true).unwrap();
        let gone = on_unpublish(&a, "a", None);
        assert_eq!(gone.owner.as_deref(), Some("a"));
        let b = on_publish(&gone, "v", "b", false, true).unwrap();
        let m = b.migration.clone().unwrap();
        assert_eq!((m.source.as_str(), m.live), ("a", false));
        assert_eq!(b.owner.as_deref(), Some("b"));
        // Back to a before b's pull completed: a kept the region.
        let again = on_publish(&on_unpublish(&gone, "a", None), "v", "a", false, true).unwrap();
        assert_eq!(again.migration, None);
        assert_eq!(again.owner.as_deref(), Some("a"));
    }
}
