//! `r3map-csi-demo`: the embedded default. With no cluster, it starts the
//! region service, the controller and two node plugins ("node-a" and
//! "node-b") as processes on this machine, and walks through what a
//! cluster does with a block volume: provision it, attach it on node-a,
//! an application mmaps it and writes, migrate it live to node-b (the
//! attach/detach calls kubelet and the external-attacher make, in their
//! order), verify every byte on node-b, and print the timings. The calls
//! are the real CSI calls over the plugins' sockets; the only thing
//! missing is Kubernetes deciding when to make them.
//!
//! It needs the kernel's NBD client (nbd.ko) and root; without them the
//! binary boots the project's qemu guest and runs this inside it.

pub mod app;
pub mod procs;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi::migration::PeerAuth;
use csi::pb::controller_client::ControllerClient;
use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume};
use csi::pb::*;
use tonic::transport::Channel;

use procs::{free_port, listening, Proc};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the walkthrough does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where r3map, r3map-csi-controller, r3map-csi-node and
    /// r3map-csi-demo are.
    pub bin_dir: PathBuf,
    /// Scratch directory (state, store, logs); emptied first.
    pub work: PathBuf,
    /// The kubelet directory the plugins accept paths under.
    pub kubelet_dir: PathBuf,
    /// Volume size in bytes.
    pub size: u64,
    /// Chunk size, e.g. `256KiB`.
    pub chunk: String,
    /// Pattern seed.
    pub seed: u64,
    /// Also roll a migration back, and hand the volume back to node-a
    /// the way an RWO pod move does (the CI run does both).
    pub all: bool,
    /// Progress as lines, not a redrawn bar (logs, serial consoles).
    pub plain: bool,
}

/// The timings and checks of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// NodeStageVolume on node-a.
    pub stage: Duration,
    /// ControllerPublish(node-b) to every chunk on node-b.
    pub precopy: Duration,
    /// ControllerUnpublish(node-a): finalize.
    pub finalize: Duration,
    /// Application stopped on node-a to its first read on node-b.
    pub downtime: Duration,
    /// Finalize to the migration recorded complete.
    pub postcopy: Duration,
    /// Bytes checked on node-b.
    pub verified: u64,
    /// A migration rolled back and the source kept serving.
    pub rolled_back: bool,
    /// Bytes checked on node-a after handing the volume back.
    pub handed_back: u64,
}

fn say(s: impl AsRef<str>) {
    println!("{}", s.as_ref());
    let _ = std::io::stdout().flush();
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

/// One node plugin and what its calls need.
struct NodeCtl {
    id: String,
    client: NodeClient<Channel>,
    migration: String,
    staging: String,
    target: String,
}

impl NodeCtl {
    async fn stage(&mut self, vol: &Volume, pc: &HashMap<String, String>) -> Result<(), Error> {
        self.client
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                publish_context: pc.clone(),
                staging_target_path: self.staging.clone(),
                volume_capability: Some(block_cap()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("NodeStageVolume on {}: {s}", self.id))?;
        Ok(())
    }

    async fn publish(&mut self, vol: &Volume) -> Result<(), Error> {
        self.client
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: self.staging.clone(),
                target_path: self.target.clone(),
                volume_capability: Some(block_cap()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("NodePublishVolume on {}: {s}", self.id))?;
        Ok(())
    }

    /// NodeUnpublish then NodeUnstage, as kubelet does when a pod goes.
    async fn detach(&mut self, id: &str) -> Result<(), Error> {
        self.client
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: self.target.clone(),
            })
            .await
            .map_err(|s| format!("NodeUnpublishVolume on {}: {s}", self.id))?;
        self.client
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: self.staging.clone(),
            })
            .await
            .map_err(|s| format!("NodeUnstageVolume on {}: {s}", self.id))?;
        Ok(())
    }
}

struct Cluster {
    procs: Vec<Proc>,
    ctl: ControllerClient<Channel>,
    a: NodeCtl,
    b: NodeCtl,
    peers: PeerAuth,
    bin_dir: PathBuf,
    work: PathBuf,
}

impl Cluster {
    fn check(&mut self) -> Result<(), Error> {
        for p in &mut self.procs {
            p.check()?;
        }
        Ok(())
    }

    async fn publish(&mut self, vol: &str, node: &str) -> Result<HashMap<String, String>, Error> {
        let r = self
            .ctl
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: vol.into(),
                node_id: node.into(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("ControllerPublishVolume to {node}: {s}"))?;
        Ok(r.into_inner().publish_context)
    }

    async fn unpublish(&mut self, vol: &str, node: &str) -> Result<(), Error> {
        self.ctl
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: node.into(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("ControllerUnpublishVolume from {node}: {s}"))?;
        Ok(())
    }

    async fn status(
        &self,
        node: &NodeCtl,
        vol: &str,
    ) -> Result<csi::nodepb::MigrationStatus, Error> {
        let mut c = self.peers.node_client(&node.migration).await?;
        Ok(c.status(csi::nodepb::VolumeRequest {
            volume_id: vol.into(),
        })
        .await?
        .into_inner())
    }

    async fn condition(&mut self, vol: &str) -> Result<String, Error> {
        let r = self
            .ctl
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: vol.into(),
            })
            .await?
            .into_inner();
        Ok(r.status
            .and_then(|s| s.volume_condition)
            .map(|c| c.message)
            .unwrap_or_default())
    }

    fn app(&self, name: &str, args: &[String]) -> Result<Proc, Error> {
        Proc::start(
            name,
            &self.bin_dir.join("r3map-csi-demo"),
            args,
            &self.work.join("logs"),
        )
    }
}

fn draw(label: &str, present: u64, total: u64, tty: bool, last: &mut u64) {
    let pct = (present * 100).checked_div(total).unwrap_or(0);
    if tty {
        let n = (pct / 4) as usize;
        print!(
            "\r   {label} [{}{}] {pct:3}% {present}/{total} chunks",
            "#".repeat(n),
            "-".repeat(25 - n)
        );
        let _ = std::io::stdout().flush();
    } else if pct >= *last + 20 || (pct == 100 && *last != 100) {
        // A log, not a terminal: one line per fifth.
        say(format!("   {label} {pct:3}% {present}/{total} chunks"));
        *last = pct;
    }
}

/// Starts the components and connects to them.
async fn start(o: &Options) -> Result<Cluster, Error> {
    let _ = std::fs::remove_dir_all(&o.work);
    std::fs::create_dir_all(&o.work)?;
    let logs = o.work.join("logs");
    let token = o.work.join("token");
    {
        let mut b = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        std::fs::write(&token, hex)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    }
    let tok = token.display().to_string();
    let bin = |n: &str| o.bin_dir.join(n);
    for n in [
        "r3map",
        "r3map-csi-controller",
        "r3map-csi-node",
        "r3map-csi-demo",
    ] {
        if !bin(n).exists() {
            return Err(format!(
                "{} is missing: run `cargo build --release --workspace` first",
                bin(n).display()
            )
            .into());
        }
    }
    let (rp, pa, pb) = (free_port()?, free_port()?, free_port()?);
    let region = format!("127.0.0.1:{rp}");
    let mut procs = Vec::new();
    let mut rs = Proc::start(
        "region-service",
        &bin("r3map"),
        &[
            "backend".into(),
            "--listen".into(),
            region.clone(),
            "--store".into(),
            format!("dir:{}", o.work.join("store").display()),
            "--token-file".into(),
            tok.clone(),
        ],
        &logs,
    )?;
    rs.wait_for("listening port", Duration::from_secs(60), || listening(rp))?;
    procs.push(rs);
    let ctl_sock = o.work.join("controller.sock");
    let ctl_ep = format!("unix://{}", ctl_sock.display());
    let mut ctl = Proc::start(
        "controller",
        &bin("r3map-csi-controller"),
        &[
            "--endpoint".into(),
            ctl_ep.clone(),
            "--region-service".into(),
            region.clone(),
            "--token-file".into(),
            tok.clone(),
            "--state-dir".into(),
            o.work.join("controller").display().to_string(),
            "--node-endpoint".into(),
            format!("node-a=127.0.0.1:{pa}"),
            "--node-endpoint".into(),
            format!("node-b=127.0.0.1:{pb}"),
            "--migration-token-file".into(),
            tok.clone(),
            "--reconcile-interval".into(),
            "300ms".into(),
        ],
        &logs,
    )?;
    ctl.wait_for("CSI socket", Duration::from_secs(60), || ctl_sock.exists())?;
    procs.push(ctl);
    let mut nodes = Vec::new();
    for (name, port) in [("node-a", pa), ("node-b", pb)] {
        let sock = o.work.join(format!("{name}.sock"));
        let mut p = Proc::start(
            name,
            &bin("r3map-csi-node"),
            &[
                "--endpoint".into(),
                format!("unix://{}", sock.display()),
                "--nodeid".into(),
                name.into(),
                "--state-dir".into(),
                o.work.join(name).display().to_string(),
                "--kubelet-dir".into(),
                o.kubelet_dir.display().to_string(),
                "--region-service".into(),
                region.clone(),
                "--token-file".into(),
                tok.clone(),
                "--migration-listen".into(),
                format!("127.0.0.1:{port}"),
                "--migration-token-file".into(),
                tok.clone(),
                "--migration-patience".into(),
                "10s".into(),
            ],
            &logs,
        )?;
        p.wait_for("CSI socket", Duration::from_secs(120), || sock.exists())?;
        procs.push(p);
        let k = &o.kubelet_dir;
        nodes.push(NodeCtl {
            id: name.into(),
            client: NodeClient::new(
                csi::endpoint::connect(&format!("unix://{}", sock.display())).await?,
            ),
            migration: format!("127.0.0.1:{port}"),
            staging: k
                .join(format!(
                    "plugins/kubernetes.io/csi/volumeDevices/staging/{name}"
                ))
                .display()
                .to_string(),
            target: k
                .join(format!(
                    "pods/pod-on-{name}/volumeDevices/kubernetes.io~csi/dev"
                ))
                .display()
                .to_string(),
        });
    }
    let b = nodes.pop().expect("two nodes");
    let a = nodes.pop().expect("two nodes");
    Ok(Cluster {
        procs,
        ctl: ControllerClient::new(csi::endpoint::connect(&ctl_ep).await?),
        a,
        b,
        peers: PeerAuth {
            token_file: Some(token),
            ..PeerAuth::default()
        },
        bin_dir: o.bin_dir.clone(),
        work: o.work.clone(),
    })
}

/// Waits for a file the application writes, while it runs.
fn wait_file(p: &mut Proc, f: &Path, within: Duration) -> Result<(), Error> {
    p.wait_for(&format!("{}", f.display()), within, || f.exists())
}

/// Runs the walkthrough; on failure the components' logs are printed.
pub async fn run(o: &Options) -> Result<Summary, Error> {
    let mut c = start(o).await?;
    let r = walk(o, &mut c).await;
    if let Err(e) = &r {
        say(format!("demo: FAILED: {e}"));
        for p in &c.procs {
            say(format!(
                "--- last lines of {} ({})",
                p.name,
                p.log.display()
            ));
            say(p.tail(25));
        }
    }
    r
}

async fn walk(o: &Options, c: &mut Cluster) -> Result<Summary, Error> {
    let tty = !o.plain && nix::unistd::isatty(1).unwrap_or(false);
    let mut s = Summary::default();
    let seed = o.seed.to_string();
    say(format!(
        "1/7 started the region service, the controller and two node plugins (node-a, node-b); logs in {}",
        c.work.join("logs").display()
    ));

    let vol = c
        .ctl
        .create_volume(CreateVolumeRequest {
            name: "demo-volume".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: o.size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_cap()],
            parameters: [
                ("chunkSize".to_string(), o.chunk.clone()),
                ("pullWorkers".to_string(), "4".to_string()),
                ("durability".to_string(), "flush".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("CreateVolume: {e}"))?
        .into_inner()
        .volume
        .ok_or("CreateVolume returned no volume")?;
    let id = vol.volume_id.clone();
    say(format!(
        "2/7 provisioned {id}: {} MiB, block, multi-node-multi-writer, chunks of {}",
        vol.capacity_bytes >> 20,
        o.chunk
    ));

    let pc = c.publish(&id, "node-a").await?;
    let t = Instant::now();
    c.a.stage(&vol, &pc).await?;
    s.stage = t.elapsed();
    c.a.publish(&vol).await?;
    say(format!(
        "3/7 attached on node-a: NodeStageVolume took {} (volume open, kernel NBD device over netlink); published at {}",
        ms(s.stage),
        c.a.target
    ));

    let (ready, gens) = (c.work.join("app-ready"), c.work.join("app-gens"));
    let mut writer = c.app(
        "app-on-node-a",
        &[
            "app-write".into(),
            "--path".into(),
            c.a.target.clone(),
            "--seed".into(),
            seed.clone(),
            "--ready".into(),
            ready.display().to_string(),
            "--gens".into(),
            gens.display().to_string(),
        ],
    )?;
    wait_file(&mut writer, &ready, Duration::from_secs(600))?;
    say(format!(
        "4/7 an application on node-a (pid {}) mmapped the device, wrote all {} pages, msync'd, and keeps rewriting pages",
        writer.pid(),
        o.size / app::PAGE as u64
    ));

    if o.all {
        // Attach to node-b and detach again before finalize: the
        // migration rolls back, node-a serves on.
        let pc = c.publish(&id, "node-b").await?;
        c.b.stage(&vol, &pc).await?;
        c.b.client
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: c.b.staging.clone(),
            })
            .await?;
        c.unpublish(&id, "node-b").await?;
        writer.check()?;
        let cond = c.condition(&id).await?;
        if cond.contains("migrating") {
            return Err(format!("after the rollback the volume still says: {cond}").into());
        }
        s.rolled_back = true;
        say("   (rollback: attached to node-b and detached before finalize; node-a kept writing)");
    }

    let t_pre = Instant::now();
    let pc = c.publish(&id, "node-b").await?;
    if pc.get(csi::migration::CTX_MIGRATION).map(String::as_str) != Some(csi::migration::LIVE) {
        return Err(
            format!("ControllerPublish(node-b) did not start a live migration: {pc:?}").into(),
        );
    }
    c.b.stage(&vol, &pc).await?;
    c.b.publish(&vol).await?;
    say("5/7 ControllerPublish(node-b): live pre-copy from node-a; node-b's device is held until finalize");
    let mut last = 0;
    loop {
        c.check()?;
        writer.check()?;
        let st = c.status(&c.b, &id).await?;
        draw(
            "pre-copy",
            st.chunks_present,
            st.chunks_total,
            tty,
            &mut last,
        );
        if st.chunks_total > 0 && st.chunks_present == st.chunks_total {
            break;
        }
        if t_pre.elapsed() > Duration::from_secs(900) {
            return Err("pre-copy did not finish in 15 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if tty {
        println!();
    }
    s.precopy = t_pre.elapsed();
    say(format!(
        "   pre-copy pass done in {}; the application still writes on node-a",
        ms(s.precopy)
    ));

    // The pod moves: it stops on node-a, kubelet unpublishes and unstages
    // (flush), the attacher detaches (finalize on node-b).
    let t_down = Instant::now();
    let st = writer.terminate(Duration::from_secs(120))?;
    if !st.success() {
        return Err(format!("the application on node-a failed: {}", writer.tail(10)).into());
    }
    c.a.detach(&id).await?;
    let t_fin = Instant::now();
    c.unpublish(&id, "node-a").await?;
    s.finalize = t_fin.elapsed();
    say(format!(
        "6/7 the application stopped on node-a; NodeUnpublish, NodeUnstage (flush) and ControllerUnpublish(node-a) finalized on node-b in {}",
        ms(s.finalize)
    ));

    let spawn_at = Instant::now();
    let mut verifier = c.app(
        "verify-on-node-b",
        &[
            "app-verify".into(),
            "--path".into(),
            c.b.target.clone(),
            "--seed".into(),
            seed.clone(),
            "--gens".into(),
            gens.display().to_string(),
        ],
    )?;
    let vst = verifier.wait_exit(Duration::from_secs(900))?;
    let out = verifier.tail(5);
    if !vst.success() {
        return Err(format!("verification on node-b failed: {out}").into());
    }
    let (bytes, first) = parse_verify(&out)?;
    s.verified = bytes;
    s.downtime = (spawn_at - t_down) + first;
    let mut last = 0;
    loop {
        c.check()?;
        let cond = c.condition(&id).await?;
        let st = c.status(&c.b, &id).await?;
        draw(
            "post-copy",
            st.chunks_present,
            st.chunks_total,
            tty,
            &mut last,
        );
        let a = c.status(&c.a, &id).await?;
        if !cond.contains("migrating") && a.phase == "none" {
            break;
        }
        if t_fin.elapsed() > Duration::from_secs(900) {
            return Err(format!(
                "the migration did not complete: {cond}; node-a: {}",
                a.phase
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if tty {
        println!();
    }
    s.postcopy = t_fin.elapsed();
    say(format!(
        "7/7 node-b read back every byte the application wrote ({} MiB, first read {} after the application stopped); migration complete, node-a released its copy",
        s.verified >> 20,
        ms(s.downtime)
    ));

    if o.all {
        // The RWO way back: the pod leaves node-b first, then lands on
        // node-a, which takes the region over from node-b's kept copy.
        c.b.detach(&id).await?;
        c.unpublish(&id, "node-b").await?;
        let pc = c.publish(&id, "node-a").await?;
        if pc.get(csi::migration::CTX_MIGRATION).map(String::as_str)
            != Some(csi::migration::HANDOVER)
        {
            return Err(format!("publishing back to node-a is not a hand-over: {pc:?}").into());
        }
        c.a.stage(&vol, &pc).await?;
        c.a.publish(&vol).await?;
        let mut v = c.app(
            "verify-on-node-a",
            &[
                "app-verify".into(),
                "--path".into(),
                c.a.target.clone(),
                "--seed".into(),
                seed.clone(),
                "--gens".into(),
                gens.display().to_string(),
            ],
        )?;
        let st = v.wait_exit(Duration::from_secs(900))?;
        if !st.success() {
            return Err(format!("verification after the hand-over failed: {}", v.tail(5)).into());
        }
        s.handed_back = parse_verify(&v.tail(5))?.0;
        say(format!(
            "   (hand-over: detached from node-b, attached to node-a, which took the region over from node-b's kept copy; {} MiB verified)",
            s.handed_back >> 20
        ));
        c.a.detach(&id).await?;
        c.unpublish(&id, "node-a").await?;
    } else {
        c.b.detach(&id).await?;
        c.unpublish(&id, "node-b").await?;
    }
    c.ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("DeleteVolume: {e}"))?;
    c.check()?;
    Ok(s)
}

fn parse_verify(out: &str) -> Result<(u64, Duration), Error> {
    let line = out
        .lines()
        .find(|l| l.starts_with("verified "))
        .ok_or_else(|| format!("no verification line in: {out}"))?;
    let mut it = line.split_whitespace().skip(1);
    let bytes = it.next().and_then(|v| v.parse().ok()).ok_or("bad bytes")?;
    let first_us: u64 = it
        .next()
        .and_then(|v| v.strip_prefix("first_read_us="))
        .and_then(|v| v.parse().ok())
        .ok_or("bad first read")?;
    Ok((bytes, Duration::from_micros(first_us)))
}

impl Summary {
    /// The summary table.
    pub fn print(&self, size: u64) {
        say("summary:");
        say(format!("  volume size          {} MiB", size >> 20));
        say(format!("  stage (node-a)       {}", ms(self.stage)));
        say(format!("  pre-copy             {}", ms(self.precopy)));
        say(format!("  finalize             {}", ms(self.finalize)));
        say(format!("  downtime             {}  (application stopped on node-a -> first read on node-b, incl. unpublish, unstage, finalize)", ms(self.downtime)));
        say(format!("  post-copy            {}", ms(self.postcopy)));
        say(format!("  verified on node-b   {} bytes", self.verified));
        if self.rolled_back {
            say("  rollback             node-a kept serving");
        }
        if self.handed_back > 0 {
            say(format!(
                "  hand-over to node-a  {} bytes verified",
                self.handed_back
            ));
        }
        say(format!(
            "summary: stage_ms={:.1} precopy_ms={:.1} finalize_ms={:.1} downtime_ms={:.1} postcopy_ms={:.1} verified={} rolled_back={} handed_back={}",
            self.stage.as_secs_f64() * 1e3,
            self.precopy.as_secs_f64() * 1e3,
            self.finalize.as_secs_f64() * 1e3,
            self.downtime.as_secs_f64() * 1e3,
            self.postcopy.as_secs_f64() * 1e3,
            self.verified,
            self.rolled_back,
            self.handed_back
        ));
    }
}
