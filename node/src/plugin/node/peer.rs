//! The node service's part in migrations between nodes (see
//! [`crate::plugin::migrate`] and docs/migration.md): staging a volume
//! from another node, keeping an unstaged volume's region for the next
//! node, and the control calls the controller and the other nodes make.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use csi::migration::MigrateFrom;
use csi::nodepb::{migration_status::Role, FinalizeReply, MigrationStatus};
use csi::pb::NodeStageVolumeRequest;
use csi::{CsiError, CsiResult, Params};
use r3map::migration::{leech, record, Leech};
use r3map::net::Endpoint;
use r3map::remote::client::ConnectOptions;
use r3map::Volume;
use tonic::Code;

use super::{backend_uri, remove_dir, NodeService, Staged, BLOCK_SIZE};
use crate::plugin::attach;
use crate::plugin::migrate::{self, MigrationConfig};
use crate::plugin::state::{PeerSource, VolumeRecord};

/// Where a target's volume keeps its own finalize answer when it is a
/// source in turn (beside the cache; the leech's record has the cache's
/// usual `.migration` path while the pull lasts).
fn source_record(cache: &Path) -> PathBuf {
    let mut p = cache.as_os_str().to_owned();
    p.push(".source-migration");
    PathBuf::from(p)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

nix::ioctl_none_bad!(blkflsbuf, 0x1261);

/// Opens the new device once and drops its page cache (BLKFLSBUF): the
/// kernel scans partitions at the first open, reading the first blocks;
/// done here, while the target's reads are let through, it does not wait
/// for finalize, and what it read is dropped from the page cache so that
/// no application on this node reads it before finalize.
async fn first_open(index: u32) -> CsiResult<()> {
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let dev = format!("/dev/nbd{index}");
        let f = std::fs::File::open(&dev)
            .map_err(|e| CsiError::Internal(format!("opening {dev}: {e}")))?;
        // SAFETY: BLKFLSBUF takes no argument; the fd is open.
        unsafe { blkflsbuf(f.as_raw_fd()) }
            .map_err(|e| CsiError::Internal(format!("BLKFLSBUF on {dev}: {e}")))?;
        Ok(())
    })
    .await
    .map_err(|e| CsiError::Internal(e.to_string()))?
}

impl NodeService {
    fn migration_cfg(&self) -> CsiResult<&MigrationConfig> {
        self.cfg.migration.as_ref().ok_or_else(|| {
            CsiError::FailedPrecondition(
                "this node plugin has no migration service (--migration-listen)".into(),
            )
        })
    }

    /// Starts (or, from the record beside the cache, resumes) the pull of
    /// `rec` from its source node.
    async fn open_leech(&self, rec: &VolumeRecord) -> CsiResult<Arc<Leech>> {
        let m = self.migration_cfg()?;
        let peer = rec
            .migrate_from
            .as_ref()
            .ok_or_else(|| CsiError::Internal("no migration source recorded".into()))?;
        let opts = self.options_of(rec);
        let params = Params::parse(&rec.params)?;
        let fallback = backend_uri(&opts, &rec.region, None)?;
        let tls = m.auth.client_tls();
        let token = m.auth.client_token(&peer.endpoint)?;
        if tls.is_none() && token.is_none() && m.auth.token_file.is_some() {
            return Err(CsiError::FailedPrecondition(format!(
                "migration source {} is not on loopback and no TLS is set up",
                peer.endpoint
            )));
        }
        let l = Leech::start(leech::Config {
            token,
            tls,
            fallback: Some(fallback),
            owner: Some(self.cfg.node_id.clone()),
            patience: m.patience,
            pull_workers: params.pull_workers.max(1),
            volume: Some(rec.volume_id.clone()),
            ..leech::Config::new(Endpoint::Tcp(peer.endpoint.clone()), rec.cache_path.clone())
        })
        .await
        .map_err(|e| {
            CsiError::from(e).context(&format!(
                "pulling {} from node {} ({})",
                rec.volume_id, peer.node, peer.endpoint
            ))
        })?;
        Ok(l)
    }

    /// The volume a target serves: the leech's mount, a source in turn.
    async fn leech_volume(&self, rec: &VolumeRecord, l: &Arc<Leech>) -> CsiResult<Volume> {
        Volume::over_managed(
            rec.volume_id.clone(),
            l.managed().clone(),
            l.chunk_size(),
            Some(source_record(&rec.cache_path)),
        )
        .await
        .map_err(|e| CsiError::from(e).context(&rec.volume_id))
    }

    /// Stages `rec` by pulling it from the node `from` names. Live: the
    /// source keeps writing, the device is held (its I/O waits) until the
    /// controller finalizes. Hand-over: the source no longer writes, so
    /// the region is taken over at once and missing chunks come on demand.
    /// Returns false when a hand-over's source no longer holds the region
    /// (released, restarted, gone): the caller stages from the region
    /// service, which then has every flushed write.
    pub(super) async fn stage_from_peer(
        &self,
        mut rec: VolumeRecord,
        opts: &ConnectOptions,
        from: &MigrateFrom,
    ) -> CsiResult<bool> {
        let _ = opts;
        let id = rec.volume_id.clone();
        if self.cfg.migration.is_none() {
            if from.live {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} is to be migrated live from node {}, but this node plugin has no migration service (--migration-listen)",
                    from.node
                )));
            }
            return Ok(false);
        }
        self.fresh_cache(&id)?;
        rec.migrate_from = Some(PeerSource {
            endpoint: from.endpoint.clone(),
            node: from.node.clone(),
            live: from.live,
        });
        // Recorded before Track: a restart resumes the pull or cleans up.
        self.dir.save(&rec)?;
        let cleanup = |this: &Self| {
            let _ = this.dir.remove(&id);
            let _ = remove_dir(&this.cache_dir(&id));
        };
        let l = match self.open_leech(&rec).await {
            Ok(l) => l,
            Err(e) if !from.live && matches!(e.code(), Code::Unavailable | Code::NotFound) => {
                tracing::warn!(volume = %id, from = %from.node, "the previous node does not hand the region over ({e}); staging from the region service");
                cleanup(self);
                return Ok(false);
            }
            Err(e) => {
                cleanup(self);
                return Err(e);
            }
        };
        if l.size() != rec.size || l.size() % BLOCK_SIZE != 0 {
            let _ = l.abort().await;
            cleanup(self);
            return Err(CsiError::FailedPrecondition(format!(
                "node {} serves {id} with {} bytes; the region has {}",
                from.node,
                l.size(),
                rec.size
            )));
        }
        if !from.live {
            let out = match l.finalize(false).await {
                Ok(o) => o,
                // Gone right after Track: it wrote nothing since it was
                // unstaged, so the region service has every flushed write.
                Err(e) if e.kind() == r3map::ErrorKind::Unavailable => {
                    l.finalize(true).await.map_err(CsiError::from)?
                }
                Err(e) => {
                    let _ = l.abort().await;
                    cleanup(self);
                    return Err(CsiError::from(e).context(&id));
                }
            };
            rec.epoch = out.epoch.unwrap_or(0);
            tracing::info!(volume = %id, from = %from.node, epoch = rec.epoch, dirty = out.dirty_chunks, unpushed = out.unpushed_chunks, "took the region over from the previous node");
        }
        let vol = match self.leech_volume(&rec, &l).await {
            Ok(v) => v,
            Err(e) => {
                let _ = l.abort().await;
                cleanup(self);
                return Err(e);
            }
        };
        // The device's first open scans partitions; let it read now (see
        // first_open), hold again before any application can open it.
        if from.live {
            l.managed().release().await;
        }
        let attached = match self.attach_new(&vol, &mut rec).await {
            Ok(conns) => {
                let index = rec.device_index.unwrap_or(u32::MAX);
                match first_open(index).await {
                    Ok(()) => Ok(conns),
                    Err(e) => {
                        let _ = attach::disconnect(index).await;
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        if from.live {
            l.managed().hold().await;
        }
        let conns = match attached {
            Ok(c) => c,
            Err(e) => {
                drop(vol);
                let _ = l.abort().await;
                cleanup(self);
                return Err(e);
            }
        };
        tracing::info!(volume = %id, index = ?rec.device_index, from = %from.node, live = from.live, "staged from the previous node");
        self.install(rec, Arc::new(vol), conns, Some(l)).await;
        Ok(true)
    }

    /// Stages a volume whose region this node kept after unstaging it: a
    /// new device over the same volume. Returns false (after closing it)
    /// when it cannot be reused: handed over to another node since,
    /// fenced, or staged now with other arguments.
    pub(super) async fn restage_retained(
        &self,
        mut s: Staged,
        r: &NodeStageVolumeRequest,
        region: &str,
        params: &Params,
    ) -> CsiResult<bool> {
        let id = s.rec.volume_id.clone();
        let handed_over = s
            .vol
            .as_ref()
            .is_some_and(|v| v.source().status().finalized);
        let fenced = s
            .vol
            .as_ref()
            .and_then(|v| v.managed())
            .is_some_and(|m| m.fenced().is_some());
        let same = s.rec.region == region && s.rec.params == params.to_context();
        let Some(vol) = s.vol.clone().filter(|_| !handed_over && !fenced && same) else {
            tracing::info!(volume = %id, handed_over, fenced, same, "the kept region cannot be reused; closing it");
            self.close_retained(s).await?;
            return Ok(false);
        };
        // A target that started pulling from here gives way: this node is
        // the writer again (the controller publishes to one node at a time
        // outside a migration).
        let st = vol.source().status();
        if st.session != 0 {
            let _ = vol.source().abort(st.session).await;
        }
        s.rec.retained_until = None;
        s.rec.staging_path = r.staging_target_path.clone();
        s.rec.published.clear();
        s.rec.device_index = None;
        self.dir.save(&s.rec)?;
        let mut rec = s.rec.clone();
        match self.attach_new(&vol, &mut rec).await {
            Ok(conns) => {
                tracing::info!(volume = %id, index = ?rec.device_index, "staged again from the region kept here");
                self.reg.remove_volume(&id);
                self.install(rec, vol, conns, s.leech.take()).await;
                Ok(true)
            }
            Err(e) => {
                // Back to kept: nothing changed for the region.
                s.rec.retained_until = Some(unix_now() + 60);
                let _ = self.dir.save(&s.rec);
                self.staged.lock().await.insert(id, s);
                Err(e)
            }
        }
    }

    /// Keeps an unstaged volume (its device already gone) for the next
    /// node, until released or `retain_for` passes.
    pub(super) async fn retain(&self, mut s: Staged) -> CsiResult<()> {
        let m = self.migration_cfg()?;
        s.rec.retained_until = Some(unix_now() + m.retain_for.as_secs().max(1));
        s.rec.device_index = None;
        s.rec.published.clear();
        s.sup = None;
        self.dir.save(&s.rec)?;
        tracing::info!(volume = %s.rec.volume_id, retain_for = ?m.retain_for, "unstaged; region kept for the next node");
        self.staged.lock().await.insert(s.rec.volume_id.clone(), s);
        Ok(())
    }

    /// Closes a kept volume (pushing what the cache holds unless it was
    /// handed over or fenced) and forgets it.
    pub(super) async fn close_retained(&self, mut s: Staged) -> CsiResult<()> {
        let id = s.rec.volume_id.clone();
        self.reg.remove_volume(&id);
        self.reg.remove_leech(&id);
        s.leech = None;
        self.close_volume(&mut s).await?;
        self.dir.remove(&id)?;
        remove_dir(&self.cache_dir(&id))?;
        remove_dir(&self.creds_dir(&id))?;
        tracing::info!(volume = %id, "closed the kept region");
        Ok(())
    }

    /// Closes kept volumes whose time is up (run every few seconds).
    pub async fn expire_retained(&self) {
        let now = unix_now();
        let due: Vec<String> = self
            .staged
            .lock()
            .await
            .iter()
            .filter(|(_, s)| s.rec.retained_until.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Ok(_g) = self.inflight.try_lock(&id) else {
                continue;
            };
            let Some(s) = self.staged.lock().await.remove(&id) else {
                continue;
            };
            if let Err(e) = self.close_retained(s).await {
                tracing::error!(volume = %id, "closing the kept region failed: {e}");
            }
        }
    }

    /// Runs [`Self::expire_retained`] every few seconds until `stop`.
    pub fn spawn_housekeeping(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let Some(n) = this.upgrade() else { return };
                n.expire_retained().await;
            }
        });
    }

    /// Watches a target's pull: once every chunk is here, the volume is
    /// recorded as an ordinary one at the epoch taken over, and the source
    /// is told to release its copy.
    pub(super) fn watch_leech(&self, id: &str, l: Arc<Leech>) {
        let (id, dir, staged) = (id.to_string(), self.dir.clone(), self.staged.clone());
        let auth = self.cfg.migration.as_ref().map(|m| m.auth.clone());
        let leech = Arc::downgrade(&l);
        drop(l);
        tokio::spawn(async move {
            loop {
                let Some(l) = leech.upgrade() else { return };
                let st = l.status();
                if st.aborted || st.error.is_some() {
                    return;
                }
                if st.complete {
                    break;
                }
                drop(l);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let Some(l) = leech.upgrade() else { return };
            let st = l.status();
            let (peer, cache) = {
                let mut g = staged.lock().await;
                let Some(s) = g.get_mut(&id) else { return };
                let Some(peer) = s.rec.migrate_from.clone() else {
                    return;
                };
                let mut rec = s.rec.clone();
                rec.migrate_from = None;
                rec.epoch = st.epoch.unwrap_or(rec.epoch);
                if let Err(e) = dir.save(&rec) {
                    tracing::error!(volume = %id, "recording the completed migration: {e}");
                    return;
                }
                s.rec = rec;
                (peer, s.rec.cache_path.clone())
            };
            // The chunk states and the record say everything now; the
            // source's finalize answer (if this volume was handed on) goes
            // where an ordinary reopen looks for it.
            let _ = record::remove(&record::record_path(&cache));
            let src = source_record(&cache);
            if src.exists() {
                let _ = std::fs::rename(&src, record::record_path(&cache));
            }
            tracing::info!(volume = %id, epoch = ?st.epoch, took = ?l.completed_after(), "migration complete: every chunk is here");
            drop(l);
            let Some(auth) = auth else { return };
            for attempt in 0..10 {
                let r = async {
                    let mut c = auth.node_client(&peer.endpoint).await?;
                    c.release(csi::nodepb::ReleaseRequest {
                        volume_id: id.clone(),
                    })
                    .await
                    .map_err(CsiError::from)
                }
                .await;
                match r {
                    Ok(_) => {
                        tracing::info!(volume = %id, node = %peer.node, "the previous node released its copy");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(volume = %id, node = %peer.node, attempt, "release: {e}");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
    }

    /// NodeMigration.Status.
    pub async fn migration_status(&self, id: &str) -> MigrationStatus {
        let staged = self.staged.lock().await;
        let Some(s) = staged.get(id) else {
            return migrate::idle_status(id, "none", false);
        };
        let attached = s.rec.device_index.is_some();
        let elapsed_ms = s
            .started
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        if let Some(l) = &s.leech {
            let st = l.status();
            let phase = if st.complete {
                "complete"
            } else if st.finalized {
                "post-copy"
            } else if st.aborted {
                "aborted"
            } else {
                "pre-copy"
            };
            return MigrationStatus {
                volume_id: id.to_string(),
                role: Role::Target as i32,
                phase: phase.into(),
                chunks_present: st.chunks_present,
                chunks_total: st.chunks_total,
                finalized: st.finalized,
                complete: st.complete,
                epoch: st.epoch.unwrap_or(s.rec.epoch),
                error: st.error.unwrap_or_default(),
                attached,
                elapsed_ms,
                completed_after_ms: l
                    .completed_after()
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                finalize_us: 0,
            };
        }
        let phase = if s.rec.retained_until.is_some() {
            "retained"
        } else {
            "serving"
        };
        let mut out = migrate::idle_status(id, phase, attached);
        out.epoch = s.rec.epoch;
        if let Some(v) = &s.vol {
            let st = v.source().status();
            if st.session != 0 || st.finalized {
                out.role = Role::Source as i32;
                out.finalized = st.finalized;
            }
            let p = v.managed().map(|m| m.progress());
            if let Some(p) = p {
                out.chunks_total = p.chunks_total;
                out.chunks_present = p.chunks_local + p.chunks_dirty;
            }
        }
        out
    }

    /// NodeMigration.Finalize on a target: the source is sealed and hands
    /// its last writes over, the region's epoch moves here, the device is
    /// released. Idempotent.
    pub async fn finalize_target(&self, id: &str, seed_lost: bool) -> CsiResult<FinalizeReply> {
        // Not while NodeStage is still setting the device up.
        let _g = self.inflight.try_lock(id)?;
        let l = self.reg.leech(id).ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "volume {id:?} is not being migrated to this node"
            ))
        })?;
        let t = Instant::now();
        let out = match l.finalize(seed_lost).await {
            Ok(o) => o,
            Err(e) if !seed_lost && e.kind() == r3map::ErrorKind::Unavailable => {
                return Err(CsiError::Unavailable(format!(
                    "finalizing {id}: the source node does not answer: {e}"
                )))
            }
            Err(e) => return Err(CsiError::from(e).context(id)),
        };
        let epoch = out.epoch.unwrap_or(0);
        let mut staged = self.staged.lock().await;
        if let Some(s) = staged.get_mut(id) {
            if s.rec.epoch != epoch && epoch != 0 {
                let mut rec = s.rec.clone();
                rec.epoch = epoch;
                self.dir.save(&rec)?;
                s.rec = rec;
            }
        }
        tracing::info!(volume = %id, epoch, dirty = out.dirty_chunks, unpushed = out.unpushed_chunks, seed_lost = out.seed_lost, took = ?t.elapsed(), "finalized: the region is written here now");
        Ok(FinalizeReply {
            dirty_chunks: out.dirty_chunks,
            unpushed_chunks: out.unpushed_chunks,
            elapsed_us: out.elapsed_us,
            seed_lost: out.seed_lost,
            epoch,
        })
    }

    /// NodeMigration.Abort: a target gives its pull up (before finalize);
    /// a source stops tracking for a target that is gone.
    pub async fn abort_migration(&self, id: &str) -> CsiResult<()> {
        let _g = self.inflight.try_lock(id)?;
        if let Some(l) = self.reg.leech(id) {
            if l.status().finalized {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} was finalized here: the region lives on this node now"
                )));
            }
            l.abort().await.map_err(CsiError::from)?;
            tracing::info!(volume = %id, "migration to this node aborted");
            return Ok(());
        }
        if let Some(v) = self.reg.volume(id) {
            let st = v.source().status();
            if st.session != 0 && !st.finalized {
                v.source().abort(st.session).await.map_err(CsiError::from)?;
                tracing::info!(volume = %id, "stopped tracking for a target that gave up");
            }
        }
        Ok(())
    }

    /// NodeMigration.Release: the next node holds every chunk; close the
    /// region kept here. A volume staged here with a device is still in
    /// use and stays.
    pub async fn release_retained(&self, id: &str) -> CsiResult<()> {
        let _g = self.inflight.try_lock(id)?;
        let s = {
            let mut staged = self.staged.lock().await;
            match staged.get(id) {
                None => return Ok(()),
                Some(s) if s.rec.retained_until.is_none() => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id:?} is staged on this node with a device; not releasing it"
                    )))
                }
                Some(_) => staged.remove(id).expect("present"),
            }
        };
        self.close_retained(s).await
    }

    /// Opens the volume of a record found at startup: a target resumes
    /// its pull (and a hand-over cut short is finalized now); anything
    /// else reopens its cache at the recorded epoch.
    pub(super) async fn open_recorded(
        &self,
        rec: &VolumeRecord,
    ) -> CsiResult<(Volume, Option<Arc<Leech>>)> {
        let Some(peer) = &rec.migrate_from else {
            // A pull completed before the restart may have left the
            // leech's record beside the cache; the volume record says all.
            let rp = record::record_path(&rec.cache_path);
            if let Ok(b) = std::fs::read(&rp) {
                if String::from_utf8_lossy(&b).contains("\"destination\"") {
                    let _ = record::remove(&rp);
                }
            }
            return Ok((self.reopen(rec).await?, None));
        };
        let l = self.open_leech(rec).await?;
        if !peer.live && !l.status().finalized {
            l.finalize(false).await.map_err(CsiError::from)?;
        }
        let vol = self.leech_volume(rec, &l).await?;
        Ok((vol, Some(l)))
    }

    /// Recovers a kept volume at startup (no device): reopened, reachable
    /// by the next node again, with a fresh deadline.
    pub(super) async fn recover_retained(&self, mut rec: VolumeRecord) -> CsiResult<()> {
        let (vol, leech) = self.open_recorded(&rec).await?;
        let vol = Arc::new(vol);
        self.reg.insert_volume(&rec.volume_id, vol.clone());
        if let Some(l) = &leech {
            self.reg.insert_leech(&rec.volume_id, l.clone());
            self.watch_leech(&rec.volume_id, l.clone());
        }
        rec.device_index = None;
        let s = Staged {
            rec,
            vol: Some(vol),
            sup: None,
            broken: None,
            leech,
            started: None,
        };
        self.retain(s).await
    }
}
