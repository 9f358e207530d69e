//! r3map: remote mmap.
//!
//! Serves any storage backend as a block device over NBD. The engine holds no
//! Kubernetes: backends ([`backend`]), the NBD server ([`nbd`]), managed
//! caches ([`managed`]), the embeddable [`Volume`] the CSI node plugin and
//! the CLI both build on ([`volume`]), and shared helpers ([`size`]).
//!
//! Layers, each using only those below it:
//!
//! 1. [`error`], [`size`], [`auth`]: no other module of the crate.
//! 2. [`backend`]: the `Backend` trait and the local stores (`memory:`,
//!    `file:`, `dir:`, `redis://`); [`nbd`]: the NBD server over any backend.
//! 3. [`net`], [`channel`] and [`grpc`]: gRPC transport (endpoints,
//!    channels, servers) and the error mapping shared by the services above.
//! 4. [`remote`]: regions of `r3map backend`, and a backend over one.
//! 5. [`uri`]: opens a backend from its URI, any scheme (above
//!    [`backend`] and [`remote`], which know nothing of each other).
//! 6. [`managed`]: a local cache in front of any backend (it reads one
//!    file format of [`migration`], the finalize record, so a mount
//!    restarted after a hand-over stays sealed); [`migration`]: moving a
//!    region between hosts; [`volume`]: what a daemon embeds.
//! 7. [`cli`] and each layer's `cli` module: the `r3map` subcommands.
//!    [`relay`] is a test and bench tool (latency injection).

#![warn(missing_docs)]

pub mod auth;
pub mod backend;
pub mod channel;
pub mod cli;
pub mod error;
pub mod grpc;
pub mod managed;
pub mod migration;
pub mod nbd;
pub mod net;
mod read_stream;
pub mod relay;
pub mod remote;
pub mod size;
pub mod uri;
pub mod volume;

pub use backend::Backend;
pub use error::{Error, ErrorKind, Result};
pub use volume::{Volume, VolumeSpec, VolumeStats};
