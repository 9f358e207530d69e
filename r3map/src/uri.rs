//! Backend URIs: `memory:`, `file:PATH`, `dir:PATH`, `redis://HOST:PORT/DB?prefix=NAME`,
//! `s3://BUCKET/PREFIX?...`,
//! `r3map://HOST:PORT/REGION?...` (a region of `r3map backend`, see [`crate::remote`]).
//!
//! This sits above both [`crate::backend`] and [`crate::remote`]: the
//! backends know nothing of each other, and only the dispatch by scheme
//! needs them all.

use std::path::Path;
use std::sync::Arc;

use crate::backend::{dir, file, memory, redis, Backend};
use crate::{Error, Result};

fn invalid(uri: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUri {
        uri: uri.to_string(),
        reason: reason.into(),
    }
}

/// Opens the backend named by `uri` as a region of `size` bytes.
pub async fn open(uri: &str, size: u64, chunk: u64) -> Result<Arc<dyn Backend>> {
    if chunk == 0 {
        return Err(invalid(uri, "chunk size must be positive"));
    }
    if let Some(rest) = uri.strip_prefix("memory:") {
        if !rest.is_empty() {
            return Err(invalid(uri, "memory: takes no path"));
        }
        return Ok(Arc::new(memory::Memory::new(size, chunk)));
    }
    if let Some(path) = uri.strip_prefix("file:") {
        if path.is_empty() {
            return Err(invalid(
                uri,
                "file: needs a path, as in file:/var/lib/r3map/disk.img",
            ));
        }
        return Ok(Arc::new(file::FileBackend::open(Path::new(path), size)?));
    }
    if let Some(path) = uri.strip_prefix("dir:") {
        if path.is_empty() {
            return Err(invalid(
                uri,
                "dir: needs a path, as in dir:/var/lib/r3map/chunks",
            ));
        }
        return Ok(Arc::new(dir::Dir::open(
            Path::new(path),
            size,
            chunk,
            dir::DEFAULT_OPEN_FILES,
        )?));
    }
    if uri.starts_with("redis://") {
        let (url, prefix) = redis::split_prefix(uri)?;
        return Ok(Arc::new(
            redis::Redis::connect(&url, &prefix, size, chunk).await?,
        ));
    }
    if uri.starts_with("s3://") {
        let cfg = crate::backend::s3::S3Config::parse(uri)?;
        return Ok(Arc::new(
            crate::backend::s3::S3::open(&cfg, size, chunk).await?,
        ));
    }
    if uri.starts_with("r3map://") {
        return Ok(Arc::new(
            crate::remote::RemoteBackend::open_uri(uri, size).await?,
        ));
    }
    Err(invalid(
        uri,
        "expected memory:, file:PATH, dir:PATH, redis://HOST:PORT/DB?prefix=NAME, s3://BUCKET/PREFIX or r3map://HOST:PORT/REGION",
    ))
}

/// [`open`] without blocking a runtime thread: `file:` and `dir:`
/// open files and walk directories synchronously, so they are opened on a
/// blocking thread; network backends are async already.
pub async fn open_backend(uri: &str, size: u64, chunk: u64) -> Result<Arc<dyn Backend>> {
    if uri.starts_with("file:") || uri.starts_with("dir:") {
        let (uri, rt) = (uri.to_string(), tokio::runtime::Handle::current());
        // block_on on a blocking thread is allowed (it is not a worker).
        return tokio::task::spawn_blocking(move || rt.block_on(open(&uri, size, chunk)))
            .await
            .map_err(|e| Error::io(format!("opening the backend: {e}")))?;
    }
    open(uri, size, chunk).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_is_refused() {
        let err = open("nfs://bucket", 4096, 4096).await.err().unwrap();
        assert!(err.to_string().contains("expected memory:"), "{err}");
        assert!(open("file:", 4096, 4096).await.is_err());
        assert!(open("memory:x", 4096, 4096).await.is_err());
    }
}
