//! CSI plumbing shared by the r3map-csi plugins: the generated `csi.v1`
//! gRPC code ([`pb`]), the capabilities the driver offers, StorageClass
//! parameters, credentials from CSI secrets, the one error type, the
//! per-volume in-flight guard, argument checks, unix-socket endpoints and
//! per-call tracing spans.

pub mod capabilities;
pub mod endpoint;
pub mod error;
pub mod inflight;
pub mod metrics;
pub mod migration;
pub mod params;
pub mod secrets;
pub mod trace;
pub mod validate;

/// Generated from proto/csi.proto (package `csi.v1`): the upstream CSI
/// spec's csi.proto, verbatim, from container-storage-interface/spec at
/// commit 2696773158b970c65107610d8f3ef4302546eca0 (master of 14 March
/// 2024, after v1.9.0 and before v1.10.0; see tests/wire.rs for its hash).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// Generated from proto/r3map_node.proto (package `r3map.node.v1`): the
/// node plugins' migration control service.
#[allow(clippy::all, missing_docs)]
pub mod nodepb {
    tonic::include_proto!("r3map.node.v1");
}

pub use error::{CsiError, CsiResult};
pub use inflight::{InFlight, InFlightGuard};
pub use params::Params;
pub use secrets::Credentials;
