//! Conformance-style tests of the controller plugin, driven as a CO would:
//! a real `r3map backend --store memory:` and the real
//! `r3map-csi-controller` binary on a unix socket, called through the
//! generated tonic clients. Needs the r3map binary built beside the test
//! (`cargo build --release -p r3map`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi::capabilities::block;
use csi::pb::controller_client::ControllerClient;
use csi::pb::identity_client::IdentityClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use r3map::remote::client::{Client as RegionClient, ConnectOptions};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const MIB: i64 = 1 << 20;

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Proc(Child);

impl Proc {
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

/// The r3map binary: built by `cargo build --release -p r3map` into the
/// same target directory as this test.
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

fn start_backend(port: u16, extra: &[String]) -> Proc {
    let child = Command::new(r3map_bin())
        .args(["backend", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--store", "memory:", "--chunk-size", "64KiB"])
        .args(extra)
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn r3map backend");
    let mut p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "r3map backend exited");
        assert!(Instant::now() < deadline, "r3map backend did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// A backend, a controller, and clients of both.
struct Env {
    dir: tempfile::TempDir,
    port: u16,
    _backend: Option<Proc>,
    controller: Proc,
    hold_ms: u64,
}

impl Env {
    async fn start() -> Env {
        Env::start_with(0).await
    }

    async fn start_with(hold_ms: u64) -> Env {
        Env::start_full(hold_ms, |_| Vec::new()).await
    }

    /// `backend_args` gets the test directory and returns extra
    /// arguments of `r3map backend`.
    async fn start_full(hold_ms: u64, backend_args: impl Fn(&Path) -> Vec<String>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let backend = start_backend(port, &backend_args(dir.path()));
        let controller = start_controller(dir.path(), port, hold_ms).await;
        Env {
            dir,
            port,
            _backend: Some(backend),
            controller,
            hold_ms,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    async fn restart_controller(&mut self) {
        self.controller.stop();
        self.controller = start_controller(self.dir.path(), self.port, self.hold_ms).await;
    }

    async fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(channel(&self.sock()).await)
    }

    async fn ident(&self) -> IdentityClient<Channel> {
        IdentityClient::new(channel(&self.sock()).await)
    }

    async fn regions(&self) -> RegionClient {
        RegionClient::connect(&ConnectOptions::plain(format!("127.0.0.1:{}", self.port)))
            .await
            .unwrap()
    }
}

async fn start_controller(dir: &Path, port: u16, hold_ms: u64) -> Proc {
    let sock = dir.join("csi.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_r3map-csi-controller"))
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(["--drivername", "test.r3map.io"])
        .args(["--region-service", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--max-volume-size", "1GiB"])
        .args(["--test-hold-ms", &hold_ms.to_string()])
        .env("R3MAP_LOG", "warn")
        .spawn()
        .expect("spawn controller");
    let mut p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "controller exited");
        assert!(Instant::now() < deadline, "controller did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

async fn channel(sock: &Path) -> Channel {
    let sock = sock.to_path_buf();
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

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.expect_err("call should have failed").code()
}

fn create_req(name: &str, required: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block(Mode::SingleNodeWriter)],
        parameters: HashMap::from([("chunkSize".into(), "64KiB".into())]),
        ..Default::default()
    }
}

async fn create(c: &mut ControllerClient<Channel>, name: &str, required: i64) -> Volume {
    c.create_volume(create_req(name, required))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

fn publish_req(id: &str, node: &str, mode: Mode) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(block(mode)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_probe() {
    let mut env = Env::start().await;
    let mut i = env.ident().await;
    let info = i.get_plugin_info(GetPluginInfoRequest {}).await.unwrap();
    assert_eq!(info.get_ref().name, "test.r3map.io");
    assert_eq!(info.get_ref().vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = i
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap();
    assert_eq!(caps.get_ref().capabilities, csi::capabilities::plugin());
    let p = i.probe(ProbeRequest {}).await.unwrap();
    assert_eq!(p.get_ref().ready, Some(true));
    // Region service down: not ready, and not an error.
    env._backend = None;
    env.restart_controller().await;
    let mut i = env.ident().await;
    let p = i.probe(ProbeRequest {}).await.unwrap();
    assert_eq!(p.get_ref().ready, Some(false));
    // Calls that need the region service are UNAVAILABLE.
    let mut c = env.ctl().await;
    assert_eq!(
        code(c.create_volume(create_req("down", MIB)).await),
        Code::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_delete() {
    let env = Env::start().await;
    let mut c = env.ctl().await;

    // Malformed and missing arguments.
    let mut r = create_req("", MIB);
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    r.name = "v1".into();
    r.volume_capabilities.clear();
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    r.volume_capabilities = vec![VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }];
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    let mut r = create_req("v1", MIB);
    r.parameters.insert("pushInterval".into(), "never".into());
    let e = c.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("pushInterval") && e.message().contains("never"));
    let mut r = create_req("v1", MIB);
    r.capacity_range = Some(CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    r.capacity_range = Some(CapacityRange {
        required_bytes: 2 * MIB,
        limit_bytes: MIB,
    });
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_volume(create_req("huge", 2 << 30)).await),
        Code::OutOfRange
    );

    // Created, rounded up to the chunk size, and the same on repeat.
    let v = create(&mut c, "v1", 1_000_000).await;
    assert_eq!(v.capacity_bytes, 16 * 65536);
    assert_eq!(v.volume_context["regionId"], v.volume_id);
    assert_eq!(v.volume_context["chunkSize"], "65536");
    assert_eq!(v.volume_context["durability"], "flush");
    let again = create(&mut c, "v1", 1_000_000).await;
    assert_eq!(again, v);
    let reg = env.regions().await.get_region(&v.volume_id).await.unwrap();
    assert_eq!(reg.size, 16 * 65536);

    // Incompatible re-creates.
    assert_eq!(
        code(c.create_volume(create_req("v1", 4 * MIB)).await),
        Code::AlreadyExists
    );
    let mut r = create_req("v1", MIB);
    r.parameters.insert("durability".into(), "async".into());
    assert_eq!(code(c.create_volume(r).await), Code::AlreadyExists);

    // Delete: missing id, unknown id, then twice.
    let del = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_eq!(code(c.delete_volume(del("")).await), Code::InvalidArgument);
    assert_eq!(
        code(c.delete_volume(del("a/b")).await),
        Code::InvalidArgument
    );
    c.delete_volume(del("csi-never-made-0")).await.unwrap();
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    let gone = env.regions().await.get_region(&v.volume_id).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    // Secrets with an unknown key are refused, naming the key only.
    let mut d = del(&v.volume_id);
    d.secrets.insert("password".into(), "hunter2-xyz".into());
    let e = c.delete_volume(d).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(!e.message().contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_unpublish() {
    let env = Env::start().await;
    let mut c = env.ctl().await;
    let v = create(&mut c, "pub", MIB).await;
    let id = v.volume_id.as_str();

    assert_eq!(
        code(
            c.controller_publish_volume(publish_req("csi-nope-1", "n1", Mode::SingleNodeWriter))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(id, "", Mode::SingleNodeWriter))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(id, "bad node", Mode::SingleNodeWriter))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_cap = publish_req(id, "n1", Mode::SingleNodeWriter);
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(no_cap).await),
        Code::InvalidArgument
    );

    // Published to n1, twice; refused on n2 for a single-node mode.
    for _ in 0..2 {
        let r = c
            .controller_publish_volume(publish_req(id, "n1", Mode::SingleNodeWriter))
            .await
            .unwrap();
        assert_eq!(r.get_ref().publish_context["regionId"], id);
    }
    let mut ro = publish_req(id, "n1", Mode::SingleNodeWriter);
    ro.readonly = true;
    assert_eq!(
        code(c.controller_publish_volume(ro).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(id, "n2", Mode::SingleNodeWriter))
                .await
        ),
        Code::FailedPrecondition
    );
    let del = DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.delete_volume(del.clone()).await),
        Code::FailedPrecondition
    );
    let g = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let st = g.status.unwrap();
    assert_eq!(st.published_node_ids, vec!["n1".to_string()]);
    assert!(!st.volume_condition.unwrap().abnormal);

    // Multi-writer: a second node is a live migration, which needs the
    // nodes' migration endpoints; this controller has none.
    let e = c
        .controller_publish_volume(publish_req(id, "n2", Mode::MultiNodeMultiWriter))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("migration endpoint"), "{e:?}");
    let l = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        l.entries[0].status.as_ref().unwrap().published_node_ids,
        vec!["n1".to_string()]
    );

    // Unpublish, each twice; unknown volume is NOT_FOUND.
    let unpub = |node: &str| ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        c.controller_unpublish_volume(unpub("n1")).await.unwrap();
    }
    c.controller_unpublish_volume(unpub("")).await.unwrap();
    let mut bad = unpub("n1");
    bad.volume_id = "csi-nope-1".into();
    assert_eq!(
        code(c.controller_unpublish_volume(bad).await),
        Code::NotFound
    );
    bad = unpub("n1");
    bad.volume_id.clear();
    assert_eq!(
        code(c.controller_unpublish_volume(bad).await),
        Code::InvalidArgument
    );
    c.delete_volume(del).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_list_expand_capacity() {
    let env = Env::start().await;
    let mut c = env.ctl().await;
    let v = create(&mut c, "val", MIB).await;
    let id = v.volume_id.clone();

    // ValidateVolumeCapabilities.
    let vreq = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(vreq(&id, vec![block(Mode::SingleNodeWriter)]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = c
        .validate_volume_capabilities(vreq(&id, vec![block(Mode::MultiNodeReaderOnly)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(
        no.message.contains("MULTI_NODE_READER_ONLY"),
        "{}",
        no.message
    );
    let mount = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    let no = c
        .validate_volume_capabilities(vreq(&id, vec![mount]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(no.message.contains("mount"), "{}", no.message);
    assert_eq!(
        code(c.validate_volume_capabilities(vreq(&id, vec![])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(vreq("csi-nope-1", vec![block(Mode::SingleNodeWriter)]))
                .await
        ),
        Code::NotFound
    );

    // ListVolumes pages.
    for i in 0..4 {
        create(&mut c, &format!("page-{i}"), MIB).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 5);
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 5);
    // A page starts at its token's volume even when the volume before it
    // was deleted meanwhile.
    let first = c
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let last_of_page = first.entries[1].volume.as_ref().unwrap().volume_id.clone();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: last_of_page.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let second = c
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: first.next_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        second.entries[0].volume.as_ref().unwrap().volume_id,
        first.next_token
    );
    assert!(!second
        .entries
        .iter()
        .any(|e| e.volume.as_ref().unwrap().volume_id == last_of_page));
    for bad in ["zzz", "99", "csi-a/b"] {
        let r = ListVolumesRequest {
            max_entries: 1,
            starting_token: bad.into(),
        };
        assert_eq!(code(c.list_volumes(r).await), Code::Aborted);
    }
    let r = ListVolumesRequest {
        max_entries: -1,
        starting_token: String::new(),
    };
    assert_eq!(code(c.list_volumes(r).await), Code::InvalidArgument);

    // ControllerExpandVolume.
    let ereq = |id: &str, bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    for _ in 0..2 {
        let e = c
            .controller_expand_volume(ereq(&id, 3 * MIB + 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(e.capacity_bytes, 3 * MIB + 65536);
        assert!(e.node_expansion_required);
    }
    let reg = env.regions().await.get_region(&id).await.unwrap();
    assert_eq!(reg.size as i64, 3 * MIB + 65536);
    let mut none = ereq(&id, 0);
    none.capacity_range = None;
    assert_eq!(
        code(c.controller_expand_volume(none).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller_expand_volume(ereq("csi-nope-1", MIB)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.controller_expand_volume(ereq(&id, 2 << 30)).await),
        Code::OutOfRange
    );

    // GetCapacity and capabilities.
    let cap = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.maximum_volume_size, Some(1 << 30));
    let bad = GetCapacityRequest {
        parameters: HashMap::from([("nope".into(), "1".into())]),
        ..Default::default()
    };
    assert_eq!(code(c.get_capacity(bad).await), Code::InvalidArgument);
    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities, csi::capabilities::controller());

    // Snapshots and modification are not offered, and say so.
    assert_eq!(
        code(c.create_snapshot(CreateSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_modify_volume(ControllerModifyVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.get_snapshot(GetSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_list_volume_health(ControllerListVolumeHealthRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_get_volume_health(ControllerGetVolumeHealthRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    use controller_service_capability::rpc::Type as CtrlRpc;
    for t in [
        CtrlRpc::GetSnapshot,
        CtrlRpc::ListVolumeHealth,
        CtrlRpc::GetVolumeHealth,
    ] {
        assert!(!csi::capabilities::CONTROLLER.contains(&t), "{t:?}");
    }

    // A region removed behind the controller's back is reported abnormal.
    env.regions().await.delete_region(&id).await.unwrap();
    let g = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(g.status.unwrap().volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "csi-nope-1".into()
            })
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_call_on_one_volume_is_aborted() {
    // Each mutating call holds its volume's guard for 1.5 s.
    let env = Env::start_with(1500).await;
    let mut a = env.ctl().await;
    let mut b = env.ctl().await;
    let first = tokio::spawn(async move { a.create_volume(create_req("busy", MIB)).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = b.create_volume(create_req("busy", MIB)).await;
    assert_eq!(code(second), Code::Aborted);
    // Another volume is not blocked by it.
    let other = tokio::spawn({
        let mut c = env.ctl().await;
        async move { c.create_volume(create_req("other", MIB)).await }
    });
    let v = first.await.unwrap().unwrap().into_inner().volume.unwrap();
    other.await.unwrap().unwrap();
    // Once done, the same call succeeds (idempotent).
    let again = b.create_volume(create_req("busy", MIB)).await.unwrap();
    assert_eq!(again.into_inner().volume.unwrap(), v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart() {
    let mut env = Env::start().await;
    let mut c = env.ctl().await;
    let v = create(&mut c, "durable", 2 * MIB).await;
    c.controller_publish_volume(publish_req(&v.volume_id, "n1", Mode::SingleNodeWriter))
        .await
        .unwrap();
    env.restart_controller().await;
    let mut c = env.ctl().await;
    let g = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.volume.unwrap(), v);
    assert_eq!(g.status.unwrap().published_node_ids, vec!["n1".to_string()]);
    assert_eq!(create(&mut c, "durable", 2 * MIB).await, v);
    assert_eq!(
        code(
            c.controller_publish_volume(publish_req(&v.volume_id, "n2", Mode::SingleNodeWriter))
                .await
        ),
        Code::FailedPrecondition
    );
    let state =
        std::fs::read_to_string(env.dir.path().join("state/controller-state.json")).unwrap();
    assert!(state.contains("\"durable\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_secrets() {
    const TOKEN: &str = "csi-test-token-0123456789abcdef";
    // The region service wants a token; the controller has none on its
    // command line, so only the provisioner secrets can carry it.
    let env = Env::start_full(0, |dir| {
        let f = dir.join("token");
        std::fs::write(&f, TOKEN).unwrap();
        vec!["--token-file".into(), f.display().to_string()]
    })
    .await;
    let mut c = env.ctl().await;
    let e = c.create_volume(create_req("tok", MIB)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().contains("credentials refused"),
        "{}",
        e.message()
    );
    let mut r = create_req("tok", MIB);
    r.secrets
        .insert("token".into(), "wrong-token-0123456789abcdef".into());
    assert_eq!(code(c.create_volume(r).await), Code::Unavailable);
    let mut r = create_req("tok", MIB);
    r.secrets.insert("token".into(), TOKEN.into());
    let v = c
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // Secrets never reach the volume context.
    assert!(!v.volume_context.values().any(|x| x.contains(TOKEN)));
    let state =
        std::fs::read_to_string(env.dir.path().join("state/controller-state.json")).unwrap();
    assert!(!state.contains(TOKEN));
    let mut d = DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    d.secrets.insert("token".into(), TOKEN.into());
    c.delete_volume(d).await.unwrap();
    // Probe uses the command line's credentials: not ready, not an error.
    let p = env.ident().await.probe(ProbeRequest {}).await.unwrap();
    assert_eq!(p.get_ref().ready, Some(false));
}
