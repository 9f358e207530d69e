//! CSI plumbing shared by the r3map-csi plugins: the generated `csi.v1`
//! gRPC code ([`pb`]), the capabilities the driver offers, StorageClass
//! parameters, credentials from CSI secrets, the one error type, the
//! per-volume in-flight guard, argument checks, unix-socket endpoints and
//! per-call tracing spans.

pub mod capabilities;
pub mod endpoint;
pub mod error;
pub mod inflight;
pub mod params;
pub mod secrets;
pub mod trace;
pub mod validate;

/// Generated from proto/csi.proto (package `csi.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

pub use error::{CsiError, CsiResult};
pub use inflight::{InFlight, InFlightGuard};
pub use params::Params;
pub use secrets::Credentials;
