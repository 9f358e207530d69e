//! The transmission phase: one reader takes requests off the socket and
//! starts a task for each, tasks run concurrently against the backend, and
//! one writer sends replies in the order they complete, batching them into
//! as few syscalls as the queue allows.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::export::{Export, Limits};
use super::proto::*;
use crate::backend::Error as BackendError;

/// One reply: a header and, for reads, the data that follows it.
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
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
    let writer = tokio::spawn(write_replies(rx, wr));
    let budget = limits.inflight_bytes.max(limits.max_request).max(4096);
    let sem = Arc::new(Semaphore::new(budget as usize));
    let ctx = Arc::new(Ctx { export, structured });

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
            let mut data = vec![0u8; req.len as usize];
            rd.read_exact(&mut data).await?;
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
                reply_now(tx, ctx, req, e, msg).await;
                continue;
            }
            spawn_request(tx, ctx, req, data, permit);
            continue;
        }

        let allowed_flags = match req.kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_TRIM => CMD_FLAG_FUA,
            CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
            _ => {
                reply_now(tx, ctx, req, NBD_EINVAL, "unknown command").await;
                continue;
            }
        };
        if req.kind == CMD_DISC {
            debug!("client sent DISC");
            return Ok(());
        }
        if req.flags & !allowed_flags != 0 {
            reply_now(tx, ctx, req, NBD_EINVAL, "unknown command flags").await;
            continue;
        }
        if req.kind == CMD_FLUSH {
            let permit = sem
                .clone()
                .acquire_many_owned(cost(0))
                .await
                .expect("semaphore open");
            spawn_request(tx, ctx, req, Vec::new(), permit);
            continue;
        }
        if req.offset.checked_add(len).is_none_or(|e| e > size) {
            reply_now(
                tx,
                ctx,
                req,
                NBD_EINVAL,
                "request beyond the end of the export",
            )
            .await;
            continue;
        }
        if ctx.export.read_only && matches!(req.kind, CMD_TRIM | CMD_WRITE_ZEROES) {
            reply_now(tx, ctx, req, NBD_EPERM, "export is read-only").await;
            continue;
        }
        if req.kind == CMD_READ && req.len > limits.max_request {
            reply_now(
                tx,
                ctx,
                req,
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
        spawn_request(tx, ctx, req, Vec::new(), permit);
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

fn spawn_request(
    tx: &mpsc::Sender<Reply>,
    ctx: &Arc<Ctx>,
    req: Request,
    data: Vec<u8>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let tx = tx.clone();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let reply = execute(&ctx, req, data).await;
        // The client may be gone; the work is done either way.
        let _ = tx.send(reply).await;
        drop(permit);
    });
}

async fn execute(ctx: &Ctx, req: Request, data: Vec<u8>) -> Reply {
    let b = &ctx.export.backend;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let res = match req.kind {
        CMD_READ => {
            let mut buf = vec![0u8; req.len as usize];
            match b.read_at(req.offset, &mut buf).await {
                Ok(()) => return read_reply(ctx, req, buf),
                Err(e) => Err(e),
            }
        }
        CMD_WRITE => b.write_at(req.offset, &data).await,
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
        Ok(()) => Reply {
            head: simple_reply(req.cookie, 0),
            data: Vec::new(),
        },
        Err(e) => {
            warn!(cookie = req.cookie, kind = req.kind, offset = req.offset, len = req.len, error = %e, "request failed");
            error_reply(ctx, req, e.errno(), &e.to_string())
        }
    }
}

fn read_reply(ctx: &Ctx, req: Request, buf: Vec<u8>) -> Reply {
    if !ctx.structured {
        return Reply {
            head: simple_reply(req.cookie, 0),
            data: buf,
        };
    }
    if buf.is_empty() {
        return Reply {
            head: structured_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
            data: buf,
        };
    }
    let mut head = structured_header(
        req.cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        8 + buf.len() as u32,
    );
    head.extend_from_slice(&req.offset.to_be_bytes());
    Reply { head, data: buf }
}

fn error_reply(ctx: &Ctx, req: Request, errno: u32, msg: &str) -> Reply {
    // With structured replies a READ must be answered with chunks; other
    // commands may keep simple replies.
    if ctx.structured && req.kind == CMD_READ {
        Reply {
            head: structured_error(req.cookie, errno, msg),
            data: Vec::new(),
        }
    } else {
        Reply {
            head: simple_reply(req.cookie, errno),
            data: Vec::new(),
        }
    }
}

async fn reply_now(tx: &mpsc::Sender<Reply>, ctx: &Ctx, req: Request, errno: u32, msg: &str) {
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

async fn write_replies<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Reply>,
    wr: W,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    while let Some(r) = rx.recv().await {
        put(&mut w, r).await?;
        // Batch whatever else is ready into the same flush.
        while let Ok(r) = rx.try_recv() {
            put(&mut w, r).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

async fn put<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, r: Reply) -> io::Result<()> {
    w.write_all(&r.head).await?;
    if !r.data.is_empty() {
        w.write_all(&r.data).await?;
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
