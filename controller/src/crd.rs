//! The `R3mapVolume` custom resource (`r3map.io/v1alpha1`, cluster-scoped):
//! the controller's record of one volume in the Kubernetes API, so that a
//! controller rescheduled to another node keeps its records, and so that
//! `kubectl get r3mapvolumes` shows where each volume lives.
//!
//! The spec is what CreateVolume decided and never changes except for the
//! size (ControllerExpandVolume). The status is what changes while the
//! volume is used: attachments, the owner node, the fencing epoch
//! (docs/fencing.md) and the migration phase (docs/migration.md). It is a
//! subresource, so spec and status are written separately and a writer of
//! one cannot clobber the other.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the resource.
pub const GROUP: &str = "r3map.io";
/// Version of the resource.
pub const VERSION: &str = "v1alpha1";

/// A volume of r3map-csi: one region of an r3map region service.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "r3map.io",
    version = "v1alpha1",
    kind = "R3mapVolume",
    plural = "r3mapvolumes",
    singular = "r3mapvolume",
    shortname = "r3v",
    status = "R3mapVolumeStatus",
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size","description":"Size in bytes"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.ownerNode","description":"Node that writes the live region"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Migration phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress","description":"Chunks present on the migration target / total"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct R3mapVolumeSpec {
    /// Id of the region on the region service (= the CSI volume id).
    pub region_id: String,
    /// The region service holding the region, HOST:PORT.
    pub region_service: String,
    /// The CreateVolume name the volume was made for (the PV name).
    pub volume_name: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size of the managed mount in bytes.
    pub chunk_size: u64,
    /// The StorageClass parameters other than the chunk size, parsed and
    /// in canonical form.
    pub parameters: VolumeParameters,
    /// CSI access mode the volume was created for, e.g.
    /// `SINGLE_NODE_WRITER` (absent when unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
}

/// Parsed StorageClass parameters (see `csi::params`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeParameters {
    /// Background pull workers.
    pub pull_workers: u32,
    /// Background push workers.
    pub push_workers: u32,
    /// Interval between background pushes, e.g. `20s`.
    pub push_interval: String,
    /// `flush` or `async`.
    pub durability: String,
}

/// Where a migration of the volume stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationPhase {
    /// No migration.
    #[default]
    None,
    /// The target pulls while the source keeps writing.
    PreCopy,
    /// The source is sealed; the target takes the dirty list and fences.
    Finalizing,
    /// The target serves; chunks still missing are pulled on demand.
    PostCopy,
    /// Every chunk is on the target.
    Complete,
    /// Aborted before finalize: the source serves on.
    RolledBack,
    /// Failed; see the conditions.
    Failed,
}

/// One node the volume is published to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// CSI node id.
    pub node_id: String,
    /// Published read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A Kubernetes-style condition (the fields of `metav1.Condition`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Kind of condition, CamelCase, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable CamelCase reason of the last transition.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What changes while the volume is used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct R3mapVolumeStatus {
    /// The node that writes the live region (absent when unattached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_node: Option<String>,
    /// The owner's migration (Seed) endpoint, HOST:PORT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_endpoint: Option<String>,
    /// The node a migration in progress pulls from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_source: Option<String>,
    /// The node a migration in progress pulls to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_target: Option<String>,
    /// The migration in progress is live (the source writes until
    /// finalize), not a hand-over from an unpublished node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migration_live: bool,
    /// Nodes the volume is published to, sorted by node id.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// The region's fencing epoch (docs/fencing.md).
    #[serde(default)]
    pub epoch: u64,
    /// Migration phase.
    #[serde(default)]
    pub phase: MigrationPhase,
    /// Chunks present on the migration target.
    #[serde(default)]
    pub chunks_present: u64,
    /// Chunks of the region.
    #[serde(default)]
    pub chunks_total: u64,
    /// `chunksPresent/chunksTotal`, for `kubectl get` (empty when no
    /// migration ran).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub progress: String,
    /// Conditions, one per type.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl R3mapVolumeStatus {
    /// Sets the condition of `type_`, keeping its transition time when its
    /// status did not change (what `lastTransitionTime` means).
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: &str,
    ) {
        let status = if status { "True" } else { "False" };
        let c = Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: now.to_string(),
            observed_generation: generation,
        };
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(old) if old.status == c.status => {
                let t = std::mem::take(&mut old.last_transition_time);
                *old = Condition {
                    last_transition_time: t,
                    ..c
                };
            }
            Some(old) => *old = c,
            None => self.conditions.push(c),
        }
    }

    /// The condition of `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The CustomResourceDefinition as YAML (what `r3map-csi-crdgen` prints
/// and `charts/r3map-csi/crds/` holds).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&R3mapVolume::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let mut s = R3mapVolumeStatus::default();
        s.set_condition("Attached", true, "Published", "node a", Some(1), "t1");
        s.set_condition("Attached", true, "Published", "nodes a, b", Some(2), "t2");
        let c = s.condition("Attached").unwrap();
        assert_eq!(c.last_transition_time, "t1");
        assert_eq!(c.message, "nodes a, b");
        assert_eq!(c.observed_generation, Some(2));
        s.set_condition("Attached", false, "Unpublished", "", Some(2), "t3");
        assert_eq!(s.condition("Attached").unwrap().last_transition_time, "t3");
        assert_eq!(s.conditions.len(), 1);
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        use kube::CustomResourceExt;
        let crd = R3mapVolume::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, GROUP);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Size", "Node", "Phase", "Progress", "Age"]);
    }
}
