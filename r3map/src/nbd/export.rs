//! What the server offers: named exports over backends, and the limits
//! that keep one client from exhausting the server.

use std::sync::Arc;

use super::stats::NbdCounters;
use crate::backend::Backend;

/// Largest request payload accepted, as advertised in NBD_INFO_BLOCK_SIZE.
pub const MAX_REQUEST: u32 = 32 << 20;

/// One named export: a backend and how it is offered.
#[derive(Clone)]
pub struct Export {
    /// Name a client asks for in NBD_OPT_GO.
    pub name: String,
    /// Free text sent in NBD_INFO_DESCRIPTION.
    pub description: String,
    /// Where the bytes live.
    pub backend: Arc<dyn Backend>,
    /// Refuse writes, trims and zeroing.
    pub read_only: bool,
    /// Per-command counters, shared by every connection to this export
    /// (and by clones of it).
    pub stats: Arc<NbdCounters>,
}

impl Export {
    /// A writable export of `backend` named `name`, with fresh counters.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            backend,
            read_only: false,
            stats: Arc::new(NbdCounters::default()),
        }
    }

    /// Makes the export read-only (or not).
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Transmission flags for this export on a connection that did or did
    /// not negotiate structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        use super::proto::*;
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        // Multi-conn is a promise that a flush on one connection covers the
        // writes of all: only true when the backend's flush is global.
        if self.backend.flush_is_global() {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }
}

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest READ/WRITE payload; larger requests get EOVERFLOW/EINVAL.
    pub max_request: u32,
    /// Bytes of request payload in flight at once on one connection; the
    /// reader stops taking requests beyond it (back-pressure, bounded memory).
    pub inflight_bytes: u32,
    /// How long option haggling may take before the connection is dropped.
    pub handshake_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request: MAX_REQUEST,
            inflight_bytes: 256 << 20,
            handshake_timeout: std::time::Duration::from_secs(30),
        }
    }
}
