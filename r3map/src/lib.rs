//! r3map: remote mmap.
//!
//! Serves any storage backend as a block device over NBD. The engine holds no
//! Kubernetes: backends ([`backend`]), the NBD server ([`nbd`]), managed
//! caches ([`managed`]), the embeddable [`Volume`] the CSI node plugin and
//! the CLI both build on ([`volume`]), and shared helpers ([`size`]).

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
pub mod uri;
pub mod volume;

pub use backend::Backend;
pub use error::{Error, ErrorKind, Result};
pub use volume::{Volume, VolumeSpec, VolumeStats};
