//! In-process fakes of the node plugins' side of a migration: each fake
//! serves the real `NodeMigration` gRPC service (r3map.node.v1) on
//! 127.0.0.1:0, and the test plays kubelet on it (NodeStage with the
//! publish context the controller returned, NodeUnstage).
//!
//! What the fakes model of node/src/plugin (node/peer.rs, migrate.rs),
//! because the controller's correctness depends on it:
//! - NodeStage without `migrateFrom` reopens a region this node kept (and
//!   a target that was pulling from it gives way), or opens the region
//!   from the region service, taking a new epoch;
//! - NodeStage with a live `migrateFrom`: the source (looked up by the
//!   endpoint dialled) starts tracking writes, the target pulls with its
//!   device held (I/O waits) until Finalize; refused when the source does
//!   not answer or holds no region;
//! - NodeStage with a hand-over: the source is sealed and the target takes
//!   the region over at once (post-copy); a source that is gone or kept
//!   nothing means staging from the region service instead;
//! - NodeUnstage: a target before finalize rolls its pull back (the
//!   source stops tracking); anything else keeps the region, with its
//!   write authority, for the next node;
//! - Finalize on a target: the source is sealed, the epoch moves to the
//!   target, its device is released; UNAVAILABLE when the source does not
//!   answer and `seed_lost` is false; idempotent;
//! - Abort: a target before finalize gives its pull up (after finalize:
//!   FAILED_PRECONDITION); a source stops tracking;
//! - Release: closes a region kept without a device (FAILED_PRECONDITION
//!   while a device serves it); when a target holds every chunk it
//!   releases its source itself, as the real node's pull watcher does.
//!
//! The region's writers live in one [`World`]: after every change (a gRPC
//! call, a stage, a death) it checks that no two live nodes both write the
//! region (a device whose I/O is not held, with the write authority) and
//! that the store's epoch accepts one node at most. Every breach is kept
//! in [`World::violations`].

// The fakes answer in tonic's (large) Status, as the real service does.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use csi::migration::MigrateFrom;
use csi::nodepb::migration_status::Role;
use csi::nodepb::node_migration_server::{NodeMigration, NodeMigrationServer};
use csi::nodepb::{
    AbortReply, FinalizeReply, FinalizeRequest, MigrationStatus, ReleaseReply, ReleaseRequest,
    VolumeRequest,
};
use tonic::{Request, Response, Status};

/// Chunks of every fake region.
pub const CHUNKS: u64 = 64;

/// One call a fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The node that received it.
    pub node: String,
    /// `Status`, `Finalize`, `Abort`, `Release`, or `Release(peer)` (from
    /// the target once it holds every chunk).
    pub rpc: &'static str,
    /// The volume named.
    pub volume: String,
    /// Finalize's `seed_lost`.
    pub seed_lost: bool,
}

/// A target's pull.
#[derive(Debug, Clone, Default)]
pub struct Pull {
    /// The node pulled from.
    pub source: String,
    /// Chunks here.
    pub present: u64,
    /// Finalized: the region is written here.
    pub finalized: bool,
    /// Given up.
    pub aborted: bool,
}

impl Pull {
    fn complete(&self) -> bool {
        self.finalized && self.present == CHUNKS
    }
}

/// One volume on one node.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// A device serves it here (staged).
    pub device: bool,
    /// The device's I/O waits (a live target before finalize).
    pub held: bool,
    /// This node believes it may write the region.
    pub writer: bool,
    /// The epoch it writes at.
    pub epoch: u64,
    /// Handed over: never written here again.
    pub sealed: bool,
    /// As a source: the target tracking its writes.
    pub tracking: Option<String>,
    /// As a target: the pull.
    pub pull: Option<Pull>,
}

#[derive(Default)]
struct NodeState {
    alive: bool,
    endpoint: String,
    vols: BTreeMap<String, Held>,
}

/// Every fake node, the region store's epochs, every call received.
#[derive(Default)]
pub struct WorldState {
    /// Region -> the epoch the store accepts writes at.
    epoch: BTreeMap<String, u64>,
    nodes: BTreeMap<String, NodeState>,
    calls: Vec<Call>,
    violations: Vec<String>,
    /// Node pairs that cannot reach each other (the controller reaches
    /// both).
    partitions: Vec<(String, String)>,
}

fn unavailable(what: String) -> Status {
    Status::unavailable(what)
}

impl WorldState {
    fn alive(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.alive)
    }

    fn vol(&mut self, node: &str, id: &str) -> Option<&mut Held> {
        self.nodes.get_mut(node)?.vols.get_mut(id)
    }

    fn node_at(&self, endpoint: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|(_, n)| n.endpoint == endpoint)
            .map(|(k, _)| k.clone())
    }

    fn next_epoch(&mut self, id: &str) -> u64 {
        let e = self.epoch.entry(id.to_string()).or_default();
        *e += 1;
        *e
    }

    fn current(&self, id: &str) -> u64 {
        self.epoch.get(id).copied().unwrap_or(0)
    }

    /// A source that can serve `id` to a target: alive, holding it, not
    /// handed over, not fenced.
    fn can_serve(&self, node: &str, id: &str) -> bool {
        let cur = self.current(id);
        self.alive(node)
            && self.nodes[node]
                .vols
                .get(id)
                .is_some_and(|h| h.writer && !h.sealed && h.epoch == cur)
    }

    fn seal(&mut self, node: &str, id: &str) {
        if let Some(h) = self.vol(node, id) {
            h.sealed = true;
            h.writer = false;
            h.tracking = None;
        }
    }

    /// NodeStage without a migration: reopen what this node kept, or
    /// open from the region service at a new epoch.
    fn open(&mut self, node: &str, id: &str) {
        if self.can_serve(node, id) {
            let h = self.vol(node, id).expect("held");
            h.device = true;
            h.held = false;
            if let Some(t) = h.tracking.take() {
                // A target pulling from here gives way.
                if let Some(p) = self.vol(&t, id).and_then(|h| h.pull.as_mut()) {
                    if !p.finalized {
                        p.aborted = true;
                    }
                }
            }
            return;
        }
        let epoch = self.next_epoch(id);
        self.nodes.get_mut(node).expect("node").vols.insert(
            id.to_string(),
            Held {
                device: true,
                writer: true,
                epoch,
                ..Held::default()
            },
        );
    }

    fn stage(&mut self, node: &str, id: &str, from: Option<MigrateFrom>) -> Result<(), Status> {
        if !self.alive(node) {
            return Err(unavailable(format!("node {node} is down")));
        }
        let Some(f) = from else {
            self.open(node, id);
            return Ok(());
        };
        let src = self
            .node_at(&f.endpoint)
            .filter(|s| *s == f.node)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "migrateFrom {} is not the endpoint of node {}",
                    f.endpoint, f.node
                ))
            })?;
        if src == node {
            return Err(Status::invalid_argument("migrating from itself"));
        }
        let ok = self.can_serve(&src, id);
        if f.live {
            if !ok {
                return Err(unavailable(format!(
                    "node {src} does not serve {id} for a live migration"
                )));
            }
            if let Some(h) = self.vol(&src, id) {
                h.tracking = Some(node.to_string());
            }
            self.nodes.get_mut(node).expect("node").vols.insert(
                id.to_string(),
                Held {
                    device: true,
                    held: true,
                    pull: Some(Pull {
                        source: src,
                        ..Pull::default()
                    }),
                    ..Held::default()
                },
            );
            return Ok(());
        }
        if !ok {
            // The previous node kept nothing (or is gone): it flushed at
            // unstage, so the region service has every write.
            self.open(node, id);
            return Ok(());
        }
        self.seal(&src, id);
        let epoch = self.next_epoch(id);
        self.nodes.get_mut(node).expect("node").vols.insert(
            id.to_string(),
            Held {
                device: true,
                writer: true,
                epoch,
                pull: Some(Pull {
                    source: src,
                    finalized: true,
                    ..Pull::default()
                }),
                ..Held::default()
            },
        );
        Ok(())
    }

    fn unstage(&mut self, node: &str, id: &str) {
        let Some(h) = self.vol(node, id) else { return };
        match h.pull.clone() {
            Some(p) if !p.finalized => {
                self.nodes.get_mut(node).expect("node").vols.remove(id);
                if self.alive(&p.source) {
                    if let Some(s) = self.vol(&p.source, id) {
                        if s.tracking.as_deref() == Some(node) {
                            s.tracking = None;
                        }
                    }
                }
            }
            _ => {
                h.device = false;
                h.held = false;
            }
        }
    }

    fn status(&mut self, node: &str, id: &str) -> MigrationStatus {
        let mut st = MigrationStatus {
            volume_id: id.to_string(),
            role: Role::None as i32,
            phase: "none".into(),
            ..MigrationStatus::default()
        };
        let Some(h) = self.vol(node, id) else {
            return st;
        };
        st.attached = h.device;
        st.epoch = h.epoch;
        match &h.pull {
            Some(p) => {
                st.role = Role::Target as i32;
                st.phase = if p.complete() {
                    "complete"
                } else if p.finalized {
                    "post-copy"
                } else if p.aborted {
                    "aborted"
                } else {
                    "pre-copy"
                }
                .into();
                st.chunks_present = p.present;
                st.chunks_total = CHUNKS;
                st.finalized = p.finalized;
                st.complete = p.complete();
            }
            None => {
                st.phase = if h.device { "serving" } else { "retained" }.into();
                if h.tracking.is_some() || h.sealed {
                    st.role = Role::Source as i32;
                    st.finalized = h.sealed;
                }
                st.chunks_present = CHUNKS;
                st.chunks_total = CHUNKS;
            }
        }
        st
    }

    fn finalize(&mut self, node: &str, id: &str, seed_lost: bool) -> Result<u64, Status> {
        let h = self.vol(node, id).ok_or_else(|| {
            Status::failed_precondition(format!("{id} is not being migrated to {node}"))
        })?;
        let Some(p) = h.pull.clone() else {
            return Err(Status::failed_precondition(format!(
                "{id} is not being migrated to {node}"
            )));
        };
        if p.finalized {
            return Ok(h.epoch);
        }
        if p.aborted {
            return Err(Status::failed_precondition(format!(
                "the migration of {id} to {node} was given up"
            )));
        }
        if !seed_lost {
            let cut = self
                .partitions
                .iter()
                .any(|(a, b)| (a == node && *b == p.source) || (b == node && *a == p.source));
            if cut || !self.can_serve(&p.source, id) {
                return Err(unavailable(format!(
                    "finalizing {id}: the source node {} does not answer",
                    p.source
                )));
            }
            self.seal(&p.source, id);
        }
        // seed_lost: every chunk comes from the region service; the new
        // epoch fences whatever the lost source still holds.
        let epoch = self.next_epoch(id);
        let h = self.vol(node, id).expect("held");
        h.writer = true;
        h.epoch = epoch;
        h.held = false;
        if let Some(p) = h.pull.as_mut() {
            p.finalized = true;
        }
        self.after_progress(node, id);
        Ok(epoch)
    }

    fn abort(&mut self, node: &str, id: &str) -> Result<(), Status> {
        let Some(h) = self.vol(node, id) else {
            return Ok(());
        };
        if let Some(p) = h.pull.clone() {
            if p.finalized {
                return Err(Status::failed_precondition(format!(
                    "{id} was finalized on {node}: the region lives here now"
                )));
            }
            if h.device {
                h.pull.as_mut().expect("pull").aborted = true;
            } else {
                self.nodes.get_mut(node).expect("node").vols.remove(id);
            }
            if self.alive(&p.source) {
                if let Some(s) = self.vol(&p.source, id) {
                    if s.tracking.as_deref() == Some(node) {
                        s.tracking = None;
                    }
                }
            }
            return Ok(());
        }
        h.tracking = None;
        Ok(())
    }

    fn release(&mut self, node: &str, id: &str) -> Result<(), Status> {
        match self.vol(node, id) {
            None => Ok(()),
            Some(h) if h.device => Err(Status::failed_precondition(format!(
                "{id} is staged on {node} with a device"
            ))),
            Some(_) => {
                self.nodes.get_mut(node).expect("node").vols.remove(id);
                Ok(())
            }
        }
    }

    /// A target that holds every chunk releases its source's kept copy.
    fn after_progress(&mut self, node: &str, id: &str) {
        let Some(p) = self.vol(node, id).and_then(|h| h.pull.clone()) else {
            return;
        };
        if p.complete() && self.alive(&p.source) {
            self.calls.push(Call {
                node: p.source.clone(),
                rpc: "Release(peer)",
                volume: id.to_string(),
                seed_lost: false,
            });
            let _ = self.release(&p.source, id);
        }
    }

    fn check(&mut self, after: &str) {
        let ids: Vec<String> = self
            .nodes
            .values()
            .flat_map(|n| n.vols.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for id in ids {
            let cur = self.current(&id);
            let mut writing = Vec::new();
            let mut accepted = Vec::new();
            for (name, n) in &self.nodes {
                let Some(h) = n.vols.get(&id) else { continue };
                if n.alive && h.writer && h.device && !h.held {
                    writing.push(name.clone());
                }
                if h.writer && h.epoch == cur {
                    accepted.push(name.clone());
                }
            }
            if writing.len() > 1 {
                self.violations.push(format!(
                    "after {after}: nodes {writing:?} all write {id} through a device"
                ));
            }
            if accepted.len() > 1 {
                self.violations.push(format!(
                    "after {after}: the store accepts {id} from {accepted:?} (epoch {cur})"
                ));
            }
        }
    }
}

/// The fakes' shared state.
#[derive(Clone, Default)]
pub struct World(Arc<Mutex<WorldState>>);

impl World {
    fn step<T>(&self, what: &str, f: impl FnOnce(&mut WorldState) -> T) -> T {
        let mut w = self.0.lock().unwrap();
        let out = f(&mut w);
        w.check(what);
        out
    }

    /// Cuts the network between nodes `a` and `b` (each still answers
    /// the controller).
    pub fn partition(&self, a: &str, b: &str) {
        self.0
            .lock()
            .unwrap()
            .partitions
            .push((a.to_string(), b.to_string()));
    }

    /// kubelet's NodeStage of `id` on `node` with the controller's publish
    /// context.
    pub fn stage(&self, node: &str, id: &str, ctx: &HashMap<String, String>) -> Result<(), Status> {
        let from = MigrateFrom::from_context(ctx).map_err(Status::from)?;
        self.step(&format!("NodeStage on {node}"), |w| w.stage(node, id, from))
    }

    /// kubelet's NodeUnstage of `id` on `node`.
    pub fn unstage(&self, node: &str, id: &str) {
        self.step(&format!("NodeUnstage on {node}"), |w| w.unstage(node, id))
    }

    /// `n` more chunks reach `node`'s pull of `id`.
    pub fn pull(&self, node: &str, id: &str, n: u64) {
        self.step(&format!("pull on {node}"), |w| {
            if let Some(p) = w.vol(node, id).and_then(|h| h.pull.as_mut()) {
                p.present = (p.present + n).min(CHUNKS);
            }
            w.after_progress(node, id);
        })
    }

    /// Nodes whose writes the store accepts now (alive, with the write
    /// authority at the current epoch).
    pub fn writers(&self, id: &str) -> Vec<String> {
        let w = self.0.lock().unwrap();
        let cur = w.current(id);
        w.nodes
            .iter()
            .filter(|(_, n)| n.alive)
            .filter(|(_, n)| {
                n.vols
                    .get(id)
                    .is_some_and(|h| h.writer && h.epoch == cur && !h.sealed)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The volume `id` on `node`, if held there.
    pub fn held(&self, node: &str, id: &str) -> Option<Held> {
        self.0.lock().unwrap().vol(node, id).cloned()
    }

    /// The region's current epoch.
    pub fn epoch(&self, id: &str) -> u64 {
        self.0.lock().unwrap().current(id)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    /// Calls `node` received, as `Rpc` or `Finalize(seed_lost)`; Status
    /// calls left out (the reconciler polls).
    pub fn calls_to(&self, node: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.node == node && c.rpc != "Status")
            .map(|c| match c.rpc {
                "Finalize" if c.seed_lost => "Finalize(seed_lost)".to_string(),
                r => r.to_string(),
            })
            .collect()
    }

    /// Every breach of "one writer" so far.
    pub fn violations(&self) -> Vec<String> {
        self.0.lock().unwrap().violations.clone()
    }

    fn record(&self, node: &str, rpc: &'static str, volume: &str, seed_lost: bool) {
        self.0.lock().unwrap().calls.push(Call {
            node: node.to_string(),
            rpc,
            volume: volume.to_string(),
            seed_lost,
        });
    }
}

/// One fake's NodeMigration service.
struct Service {
    world: World,
    node: String,
}

impl Service {
    fn enter(&self, rpc: &'static str, id: &str, seed_lost: bool) -> Result<(), Status> {
        self.world.record(&self.node, rpc, id, seed_lost);
        csi::validate::volume_id(id).map_err(Status::from)?;
        // A node marked dead whose server still runs an old connection.
        if !self.world.0.lock().unwrap().alive(&self.node) {
            return Err(unavailable(format!("node {} is down", self.node)));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl NodeMigration for Service {
    async fn status(&self, r: Request<VolumeRequest>) -> Result<Response<MigrationStatus>, Status> {
        let id = r.into_inner().volume_id;
        self.enter("Status", &id, false)?;
        let st = self.world.step("Status", |w| w.status(&self.node, &id));
        Ok(Response::new(st))
    }

    async fn finalize(
        &self,
        r: Request<FinalizeRequest>,
    ) -> Result<Response<FinalizeReply>, Status> {
        let r = r.into_inner();
        self.enter("Finalize", &r.volume_id, r.seed_lost)?;
        let epoch = self
            .world
            .step(&format!("Finalize on {}", self.node), |w| {
                w.finalize(&self.node, &r.volume_id, r.seed_lost)
            })?;
        Ok(Response::new(FinalizeReply {
            seed_lost: r.seed_lost,
            epoch,
            ..FinalizeReply::default()
        }))
    }

    async fn abort(&self, r: Request<VolumeRequest>) -> Result<Response<AbortReply>, Status> {
        let id = r.into_inner().volume_id;
        self.enter("Abort", &id, false)?;
        self.world.step(&format!("Abort on {}", self.node), |w| {
            w.abort(&self.node, &id)
        })?;
        Ok(Response::new(AbortReply {}))
    }

    async fn release(&self, r: Request<ReleaseRequest>) -> Result<Response<ReleaseReply>, Status> {
        let id = r.into_inner().volume_id;
        self.enter("Release", &id, false)?;
        self.world.step(&format!("Release on {}", self.node), |w| {
            w.release(&self.node, &id)
        })?;
        Ok(Response::new(ReleaseReply {}))
    }
}

/// A fake node plugin: its NodeMigration server on 127.0.0.1.
pub struct FakeNode {
    /// Node id.
    pub name: String,
    /// HOST:PORT of its migration service.
    pub endpoint: String,
    world: World,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeNode {
    /// Starts `name` in `world`.
    pub async fn start(world: &World, name: &str) -> FakeNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let svc = Service {
            world: world.clone(),
            node: name.to_string(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(NodeMigrationServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        world.step(&format!("start {name}"), |w| {
            let n = w.nodes.entry(name.to_string()).or_default();
            n.alive = true;
            n.endpoint = endpoint.clone();
        });
        FakeNode {
            name: name.to_string(),
            endpoint,
            world: world.clone(),
            task: Some(task),
        }
    }

    /// The node dies: its server stops (connections are refused), it
    /// writes nothing any more. What it held stays in the world, as a
    /// powered-off disk would.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let name = self.name.clone();
        self.world.step(&format!("{name} died"), |w| {
            if let Some(n) = w.nodes.get_mut(&name) {
                n.alive = false;
            }
        });
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
