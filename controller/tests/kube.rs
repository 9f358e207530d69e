//! The controller's Kubernetes side against an in-process double of the
//! API server (tests/support): R3mapVolume records with conflicts, faults,
//! concurrent writers and restarts; Events; Lease-based leader election;
//! a replica that does not lead refusing mutating calls.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi::pb::controller_server::Controller;
use r3map_csi_controller::controller::ControllerService;
use r3map_csi_controller::crd::R3mapVolume;
use r3map_csi_controller::leader::{Leader, LeaderConfig};
use r3map_csi_controller::records::{KubeOptions, KubeRecords, Records};
use r3map_csi_controller::state::VolumeRecord;
use serde_json::{json, Value};
use support::ApiServer;

const ID: &str = "csi-pvc-1-0123456789abcdef";

fn records(s: &ApiServer) -> KubeRecords {
    KubeRecords::new(s.client(), opts())
}

fn opts() -> KubeOptions {
    let mut o = KubeOptions::new("regions.r3map:7000");
    o.backoff = Duration::from_millis(1);
    o
}

fn rec() -> VolumeRecord {
    VolumeRecord {
        name: "pvc-1".into(),
        size: 64 << 20,
        params: csi::Params::default().to_context(),
        published: BTreeMap::new(),
        access_mode: Some("SINGLE_NODE_WRITER".into()),
        ..VolumeRecord::default()
    }
}

async fn create(r: &dyn Records, id: &str) {
    let v = rec();
    r.update(id, &|_| Some(v.clone())).await.unwrap();
}

async fn attach(
    r: &dyn Records,
    id: &str,
    node: &str,
) -> Result<Option<VolumeRecord>, csi::CsiError> {
    let node = node.to_string();
    r.update(id, &|cur| {
        cur.cloned().map(|mut v| {
            v.published.insert(node.clone(), false);
            v.owner.get_or_insert_with(|| node.clone());
            v
        })
    })
    .await
}

fn nodes(r: &VolumeRecord) -> Vec<&str> {
    r.published.keys().map(String::as_str).collect()
}

/// The attachments a simulated other writer adds: `node` into the stored
/// object's status, as a concurrent ControllerPublish would.
fn add_attachment(node: &'static str) -> support::Hook {
    Box::new(move |o: &mut Value| {
        let a = &mut o["status"]["attachments"];
        if !a.is_array() {
            *a = json!([]);
        }
        let list = a.as_array_mut().unwrap();
        if !list.iter().any(|x| x["nodeId"] == node) {
            list.push(json!({"nodeId": node, "readOnly": false}));
        }
    })
}

fn event_reasons(s: &ApiServer) -> Vec<String> {
    s.objects("events")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn records_survive_a_restart_and_post_events() {
    let s = ApiServer::start().await;
    {
        let r = records(&s);
        assert_eq!(r.get(ID).await.unwrap(), None);
        create(&r, ID).await;
        attach(&r, ID, "node-a").await.unwrap();
    }
    // A new client, as a restarted or rescheduled controller has.
    let r = records(&s);
    let got = r.get(ID).await.unwrap().expect("recorded");
    assert_eq!(got.size, 64 << 20);
    assert_eq!(nodes(&got), ["node-a"]);
    let all = r.list().await.unwrap();
    assert_eq!(all.keys().collect::<Vec<_>>(), [ID]);

    // The object as kubectl sees it: spec, owner, conditions.
    let o: R3mapVolume = serde_json::from_value(s.objects("r3mapvolumes")[0].clone()).unwrap();
    assert_eq!(o.spec.region_service, "regions.r3map:7000");
    assert_eq!(o.spec.chunk_size, csi::Params::default().chunk_size);
    let st = o.status.unwrap();
    assert_eq!(st.owner_node.as_deref(), Some("node-a"));
    assert_eq!(st.condition("Attached").unwrap().status, "True");
    assert_eq!(st.condition("Ready").unwrap().status, "True");
    assert_eq!(event_reasons(&s), ["Provisioned", "Attached"]);

    r.update(ID, &|_| None).await.unwrap();
    assert_eq!(r.get(ID).await.unwrap(), None);
    assert!(s.objects("r3mapvolumes").is_empty());
    assert_eq!(
        event_reasons(&s).last().map(String::as_str),
        Some("Deleted")
    );
}

#[tokio::test]
async fn a_conflict_on_every_write_is_resolved_without_losing_an_attachment() {
    let s = ApiServer::start().await;
    let r = records(&s);
    create(&r, ID).await;
    attach(&r, ID, "node-a").await.unwrap();
    // Each of the next three writes meets an object another writer just
    // changed (adding node-c): a stale resourceVersion, a real 409.
    s.interfere("r3mapvolumes", 3, add_attachment("node-c"));
    let after = attach(&r, ID, "node-b").await.unwrap().unwrap();
    assert_eq!(nodes(&after), ["node-a", "node-b", "node-c"]);
    let got = records(&s).get(ID).await.unwrap().unwrap();
    assert_eq!(nodes(&got), ["node-a", "node-b", "node-c"]);
    let puts = s
        .requests()
        .iter()
        .filter(|(m, p)| m == "PUT" && p.ends_with("/status"))
        .count();
    assert!(
        puts >= 4,
        "expected the refused writes to be retried, saw {puts} PUTs"
    );
}

#[tokio::test]
async fn retries_are_bounded_and_leave_the_record_as_it_was() {
    let s = ApiServer::start().await;
    let mut o = opts();
    o.max_retries = 2;
    let r = KubeRecords::new(s.client(), o);
    create(&r, ID).await;
    s.fail_writes("r3mapvolumes", 100, 409);
    let e = attach(&r, ID, "node-a").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e}");
    s.fail_writes("r3mapvolumes", 0, 409);
    assert!(r.get(ID).await.unwrap().unwrap().published.is_empty());
    // A failed write posts no Event.
    assert_eq!(event_reasons(&s), ["Provisioned"]);
}

#[tokio::test]
async fn server_errors_and_conflicts_on_create_are_retried() {
    let s = ApiServer::start().await;
    let r = records(&s);
    s.fail_writes("r3mapvolumes", 3, 500);
    create(&r, ID).await;
    s.fail_writes("r3mapvolumes", 2, 409);
    attach(&r, ID, "node-a").await.unwrap();
    let got = r.get(ID).await.unwrap().unwrap();
    assert_eq!(nodes(&got), ["node-a"]);
    // Exactly one object, with its status written.
    let objs = s.objects("r3mapvolumes");
    assert_eq!(objs.len(), 1);
    assert_eq!(objs[0]["status"]["attachments"][0]["nodeId"], "node-a");
}

#[tokio::test]
async fn a_status_lost_after_create_is_written_by_the_next_update() {
    let s = ApiServer::start().await;
    let mut o = opts();
    o.max_retries = 0;
    let once = KubeRecords::new(s.client(), o);
    // The POST passes, the status write after it fails (the creator died
    // in between, as far as the object is concerned).
    s.fail_writes_after("r3mapvolumes", 1, 1, 500);
    let v = rec();
    let e = once.update(ID, &|_| Some(v.clone())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(s.objects("r3mapvolumes")[0].get("status").is_none());
    // The retried CreateVolume finds the record as wanted and still writes
    // the missing status.
    let r = records(&s);
    let got = r.update(ID, &|cur| cur.cloned()).await.unwrap();
    assert_eq!(got, Some(rec()));
    let o: R3mapVolume = serde_json::from_value(s.objects("r3mapvolumes")[0].clone()).unwrap();
    let st = o.status.expect("status written by the next update");
    assert_eq!(st.condition("Ready").unwrap().status, "True");
    assert_eq!(st.condition("Attached").unwrap().status, "False");
}

#[tokio::test]
async fn two_concurrent_publishers_on_two_nodes_are_both_recorded() {
    let s = ApiServer::start().await;
    let a = records(&s);
    let b = records(&s);
    let ids: Vec<String> = (0..12).map(|i| format!("csi-pvc-{i}")).collect();
    for id in &ids {
        create(&a, id).await;
    }
    for id in &ids {
        let (x, y) = tokio::join!(attach(&a, id, "node-1"), attach(&b, id, "node-2"));
        x.unwrap();
        y.unwrap();
    }
    let fresh = records(&s);
    for id in &ids {
        let got = fresh.get(id).await.unwrap().unwrap();
        assert_eq!(nodes(&got), ["node-1", "node-2"], "{id}");
    }
}

fn lease_cfg(who: &str) -> LeaderConfig {
    LeaderConfig {
        namespace: "kube-system".into(),
        name: "r3map-csi-controller".into(),
        identity: who.into(),
        lease_duration: Duration::from_millis(800),
        renew_deadline: Duration::from_millis(500),
        retry_period: Duration::from_millis(50),
    }
}

fn holder(s: &ApiServer) -> Option<String> {
    s.objects("leases")
        .first()
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

#[tokio::test]
async fn never_two_leaders_and_takeover_after_the_holder_stops() {
    let s = ApiServer::start().await;
    let a = Leader::new(s.client(), lease_cfg("ctl-a"));
    let b = Leader::new(s.client(), lease_cfg("ctl-b"));
    let ta = a.spawn();
    let tb = b.spawn();
    let mut leaders_seen = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (la, lb) = (a.is_leader(), b.is_leader());
        assert!(!(la && lb), "two leaders at once");
        leaders_seen += usize::from(la || lb);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(leaders_seen > 0, "nobody became leader");
    let (first, second, t_first) = if a.is_leader() {
        (&a, &b, ta)
    } else {
        (&b, &a, tb)
    };
    assert_eq!(holder(&s).as_deref(), Some(first.identity()));

    // The holder stops renewing (crashed: no release).
    t_first.abort();
    let stopped = Instant::now();
    while !second.is_leader() {
        assert!(!(first.is_leader() && second.is_leader()), "two leaders");
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "no takeover after the holder stopped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Not before the lease duration, counted from the last renewal seen.
    assert!(
        stopped.elapsed() >= Duration::from_millis(800) - Duration::from_millis(60),
        "taken over after {:?}, before the lease expired",
        stopped.elapsed()
    );
    assert!(!first.is_leader());
    assert_eq!(holder(&s).as_deref(), Some(second.identity()));
    let transitions = s.objects("leases")[0]["spec"]["leaseTransitions"].as_i64();
    assert_eq!(transitions, Some(1));
}

#[tokio::test]
async fn a_lost_renewal_ends_leadership_and_release_hands_over_at_once() {
    let s = ApiServer::start().await;
    let a = Leader::new(s.client(), lease_cfg("ctl-a"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(a.is_leader());
    // Every renewal fails (the API server errs): leadership ends at the
    // renew deadline, before anyone else could take over.
    s.fail_writes("leases", 1000, 500);
    let t = a.spawn();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!a.is_leader(), "still leader after failing to renew");
    s.fail_writes("leases", 0, 500);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.is_leader(), "did not regain the lease it still holds");

    // An orderly stop clears the holder: the next candidate leads at once.
    t.abort();
    a.release().await.unwrap();
    assert!(!a.is_leader());
    let b = Leader::new(s.client(), lease_cfg("ctl-b"));
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&s).as_deref(), Some("ctl-b"));
}

#[tokio::test]
async fn a_replica_that_does_not_lead_refuses_mutating_calls() {
    let s = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Leader::new(s.client(), lease_cfg("ctl-a"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    let b = Leader::new(s.client(), lease_cfg("ctl-b"));
    assert!(!b.try_acquire_or_renew().await.unwrap());
    let regions = r3map_csi_controller::region::Regions::new(
        r3map::remote::client::ConnectOptions {
            addr: "127.0.0.1:1".into(),
            token_file: None,
            tls: None,
        },
        dir.path().join("credentials"),
    );
    let recs: Arc<dyn Records> = Arc::new(records(&s));
    let ctl = ControllerService::new(recs, Some(b), regions, 1 << 40, Duration::ZERO).unwrap();
    let req = csi::pb::ControllerPublishVolumeRequest {
        volume_id: ID.into(),
        node_id: "node-a".into(),
        volume_capability: Some(csi::capabilities::block(
            csi::pb::volume_capability::access_mode::Mode::SingleNodeWriter,
        )),
        ..Default::default()
    };
    let e = ctl
        .controller_publish_volume(tonic::Request::new(req))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let e = ctl
        .delete_volume(tonic::Request::new(csi::pb::DeleteVolumeRequest {
            volume_id: ID.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // Reads are served by every replica.
    let e = ctl
        .controller_get_volume(tonic::Request::new(csi::pb::ControllerGetVolumeRequest {
            volume_id: ID.into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}
