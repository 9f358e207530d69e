//! The transmission phase: one reader takes requests off the socket and
//! starts a task for each, tasks run concurrently against the backend, and
//! one writer sends replies in the order they complete, batching them into
//! as few syscalls as the queue allows.

use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::export::{Export, Limits};
use super::proto::*;
use crate::backend::Error as BackendError;

/// One reply: a header and, for reads, the first `len` bytes of `data`
/// (a pooled buffer, possibly longer), or `pieces` lent by the backend.
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
    len: usize,
    pieces: Vec<bytes::Bytes>,
}

impl Reply {
    fn bare(head: Vec<u8>) -> Reply {
        Reply {
            head,
            data: Vec::new(),
            len: 0,
            pieces: Vec::new(),
        }
    }

    /// Bytes after the header.
    fn payload_len(&self) -> usize {
        self.len + self.pieces.iter().map(|p| p.len()).sum::<usize>()
    }
}

/// Read buffers handed back by the writer once their reply is on the wire.
/// A fresh `vec![0; 1 MiB]` per READ costs a zero-fill and ~256 page faults
/// (glibc gives large blocks back to the kernel on free); reuse avoids both.
/// Backends fill every byte they are asked for, so no stale data leaks.
#[derive(Default)]
struct BufPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Bytes of idle buffers a connection keeps.
const POOL_BYTES: usize = 64 << 20;

impl BufPool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap();
        if let Some(i) = free
            .iter()
            .position(|b| b.len() >= len && b.len() <= len.max(4096) * 2)
        {
            return free.swap_remove(i);
        }
        drop(free);
        vec![0u8; len.max(4096)]
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.is_empty() {
            return;
        }
        let mut free = self.free.lock().unwrap();
        let held: usize = free.iter().map(|b| b.len()).sum();
        if held + buf.len() <= POOL_BYTES {
            free.push(buf);
        }
    }
}

/// Serves requests until the client disconnects, sends DISC, breaks the
/// protocol, or `shutdown` fires. Requests already started are finished and
/// answered before this returns, so no task outlives the connection.
pub async fn serve<R, W>(
    rd: R,
    wr: W,
    export: Export,
    structured: bool,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(1024);
    let pool = Arc::new(BufPool::default());
    let writer = tokio::spawn(write_replies(rx, wr, pool.clone()));
    let budget = limits.inflight_bytes.max(limits.max_request).max(4096);
    let sem = Arc::new(Semaphore::new(budget as usize));
    let ctx = Arc::new(Ctx {
        export,
        structured,
        pool,
    });

    let res = read_requests(
        BufReader::with_capacity(128 << 10, rd),
        &tx,
        &sem,
        &ctx,
        limits,
        shutdown,
    )
    .await;

    // Wait for every request in flight: each holds permits until its reply is queued.
    let _all = sem.acquire_many(budget).await;
    drop(tx);
    let wres = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    res.and(wres)
}

struct Ctx {
    export: Export,
    structured: bool,
    pool: Arc<BufPool>,
}

async fn read_requests<R: AsyncRead + Unpin>(
    mut rd: R,
    tx: &mpsc::Sender<Reply>,
    sem: &Arc<Semaphore>,
    ctx: &Arc<Ctx>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let size = ctx.export.backend.size();
    let mut hdr = [0u8; REQUEST_LEN];
    loop {
        let got = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            r = read_header(&mut rd, &mut hdr) => r?,
        };
        if !got {
            return Ok(()); // client hung up between requests
        }
        // Latency is counted from here: what the client waits for, minus
        // the socket, including a WRITE's payload transfer.
        let t0 = Instant::now();
        let req = Request::parse(&hdr).map_err(|BadMagic(m)| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request magic {m:#x}"),
            )
        })?;
        let len = req.len as u64;

        // Requests that carry a payload must have it consumed whatever we answer.
        if req.kind == CMD_WRITE {
            if req.len > limits.max_request {
                discard(&mut rd, len).await?;
                reply_now(
                    tx,
                    ctx,
                    req,
                    t0,
                    NBD_EINVAL,
                    "write larger than the maximum request",
                )
                .await;
                continue;
            }
            let permit = sem
                .clone()
                .acquire_many_owned(cost(req.len))
                .await
                .expect("semaphore open");
            let mut data = ctx.pool.take(req.len as usize);
            rd.read_exact(&mut data[..req.len as usize]).await?;
            let err = if req.flags & !CMD_FLAG_FUA != 0 {
                Some((NBD_EINVAL, "unknown flags on WRITE"))
            } else if ctx.export.read_only {
                Some((NBD_EPERM, "export is read-only"))
            } else if req.offset.checked_add(len).is_none_or(|e| e > size) {
                Some((NBD_ENOSPC, "write beyond the end of the export"))
            } else {
                None
            };
            if let Some((e, msg)) = err {
                ctx.pool.give(data);
                reply_now(tx, ctx, req, t0, e, msg).await;
                continue;
            }
            start_request(tx, ctx, req, t0, data, permit).await;
            continue;
        }

        let allowed_flags = match req.kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_TRIM => CMD_FLAG_FUA,
            CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
            _ => {
                reply_now(tx, ctx, req, t0, NBD_EINVAL, "unknown command").await;
                continue;
            }
        };
        if req.kind == CMD_DISC {
            debug!("client sent DISC");
            return Ok(());
        }
        if req.flags & !allowed_flags != 0 {
            reply_now(tx, ctx, req, t0, NBD_EINVAL, "unknown command flags").await;
            continue;
        }
        if req.kind == CMD_FLUSH {
            let permit = sem
                .clone()
                .acquire_many_owned(cost(0))
                .await
                .expect("semaphore open");
            start_request(tx, ctx, req, t0, Vec::new(), permit).await;
            continue;
        }
        if req.offset.checked_add(len).is_none_or(|e| e > size) {
            reply_now(
                tx,
                ctx,
                req,
                t0,
                NBD_EINVAL,
                "request beyond the end of the export",
            )
            .await;
            continue;
        }
        if ctx.export.read_only && matches!(req.kind, CMD_TRIM | CMD_WRITE_ZEROES) {
            reply_now(tx, ctx, req, t0, NBD_EPERM, "export is read-only").await;
            continue;
        }
        if req.kind == CMD_READ && req.len > limits.max_request {
            reply_now(
                tx,
                ctx,
                req,
                t0,
                NBD_EOVERFLOW,
                "read larger than the maximum request",
            )
            .await;
            continue;
        }
        let c = if req.kind == CMD_READ {
            cost(req.len)
        } else {
            cost(0)
        };
        let permit = sem
            .clone()
            .acquire_many_owned(c)
            .await
            .expect("semaphore open");
        start_request(tx, ctx, req, t0, Vec::new(), permit).await;
    }
}

/// Permits a request holds: its payload, and at least a page so the count
/// of requests in flight is bounded too.
fn cost(len: u32) -> u32 {
    len.max(4096)
}

/// Reads one header; false on a clean EOF before its first byte.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    hdr: &mut [u8; REQUEST_LEN],
) -> io::Result<bool> {
    let mut got = 0;
    while got < REQUEST_LEN {
        let n = rd.read(&mut hdr[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

async fn start_request(
    tx: &mpsc::Sender<Reply>,
    ctx: &Arc<Ctx>,
    req: Request,
    t0: Instant,
    data: Vec<u8>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (tx, ctx) = (tx.clone(), ctx.clone());
    let mut job = Box::pin(async move {
        let (reply, ok) = execute(&ctx, req, data).await;
        ctx.export
            .stats
            .record(req.kind, req.len as u64, ok, t0.elapsed());
        // Let go of the export before the permit: once the connection has
        // every permit back, nothing of it may still hold the backend (a
        // closed volume's cache lock goes with the last reference).
        drop(ctx);
        // The client may be gone; the work is done either way.
        let _ = tx.send(reply).await;
        drop(tx);
        drop(permit);
    });
    // Most requests on RAM or the page cache finish without waiting: run
    // them right here, saving a task spawn and the wake-up of another
    // worker (a few microseconds of a 4 KiB round trip). Only a request
    // that would wait gets a task of its own, so the reader goes on.
    let done = std::future::poll_fn(|cx| Poll::Ready(job.as_mut().poll(cx).is_ready())).await;
    if !done {
        tokio::spawn(job);
    }
}

/// Runs one request against the backend; the reply, and whether it succeeded.
async fn execute(ctx: &Ctx, req: Request, data: Vec<u8>) -> (Reply, bool) {
    let b = &ctx.export.backend;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let res = match req.kind {
        // RAM: the backend's own bytes go out as they are, no copy.
        CMD_READ if b.lends_pieces() => match b.read_pieces(req.offset, req.len as u64).await {
            Ok(pieces) => return (read_reply(ctx, req, Vec::new(), pieces), true),
            Err(e) => Err(e),
        },
        CMD_READ => {
            let mut buf = ctx.pool.take(req.len as usize);
            match b.read_at(req.offset, &mut buf[..req.len as usize]).await {
                Ok(()) => return (read_reply(ctx, req, buf, Vec::new()), true),
                Err(e) => {
                    ctx.pool.give(buf);
                    Err(e)
                }
            }
        }
        CMD_WRITE => {
            let r = b.write_at(req.offset, &data[..req.len as usize]).await;
            ctx.pool.give(data);
            r
        }
        CMD_FLUSH => b.flush().await,
        CMD_TRIM => b.trim(req.offset, req.len as u64).await,
        CMD_WRITE_ZEROES => b.write_zeroes(req.offset, req.len as u64).await,
        CMD_CACHE => b.cache(req.offset, req.len as u64).await,
        _ => unreachable!("filtered by the reader"),
    };
    let res = match res {
        Ok(()) if fua => b.flush().await,
        other => other,
    };
    match res {
        Ok(()) => (Reply::bare(simple_reply(req.cookie, 0)), true),
        Err(e) => {
            warn!(cookie = req.cookie, kind = req.kind, offset = req.offset, len = req.len, error = %e, "request failed");
            (error_reply(ctx, req, errno_of(&e), &e.to_string()), false)
        }
    }
}

/// A READ's reply carrying `req.len` bytes: the start of `buf`, or else
/// `pieces`.
fn read_reply(ctx: &Ctx, req: Request, buf: Vec<u8>, pieces: Vec<bytes::Bytes>) -> Reply {
    let len = if pieces.is_empty() {
        req.len as usize
    } else {
        0
    };
    if !ctx.structured {
        return Reply {
            head: simple_reply(req.cookie, 0),
            data: buf,
            len,
            pieces,
        };
    }
    if req.len == 0 {
        ctx.pool.give(buf);
        return Reply::bare(structured_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            0,
        ));
    }
    let mut head = structured_header(
        req.cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        8 + req.len,
    );
    head.extend_from_slice(&req.offset.to_be_bytes());
    Reply {
        head,
        data: buf,
        len,
        pieces,
    }
}

fn error_reply(ctx: &Ctx, req: Request, errno: u32, msg: &str) -> Reply {
    // With structured replies a READ must be answered with chunks; other
    // commands may keep simple replies.
    if ctx.structured && req.kind == CMD_READ {
        Reply::bare(structured_error(req.cookie, errno, msg))
    } else {
        Reply::bare(simple_reply(req.cookie, errno))
    }
}

async fn reply_now(
    tx: &mpsc::Sender<Reply>,
    ctx: &Ctx,
    req: Request,
    t0: Instant,
    errno: u32,
    msg: &str,
) {
    ctx.export.stats.record(req.kind, 0, false, t0.elapsed());
    debug!(
        cookie = req.cookie,
        kind = req.kind,
        errno,
        msg,
        "refused request"
    );
    let _ = tx.send(error_reply(ctx, req, errno, msg)).await;
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> io::Result<()> {
    let n = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Replies gathered into one vectored write at most.
const BATCH_REPLIES: usize = 64;
const BATCH_BYTES: usize = 8 << 20;

async fn write_replies<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Reply>,
    mut wr: W,
    pool: Arc<BufPool>,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(BATCH_REPLIES);
    while let Some(r) = rx.recv().await {
        // Whatever else is ready goes out in the same syscall: headers and
        // data together, no copy into an intermediate buffer.
        let mut bytes = r.head.len() + r.payload_len();
        batch.push(r);
        while batch.len() < BATCH_REPLIES && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.head.len() + r.payload_len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for r in &batch {
            slices.push(IoSlice::new(&r.head));
            if r.len > 0 {
                slices.push(IoSlice::new(&r.data[..r.len]));
            }
            slices.extend(r.pieces.iter().map(|p| IoSlice::new(p)));
        }
        write_all_vectored(&mut wr, &mut slices).await?;
        for r in batch.drain(..) {
            pool.give(r.data);
        }
    }
    wr.flush().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        // std passes at most IOV_MAX slices to writev; the rest go next turn.
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}
