//! Harnesses for the NBD fuzz targets, shared with the seed generator
//! (`examples/seeds.rs`) and the deterministic tests (`tests/`), so a crash
//! found by libFuzzer reproduces with plain `cargo test` too.
//!
//! Beyond "never panic, never hang", each harness checks what the server
//! wrote against a small model of the protocol: a fuzzer that only looks for
//! panics would miss a lost or malformed reply.

use std::collections::HashMap;
use std::io::{self, Cursor};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use r3map::backend::memory::Memory;
use r3map::nbd::handshake::{negotiate, Negotiated};
use r3map::nbd::proto::*;
use r3map::nbd::transmission::serve;
use r3map::nbd::{Export, Limits};
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

pub mod seeds;

/// Small enough to allocate per input, large enough for several chunks.
pub const EXPORT_SIZE: u64 = 1 << 20;
/// Small chunks so requests cross chunk edges inside the 1 MiB export.
pub const CHUNK: u64 = 64 << 10;
pub const MAX_REQUEST: u32 = 64 << 10;

/// Tight limits so the oversize and back-pressure paths are reachable with
/// inputs of a few KiB.
pub fn limits() -> Limits {
    Limits {
        max_request: MAX_REQUEST,
        inflight_bytes: 1 << 20,
        ..Default::default()
    }
}

/// Exports known to the handshake: "r3map" (also the empty name) and "ro".
pub fn lookup(name: &str) -> Option<Export> {
    match name {
        "" | "r3map" => Some(export("r3map", false)),
        "ro" => Some(export("ro", true)),
        _ => None,
    }
}

fn export(name: &str, read_only: bool) -> Export {
    let mut e = Export::new(name, Arc::new(Memory::new(EXPORT_SIZE, CHUNK))).read_only(read_only);
    e.description = "fuzz export".into();
    e
}

thread_local! {
    // One runtime per thread: building one per input would dominate execs/s.
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}

/// A writer that keeps what it is given, shareable with the checker after
/// `serve` consumed (and dropped) its half.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------- handshake

/// Fuzz entry: `data` is everything the client sends. Negotiates, and when
/// a client reaches transmission, serves the rest of `data` as requests.
/// Returns the number of replies checked there, `None` if it never got there.
pub fn fuzz_handshake(data: &[u8]) -> Option<usize> {
    let mut io = tokio::io::join(Cursor::new(data.to_vec()), Vec::<u8>::new());
    let res = block_on(negotiate(&mut io, lookup, &r3map::nbd::Limits::default()));
    let (rd, out) = io.into_inner();
    check_handshake_output(&out, &res);
    let Ok(Some(Negotiated { export, structured })) = res else {
        return None;
    };
    let rest = &data[rd.position() as usize..];
    Some(run_transmission(rest, export, structured))
}

/// The server's side of a handshake must be: the greeting, then well-formed
/// option replies, then (after EXPORT_NAME only) the export block.
fn check_handshake_output(out: &[u8], res: &io::Result<Option<Negotiated>>) {
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(be64(&out[0..8]), NBDMAGIC);
    assert_eq!(be64(&out[8..16]), IHAVEOPT);
    let mut p = &out[18..];
    let mut last: Option<(u32, u32)> = None;
    let mut structured_acked = false;
    while p.len() >= 8 && be64(&p[0..8]) == REPLY_MAGIC_OPT {
        assert!(p.len() >= 20, "truncated option reply");
        let (opt, kind, len) = (be32(&p[8..12]), be32(&p[12..16]), be32(&p[16..20]) as usize);
        assert!(p.len() >= 20 + len, "option reply shorter than its length");
        if kind == REP_INFO && be16(&p[20..22]) == INFO_EXPORT {
            assert_eq!(len, 12, "NBD_INFO_EXPORT is 12 bytes");
            assert_eq!(be64(&p[22..30]), EXPORT_SIZE);
        }
        if (opt, kind) == (OPT_STRUCTURED_REPLY, REP_ACK) {
            structured_acked = true;
        }
        last = Some((opt, kind));
        p = &p[20 + len..];
    }
    match res {
        Ok(Some(n)) => {
            assert!(n.export.name == "r3map" || n.export.name == "ro");
            assert!(
                !n.structured || structured_acked,
                "structured without an ACK"
            );
            if last == Some((OPT_GO, REP_ACK)) {
                assert!(p.is_empty(), "bytes after the GO ACK: {p:?}");
            } else {
                // EXPORT_NAME: size, flags and maybe 124 zeroes.
                assert!(p.len() == 10 || p.len() == 134, "bad export block: {p:?}");
                assert_eq!(be64(&p[0..8]), EXPORT_SIZE);
                assert!(!n.structured, "structured replies need GO");
            }
        }
        _ => assert!(p.is_empty(), "garbage after the option replies: {p:?}"),
    }
}

// ------------------------------------------------------------- transmission

/// Fuzz entry: the first byte picks structured replies (bit 0) and a
/// read-only export (bit 1); the rest is the client's request stream.
/// Returns the number of replies checked.
pub fn fuzz_transmission(data: &[u8]) -> usize {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let e = export("r3map", mode & 2 != 0);
    run_transmission(rest, e, mode & 1 != 0)
}

fn run_transmission(input: &[u8], export: Export, structured: bool) -> usize {
    let read_only = export.read_only;
    let out = Capture::default();
    let res = block_on(serve(
        Cursor::new(input.to_vec()),
        out.clone(),
        export,
        structured,
        limits(),
        CancellationToken::new(),
    ));
    let out = out.0.lock().unwrap();
    check_transmission(input, read_only, structured, &res, &out)
}

/// Checks what `serve` returned and wrote for the request stream `input`:
/// the right way to end, and exactly one well-formed reply per request.
/// Public so the tests can show that it rejects a wrong reply stream.
pub fn check_transmission(
    input: &[u8],
    read_only: bool,
    structured: bool,
    res: &io::Result<()>,
    out: &[u8],
) -> usize {
    let expect = model(input, read_only);
    let n = expect.replies.len();
    assert_eq!(
        res.is_ok(),
        expect.clean_end,
        "serve returned {res:?}, model expected a clean end: {}",
        expect.clean_end
    );
    check_replies(out, expect.replies, structured);
    n
}

/// What one request must be answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    cookie: u64,
    read: bool,
    ok: bool,
    offset: u64,
    /// Data bytes that follow a successful read.
    data: u32,
}

struct Model {
    replies: Vec<Expected>,
    clean_end: bool,
}

/// Walks the request stream as the spec frames it and predicts, per
/// request, success or error. Exact errno values are left to the server.
fn model(mut p: &[u8], read_only: bool) -> Model {
    let mut replies = Vec::new();
    let clean_end = loop {
        if p.is_empty() {
            break true;
        }
        let Some(hdr) = p.get(..REQUEST_LEN) else {
            break false; // EOF inside a header
        };
        let Ok(r) = Request::parse(hdr.try_into().unwrap()) else {
            break false;
        };
        p = &p[REQUEST_LEN..];
        let in_range = r
            .offset
            .checked_add(r.len as u64)
            .is_some_and(|e| e <= EXPORT_SIZE);
        let ok = match r.kind {
            CMD_DISC => break true,
            CMD_WRITE => {
                // The payload is consumed whatever the answer.
                let Some(rest) = p.get(r.len as usize..) else {
                    break false;
                };
                p = rest;
                r.len <= MAX_REQUEST && r.flags & !CMD_FLAG_FUA == 0 && !read_only && in_range
            }
            CMD_READ => r.flags & !CMD_FLAG_DF == 0 && in_range && r.len <= MAX_REQUEST,
            CMD_FLUSH => r.flags == 0,
            CMD_CACHE => r.flags == 0 && in_range,
            CMD_TRIM => r.flags & !CMD_FLAG_FUA == 0 && in_range && !read_only,
            CMD_WRITE_ZEROES => {
                r.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) == 0 && in_range && !read_only
            }
            _ => false,
        };
        let read = r.kind == CMD_READ;
        replies.push(Expected {
            cookie: r.cookie,
            read,
            ok,
            offset: r.offset,
            data: if read && ok { r.len } else { 0 },
        });
    };
    Model { replies, clean_end }
}

/// Every request gets exactly one well-formed reply, in any order.
fn check_replies(out: &[u8], mut pending: Vec<Expected>, structured: bool) {
    // Simple read replies do not carry their length: with a cookie shared
    // by requests whose data lengths differ, only the total can be checked.
    let mut lens: HashMap<u64, Vec<u32>> = HashMap::new();
    for e in pending.iter().filter(|e| e.ok) {
        lens.entry(e.cookie).or_default().push(e.data);
    }
    let ambiguous = !structured && lens.values().any(|v| v.iter().any(|&l| l != v[0]));
    if ambiguous {
        let want: usize = pending.iter().map(|e| 16 + e.data as usize).sum();
        assert_eq!(out.len(), want, "simple reply stream length");
        return;
    }

    let mut p = out;
    while !p.is_empty() {
        assert!(p.len() >= 16, "truncated reply: {p:?}");
        let magic = be32(&p[0..4]);
        if magic == SIMPLE_REPLY_MAGIC {
            let (err, cookie) = (be32(&p[4..8]), be64(&p[8..16]));
            p = &p[16..];
            let i = take(&mut pending, |e| {
                e.cookie == cookie && e.ok == (err == 0) && !(structured && e.read)
            });
            let e = pending.swap_remove(i);
            assert!(
                p.len() >= e.data as usize,
                "read reply shorter than its data"
            );
            p = &p[e.data as usize..];
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "unknown reply magic");
            assert!(structured, "structured reply without negotiation");
            assert!(p.len() >= 20, "truncated chunk header");
            let (flags, kind) = (be16(&p[4..6]), be16(&p[6..8]));
            let (cookie, len) = (be64(&p[8..16]), be32(&p[16..20]) as usize);
            assert_eq!(flags, REPLY_FLAG_DONE, "one chunk per reply");
            assert!(p.len() >= 20 + len, "chunk shorter than its length");
            let body = &p[20..20 + len];
            p = &p[20 + len..];
            let i = match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    assert!(len > 8, "OFFSET_DATA chunk without data");
                    let off = be64(&body[0..8]);
                    let n = (len - 8) as u32;
                    take(&mut pending, |e| {
                        e.read && e.ok && e.cookie == cookie && e.offset == off && e.data == n
                    })
                }
                REPLY_TYPE_NONE => {
                    assert_eq!(len, 0);
                    take(&mut pending, |e| {
                        e.read && e.ok && e.cookie == cookie && e.data == 0
                    })
                }
                REPLY_TYPE_ERROR => {
                    assert!(len >= 6, "short error chunk");
                    assert_ne!(be32(&body[0..4]), 0, "error chunk with errno 0");
                    assert_eq!(be16(&body[4..6]) as usize, len - 6, "error message length");
                    take(&mut pending, |e| e.read && !e.ok && e.cookie == cookie)
                }
                other => panic!("unexpected chunk type {other}"),
            };
            pending.swap_remove(i);
        }
    }
    assert!(pending.is_empty(), "requests never answered: {pending:?}");
}

fn take(pending: &mut [Expected], f: impl Fn(&Expected) -> bool) -> usize {
    pending
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("reply matches no outstanding request: {pending:?}"))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
