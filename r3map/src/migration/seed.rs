//! The source side: the `Seed` gRPC service over a [`Tracked`](super::Tracked) region, and
//! [`SeedClient`], the destination's read-only [`Backend`] view of a seed.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, debug_span, info, warn, Instrument};

use super::pb::{self, seed_server};
use super::record::Handover;
use super::source::Source;
use super::tracked::{ChunkSet, Tracked};
use crate::backend::{check_range, Backend, Error, Result};

/// Largest piece of data in one `ReadReply`: well under tonic's 4 MiB
/// default message limit.
pub const PIECE: u64 = 1 << 20;
/// Largest range one `Read` call may ask for, so one request cannot make
/// the seed stream gigabytes (the destination asks chunk by chunk).
pub const MAX_READ: u64 = 64 << 20;

/// The `Seed` service over one region.
pub struct SeedService {
    source: Arc<Source>,
}

impl SeedService {
    /// The service over a migration source.
    pub fn new(source: Arc<Source>) -> Self {
        SeedService { source }
    }

    /// The tonic server of this service, without an interceptor.
    pub fn into_server(self) -> seed_server::SeedServer<Self> {
        seed_server::SeedServer::new(self)
    }
}

fn status(e: Error) -> Status {
    Status::from(e)
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadReply, Status>> + Send>>;
type HashStream = Pin<Box<dyn Stream<Item = Result<pb::HashesReply, Status>> + Send>>;

/// Chunks hashed per `HashesReply`.
const HASH_BATCH: u64 = 64;
/// The chunk hash of `Hashes`: BLAKE3 (fast, and collision-resistant, so a
/// chunk is never taken from an old copy by accident or by design).
pub const HASH_ALGORITHM: &str = "blake3";
/// Bytes of one chunk hash.
pub const HASH_LEN: usize = 32;

/// The hash of one chunk's bytes, as `Hashes` sends it.
pub fn chunk_hash(data: &[u8]) -> [u8; HASH_LEN] {
    *blake3::hash(data).as_bytes()
}

/// Hashes of chunks `first..first+n` of `region`, concatenated. Hashing
/// runs off the runtime threads (about 1 ms per MiB).
async fn hash_chunks(region: &Arc<Tracked>, first: u64, n: u64) -> Result<Vec<u8>> {
    let chunk = region.chunk_size();
    let size = region.size();
    let mut out = Vec::with_capacity(n as usize * HASH_LEN);
    for i in first..first + n {
        let len = (size - i * chunk).min(chunk);
        let mut buf = vec![0u8; len as usize];
        region.read_at(i * chunk, &mut buf).await?;
        let h = tokio::task::spawn_blocking(move || chunk_hash(&buf))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
        out.extend_from_slice(&h);
    }
    Ok(out)
}

#[tonic::async_trait]
impl seed_server::Seed for SeedService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoReply>, Status> {
        let region = self.source.tracked();
        let st = self.source.status();
        Ok(Response::new(pb::InfoReply {
            size: region.size(),
            chunk_size: region.chunk_size(),
            tracking: region.is_tracking(),
            finalized: st.finalized,
            session: st.session,
        }))
    }

    async fn track(
        &self,
        _: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackReply>, Status> {
        let session = self.source.track().await?;
        Ok(Response::new(pb::TrackReply { session }))
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortReply>, Status> {
        self.source.abort(req.into_inner().session).await?;
        Ok(Response::new(pb::AbortReply {}))
    }

    type ReadStream = ReadStream;

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let pb::ReadRequest { offset, length } = req.into_inner();
        let region = self.source.tracked().clone();
        check_range(offset, length, region.size()).map_err(status)?;
        if length > MAX_READ {
            return Err(Status::invalid_argument(format!(
                "read of {length} bytes: at most {MAX_READ} per call"
            )));
        }
        // Pieces are read one ahead of the sender: bounded memory, and the
        // next read overlaps the send of the previous piece.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut pos = offset;
            let end = offset + length;
            let lends = region.lends_pieces();
            while pos < end {
                let n = (end - pos).min(PIECE);
                // A backend holding its bytes in RAM lends them: no buffer to
                // zero and fill (one copy less per byte at the source).
                let r = if lends {
                    region.read_pieces(pos, n).await
                } else {
                    let mut buf = vec![0u8; n as usize];
                    region
                        .read_at(pos, &mut buf)
                        .await
                        .map(|()| vec![buf.into()])
                };
                let pieces = match r {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                for data in pieces {
                    if tx.send(Ok(pb::ReadReply { data })).await.is_err() {
                        return;
                    }
                }
                pos += n;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn dirty(
        &self,
        req: Request<pb::DirtyRequest>,
    ) -> Result<Response<pb::DirtyReply>, Status> {
        let pb::DirtyRequest { session, round } = req.into_inner();
        let runs = self.source.dirty_round(session, round)?;
        let (dirty, dirty_chunks) = to_pb(&runs);
        debug!(round, dirty_chunks, "migration: pre-copy round");
        Ok(Response::new(pb::DirtyReply {
            dirty,
            dirty_chunks,
            round,
        }))
    }

    type HashesStream = HashStream;

    async fn hashes(
        &self,
        req: Request<pb::HashesRequest>,
    ) -> Result<Response<HashStream>, Status> {
        let pb::HashesRequest {
            session,
            first,
            count,
        } = req.into_inner();
        self.source.check_tracking(session)?;
        let region = self.source.tracked().clone();
        let chunk = region.chunk_size();
        let chunks = region.size().div_ceil(chunk);
        if first.checked_add(count).is_none_or(|e| e > chunks) {
            return Err(Status::out_of_range(format!(
                "chunks {first}+{count} are outside the {chunks} chunks of the region"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let span = debug_span!("seed_hashes", first, count);
        tokio::spawn(
            async move {
                let mut i = first;
                let end = first + count;
                while i < end {
                    let n = (end - i).min(HASH_BATCH);
                    let item = hash_chunks(&region, i, n)
                        .await
                        .map(|hashes| pb::HashesReply {
                            first: i,
                            hashes: hashes.into(),
                            algorithm: HASH_ALGORITHM.into(),
                        });
                    let failed = item.is_err();
                    if tx.send(item.map_err(status)).await.is_err() || failed {
                        return;
                    }
                    i += n;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn finalize(
        &self,
        req: Request<pb::FinalizeRequest>,
    ) -> Result<Response<pb::FinalizeReply>, Status> {
        let t = Instant::now();
        let req = req.into_inner();
        let h = self.source.finalize_after(req.session, req.round).await?;
        let reply = finalize_reply(&h);
        info!(
            dirty_chunks = reply.dirty_chunks,
            unpushed_chunks = reply.unpushed_chunks,
            took = ?t.elapsed(),
            "migration: finalized; writes are closed, reads stay open for the destination"
        );
        Ok(Response::new(reply))
    }
}

fn to_pb(runs: &[(u64, u64)]) -> (Vec<pb::ChunkRange>, u64) {
    let list = runs
        .iter()
        .map(|&(first, count)| pb::ChunkRange { first, count })
        .collect();
    (list, runs.iter().map(|r| r.1).sum())
}

/// The wire form of a hand-over.
pub(crate) fn finalize_reply(h: &Handover) -> pb::FinalizeReply {
    let (dirty, dirty_chunks) = to_pb(&h.dirty);
    let (unpushed, unpushed_chunks) = to_pb(&h.unpushed);
    pb::FinalizeReply {
        dirty,
        dirty_chunks,
        unpushed,
        unpushed_chunks,
        epoch: h.epoch.unwrap_or(0),
        fencing: h.epoch.is_some(),
        session: h.session,
    }
}

/// Chunk indices of a list of runs from the wire, checked against the
/// region: runs that do not add up to `count`, or name chunks past the
/// end, are refused rather than half-applied.
pub fn chunk_list(
    what: &str,
    runs: &[pb::ChunkRange],
    count: u64,
    chunks: u64,
) -> Result<Vec<u64>, String> {
    let mut set = ChunkSet::new(chunks);
    for r in runs {
        let end = r.first.checked_add(r.count).filter(|&e| e <= chunks);
        if end.is_none() {
            return Err(format!(
                "{what} range {}+{} is outside the {chunks} chunks of the region",
                r.first, r.count
            ));
        }
        set.insert_range(r.first, r.count);
    }
    if set.count() != count {
        return Err(format!(
            "{what} list names {} chunks but says {count}",
            set.count()
        ));
    }
    Ok(set.iter().collect())
}

/// The hand-over in a finalize reply, checked (see [`chunk_list`]).
pub fn handover_of(reply: &pb::FinalizeReply, chunks: u64) -> Result<Handover, String> {
    let dirty = chunk_list("dirty", &reply.dirty, reply.dirty_chunks, chunks)?;
    let unpushed = chunk_list("unpushed", &reply.unpushed, reply.unpushed_chunks, chunks)?;
    Ok(Handover {
        session: reply.session,
        dirty: super::source::runs(dirty),
        unpushed: super::source::runs(unpushed),
        epoch: reply.fencing.then_some(reply.epoch),
    })
}

/// A client of a `Seed` with the channel's auth applied.
pub type Client = pb::seed_client::SeedClient<crate::net::AuthedChannel>;

/// The destination's view of the seed's region: reads over gRPC, retried
/// until `patience` has passed without success; then the seed is declared
/// lost (for good: a seed that came back could have been written in the
/// meantime) and every later read fails at once.
pub struct SeedClient {
    client: Client,
    /// The client's connection, for `Read` decoded by hand (`read_stream`).
    chan: crate::net::AuthedChannel,
    size: u64,
    chunk: u64,
    patience: Duration,
    lost: Arc<AtomicBool>,
    lost_tx: tokio::sync::watch::Sender<bool>,
}

impl SeedClient {
    /// Asks the seed for its geometry.
    pub async fn connect(
        chan: crate::net::AuthedChannel,
        patience: Duration,
    ) -> Result<Self, Status> {
        let mut client = pb::seed_client::SeedClient::new(chan.clone());
        let info = client.info(pb::InfoRequest {}).await?.into_inner();
        if info.chunk_size == 0 {
            return Err(Status::internal("seed reports a chunk size of 0"));
        }
        Ok(SeedClient {
            client,
            chan,
            size: info.size,
            chunk: info.chunk_size,
            patience,
            lost: Arc::new(AtomicBool::new(false)),
            lost_tx: tokio::sync::watch::channel(false).0,
        })
    }

    /// The generated client (shares the connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Chunk size of the source's region.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Whether the seed was declared lost (its reads failed for longer
    /// than the patience).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Changes to true once when the seed is declared lost.
    pub fn lost_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.lost_tx.subscribe()
    }

    /// Declares the seed lost (also used when a control call fails).
    pub fn declare_lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            warn!(reason = why, "migration: seed lost");
            self.lost_tx.send_replace(true);
        }
    }

    /// How long failing reads are retried before the seed is declared lost.
    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// One `Read` call of `length` bytes at `offset` (at most [`MAX_READ`]):
    /// the stream of its pieces, in order, for a caller that installs them
    /// as they come (and retries on its own).
    pub(crate) async fn open_read(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<crate::read_stream::ReadStream<pb::ReadReply>, Status> {
        if self.is_lost() {
            return Err(Status::unavailable("migration seed lost"));
        }
        // Decoded from the received frames without tonic's copy of them.
        crate::read_stream::ReadStream::start(
            &self.chan,
            "/r3map.migration.v1.Seed/Read",
            pb::ReadRequest { offset, length },
            2 * PIECE as usize + 64,
        )
        .await
        .map_err(Status::from)
    }

    async fn read_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), Status> {
        let mut c = self.client.clone();
        let mut s = c
            .read(pb::ReadRequest {
                offset,
                length: buf.len() as u64,
            })
            .await?
            .into_inner();
        let mut pos = 0usize;
        while let Some(piece) = s.message().await? {
            let end = pos + piece.data.len();
            if end > buf.len() {
                return Err(Status::internal("seed sent more bytes than asked"));
            }
            buf[pos..end].copy_from_slice(&piece.data);
            pos = end;
        }
        if pos != buf.len() {
            return Err(Status::internal(format!(
                "seed sent {pos} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }
}

fn lost_error() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "migration seed lost",
    ))
}

/// Errors worth retrying: anything but an answer that will not change
/// (bad range, auth refused). A connection that broke mid-stream shows up
/// as Cancelled or Unknown, a dead peer as Unavailable.
pub(crate) fn transient(s: &Status) -> bool {
    use tonic::Code::*;
    !matches!(
        s.code(),
        InvalidArgument
            | OutOfRange
            | Unauthenticated
            | PermissionDenied
            | FailedPrecondition
            | Unimplemented
            | NotFound
    )
}

#[async_trait]
impl Backend for SeedClient {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        for piece_start in (0..buf.len()).step_by(MAX_READ as usize) {
            let piece_end = (piece_start + MAX_READ as usize).min(buf.len());
            loop {
                if self.is_lost() {
                    return Err(lost_error());
                }
                let piece = &mut buf[piece_start..piece_end];
                match self.read_once(offset + piece_start as u64, piece).await {
                    Ok(()) => break,
                    Err(s) if transient(&s) && start.elapsed() < self.patience => {
                        debug!(error = %s, "seed read failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                    Err(s) => {
                        if transient(&s) {
                            self.declare_lost(&format!(
                                "reads failing for {:?}: {s}",
                                start.elapsed()
                            ));
                            return Err(lost_error());
                        }
                        return Err(Error::Io(std::io::Error::other(format!(
                            "seed refused a read: {s}"
                        ))));
                    }
                }
            }
        }
        Ok(())
    }

    async fn write_at(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(Error::FailedPrecondition(
            "the migration seed is read-only".into(),
        ))
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, _: u64, _: u64) -> Result<()> {
        Err(Error::FailedPrecondition(
            "the migration seed is read-only".into(),
        ))
    }
}
