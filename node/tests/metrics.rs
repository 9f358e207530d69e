//! `/metrics` of the real `r3map-csi-node` binary, started with
//! `--metrics-address` beside a real `r3map backend`, driven over its CSI
//! socket as kubelet would (no kernel NBD needed: the calls answer without
//! staging anything). The scrapes are parsed strictly
//! (`csi::metrics::parse`: families, suffixes, cumulative buckets, `# EOF`)
//! and checked against the calls made: counts by method and code,
//! histogram `_count` equal to the counter, counters that grow.
//!
//! Per-volume metrics over a real engine volume: tests/metrics_volume.rs.
//! Needs the r3map binary beside the test (`cargo build --release
//! --workspace`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi::capabilities::block;
use csi::metrics::{parse, scrape, Exposition};
use csi::pb::identity_client::IdentityClient;
use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// A child process, stopped with SIGTERM (then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
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
}

fn r3map_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("r3map");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
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

fn wait_port(p: &mut Proc, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "{what} exited");
        assert!(Instant::now() < deadline, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const KUBELET: &str = "/var/lib/kubelet";
const STAGE: &str = "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pv1";

fn node_cmd(dir: &Path, region_port: u16, metrics: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r3map-csi-node"));
    c.arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args(["--nodeid", "node-1"])
        .args(["--region-service", &format!("127.0.0.1:{region_port}")])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--kubelet-dir", KUBELET])
        .args(["--metrics-address", metrics])
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null());
    c
}

async fn channel(sock: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
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
        .unwrap()
}

async fn metrics(addr: SocketAddr) -> Exposition {
    let s = scrape(addr, "/metrics").await.unwrap();
    assert_eq!(s.status, 200);
    assert_eq!(
        s.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    parse(&s.body).unwrap_or_else(|e| panic!("{e}\n{}", s.body))
}

fn calls(e: &Exposition, method: &str, code: &str) -> f64 {
    let l = [("method", method), ("code", code)];
    e.value("r3map_csi_calls_total", &l).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_plugin_serves_csi_call_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let region_port = free_port();
    let mut backend = Proc(
        Command::new(r3map_bin())
            .args(["backend", "--listen", &format!("127.0.0.1:{region_port}")])
            .args(["--store", "memory:"])
            .env("R3MAP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(&mut backend, region_port, "r3map backend");
    let mport = free_port();
    let maddr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let mut node = Proc(
        node_cmd(dir.path(), region_port, &maddr.to_string())
            .spawn()
            .unwrap(),
    );
    wait_port(&mut node, mport, "node plugin metrics");
    let sock = dir.path().join("csi.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "node plugin did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Before any call: the node's families are declared, nothing is
    // staged; the call families appear with their first sample.
    let e = metrics(maddr).await;
    for (name, kind) in [
        ("r3map_node_staged_volumes", "gauge"),
        ("r3map_node_volume_chunks", "gauge"),
        ("r3map_node_volume_pulled_bytes", "counter"),
        ("r3map_node_nbd_requests", "counter"),
        ("r3map_node_nbd_request_duration_seconds", "histogram"),
    ] {
        let f = e.family(name).unwrap_or_else(|| panic!("no family {name}"));
        assert_eq!(f.kind, kind, "{name}");
        assert!(!f.help.is_empty(), "{name} has no help");
    }
    assert_eq!(e.value("r3map_node_staged_volumes", &[]), Some(0.0));
    assert_eq!(e.samples("r3map_csi_calls_total", &[]).count(), 0);
    assert!(e.family("r3map_csi_call_duration_seconds").is_none());

    // Calls as kubelet makes them, with their real answers.
    let chan = channel(sock).await;
    let mut id = IdentityClient::new(chan.clone());
    let mut n = NodeClient::new(chan);
    for _ in 0..2 {
        id.probe(ProbeRequest {}).await.unwrap();
    }
    n.node_get_info(NodeGetInfoRequest {}).await.unwrap();
    n.node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap();
    let bad = NodeStageVolumeRequest {
        volume_id: "a/b".into(),
        ..Default::default()
    };
    assert_eq!(
        n.node_stage_volume(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A well-formed stage of a region the region service does not have.
    let stage = NodeStageVolumeRequest {
        volume_id: "pv-none".into(),
        staging_target_path: STAGE.into(),
        volume_capability: Some(block(Mode::SingleNodeWriter)),
        volume_context: HashMap::from([("regionId".into(), "pv-none".into())]),
        ..Default::default()
    };
    assert_eq!(
        n.node_stage_volume(stage).await.unwrap_err().code(),
        Code::NotFound
    );
    let stats = NodeGetVolumeStatsRequest {
        volume_id: "pv-none".into(),
        volume_path: STAGE.into(),
        ..Default::default()
    };
    assert_eq!(
        n.node_get_volume_stats(stats).await.unwrap_err().code(),
        Code::NotFound
    );

    let e = metrics(maddr).await;
    assert_eq!(e.family("r3map_csi_calls").unwrap().kind, "counter");
    let h = e.family("r3map_csi_call_duration_seconds").unwrap();
    assert_eq!(
        (h.kind.as_str(), h.unit.as_deref()),
        ("histogram", Some("seconds"))
    );
    let want = [
        ("Probe", "OK", 2.0),
        ("NodeGetInfo", "OK", 1.0),
        ("NodeGetCapabilities", "OK", 1.0),
        ("NodeStageVolume", "InvalidArgument", 1.0),
        ("NodeStageVolume", "NotFound", 1.0),
        ("NodeGetVolumeStats", "NotFound", 1.0),
    ];
    for (m, c, v) in want {
        assert_eq!(calls(&e, m, c), v, "{m} {c}");
        let l = [("method", m), ("code", c)];
        assert_eq!(
            e.value("r3map_csi_call_duration_seconds_count", &l),
            Some(v),
            "histogram _count of {m} {c}"
        );
        // 19 finite buckets and +Inf, each a cumulative count.
        assert_eq!(
            e.samples("r3map_csi_call_duration_seconds_bucket", &l)
                .count(),
            20
        );
    }
    let total: f64 = e
        .samples("r3map_csi_calls_total", &[])
        .map(|s| s.value)
        .sum();
    assert_eq!(total, 7.0, "only the calls made are counted");
    // A region lookup took measurable time; the sum is in seconds.
    let l = [("method", "NodeStageVolume"), ("code", "NotFound")];
    let sum = e.value("r3map_csi_call_duration_seconds_sum", &l).unwrap();
    assert!(sum > 0.0 && sum < 10.0, "{sum}");

    // A counter grows with the next call.
    id.probe(ProbeRequest {}).await.unwrap();
    assert_eq!(calls(&metrics(maddr).await, "Probe", "OK"), 3.0);

    // The other paths.
    let h = scrape(maddr, "/healthz").await.unwrap();
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(scrape(maddr, "/nope").await.unwrap().status, 404);

    // A metrics address that cannot be bound stops the plugin at start,
    // saying which flag.
    let dir2 = tempfile::tempdir().unwrap();
    let out = node_cmd(dir2.path(), region_port, &maddr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("metrics address {maddr}")), "{err}");
}
