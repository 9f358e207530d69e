//! Migration driven by attach and detach, in process: a real
//! ControllerService (KubeRecords through a real kube client against the
//! HTTP double of the API server in tests/support, real JSON, real
//! resourceVersion conflicts; a real region service over `memory:`;
//! `Peers` dialling the nodes over gRPC) and fake node plugins
//! (tests/support/nodes.rs) that serve the real NodeMigration service and
//! model a node's side of a migration. The test plays the CO: the
//! attacher's ControllerPublish/Unpublish and kubelet's NodeStage/Unstage
//! in the order Kubernetes issues them (a pod's node unstages before its
//! volume is detached).
//!
//! After every step the fakes check that no two nodes write the region;
//! each test ends by asserting that no such moment happened.

#[path = "support/nodes.rs"]
mod nodes;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use csi::migration::{PeerAuth, CTX_MIGRATE_FROM, CTX_MIGRATE_FROM_NODE, CTX_MIGRATION};
use csi::pb::controller_server::Controller;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use nodes::{FakeNode, World, CHUNKS};
use r3map::remote::client::ConnectOptions;
use r3map::remote::{RegionService, Store, DEFAULT_MAX_REQUEST};
use r3map_csi_controller::controller::ControllerService;
use r3map_csi_controller::crd::{MigrationPhase, R3mapVolume, R3mapVolumeStatus};
use r3map_csi_controller::migrate::{reconcile_once, Peers, StaticNodes};
use r3map_csi_controller::records::{object_name, KubeOptions, KubeRecords};
use r3map_csi_controller::region::Regions;
use serde_json::{json, Value};
use support::ApiServer;
use tonic::{Code, Request, Status};

const MNMW: Mode = Mode::MultiNodeMultiWriter;
const SNW: Mode = Mode::SingleNodeWriter;
const A: &str = "node-a";
const B: &str = "node-b";
const C: &str = "node-c";

/// A controller, its records and its way to the nodes.
struct Ctl {
    svc: ControllerService,
    records: Arc<KubeRecords>,
    peers: Arc<Peers>,
}

/// The API server double, a region service, fake nodes and a controller.
struct Env {
    api: ApiServer,
    world: World,
    nodes: BTreeMap<String, FakeNode>,
    regions: Arc<Regions>,
    ctl: Option<Ctl>,
    _dir: tempfile::TempDir,
    _region_service: tokio::task::JoinHandle<()>,
}

fn opts() -> KubeOptions {
    let mut o = KubeOptions::new("regions.r3map:7000");
    o.backoff = Duration::from_millis(1);
    o
}

impl Env {
    async fn start(names: &[&str]) -> Env {
        Env::start_with(names, Duration::ZERO).await
    }

    /// `hold`: how long each mutating call keeps its per-volume guard.
    async fn start_with(names: &[&str], hold: Duration) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let svc = RegionService::open(
            Store::open("memory:").await.unwrap(),
            64 << 10,
            DEFAULT_MAX_REQUEST,
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let region_service = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc.server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        let regions = Regions::new(
            ConnectOptions::plain(addr.to_string()),
            dir.path().join("credentials"),
        );
        let world = World::default();
        let mut nodes = BTreeMap::new();
        for n in names {
            nodes.insert(n.to_string(), FakeNode::start(&world, n).await);
        }
        let mut env = Env {
            api: ApiServer::start().await,
            world,
            nodes,
            regions,
            ctl: None,
            _dir: dir,
            _region_service: region_service,
        };
        env.restart_controller_with(hold, None);
        env
    }

    /// Every fake node's endpoint.
    fn directory(&self) -> BTreeMap<String, String> {
        self.nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.endpoint.clone()))
            .collect()
    }

    /// Drops the controller and starts a new one over the same API server
    /// (what a crash or a rescheduled pod leaves behind: the records).
    /// `directory`: the node endpoints it knows (default: every fake's).
    fn restart_controller_with(
        &mut self,
        hold: Duration,
        directory: Option<BTreeMap<String, String>>,
    ) {
        self.ctl = None;
        let records = Arc::new(KubeRecords::new(self.api.client(), opts()));
        let peers = Arc::new(Peers {
            nodes: Arc::new(StaticNodes(directory.unwrap_or_else(|| self.directory()))),
            auth: PeerAuth::default(),
            timeout: Duration::from_secs(5),
        });
        let svc =
            ControllerService::new(records.clone(), None, self.regions.clone(), 1 << 30, hold)
                .unwrap()
                .with_peers(peers.clone());
        self.ctl = Some(Ctl {
            svc,
            records,
            peers,
        });
    }

    fn restart_controller(&mut self) {
        self.restart_controller_with(Duration::ZERO, None);
    }

    fn ctl(&self) -> &Ctl {
        self.ctl.as_ref().expect("a controller runs")
    }

    fn endpoint(&self, node: &str) -> String {
        self.nodes[node].endpoint.clone()
    }

    async fn create(&self, name: &str, mode: Mode) -> String {
        let r = CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 4 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![csi::capabilities::block(mode)],
            parameters: HashMap::from([("chunkSize".into(), "64KiB".into())]),
            ..Default::default()
        };
        let v = self.ctl().svc.create_volume(Request::new(r)).await.unwrap();
        v.into_inner().volume.unwrap().volume_id
    }

    async fn publish(
        &self,
        id: &str,
        node: &str,
        mode: Mode,
    ) -> Result<HashMap<String, String>, Status> {
        let r = ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: Some(csi::capabilities::block(mode)),
            ..Default::default()
        };
        let out = self
            .ctl()
            .svc
            .controller_publish_volume(Request::new(r))
            .await?;
        Ok(out.into_inner().publish_context)
    }

    async fn unpublish(&self, id: &str, node: &str) -> Result<(), Status> {
        let r = ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        };
        self.ctl()
            .svc
            .controller_unpublish_volume(Request::new(r))
            .await
            .map(|_| ())
    }

    /// Publish, then kubelet stages with the context returned.
    async fn attach(&self, id: &str, node: &str, mode: Mode) -> HashMap<String, String> {
        let ctx = self.publish(id, node, mode).await.unwrap();
        self.world.stage(node, id, &ctx).unwrap();
        ctx
    }

    /// The pod leaves `node`: kubelet unstages, then the attacher
    /// unpublishes.
    async fn detach(&self, id: &str, node: &str) -> Result<(), Status> {
        self.world.unstage(node, id);
        self.unpublish(id, node).await
    }

    /// One pass of the migration reconciler: how many are still open.
    async fn reconcile(&self) -> usize {
        let c = self.ctl();
        reconcile_once(c.records.as_ref(), &c.peers).await.unwrap()
    }

    fn object(&self, id: &str) -> Value {
        let name = object_name(id);
        self.api
            .objects("r3mapvolumes")
            .into_iter()
            .find(|o| o["metadata"]["name"] == name.as_str())
            .expect("the R3mapVolume exists")
    }

    /// The R3mapVolume's status, as kubectl shows it.
    fn status(&self, id: &str) -> R3mapVolumeStatus {
        let o: R3mapVolume = serde_json::from_value(self.object(id)).unwrap();
        o.status.expect("status written")
    }

    fn attached(&self, id: &str) -> Vec<String> {
        self.status(id)
            .attachments
            .into_iter()
            .map(|a| a.node_id)
            .collect()
    }

    /// Reasons of the migration Events, in the order they were posted.
    fn migration_events(&self) -> Vec<String> {
        let mut evs = self.api.objects("events");
        evs.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
        });
        evs.iter()
            .filter_map(|e| e["reason"].as_str())
            .filter(|r| r.starts_with("Migration"))
            .map(str::to_string)
            .collect()
    }

    /// No moment had two writers of any region.
    fn assert_never_two_writers(&self) {
        let v = self.world.violations();
        assert!(v.is_empty(), "two writers: {v:#?}");
    }
}

fn phase_of(st: &R3mapVolumeStatus) -> (MigrationPhase, Option<&str>) {
    (st.phase, st.owner_node.as_deref())
}

/// `ctx` names a migration from `node` (`mode`: live or handover).
fn assert_migrates_from(env: &Env, ctx: &HashMap<String, String>, node: &str, mode: &str) {
    assert_eq!(
        ctx.get(CTX_MIGRATE_FROM),
        Some(&env.endpoint(node)),
        "{ctx:?}"
    );
    assert_eq!(
        ctx.get(CTX_MIGRATE_FROM_NODE).map(String::as_str),
        Some(node)
    );
    assert_eq!(ctx.get(CTX_MIGRATION).map(String::as_str), Some(mode));
}

fn assert_plain(ctx: &HashMap<String, String>) {
    assert!(!ctx.contains_key(CTX_MIGRATE_FROM), "{ctx:?}");
    assert!(!ctx.contains_key(CTX_MIGRATION), "{ctx:?}");
}

/// Reconciles until no migration is open (at most `n` passes).
async fn reconcile_to_end(env: &Env, n: usize) {
    for _ in 0..n {
        if env.reconcile().await == 0 {
            return;
        }
    }
    panic!(
        "the migration is still open after {n} passes: {:?}",
        env.status_json()
    );
}

/// B pulls every chunk and the reconciler follows to the end: the
/// migration is complete with B the owner. Returns the status then.
async fn complete_on_b(env: &Env, id: &str) -> R3mapVolumeStatus {
    env.world.pull(B, id, CHUNKS);
    reconcile_to_end(env, 3).await;
    let st = env.status(id);
    assert_eq!(phase_of(&st), (MigrationPhase::Complete, Some(B)));
    st
}

impl Env {
    fn status_json(&self) -> Value {
        self.api
            .objects("r3mapvolumes")
            .into_iter()
            .map(|o| o["status"].clone())
            .collect()
    }
}

/// Publish A, stage; publish B (live), stage: a live migration in
/// pre-copy with `pulled` chunks on B.
async fn live_migration(env: &Env, name: &str, pulled: u64) -> String {
    let id = env.create(name, MNMW).await;
    let ctx = env.attach(&id, A, MNMW).await;
    assert_plain(&ctx);
    assert_eq!(env.world.writers(&id), [A]);
    let ctx = env.attach(&id, B, MNMW).await;
    assert_migrates_from(env, &ctx, A, "live");
    env.world.pull(B, &id, pulled);
    id
}

#[tokio::test]
async fn live_migration_finalizes_when_the_source_leaves_and_completes() {
    let env = Env::start(&[A, B]).await;
    let id = env.create("pvc-live", MNMW).await;
    let ctx_a = env.attach(&id, A, MNMW).await;
    assert_plain(&ctx_a);
    assert_eq!(env.publish(&id, A, MNMW).await.unwrap(), ctx_a);

    let ctx_b = env.publish(&id, B, MNMW).await.unwrap();
    assert_migrates_from(&env, &ctx_b, A, "live");
    // The attacher retries: the same answer, nothing new recorded.
    let puts = env.api.requests().len();
    assert_eq!(env.publish(&id, B, MNMW).await.unwrap(), ctx_b);
    assert!(
        env.api.requests()[puts..].iter().all(|(m, _)| m == "GET"),
        "a repeated publish wrote: {:?}",
        &env.api.requests()[puts..]
    );
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PreCopy, Some(A)));
    assert_eq!(st.migration_source.as_deref(), Some(A));
    assert_eq!(st.migration_target.as_deref(), Some(B));
    assert!(st.migration_live);
    assert_eq!(env.attached(&id), [A, B]);

    // kubelet on B stages: the pull runs, B's device held.
    env.world.stage(B, &id, &ctx_b).unwrap();
    assert!(env.world.held(B, &id).unwrap().held);
    env.world.pull(B, &id, 10);
    assert_eq!(env.reconcile().await, 1);
    assert_eq!(env.status(&id).progress, format!("10/{CHUNKS}"));
    assert_eq!(env.world.writers(&id), [A]);

    // The pod leaves A: A's node unstages, the attacher unpublishes A.
    env.detach(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Finalize"]);
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PostCopy, Some(B)));
    assert_eq!(st.epoch, env.world.epoch(&id));
    assert_eq!(st.epoch, 2, "A opened at 1, B took over at 2");
    assert_eq!(env.attached(&id), [B]);
    assert_eq!(env.world.writers(&id), [B]);
    assert!(!env.world.held(B, &id).unwrap().held);
    // Repeated: nothing more happens at the nodes.
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Finalize"]);

    // Post-copy: B pulls the rest, then releases A's kept copy itself.
    env.world.pull(B, &id, CHUNKS);
    assert_eq!(env.world.calls_to(A), ["Release(peer)"]);
    assert!(env.world.held(A, &id).is_none());
    reconcile_to_end(&env, 3).await;
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::Complete, Some(B)));
    assert_eq!(st.progress, format!("{CHUNKS}/{CHUNKS}"));
    assert_eq!(st.migration_target, None);
    assert_eq!(
        env.migration_events(),
        [
            "MigrationStarted",
            "MigrationFinalized",
            "MigrationComplete"
        ]
    );
    // The volume stays usable on B; the next migration starts from B.
    let ctx_a2 = env.publish(&id, A, MNMW).await.unwrap();
    assert_migrates_from(&env, &ctx_a2, B, "live");
    env.assert_never_two_writers();
}

#[tokio::test]
async fn unpublishing_the_target_first_rolls_back() {
    let env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-rollback", 5).await;
    // The pod on B goes before A's does: B's unstage gives its pull up,
    // the attacher unpublishes B.
    env.detach(&id, B).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Abort"]);
    assert_eq!(env.world.calls_to(A), Vec::<String>::new());
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::RolledBack, Some(A)));
    assert_eq!(st.migration_target, None);
    assert_eq!(env.attached(&id), [A]);
    assert_eq!(env.world.writers(&id), [A]);
    assert_eq!(env.world.held(A, &id).unwrap().tracking, None);
    assert_eq!(env.world.epoch(&id), 1, "a roll-back moves no epoch");
    assert_eq!(
        env.migration_events(),
        ["MigrationStarted", "MigrationRolledBack"]
    );
    // Nothing left to follow; a new migration can start.
    assert_eq!(env.reconcile().await, 0);
    let ctx = env.attach(&id, B, MNMW).await;
    assert_migrates_from(&env, &ctx, A, "live");
    env.assert_never_two_writers();
}

#[tokio::test]
async fn unpublishing_every_node_at_once_rolls_back_and_ends_the_pull() {
    let env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-all-nodes", 5).await;
    // An empty node id: the volume leaves every node. The target's pull
    // must end (Abort), or it goes on tracking at the source.
    env.unpublish(&id, "").await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Abort"]);
    let st = env.status(&id);
    assert_eq!(st.migration_target, None);
    assert_eq!(env.attached(&id), Vec::<String>::new());
    assert_eq!(env.world.held(A, &id).unwrap().tracking, None);
    assert_eq!(env.world.epoch(&id), 1, "a roll-back moves no epoch");
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_moved_rwo_pod_is_a_hand_over_from_the_node_that_kept_the_region() {
    let env = Env::start(&[A, B]).await;
    let id = env.create("pvc-rwo", SNW).await;
    env.attach(&id, A, SNW).await;
    // While A holds it, a single-node volume goes nowhere else.
    let e = env.publish(&id, B, SNW).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The old pod is gone before the new one is scheduled.
    env.detach(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), Vec::<String>::new());
    assert_eq!(env.attached(&id), Vec::<String>::new());
    assert_eq!(env.status(&id).owner_node.as_deref(), Some(A));
    // A keeps the region (and its write authority) for the next node.
    assert_eq!(env.world.writers(&id), [A]);

    let ctx = env.publish(&id, B, SNW).await.unwrap();
    assert_migrates_from(&env, &ctx, A, "handover");
    assert_eq!(env.publish(&id, B, SNW).await.unwrap(), ctx);
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PostCopy, Some(B)));
    assert!(!st.migration_live);
    env.world.stage(B, &id, &ctx).unwrap();
    assert_eq!(env.world.writers(&id), [B]);
    assert!(env.world.held(A, &id).unwrap().sealed);
    // B took the region over at a new epoch when it staged; the record
    // learns it from B's status.
    env.world.pull(B, &id, 10);
    env.reconcile().await;
    assert_eq!(env.status(&id).epoch, env.world.epoch(&id));
    assert!(env.world.epoch(&id) > 1);
    let st = complete_on_b(&env, &id).await;
    assert_eq!(
        st.epoch,
        env.world.epoch(&id),
        "the epoch outlives the migration record"
    );
    assert_eq!(
        env.migration_events(),
        ["MigrationStarted", "MigrationComplete"]
    );
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_hand_over_without_the_previous_nodes_endpoint_stages_from_the_region_service() {
    let mut env = Env::start(&[A, B]).await;
    let mut dir = env.directory();
    dir.remove(A);
    env.restart_controller_with(Duration::ZERO, Some(dir));
    let id = env.create("pvc-noep", SNW).await;
    env.attach(&id, A, SNW).await;
    env.detach(&id, A).await.unwrap();
    let ctx = env.attach(&id, B, SNW).await;
    assert_plain(&ctx);
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::None, Some(B)));
    assert_eq!(st.migration_source, None);
    assert_eq!(env.reconcile().await, 0);
    assert_eq!(env.migration_events(), Vec::<String>::new());
    // B opened the region at a new epoch: A's kept copy is fenced.
    assert_eq!(env.world.writers(&id), [B]);
    assert_eq!(env.world.epoch(&id), 2);
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_hand_over_whose_source_died_completes_from_the_region_service() {
    let mut env = Env::start(&[A, B]).await;
    let id = env.create("pvc-gone", SNW).await;
    env.attach(&id, A, SNW).await;
    env.detach(&id, A).await.unwrap();
    let ctx = env.publish(&id, B, SNW).await.unwrap();
    assert_migrates_from(&env, &ctx, A, "handover");
    // A dies before B stages: B stages from the region service (A
    // flushed at unstage) and pulls nothing from anyone.
    env.nodes.get_mut(A).unwrap().stop();
    env.world.stage(B, &id, &ctx).unwrap();
    assert_eq!(env.world.writers(&id), [B]);
    reconcile_to_end(&env, 3).await;
    assert_eq!(
        phase_of(&env.status(&id)),
        (MigrationPhase::Complete, Some(B))
    );
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_target_that_disappears_mid_migration_leaves_the_source_writing() {
    let mut env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-target-dies", 7).await;
    env.nodes.get_mut(B).unwrap().stop();
    // The pod on A goes; finalizing on B is impossible: refused,
    // nothing recorded, A still the writer.
    let before = env.object(&id);
    let e = env.detach(&id, A).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(env.object(&id)["status"], before["status"]);
    assert_eq!(env.attached(&id), [A, B]);
    assert_eq!(
        phase_of(&env.status(&id)),
        (MigrationPhase::PreCopy, Some(A))
    );
    assert_eq!(env.world.writers(&id), [A]);
    // The reconciler cannot reach B either: the record stays.
    assert_eq!(env.reconcile().await, 1);

    // B's VolumeAttachment is force-detached: roll back, and A (B cannot
    // tell it) stops tracking for B.
    env.unpublish(&id, B).await.unwrap();
    assert_eq!(env.world.calls_to(A), ["Abort"]);
    assert_eq!(env.world.held(A, &id).unwrap().tracking, None);
    assert_eq!(
        phase_of(&env.status(&id)),
        (MigrationPhase::RolledBack, Some(A))
    );
    assert_eq!(env.world.writers(&id), [A]);
    // The attacher retries A's detach: a plain one now; then the volume
    // is staged again on A from the region it kept.
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(env.attached(&id), Vec::<String>::new());
    let ctx = env.attach(&id, A, MNMW).await;
    assert_plain(&ctx);
    assert_eq!(env.world.writers(&id), [A]);
    assert_eq!(env.world.epoch(&id), 1);
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_source_that_dies_mid_migration_is_finalized_from_the_region_service() {
    let mut env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-source-dies", 30).await;
    // A's node dies with the pod on it: no unstage; the attacher's
    // force-detach unpublishes A.
    env.nodes.get_mut(A).unwrap().stop();
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Finalize", "Finalize(seed_lost)"]);
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PostCopy, Some(B)));
    assert_eq!(st.epoch, 2);
    assert_eq!(env.world.writers(&id), [B]);
    complete_on_b(&env, &id).await;
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_partition_between_source_and_target_is_no_reason_to_drop_the_source() {
    let mut env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-partition", 30).await;
    env.world.unstage(A, &id);
    // B cannot reach A, but the controller reaches both: A is alive and may
    // hold writes it has not pushed, so no finalize without it.
    env.world.partition(A, B);
    let e = env.unpublish(&id, A).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert_eq!(
        env.world.calls_to(B),
        ["Finalize"],
        "no Finalize(seed_lost)"
    );
    assert_eq!(env.world.writers(&id), [A]);
    // A dies for real: the attacher's retry finalizes from the region service.
    env.nodes.get_mut(A).unwrap().stop();
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(
        env.world.calls_to(B),
        ["Finalize", "Finalize", "Finalize(seed_lost)"]
    );
    assert_eq!(env.world.writers(&id), [B]);
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_controller_restarted_mid_migration_finalizes_and_completes() {
    let mut env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-restart", 3).await;
    env.restart_controller();
    env.world.pull(B, &id, 20);
    assert_eq!(env.reconcile().await, 1);
    env.detach(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Finalize"]);
    assert_eq!(
        phase_of(&env.status(&id)),
        (MigrationPhase::PostCopy, Some(B))
    );
    env.restart_controller();
    complete_on_b(&env, &id).await;
    assert_eq!(
        env.migration_events(),
        [
            "MigrationStarted",
            "MigrationFinalized",
            "MigrationComplete"
        ]
    );
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_controller_that_died_between_finalize_and_its_record_finalizes_again() {
    let mut env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-crash", 3).await;
    env.world.unstage(A, &id);
    // Finalize reaches B; the record write never does (the API server
    // fails, then the controller dies).
    env.api.fail_writes("r3mapvolumes", 1000, 500);
    let e = env.unpublish(&id, A).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    env.api.fail_writes("r3mapvolumes", 0, 500);
    assert_eq!(env.world.writers(&id), [B]);
    assert_eq!(
        phase_of(&env.status(&id)),
        (MigrationPhase::PreCopy, Some(A))
    );
    env.restart_controller();
    // The attacher retries: Finalize again (idempotent: same epoch).
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Finalize", "Finalize"]);
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PostCopy, Some(B)));
    assert_eq!(st.epoch, 2);
    complete_on_b(&env, &id).await;
    env.assert_never_two_writers();
}

#[tokio::test]
async fn the_reconciler_records_a_finalize_the_record_missed() {
    let mut env = Env::start(&[A, B]).await;
    let id = live_migration(&env, "pvc-crash-r", 3).await;
    env.world.unstage(A, &id);
    env.api.fail_writes("r3mapvolumes", 1000, 500);
    env.unpublish(&id, A).await.unwrap_err();
    env.api.fail_writes("r3mapvolumes", 0, 500);
    env.restart_controller();
    // Before the attacher comes back, the reconciler sees B finalized.
    assert_eq!(env.reconcile().await, 1);
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PostCopy, Some(B)));
    assert_eq!(st.epoch, 2);
    assert_eq!(env.attached(&id), [A, B]);
    // A's detach is then a plain one: no second Finalize.
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(env.world.calls_to(B), ["Finalize"]);
    assert_eq!(env.attached(&id), [B]);
    complete_on_b(&env, &id).await;
    assert_eq!(
        env.migration_events(),
        [
            "MigrationStarted",
            "MigrationFinalized",
            "MigrationComplete"
        ]
    );
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_target_detached_while_its_finalize_went_unrecorded_keeps_the_region() {
    let mut env = Env::start(&[A, B, C]).await;
    let id = live_migration(&env, "pvc-crash-b", 3).await;
    env.world.unstage(A, &id);
    env.api.fail_writes("r3mapvolumes", 1000, 500);
    env.unpublish(&id, A).await.unwrap_err();
    env.api.fail_writes("r3mapvolumes", 0, 500);
    env.restart_controller();
    // Before A's detach is retried, B's pod goes too: B was finalized,
    // so this is no roll-back; the record must name B as the owner.
    env.detach(&id, B).await.unwrap();
    let st = env.status(&id);
    assert_eq!(st.owner_node.as_deref(), Some(B), "{st:?}");
    assert_eq!(st.epoch, 2);
    assert_eq!(env.world.writers(&id), [B]);
    env.unpublish(&id, A).await.unwrap();
    assert_eq!(env.attached(&id), Vec::<String>::new());
    assert_eq!(env.status(&id).owner_node.as_deref(), Some(B));
    // The next node takes the region over from B, which holds it.
    let ctx = env.attach(&id, C, MNMW).await;
    assert_migrates_from(&env, &ctx, B, "handover");
    env.assert_never_two_writers();
}

/// A concurrent writer: each time, another field of the status changes
/// (a migration endpoint, as another controller version might set), so
/// the write under test meets a real stale resourceVersion.
fn other_field() -> support::Hook {
    Box::new(|o: &mut Value| {
        o["status"]["migrationEndpoint"] = json!("10.9.9.9:7443");
        let n = o["metadata"]["annotations"]["touched"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        o["metadata"]["annotations"]["touched"] = json!((n + 1).to_string());
    })
}

#[tokio::test]
async fn a_conflict_on_every_write_loses_no_attachment_or_migration_state() {
    let env = Env::start(&[A, B]).await;
    let id = env.create("pvc-conflicts", MNMW).await;
    env.attach(&id, A, MNMW).await;
    // From here on every write of the record meets one 409 first.
    env.api
        .interfere_every("r3mapvolumes", 2, 10_000, other_field());
    let status_puts = |env: &Env| {
        env.api
            .requests()
            .iter()
            .filter(|(m, p)| m == "PUT" && p.ends_with("/status"))
            .count()
    };
    let puts0 = status_puts(&env);
    let ctx = env.attach(&id, B, MNMW).await;
    assert_migrates_from(&env, &ctx, A, "live");
    assert_eq!(env.attached(&id), [A, B]);
    env.world.pull(B, &id, 9);
    assert_eq!(env.reconcile().await, 1);
    assert_eq!(env.status(&id).progress, format!("9/{CHUNKS}"));
    env.detach(&id, A).await.unwrap();
    let st = env.status(&id);
    assert_eq!(phase_of(&st), (MigrationPhase::PostCopy, Some(B)));
    assert_eq!(st.epoch, 2);
    assert_eq!(env.attached(&id), [B]);
    // Injected 409s without a change, too, on top.
    env.api.fail_writes("r3mapvolumes", 3, 409);
    let st = complete_on_b(&env, &id).await;
    assert_eq!(env.attached(&id), [B]);
    // The other writer's field survived every write of ours.
    assert_eq!(st.migration_endpoint.as_deref(), Some("10.9.9.9:7443"));
    let touched = env.object(&id)["metadata"]["annotations"]["touched"].clone();
    assert!(
        touched
            .as_str()
            .is_some_and(|n| n.parse::<u32>().unwrap() >= 4),
        "{touched}"
    );
    // Every write was retried: at least twice as many status writes as
    // records (progress, finalize, complete, and the publish).
    assert!(
        status_puts(&env) - puts0 >= 8,
        "{} PUTs",
        status_puts(&env) - puts0
    );
    assert_eq!(env.world.calls_to(B), ["Finalize"]);
    assert_eq!(
        env.migration_events(),
        [
            "MigrationStarted",
            "MigrationFinalized",
            "MigrationComplete"
        ]
    );
    env.assert_never_two_writers();
}

#[tokio::test]
async fn the_publish_context_agrees_with_the_record_after_a_conflicting_change() {
    let env = Env::start(&[A, B]).await;
    let id = env.create("pvc-race", MNMW).await;
    env.attach(&id, A, MNMW).await;
    env.world.unstage(A, &id);
    // Between the controller's read and its write, another writer (a
    // deposed leader finishing A's detach) removes A's attachment: B's
    // publish is now a hand-over, not a live migration.
    env.api.interfere(
        "r3mapvolumes",
        1,
        Box::new(|o: &mut Value| {
            o["status"]["attachments"] = json!([]);
        }),
    );
    let ctx = match env.publish(&id, B, MNMW).await {
        Ok(ctx) => ctx,
        // Refused as changed meanwhile: the retry sees the record as it is.
        Err(e) if e.code() == Code::Aborted => env.publish(&id, B, MNMW).await.unwrap(),
        Err(e) => panic!("{e:?}"),
    };
    let st = env.status(&id);
    let live = ctx.get(CTX_MIGRATION).map(String::as_str) == Some("live");
    assert_eq!(
        live, st.migration_live,
        "context {ctx:?} against the record {st:?}"
    );
    env.world.stage(B, &id, &ctx).unwrap();
    env.world.pull(B, &id, CHUNKS);
    reconcile_to_end(&env, 3).await;
    assert_eq!(env.world.writers(&id), [B]);
    env.assert_never_two_writers();
}

#[tokio::test]
async fn a_third_node_and_concurrent_calls_are_refused() {
    let env = Env::start_with(&[A, B, C], Duration::from_millis(300)).await;
    let id = live_migration(&env, "pvc-three", 1).await;
    // A second migration while one runs: refused, whatever the mode.
    for mode in [MNMW, SNW] {
        let e = env.publish(&id, C, mode).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    assert_eq!(env.attached(&id), [A, B]);
    // A publish that is not a migration, to a node that is not a party:
    // a read-only attachment is refused the same way.
    let mut r = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: C.into(),
        volume_capability: Some(csi::capabilities::block(MNMW)),
        ..Default::default()
    };
    r.readonly = true;
    let e = env
        .ctl()
        .svc
        .controller_publish_volume(Request::new(r))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Two calls for one volume at once: one runs, the other is ABORTED.
    env.world.unstage(A, &id);
    let (x, y) = tokio::join!(env.unpublish(&id, A), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        env.unpublish(&id, B).await
    });
    x.unwrap();
    assert_eq!(y.unwrap_err().code(), Code::Aborted);
    assert_eq!(env.world.calls_to(B), ["Finalize"]);
    assert_eq!(env.world.calls_to(A), Vec::<String>::new());
    assert_eq!(
        phase_of(&env.status(&id)),
        (MigrationPhase::PostCopy, Some(B))
    );
    // The published node is B alone now: C is a second node again, a
    // migration from B, even before B's post-copy ends (B serves what
    // it has and pulls the rest).
    let ctx = env.publish(&id, C, MNMW).await.unwrap();
    assert_migrates_from(&env, &ctx, B, "live");
    env.assert_never_two_writers();
}

#[tokio::test]
async fn the_fakes_catch_two_writers() {
    let env = Env::start(&[A, B]).await;
    let id = env.create("pvc-check", MNMW).await;
    env.attach(&id, A, MNMW).await;
    // What a controller that forgot the migration would cause: B opens
    // the region from the region service while A writes it.
    env.world.stage(B, &id, &HashMap::new()).unwrap();
    let v = env.world.violations();
    assert!(v.iter().any(|v| v.contains("all write")), "{v:?}");
}
