//! Where the regions of `r3map backend` live, and how each is recorded so
//! that a restarted server lists them again:
//!
//! - `memory:` — in RAM; nothing is recorded, nothing survives.
//! - `dir:PATH` — region `ID` is the chunk directory `PATH/ID`; its
//!   metadata (size, fencing epoch and owner) is in `PATH/ID/r3map-region`,
//!   written aside and renamed, last on create (and removed first on
//!   delete), so a directory without it is a leftover and never listed.
//! - `redis://HOST:PORT/DB?prefix=P` — region `ID` is the key prefix `P:ID`,
//!   its size is in `P:ID:size`, its epoch and owner in `P:ID:fence`
//!   (`EPOCH OWNER`), and the ids are in the set `P:regions` (added last on
//!   create, removed first on delete).
//!
//! The epoch is written durably before a fence returns: a restarted server
//! keeps refusing the writers it fenced.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::aio::MultiplexedConnection;

use crate::backend::s3::{self, s3_error};
use crate::backend::{dir, memory, redis as redis_backend, Backend, Error, Result};
use object_store::path::Path as ObjPath;

/// Name of the metadata file in a region's directory.
pub const META_FILE: &str = "r3map-region";

/// Open chunk files kept per region: one server holds many regions, so
/// fewer than a single-region mount.
const OPEN_FILES_PER_REGION: usize = 64;

/// What the store records of a region besides its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionMeta {
    /// Size in bytes.
    pub size: u64,
    /// Fencing epoch; 0 until the region is first fenced.
    pub epoch: u64,
    /// Who holds `epoch` (empty before the first fence).
    pub owner: String,
}

impl RegionMeta {
    /// A never-fenced region of `size` bytes.
    pub fn new(size: u64) -> Self {
        RegionMeta {
            size,
            ..Default::default()
        }
    }
}

/// A store of regions; see the module docs.
pub enum Store {
    /// `memory:`: regions in RAM, gone with the process.
    Memory,
    /// `dir:PATH`: a directory a region.
    Dir(PathBuf),
    /// `redis://...`: keys under a prefix.
    Redis {
        /// The redis URL, without our `prefix` parameter.
        url: String,
        /// The key prefix of the store.
        prefix: String,
        /// A connection shared by every region.
        conn: MultiplexedConnection,
    },
    /// Region `ID` is the prefix `PREFIX/regions/ID/` of an S3 bucket (one
    /// object per chunk, see [`s3`]); its metadata is the object
    /// `PREFIX/regions/ID/r3map-region` (PUT last on create, deleted first
    /// on delete; an object PUT replaces the old one atomically).
    S3 {
        /// Bucket, prefix, endpoint and credentials.
        cfg: s3::S3Config,
        /// The client, shared by every region.
        store: Arc<dyn object_store::ObjectStore>,
    },
}

impl Store {
    /// Opens the store named by `uri`: `memory:`, `dir:PATH` or
    /// `redis://HOST:PORT/DB[?prefix=P]`.
    pub async fn open(uri: &str) -> Result<Store> {
        let invalid = |reason: &str| Error::InvalidUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if uri == "memory:" {
            return Ok(Store::Memory);
        }
        if let Some(path) = uri.strip_prefix("dir:") {
            if path.is_empty() {
                return Err(invalid("dir: needs a path"));
            }
            std::fs::create_dir_all(path)?;
            return Ok(Store::Dir(PathBuf::from(path)));
        }
        if uri.starts_with("redis://") {
            let (url, prefix) = redis_backend::split_prefix(uri)?;
            let conn = redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            return Ok(Store::Redis { url, prefix, conn });
        }
        if uri.starts_with("s3://") {
            let cfg = s3::S3Config::parse(uri)?;
            let store = cfg.store()?;
            let s = Store::S3 { cfg, store };
            // Fails now on a missing bucket or a bad credential.
            s.load().await?;
            return Ok(s);
        }
        Err(invalid(
            "a region store is memory:, dir:PATH, redis://HOST:PORT/DB?prefix=NAME or s3://BUCKET/PREFIX?...",
        ))
    }

    /// The regions recorded in the store.
    pub async fn load(&self) -> Result<Vec<(String, RegionMeta)>> {
        match self {
            Store::Memory => Ok(Vec::new()),
            Store::Dir(root) => {
                let mut out = Vec::new();
                for e in std::fs::read_dir(root)? {
                    let e = e?;
                    let Some(id) = e.file_name().to_str().map(str::to_string) else {
                        continue;
                    };
                    if super::check_id(&id).is_err() || !e.file_type()?.is_dir() {
                        continue;
                    }
                    if let Some(meta) = read_meta(&e.path())? {
                        out.push((id, meta));
                    }
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
            Store::S3 { cfg, store } => {
                let root = ObjPath::from(cfg.child("regions").prefix);
                let listed = store
                    .list_with_delimiter(Some(&root))
                    .await
                    .map_err(|e| s3_error(&format!("listing {root}"), e))?;
                let mut out = Vec::new();
                for p in listed.common_prefixes {
                    let Some(id) = p.filename().map(str::to_string) else {
                        continue;
                    };
                    if super::check_id(&id).is_err() {
                        continue;
                    }
                    if let Some(meta) = s3_meta(store.as_ref(), &s3_meta_key(cfg, &id)).await? {
                        out.push((id, meta));
                    }
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
            Store::Redis { prefix, conn, .. } => {
                let mut conn = conn.clone();
                let ids: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(format!("{prefix}:regions"))
                    .query_async(&mut conn)
                    .await?;
                let mut out = Vec::new();
                for id in ids {
                    let (size, fence): (Option<u64>, Option<String>) = redis::pipe()
                        .cmd("GET")
                        .arg(size_key(prefix, &id))
                        .cmd("GET")
                        .arg(fence_key(prefix, &id))
                        .query_async(&mut conn)
                        .await?;
                    if let Some(size) = size {
                        let (epoch, owner) = parse_fence(fence.as_deref().unwrap_or("0 "))?;
                        out.push((id, RegionMeta { size, epoch, owner }));
                    }
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(out)
            }
        }
    }

    /// Records a new region, first wiping whatever a half-done delete left
    /// under its name, so the region starts all zeros.
    pub async fn create(&self, id: &str, size: u64) -> Result<()> {
        match self {
            Store::Memory => Ok(()),
            Store::Dir(root) => {
                let dir = root.join(id);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                std::fs::create_dir(&dir)?;
                write_meta(&dir, &RegionMeta::new(size))
            }
            Store::S3 { cfg, store } => {
                // Whatever a half-done delete left goes first; the
                // metadata object last.
                s3_delete_prefix(store.as_ref(), &cfg.child(&format!("regions/{id}")).prefix)
                    .await?;
                s3_put_meta(
                    store.as_ref(),
                    &s3_meta_key(cfg, id),
                    &RegionMeta::new(size),
                )
                .await
            }
            Store::Redis { prefix, conn, .. } => {
                let mut conn = conn.clone();
                del_region_keys(&mut conn, prefix, id).await?;
                let () = redis::pipe()
                    .cmd("SET")
                    .arg(size_key(prefix, id))
                    .arg(size)
                    .ignore()
                    .cmd("SADD")
                    .arg(format!("{prefix}:regions"))
                    .arg(id)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }

    /// Records new metadata (size, epoch, owner) of an existing region,
    /// durably and atomically (the old record or the new, never a mix).
    pub async fn set_meta(&self, id: &str, meta: &RegionMeta) -> Result<()> {
        match self {
            Store::Memory => Ok(()),
            Store::Dir(root) => {
                let (dir, meta) = (root.join(id), meta.clone());
                tokio::task::spawn_blocking(move || write_meta(&dir, &meta))
                    .await
                    .map_err(|e| Error::io(e.to_string()))?
            }
            Store::S3 { cfg, store } => {
                s3_put_meta(store.as_ref(), &s3_meta_key(cfg, id), meta).await
            }
            Store::Redis { prefix, conn, .. } => {
                let () = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(size_key(prefix, id))
                    .arg(meta.size)
                    .ignore()
                    .cmd("SET")
                    .arg(fence_key(prefix, id))
                    .arg(format!("{} {}", meta.epoch, meta.owner))
                    .ignore()
                    .query_async(&mut conn.clone())
                    .await?;
                Ok(())
            }
        }
    }

    /// Forgets a region and deletes its data.
    pub async fn delete(&self, id: &str) -> Result<()> {
        match self {
            Store::Memory => Ok(()),
            Store::Dir(root) => {
                let dir = root.join(id);
                // The metadata goes first: from then on the region is gone
                // even if removing the chunks is cut short.
                std::fs::remove_file(dir.join(META_FILE))?;
                std::fs::File::open(&dir)?.sync_all()?;
                std::fs::remove_dir_all(&dir)?;
                Ok(())
            }
            Store::S3 { cfg, store } => {
                let key = s3_meta_key(cfg, id);
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(s3_error(&format!("deleting {key}"), e)),
                }
                s3_delete_prefix(store.as_ref(), &cfg.child(&format!("regions/{id}")).prefix).await
            }
            Store::Redis { prefix, conn, .. } => {
                let mut conn = conn.clone();
                let () = redis::cmd("SREM")
                    .arg(format!("{prefix}:regions"))
                    .arg(id)
                    .query_async(&mut conn)
                    .await?;
                del_region_keys(&mut conn, prefix, id).await
            }
        }
    }

    /// Opens the backend of a recorded region. `memory:` has nothing to
    /// reopen: the service keeps (and on resize, copies) its regions.
    pub async fn open_region(&self, id: &str, size: u64, chunk: u64) -> Result<Arc<dyn Backend>> {
        match self {
            Store::Memory => Ok(Arc::new(memory::Memory::new(size, chunk))),
            Store::Dir(root) => Ok(Arc::new(dir::Dir::open(
                &root.join(id),
                size,
                chunk,
                OPEN_FILES_PER_REGION,
            )?)),
            Store::S3 { cfg, .. } => Ok(Arc::new(
                s3::S3::open(&cfg.child(&format!("regions/{id}")), size, chunk).await?,
            )),
            Store::Redis { url, prefix, .. } => Ok(Arc::new(
                redis_backend::Redis::connect(url, &format!("{prefix}:{id}"), size, chunk).await?,
            )),
        }
    }

    /// True when a region's bytes live only in its backend value, so a
    /// resize must copy them into a new one.
    pub fn is_memory(&self) -> bool {
        matches!(self, Store::Memory)
    }
}

fn s3_meta_key(cfg: &s3::S3Config, id: &str) -> ObjPath {
    ObjPath::from(cfg.child(&format!("regions/{id}/{META_FILE}")).prefix)
}

async fn s3_meta(
    store: &dyn object_store::ObjectStore,
    key: &ObjPath,
) -> Result<Option<RegionMeta>> {
    match store.get(key).await {
        Ok(r) => {
            let b = r
                .bytes()
                .await
                .map_err(|e| s3_error(&format!("reading {key}"), e))?;
            let text = String::from_utf8_lossy(&b);
            parse_meta(&text, key.as_ref()).map(Some)
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(s3_error(&format!("reading {key}"), e)),
    }
}

async fn s3_put_meta(
    store: &dyn object_store::ObjectStore,
    key: &ObjPath,
    m: &RegionMeta,
) -> Result<()> {
    let body = object_store::PutPayload::from(meta_text(m).into_bytes());
    store
        .put(key, body)
        .await
        .map(|_| ())
        .map_err(|e| s3_error(&format!("writing {key}"), e))
}

/// Deletes every object under `prefix/`.
async fn s3_delete_prefix(store: &dyn object_store::ObjectStore, prefix: &str) -> Result<()> {
    use tokio_stream::StreamExt;
    let root = ObjPath::from(prefix);
    let mut keys = Vec::new();
    let mut list = store.list(Some(&root));
    while let Some(m) = list.next().await {
        keys.push(
            m.map_err(|e| s3_error(&format!("listing {root}"), e))?
                .location,
        );
    }
    drop(list);
    for k in keys {
        match store.delete(&k).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(s3_error(&format!("deleting {k}"), e)),
        }
    }
    Ok(())
}

fn size_key(prefix: &str, id: &str) -> String {
    format!("{prefix}:{id}:size")
}

fn fence_key(prefix: &str, id: &str) -> String {
    format!("{prefix}:{id}:fence")
}

/// `EPOCH OWNER` (owner possibly empty).
fn parse_fence(s: &str) -> Result<(u64, String)> {
    let (e, o) = s.split_once(' ').unwrap_or((s, ""));
    let epoch = e
        .parse()
        .map_err(|_| Error::io(format!("bad fencing record {s:?}")))?;
    Ok((epoch, o.to_string()))
}

/// Deletes every key of region `id` (chunks, chunk size, size).
async fn del_region_keys(conn: &mut MultiplexedConnection, prefix: &str, id: &str) -> Result<()> {
    // Ids hold no glob characters (check_id); the prefix might.
    let pattern = format!("{}:{id}:*", glob_escape(prefix));
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let () = redis::cmd("DEL").arg(&keys).query_async(conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn read_meta(dir: &Path) -> Result<Option<RegionMeta>> {
    let path = dir.join(META_FILE);
    let s = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    parse_meta(&s, &path.display().to_string()).map(Some)
}

/// The metadata record's text: `size N`, `epoch E`, `owner O` lines.
fn meta_text(m: &RegionMeta) -> String {
    format!("size {}\nepoch {}\nowner {}\n", m.size, m.epoch, m.owner)
}

fn parse_meta(s: &str, what: &str) -> Result<RegionMeta> {
    let field = |name: &str| s.lines().find_map(|l| l.strip_prefix(name));
    let size = field("size ")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::io(format!("{what}: no size in {s:?}")))?;
    // Written by servers before fencing existed: never fenced.
    let epoch = match field("epoch ") {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| Error::io(format!("{what}: bad epoch in {s:?}")))?,
        None => 0,
    };
    let owner = field("owner ").unwrap_or("").trim().to_string();
    Ok(RegionMeta { size, epoch, owner })
}

/// Written aside and renamed, so a crash leaves the old record or the new.
fn write_meta(dir: &Path, m: &RegionMeta) -> Result<()> {
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, meta_text(m).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(META_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[tokio::test]
    async fn dir_records_regions() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("store");
        let uri = format!("dir:{}", root.display());
        let s = Store::open(&uri).await.unwrap();
        s.create("a", 4096).await.unwrap();
        s.create("b", 8192).await.unwrap();
        std::fs::create_dir(root.join("leftover")).unwrap();
        let b = RegionMeta {
            size: 100,
            epoch: 7,
            owner: "node-b".into(),
        };
        s.set_meta("b", &b).await.unwrap();
        assert_eq!(
            s.load().await.unwrap(),
            vec![
                ("a".to_string(), RegionMeta::new(4096)),
                ("b".to_string(), b.clone())
            ]
        );
        s.delete("a").await.unwrap();
        assert_eq!(s.load().await.unwrap(), vec![("b".to_string(), b)]);
        // A record from before fencing reads as never fenced.
        std::fs::write(root.join("b").join(META_FILE), "size 5\n").unwrap();
        assert_eq!(s.load().await.unwrap()[0].1, RegionMeta::new(5));
    }
}
