//! Backend URIs: `memory:`, `file:PATH`, `dir:PATH`, `redis://HOST:PORT/DB?prefix=NAME`,
//! `r3map://HOST:PORT/REGION?...` (a region of `r3map backend`, see [`crate::remote`]).

use std::path::Path;
use std::sync::Arc;

use super::{dir, file, memory, redis, Backend, Error, Result};

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
        let (url, prefix) = split_prefix(uri)?;
        return Ok(Arc::new(
            redis::Redis::connect(&url, &prefix, size, chunk).await?,
        ));
    }
    if uri.starts_with("s3://") {
        let cfg = super::s3::S3Config::parse(uri)?;
        return Ok(Arc::new(super::s3::S3::open(&cfg, size, chunk).await?));
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

/// Takes our `prefix=` query parameter out of a redis URL; the rest goes
/// to the redis client unchanged.
pub(crate) fn split_prefix(uri: &str) -> Result<(String, String)> {
    let Some((base, query)) = uri.split_once('?') else {
        return Ok((uri.to_string(), "r3map".to_string()));
    };
    let mut prefix = None;
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("prefix", v)) if !v.is_empty() => prefix = Some(v.to_string()),
            Some(("prefix", _)) => return Err(invalid(uri, "prefix must not be empty")),
            _ => rest.push(kv),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, prefix.unwrap_or_else(|| "r3map".to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_prefix_is_taken_out() {
        let (u, p) = split_prefix("redis://127.0.0.1:6379/2?prefix=vol1").unwrap();
        assert_eq!(
            (u.as_str(), p.as_str()),
            ("redis://127.0.0.1:6379/2", "vol1")
        );
        let (u, p) = split_prefix("redis://h:1/0").unwrap();
        assert_eq!((u.as_str(), p.as_str()), ("redis://h:1/0", "r3map"));
        assert!(split_prefix("redis://h:1/0?prefix=").is_err());
    }

    #[tokio::test]
    async fn unknown_scheme_is_refused() {
        let err = open("nfs://bucket", 4096, 4096).await.err().unwrap();
        assert!(err.to_string().contains("expected memory:"), "{err}");
        assert!(open("file:", 4096, 4096).await.is_err());
        assert!(open("memory:x", 4096, 4096).await.is_err());
    }
}
