//! Live migration of a region between hosts, pull-based (see
//! docs/migration.md): the source wraps its backend in [`Tracked`] and
//! serves `Seed`; the destination runs a leech ([`leech`]) that pulls every
//! chunk into a managed cache while its own export is held, then finalizes:
//! the seed closes writes and hands over the chunks written meanwhile,
//! which the destination pulls again first, serving at once.

pub mod cli;
pub mod leech;
mod pull;
pub mod record;
pub mod seed;
pub mod source;
pub mod tracked;

pub use leech::{Leech, MigrationStatus, Precopy};
pub use record::Handover;
pub use source::{Source, SourceStatus};
pub use tracked::{ChunkSet, Tracked};

/// Generated from proto/migration.proto.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("r3map.migration.v1");
}
