//! What a volume is made of: [`VolumeSpec`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Backend, DEFAULT_CHUNK_SIZE};
use crate::managed::Options;
use crate::{Error, Result};

/// Where a volume's bytes live.
#[derive(Clone)]
pub enum BackendSpec {
    /// Any URI [`crate::uri::open`] takes: `memory:`, `file:PATH`,
    /// `dir:PATH`, `redis://...`, `r3map://HOST:PORT/REGION` (a region
    /// created with the volume's size if it does not exist).
    Uri(String),
    /// A backend the caller opened (wrapped, instrumented, a test double).
    /// Its size must be the volume's.
    Open(Arc<dyn Backend>),
}

impl std::fmt::Debug for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendSpec::Uri(u) => f.debug_tuple("Uri").field(u).finish(),
            BackendSpec::Open(b) => write!(f, "Open({} bytes)", b.size()),
        }
    }
}

impl From<&str> for BackendSpec {
    fn from(uri: &str) -> Self {
        BackendSpec::Uri(uri.to_string())
    }
}

impl From<String> for BackendSpec {
    fn from(uri: String) -> Self {
        BackendSpec::Uri(uri)
    }
}

/// How the backend is served.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Every request goes to the backend.
    Direct,
    /// Through a local cache file (a managed mount): reads pull missing
    /// chunks, writes are pushed back (see [`crate::managed`]).
    Managed {
        /// The cache file; `PATH.state` and `PATH.lock` live beside it.
        cache: PathBuf,
        /// Pull and push tuning, durability.
        options: Options,
    },
}

/// Everything [`super::Volume::open`] needs.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Name of the volume, used as its NBD export name and in messages.
    pub name: String,
    /// Where the bytes live.
    pub backend: BackendSpec,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size of a chunked backend (`dir:`, `redis://`, `memory:`).
    pub chunk_size: u64,
    /// Direct or through a managed cache.
    pub mode: Mode,
    /// Refuse writes, trims and zeroing.
    pub read_only: bool,
}

impl VolumeSpec {
    /// A writable volume serving `backend` directly, with the default
    /// chunk size.
    pub fn direct(name: impl Into<String>, backend: impl Into<BackendSpec>, size: u64) -> Self {
        VolumeSpec {
            name: name.into(),
            backend: backend.into(),
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            mode: Mode::Direct,
            read_only: false,
        }
    }

    /// A writable volume serving `backend` through the cache at `cache`,
    /// with default options (cache chunk = backend chunk = 1 MiB).
    pub fn managed(
        name: impl Into<String>,
        backend: impl Into<BackendSpec>,
        size: u64,
        cache: impl Into<PathBuf>,
    ) -> Self {
        VolumeSpec {
            mode: Mode::Managed {
                cache: cache.into(),
                options: Options::default(),
            },
            ..Self::direct(name, backend, size)
        }
    }

    pub(super) fn check(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(Error::InvalidArgument("a volume needs a name".into()));
        }
        if self.size == 0 {
            return Err(Error::InvalidArgument(format!(
                "volume {}: size must be positive",
                self.name
            )));
        }
        if self.chunk_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "volume {}: chunk size must be positive",
                self.name
            )));
        }
        Ok(())
    }
}
