//! A volume: one backend served as one NBD export, the unit a long-running
//! daemon (the CSI node plugin) embeds.
//!
//! [`Volume::open`] opens the backend (directly, or through a managed local
//! cache that it locks), [`Volume::serve_kernel`] serves already-connected
//! streams (the socketpair end whose other end went to the kernel), and
//! [`Volume::close`] drains, pushes, flushes and waits for every task the
//! volume started, within a deadline. Nothing here installs signal
//! handlers, parses arguments or changes process-wide settings: that is
//! the program's business (see `main.rs`, and tokio's mini-redis, whose
//! library takes a shutdown signal while the binary owns the CLI).

mod close;
mod kernel;
mod spec;
mod stats;

use std::sync::Arc;

pub use kernel::KernelConn;
pub use spec::{BackendSpec, Mode, VolumeSpec};
pub use stats::VolumeStats;

use crate::backend::Backend;
use crate::managed::Managed;
use crate::migration::Source;
use crate::nbd::{Export, Server};
use crate::{Error, Result};

/// An open volume; see the module docs. Dropping it without
/// [`Volume::close`] stops its connections from taking requests, but
/// neither pushes nor flushes, nor waits.
pub struct Volume {
    name: String,
    server: Server,
    export: Export,
    managed: Option<Arc<Managed>>,
    source: Arc<Source>,
}

impl Volume {
    /// Opens the volume `spec` describes: the backend, and for
    /// [`Mode::Managed`] the cache in front of it (locked for the life of
    /// the volume; a cache in use elsewhere gives [`Error::Busy`]). File
    /// work runs on blocking threads, never on the runtime's.
    pub async fn open(spec: VolumeSpec) -> Result<Volume> {
        spec.check()?;
        let VolumeSpec {
            name,
            backend,
            size,
            chunk_size,
            mode,
            read_only,
        } = spec;
        let backend = match backend {
            BackendSpec::Uri(uri) => crate::uri::open_backend(&uri, size, chunk_size).await?,
            BackendSpec::Open(b) => {
                if b.size() != size {
                    return Err(Error::InvalidArgument(format!(
                        "volume {name}: backend holds {} bytes, the volume is {size}",
                        b.size()
                    )));
                }
                b
            }
        };
        let cache_path = match &mode {
            Mode::Managed { cache, .. } => Some(cache.clone()),
            Mode::Direct => None,
        };
        let (served, managed): (Arc<dyn Backend>, _) = match mode {
            Mode::Direct => (backend, None),
            Mode::Managed { cache, options } => {
                // The remote is both where missing chunks come from and
                // where written ones go (a plain mount).
                let m = Managed::open_async(&cache, backend.clone(), Some(backend), options)
                    .await
                    .map_err(|e| e.context(format!("volume {name}")))?;
                let m = Arc::new(m);
                (m.clone(), Some(m))
            }
        };
        // Every volume can become a migration source: writes go through
        // its tracker (idle until a destination starts tracking). A
        // managed volume keeps the finalize answer beside its cache, so a
        // volume reopened after handing its region over stays closed.
        let record = cache_path
            .as_deref()
            .map(crate::migration::record::record_path);
        let source = Source::open(served, chunk_size, managed.clone(), record).await?;
        let export = Export::new(name.clone(), source.backend()).read_only(read_only);
        Ok(Volume {
            name,
            server: Server::single(export.clone()),
            export,
            managed,
            source,
        })
    }

    /// A volume over a managed mount opened elsewhere (a migration
    /// destination's, [`crate::migration::Leech::managed`]): served like
    /// any managed volume, and a migration source in turn, whose finalize
    /// seals that mount. `record` is where the source keeps its finalize
    /// answer (not the leech's own record path).
    pub async fn over_managed(
        name: impl Into<String>,
        managed: Arc<Managed>,
        chunk_size: u64,
        record: Option<std::path::PathBuf>,
    ) -> Result<Volume> {
        let name = name.into();
        let served: Arc<dyn Backend> = managed.clone();
        let source = Source::open(served, chunk_size, Some(managed.clone()), record).await?;
        let export = Export::new(name.clone(), source.backend());
        Ok(Volume {
            name,
            server: Server::single(export.clone()),
            export,
            managed: Some(managed),
            source,
        })
    }

    /// The volume's migration source: serve `Seed` over it to let a
    /// destination pull this volume (see [`crate::migration`]).
    pub fn source(&self) -> &Arc<Source> {
        &self.source
    }

    /// The volume's name (also its export name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.export.backend.size()
    }

    /// What the NBD connections read and write: the managed mount, or the
    /// backend itself.
    pub fn backend(&self) -> Arc<dyn Backend> {
        self.export.backend.clone()
    }

    /// The managed mount, for a [`Mode::Managed`] volume.
    pub fn managed(&self) -> Option<&Arc<Managed>> {
        self.managed.as_ref()
    }

    /// The NBD server over this volume's one export, for transports beyond
    /// [`Volume::serve_kernel`] (listeners with a handshake, as the CLI
    /// uses). Connections it serves are drained by [`Volume::close`] too.
    pub fn server(&self) -> &Server {
        &self.server
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        // Connections hold the export, not the volume: without this they
        // would go on serving a volume its owner gave up.
        self.server.shutdown();
    }
}
