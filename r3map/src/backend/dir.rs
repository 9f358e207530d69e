//! `dir:PATH` — one sparse file per chunk, named by chunk index, with a
//! bounded cache of open files. A chunk with no file reads as zeros.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use lru::LruCache;

use super::file::punch_hole;
use super::{check_range, chunk_spans, Backend, Error, Result};

/// Open files kept per region; more chunks than this reopen on use.
pub const DEFAULT_OPEN_FILES: usize = 256;

/// Stripes of [`Dir::gates`]; chunks share a stripe by index modulo this.
const GATES: usize = 64;

/// A region stored as one file per chunk under a directory.
///
/// Chunk `i` lives in `{i:016x}.chunk` and holds bytes `i*chunk ..`; a file
/// is only as long as its furthest write, and a missing file or the bytes
/// past its end read as zeros. A trim that covers a whole chunk deletes its
/// file; a partial one punches a hole. Writes go to the page cache and are
/// made durable by [`Backend::flush`], which fsyncs the chunk files written
/// since the last flush (and the directory when files came or went).
pub struct Dir {
    root: PathBuf,
    size: u64,
    chunk: u64,
    open: Mutex<LruCache<u64, Arc<File>>>,
    /// Held shared while a chunk file is opened and cached, exclusively
    /// while one is uncached and deleted: otherwise an open that raced a
    /// delete could cache the deleted file, and later writes to the chunk
    /// would land in it and be lost when it is evicted.
    gates: Box<[RwLock<()>]>,
    /// Chunks written since the last flush; fsynced by the next one.
    dirty: Mutex<HashSet<u64>>,
    /// A chunk file was created or removed: the directory needs an fsync too.
    dir_dirty: std::sync::atomic::AtomicBool,
}

impl Dir {
    /// Opens (creating it if needed) the directory `root` as a region of
    /// `size` bytes in chunks of `chunk` bytes, keeping at most `max_open`
    /// chunk files open.
    ///
    /// The chunk size is recorded in the directory on first use: reopening
    /// with another one is refused, since every chunk file would be read at
    /// the wrong offset.
    pub fn open(root: &Path, size: u64, chunk: u64, max_open: usize) -> Result<Self> {
        if chunk == 0 {
            return Err(Error::InvalidArgument("chunk size must be positive".into()));
        }
        std::fs::create_dir_all(root)?;
        check_chunk_size(root, chunk)?;
        Ok(Dir {
            root: root.to_path_buf(),
            size,
            chunk,
            open: Mutex::new(LruCache::new(NonZeroUsize::new(max_open.max(1)).unwrap())),
            gates: (0..GATES).map(|_| RwLock::new(())).collect(),
            dirty: Mutex::new(HashSet::new()),
            dir_dirty: Default::default(),
        })
    }

    fn path(&self, idx: u64) -> PathBuf {
        self.root.join(format!("{idx:016x}.chunk"))
    }

    /// The open file of chunk `idx`; `None` when it does not exist and
    /// `create` is false.
    fn file(&self, idx: u64, create: bool) -> Result<Option<Arc<File>>> {
        if let Some(f) = self.open.lock().unwrap().get(&idx) {
            return Ok(Some(f.clone()));
        }
        let _gate = self.gate(idx).read().unwrap();
        let path = self.path(idx);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                self.dir_dirty
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let file = Arc::new(file);
        self.open.lock().unwrap().put(idx, file.clone());
        Ok(Some(file))
    }

    fn gate(&self, idx: u64) -> &RwLock<()> {
        &self.gates[idx as usize % GATES]
    }

    fn chunk_len(&self, idx: u64) -> u64 {
        (self.size - idx * self.chunk).min(self.chunk)
    }
}

/// Name of the file in the directory that records the chunk size.
pub const CHUNK_SIZE_FILE: &str = "chunk-size";

/// Records `chunk` in `root` on first use; refuses a different one later.
fn check_chunk_size(root: &Path, chunk: u64) -> Result<()> {
    let path = root.join(CHUNK_SIZE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => match s.trim().parse::<u64>() {
            Ok(c) if c == chunk => Ok(()),
            Ok(c) => Err(Error::FailedPrecondition(format!(
                "{} holds chunks of {c} bytes, not {chunk}; open it with --chunk-size {c}",
                root.display()
            ))),
            Err(_) => Err(Error::FailedPrecondition(format!(
                "{} does not hold a chunk size: {s:?}",
                path.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written aside and renamed, so a crash never leaves a torn one.
            let tmp = root.join(format!("{CHUNK_SIZE_FILE}.tmp"));
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, format!("{chunk}\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(root)?.sync_all()?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl Backend for Dir {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        for (idx, within, pos, n) in chunk_spans(offset, buf.len() as u64, self.chunk) {
            let out = &mut buf[pos as usize..(pos + n) as usize];
            let Some(file) = self.file(idx, false)? else {
                out.fill(0);
                continue;
            };
            let mut done = 0;
            while done < out.len() {
                match file.read_at(&mut out[done..], within + done as u64) {
                    Ok(0) => {
                        out[done..].fill(0); // a chunk file is only as long as its last write
                        break;
                    }
                    Ok(k) => done += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        for (idx, within, pos, n) in chunk_spans(offset, data.len() as u64, self.chunk) {
            let file = self.file(idx, true)?.expect("created");
            file.write_all_at(&data[pos as usize..(pos + n) as usize], within)?;
            self.dirty.lock().unwrap().insert(idx);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let dirty: Vec<u64> = std::mem::take(&mut *self.dirty.lock().unwrap())
            .into_iter()
            .collect();
        let mut files = Vec::with_capacity(dirty.len());
        for idx in &dirty {
            if let Some(f) = self.file(*idx, false)? {
                files.push(f);
            }
        }
        let sync_dir = self
            .dir_dirty
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let root = self.root.clone();
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for f in files {
                f.sync_data()?;
            }
            if sync_dir {
                File::open(&root)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        if res.is_err() {
            // Keep them dirty so the next flush tries again.
            self.dirty.lock().unwrap().extend(dirty);
            if sync_dir {
                self.dir_dirty
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Ok(res?)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        for (idx, within, _, n) in chunk_spans(offset, len, self.chunk) {
            if n == self.chunk_len(idx) {
                let _gate = self.gate(idx).write().unwrap();
                self.open.lock().unwrap().pop(&idx);
                match std::fs::remove_file(self.path(idx)) {
                    Ok(()) => self
                        .dir_dirty
                        .store(true, std::sync::atomic::Ordering::SeqCst),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                self.dirty.lock().unwrap().remove(&idx);
            } else if let Some(file) = self.file(idx, false)? {
                punch_hole(&file, within, n)?;
                self.dirty.lock().unwrap().insert(idx);
            }
        }
        Ok(())
    }
}
