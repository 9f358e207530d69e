//! `s3://BUCKET/PREFIX?endpoint=URL&region=R&credentials-file=F` — one
//! object per chunk in any S3-compatible store (AWS, Ceph RGW, MinIO,
//! s3s), through the `object_store` crate.
//!
//! - Chunk `i` is the object `PREFIX/c/<i as 16 hex digits>`, always written
//!   whole (the chunk's full length), so a ranged GET never runs past its end.
//! - A never-written chunk has no object and reads as zeros; a trim that
//!   covers a whole chunk deletes its object.
//! - A write that covers part of a chunk is a read-modify-write of its
//!   object under a per-chunk lock (striped), so two partial writes into
//!   one chunk cannot lose each other's bytes within this process.
//! - S3 acknowledges a PUT only once the object is durable, so a write is
//!   durable when it returns and [`Backend::flush`] has nothing left to
//!   wait for (every upload completed before the write returned).
//! - `PREFIX/r3map-chunk-size` records the chunk size; opening the prefix
//!   with another one is refused (it would read every object at the wrong
//!   offsets).
//!
//! Credentials: `credentials-file=PATH` (lines `access_key_id = ...` and
//! `secret_access_key = ...`, optionally `session_token = ...`), else the
//! usual `AWS_*` environment variables. Plain HTTP only to a loopback
//! endpoint or with `allow-http=true`.

use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use tokio::sync::Mutex;

use super::{check_range, chunk_spans, Backend, Error, Result};

/// Largest chunk (one object, read and written whole by a partial write).
pub const MAX_CHUNK: u64 = 512 << 20;
const STRIPES: usize = 256;

/// Where and how to reach an S3 bucket, as parsed from an `s3://` URI.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix of the region (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Endpoint URL (absent: AWS).
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: String,
    /// File holding the access key and secret.
    pub credentials_file: Option<String>,
    /// Allow `http://` to a non-loopback endpoint.
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never any secret here: the credentials stay in their file.
        write!(
            f,
            "s3://{}/{} (endpoint {:?}, region {})",
            self.bucket, self.prefix, self.endpoint, self.region
        )
    }
}

fn invalid(uri: &str, reason: impl Into<String>) -> Error {
    Error::InvalidUri {
        uri: uri.to_string(),
        reason: reason.into(),
    }
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&credentials-file=F&allow-http=true]`.
    pub fn parse(uri: &str) -> Result<S3Config> {
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| invalid(uri, "expected s3://BUCKET/PREFIX"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok_bucket {
            return Err(invalid(uri, "bucket names are 3 to 63 of a-z 0-9 . -"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|c| c == "." || c == "..") {
            return Err(invalid(uri, "the prefix must not hold . or .. components"));
        }
        let mut c = S3Config {
            bucket: bucket.to_string(),
            prefix,
            endpoint: None,
            region: "us-east-1".into(),
            credentials_file: None,
            allow_http: false,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| invalid(uri, "parameters are KEY=VALUE"))?;
            if v.is_empty() {
                return Err(invalid(uri, format!("{k} is empty")));
            }
            match k {
                "endpoint" => c.endpoint = Some(v.to_string()),
                "region" => c.region = v.to_string(),
                "credentials-file" => c.credentials_file = Some(v.to_string()),
                "allow-http" => {
                    c.allow_http = v
                        .parse()
                        .map_err(|_| invalid(uri, "allow-http is true or false"))?
                }
                _ => return Err(invalid(uri, format!("unknown parameter {k:?}"))),
            }
        }
        if let Some(ep) = &c.endpoint {
            if let Some(hostport) = ep.strip_prefix("http://") {
                let host = hostport.split(['/', ':']).next().unwrap_or("");
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback && !c.allow_http {
                    return Err(invalid(
                        uri,
                        "plain http to a non-loopback endpoint: use https, or allow-http=true",
                    ));
                }
                c.allow_http = true;
            } else if !ep.starts_with("https://") {
                return Err(invalid(uri, "endpoint is an http:// or https:// URL"));
            }
        }
        Ok(c)
    }

    /// The same bucket and settings with `sub` appended to the prefix.
    pub fn child(&self, sub: &str) -> S3Config {
        let mut c = self.clone();
        c.prefix = join(&self.prefix, sub);
        c
    }

    /// Connects (no request is made yet).
    pub fn store(&self) -> Result<Arc<dyn ObjectStore>> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_allow_http(self.allow_http)
            // A dead server is an error within seconds, not minutes.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(10),
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60))
                    .with_allow_http(self.allow_http),
            );
        if let Some(ep) = &self.endpoint {
            // Path-style: S3-compatible servers rarely have per-bucket DNS.
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
        }
        if let Some(f) = &self.credentials_file {
            let (id, secret, token) = read_credentials(FsPath::new(f))?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = token {
                b = b.with_token(t);
            }
        }
        let s = b
            .build()
            .map_err(|e| Error::InvalidArgument(format!("s3://{}: {e}", self.bucket)))?;
        Ok(Arc::new(s))
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// Reads `access_key_id`, `secret_access_key` and `session_token` lines.
fn read_credentials(path: &FsPath) -> Result<(String, String, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidArgument(format!("S3 credentials file {}: {e}", path.display()))
    })?;
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let id = get("access_key_id");
    let secret = get("secret_access_key");
    let token = get("session_token");
    match (id, secret) {
        (Some(i), Some(s)) if !i.is_empty() && !s.is_empty() => Ok((i, s, token)),
        _ => Err(Error::InvalidArgument(format!(
            "S3 credentials file {} needs access_key_id = ... and secret_access_key = ...",
            path.display()
        ))),
    }
}

/// Maps an object store error to the engine's kinds.
pub(crate) fn s3_error(what: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let msg = format!("S3 {what}: {e}");
    match e {
        E::NotFound { .. } => Error::NotFound(msg),
        E::AlreadyExists { .. } => Error::AlreadyExists(msg),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => Error::InvalidArgument(format!(
            "{msg} (check the credentials and the bucket's policy)"
        )),
        E::Precondition { .. } | E::NotModified { .. } => Error::FailedPrecondition(msg),
        // object_store reports some refusals only as text (listings).
        _ if [
            "403 Forbidden",
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
        ]
        .iter()
        .any(|m| msg.contains(m)) =>
        {
            Error::InvalidArgument(format!(
                "{msg} (check the credentials and the bucket's policy)"
            ))
        }
        _ if msg.contains("NoSuchBucket") => Error::NotFound(msg),
        // Connection refused, timeouts, 5xx after retries: worth retrying.
        _ => Error::Unavailable(msg),
    }
}

/// A region stored as one S3 object per chunk; see the module docs.
pub struct S3 {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    size: u64,
    chunk: u64,
    stripes: Box<[Mutex<()>]>,
}

impl S3 {
    /// Opens the region under `cfg`'s prefix: `size` bytes in chunks of
    /// `chunk`. Checks (or records) the chunk size, which also proves the
    /// bucket exists and the credentials work.
    pub async fn open(cfg: &S3Config, size: u64, chunk: u64) -> Result<S3> {
        if chunk == 0 || chunk > MAX_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "S3 chunk size must be between 1 byte and {} MiB",
                MAX_CHUNK >> 20
            )));
        }
        let store = cfg.store()?;
        let s3 = S3 {
            store,
            prefix: cfg.prefix.clone(),
            size,
            chunk,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        };
        s3.check_chunk_size(cfg).await?;
        Ok(s3)
    }

    async fn check_chunk_size(&self, cfg: &S3Config) -> Result<()> {
        let meta = Path::from(join(&self.prefix, "r3map-chunk-size"));
        let where_ = format!("s3://{}/{}", cfg.bucket, cfg.prefix);
        // A listing fails on a missing bucket, where a PUT might create
        // it (some servers do) and a GET only says "no such key".
        let probe = Path::from(self.prefix.clone());
        if let Err(e) = self.store.list_with_delimiter(Some(&probe)).await {
            let missing = matches!(e, object_store::Error::NotFound { .. })
                || e.to_string().contains("NoSuchBucket");
            if missing {
                return Err(Error::NotFound(format!(
                    "S3 bucket {:?} does not exist (at {})",
                    cfg.bucket,
                    cfg.endpoint.as_deref().unwrap_or("AWS")
                )));
            }
            return Err(s3_error(&format!("opening {where_}"), e));
        }
        match self.store.get(&meta).await {
            Ok(r) => {
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| s3_error(&format!("reading {meta}"), e))?;
                let stored: u64 = std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| Error::io(format!("{where_}: bad chunk-size record")))?;
                if stored != self.chunk {
                    return Err(Error::FailedPrecondition(format!(
                        "{where_} holds chunks of {stored} bytes, not {}",
                        self.chunk
                    )));
                }
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => {
                let body = PutPayload::from(format!("{}\n", self.chunk).into_bytes());
                match self.store.put(&meta, body).await {
                    Ok(_) => Ok(()),
                    // A 404 on a PUT: the bucket itself is missing.
                    Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(format!(
                        "S3 bucket {:?} does not exist (at {})",
                        cfg.bucket,
                        cfg.endpoint.as_deref().unwrap_or("AWS")
                    ))),
                    Err(e) => Err(s3_error(&format!("writing {meta}"), e)),
                }
            }
            Err(e) => Err(s3_error(&format!("opening {where_}"), e)),
        }
    }

    fn key(&self, i: u64) -> Path {
        Path::from(join(&self.prefix, &format!("c/{i:016x}")))
    }

    fn chunk_len(&self, i: u64) -> u64 {
        (self.size - i * self.chunk).min(self.chunk)
    }

    fn stripe(&self, i: u64) -> &Mutex<()> {
        &self.stripes[i as usize % STRIPES]
    }

    /// Bytes `range` of chunk `i`, zeros when it has no object. An object
    /// may be shorter than the chunk (written before the region grew): the
    /// bytes past its end read as zeros.
    async fn read_piece(&self, i: u64, range: Range<u64>, out: &mut [u8]) -> Result<()> {
        let key = self.key(i);
        let got = match self.store.get_range(&key, range.clone()).await {
            Ok(b) => Some(b),
            Err(object_store::Error::NotFound { .. }) => None,
            // The range starts past the object's end (416): only a resize
            // does that; read what the object has.
            Err(e) if e.to_string().contains("416") || e.to_string().contains("InvalidRange") => {
                match self.store.get(&key).await {
                    Ok(r) => {
                        let whole = r
                            .bytes()
                            .await
                            .map_err(|e| s3_error(&format!("reading chunk {i}"), e))?;
                        let start = (range.start as usize).min(whole.len());
                        let end = (range.end as usize).min(whole.len());
                        Some(whole.slice(start..end))
                    }
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => return Err(s3_error(&format!("reading chunk {i}"), e)),
                }
            }
            Err(e) => return Err(s3_error(&format!("reading chunk {i}"), e)),
        };
        let n = match &got {
            Some(b) if b.len() > out.len() => {
                return Err(Error::io(format!(
                    "S3 chunk {i}: got {} bytes, asked for {}",
                    b.len(),
                    out.len()
                )))
            }
            Some(b) => {
                out[..b.len()].copy_from_slice(b);
                b.len()
            }
            None => 0,
        };
        out[n..].fill(0);
        Ok(())
    }

    async fn put_chunk(&self, i: u64, data: Bytes) -> Result<()> {
        self.store
            .put(&self.key(i), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| s3_error(&format!("writing chunk {i}"), e))
    }

    /// Replaces bytes `within..within+n` of chunk `i` with `piece`, or with
    /// zeros when `piece` is `None` (a read-modify-write of the chunk's
    /// object unless the whole chunk is covered).
    async fn modify(&self, i: u64, within: u64, piece: Option<&[u8]>, n: u64) -> Result<()> {
        let len = self.chunk_len(i);
        let _g = self.stripe(i).lock().await;
        if within == 0 && n == len {
            return match piece {
                Some(p) => self.put_chunk(i, Bytes::copy_from_slice(p)).await,
                None => match self.store.delete(&self.key(i)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(s3_error(&format!("deleting chunk {i}"), e)),
                },
            };
        }
        let mut whole = vec![0u8; len as usize];
        let existed = match self.store.get(&self.key(i)).await {
            Ok(r) => {
                let b = r
                    .bytes()
                    .await
                    .map_err(|e| s3_error(&format!("reading chunk {i}"), e))?;
                let m = b.len().min(whole.len());
                whole[..m].copy_from_slice(&b[..m]);
                true
            }
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(s3_error(&format!("reading chunk {i}"), e)),
        };
        if piece.is_none() && !existed {
            return Ok(()); // zeroing what reads as zeros already
        }
        let dst = &mut whole[within as usize..(within + n) as usize];
        match piece {
            Some(p) => dst.copy_from_slice(p),
            None => dst.fill(0),
        }
        self.put_chunk(i, Bytes::from(whole)).await
    }
}

#[async_trait]
impl Backend for S3 {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        // Chunks are independent objects: fetch them concurrently.
        let mut parts: Vec<(u64, u64, &mut [u8])> = Vec::new();
        let mut rest = buf;
        for (i, within, _, n) in chunk_spans(offset, rest.len() as u64, self.chunk) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n as usize);
            parts.push((i, within, head));
            rest = tail;
        }
        let futs = parts
            .into_iter()
            .map(|(i, within, out)| {
                let n = out.len() as u64;
                self.read_piece(i, within..within + n, out)
            })
            .collect::<Vec<_>>();
        for r in futures_join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        let futs = chunk_spans(offset, data.len() as u64, self.chunk)
            .map(|(i, within, pos, n)| {
                self.modify(i, within, Some(&data[pos as usize..(pos + n) as usize]), n)
            })
            .collect::<Vec<_>>();
        for r in futures_join_all(futs).await {
            r?;
        }
        Ok(())
    }

    /// Every write is durable once it returned (S3 acknowledges a PUT
    /// after storing it): nothing is buffered here.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        let futs = chunk_spans(offset, len, self.chunk)
            .map(|(i, within, _, n)| self.modify(i, within, None, n))
            .collect::<Vec<_>>();
        for r in futures_join_all(futs).await {
            r?;
        }
        Ok(())
    }
}

/// Runs futures concurrently on this task and returns their outputs in
/// order (a request's chunks, so a handful).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let c =
            S3Config::parse("s3://bkt/a/b/?endpoint=http://127.0.0.1:9000&region=eu-1").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bkt", "a/b"));
        assert_eq!(c.region, "eu-1");
        assert!(c.allow_http, "loopback http is allowed");
        assert_eq!(c.child("regions/x").prefix, "a/b/regions/x");
        let c = S3Config::parse("s3://bkt").unwrap();
        assert_eq!(c.prefix, "");
        assert_eq!(c.child("x").prefix, "x");
        for bad in [
            "s3://",
            "s3://AB",
            "s3://bkt/../x",
            "s3://bkt/p?endpoint=http://10.0.0.1:9000",
            "s3://bkt/p?endpoint=ftp://h",
            "s3://bkt/p?nope=1",
            "s3://bkt/p?region=",
        ] {
            assert!(S3Config::parse(bad).is_err(), "{bad}");
        }
        assert!(
            S3Config::parse("s3://bkt/p?endpoint=http://10.0.0.1:9000&allow-http=true").is_ok()
        );
    }

    #[test]
    fn credentials_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c");
        std::fs::write(&f, "access_key_id = AK\nsecret_access_key= SK \n").unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("AK".into(), "SK".into(), None)
        );
        std::fs::write(&f, "access_key_id = AK\n").unwrap();
        let e = read_credentials(&f).unwrap_err();
        assert!(
            !e.to_string().contains("AK"),
            "no secret material in errors: {e}"
        );
    }

    #[test]
    fn debug_shows_no_secret_path_content() {
        let c = S3Config::parse("s3://bkt/p?credentials-file=/etc/r3map/s3").unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("bkt") && !s.contains("/etc/r3map/s3"), "{s}");
    }
}
