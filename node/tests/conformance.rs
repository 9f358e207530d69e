//! Conformance-style tests of the node plugin that need no kernel NBD
//! client: a real `r3map backend --store memory:` and the real
//! `r3map-csi-node` binary on a unix socket, called through the generated
//! tonic clients as kubelet would. They check argument validation codes of
//! every call, NOT_FOUND for unknown volumes, idempotent unpublish and
//! unstage, ABORTED for a concurrent call, and that a stage on a kernel
//! without nbd.ko fails cleanly (FAILED_PRECONDITION naming nbd) *after*
//! the region lookup and *without* fencing the region. The attach path
//! itself runs in the qemu guest (tests/guest_csi.rs).
//!
//! Needs the r3map binary built beside the test (`cargo build --release
//! --workspace`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi::capabilities::block;
use csi::pb::identity_client::IdentityClient;
use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::pb::*;
use r3map::remote::client::{Client as RegionClient, ConnectOptions};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
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

const KUBELET: &str = "/var/lib/kubelet";
const STAGE: &str = "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pv1";
const TARGET: &str = "/var/lib/kubelet/pods/p1/volumeDevices/kubernetes.io~csi/pv1";

struct Env {
    dir: tempfile::TempDir,
    port: u16,
    _backend: Proc,
    _node: Proc,
}

impl Env {
    fn start(hold_ms: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let backend = Command::new(r3map_bin())
            .args(["backend", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--store", "memory:", "--chunk-size", "64KiB"])
            .env("R3MAP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn r3map backend");
        let backend = Proc(backend);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "r3map backend did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let sock = dir.path().join("csi.sock");
        let node = Command::new(env!("CARGO_BIN_EXE_r3map-csi-node"))
            .arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .args(["--nodeid", "node-1", "--drivername", "test.r3map.io"])
            .args(["--region-service", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--kubelet-dir", KUBELET])
            .args(["--test-hold-ms", &hold_ms.to_string()])
            .env("R3MAP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn r3map-csi-node");
        let mut node = Proc(node);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(node.0.try_wait().unwrap().is_none(), "node plugin exited");
            assert!(Instant::now() < deadline, "node plugin did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Env {
            dir,
            port,
            _backend: backend,
            _node: node,
        }
    }

    async fn chan(&self) -> Channel {
        let sock = self.dir.path().join("csi.sock");
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

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.chan().await)
    }

    async fn regions(&self) -> RegionClient {
        RegionClient::connect(&ConnectOptions::plain(format!("127.0.0.1:{}", self.port)))
            .await
            .unwrap()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("call should have failed");
    (s.code(), s.message().to_string())
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn stage_req(id: &str, path: &str) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
        volume_capability: Some(block(Mode::SingleNodeWriter)),
        volume_context: HashMap::from([
            ("regionId".into(), id.into()),
            ("chunkSize".into(), "65536".into()),
        ]),
        ..Default::default()
    }
}

fn publish_req(id: &str, target: &str) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: STAGE.into(),
        target_path: target.into(),
        volume_capability: Some(block(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

/// The bad paths every call with a path must refuse.
const BAD_PATHS: &[&str] = &[
    "",
    "relative/path",
    "/etc/passwd",
    "/var/lib/kubelet/../../etc/passwd",
    "/var/lib/kubelet/./x",
    "/var/lib/kubeletX/y",
    "/var/lib/kubelet",
];
const BAD_IDS: &[&str] = &["", "a/b", "../x", ".hidden", "a b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_info() {
    let env = Env::start(0);
    let mut id = IdentityClient::new(env.chan().await);
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "test.r3map.io");
    assert!(!info.vendor_version.is_empty());
    id.get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap();
    // Ready only with nbd.ko: the answer must agree with this kernel.
    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    let has_nbd = Path::new("/sys/module/nbd").exists();
    assert_eq!(ready, Some(has_nbd), "probe vs /sys/module/nbd");

    let mut n = env.node().await;
    let ni = n
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "node-1");
    let caps = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities, csi::capabilities::node());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_validation() {
    let env = Env::start(0);
    let mut n = env.node().await;
    for bad in BAD_IDS {
        let (c, m) = code(n.node_stage_volume(stage_req(bad, STAGE)).await);
        assert_eq!(c, Code::InvalidArgument, "{bad:?}: {m}");
    }
    for bad in BAD_PATHS {
        let (c, m) = code(n.node_stage_volume(stage_req("pv1", bad)).await);
        assert_eq!(c, Code::InvalidArgument, "{bad:?}: {m}");
        assert!(m.contains("staging_target_path"), "{m}");
    }
    let mut r = stage_req("pv1", STAGE);
    r.volume_capability = None;
    assert_eq!(code(n.node_stage_volume(r).await).0, Code::InvalidArgument);
    let mut r = stage_req("pv1", STAGE);
    r.volume_capability = Some(mount_cap());
    let (c, m) = code(n.node_stage_volume(r).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("mount"), "{m}");
    let mut r = stage_req("pv1", STAGE);
    r.volume_capability = Some(block(Mode::MultiNodeReaderOnly));
    assert_eq!(code(n.node_stage_volume(r).await).0, Code::InvalidArgument);
    let mut r = stage_req("pv1", STAGE);
    r.volume_context.insert("chunkSize".into(), "3000".into());
    assert_eq!(code(n.node_stage_volume(r).await).0, Code::InvalidArgument);
    let mut r = stage_req("pv1", STAGE);
    r.volume_context.insert("regionId".into(), "a/b".into());
    assert_eq!(code(n.node_stage_volume(r).await).0, Code::InvalidArgument);
    let mut r = stage_req("pv1", STAGE);
    r.secrets.insert("password".into(), "hunter2-SECRET".into());
    let (c, m) = code(n.node_stage_volume(r).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(!m.contains("hunter2"), "{m}");

    // A well-formed stage of a volume whose region does not exist.
    let (c, m) = code(n.node_stage_volume(stage_req("pv-none", STAGE)).await);
    assert_eq!(c, Code::NotFound, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_without_nbd_fails_cleanly_and_does_not_fence() {
    assert!(
        !Path::new("/sys/module/nbd").exists(),
        "this test checks the refusal on a kernel without nbd.ko; this host has it loaded \
         (the attach path is tested in the guest: tests/guest_csi.rs)"
    );
    let env = Env::start(0);
    let rc = env.regions().await;
    rc.create_region(Some("pv1"), 4 << 20).await.unwrap();
    let before = rc.get_region("pv1").await.unwrap();
    let mut n = env.node().await;
    let (c, m) = code(n.node_stage_volume(stage_req("pv1", STAGE)).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("nbd"), "{m}");
    let after = rc.get_region("pv1").await.unwrap();
    assert_eq!(
        (after.epoch, after.owner.as_str()),
        (before.epoch, before.owner.as_str()),
        "a node that cannot attach fenced the region"
    );
    // Nothing recorded: the volume is not staged.
    let records: Vec<_> = std::fs::read_dir(env.dir.path().join("state/volumes"))
        .unwrap()
        .collect();
    assert!(records.is_empty(), "{records:?}");
    let (c, _) = code(
        n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pv1".into(),
            volume_path: STAGE.into(),
            staging_target_path: String::new(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_validation() {
    let env = Env::start(0);
    env.regions()
        .await
        .create_region(Some("pv1"), 4 << 20)
        .await
        .unwrap();
    let mut n = env.node().await;
    for bad in BAD_IDS {
        let (c, m) = code(n.node_publish_volume(publish_req(bad, TARGET)).await);
        assert_eq!(c, Code::InvalidArgument, "{bad:?}: {m}");
    }
    for bad in BAD_PATHS {
        let (c, m) = code(n.node_publish_volume(publish_req("pv1", bad)).await);
        assert_eq!(c, Code::InvalidArgument, "{bad:?}: {m}");
        assert!(m.contains("target_path"), "{m}");
        let mut r = publish_req("pv1", TARGET);
        r.staging_target_path = bad.to_string();
        let (c, m) = code(n.node_publish_volume(r).await);
        assert_eq!(c, Code::InvalidArgument, "{bad:?}: {m}");
    }
    let mut r = publish_req("pv1", TARGET);
    r.volume_capability = None;
    assert_eq!(
        code(n.node_publish_volume(r).await).0,
        Code::InvalidArgument
    );
    let mut r = publish_req("pv1", TARGET);
    r.volume_capability = Some(mount_cap());
    assert_eq!(
        code(n.node_publish_volume(r).await).0,
        Code::InvalidArgument
    );
    // Well formed, but the volume is not staged here.
    let (c, m) = code(n.node_publish_volume(publish_req("pv1", TARGET)).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(
        !Path::new(TARGET).exists(),
        "a refused publish created the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_unstage_stats_expand() {
    let env = Env::start(0);
    env.regions()
        .await
        .create_region(Some("pv1"), 4 << 20)
        .await
        .unwrap();
    let mut n = env.node().await;
    for bad in BAD_IDS {
        let r = NodeUnpublishVolumeRequest {
            volume_id: bad.to_string(),
            target_path: TARGET.into(),
        };
        assert_eq!(
            code(n.node_unpublish_volume(r).await).0,
            Code::InvalidArgument
        );
        let r = NodeUnstageVolumeRequest {
            volume_id: bad.to_string(),
            staging_target_path: STAGE.into(),
        };
        assert_eq!(
            code(n.node_unstage_volume(r).await).0,
            Code::InvalidArgument
        );
    }
    for bad in BAD_PATHS {
        let r = NodeUnpublishVolumeRequest {
            volume_id: "pv1".into(),
            target_path: bad.to_string(),
        };
        assert_eq!(
            code(n.node_unpublish_volume(r).await).0,
            Code::InvalidArgument,
            "{bad:?}"
        );
        let r = NodeUnstageVolumeRequest {
            volume_id: "pv1".into(),
            staging_target_path: bad.to_string(),
        };
        assert_eq!(
            code(n.node_unstage_volume(r).await).0,
            Code::InvalidArgument,
            "{bad:?}"
        );
    }
    // Idempotent: a volume that exists but is not staged here, twice each.
    for _ in 0..2 {
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pv1".into(),
            target_path: TARGET.into(),
        })
        .await
        .unwrap();
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pv1".into(),
            staging_target_path: STAGE.into(),
        })
        .await
        .unwrap();
    }
    // A volume that does not exist at all.
    let (c, _) = code(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pv-none".into(),
            target_path: TARGET.into(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    let (c, _) = code(
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pv-none".into(),
            staging_target_path: STAGE.into(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);

    // Stats and expand: arguments, then NOT_FOUND for a volume not staged.
    for (id, path, want) in [
        ("", STAGE, Code::InvalidArgument),
        ("a/b", STAGE, Code::InvalidArgument),
        ("pv1", "", Code::InvalidArgument),
        ("pv1", STAGE, Code::NotFound),
    ] {
        let r = NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            staging_target_path: String::new(),
        };
        assert_eq!(
            code(n.node_get_volume_stats(r).await).0,
            want,
            "stats {id:?} {path:?}"
        );
        let r = NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        assert_eq!(
            code(n.node_expand_volume(r).await).0,
            want,
            "expand {id:?} {path:?}"
        );
    }
    let r = NodeExpandVolumeRequest {
        volume_id: "pv1".into(),
        volume_path: STAGE.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    assert_eq!(code(n.node_expand_volume(r).await).0, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_call_on_one_volume_is_aborted() {
    let env = Env::start(1500);
    env.regions()
        .await
        .create_region(Some("pv1"), 4 << 20)
        .await
        .unwrap();
    let (mut a, mut b) = (env.node().await, env.node().await);
    let req = || NodeUnstageVolumeRequest {
        volume_id: "pv1".into(),
        staging_target_path: STAGE.into(),
    };
    let first = tokio::spawn(async move { a.node_unstage_volume(req()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, m) = code(
        b.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pv1".into(),
            target_path: TARGET.into(),
        })
        .await,
    );
    assert_eq!(c, Code::Aborted, "{m}");
    first.await.unwrap().unwrap();
    // Another volume is not blocked, and the guard is free again.
    b.node_unstage_volume(req()).await.unwrap();
}
