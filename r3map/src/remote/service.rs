//! The `RegionStore` gRPC service: many regions in one process.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedRwLockReadGuard, RwLock};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::region_store_server::{RegionStore, RegionStoreServer};
use super::pb::*;
use super::store::Store;
use super::{check_id, READ_PIECE};
use crate::backend::{check_range, Backend};
use crate::Error;

type Res<T> = Result<T, Error>;

/// A region's backend; `None` once deleted. Every request holds the lock
/// shared while it runs; resize and delete hold it exclusively, so no
/// request lands in a backend that is being replaced or removed.
type Slot = Arc<RwLock<Option<Arc<dyn Backend>>>>;

pub struct RegionService {
    store: Store,
    chunk: u64,
    max_request: u64,
    regions: std::sync::RwLock<HashMap<String, Slot>>,
    /// Serializes create, resize and delete.
    admin: Mutex<()>,
}

impl RegionService {
    /// Opens every region recorded in `store`.
    pub async fn open(store: Store, chunk: u64, max_request: u64) -> Res<Arc<Self>> {
        if max_request == 0 {
            return Err(Error::InvalidArgument(
                "the maximum request size must be positive".into(),
            ));
        }
        let mut regions = HashMap::new();
        for (id, size) in store.load().await? {
            let b = store.open_region(&id, size, chunk).await?;
            regions.insert(id, Arc::new(RwLock::new(Some(b))));
        }
        Ok(Arc::new(RegionService {
            store,
            chunk,
            max_request,
            regions: std::sync::RwLock::new(regions),
            admin: Mutex::new(()),
        }))
    }

    /// The gRPC server of this service, accepting writes of up to
    /// `max_request` bytes (a little more, so an oversized one reaches our
    /// check and gets INVALID_ARGUMENT rather than a decoding error).
    pub fn server(self: &Arc<Self>) -> RegionStoreServer<Handle> {
        let limit = (self.max_request as usize).saturating_add(64 << 10);
        RegionStoreServer::new(Handle(self.clone())).max_decoding_message_size(limit)
    }

    pub fn len(&self) -> usize {
        self.regions.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flushes every region (on shutdown).
    pub async fn flush_all(&self) -> Res<()> {
        let slots: Vec<Slot> = self.regions.read().unwrap().values().cloned().collect();
        for s in slots {
            if let Some(b) = &*s.read().await {
                b.flush().await?;
            }
        }
        Ok(())
    }

    fn slot(&self, id: &str) -> Res<Slot> {
        self.regions
            .read()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// The region's backend, held shared until the guard drops.
    async fn backend(&self, id: &str) -> Res<OwnedRwLockReadGuard<Option<Arc<dyn Backend>>>> {
        let g = self.slot(id)?.read_owned().await;
        if g.is_none() {
            return Err(not_found(id));
        }
        Ok(g)
    }

    fn check_len(&self, len: u64) -> Res<()> {
        if len > self.max_request {
            return Err(Error::InvalidArgument(format!(
                "request of {len} bytes is over the maximum of {} bytes",
                self.max_request
            )));
        }
        Ok(())
    }

    async fn create(&self, id: Option<String>, size: u64) -> Res<Region> {
        let id = match id {
            Some(id) => id,
            None => new_id()?,
        };
        check_id(&id)?;
        let _admin = self.admin.lock().await;
        if let Ok(slot) = self.slot(&id) {
            let have = slot.read().await.as_ref().map(|b| b.size());
            if let Some(have) = have {
                if have == size {
                    return Ok(Region { id, size });
                }
                return Err(Error::AlreadyExists(format!(
                    "region {id:?} already exists with {have} bytes"
                )));
            }
        }
        self.store.create(&id, size).await?;
        let b = self.store.open_region(&id, size, self.chunk).await?;
        self.regions
            .write()
            .unwrap()
            .insert(id.clone(), Arc::new(RwLock::new(Some(b))));
        tracing::info!(region = %id, size, "created");
        Ok(Region { id, size })
    }

    async fn delete(&self, id: &str) -> Res<()> {
        let _admin = self.admin.lock().await;
        let slot = self.slot(id)?;
        // Waits for the requests in flight; later ones find it gone.
        let mut g = slot.write().await;
        self.store.delete(id).await?;
        *g = None;
        self.regions.write().unwrap().remove(id);
        tracing::info!(region = %id, "deleted");
        Ok(())
    }

    async fn resize(&self, id: &str, size: u64) -> Res<Region> {
        let _admin = self.admin.lock().await;
        let slot = self.slot(id)?;
        let mut g = slot.write().await;
        let old = g.as_ref().ok_or_else(|| not_found(id))?.clone();
        let old_size = old.size();
        if size == old_size {
            return Ok(Region {
                id: id.to_string(),
                size,
            });
        }
        if size < old_size {
            // Discarded now, so a later grow reads zeros there.
            old.trim(size, old_size - size).await?;
        }
        // The new backend value does not know what the old one left
        // unflushed.
        old.flush().await?;
        let new = self.store.open_region(id, size, self.chunk).await?;
        if self.store.is_memory() {
            copy(&*old, &*new, size.min(old_size)).await?;
        } else {
            self.store.set_size(id, size).await?;
        }
        *g = Some(new);
        tracing::info!(region = %id, old_size, size, "resized");
        Ok(Region {
            id: id.to_string(),
            size,
        })
    }
}

/// Copies the first `len` bytes, skipping all-zero pieces (a new region
/// reads zeros already, and a sparse one stays sparse).
async fn copy(from: &dyn Backend, to: &dyn Backend, len: u64) -> Res<()> {
    let mut buf = vec![0u8; READ_PIECE as usize];
    let mut pos = 0;
    while pos < len {
        let n = READ_PIECE.min(len - pos) as usize;
        from.read_at(pos, &mut buf[..n]).await?;
        if buf[..n].iter().any(|&b| b != 0) {
            to.write_at(pos, &buf[..n]).await?;
        }
        pos += n as u64;
    }
    Ok(())
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no region {id:?}"))
}

/// A fresh random id: 16 hex digits from the kernel's generator.
fn new_id() -> Res<String> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(crate::backend::Error::from)?;
    Ok(format!("r-{:016x}", u64::from_be_bytes(b)))
}

/// What tonic serves: a cheap handle on the shared service.
#[derive(Clone)]
pub struct Handle(pub Arc<RegionService>);

type ReadStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ReadChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RegionStore for Handle {
    async fn get_limits(&self, _: Request<GetLimitsRequest>) -> Result<Response<Limits>, Status> {
        Ok(Response::new(Limits {
            max_request: self.0.max_request,
            read_piece: READ_PIECE,
        }))
    }

    async fn create_region(
        &self,
        req: Request<CreateRegionRequest>,
    ) -> Result<Response<Region>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.create(r.id, r.size).await?))
    }

    async fn delete_region(
        &self,
        req: Request<DeleteRegionRequest>,
    ) -> Result<Response<DeleteRegionReply>, Status> {
        self.0.delete(&req.into_inner().id).await?;
        Ok(Response::new(DeleteRegionReply {}))
    }

    async fn list_regions(
        &self,
        _: Request<ListRegionsRequest>,
    ) -> Result<Response<ListRegionsReply>, Status> {
        let slots: Vec<(String, Slot)> = self
            .0
            .regions
            .read()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut regions = Vec::with_capacity(slots.len());
        for (id, s) in slots {
            if let Some(b) = &*s.read().await {
                regions.push(Region { id, size: b.size() });
            }
        }
        regions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(ListRegionsReply { regions }))
    }

    async fn get_region(&self, req: Request<GetRegionRequest>) -> Result<Response<Region>, Status> {
        let id = req.into_inner().id;
        let size = self.0.backend(&id).await?.as_ref().expect("checked").size();
        Ok(Response::new(Region { id, size }))
    }

    async fn resize_region(
        &self,
        req: Request<ResizeRegionRequest>,
    ) -> Result<Response<Region>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.resize(&r.id, r.size).await?))
    }

    type ReadStream = ReadStream;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let r = req.into_inner();
        self.0.check_len(r.length)?;
        let g = self.0.backend(&r.region).await?;
        // Checked before the stream starts, so the caller gets the error
        // as the call's status.
        let size = g.as_ref().expect("checked").size();
        check_range(r.offset, r.length, size)?;
        // Two pieces in flight: the next is read while one is sent.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let b = g.as_ref().expect("checked");
            let end = r.offset + r.length;
            let mut pos = r.offset;
            while pos < end {
                let n = READ_PIECE.min(end - pos);
                let mut data = vec![0u8; n as usize];
                let item = match b.read_at(pos, &mut data).await {
                    Ok(()) => Ok(ReadChunk {
                        offset: pos,
                        data: data.into(),
                    }),
                    Err(e) => Err(Status::from(e)),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return; // the caller went away, or has its error
                }
                pos += n;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let r = req.into_inner();
        self.0.check_len(r.data.len() as u64)?;
        let g = self.0.backend(&r.region).await?;
        g.as_ref()
            .expect("checked")
            .write_at(r.offset, &r.data)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(WriteReply {}))
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<FlushReply>, Status> {
        let g = self.0.backend(&req.into_inner().region).await?;
        g.as_ref()
            .expect("checked")
            .flush()
            .await
            .map_err(Status::from)?;
        Ok(Response::new(FlushReply {}))
    }

    async fn trim(&self, req: Request<RangeRequest>) -> Result<Response<RangeReply>, Status> {
        let r = req.into_inner();
        let g = self.0.backend(&r.region).await?;
        g.as_ref()
            .expect("checked")
            .trim(r.offset, r.length)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(RangeReply {}))
    }

    async fn write_zeroes(
        &self,
        req: Request<RangeRequest>,
    ) -> Result<Response<RangeReply>, Status> {
        let r = req.into_inner();
        let g = self.0.backend(&r.region).await?;
        g.as_ref()
            .expect("checked")
            .write_zeroes(r.offset, r.length)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(RangeReply {}))
    }
}
