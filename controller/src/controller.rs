//! The Controller service: volumes are regions of the region service; the
//! records of names, sizes, parameters and published nodes live in a
//! [`Records`] store (the state file, or R3mapVolume objects).
//!
//! With leader election on, only the leader changes anything: a replica
//! that does not lead answers every mutating call with UNAVAILABLE, which
//! the sidecars retry.
//!
//! Node ids cannot be checked against the cluster without Kubernetes:
//! only their syntax is validated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use csi::capabilities;
use csi::pb::controller_server::Controller;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use csi::trace::traced;
use csi::validate;
use csi::{Credentials, CsiError, CsiResult, InFlight, Params};
use tonic::{Code, Request, Response, Status};

use crate::leader::Leader;
use crate::migrate::{self, Peers, UnpublishStep};
use crate::records::Records;
use crate::region::{region_id, Regions, ID_PREFIX};
use crate::state::VolumeRecord;

/// Size of a volume whose request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// volume_context key of the region id.
pub const CTX_REGION: &str = "regionId";

/// The Controller service.
pub struct ControllerService {
    records: Arc<dyn Records>,
    leader: Option<Leader>,
    regions: Arc<Regions>,
    inflight: InFlight,
    max_size: u64,
    hold: Duration,
    peers: Option<Arc<Peers>>,
}

/// The one conversion of a result to a gRPC answer (tonic's signatures
/// return the large `Status`).
#[allow(clippy::result_large_err)]
fn ok<T>(r: CsiResult<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl ControllerService {
    /// A service over `records`; with `leader`, mutating calls are served
    /// only while it leads. `hold` keeps each mutating call's guard that
    /// much longer (tests of concurrent calls only).
    pub fn new(
        records: Arc<dyn Records>,
        leader: Option<Leader>,
        regions: Arc<Regions>,
        max_size: u64,
        hold: Duration,
    ) -> CsiResult<ControllerService> {
        Ok(ControllerService {
            records,
            leader,
            regions,
            inflight: InFlight::new(),
            max_size,
            hold,
            peers: None,
        })
    }

    /// Migrates volumes between nodes through `peers` (without, a
    /// volume moves by closing it on the old node and staging it anew).
    pub fn with_peers(mut self, peers: Arc<Peers>) -> Self {
        self.peers = Some(peers);
        self
    }

    async fn hold(&self) {
        if !self.hold.is_zero() {
            tokio::time::sleep(self.hold).await;
        }
    }

    /// Refuses a mutating call on a replica that does not lead.
    fn must_lead(&self) -> CsiResult<()> {
        match &self.leader {
            Some(l) if !l.is_leader() => Err(CsiError::Unavailable(format!(
                "{} is not the leading controller replica",
                l.identity()
            ))),
            _ => Ok(()),
        }
    }

    async fn record(&self, id: &str) -> CsiResult<Option<VolumeRecord>> {
        self.records.get(id).await
    }

    async fn need_record(&self, id: &str) -> CsiResult<VolumeRecord> {
        self.record(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id:?} does not exist")))
    }

    fn volume(id: &str, r: &VolumeRecord) -> Volume {
        let mut ctx: std::collections::HashMap<String, String> =
            r.params.clone().into_iter().collect();
        ctx.insert(CTX_REGION.to_string(), id.to_string());
        Volume {
            capacity_bytes: i64_of(r.size),
            volume_id: id.to_string(),
            volume_context: ctx,
            ..Default::default()
        }
    }

    /// The size to provision for `range` with `chunk`-sized rounding.
    fn size_for(&self, range: Option<&CapacityRange>, chunk: u64) -> CsiResult<u64> {
        let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
        if req < 0 || lim < 0 {
            return Err(CsiError::InvalidArgument(format!(
                "capacity_range has a negative value (required {req}, limit {lim})"
            )));
        }
        let (req, lim) = (req as u64, lim as u64);
        if lim > 0 && req > lim {
            return Err(CsiError::InvalidArgument(format!(
                "capacity_range required_bytes {req} exceeds limit_bytes {lim}"
            )));
        }
        let want = if req > 0 {
            req
        } else if lim > 0 {
            lim.min(DEFAULT_SIZE)
        } else {
            DEFAULT_SIZE
        };
        let mut size = want.div_ceil(chunk).saturating_mul(chunk);
        if lim > 0 && size > lim {
            size = lim / chunk * chunk;
            if size < req.max(1) {
                return Err(CsiError::OutOfRange(format!(
                    "no multiple of the chunk size {chunk} lies in [{req}, {lim}]"
                )));
            }
        }
        if size > self.max_size {
            return Err(CsiError::OutOfRange(format!(
                "{size} bytes exceeds the largest volume, {} bytes",
                self.max_size
            )));
        }
        Ok(size)
    }

    fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
        let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
        size >= req.max(0) as u64 && (lim <= 0 || size <= lim as u64)
    }

    async fn create(&self, r: CreateVolumeRequest) -> CsiResult<CreateVolumeResponse> {
        validate::required("name", &r.name)?;
        if r.name.chars().any(|c| c.is_control() && !c.is_whitespace()) {
            return Err(CsiError::InvalidArgument(
                "name has control characters".into(),
            ));
        }
        capabilities::check(&r.volume_capabilities).map_err(CsiError::InvalidArgument)?;
        if r.volume_content_source.is_some() {
            return Err(CsiError::InvalidArgument(
                "volume_content_source is not supported (no snapshots or clones)".into(),
            ));
        }
        let params = Params::from_map(&r.parameters)?;
        let creds = Credentials::from_secrets(&r.secrets)?;
        let ctx = params.to_context();
        let id = region_id(&r.name);
        self.must_lead()?;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        if let Some(rec) = self.record(&id).await? {
            if rec.name != r.name {
                return Err(CsiError::Internal(format!(
                    "region id {id} of {:?} is recorded for {:?}",
                    r.name, rec.name
                )));
            }
            if !Self::fits(rec.size, r.capacity_range.as_ref()) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists with {} bytes, outside the requested capacity range",
                    r.name, rec.size
                )));
            }
            if rec.params != ctx {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists with other parameters",
                    r.name
                )));
            }
            return Ok(CreateVolumeResponse {
                volume: Some(Self::volume(&id, &rec)),
            });
        }
        let size = self.size_for(r.capacity_range.as_ref(), params.chunk_size)?;
        let client = self.regions.client(&creds).await?;
        // Created before it is recorded: a crash in between leaves a region
        // that the retried call finds (same id and size: idempotent).
        let region = client
            .create_region(Some(&id), size)
            .await
            .map_err(|s| CsiError::from(s).context(&r.name))?;
        let rec = VolumeRecord {
            name: r.name.clone(),
            size: region.size,
            params: ctx,
            published: BTreeMap::new(),
            access_mode: r
                .volume_capabilities
                .first()
                .and_then(capabilities::mode)
                .map(|m| m.as_str_name().to_string()),
            ..VolumeRecord::default()
        };
        // Kept when a record appeared meanwhile (another replica that led
        // before): the region is the same, so is the record.
        self.records
            .update(&id, &|cur| {
                Some(cur.cloned().unwrap_or_else(|| rec.clone()))
            })
            .await?;
        tracing::info!(volume = %id, size, "created");
        Ok(CreateVolumeResponse {
            volume: Some(Self::volume(&id, &rec)),
        })
    }

    async fn delete(&self, r: DeleteVolumeRequest) -> CsiResult<DeleteVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let creds = Credentials::from_secrets(&r.secrets)?;
        let id = r.volume_id;
        self.must_lead()?;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let rec = self.record(&id).await?;
        if let Some(rec) = &rec {
            if !rec.published.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} is still published to {}",
                    rec.published.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        // The node that wrote it last may keep it for a next node: no
        // longer needed (best effort: it closes it at its deadline anyway).
        if let (Some(owner), Some(p)) = (rec.as_ref().and_then(|r| r.owner.clone()), &self.peers) {
            if let Err(e) = p.release(&owner, &id).await {
                tracing::debug!(volume = %id, %owner, "release before delete: {e}");
            }
        }
        // A region of ours left unrecorded by a crash is deleted too; an id
        // that is not ours is never touched.
        if rec.is_some() || id.starts_with(ID_PREFIX) {
            let client = self.regions.client(&creds).await?;
            match client.delete_region(&id).await {
                Ok(()) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(CsiError::from(s).context(&id)),
            }
        }
        if rec.is_some() {
            self.records.update(&id, &|_| None).await?;
            tracing::info!(volume = %id, "deleted");
        }
        Ok(DeleteVolumeResponse {})
    }

    async fn publish(
        &self,
        r: ControllerPublishVolumeRequest,
    ) -> CsiResult<ControllerPublishVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        validate::node_id(&r.node_id)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        capabilities::check_one(cap).map_err(CsiError::InvalidArgument)?;
        let mode = capabilities::mode(cap).unwrap_or(Mode::Unknown);
        let single = capabilities::is_single_node(mode);
        let id = r.volume_id;
        self.must_lead()?;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let rec = self.need_record(&id).await?;
        let (node, ro) = (r.node_id.clone(), r.readonly);
        let want = migrate::on_publish(&rec, &id, &node, ro, single)?;
        let mut ctx: std::collections::HashMap<String, String> =
            [(CTX_REGION.to_string(), id.clone())].into();
        // A migration to this node needs the source's address; a hand-over
        // without one stages from the region service instead (the old node
        // flushed at unstage), a live one cannot go on.
        let mut plain = false;
        if let Some(m) = want.migration.as_ref().filter(|m| m.target == node) {
            let ep = match &self.peers {
                Some(p) => p.endpoint(&m.source).await?,
                None => None,
            };
            match ep {
                Some(ep) => {
                    if let Some(f) = migrate::migrate_from(&want, &node, &ep) {
                        f.to_context(&mut ctx);
                    }
                }
                None if m.live => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {id:?} is attached to node {}: a second node is a live migration, \
                         and the migration endpoint of node {} is unknown (--node-endpoint, --node-migration-port)",
                        m.source, m.source
                    )))
                }
                None => plain = true,
            }
        }
        // The migration the context above was made for.
        let planned = want
            .migration
            .as_ref()
            .filter(|m| m.target == node && !plain)
            .map(|m| (m.source.clone(), m.live));
        let written = self
            .records
            .update(&id, &|cur| {
                let c = cur?;
                let Ok(mut next) = migrate::on_publish(c, &id, &node, ro, single) else {
                    return Some(c.clone());
                };
                if plain && next.migration.as_ref().is_some_and(|m| m.target == node) {
                    next.migration = None;
                }
                // Re-decided after a conflict on a record that changed
                // meanwhile into another migration (say a hand-over, A
                // detached meanwhile): the context would tell the node
                // something else than the record. Left as it is; the call
                // is refused below and its retry decides anew.
                let now = next
                    .migration
                    .as_ref()
                    .filter(|m| m.target == node)
                    .map(|m| (m.source.clone(), m.live));
                if now != planned {
                    return Some(c.clone());
                }
                Some(next)
            })
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id:?} does not exist")))?;
        if written.published.get(&node) != Some(&ro) {
            return Err(CsiError::Aborted(format!(
                "volume {id:?} changed while it was being published; try again"
            )));
        }
        if written != rec {
            let how = written
                .migration
                .as_ref()
                .filter(|m| m.target == node)
                .map(|m| format!("migration from node {} (live: {})", m.source, m.live));
            tracing::info!(volume = %id, node = %r.node_id, migration = ?how, "published");
        }
        Ok(ControllerPublishVolumeResponse {
            publish_context: ctx,
        })
    }

    async fn unpublish(
        &self,
        r: ControllerUnpublishVolumeRequest,
    ) -> CsiResult<ControllerUnpublishVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        if !r.node_id.is_empty() {
            validate::node_id(&r.node_id)?;
        }
        let id = r.volume_id;
        self.must_lead()?;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let rec = self.need_record(&id).await?;
        let node = r.node_id.clone();
        let gone = if node.is_empty() {
            !rec.published.is_empty()
        } else {
            rec.published.contains_key(&node)
        };
        if !gone {
            return Ok(ControllerUnpublishVolumeResponse {});
        }
        // The target being unpublished turned out to be finalized (at
        // this epoch).
        let mut finalized_here = None;
        let epoch = match (migrate::unpublish_step(&rec, &node), &self.peers) {
            (UnpublishStep::Finalize { target }, Some(p)) => {
                let source = rec.migration.as_ref().map(|m| m.source.clone());
                Some(self.finalize_on(p, &target, source.as_deref(), &id).await?)
            }
            (UnpublishStep::Finalize { target }, None) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} is being migrated to node {target}, and this controller \
                     cannot reach nodes to finalize (--node-endpoint, --node-migration-port)"
                )))
            }
            (UnpublishStep::RollBack { source, target }, Some(p)) => {
                // Normally the target's NodeUnstage gave its pull up
                // already; if it cannot be asked, the source stops
                // tracking for it.
                match p.abort(&target, &id).await {
                    Ok(()) => None,
                    Err(e) if e.code() == Code::FailedPrecondition => {
                        // Finalized already, by an unpublish of the source
                        // whose record write was lost: the region lives
                        // on the target now, so this is no roll-back.
                        let st = p.status(&target, &id).await?;
                        if !st.finalized {
                            return Err(e);
                        }
                        tracing::warn!(volume = %id, %target, epoch = st.epoch, "the target was finalized already; recording that, not a roll-back");
                        finalized_here = Some((target.clone(), st.epoch));
                        None
                    }
                    Err(e) => {
                        tracing::warn!(volume = %id, %target, "abort on the target: {e}");
                        if let Err(e) = p.abort(&source, &id).await {
                            tracing::warn!(volume = %id, %source, "abort on the source: {e}");
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        self.records
            .update(&id, &|cur| {
                cur.map(|c| match &finalized_here {
                    Some((target, e)) => {
                        migrate::on_unpublish(&migrate::on_finalized(c, target, *e), &node, None)
                    }
                    None => migrate::on_unpublish(c, &node, epoch),
                })
            })
            .await?;
        tracing::info!(volume = %id, node = %r.node_id, finalized_at = ?epoch, "unpublished");
        Ok(ControllerUnpublishVolumeResponse {})
    }

    /// Finalizes a live migration on its target. A target that answers
    /// that the source does not (the source node died) is finalized
    /// without it: every chunk then comes from the region service, which
    /// holds every write the source flushed, and fencing keeps the dead
    /// node's late writes out. But only when this controller cannot reach
    /// the source either: a source that answers us is alive behind a
    /// partition between the two nodes, and finalizing without it would
    /// drop the writes it has not pushed yet; the attacher retries instead.
    async fn finalize_on(
        &self,
        p: &Peers,
        target: &str,
        source: Option<&str>,
        id: &str,
    ) -> CsiResult<u64> {
        match p.finalize(target, id, false).await {
            Ok(r) => Ok(r.epoch),
            Err(e) if e.code() == Code::Unavailable => {
                if let Err(e2) = p.status(target, id).await {
                    // The target itself is out of reach: the attacher
                    // retries.
                    return Err(CsiError::Unavailable(format!(
                        "finalizing the migration of {id} on node {target}: {e2}"
                    )));
                }
                if let Some(src) = source {
                    if p.status(src, id).await.is_ok() {
                        return Err(CsiError::Unavailable(format!(
                            "finalizing the migration of {id}: node {target} cannot reach the source \
                             node {src}, but this controller can (a partition between the nodes); \
                             finalizing without the source would lose its unpushed writes, so not yet: {e}"
                        )));
                    }
                }
                tracing::warn!(volume = %id, %target, "the source does not answer ({e}); finalizing from the region service");
                Ok(p.finalize(target, id, true).await?.epoch)
            }
            Err(e) => Err(e),
        }
    }

    async fn validate_caps(
        &self,
        r: ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<ValidateVolumeCapabilitiesResponse> {
        validate::volume_id(&r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let rec = self.need_record(&r.volume_id).await?;
        if let Err(m) = capabilities::check(&r.volume_capabilities) {
            return Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: m,
            });
        }
        if !r.parameters.is_empty() {
            match Params::from_map(&r.parameters) {
                Ok(p) if p.to_context() == rec.params => {}
                Ok(_) => {
                    return Ok(ValidateVolumeCapabilitiesResponse {
                        confirmed: None,
                        message: "parameters differ from the volume's".into(),
                    })
                }
                Err(e) => {
                    return Ok(ValidateVolumeCapabilitiesResponse {
                        confirmed: None,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                ..Default::default()
            }),
            message: String::new(),
        })
    }

    /// The condition of one volume, from the region service, with the
    /// migration in progress if any.
    async fn condition(&self, id: &str, rec: &VolumeRecord) -> VolumeCondition {
        let mut c = self.region_condition(id, rec).await;
        if let Some(m) = &rec.migration {
            c.message = format!(
                "{}; migrating from node {} to node {} ({}, {:?}, {}/{} chunks)",
                c.message,
                m.source,
                m.target,
                if m.live { "live" } else { "hand-over" },
                m.phase,
                m.chunks_present,
                m.chunks_total
            );
        }
        c
    }

    async fn region_condition(&self, id: &str, rec: &VolumeRecord) -> VolumeCondition {
        let (abnormal, message) = match self.regions.client(&Credentials::default()).await {
            Err(e) => (true, format!("region service unreachable: {e}")),
            Ok(c) => match c.get_region(id).await {
                Ok(reg) if reg.size == rec.size => (false, "region present".to_string()),
                Ok(reg) => (
                    true,
                    format!("region has {} bytes, volume {}", reg.size, rec.size),
                ),
                Err(s) if s.code() == Code::NotFound => {
                    (true, "region missing from the region service".to_string())
                }
                Err(s) => (true, format!("region service: {}", s.message())),
            },
        };
        VolumeCondition { abnormal, message }
    }

    async fn list(&self, r: ListVolumesRequest) -> CsiResult<ListVolumesResponse> {
        if r.max_entries < 0 {
            return Err(CsiError::InvalidArgument(format!(
                "max_entries {} is negative",
                r.max_entries
            )));
        }
        let all: Vec<(String, VolumeRecord)> = self.records.list().await?.into_iter().collect();
        // The token is the id of the first volume of the next page: ids are
        // sorted, so a page still starts in the right place when volumes
        // were deleted or added meanwhile.
        let start = if r.starting_token.is_empty() {
            0
        } else if validate::volume_id(&r.starting_token).is_ok()
            && r.starting_token.starts_with(ID_PREFIX)
        {
            all.partition_point(|(id, _)| id.as_str() < r.starting_token.as_str())
        } else {
            return Err(CsiError::Aborted(format!(
                "starting_token {:?} was not made by this plugin; list again from the start",
                r.starting_token
            )));
        };
        let n = if r.max_entries == 0 {
            all.len()
        } else {
            r.max_entries as usize
        };
        let end = (start + n).min(all.len());
        let mut entries = Vec::with_capacity(end - start);
        for (id, rec) in &all[start..end] {
            entries.push(list_volumes_response::Entry {
                volume: Some(Self::volume(id, rec)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: rec.published.keys().cloned().collect(),
                    volume_condition: Some(self.condition(id, rec).await),
                }),
            });
        }
        Ok(ListVolumesResponse {
            entries,
            next_token: if end < all.len() {
                all[end].0.clone()
            } else {
                String::new()
            },
        })
    }

    async fn capacity(&self, r: GetCapacityRequest) -> CsiResult<GetCapacityResponse> {
        if !r.parameters.is_empty() {
            Params::from_map(&r.parameters)?;
        }
        if !r.volume_capabilities.is_empty() && capabilities::check(&r.volume_capabilities).is_err()
        {
            return Ok(GetCapacityResponse::default());
        }
        // The region service reports no free space: the largest volume is
        // the one limit known here.
        Ok(GetCapacityResponse {
            available_capacity: i64_of(self.max_size),
            maximum_volume_size: Some(i64_of(self.max_size)),
            minimum_volume_size: None,
        })
    }

    async fn expand(
        &self,
        r: ControllerExpandVolumeRequest,
    ) -> CsiResult<ControllerExpandVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("capacity_range is required".into()))?;
        if let Some(cap) = &r.volume_capability {
            capabilities::check_one(cap).map_err(CsiError::InvalidArgument)?;
        }
        let creds = Credentials::from_secrets(&r.secrets)?;
        let id = r.volume_id.clone();
        self.must_lead()?;
        let _g = self.inflight.try_lock(&id)?;
        self.hold().await;
        let rec = self.need_record(&id).await?;
        let params = Params::parse(&rec.params)?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(CsiError::InvalidArgument(
                "capacity_range needs required_bytes or limit_bytes".into(),
            ));
        }
        let size = if Self::fits(rec.size, Some(range)) && range.required_bytes > 0 {
            rec.size
        } else {
            self.size_for(Some(range), params.chunk_size)?
        };
        if size > rec.size {
            let client = self.regions.client(&creds).await?;
            let reg = client
                .resize_region(&id, size)
                .await
                .map_err(|s| CsiError::from(s).context(&id))?;
            let new = reg.size;
            self.records
                .update(&id, &|cur| {
                    cur.cloned().map(|mut v| {
                        v.size = v.size.max(new);
                        v
                    })
                })
                .await?;
            tracing::info!(volume = %id, from = rec.size, to = reg.size, "expanded");
        }
        let now = self.record(&id).await?.map_or(size, |v| v.size);
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: i64_of(now.max(rec.size)),
            node_expansion_required: true,
        })
    }

    async fn get(&self, r: ControllerGetVolumeRequest) -> CsiResult<ControllerGetVolumeResponse> {
        validate::volume_id(&r.volume_id)?;
        let rec = self.need_record(&r.volume_id).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(Self::volume(&r.volume_id, &rec)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: rec.published.keys().cloned().collect(),
                volume_condition: Some(self.condition(&r.volume_id, &rec).await),
            }),
        })
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let name = r.name.clone();
        ok(traced("CreateVolume", &name, self.create(r)).await)
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("DeleteVolume", &id, self.delete(r)).await)
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("ControllerPublishVolume", &id, self.publish(r)).await)
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("ControllerUnpublishVolume", &id, self.unpublish(r)).await)
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("ValidateVolumeCapabilities", &id, self.validate_caps(r)).await)
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        ok(traced("ListVolumes", "", self.list(req.into_inner())).await)
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        ok(traced("GetCapacity", "", self.capacity(req.into_inner())).await)
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: capabilities::controller(),
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("ControllerExpandVolume", &id, self.expand(r)).await)
    }

    async fn create_snapshot(
        &self,
        _: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not supported"))
    }

    async fn controller_list_volume_health(
        &self,
        _: Request<ControllerListVolumeHealthRequest>,
    ) -> Result<Response<ControllerListVolumeHealthResponse>, Status> {
        Err(Status::unimplemented(
            "volume health is not supported (no LIST_VOLUME_HEALTH capability)",
        ))
    }

    async fn controller_get_volume_health(
        &self,
        _: Request<ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<ControllerGetVolumeHealthResponse>, Status> {
        Err(Status::unimplemented(
            "volume health is not supported (no GET_VOLUME_HEALTH capability)",
        ))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volume modification is not supported (no MODIFY_VOLUME capability)",
        ))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        ok(traced("ControllerGetVolume", &id, self.get(r)).await)
    }
}
