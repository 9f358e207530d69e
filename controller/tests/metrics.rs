//! `/metrics` of the real `r3map-csi-controller` binary: two replicas with
//! `--records kubernetes --leader-election --metrics-address`, reaching the
//! in-process API server double (tests/support) through a kubeconfig, and
//! a real `r3map backend`. Driven over the CSI socket as the sidecars
//! would; the scrapes are parsed strictly (`csi::metrics::parse`) and
//! checked against what happened: calls by method and code, volumes by
//! the phase in their `R3mapVolume` status, record writes retried after
//! real 409s and 500s, and the leader gauge moving to the other replica
//! when the leader stops.
//!
//! Needs the r3map binary beside the test (`cargo build --release -p
//! r3map`).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi::capabilities::block;
use csi::metrics::{parse, scrape, Exposition};
use csi::pb::controller_client::ControllerClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use kube::api::PostParams;
use kube::Api;
use r3map_csi_controller::crd::{MigrationPhase, R3mapVolume};
use r3map_csi_controller::records::object_name;
use serde_json::json;
use support::ApiServer;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// A child process, stopped with SIGTERM (then SIGKILL) when dropped.
struct Proc(Child);

impl Proc {
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(None) = self.0.try_wait() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

fn r3map_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("r3map");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release -p r3map` first",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_port(p: &mut Proc, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(p.0.try_wait().unwrap().is_none(), "{what} exited");
        assert!(Instant::now() < deadline, "{what} did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One controller replica.
struct Replica {
    proc: Proc,
    sock: PathBuf,
    metrics: SocketAddr,
}

async fn start_replica(dir: &Path, identity: &str, kubeconfig: &Path, region: u16) -> Replica {
    let sock = dir.join(format!("{identity}.sock"));
    let mport = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_r3map-csi-controller"))
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--region-service", &format!("127.0.0.1:{region}")])
        .arg("--state-dir")
        .arg(dir.join(identity))
        .args(["--records", "kubernetes", "--leader-election"])
        .args(["--identity", identity, "--namespace", "default"])
        .args(["--metrics-address", &format!("127.0.0.1:{mport}")])
        .env("KUBECONFIG", kubeconfig)
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn controller");
    let mut proc = Proc(child);
    wait_port(&mut proc, mport, "controller metrics").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "controller did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Replica {
        proc,
        sock,
        metrics: format!("127.0.0.1:{mport}").parse().unwrap(),
    }
}

impl Replica {
    async fn ctl(&self) -> ControllerClient<Channel> {
        let sock = self.sock.clone();
        let chan = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        ControllerClient::new(chan)
    }

    async fn metrics(&self) -> Exposition {
        let s = scrape(self.metrics, "/metrics").await.unwrap();
        assert_eq!(s.status, 200);
        parse(&s.body).unwrap_or_else(|e| panic!("{e}\n{}", s.body))
    }

    async fn leader(&self) -> f64 {
        self.metrics()
            .await
            .value("r3map_controller_leader", &[])
            .expect("leader gauge")
    }

    /// Waits until the leader gauge reads `want`.
    async fn wait_leader(&self, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.leader().await != want {
            assert!(Instant::now() < deadline, "leader gauge never read {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn volumes(e: &Exposition, phase: &str) -> f64 {
    e.value("r3map_controller_volumes", &[("phase", phase)])
        .unwrap_or_else(|| panic!("no volumes gauge for {phase}"))
}

fn calls(e: &Exposition, method: &str, code: &str) -> f64 {
    let l = [("method", method), ("code", code)];
    e.value("r3map_csi_calls_total", &l).unwrap_or(0.0)
}

fn retries(e: &Exposition, reason: &str) -> f64 {
    let l = [("reason", reason)];
    e.value("r3map_controller_record_write_retries_total", &l)
        .unwrap_or(0.0)
}

fn create_req(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 4 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block(Mode::SingleNodeWriter)],
        parameters: HashMap::from([("chunkSize".into(), "64KiB".into())]),
        ..Default::default()
    }
}

fn publish_req(id: &str, node: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(block(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_metrics_follow_records_conflicts_and_leadership() {
    let api = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
             clusters: [{{name: t, cluster: {{server: 'http://{}'}}}}]\n\
             users: [{{name: t, user: {{}}}}]\n\
             contexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n",
            api.addr
        ),
    )
    .unwrap();
    let region = free_port();
    let mut backend = Proc(
        Command::new(r3map_bin())
            .args(["backend", "--listen", &format!("127.0.0.1:{region}")])
            .args(["--store", "memory:"])
            .env("R3MAP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(&mut backend, region, "r3map backend").await;

    let mut a = start_replica(dir.path(), "ctl-a", &kubeconfig, region).await;
    a.wait_leader(1.0).await;
    let b = start_replica(dir.path(), "ctl-b", &kubeconfig, region).await;

    // Every phase is exported, 0 included.
    let e = a.metrics().await;
    for p in r3map_csi_controller::metrics::PHASES {
        let name = r3map_csi_controller::metrics::phase_name(p);
        assert_eq!(volumes(&e, name), 0.0, "{name}");
    }
    assert_eq!(e.family("r3map_controller_volumes").unwrap().kind, "gauge");

    let mut c = a.ctl().await;
    let mut ids = Vec::new();
    for name in ["pvc-a", "pvc-b"] {
        let v = c.create_volume(create_req(name)).await.unwrap();
        ids.push(v.into_inner().volume.unwrap().volume_id);
    }
    let e = a.metrics().await;
    assert_eq!(volumes(&e, "None"), 2.0);
    assert_eq!(calls(&e, "CreateVolume", "OK"), 2.0);
    assert_eq!(
        e.value(
            "r3map_csi_call_duration_seconds_count",
            &[("method", "CreateVolume"), ("code", "OK")]
        ),
        Some(2.0)
    );
    assert_eq!(retries(&e, "conflict"), 0.0);

    // A migration phase written into one volume's status, as the
    // migration controller writes it.
    let vols: Api<R3mapVolume> = Api::all(api.client());
    let name = object_name(&ids[0]);
    let mut o = vols.get(&name).await.unwrap();
    o.status.as_mut().unwrap().phase = MigrationPhase::PreCopy;
    vols.replace_status(&name, &PostParams::default(), &o)
        .await
        .unwrap();
    let e = a.metrics().await;
    assert_eq!((volumes(&e, "None"), volumes(&e, "PreCopy")), (1.0, 1.0));

    // Two writes meet an object another writer just changed (real 409s
    // on a stale resourceVersion); then one meets a 500.
    api.interfere(
        "r3mapvolumes",
        2,
        Box::new(|o| o["metadata"]["labels"]["touched"] = json!("yes")),
    );
    c.controller_publish_volume(publish_req(&ids[0], "node-1"))
        .await
        .unwrap();
    api.fail_writes("r3mapvolumes", 1, 500);
    c.controller_publish_volume(publish_req(&ids[1], "node-1"))
        .await
        .unwrap();
    let bad = DeleteVolumeRequest::default();
    assert_eq!(
        c.delete_volume(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let e = a.metrics().await;
    assert_eq!(retries(&e, "conflict"), 2.0);
    assert_eq!(retries(&e, "server_error"), 1.0);
    assert_eq!(calls(&e, "ControllerPublishVolume", "OK"), 2.0);
    assert_eq!(calls(&e, "DeleteVolume", "InvalidArgument"), 1.0);
    assert_eq!(
        e.value("r3map_controller_volume_list_errors_total", &[]),
        Some(0.0)
    );

    // The other replica does not lead, refuses mutating calls, and sees
    // the same volumes.
    let e = b.metrics().await;
    assert_eq!(e.value("r3map_controller_leader", &[]), Some(0.0));
    // The publish rewrote that volume's status: a PreCopy phase that names
    // no source and target is no migration the controller knows, and the
    // phase it records is how that one ended (controller/src/records.rs).
    assert_eq!((volumes(&e, "None"), volumes(&e, "RolledBack")), (1.0, 1.0));
    let mut cb = b.ctl().await;
    assert_eq!(
        cb.create_volume(create_req("pvc-c"))
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    assert_eq!(
        calls(&b.metrics().await, "CreateVolume", "Unavailable"),
        1.0
    );

    // The leader stops (releasing its Lease): the other one takes over.
    a.proc.stop();
    let t0 = Instant::now();
    b.wait_leader(1.0).await;
    eprintln!("leader gauge moved in {:?}", t0.elapsed());
    cb.create_volume(create_req("pvc-c")).await.unwrap();
    assert_eq!(volumes(&b.metrics().await, "None"), 2.0);
}
