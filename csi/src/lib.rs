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

/// Generated from proto/csi.proto (package `csi.v1`): the CSI spec's
/// definitions (container-storage-interface/spec, as of v1.13.0-rc1; the
/// file's header names the source) in our own layout, without the spec's
/// prose; tests/wire.rs pins wire numbers through prost's encoding.
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
