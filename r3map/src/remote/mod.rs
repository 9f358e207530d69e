//! Remote regions: one `r3map backend` process holds many named regions,
//! each a [`crate::Backend`] on its store, and serves them over gRPC
//! (`r3map.remote.v1.RegionStore`, see proto/remote.proto). On the other
//! side, [`client::RemoteBackend`] is a [`crate::Backend`] over one region,
//! so any mount can sit on storage that lives on another host.

pub mod cli;
pub mod client;
pub mod service;
pub mod store;

/// Generated from proto/remote.proto (documented there).
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("r3map.remote.v1");
}

pub use client::{Client, RemoteBackend, RemoteUri};
pub use service::RegionService;
pub use store::Store;

/// Largest read or write payload of one call unless configured.
pub const DEFAULT_MAX_REQUEST: u64 = 32 << 20;

/// Largest piece of a streamed read: big ranges flow in pieces, so neither
/// side holds a whole 32 MiB message and the first bytes leave early.
pub const READ_PIECE: u64 = 1 << 20;

/// Longest region id.
pub const MAX_ID_LEN: usize = 128;

/// Keeps glibc from handing ~1 MiB buffers back to the kernel on free.
/// Process-wide and idempotent, so it is the program's choice, not the
/// library's: the `r3map` binary calls it once at start (every command
/// moves ~1 MiB buffers: region server, clients, mounts, the relay); an
/// embedding daemon may call it too.
///
/// Every read piece, encode buffer and fetched chunk is a short-lived
/// allocation of about 1 MiB. By default glibc serves those with mmap (or
/// trims them off the heap top) and the next one faults its 256 pages in
/// again: measured on a cold 1 GiB read through `r3map mount`, page faults
/// and zeroing were ~20 % of the region server's CPU, and raising both
/// thresholds cut its CPU by a third. Free memory kept for reuse is bounded
/// by the trim threshold per arena.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only sets allocator parameters; called before
        // the runtime's worker threads allocate much, and safe at any time.
        unsafe {
            // 32 MiB: the largest glibc accepts (HEAP_MAX_SIZE / 2).
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

/// Region ids name directories and redis keys: letters, digits, `.`, `_`
/// and `-`, not starting with `.`, at most [`MAX_ID_LEN`] characters.
pub fn check_id(id: &str) -> crate::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::InvalidArgument(format!(
            "invalid region id {id:?}: use 1 to {MAX_ID_LEN} of A-Z a-z 0-9 . _ -, not starting with ."
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["vol1", "pvc-0a1b", "a.b_c-d", "X"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a:b",
            "a*",
            "é",
            &"x".repeat(129),
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
