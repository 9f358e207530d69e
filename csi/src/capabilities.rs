//! What the driver offers, one list per service, and the check of the
//! volume capabilities a CO asks for: block access only, in one of
//! [`ACCESS_MODES`].

use crate::pb::controller_service_capability::rpc::Type as CtrlRpc;
use crate::pb::node_service_capability::rpc::Type as NodeRpc;
use crate::pb::plugin_capability::service::Type as PluginService;
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::volume_capability::AccessType;
use crate::pb::{
    controller_service_capability, node_service_capability, plugin_capability,
    ControllerServiceCapability, NodeServiceCapability, PluginCapability, VolumeCapability,
};

/// Plugin capabilities (GetPluginCapabilities).
pub const PLUGIN: &[PluginService] = &[PluginService::ControllerService];

/// Controller capabilities (ControllerGetCapabilities).
pub const CONTROLLER: &[CtrlRpc] = &[
    CtrlRpc::CreateDeleteVolume,
    CtrlRpc::PublishUnpublishVolume,
    CtrlRpc::ListVolumes,
    CtrlRpc::ListVolumesPublishedNodes,
    CtrlRpc::GetCapacity,
    CtrlRpc::ExpandVolume,
    CtrlRpc::GetVolume,
    CtrlRpc::VolumeCondition,
];

/// Node capabilities (NodeGetCapabilities).
pub const NODE: &[NodeRpc] = &[
    NodeRpc::StageUnstageVolume,
    NodeRpc::GetVolumeStats,
    NodeRpc::ExpandVolume,
    NodeRpc::VolumeCondition,
];

/// Access modes a volume can be published with.
pub const ACCESS_MODES: &[Mode] = &[
    Mode::SingleNodeWriter,
    Mode::SingleNodeSingleWriter,
    Mode::MultiNodeMultiWriter,
];

/// [`PLUGIN`] as protobuf messages.
pub fn plugin() -> Vec<PluginCapability> {
    PLUGIN
        .iter()
        .map(|t| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: *t as i32 },
            )),
        })
        .collect()
}

/// [`CONTROLLER`] as protobuf messages.
pub fn controller() -> Vec<ControllerServiceCapability> {
    CONTROLLER
        .iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: *t as i32 },
            )),
        })
        .collect()
}

/// [`NODE`] as protobuf messages.
pub fn node() -> Vec<NodeServiceCapability> {
    NODE.iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: *t as i32 },
            )),
        })
        .collect()
}

/// The access mode of one capability, if it is one we know.
pub fn mode(cap: &VolumeCapability) -> Option<Mode> {
    cap.access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
}

/// Whether a mode lets only one node hold the volume.
pub fn is_single_node(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

/// Checks one capability: block access in a supported mode. The error is
/// a message for the CO (INVALID_ARGUMENT, or ValidateVolumeCapabilities'
/// `message`).
pub fn check_one(cap: &VolumeCapability) -> Result<(), String> {
    match &cap.access_type {
        Some(AccessType::Block(_)) => {}
        Some(AccessType::Mount(_)) => {
            return Err("mount access type is not supported: r3map-csi serves raw block volumes only (volumeMode: Block)".into())
        }
        None => return Err("volume capability has no access type (block or mount)".into()),
    }
    let Some(am) = &cap.access_mode else {
        return Err("volume capability has no access mode".into());
    };
    match Mode::try_from(am.mode) {
        Ok(m) if ACCESS_MODES.contains(&m) => Ok(()),
        Ok(Mode::Unknown) => Err("volume capability access mode is UNKNOWN".into()),
        Ok(m) => Err(format!(
            "access mode {} is not supported; supported: {}",
            m.as_str_name(),
            ACCESS_MODES
                .iter()
                .map(|m| m.as_str_name())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(_) => Err(format!("unknown access mode {}", am.mode)),
    }
}

/// Checks a REQUIRED list of capabilities: non-empty, each supported.
pub fn check(caps: &[VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    for (i, c) in caps.iter().enumerate() {
        check_one(c).map_err(|e| format!("volume_capabilities[{i}]: {e}"))?;
    }
    Ok(())
}

/// A block capability in `mode`, as a CO sends it (for tests and tools).
pub fn block(mode: Mode) -> VolumeCapability {
    use crate::pb::volume_capability::{AccessMode, BlockVolume};
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::volume_capability::{AccessMode, MountVolume};

    #[test]
    fn lists() {
        assert_eq!(plugin().len(), 1);
        assert_eq!(controller().len(), 8);
        assert_eq!(node().len(), 4);
        assert!(!CONTROLLER.contains(&CtrlRpc::CreateDeleteSnapshot));
    }

    #[test]
    fn block_modes() {
        for m in ACCESS_MODES {
            assert!(check(&[block(*m)]).is_ok(), "{m:?}");
        }
        let e = check(&[block(Mode::MultiNodeReaderOnly)]).unwrap_err();
        assert!(e.contains("MULTI_NODE_READER_ONLY"), "{e}");
        assert!(check(&[]).unwrap_err().contains("required"));
        let e = check(&[block(Mode::SingleNodeWriter), block(Mode::Unknown)]).unwrap_err();
        assert!(e.starts_with("volume_capabilities[1]"), "{e}");
    }

    #[test]
    fn mount_refused() {
        let mount = VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert!(check_one(&mount).unwrap_err().contains("mount"));
        let none = VolumeCapability {
            access_type: None,
            ..block(Mode::SingleNodeWriter)
        };
        assert!(check_one(&none).is_err());
        let no_mode = VolumeCapability {
            access_mode: None,
            ..block(Mode::SingleNodeWriter)
        };
        assert!(check_one(&no_mode).is_err());
    }

    #[test]
    fn single_node() {
        assert!(is_single_node(Mode::SingleNodeWriter));
        assert!(!is_single_node(Mode::MultiNodeMultiWriter));
        assert_eq!(
            mode(&block(Mode::MultiNodeMultiWriter)),
            Some(Mode::MultiNodeMultiWriter)
        );
    }
}
