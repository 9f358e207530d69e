//! The CSI node plugin `r3map-csi-node`: the Identity and Node services,
//! the per-volume state files, and the netlink data path of a staged
//! volume. The binary (src/bin/r3map-csi-node.rs) only parses arguments,
//! re-attaches recorded volumes and serves.

pub mod attach;
pub mod identity;
pub mod migrate;
pub mod node;
pub mod state;
