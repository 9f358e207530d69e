//! The CSI controller plugin of r3map-csi as a library: the binary
//! `r3map-csi-controller` wires these together, and the tests drive the
//! records and the leader election against a Kubernetes API test double.

pub mod controller;
pub mod crd;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod migrate;
pub mod records;
pub mod region;
pub mod state;
