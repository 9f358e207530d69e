//! Where the controller keeps its per-volume records: behind [`Records`],
//! either the state file ([`FileRecords`], one host, the default) or
//! `R3mapVolume` objects in the Kubernetes API ([`KubeRecords`]).
//!
//! Every change is a read-modify-write of one record through a pure
//! function of the current record ([`Records::update`]): when the API
//! server refuses a write because the object changed meanwhile (409
//! Conflict), the store reads it again and applies the same function to
//! what is there now. So two writers that each add an attachment both end
//! up recorded, instead of the later one overwriting the earlier.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Mutex;

use csi::{CsiError, CsiResult};

use crate::crd::{
    Attachment, MigrationPhase, R3mapVolume, R3mapVolumeSpec, R3mapVolumeStatus, VolumeParameters,
};
use crate::state::{Migration, State, StateFile, VolumeRecord};

/// A change of one record: the record wanted, given the current one
/// (`None`: absent). Called again after a conflict, so it must depend on
/// its argument only.
pub type Change<'a> = &'a (dyn Fn(Option<&VolumeRecord>) -> Option<VolumeRecord> + Send + Sync);

/// The controller's records of its volumes, by volume id.
#[async_trait]
pub trait Records: Send + Sync {
    /// The record of `id`, if any.
    async fn get(&self, id: &str) -> CsiResult<Option<VolumeRecord>>;
    /// Every record, sorted by id.
    async fn list(&self) -> CsiResult<BTreeMap<String, VolumeRecord>>;
    /// Replaces the record of `id` by `f(current)` (`None` deletes it) and
    /// returns what is recorded afterwards. Nothing is written when `f`
    /// returns the current record.
    async fn update(&self, id: &str, f: Change<'_>) -> CsiResult<Option<VolumeRecord>>;
}

/// The records in the state file ([`crate::state`]), cached in memory:
/// this process is the file's one writer.
pub struct FileRecords {
    file: StateFile,
    state: Mutex<State>,
}

impl FileRecords {
    /// Loads the state file under `dir`.
    pub fn open(dir: &std::path::Path) -> CsiResult<FileRecords> {
        let file = StateFile::open(dir)?;
        let state = file.load()?;
        Ok(FileRecords {
            file,
            state: Mutex::new(state),
        })
    }
}

#[async_trait]
impl Records for FileRecords {
    async fn get(&self, id: &str) -> CsiResult<Option<VolumeRecord>> {
        Ok(self.state.lock().await.volumes.get(id).cloned())
    }

    async fn list(&self) -> CsiResult<BTreeMap<String, VolumeRecord>> {
        Ok(self.state.lock().await.volumes.clone())
    }

    async fn update(&self, id: &str, f: Change<'_>) -> CsiResult<Option<VolumeRecord>> {
        let mut st = self.state.lock().await;
        let cur = st.volumes.get(id);
        let want = f(cur);
        if want.as_ref() == cur {
            return Ok(want);
        }
        // The in-memory state changes only when the file did.
        let mut next = st.clone();
        match &want {
            Some(r) => next.volumes.insert(id.to_string(), r.clone()),
            None => next.volumes.remove(id),
        };
        self.file.save(&next)?;
        *st = next;
        Ok(want)
    }
}

/// What changed between two versions of a record: one Event each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The volume was provisioned.
    Created,
    /// The volume was deleted.
    Deleted,
    /// Published to a node.
    Attached {
        /// CSI node id.
        node: String,
        /// Read-only.
        read_only: bool,
    },
    /// Unpublished from a node.
    Detached {
        /// CSI node id.
        node: String,
    },
    /// The size changed.
    Resized {
        /// Old size in bytes.
        from: u64,
        /// New size in bytes.
        to: u64,
    },
    /// A migration started.
    MigrationStarted {
        /// Node pulled from.
        source: String,
        /// Node pulling.
        target: String,
        /// Live, or a hand-over.
        live: bool,
    },
    /// Finalized: the target writes the region now.
    Finalized {
        /// The new writer.
        target: String,
        /// The epoch it took the region over at.
        epoch: u64,
    },
    /// The target left before finalize; the source serves on.
    RolledBack {
        /// The target that left.
        target: String,
    },
    /// Every chunk is on the target; the source released its copy.
    MigrationComplete {
        /// The node that holds the region.
        target: String,
    },
}

impl Transition {
    /// Every transition from `old` to `new`.
    pub fn between(old: Option<&VolumeRecord>, new: Option<&VolumeRecord>) -> Vec<Transition> {
        let empty = BTreeMap::new();
        let mut out = Vec::new();
        match (old, new) {
            (None, Some(_)) => out.push(Transition::Created),
            (Some(_), None) => out.push(Transition::Deleted),
            (Some(o), Some(n)) if o.size != n.size => out.push(Transition::Resized {
                from: o.size,
                to: n.size,
            }),
            _ => {}
        }
        let before = old.map_or(&empty, |r| &r.published);
        let after = new.map_or(&empty, |r| &r.published);
        for (node, ro) in after {
            if before.get(node) != Some(ro) {
                out.push(Transition::Attached {
                    node: node.clone(),
                    read_only: *ro,
                });
            }
        }
        for node in before.keys() {
            if !after.contains_key(node) && new.is_some() {
                out.push(Transition::Detached { node: node.clone() });
            }
        }
        let (om, nm) = (
            old.and_then(|r| r.migration.as_ref()),
            new.and_then(|r| r.migration.as_ref()),
        );
        match (om, nm) {
            (None, Some(m)) => out.push(Transition::MigrationStarted {
                source: m.source.clone(),
                target: m.target.clone(),
                live: m.live,
            }),
            (Some(o), Some(m)) if o.target != m.target || o.source != m.source => {
                out.push(Transition::MigrationStarted {
                    source: m.source.clone(),
                    target: m.target.clone(),
                    live: m.live,
                })
            }
            (Some(o), Some(m))
                if o.phase == MigrationPhase::PreCopy && m.phase == MigrationPhase::PostCopy =>
            {
                out.push(Transition::Finalized {
                    target: m.target.clone(),
                    epoch: m.epoch,
                })
            }
            (Some(o), None) if new.is_some() => {
                if o.phase == MigrationPhase::PreCopy {
                    out.push(Transition::RolledBack {
                        target: o.target.clone(),
                    })
                } else {
                    out.push(Transition::MigrationComplete {
                        target: o.target.clone(),
                    })
                }
            }
            _ => {}
        }
        out
    }

    /// Reason (CamelCase), action and note of its Event.
    fn event(&self, id: &str) -> (&'static str, &'static str, String) {
        match self {
            Transition::Created => ("Provisioned", "CreateVolume", format!("created {id}")),
            Transition::Deleted => ("Deleted", "DeleteVolume", format!("deleted {id}")),
            Transition::Attached { node, read_only } => (
                "Attached",
                "ControllerPublishVolume",
                format!("published to node {node} (read-only: {read_only})"),
            ),
            Transition::Detached { node } => (
                "Detached",
                "ControllerUnpublishVolume",
                format!("unpublished from node {node}"),
            ),
            Transition::Resized { from, to } => (
                "Resized",
                "ControllerExpandVolume",
                format!("expanded from {from} to {to} bytes"),
            ),
            Transition::MigrationStarted {
                source,
                target,
                live,
            } => (
                "MigrationStarted",
                "ControllerPublishVolume",
                format!(
                    "{} from node {source} to node {target}",
                    if *live { "live pre-copy" } else { "hand-over" }
                ),
            ),
            Transition::Finalized { target, epoch } => (
                "MigrationFinalized",
                "ControllerUnpublishVolume",
                format!("node {target} writes the region now (epoch {epoch})"),
            ),
            Transition::RolledBack { target } => (
                "MigrationRolledBack",
                "ControllerUnpublishVolume",
                format!("node {target} left before finalize; the source serves on"),
            ),
            Transition::MigrationComplete { target } => (
                "MigrationComplete",
                "Reconcile",
                format!("every chunk is on node {target}"),
            ),
        }
    }
}

/// Settings of [`KubeRecords`].
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// The region service recorded in every new volume's spec.
    pub region_service: String,
    /// Namespace of the Events (R3mapVolumes are cluster-scoped; Events
    /// are not): the controller's own.
    pub events_namespace: String,
    /// `reportingController` of the Events.
    pub reporter: String,
    /// `reportingInstance` of the Events (the pod name).
    pub instance: String,
    /// Writes retried after a conflict or a server error before giving up.
    pub max_retries: u32,
    /// First pause between retries (doubled each time, at most 1 s).
    pub backoff: Duration,
    /// Counts each retried write (`/metrics`).
    pub write_retries: crate::metrics::WriteRetries,
}

impl KubeOptions {
    /// Defaults for a region service.
    pub fn new(region_service: &str) -> KubeOptions {
        KubeOptions {
            region_service: region_service.to_string(),
            events_namespace: "default".into(),
            reporter: "r3map.csi.r3map.io/controller".into(),
            instance: "r3map-csi-controller".into(),
            max_retries: 8,
            backoff: Duration::from_millis(10),
            write_retries: Default::default(),
        }
    }
}

/// The records as `R3mapVolume` objects.
pub struct KubeRecords {
    api: Api<R3mapVolume>,
    events: Api<Event>,
    opts: KubeOptions,
}

/// The object name of volume `id`: the id itself when it is a DNS-1123
/// subdomain (every id this controller makes from a lowercase PV name),
/// else a sanitized form with a hash of the id, so that two ids never
/// share a name. The spec keeps the real id, checked on every read.
pub fn object_name(id: &str) -> String {
    let valid = !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.as_bytes()[id.len() - 1].is_ascii_alphanumeric();
    if valid {
        return id.to_string();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let s: String = id
        .chars()
        .take(200)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        format!("v-{h:016x}")
    } else {
        format!("{s}-{h:016x}")
    }
}

/// Now, RFC 3339 to the second (what `metav1.Time` holds).
fn now_rfc3339() -> String {
    format!("{:.0}", k8s_openapi::jiff::Timestamp::now())
}

fn parse_err(name: &str, why: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("R3mapVolume {name}: {why}"))
}

/// The record an object holds. Its parameters are rebuilt in canonical
/// volume-context form and checked by the same parser as CreateVolume's.
pub fn record_of(obj: &R3mapVolume) -> CsiResult<(String, VolumeRecord)> {
    let s = &obj.spec;
    let name = obj.name_any();
    let raw = BTreeMap::from([
        (
            csi::params::CHUNK_SIZE.to_string(),
            s.chunk_size.to_string(),
        ),
        (
            csi::params::PULL_WORKERS.to_string(),
            s.parameters.pull_workers.to_string(),
        ),
        (
            csi::params::PUSH_WORKERS.to_string(),
            s.parameters.push_workers.to_string(),
        ),
        (
            csi::params::PUSH_INTERVAL.to_string(),
            s.parameters.push_interval.clone(),
        ),
        (
            csi::params::DURABILITY.to_string(),
            s.parameters.durability.clone(),
        ),
    ]);
    let params = csi::Params::parse(&raw)
        .map_err(|e| parse_err(&name, e))?
        .to_context();
    let published = obj
        .status
        .as_ref()
        .map(|st| {
            st.attachments
                .iter()
                .map(|a| (a.node_id.clone(), a.read_only))
                .collect()
        })
        .unwrap_or_default();
    let owner = obj.status.as_ref().and_then(|st| st.owner_node.clone());
    let migration = obj.status.as_ref().and_then(|st| {
        let live = matches!(st.phase, MigrationPhase::PreCopy | MigrationPhase::PostCopy);
        match (&st.migration_source, &st.migration_target) {
            (Some(source), Some(target)) if live => Some(Migration {
                source: source.clone(),
                target: target.clone(),
                live: st.migration_live,
                phase: st.phase,
                chunks_present: st.chunks_present,
                chunks_total: st.chunks_total,
                // Only a finalized migration has moved the epoch.
                epoch: if st.phase == MigrationPhase::PostCopy {
                    st.epoch
                } else {
                    0
                },
            }),
            _ => None,
        }
    });
    Ok((
        s.region_id.clone(),
        VolumeRecord {
            name: s.volume_name.clone(),
            size: s.size,
            params,
            published,
            access_mode: s.access_mode.clone(),
            owner,
            migration,
        },
    ))
}

/// The spec of a record.
pub fn spec_of(id: &str, rec: &VolumeRecord, region_service: &str) -> CsiResult<R3mapVolumeSpec> {
    let p = csi::Params::parse(&rec.params)?;
    let ctx = p.to_context();
    let get = |k: &str| ctx.get(k).cloned().unwrap_or_default();
    Ok(R3mapVolumeSpec {
        region_id: id.to_string(),
        region_service: region_service.to_string(),
        volume_name: rec.name.clone(),
        size: rec.size,
        chunk_size: p.chunk_size,
        parameters: VolumeParameters {
            pull_workers: u32::try_from(p.pull_workers).unwrap_or(u32::MAX),
            push_workers: u32::try_from(p.push_workers).unwrap_or(u32::MAX),
            push_interval: get(csi::params::PUSH_INTERVAL),
            durability: get(csi::params::DURABILITY),
        },
        access_mode: rec.access_mode.clone(),
    })
}

/// `status` brought in line with `rec`: attachments, the owner node and
/// the Attached condition. Fields the record does not carry (epoch,
/// migration) are kept as they are.
pub fn status_of(
    old: Option<&R3mapVolumeStatus>,
    rec: &VolumeRecord,
    generation: Option<i64>,
) -> R3mapVolumeStatus {
    let mut st = old.cloned().unwrap_or_default();
    st.attachments = rec
        .published
        .iter()
        .map(|(n, ro)| Attachment {
            node_id: n.clone(),
            read_only: *ro,
        })
        .collect();
    st.owner_node = rec.owner.clone();
    match &rec.migration {
        Some(m) => {
            st.phase = m.phase;
            st.migration_source = Some(m.source.clone());
            st.migration_target = Some(m.target.clone());
            st.migration_live = m.live;
            st.chunks_present = m.chunks_present;
            st.chunks_total = m.chunks_total;
            st.progress = format!("{}/{}", m.chunks_present, m.chunks_total);
            if m.epoch > 0 {
                st.epoch = m.epoch;
            }
        }
        None => {
            // The record forgets a migration once it ended; how it ended
            // is what the last phase says.
            st.phase = match st.phase {
                MigrationPhase::PreCopy => MigrationPhase::RolledBack,
                MigrationPhase::PostCopy | MigrationPhase::Finalizing => MigrationPhase::Complete,
                p => p,
            };
            if st.phase == MigrationPhase::Complete {
                st.chunks_present = st.chunks_total;
                st.progress = format!("{}/{}", st.chunks_total, st.chunks_total);
            }
            st.migration_source = None;
            st.migration_target = None;
            st.migration_live = false;
        }
    }
    let now = now_rfc3339();
    if st.condition("Ready").is_none() {
        st.set_condition(
            "Ready",
            true,
            "Provisioned",
            "region created",
            generation,
            &now,
        );
    }
    if rec.published.is_empty() {
        st.set_condition("Attached", false, "Unpublished", "", generation, &now);
    } else {
        let nodes: Vec<&str> = rec.published.keys().map(String::as_str).collect();
        let msg = format!("published to {}", nodes.join(", "));
        st.set_condition("Attached", true, "Published", &msg, generation, &now);
    }
    st
}

/// Whether a failed write is worth re-reading and retrying: a conflict
/// (stale resourceVersion, or a concurrent create/delete), and errors the
/// server says are passing (429, 5xx).
fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 404 | 409 | 429 | 500..=599),
        _ => false,
    }
}

/// A Kubernetes error as a CSI one: the API server down or overloaded is
/// Unavailable (the CO retries); anything else is Internal.
fn csi_err(what: &str, e: kube::Error) -> CsiError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => CsiError::Aborted(format!("{what}: {e}")),
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 => {
            CsiError::Unavailable(format!("{what}: {e}"))
        }
        kube::Error::Api(_) => CsiError::Internal(format!("{what}: {e}")),
        _ => CsiError::Unavailable(format!("{what}: {e}")),
    }
}

impl KubeRecords {
    /// Records through `client`.
    pub fn new(client: Client, opts: KubeOptions) -> KubeRecords {
        KubeRecords {
            api: Api::all(client.clone()),
            events: Api::namespaced(client, &opts.events_namespace),
            opts,
        }
    }

    async fn read(&self, name: &str) -> Result<Option<R3mapVolume>, kube::Error> {
        self.api.get_opt(name).await
    }

    /// One attempt at writing `want` over `cur` (read at its
    /// resourceVersion). Spec and status are separate writes (status is a
    /// subresource); each carries the resourceVersion of the last.
    async fn write(
        &self,
        id: &str,
        name: &str,
        cur: Option<R3mapVolume>,
        want: Option<&VolumeRecord>,
    ) -> Result<(), WriteError> {
        let pp = PostParams::default();
        match (cur, want) {
            (None, None) => Ok(()),
            (None, Some(rec)) => {
                let spec = spec_of(id, rec, &self.opts.region_service).map_err(WriteError::Csi)?;
                let mut obj = R3mapVolume::new(name, spec);
                let made = self.api.create(&pp, &obj).await?;
                obj.metadata = made.metadata.clone();
                obj.status = Some(status_of(None, rec, made.metadata.generation));
                self.api.replace_status(name, &pp, &obj).await?;
                Ok(())
            }
            (Some(o), None) => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: o.metadata.resource_version.clone(),
                        uid: o.metadata.uid.clone(),
                    }),
                    ..DeleteParams::default()
                };
                self.api.delete(name, &dp).await?;
                Ok(())
            }
            (Some(mut o), Some(rec)) => {
                let spec = spec_of(id, rec, &self.opts.region_service).map_err(WriteError::Csi)?;
                // The region service of an existing volume is where its
                // region lives: never rewritten by a controller started
                // with another address.
                let spec = R3mapVolumeSpec {
                    region_service: o.spec.region_service.clone(),
                    ..spec
                };
                if spec != o.spec {
                    o.spec = spec;
                    let status = o.status.take();
                    o = self.api.replace(name, &pp, &o).await?;
                    o.status = status;
                }
                let st = status_of(o.status.as_ref(), rec, o.metadata.generation);
                if o.status.as_ref() != Some(&st) {
                    o.status = Some(st);
                    self.api.replace_status(name, &pp, &o).await?;
                }
                Ok(())
            }
        }
    }

    /// Posts one Event about `name`; a failure is logged, never fatal (the
    /// record is what matters).
    async fn event(&self, obj: Option<&R3mapVolume>, name: &str, id: &str, t: &Transition) {
        let (reason, action, note) = t.event(id);
        let now = k8s_openapi::jiff::Timestamp::now();
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(self.opts.events_namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(action.to_string()),
            reason: Some(reason.to_string()),
            note: Some(note),
            type_: Some("Normal".into()),
            reporting_controller: Some(self.opts.reporter.clone()),
            reporting_instance: Some(self.opts.instance.clone()),
            regarding: Some(ObjectReference {
                api_version: Some(R3mapVolume::api_version(&()).into_owned()),
                kind: Some(R3mapVolume::kind(&()).into_owned()),
                name: Some(name.to_string()),
                uid: obj.and_then(|o| o.metadata.uid.clone()),
                ..ObjectReference::default()
            }),
            ..Event::default()
        };
        if let Err(e) = self.events.create(&PostParams::default(), &ev).await {
            tracing::warn!(volume = %id, reason, "posting the event failed: {e}");
        }
    }
}

/// Why one write attempt failed.
enum WriteError {
    Kube(kube::Error),
    Csi(CsiError),
}

impl From<kube::Error> for WriteError {
    fn from(e: kube::Error) -> Self {
        WriteError::Kube(e)
    }
}

#[async_trait]
impl Records for KubeRecords {
    async fn get(&self, id: &str) -> CsiResult<Option<VolumeRecord>> {
        let name = object_name(id);
        match self
            .read(&name)
            .await
            .map_err(|e| csi_err(&format!("reading R3mapVolume {name}"), e))?
        {
            None => Ok(None),
            Some(o) => {
                let (rid, rec) = record_of(&o)?;
                if rid != id {
                    return Err(parse_err(&name, format!("holds region {rid}, not {id}")));
                }
                Ok(Some(rec))
            }
        }
    }

    async fn list(&self) -> CsiResult<BTreeMap<String, VolumeRecord>> {
        let mut out = BTreeMap::new();
        let mut lp = ListParams::default().limit(500);
        loop {
            let page = self
                .api
                .list(&lp)
                .await
                .map_err(|e| csi_err("listing R3mapVolumes", e))?;
            for o in &page.items {
                // One unreadable object must not hide every other volume.
                match record_of(o) {
                    Ok((id, rec)) => {
                        out.insert(id, rec);
                    }
                    Err(e) => tracing::warn!("skipping: {e}"),
                }
            }
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
                _ => return Ok(out),
            }
        }
    }

    async fn update(&self, id: &str, f: Change<'_>) -> CsiResult<Option<VolumeRecord>> {
        let name = object_name(id);
        let mut pause = self.opts.backoff;
        let mut last = None;
        for attempt in 0..=self.opts.max_retries {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            let obj = self
                .read(&name)
                .await
                .map_err(|e| csi_err(&format!("reading R3mapVolume {name}"), e))?;
            let cur = match &obj {
                None => None,
                Some(o) => {
                    let (rid, rec) = record_of(o)?;
                    if rid != id {
                        return Err(parse_err(&name, format!("holds region {rid}, not {id}")));
                    }
                    // An object whose status was never written (its
                    // creator failed in between) still counts as
                    // differing, so the status gets written now.
                    Some(rec)
                }
            };
            let want = f(cur.as_ref());
            let status_missing = obj.as_ref().is_some_and(|o| o.status.is_none());
            if want == cur && !(status_missing && want.is_some()) {
                return Ok(want);
            }
            match self.write(id, &name, obj.clone(), want.as_ref()).await {
                Ok(()) => {
                    for t in Transition::between(cur.as_ref(), want.as_ref()) {
                        self.event(obj.as_ref(), &name, id, &t).await;
                    }
                    return Ok(want);
                }
                Err(WriteError::Csi(e)) => return Err(e),
                Err(WriteError::Kube(e)) if retryable(&e) => {
                    if let kube::Error::Api(s) = &e {
                        self.opts.write_retries.record(s.code);
                    }
                    tracing::debug!(volume = %id, attempt, "write refused, reading again: {e}");
                    last = Some(e);
                }
                Err(WriteError::Kube(e)) => {
                    return Err(csi_err(&format!("writing R3mapVolume {name}"), e))
                }
            }
        }
        let what = format!(
            "R3mapVolume {name}: still refused after {} attempts",
            self.opts.max_retries + 1
        );
        Err(match last {
            Some(e) => csi_err(&what, e),
            None => CsiError::Aborted(what),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(nodes: &[(&str, bool)]) -> VolumeRecord {
        VolumeRecord {
            name: "pvc-1".into(),
            size: 1 << 20,
            params: csi::Params::default().to_context(),
            published: nodes.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
            access_mode: Some("SINGLE_NODE_WRITER".into()),
            ..VolumeRecord::default()
        }
    }

    #[test]
    fn object_names_are_valid_and_distinct() {
        assert_eq!(object_name("csi-pvc-1-00ff"), "csi-pvc-1-00ff");
        let a = object_name("csi-PVC_1");
        let b = object_name("csi-pvc-1");
        assert_ne!(a, b);
        assert!(a.starts_with("csi-pvc-1-"), "{a}");
        assert_eq!(object_name("__"), format!("v-{}", &object_name("__")[2..]));
        for n in [a, b, object_name("-x-"), object_name("é")] {
            assert!(
                n.len() <= 253 && !n.starts_with('-') && !n.ends_with('-'),
                "{n}"
            );
        }
    }

    #[test]
    fn spec_and_status_round_trip_a_record() {
        let mut r = rec(&[("node-b", true), ("node-a", false)]);
        r.owner = Some("node-a".into());
        let spec = spec_of("csi-x", &r, "rs:7000").unwrap();
        let mut o = R3mapVolume::new("csi-x", spec);
        o.status = Some(status_of(None, &r, Some(1)));
        let (id, back) = record_of(&o).unwrap();
        assert_eq!(id, "csi-x");
        assert_eq!(back, r);
        let st = o.status.unwrap();
        assert_eq!(st.owner_node.as_deref(), Some("node-a"));
        assert_eq!(st.condition("Attached").unwrap().status, "True");
    }

    #[test]
    fn migration_round_trips_and_ends_as_its_phase_says() {
        let mut r = rec(&[("node-a", false), ("node-b", false)]);
        r.owner = Some("node-a".into());
        r.migration = Some(Migration {
            source: "node-a".into(),
            target: "node-b".into(),
            live: true,
            phase: MigrationPhase::PreCopy,
            chunks_present: 3,
            chunks_total: 64,
            epoch: 0,
        });
        let mut o = R3mapVolume::new("csi-x", spec_of("csi-x", &r, "rs:7000").unwrap());
        let mut st = status_of(None, &r, None);
        st.epoch = 7;
        o.status = Some(st.clone());
        assert_eq!(record_of(&o).unwrap().1, r);
        assert_eq!(st.progress, "3/64");
        assert_eq!(st.phase, MigrationPhase::PreCopy);
        // Rolled back: the target left before finalize.
        let mut back = rec(&[("node-a", false)]);
        back.owner = Some("node-a".into());
        let rb = status_of(Some(&st), &back, None);
        assert_eq!(rb.phase, MigrationPhase::RolledBack);
        assert_eq!(rb.epoch, 7);
        assert_eq!(rb.migration_target, None);
        // Finalized, then complete.
        let mut post = r.clone();
        post.published.remove("node-a");
        post.owner = Some("node-b".into());
        let m = post.migration.as_mut().unwrap();
        m.phase = MigrationPhase::PostCopy;
        m.epoch = 8;
        let st2 = status_of(Some(&st), &post, None);
        assert_eq!((st2.epoch, st2.owner_node.as_deref()), (8, Some("node-b")));
        post.migration = None;
        let done = status_of(Some(&st2), &post, None);
        assert_eq!(done.phase, MigrationPhase::Complete);
        assert_eq!(done.progress, "64/64");
        let st = status_of(Some(&done), &rec(&[]), None);
        assert_eq!(st.owner_node, None);
        assert_eq!(st.condition("Attached").unwrap().status, "False");
    }

    #[test]
    fn transitions_name_each_change() {
        let a = rec(&[("n1", false)]);
        let mut b = rec(&[("n2", true)]);
        b.size = 2 << 20;
        assert_eq!(
            Transition::between(Some(&a), Some(&b)),
            vec![
                Transition::Resized {
                    from: 1 << 20,
                    to: 2 << 20
                },
                Transition::Attached {
                    node: "n2".into(),
                    read_only: true
                },
                Transition::Detached { node: "n1".into() },
            ]
        );
        assert_eq!(Transition::between(None, Some(&a))[0], Transition::Created);
        assert_eq!(
            Transition::between(Some(&a), None),
            vec![Transition::Deleted]
        );
    }
}
