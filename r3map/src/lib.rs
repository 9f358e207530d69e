//! r3map: remote mmap.
//!
//! Serves any storage backend as a block device over NBD. The engine holds no
//! Kubernetes: backends ([`backend`]), the NBD server ([`nbd`]) and the
//! helpers the CLI and the CSI node plugin share ([`size`]).

pub mod auth;
pub mod backend;
pub mod error;
pub mod grpc;
pub mod managed;
pub mod migration;
pub mod nbd;
pub mod relay;
pub mod remote;
pub mod size;

pub use backend::Backend;
pub use error::{Error, ErrorKind, Result};
