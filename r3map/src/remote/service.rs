//! The `RegionStore` gRPC service: many regions in one process.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedRwLockReadGuard, RwLock};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::region_store_server::{RegionStore, RegionStoreServer};
use super::pb::*;
use super::store::{RegionMeta, Store};
use super::{check_id, READ_PIECE};
use crate::backend::{check_range, Backend};
use crate::Error;

type Res<T> = Result<T, Error>;

/// An open region: its backend and what the store records of it.
struct Open {
    backend: Arc<dyn Backend>,
    meta: RegionMeta,
}

impl Open {
    /// Refuses a mutating call from a writer whose epoch is not the
    /// region's: older means fenced (another writer took the region over),
    /// newer means the writer skipped `Fence`.
    fn check_epoch(&self, id: &str, epoch: u64) -> Res<()> {
        let m = &self.meta;
        if epoch == m.epoch {
            return Ok(());
        }
        if epoch < m.epoch {
            return Err(Error::Fenced(format!(
                "region {id:?} is at epoch {} (owner {:?}); this writer holds epoch {epoch} and must stop writing",
                m.epoch, m.owner
            )));
        }
        Err(Error::FailedPrecondition(format!(
            "region {id:?} is at epoch {}; epoch {epoch} was never taken (call Fence first)",
            m.epoch
        )))
    }

    fn region(&self, id: &str) -> Region {
        Region {
            id: id.to_string(),
            size: self.meta.size,
            epoch: self.meta.epoch,
            owner: self.meta.owner.clone(),
        }
    }
}

/// A region; `None` once deleted. Every request holds the lock shared while
/// it runs; resize, fence and delete hold it exclusively, so no request
/// lands in a backend that is being replaced or removed, and no write of an
/// old epoch is still running when a fence returns.
type Slot = Arc<RwLock<Option<Open>>>;

/// An open region held shared.
type RegionGuard = OwnedRwLockReadGuard<Option<Open>, Open>;

/// The `RegionStore` gRPC service of `r3map backend`: the regions of one
/// [`Store`], each opened once and shared by every call.
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
        for (id, meta) in store.load().await? {
            let backend = store.open_region(&id, meta.size, chunk).await?;
            regions.insert(id, Arc::new(RwLock::new(Some(Open { backend, meta }))));
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

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.read().unwrap().len()
    }

    /// Whether there are no regions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flushes every region (on shutdown).
    pub async fn flush_all(&self) -> Res<()> {
        let slots: Vec<Slot> = self.regions.read().unwrap().values().cloned().collect();
        for s in slots {
            if let Some(o) = &*s.read().await {
                o.backend.flush().await?;
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

    /// The open region, held shared until the guard drops.
    async fn open_region(&self, id: &str) -> Res<RegionGuard> {
        let g = self.slot(id)?.read_owned().await;
        OwnedRwLockReadGuard::try_map(g, |o| o.as_ref()).map_err(|_| not_found(id))
    }

    /// The open region, checked for a writer of `epoch`.
    async fn writable(&self, id: &str, epoch: u64) -> Res<RegionGuard> {
        let g = self.open_region(id).await?;
        g.check_epoch(id, epoch)?;
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
            let have = slot.read().await.as_ref().map(|o| o.region(&id));
            if let Some(have) = have {
                if have.size == size {
                    return Ok(have);
                }
                let have = have.size;
                return Err(Error::AlreadyExists(format!(
                    "region {id:?} already exists with {have} bytes"
                )));
            }
        }
        self.store.create(&id, size).await?;
        let backend = self.store.open_region(&id, size, self.chunk).await?;
        let open = Open {
            backend,
            meta: RegionMeta::new(size),
        };
        let region = open.region(&id);
        self.regions
            .write()
            .unwrap()
            .insert(id.clone(), Arc::new(RwLock::new(Some(open))));
        tracing::info!(region = %id, size, "created");
        Ok(region)
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
        let cur = g.as_ref().ok_or_else(|| not_found(id))?;
        let (old, mut meta) = (cur.backend.clone(), cur.meta.clone());
        let old_size = meta.size;
        if size == old_size {
            return Ok(cur.region(id));
        }
        if size < old_size {
            // Discarded now, so a later grow reads zeros there.
            old.trim(size, old_size - size).await?;
        }
        // The new backend value does not know what the old one left
        // unflushed.
        old.flush().await?;
        let new = self.store.open_region(id, size, self.chunk).await?;
        meta.size = size;
        if self.store.is_memory() {
            copy(&*old, &*new, size.min(old_size)).await?;
        } else {
            self.store.set_meta(id, &meta).await?;
        }
        let open = Open { backend: new, meta };
        let region = open.region(id);
        *g = Some(open);
        tracing::info!(region = %id, old_size, size, "resized");
        Ok(region)
    }

    /// Hands region `id` to `owner` at `epoch`; see `Fence` in remote.proto.
    async fn fence(&self, id: &str, epoch: u64, owner: &str) -> Res<Region> {
        if epoch == 0 {
            return Err(Error::InvalidArgument("fencing epochs start at 1".into()));
        }
        if owner.is_empty() || owner.len() > super::MAX_ID_LEN {
            return Err(Error::InvalidArgument(format!(
                "a fence needs an owner of 1 to {} bytes",
                super::MAX_ID_LEN
            )));
        }
        let slot = self.slot(id)?;
        // Exclusive: every write of an older epoch still running finishes
        // first, and none starts until the new epoch is recorded.
        let mut g = slot.write().await;
        let open = g.as_mut().ok_or_else(|| not_found(id))?;
        let m = &open.meta;
        if epoch == m.epoch && owner == m.owner {
            return Ok(open.region(id));
        }
        if epoch <= m.epoch {
            return Err(Error::Fenced(format!(
                "region {id:?} is at epoch {} (owner {:?}): cannot hand epoch {epoch} to {owner:?}",
                m.epoch, m.owner
            )));
        }
        // What the old writer wrote is durable before it loses the region.
        open.backend.flush().await?;
        let meta = RegionMeta {
            size: m.size,
            epoch,
            owner: owner.to_string(),
        };
        self.store.set_meta(id, &meta).await?;
        tracing::info!(region = %id, from = open.meta.epoch, epoch, owner, "fenced");
        open.meta = meta;
        Ok(open.region(id))
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
            if let Some(o) = &*s.read().await {
                regions.push(o.region(&id));
            }
        }
        regions.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(ListRegionsReply { regions }))
    }

    async fn get_region(&self, req: Request<GetRegionRequest>) -> Result<Response<Region>, Status> {
        let id = req.into_inner().id;
        Ok(Response::new(self.0.open_region(&id).await?.region(&id)))
    }

    async fn resize_region(
        &self,
        req: Request<ResizeRegionRequest>,
    ) -> Result<Response<Region>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.resize(&r.id, r.size).await?))
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<Region>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.fence(&r.id, r.epoch, &r.owner).await?))
    }

    type ReadStream = ReadStream;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let r = req.into_inner();
        self.0.check_len(r.length)?;
        let g = self.0.open_region(&r.region).await?;
        // Checked before the stream starts, so the caller gets the error
        // as the call's status.
        let size = g.meta.size;
        check_range(r.offset, r.length, size)?;
        // Two pieces in flight: the next is read while one is sent.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let b = &g.backend;
            let end = r.offset + r.length;
            let mut pos = r.offset;
            while pos < end {
                let n = READ_PIECE.min(end - pos);
                // As the store hands them out: `memory:` lends slices of
                // its chunks, the others read into a new buffer.
                let pieces = match b.read_pieces(pos, n).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                for data in pieces {
                    let len = data.len() as u64;
                    if tx.send(Ok(ReadChunk { offset: pos, data })).await.is_err() {
                        return; // the caller went away
                    }
                    pos += len;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let r = req.into_inner();
        self.0.check_len(r.data.len() as u64)?;
        let g = self.0.writable(&r.region, r.epoch).await?;
        g.backend
            .write_at(r.offset, &r.data)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(WriteReply {}))
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<FlushReply>, Status> {
        let r = req.into_inner();
        let g = self.0.writable(&r.region, r.epoch).await?;
        g.backend.flush().await.map_err(Status::from)?;
        Ok(Response::new(FlushReply {}))
    }

    async fn trim(&self, req: Request<RangeRequest>) -> Result<Response<RangeReply>, Status> {
        let r = req.into_inner();
        let g = self.0.writable(&r.region, r.epoch).await?;
        g.backend
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
        let g = self.0.writable(&r.region, r.epoch).await?;
        g.backend
            .write_zeroes(r.offset, r.length)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(RangeReply {}))
    }
}
