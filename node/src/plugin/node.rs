//! The Node service: a staged volume is a managed r3map [`Volume`] over
//! its region, served to the kernel's NBD client through socketpairs
//! attached with netlink; publishing bind-mounts /dev/nbdN onto the file
//! kubelet gives. docs/csi.md describes the calls, their codes, the state
//! files and the restart rules.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi::capabilities;
use csi::pb::node_server::Node;
use csi::pb::*;
use csi::trace::traced;
use csi::validate;
use csi::{Credentials, CsiError, CsiResult, InFlight, Params};
use r3map::auth::ClientTls;
use r3map::remote::client::{Client, ConnectOptions};
use r3map::volume::{KernelConn, Mode, Volume, VolumeSpec};
use tokio::sync::Mutex;
use tonic::{Code, Request, Response, Status};

use super::attach::{self, Supervisor};
use super::migrate::{self, MigrationConfig, Registry};
use super::state::{StateDir, VolumeRecord, VERSION};
use crate::device::sysfs::NbdSysfs;
use crate::device::{
    ClientFlags, ConnectConfig, ReconfigureConfig, NODE_DEAD_CONN_TIMEOUT, NODE_IO_TIMEOUT,
};
use csi::migration::MigrateFrom;
use r3map::migration::Leech;

/// volume_context key of the region id (the controller's `regionId`).
pub const CTX_REGION: &str = "regionId";

/// Logical block size of every device.
pub const BLOCK_SIZE: u64 = 4096;

/// How long a connection to the region service may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a restarted plugin retries re-attaching a volume while the
/// region service is unreachable: well inside NODE_DEAD_CONN_TIMEOUT, after
/// which the device's I/O fails anyway.
const RECOVER_RETRY: Duration = Duration::from_secs(60);

/// How long NodeUnstageVolume may spend pushing and flushing a volume.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(120);

/// The node plugin's settings, from its command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// --nodeid
    pub node_id: String,
    /// --state-dir: records, caches, credential files.
    pub state_dir: PathBuf,
    /// --kubelet-dir: the allowed root of staging and target paths.
    pub kubelet_dir: PathBuf,
    /// The region service, with the command line's credentials.
    pub region: ConnectOptions,
    /// Socketpairs per device.
    pub connections: usize,
    /// Testing only: hold each mutating call's volume guard this long.
    pub hold: Duration,
    /// Migration between nodes; None: every stage starts from the region
    /// service and an unstaged volume is closed at once.
    pub migration: Option<MigrationConfig>,
}

mod peer;

/// What [`NodeService::teardown`] did with the volume.
enum Teardown {
    /// Kept for the next node (no device).
    Keep,
    /// Closed.
    Closed,
}

/// One staged volume held by this process.
struct Staged {
    rec: VolumeRecord,
    /// None when re-attaching at startup failed (`broken` says why) or a
    /// close failed; NodeUnstageVolume then reopens it to push what the
    /// cache holds.
    vol: Option<Arc<Volume>>,
    /// Keeps the device's connections served while staged.
    sup: Option<Supervisor>,
    broken: Option<String>,
    /// Pulls the volume from another node (a migration target).
    leech: Option<Arc<Leech>>,
    /// When this node's part in a migration started.
    started: Option<Instant>,
}

/// The Node service.
pub struct NodeService {
    cfg: Config,
    dir: StateDir,
    inflight: InFlight,
    staged: Arc<Mutex<HashMap<String, Staged>>>,
    /// What the migration server routes to.
    reg: Arc<Registry>,
}

/// The one conversion of a result to a gRPC answer.
#[allow(clippy::result_large_err)]
fn ok<T>(r: CsiResult<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

fn internal(what: &str, p: &Path, e: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("{what} {}: {e}", p.display()))
}

/// Appends `key=value` to a URI query; the engine takes paths literally,
/// so a path that would change the query's meaning is refused.
fn push_param(q: &mut Vec<String>, key: &str, value: &str) -> CsiResult<()> {
    if value.is_empty() || value.contains(['&', '?', '#', '=']) {
        return Err(CsiError::InvalidArgument(format!(
            "{key} {value:?} cannot go into a backend URI (empty, or has & ? # =)"
        )));
    }
    q.push(format!("{key}={value}"));
    Ok(())
}

/// `r3map://ADDR/REGION?...` for `opts`, plus `extra` (`fence=` or
/// `epoch=`).
pub fn backend_uri(
    opts: &ConnectOptions,
    region: &str,
    extra: Option<(&str, &str)>,
) -> CsiResult<String> {
    let mut q = Vec::new();
    let s = |p: &Path| p.to_string_lossy().to_string();
    if let Some(t) = &opts.token_file {
        push_param(&mut q, "token-file", &s(t))?;
    }
    if let Some(tls) = &opts.tls {
        push_param(&mut q, "ca", &s(&tls.ca))?;
        if let Some(c) = &tls.cert {
            push_param(&mut q, "cert", &s(c))?;
        }
        if let Some(k) = &tls.key {
            push_param(&mut q, "key", &s(k))?;
        }
        if let Some(n) = &tls.server_name {
            push_param(&mut q, "tls-name", n)?;
        }
    }
    if let Some((k, v)) = extra {
        push_param(&mut q, k, v)?;
    }
    Ok(format!("r3map://{}/{region}?{}", opts.addr, q.join("&")))
}

async fn connect(opts: &ConnectOptions) -> CsiResult<Client> {
    tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(opts))
        .await
        .map_err(|_| {
            CsiError::Unavailable(format!("region service {}: connect timed out", opts.addr))
        })?
        .map_err(|e| match e.code() {
            Some(code) => CsiError::from(Status::new(code, e.to_string())),
            None => CsiError::Unavailable(format!("region service {}: {e}", opts.addr)),
        })
}

fn write_secret(dir: &Path, name: &str, value: &str) -> CsiResult<PathBuf> {
    let p = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .map_err(|e| internal("writing credential", &p, e))?;
    f.write_all(value.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| internal("writing credential", &p, e))?;
    Ok(p)
}

/// Whether `target` is `dev` bind-mounted (stat of a bind-mounted device
/// node shows the device).
fn is_bind_of(target: &Path, dev: &Path) -> bool {
    match (std::fs::metadata(target), std::fs::metadata(dev)) {
        (Ok(t), Ok(d)) => t.file_type().is_block_device() && t.rdev() == d.rdev(),
        _ => false,
    }
}

/// Whether the device must be read-only: published, and only read-only.
/// A read-only bind mount does not stop writes to a device node (measured
/// in the guest: a write through it succeeded), so read-only is enforced
/// on the block device itself, which all publishes of the volume share.
fn device_ro(rec: &VolumeRecord) -> bool {
    !rec.published.is_empty() && rec.published.values().all(|&ro| ro)
}

nix::ioctl_write_ptr_bad!(blkroset, 0x125d, nix::libc::c_int);

/// BLKROSET on /dev/nbd`index`: writes to a read-only block device fail
/// with EPERM whichever path opened it.
fn set_device_ro(index: u32, ro: bool) -> CsiResult<()> {
    use std::os::fd::AsRawFd;
    let dev = format!("/dev/nbd{index}");
    let f =
        std::fs::File::open(&dev).map_err(|e| CsiError::Internal(format!("opening {dev}: {e}")))?;
    let v: nix::libc::c_int = ro.into();
    // SAFETY: BLKROSET reads one int from the pointer, which lives across
    // the call; the fd is open.
    unsafe { blkroset(f.as_raw_fd(), &v) }
        .map_err(|e| CsiError::Internal(format!("BLKROSET {ro} on {dev}: {e}")))?;
    Ok(())
}

fn remove_dir(p: &Path) -> CsiResult<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(internal("removing", p, e)),
    }
}

impl NodeService {
    /// The service over `cfg.state_dir`; call [`NodeService::recover`]
    /// before serving.
    pub fn new(cfg: Config) -> CsiResult<NodeService> {
        let dir = StateDir::open(&cfg.state_dir)?;
        Ok(NodeService {
            cfg,
            dir,
            inflight: InFlight::new(),
            staged: Arc::new(Mutex::new(HashMap::new())),
            reg: Arc::new(Registry::default()),
        })
    }

    /// The settings it runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The volumes the migration server routes to.
    pub fn registry(&self) -> Arc<Registry> {
        self.reg.clone()
    }

    async fn hold(&self) {
        if !self.cfg.hold.is_zero() {
            tokio::time::sleep(self.cfg.hold).await;
        }
    }

    fn cache_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("cache").join(id)
    }

    fn creds_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("credentials").join(id)
    }

    /// Connection options for a volume: the command line's, or the stage
    /// secrets written to files (0600) under the state dir, since the
    /// engine reads credentials from files.
    fn options_for(
        &self,
        id: &str,
        creds: &Credentials,
    ) -> CsiResult<(ConnectOptions, Option<PathBuf>)> {
        if creds.is_empty() {
            return Ok((self.cfg.region.clone(), None));
        }
        let dir = self.creds_dir(id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| internal("creating", &dir, e))?;
        let mut o = ConnectOptions::plain(self.cfg.region.addr.clone());
        if let Some(t) = &creds.token {
            o.token_file = Some(write_secret(&dir, "token", t.expose())?);
        }
        if let Some(ca) = &creds.ca {
            let mut tls = ClientTls {
                ca: write_secret(&dir, "ca.crt", ca.expose())?,
                server_name: creds.server_name.clone(),
                ..ClientTls::default()
            };
            if let (Some(c), Some(k)) = (&creds.cert, &creds.key) {
                tls.cert = Some(write_secret(&dir, "tls.crt", c.expose())?);
                tls.key = Some(write_secret(&dir, "tls.key", k.expose())?);
            }
            o.tls = Some(tls);
        }
        Ok((o, Some(dir)))
    }

    /// Options of a recorded volume (its credential files, if any).
    fn options_of(&self, rec: &VolumeRecord) -> ConnectOptions {
        let Some(dir) = &rec.creds_dir else {
            return self.cfg.region.clone();
        };
        let mut o = ConnectOptions::plain(self.cfg.region.addr.clone());
        let f = |n: &str| Some(dir.join(n)).filter(|p| p.exists());
        o.token_file = f("token");
        if let Some(ca) = f("ca.crt") {
            o.tls = Some(ClientTls {
                ca,
                cert: f("tls.crt"),
                key: f("tls.key"),
                server_name: self
                    .cfg
                    .region
                    .tls
                    .as_ref()
                    .and_then(|t| t.server_name.clone()),
            });
        }
        o
    }

    fn spec(&self, rec: &VolumeRecord, uri: String) -> CsiResult<VolumeSpec> {
        let params = Params::parse(&rec.params)?;
        Ok(VolumeSpec {
            name: rec.volume_id.clone(),
            backend: uri.into(),
            size: rec.size,
            chunk_size: params.chunk_size,
            mode: Mode::Managed {
                cache: rec.cache_path.clone(),
                options: params.managed_options(),
            },
            read_only: false,
        })
    }

    /// Whether the region of a volume this node does not hold exists:
    /// NOT_FOUND only when the region service says so; unreachable counts
    /// as existing (an unpublish or unstage of nothing has nothing to do).
    async fn check_exists(&self, id: &str) -> CsiResult<()> {
        let c = match connect(&self.cfg.region).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot ask the region service whether {id} exists: {e}");
                return Ok(());
            }
        };
        match c.get_region(id).await {
            Err(s) if s.code() == Code::NotFound => Err(CsiError::NotFound(format!(
                "volume {id:?} does not exist (no such region)"
            ))),
            _ => Ok(()),
        }
    }

    // ----------------------------------------------------------------- stage

    async fn stage(&self, r: NodeStageVolumeRequest) -> CsiResult<NodeStageVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let root = [self.cfg.kubelet_dir.as_path()];
        validate::path_under("staging_target_path", &r.staging_target_path, &root)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        capabilities::check_one(cap).map_err(CsiError::InvalidArgument)?;
        let params = Params::from_context(&r.volume_context)?;
        let region = r
            .volume_context
            .get(CTX_REGION)
            .cloned()
            .unwrap_or_else(|| r.volume_id.clone());
        r3map::remote::check_id(&region)
            .map_err(|e| CsiError::InvalidArgument(format!("{CTX_REGION} {region:?}: {e}")))?;
        let creds = Credentials::from_secrets(&r.secrets)?;
        let from = MigrateFrom::from_context(&r.publish_context)?;
        let id = r.volume_id.clone();
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;

        // A region this node kept after unstaging it is staged again from
        // what is here: no copy at all.
        let retained = {
            let mut staged = self.staged.lock().await;
            match staged.get(&id) {
                Some(s) if s.rec.retained_until.is_some() => staged.remove(&id),
                _ => None,
            }
        };
        if let Some(s) = retained {
            if self.restage_retained(s, &r, &region, &params).await? {
                return Ok(NodeStageVolumeResponse {});
            }
        }

        if let Some(s) = self.staged.lock().await.get(&id) {
            if let Some(why) = &s.broken {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} is recorded on this node but could not be re-attached: {why}; unstage it first"
                )));
            }
            if s.rec.staging_path == r.staging_target_path
                && s.rec.region == region
                && s.rec.params == params.to_context()
            {
                return Ok(NodeStageVolumeResponse {});
            }
            return Err(CsiError::AlreadyExists(format!(
                "volume {id:?} is staged at {:?} (region {}) with other arguments",
                s.rec.staging_path, s.rec.region
            )));
        }

        let (opts, creds_dir) = self.options_for(&id, &creds)?;
        let client = connect(&opts).await?;
        let reg = client
            .get_region(&region)
            .await
            .map_err(|s| CsiError::from(s).context(&id))?;
        if reg.size == 0 || reg.size % BLOCK_SIZE != 0 {
            return Err(CsiError::FailedPrecondition(format!(
                "region {region} has {} bytes, not a positive multiple of the block size {BLOCK_SIZE}",
                reg.size
            )));
        }
        // The kernel side first: a node that cannot attach must not take
        // the region over from its current writer.
        attach::netlink(|nl| Ok(nl.family())).await?;

        let rec = VolumeRecord {
            version: VERSION,
            volume_id: id.clone(),
            region: region.clone(),
            device_index: None,
            identifier: id.clone(),
            cache_path: self.cache_dir(&id).join("disk"),
            epoch: 0,
            size: reg.size,
            connections: self.cfg.connections.max(1),
            staging_path: r.staging_target_path.clone(),
            params: params.to_context(),
            creds_dir,
            published: Default::default(),
            migrate_from: None,
            retained_until: None,
        };
        if let Some(from) = from.filter(|f| f.node != self.cfg.node_id) {
            if self.stage_from_peer(rec.clone(), &opts, &from).await? {
                return Ok(NodeStageVolumeResponse {});
            }
        }
        self.stage_fresh(rec, &opts).await?;
        Ok(NodeStageVolumeResponse {})
    }

    /// A fresh cache directory for `id` (a leftover one may hold chunks
    /// older than what another node wrote since).
    fn fresh_cache(&self, id: &str) -> CsiResult<()> {
        let cache_dir = self.cache_dir(id);
        remove_dir(&cache_dir)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cache_dir)
            .map_err(|e| internal("creating", &cache_dir, e))
    }

    /// Stages from the region service, taking the region over (fence).
    async fn stage_fresh(&self, mut rec: VolumeRecord, opts: &ConnectOptions) -> CsiResult<()> {
        let id = rec.volume_id.clone();
        self.fresh_cache(&id)?;
        let uri = backend_uri(opts, &rec.region, Some(("fence", &self.cfg.node_id)))?;
        let vol = Volume::open(self.spec(&rec, uri)?)
            .await
            .map_err(|e| CsiError::from(e).context(&format!("staging {id}")))?;
        rec.epoch = vol.backend().epoch().unwrap_or(0);
        // Recorded before CONNECT: a crash between the two leaves a device
        // that a restart finds by its identifier.
        if let Err(e) = self.dir.save(&rec) {
            let _ = vol.close(Instant::now() + CLOSE_TIMEOUT).await;
            return Err(e);
        }
        match self.attach_new(&vol, &mut rec).await {
            Ok(conns) => {
                tracing::info!(volume = %id, index = ?rec.device_index, epoch = rec.epoch, "staged");
                self.install(rec, Arc::new(vol), conns, None).await;
                Ok(())
            }
            Err(e) => {
                let _ = vol.close(Instant::now() + CLOSE_TIMEOUT).await;
                let _ = self.dir.remove(&id);
                let _ = remove_dir(&self.cache_dir(&id));
                Err(e)
            }
        }
    }

    /// Keeps a staged volume: its device's connections served, its region
    /// reachable by migration targets, and (for a target) its leech
    /// watched until every chunk is here.
    async fn install(
        &self,
        rec: VolumeRecord,
        vol: Arc<Volume>,
        conns: Vec<KernelConn>,
        leech: Option<Arc<Leech>>,
    ) {
        let id = rec.volume_id.clone();
        let sup = rec
            .device_index
            .map(|i| Supervisor::start(vol.clone(), i, rec.identifier.clone(), conns));
        self.reg.insert_volume(&id, vol.clone());
        if let Some(l) = &leech {
            self.reg.insert_leech(&id, l.clone());
            self.watch_leech(&id, l.clone());
        }
        self.staged.lock().await.insert(
            id,
            Staged {
                started: leech.as_ref().map(|_| Instant::now()),
                rec,
                vol: Some(vol),
                sup,
                broken: None,
                leech,
            },
        );
    }

    async fn attach_new(&self, vol: &Volume, rec: &mut VolumeRecord) -> CsiResult<Vec<KernelConn>> {
        let flags = vol
            .server()
            .export(vol.name())
            .map(|e| e.transmission_flags(false))
            .ok_or_else(|| CsiError::Internal("the volume has no export".into()))?;
        let (kernel, ours) = attach::pairs(rec.connections)?;
        let cfg = ConnectConfig {
            size_bytes: rec.size,
            block_size: BLOCK_SIZE,
            identifier: rec.identifier.clone(),
            io_timeout: Some(NODE_IO_TIMEOUT),
            dead_conn_timeout: Some(NODE_DEAD_CONN_TIMEOUT),
            server_flags: u64::from(flags),
            client_flags: ClientFlags::NODE_PLUGIN,
        };
        let index = attach::connect(kernel, cfg).await?;
        let conns = attach::serve(vol, ours)?;
        rec.device_index = Some(index);
        if let Err(e) = self.dir.save(rec) {
            let _ = attach::disconnect(index).await;
            return Err(e);
        }
        Ok(conns)
    }

    // ------------------------------------------------------- restart survival

    /// Re-attaches every recorded volume (run once, before serving),
    /// all volumes at once (each device's dead-connection timeout runs
    /// from the same moment): each is reopened from its cache with the
    /// epoch it holds (never a new fence: that would fence off our own
    /// writes in flight), its device's identifier is checked, and it gets
    /// new sockets through RECONFIGURE. Returns one line per volume for the
    /// log.
    pub async fn recover(self: &Arc<Self>) -> Vec<String> {
        let mut report = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for r in self.dir.load_all() {
            let rec = match r {
                Ok(rec) => rec,
                Err(e) => {
                    tracing::error!("{e}");
                    report.push(format!("unreadable record: {e}"));
                    continue;
                }
            };
            let this = self.clone();
            if rec.retained_until.is_some() {
                // Kept for the next node, no device: reachable again.
                let id = rec.volume_id.clone();
                match this.recover_retained(rec).await {
                    Ok(()) => report.push(format!("kept {id} for the next node")),
                    Err(e) => {
                        tracing::error!(volume = %id, "a kept region could not be reopened: {e}");
                        report.push(format!("dropped kept {id}: {e}"));
                    }
                }
                continue;
            }
            tasks.spawn(async move {
                let r = this.reattach_retrying(&rec).await;
                (rec, r)
            });
        }
        while let Some(j) = tasks.join_next().await {
            let Ok((rec, result)) = j else {
                report.push(format!("a re-attach task failed: {j:?}", j = j.err()));
                continue;
            };
            let id = rec.volume_id.clone();
            match result {
                Ok(Some(s)) => {
                    report.push(format!(
                        "reattached {id} nbd{}",
                        s.rec.device_index.unwrap_or(u32::MAX)
                    ));
                    if let Some(v) = &s.vol {
                        self.reg.insert_volume(&id, v.clone());
                    }
                    if let Some(l) = &s.leech {
                        self.reg.insert_leech(&id, l.clone());
                        self.watch_leech(&id, l.clone());
                    }
                    self.staged.lock().await.insert(id, s);
                }
                Ok(None) => report.push(format!("dropped {id}: it was never attached")),
                Err(e) => {
                    tracing::error!(volume = %id, "not re-attached: {e}");
                    report.push(format!("refused {id}: {e}"));
                    self.staged.lock().await.insert(
                        id,
                        Staged {
                            rec,
                            vol: None,
                            sup: None,
                            broken: Some(e.to_string()),
                            leech: None,
                            started: None,
                        },
                    );
                }
            }
        }
        report.sort();
        report
    }

    /// [`Self::reattach`], retried while the region service is
    /// unreachable: worth waiting for (the device waits
    /// NODE_DEAD_CONN_TIMEOUT for us); anything else will not change by
    /// retrying. Nothing before the failing step has lasting effects.
    async fn reattach_retrying(&self, rec: &VolumeRecord) -> CsiResult<Option<Staged>> {
        let t0 = Instant::now();
        loop {
            match self.reattach(rec.clone()).await {
                Err(e) if e.code() == Code::Unavailable && t0.elapsed() < RECOVER_RETRY => {
                    tracing::warn!(volume = %rec.volume_id, "re-attach: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                r => return r,
            }
        }
    }

    async fn reopen(&self, rec: &VolumeRecord) -> CsiResult<Volume> {
        let opts = self.options_of(rec);
        let uri = backend_uri(&opts, &rec.region, Some(("epoch", &rec.epoch.to_string())))?;
        Volume::open(self.spec(rec, uri)?)
            .await
            .map_err(|e| CsiError::from(e).context(&format!("reopening {}", rec.volume_id)))
    }

    /// Whether the region is still ours: the epoch and owner we recorded.
    async fn check_fence(&self, rec: &VolumeRecord) -> CsiResult<()> {
        let c = connect(&self.options_of(rec)).await?;
        let reg = c
            .get_region(&rec.region)
            .await
            .map_err(|s| CsiError::from(s).context(&rec.volume_id))?;
        if reg.epoch != rec.epoch || reg.owner != self.cfg.node_id {
            return Err(CsiError::FailedPrecondition(format!(
                "region {} is at epoch {} owned by {:?}; this node holds epoch {}: fenced",
                rec.region, reg.epoch, reg.owner, rec.epoch
            )));
        }
        Ok(())
    }

    async fn reattach(&self, mut rec: VolumeRecord) -> CsiResult<Option<Staged>> {
        let id = rec.volume_id.clone();
        let index = match rec.device_index {
            Some(i) => i,
            None => match attach::find_by_identifier(Path::new("/sys/block"), &rec.identifier) {
                Some(i) => i,
                None => {
                    // Recorded, then the plugin died before CONNECT: there
                    // is no device; the cache holds nothing unpushed that a
                    // writer could have made.
                    self.dir.remove(&id)?;
                    remove_dir(&self.cache_dir(&id))?;
                    return Ok(None);
                }
            },
        };
        // Never rebind another volume's device (ceph-csi#2529): the index
        // may have been reused after the device was destroyed.
        let sys = NbdSysfs::new(index);
        let have = sys
            .backend()
            .map_err(|e| CsiError::Internal(format!("reading {}: {e}", sys.dir().display())))?;
        if have.as_deref() != Some(rec.identifier.as_str()) {
            return Err(CsiError::FailedPrecondition(format!(
                "refused to re-attach: /sys/block/nbd{index}/backend is {have:?}, want {:?}",
                rec.identifier
            )));
        }
        if !attach::netlink(move |nl| nl.status(index)).await? {
            return Err(CsiError::FailedPrecondition(format!(
                "nbd{index} is not configured any more"
            )));
        }
        // A target before its pull completed does not hold the region
        // yet (or holds it through the leech's record): no fence check.
        if rec.migrate_from.is_none() {
            self.check_fence(&rec).await?;
        }
        let (vol, leech) = self.open_recorded(&rec).await?;
        let (kernel, ours) = attach::pairs(rec.connections)?;
        let cfg = ReconfigureConfig {
            identifier: Some(rec.identifier.clone()),
            io_timeout: Some(NODE_IO_TIMEOUT),
            dead_conn_timeout: Some(NODE_DEAD_CONN_TIMEOUT),
            client_flags: None,
        };
        if let Err(e) = attach::reconfigure(index, kernel, &ours, cfg).await {
            let _ = vol.close(Instant::now() + CLOSE_TIMEOUT).await;
            return Err(e);
        }
        let conns = attach::serve(&vol, ours)?;
        if rec.device_index.is_none() {
            rec.device_index = Some(index);
            self.dir.save(&rec)?;
        }
        tracing::info!(volume = %id, index, epoch = rec.epoch, "re-attached");
        let vol = Arc::new(vol);
        let sup = Supervisor::start(vol.clone(), index, rec.identifier.clone(), conns);
        Ok(Some(Staged {
            started: leech.as_ref().map(|_| Instant::now()),
            rec,
            vol: Some(vol),
            sup: Some(sup),
            broken: None,
            leech,
        }))
    }

    // --------------------------------------------------------------- unstage

    async fn unstage(&self, r: NodeUnstageVolumeRequest) -> CsiResult<NodeUnstageVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let root = [self.cfg.kubelet_dir.as_path()];
        validate::path_under("staging_target_path", &r.staging_target_path, &root)?;
        let id = r.volume_id;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let Some(mut s) = self.staged.lock().await.remove(&id) else {
            self.check_exists(&id).await?;
            return Ok(NodeUnstageVolumeResponse {});
        };
        if s.rec.retained_until.is_some() {
            // Unstaged before; the region is only kept for the next node.
            self.staged.lock().await.insert(id, s);
            return Ok(NodeUnstageVolumeResponse {});
        }
        let still: Vec<_> = s
            .rec
            .published
            .keys()
            .filter(|t| Path::new(t).exists())
            .cloned()
            .collect();
        if !still.is_empty() {
            let e = CsiError::FailedPrecondition(format!(
                "volume {id:?} is still published at {}",
                still.join(", ")
            ));
            self.staged.lock().await.insert(id, s);
            return Err(e);
        }
        match self.teardown(&mut s).await {
            Ok(Teardown::Keep) => {
                self.retain(s).await?;
                Ok(NodeUnstageVolumeResponse {})
            }
            Ok(Teardown::Closed) => {
                self.dir.remove(&id)?;
                remove_dir(&self.cache_dir(&id))?;
                remove_dir(&self.creds_dir(&id))?;
                tracing::info!(volume = %id, "unstaged");
                Ok(NodeUnstageVolumeResponse {})
            }
            Err(e) => {
                s.broken
                    .get_or_insert_with(|| format!("unstage failed: {e}"));
                self.staged.lock().await.insert(id, s);
                Err(e)
            }
        }
    }

    /// Flush, DISCONNECT; then either keep the volume for the next node
    /// (migration on, a region worth handing over) or close it (push and
    /// flush). A target that was never finalized gives its pull up first
    /// (its device is held: a flush would wait for a finalize that will
    /// not come), and its source serves on.
    async fn teardown(&self, s: &mut Staged) -> CsiResult<Teardown> {
        let id = s.rec.volume_id.clone();
        let rollback = s.leech.as_ref().filter(|l| !l.status().finalized).cloned();
        if let Some(l) = &rollback {
            l.abort()
                .await
                .map_err(|e| CsiError::from(e).context(&format!("giving up the pull of {id}")))?;
            tracing::info!(volume = %id, "unstaged before finalize: migration rolled back, the source serves on");
        }
        if let Some(index) = s.rec.device_index {
            let ours = s
                .rec
                .device_index
                .map(NbdSysfs::new)
                .and_then(|d| d.backend().ok().flatten());
            // Only a device that is still ours is touched.
            if ours.as_deref() == Some(s.rec.identifier.as_str()) {
                if let Some(sup) = &s.sup {
                    // A connection ending from here on is the DISCONNECT.
                    sup.stop_replacing();
                    if rollback.is_none() {
                        attach::flush_device(index, Duration::from_secs(60)).await?;
                    }
                }
                attach::disconnect(index).await?;
            }
        }
        if let Some(sup) = s.sup.take() {
            sup.finish(Duration::from_secs(30)).await;
        }
        if rollback.is_some() {
            // Its mount was closed by the abort, its files removed.
            self.reg.remove_volume(&id);
            self.reg.remove_leech(&id);
            s.vol = None;
            s.leech = None;
            return Ok(Teardown::Closed);
        }
        let fenced = s
            .vol
            .as_ref()
            .and_then(|v| v.managed())
            .is_some_and(|m| m.fenced().is_some());
        let handed_over = s
            .vol
            .as_ref()
            .is_some_and(|v| v.source().status().finalized);
        if self.cfg.migration.is_some() && s.vol.is_some() && !fenced && !handed_over {
            s.rec.device_index = None;
            return Ok(Teardown::Keep);
        }
        self.reg.remove_volume(&id);
        self.reg.remove_leech(&id);
        s.leech = None;
        self.close_volume(s).await?;
        Ok(Teardown::Closed)
    }

    /// Closes the volume of `s` (push and flush), or, with none open since
    /// a restart, reopens it to push what its cache holds.
    async fn close_volume(&self, s: &mut Staged) -> CsiResult<()> {
        let vol = match s.vol.take() {
            // Seed calls in flight hold a clone for a moment.
            Some(v) => migrate::take_unique(v, Duration::from_secs(30)).await?,
            None => {
                // Nothing served since the restart. A node that was fenced
                // off has nothing to push: the region belongs to a newer
                // writer, and the store would refuse every write (and
                // unstage would never succeed).
                match self.check_fence(&s.rec).await {
                    Err(e) if e.code() == Code::FailedPrecondition => {
                        tracing::warn!(volume = %s.rec.volume_id, "unstaging a fenced volume without pushing its cache: {e}");
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
                // What the cache holds unpushed still goes to the region.
                self.reopen(&s.rec).await?
            }
        };
        let fenced = vol.managed().and_then(|m| m.fenced());
        let handed_over = vol.source().status().finalized;
        match vol.close(Instant::now() + CLOSE_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(e) if fenced.is_some() || handed_over || e.kind() == r3map::ErrorKind::Fenced => {
                // Fenced while staged (another node staged the volume), or
                // handed over: its writes belong to the new writer now;
                // keeping the record would only make every later unstage
                // fail.
                tracing::warn!(volume = %s.rec.volume_id, "closed a fenced or handed-over volume; unpushed writes are the new writer's: {e}");
                Ok(())
            }
            Err(e) if e.kind() == r3map::ErrorKind::NotFound => {
                tracing::warn!(volume = %s.rec.volume_id, "the region is gone (deleted); nothing to push: {e}");
                Ok(())
            }
            Err(e) => Err(CsiError::from(e).context(&format!("closing {}", s.rec.volume_id))),
        }
    }

    // --------------------------------------------------------------- publish

    async fn publish(&self, r: NodePublishVolumeRequest) -> CsiResult<NodePublishVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let root = [self.cfg.kubelet_dir.as_path()];
        validate::path_under("staging_target_path", &r.staging_target_path, &root)?;
        validate::path_under("target_path", &r.target_path, &root)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        capabilities::check_one(cap).map_err(CsiError::InvalidArgument)?;
        let id = r.volume_id;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let mut staged = self.staged.lock().await;
        let s = staged
            .get_mut(&id)
            .filter(|s| s.rec.retained_until.is_none())
            .ok_or_else(|| {
                CsiError::FailedPrecondition(format!("volume {id:?} is not staged on this node"))
            })?;
        if let Some(why) = &s.broken {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id:?} cannot be published: {why}"
            )));
        }
        if s.rec.staging_path != r.staging_target_path {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id:?} is staged at {:?}, not {:?}",
                s.rec.staging_path, r.staging_target_path
            )));
        }
        let index = s
            .rec
            .device_index
            .ok_or_else(|| CsiError::Internal("staged volume without a device".into()))?;
        let dev = PathBuf::from(format!("/dev/nbd{index}"));
        let target = PathBuf::from(&r.target_path);
        if is_bind_of(&target, &dev) {
            return match s.rec.published.get(&r.target_path) {
                Some(&ro) if ro != r.readonly => Err(CsiError::AlreadyExists(format!(
                    "volume {id:?} is published at {:?} with readonly={ro}",
                    r.target_path
                ))),
                _ => Ok(NodePublishVolumeResponse {}),
            };
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| internal("creating", parent, e))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .map_err(|e| internal("creating", &target, e))?;
        use nix::mount::{mount, MsFlags};
        mount(
            Some(&dev),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            CsiError::Internal(format!(
                "bind-mounting {} onto {}: {e}",
                dev.display(),
                target.display()
            ))
        })?;
        if r.readonly {
            // A bind mount takes MS_RDONLY only on a remount.
            if let Err(e) = mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            ) {
                let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
                return Err(CsiError::Internal(format!(
                    "remounting {} read-only: {e}",
                    target.display()
                )));
            }
        }
        let mut rec = s.rec.clone();
        rec.published.insert(r.target_path.clone(), r.readonly);
        if let Err(e) = set_device_ro(index, device_ro(&rec)) {
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
            return Err(e);
        }
        self.dir.save(&rec)?;
        s.rec = rec;
        tracing::info!(volume = %id, target = %r.target_path, readonly = r.readonly, "published");
        Ok(NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        r: NodeUnpublishVolumeRequest,
    ) -> CsiResult<NodeUnpublishVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let root = [self.cfg.kubelet_dir.as_path()];
        validate::path_under("target_path", &r.target_path, &root)?;
        let id = r.volume_id;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let known = self.staged.lock().await.contains_key(&id);
        if !known {
            self.check_exists(&id).await?;
        }
        let target = PathBuf::from(&r.target_path);
        // Unmount every layer (a repeated publish after a crash may have
        // stacked two); a bind-mounted device node stats as a block device.
        for _ in 0..8 {
            match std::fs::metadata(&target) {
                Ok(m) if m.file_type().is_block_device() => {}
                _ => break,
            }
            match nix::mount::umount2(&target, nix::mount::MntFlags::empty()) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINVAL) => break,
                Err(e) => {
                    return Err(CsiError::Internal(format!(
                        "unmounting {}: {e}",
                        target.display()
                    )))
                }
            }
        }
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(internal("removing", &target, e)),
        }
        let mut staged = self.staged.lock().await;
        if let Some(s) = staged.get_mut(&id) {
            if s.rec.published.contains_key(&r.target_path) {
                let mut rec = s.rec.clone();
                rec.published.remove(&r.target_path);
                if let (Some(index), None) = (rec.device_index, &s.broken) {
                    set_device_ro(index, device_ro(&rec))?;
                }
                self.dir.save(&rec)?;
                s.rec = rec;
            }
        }
        tracing::info!(volume = %id, target = %r.target_path, "unpublished");
        Ok(NodeUnpublishVolumeResponse {})
    }

    // ----------------------------------------------------------- stats, expand

    async fn condition(
        &self,
        rec: &VolumeRecord,
        broken: Option<String>,
        fenced: Option<String>,
    ) -> VolumeCondition {
        if let Some(why) = broken {
            return VolumeCondition {
                abnormal: true,
                message: why,
            };
        }
        if let Some(why) = fenced {
            return VolumeCondition {
                abnormal: true,
                message: format!("fenced: {why}"),
            };
        }
        match self.check_fence(rec).await {
            Ok(()) => VolumeCondition {
                abnormal: false,
                message: format!("attached at epoch {}", rec.epoch),
            },
            Err(e) if e.code() == Code::Unavailable => VolumeCondition {
                abnormal: true,
                message: format!("region service unreachable: {e}"),
            },
            Err(e) => VolumeCondition {
                abnormal: true,
                message: e.to_string(),
            },
        }
    }

    async fn lookup(
        &self,
        id: &str,
        path: &str,
    ) -> CsiResult<(VolumeRecord, Option<String>, Option<String>)> {
        let staged = self.staged.lock().await;
        let s = staged
            .get(id)
            .filter(|s| s.rec.retained_until.is_none())
            .ok_or_else(|| {
                CsiError::NotFound(format!("volume {id:?} is not staged on this node"))
            })?;
        if s.rec.staging_path != path && !s.rec.published.contains_key(path) {
            return Err(CsiError::NotFound(format!(
                "volume {id:?} is neither staged nor published at {path:?}"
            )));
        }
        let fenced = s
            .vol
            .as_ref()
            .and_then(|v| v.managed())
            .and_then(|m| m.fenced());
        Ok((s.rec.clone(), s.broken.clone(), fenced))
    }

    async fn stats(&self, r: NodeGetVolumeStatsRequest) -> CsiResult<NodeGetVolumeStatsResponse> {
        validate::volume_id(&r.volume_id)?;
        validate::required("volume_path", &r.volume_path)?;
        let (rec, broken, fenced) = self.lookup(&r.volume_id, &r.volume_path).await?;
        let size = i64::try_from(rec.size).unwrap_or(i64::MAX);
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![VolumeUsage {
                available: 0,
                total: size,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }],
            volume_condition: Some(self.condition(&rec, broken, fenced).await),
        })
    }

    async fn expand(&self, r: NodeExpandVolumeRequest) -> CsiResult<NodeExpandVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        validate::required("volume_path", &r.volume_path)?;
        if let Some(cap) = &r.volume_capability {
            capabilities::check_one(cap).map_err(CsiError::InvalidArgument)?;
        }
        let _g = self.inflight.try_lock(&r.volume_id)?;
        let (rec, _, _) = self.lookup(&r.volume_id, &r.volume_path).await?;
        let c = connect(&self.options_of(&rec)).await?;
        let reg = c
            .get_region(&rec.region)
            .await
            .map_err(|s| CsiError::from(s).context(&rec.volume_id))?;
        if reg.size > rec.size {
            // 6.1's NBD_CMD_RECONFIGURE takes no size, and the size ioctl
            // is refused on a netlink-made device; the engine's volume has a
            // fixed size too. docs/csi.md.
            return Err(CsiError::FailedPrecondition(format!(
                "region {} grew to {} bytes but nbd{} was attached with {}: the kernel \
                 cannot resize an attached NBD device (NBD_CMD_RECONFIGURE takes no size); \
                 unstage and stage the volume again to use the new size",
                rec.region,
                reg.size,
                rec.device_index.unwrap_or(u32::MAX),
                rec.size
            )));
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(rec.size).unwrap_or(i64::MAX),
        })
    }

    // ------------------------------------------------------------- test hook

    /// Testing only (`--test-cut-on-usr1`): ends one kernel connection of
    /// every attached volume, as a dying server would, so that a guest test
    /// can watch the supervisor replace it. Returns one line per volume.
    pub async fn cut_one_connection_each(&self) -> Vec<String> {
        let staged = self.staged.lock().await;
        let mut lines: Vec<_> = staged
            .iter()
            .filter_map(|(id, s)| {
                let sup = s.sup.as_ref()?;
                let served = sup.live();
                sup.cut_one();
                Some(format!(
                    "test hook: cut a connection of {id} nbd{} ({served} of {} served)",
                    s.rec.device_index.unwrap_or(u32::MAX),
                    s.rec.connections
                ))
            })
            .collect();
        lines.sort();
        lines
    }

    // --------------------------------------------------------------- metrics

    /// Every staged volume as of now, sorted by id, for `/metrics`
    /// ([`crate::metrics`]): the engine's counters read live, never copied.
    pub async fn volume_metrics(&self) -> Vec<crate::metrics::VolumeMetrics> {
        let staged = self.staged.lock().await;
        let mut v: Vec<_> = staged
            .iter()
            .map(|(id, s)| {
                let mut m = crate::metrics::VolumeMetrics::of(id, s.rec.epoch, s.vol.as_deref());
                m.attached = s.rec.device_index.is_some();
                if let Some(l) = &s.leech {
                    let st = l.status();
                    let phase = if st.complete {
                        "complete"
                    } else if st.finalized {
                        "post-copy"
                    } else {
                        "pre-copy"
                    };
                    m.migration_phase = Some(phase.into());
                    m.migration_duration = l
                        .completed_after()
                        .or_else(|| s.started.map(|t| t.elapsed()));
                    m.migration_chunks_present = Some(st.chunks_present);
                    m.migration_chunks_total = Some(st.chunks_total);
                } else if s.rec.retained_until.is_some() {
                    m.migration_phase = Some("retained".into());
                } else if s
                    .vol
                    .as_ref()
                    .is_some_and(|v| v.source().status().session != 0)
                {
                    m.migration_phase = Some("source".into());
                }
                m
            })
            .collect();
        v.sort_by(|a, b| a.volume.cmp(&b.volume));
        v
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("NodeStageVolume", &id, self.stage(r)).await)
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("NodeUnstageVolume", &id, self.unstage(r)).await)
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("NodePublishVolume", &id, self.publish(r)).await)
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("NodeUnpublishVolume", &id, self.unpublish(r)).await)
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("NodeGetVolumeStats", &id, self.stats(r)).await)
    }

    async fn node_get_volume_health(
        &self,
        _: Request<NodeGetVolumeHealthRequest>,
    ) -> Result<Response<NodeGetVolumeHealthResponse>, Status> {
        Err(Status::unimplemented(
            "volume health is not supported (no GET_VOLUME_HEALTH capability)",
        ))
    }

    async fn node_get_storage_health(
        &self,
        _: Request<NodeGetStorageHealthRequest>,
    ) -> Result<Response<NodeGetStorageHealthResponse>, Status> {
        Err(Status::unimplemented(
            "storage health is not supported (no STORAGE_HEALTH capability)",
        ))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("NodeExpandVolume", &id, self.expand(r)).await)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: capabilities::node(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let mut o = ConnectOptions::plain("10.0.2.2:7000");
        o.token_file = Some("/state/tok".into());
        o.tls = Some(ClientTls {
            ca: "/state/ca.crt".into(),
            cert: None,
            key: None,
            server_name: Some("localhost".into()),
        });
        let u = backend_uri(&o, "csi-a", Some(("fence", "node-1"))).unwrap();
        assert_eq!(
            u,
            "r3map://10.0.2.2:7000/csi-a?token-file=/state/tok&ca=/state/ca.crt&tls-name=localhost&fence=node-1"
        );
        r3map::remote::client::RemoteUri::parse(&u).unwrap();
        let u = backend_uri(&o, "csi-a", Some(("epoch", "4"))).unwrap();
        assert_eq!(
            r3map::remote::client::RemoteUri::parse(&u).unwrap().epoch,
            Some(4)
        );
        o.token_file = Some("/a&b".into());
        let e = backend_uri(&o, "csi-a", Some(("epoch", "4"))).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
}
