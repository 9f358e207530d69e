//! Raw NBD bytes against the real `r3map serve`: a tiny hand-written client
//! walks every refusal path of the handshake and the transmission phase and
//! checks the exact answer, and that the server neither panics, hangs nor
//! leaks descriptors while clients misbehave.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{serve_logged, tmp, Addr, Proc};
use r3map::nbd::proto::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
/// Export size: above the 32 MiB request limit, so an oversized read is in
/// range and must get EOVERFLOW rather than EINVAL.
const SIZE: u64 = 64 * MIB;
const MAX_REQ: u32 = 32 << 20;
/// A stuck server fails the test instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(15);

/// One `r3map serve` (memory backend) on a unix socket, its log captured.
struct Server {
    dir: tempfile::TempDir,
    proc: Proc,
    log: PathBuf,
}

fn start(extra: &[&str]) -> Server {
    let dir = tmp();
    let log = dir.path().join("server.log");
    let size = SIZE.to_string();
    let mut args = vec!["--backend", "memory:", "--size", &size];
    args.extend_from_slice(extra);
    let proc = serve_logged(&Addr::Unix(dir.path().join("nbd.sock")), &args, &log);
    Server { dir, proc, log }
}

impl Server {
    fn connect(&self) -> Conn {
        let s = UnixStream::connect(self.dir.path().join("nbd.sock")).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Conn {
            s,
            reads: HashMap::new(),
        }
    }

    /// A connection in transmission after GO.
    fn go(&self, structured: bool) -> Conn {
        let mut c = self.connect();
        c.start(true);
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.opt_reply().kind, REP_ACK);
        }
        let (size, flags) = c.go("r3map");
        assert_eq!(size, SIZE);
        assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
        c
    }

    /// Still running, no panic in its log, and a fresh connection is served.
    fn assert_healthy(&mut self) {
        assert!(
            self.proc.child.try_wait().unwrap().is_none(),
            "r3map serve died; log:\n{}",
            self.log_text()
        );
        let log = self.log_text();
        assert!(!log.contains("panicked"), "server panicked:\n{log}");
        let mut c = self.go(false);
        let data = pattern(0x77, 4096);
        c.write(900, 0, SIZE - 4096, &data);
        c.expect_ok(900);
        c.read(901, 0, SIZE - 4096, 4096);
        assert_eq!(c.reply().data(901), data);
        c.disc();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.child.id()))
            .unwrap()
            .count()
    }
}

#[derive(Debug)]
struct OptReply {
    opt: u32,
    kind: u32,
    data: Vec<u8>,
}

#[derive(Debug)]
enum Reply {
    Simple {
        cookie: u64,
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The data of a successful read, in either reply style.
    fn data(self, cookie: u64) -> Vec<u8> {
        assert_eq!(self.cookie(), cookie, "reply for another request");
        match self {
            Reply::Simple { error: 0, data, .. } => data,
            Reply::Chunk {
                flags,
                kind: REPLY_TYPE_OFFSET_DATA,
                payload,
                ..
            } => {
                assert_eq!(flags, REPLY_FLAG_DONE, "a read is one chunk with DONE");
                payload[8..].to_vec()
            }
            other => panic!("expected read data, got {other:?}"),
        }
    }

    /// The error of a reply (0 for success), checking an ERROR chunk's framing.
    fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk {
                flags,
                kind,
                payload,
                ..
            } => {
                assert_eq!(*flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE, "last chunk");
                if *kind == REPLY_TYPE_ERROR {
                    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                    assert_eq!(payload.len(), 6 + msg_len, "ERROR chunk length");
                    u32::from_be_bytes(payload[0..4].try_into().unwrap())
                } else {
                    0
                }
            }
        }
    }
}

/// The hand-written client: blocking, with timeouts on every read.
struct Conn {
    s: UnixStream,
    /// Lengths of READs in flight: a simple reply does not carry its length.
    reads: HashMap<u64, u32>,
}

impl Conn {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to server");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
        v
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Reads the greeting; returns the handshake flags.
    fn hello(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC, "NBDMAGIC");
        assert_eq!(self.u64(), IHAVEOPT, "IHAVEOPT");
        self.u16()
    }

    /// Greeting plus the client flags.
    fn start(&mut self, no_zeroes: bool) {
        self.hello();
        let f = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        self.send(&f.to_be_bytes());
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), REPLY_MAGIC_OPT, "option reply magic");
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        let data = self.recv(len);
        OptReply { opt, kind, data }
    }

    /// Sends INFO or GO for `name`; returns every reply up to the final one.
    fn info_or_go(&mut self, opt: u32, name: &str, requests: &[u16]) -> Vec<OptReply> {
        self.option(opt, &info_payload(name, requests));
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, opt, "reply to another option");
            let last = r.kind != REP_INFO;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// GO; returns the size and transmission flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info_or_go(OPT_GO, name, &[]);
        assert_eq!(
            replies.last().unwrap().kind,
            REP_ACK,
            "GO refused: {replies:?}"
        );
        export_info(&replies)
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        if kind == CMD_READ {
            self.reads.insert(cookie, len);
        }
        self.send(&r.encode());
    }

    fn read(&mut self, cookie: u64, flags: u16, offset: u64, len: u32) {
        self.request(flags, CMD_READ, cookie, offset, len);
    }

    fn write(&mut self, cookie: u64, flags: u16, offset: u64, data: &[u8]) {
        let mut v = Request {
            flags,
            kind: CMD_WRITE,
            cookie,
            offset,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(data);
        self.send(&v);
    }

    fn disc(&mut self) {
        self.request(0, CMD_DISC, 0, 0, 0);
        self.expect_closed("after DISC");
    }

    fn reply(&mut self) -> Reply {
        let magic = self.u32();
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.u32();
                let cookie = self.u64();
                let len = self.reads.remove(&cookie);
                let data = match len {
                    Some(n) if error == 0 => self.recv(n as usize),
                    _ => Vec::new(),
                };
                Reply::Simple {
                    cookie,
                    error,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16();
                let kind = self.u16();
                let cookie = self.u64();
                let len = self.u32();
                let payload = self.recv(len as usize);
                if flags & REPLY_FLAG_DONE != 0 {
                    self.reads.remove(&cookie);
                }
                Reply::Chunk {
                    flags,
                    kind,
                    cookie,
                    payload,
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    fn expect_error(&mut self, cookie: u64, errno: u32, what: &str) {
        let r = self.reply();
        assert_eq!(r.cookie(), cookie, "{what}: reply for another request");
        assert_eq!(r.error(), errno, "{what}: {r:?}");
    }

    fn expect_ok(&mut self, cookie: u64) {
        self.expect_error(cookie, 0, "request");
    }

    /// The server must close the connection (EOF or reset) without sending
    /// anything more, and within the timeout.
    fn expect_closed(&mut self, why: &str) {
        let mut buf = [0u8; 4096];
        let t0 = Instant::now();
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{why}: expected close, got {n} more bytes: {:?}",
                &buf[..n.min(32)]
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{why}: connection not closed after {:?}: {e}", t0.elapsed()),
        }
    }
}

fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// Size and flags from the NBD_INFO_EXPORT reply among `replies`.
fn export_info(replies: &[OptReply]) -> (u64, u16) {
    let r = replies
        .iter()
        .find(|r| r.kind == REP_INFO && r.data[0..2] == INFO_EXPORT.to_be_bytes())
        .unwrap_or_else(|| panic!("no NBD_INFO_EXPORT in {replies:?}"));
    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
    (
        u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
        u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
    )
}

/// Recognisable data: `n` bytes derived from `seed`.
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

// ---------------------------------------------------------------- handshake

#[test]
fn greeting_and_handshake_flags() {
    let s = start(&[]);
    let mut c = s.connect();
    assert_eq!(c.hello(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn unknown_or_missing_client_flags_close_the_connection() {
    let mut s = start(&[]);
    for flags in [FLAG_C_FIXED_NEWSTYLE | 1 << 7, 1 << 31, FLAG_C_NO_ZEROES] {
        let mut c = s.connect();
        c.hello();
        c.send(&flags.to_be_bytes());
        c.expect_closed(&format!("client flags {flags:#x}"));
    }
    s.assert_healthy();
}

#[test]
fn list_names_the_export() {
    let s = start(&[]);
    let mut c = s.connect();
    c.start(true);
    c.option(OPT_LIST, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_LIST, REP_SERVER), "{r:?}");
    let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(&r.data[4..4 + n], b"r3map");
    assert_eq!(c.opt_reply().kind, REP_ACK);
    // LIST with a payload is malformed.
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    c.expect_closed("after ABORT");
}

#[test]
fn info_replies_and_refusals() {
    let mut s = start(&[]);
    let mut c = s.connect();
    c.start(true);

    // Unknown name.
    let r = c.info_or_go(OPT_INFO, "nope", &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN, "{r:?}");
    assert!(r[0].kind & REP_FLAG_ERROR != 0);

    // Malformed payloads: name longer than the data; count that lies; too short.
    let mut lying = info_payload("r3map", &[]);
    lying[9..11].copy_from_slice(&3u16.to_be_bytes());
    for bad in [
        vec![0, 0, 0, 100, b'r'],
        lying,
        vec![0, 0],
        vec![0xff, 0xff, 0xff, 0xff],
    ] {
        c.option(OPT_INFO, &bad);
        let r = c.opt_reply();
        assert_eq!(
            (r.opt, r.kind),
            (OPT_INFO, REP_ERR_INVALID),
            "payload {bad:?}"
        );
    }

    // The session is still fine: a proper INFO gets export and block sizes.
    for name in ["r3map", ""] {
        let r = c.info_or_go(OPT_INFO, name, &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
        let (size, flags) = export_info(&r);
        assert_eq!(size, SIZE);
        for f in [
            TFLAG_HAS_FLAGS,
            TFLAG_SEND_FLUSH,
            TFLAG_SEND_FUA,
            TFLAG_SEND_TRIM,
            TFLAG_SEND_WRITE_ZEROES,
            TFLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
        }
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        let bs = r
            .iter()
            .find(|r| r.data[0..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("NBD_INFO_BLOCK_SIZE");
        assert_eq!(bs.data.len(), 14);
        let get = |i: usize| u32::from_be_bytes(bs.data[i..i + 4].try_into().unwrap());
        assert_eq!((get(2), get(6), get(10)), (1, 4096, MAX_REQ));
        let nm = r
            .iter()
            .find(|r| r.data[0..2] == INFO_NAME.to_be_bytes())
            .expect("NBD_INFO_NAME was requested");
        assert_eq!(&nm.data[2..], b"r3map");
    }
    // INFO does not end the negotiation: GO still works.
    let (size, _) = c.go("r3map");
    assert_eq!(size, SIZE);
    c.disc();
    s.assert_healthy();
}

#[test]
fn unsupported_starttls_and_meta_context_options() {
    let mut s = start(&[]);
    let mut c = s.connect();
    c.start(true);
    for opt in [99u32, 0, 4, 0xffff_ffff] {
        c.option(opt, b"abc");
        let r = c.opt_reply();
        assert_eq!((r.opt, r.kind), (opt, REP_ERR_UNSUP), "option {opt}");
    }
    c.option(OPT_STARTTLS, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_STARTTLS, REP_ERR_POLICY), "{r:?}");
    // Meta contexts need structured replies first.
    c.option(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, b"junk");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);
    let (size, _) = c.go("");
    assert_eq!(size, SIZE);
    c.disc();
    s.assert_healthy();
}

#[test]
fn oversized_option_is_refused_and_the_session_continues() {
    let mut s = start(&[]);
    let mut c = s.connect();
    c.start(true);
    for (opt, len) in [(OPT_INFO, 8193usize), (OPT_GO, 100_000), (77, 1 << 20)] {
        c.option(opt, &pattern(len as u64, len));
        let r = c.opt_reply();
        assert_eq!((r.opt, r.kind), (opt, REP_ERR_TOO_BIG), "{len}-byte option");
    }
    let (size, _) = c.go("r3map");
    assert_eq!(size, SIZE);
    c.read(1, 0, 0, 512);
    assert_eq!(c.reply().data(1), vec![0u8; 512]);
    c.disc();
    s.assert_healthy();
}

#[test]
fn abort_is_acked_then_closed() {
    let s = start(&[]);
    let mut c = s.connect();
    c.start(false);
    c.option(OPT_ABORT, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.kind, r.data.len()), (OPT_ABORT, REP_ACK, 0));
    c.expect_closed("after ABORT");
}

#[test]
fn export_name_unknown_closes_and_bad_option_magic_closes() {
    let mut s = start(&[]);
    let mut c = s.connect();
    c.start(true);
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed("EXPORT_NAME of an unknown export");

    let mut c = s.connect();
    c.start(true);
    c.send(&[0x12; 16]);
    c.expect_closed("bad option magic");

    // GO on an unknown name is an error reply, not a close.
    let mut c = s.connect();
    c.start(true);
    let r = c.info_or_go(OPT_GO, "nope", &[]);
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    c.go("r3map");
    c.disc();
    s.assert_healthy();
}

#[test]
fn export_name_honours_no_zeroes() {
    let s = start(&[]);
    for no_zeroes in [true, false] {
        let mut c = s.connect();
        c.start(no_zeroes);
        c.option(OPT_EXPORT_NAME, b"r3map");
        assert_eq!(c.u64(), SIZE);
        let flags = c.u16();
        assert_ne!(flags & TFLAG_SEND_FLUSH, 0);
        assert_eq!(flags & TFLAG_SEND_DF, 0, "DF without structured replies");
        if !no_zeroes {
            assert_eq!(c.recv(124), vec![0u8; 124]);
        }
        // The very next bytes must be the reply to our first request.
        c.read(5, 0, 4096, 16);
        assert_eq!(c.reply().data(5), vec![0u8; 16], "no_zeroes={no_zeroes}");
        c.disc();
    }
    // The empty name is the default export.
    let mut c = s.connect();
    c.start(true);
    c.option(OPT_EXPORT_NAME, b"");
    assert_eq!(c.u64(), SIZE);
}

// ------------------------------------------------------------- transmission

#[test]
fn out_of_range_and_oversized_requests() {
    let mut s = start(&[]);
    for structured in [false, true] {
        let mut c = s.go(structured);
        let what = |w: &str| format!("{w} (structured={structured})");

        c.read(1, 0, SIZE - 10, 11);
        c.expect_error(1, NBD_EINVAL, &what("read past the end"));
        c.read(2, 0, u64::MAX - 1, 4);
        c.expect_error(2, NBD_EINVAL, &what("read at offset overflow"));

        // A refused write's payload must still be consumed.
        let junk = pattern(3, 8192);
        c.write(3, 0, SIZE - 4096, &junk);
        c.expect_error(3, NBD_ENOSPC, &what("write past the end"));
        c.write(4, 0, u64::MAX - 100, &junk[..200]);
        c.expect_error(4, NBD_ENOSPC, &what("write at offset overflow"));

        c.read(5, 0, 0, MAX_REQ + 1);
        c.expect_error(5, NBD_EOVERFLOW, &what("read over 32 MiB"));

        let big = vec![0xabu8; MAX_REQ as usize + 4096];
        c.write(6, 0, 0, &big);
        c.expect_error(6, NBD_EINVAL, &what("write over 32 MiB"));

        // Nothing was written by any of that, and the stream is in sync.
        let data = pattern(7, 4096);
        c.write(7, CMD_FLAG_FUA, 8192, &data);
        c.expect_ok(7);
        c.read(8, 0, 0, 16384);
        let back = c.reply().data(8);
        assert!(
            back[..8192].iter().all(|&b| b == 0),
            "{}",
            what("refused write landed")
        );
        assert_eq!(&back[8192..12288], &data[..]);
        c.read(9, 0, SIZE - 4096, 4096);
        assert!(c.reply().data(9).iter().all(|&b| b == 0));
        c.disc();
    }
    s.assert_healthy();
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let mut s = start(&[]);
    for structured in [false, true] {
        let mut c = s.go(structured);
        for kind in [7u16, 8, 42, 0xffff] {
            c.request(0, kind, 10 + kind as u64, 0, 4096);
            c.expect_error(10 + kind as u64, NBD_EINVAL, &format!("command {kind}"));
        }
        c.read(20, 1 << 9, 0, 512);
        c.expect_error(20, NBD_EINVAL, "READ with unknown flags");
        c.request(CMD_FLAG_FUA, CMD_FLUSH, 21, 0, 0);
        c.expect_error(21, NBD_EINVAL, "FLUSH with FUA");
        // A WRITE with unknown flags is refused, its payload consumed.
        c.write(22, 1 << 12, 0, &pattern(22, 1000));
        c.expect_error(22, NBD_EINVAL, "WRITE with unknown flags");
        c.read(23, 0, 0, 1000);
        assert_eq!(c.reply().data(23), vec![0u8; 1000]);
        c.disc();
    }
    s.assert_healthy();
}

#[test]
fn every_command_works() {
    let mut s = start(&[]);
    for structured in [false, true] {
        let mut c = s.go(structured);
        let data = pattern(31, 65536);
        c.write(1, 0, MIB, &data);
        c.expect_ok(1);
        c.request(0, CMD_FLUSH, 2, 0, 0);
        c.expect_ok(2);
        c.request(CMD_FLAG_FUA, CMD_TRIM, 3, MIB, 4096);
        c.expect_ok(3);
        c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, MIB + 8192, 4096);
        c.expect_ok(4);
        c.request(0, CMD_CACHE, 5, MIB, 65536);
        c.expect_ok(5);
        c.read(6, if structured { CMD_FLAG_DF } else { 0 }, MIB, 65536);
        let mut want = data.clone();
        want[..4096].fill(0);
        want[8192..12288].fill(0);
        assert!(
            c.reply().data(6) == want,
            "trim/zero/write mix reads back wrong"
        );
        // Leave it as found for the other mode.
        c.request(0, CMD_TRIM, 7, MIB, 65536);
        c.expect_ok(7);
        c.disc();
    }
    s.assert_healthy();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let s = start(&["--read-only"]);
    for structured in [false, true] {
        let mut c = s.connect();
        c.start(true);
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.opt_reply().kind, REP_ACK);
        }
        let (_, flags) = c.go("r3map");
        assert_ne!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
        c.write(1, 0, 0, &pattern(1, 4096));
        c.expect_error(1, NBD_EPERM, "WRITE");
        c.request(0, CMD_TRIM, 2, 0, 4096);
        c.expect_error(2, NBD_EPERM, "TRIM");
        c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
        c.expect_error(3, NBD_EPERM, "WRITE_ZEROES");
        c.read(4, 0, 0, 4096);
        assert_eq!(c.reply().data(4), vec![0u8; 4096]);
        c.request(0, CMD_FLUSH, 5, 0, 0);
        c.expect_ok(5);
        c.disc();
    }
    // The health check writes, so it is done on a writable server below.
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn zero_length_read_and_structured_chunks() {
    let mut s = start(&[]);
    // Simple: a header and no data.
    let mut c = s.go(false);
    c.read(1, 0, 100, 0);
    match c.reply() {
        Reply::Simple {
            cookie: 1,
            error: 0,
            data,
        } => assert!(data.is_empty()),
        r => panic!("zero-length read: {r:?}"),
    }
    c.read(2, 0, SIZE, 0);
    c.expect_ok(2); // at the very end: still in range
    c.disc();

    // Structured: a zero-length read ends with a DONE chunk; a read is one
    // OFFSET_DATA chunk carrying its offset; an error is an ERROR chunk.
    let mut c = s.go(true);
    c.read(3, 0, 100, 0);
    match c.reply() {
        Reply::Chunk {
            flags,
            cookie: 3,
            kind,
            payload,
        } => {
            assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
            assert!(kind == REPLY_TYPE_NONE || kind == REPLY_TYPE_OFFSET_DATA);
            assert!(payload.is_empty() || payload.len() == 8);
        }
        r => panic!("zero-length structured read: {r:?}"),
    }
    let data = pattern(4, 5000);
    c.write(4, 0, 777, &data);
    c.expect_ok(4);
    c.read(5, 0, 777, 5000);
    match c.reply() {
        Reply::Chunk {
            flags,
            kind,
            cookie,
            payload,
        } => {
            assert_eq!(
                (flags, kind, cookie),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 5)
            );
            assert_eq!(payload.len(), 8 + 5000);
            assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 777);
            assert!(payload[8..] == data[..]);
        }
        r => panic!("structured read: {r:?}"),
    }
    c.read(6, 0, SIZE, 1);
    match c.reply() {
        Reply::Chunk {
            flags,
            kind,
            cookie,
            payload,
        } => {
            assert_eq!(
                (flags, kind, cookie),
                (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)
            );
            assert_eq!(
                u32::from_be_bytes(payload[..4].try_into().unwrap()),
                NBD_EINVAL
            );
            let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
            assert_eq!(payload.len(), 6 + n);
            assert!(
                std::str::from_utf8(&payload[6..]).is_ok(),
                "message is UTF-8"
            );
        }
        r => panic!("structured read error: {r:?}"),
    }
    // Non-read commands may keep simple replies under structured mode.
    c.request(0, CMD_FLUSH, 7, 0, 0);
    c.expect_ok(7);
    c.disc();
    s.assert_healthy();
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let mut s = start(&[]);
    for structured in [false, true] {
        let mut c = s.go(structured);
        c.read(1, 0, 0, 512);
        c.reply().data(1);
        let mut bad = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 2,
            offset: 0,
            len: 512,
        }
        .encode();
        bad[0] ^= 0x80;
        c.send(&bad);
        c.expect_closed("bad request magic");
    }
    s.assert_healthy();
}

#[test]
fn two_hundred_pipelined_requests_all_answered() {
    let mut s = start(&[]);
    for structured in [false, true] {
        let mut c = s.go(structured);
        // Region B is written first; the pipeline writes region A and reads B.
        let b_base = 16 * MIB;
        for i in 0..100u64 {
            c.write(i, 0, b_base + i * 4096, &pattern(1000 + i, 4096));
        }
        // Replies may come in any order, even for these.
        let mut acked: Vec<u64> = (0..100)
            .map(|_| {
                let r = c.reply();
                assert_eq!(r.error(), 0, "{r:?}");
                r.cookie()
            })
            .collect();
        acked.sort();
        assert_eq!(acked, (0..100).collect::<Vec<u64>>());
        // All 200 requests go out before any reply is read.
        for i in 0..100u64 {
            c.write(10_000 + i, 0, i * 8192, &pattern(2000 + i, 8192));
            c.read(20_000 + i, 0, b_base + i * 4096, 4096);
        }
        let mut seen = HashMap::new();
        for _ in 0..200 {
            let r = c.reply();
            let cookie = r.cookie();
            if cookie >= 20_000 {
                let i = cookie - 20_000;
                assert!(
                    r.data(cookie) == pattern(1000 + i, 4096),
                    "read {i} got wrong data"
                );
            } else {
                assert_eq!(r.error(), 0, "write {cookie} failed");
            }
            assert!(
                seen.insert(cookie, ()).is_none(),
                "cookie {cookie} answered twice"
            );
        }
        for i in 0..100u64 {
            assert!(seen.contains_key(&(10_000 + i)) && seen.contains_key(&(20_000 + i)));
        }
        // Region A holds what the pipelined writes sent.
        c.read(1, 0, 0, 100 * 8192);
        let back = c.reply().data(1);
        for i in 0..100usize {
            assert!(
                back[i * 8192..(i + 1) * 8192] == pattern(2000 + i as u64, 8192)[..],
                "pipelined write {i} did not land"
            );
        }
        c.disc();
    }
    s.assert_healthy();
}

#[test]
fn disc_answers_every_request_in_flight_first() {
    let mut s = start(&[]);
    for structured in [false, true] {
        let mut c = s.go(structured);
        // Each mode writes its own data, so the check below sees this round's writes.
        let seed = if structured { 500 } else { 0 };
        for i in 0..40u64 {
            c.write(
                i,
                CMD_FLAG_FUA,
                32 * MIB + i * 65536,
                &pattern(seed + i, 65536),
            );
            c.read(100 + i, 0, i * 65536, 65536);
            c.request(0, CMD_FLUSH, 200 + i, 0, 0);
        }
        c.request(0, CMD_DISC, 999, 0, 0);
        let mut n = 0;
        for _ in 0..120 {
            let r = c.reply();
            let cookie = r.cookie();
            assert_ne!(cookie, 999, "DISC must not be answered");
            if (100..200).contains(&cookie) {
                assert_eq!(r.data(cookie).len(), 65536);
            } else {
                assert_eq!(r.error(), 0);
            }
            n += 1;
        }
        assert_eq!(n, 120);
        c.expect_closed("after DISC with requests in flight");
        // The writes were done before the close.
        let mut c = s.go(false);
        c.read(1, 0, 32 * MIB, 40 * 65536);
        let back = c.reply().data(1);
        for i in 0..40usize {
            assert!(
                back[i * 65536..(i + 1) * 65536] == pattern(seed + i as u64, 65536)[..],
                "write {i} before DISC did not land"
            );
        }
        c.disc();
    }
    s.assert_healthy();
}

#[test]
fn abrupt_close_mid_payload_or_header_leaves_the_server_serving() {
    let mut s = start(&[]);
    for cut in 0..4 {
        let mut c = s.go(cut % 2 == 1);
        match cut {
            // Mid payload of a 1 MiB write.
            0 | 1 => {
                let mut v = Request {
                    flags: 0,
                    kind: CMD_WRITE,
                    cookie: 1,
                    offset: 0,
                    len: MIB as u32,
                }
                .encode()
                .to_vec();
                v.extend_from_slice(&[0x55; 1000]);
                c.send(&v);
            }
            // Mid header, with a big read in flight whose reply is never read.
            _ => {
                c.read(1, 0, 0, 8 << 20);
                c.send(
                    &Request {
                        flags: 0,
                        kind: CMD_READ,
                        cookie: 2,
                        offset: 0,
                        len: 1,
                    }
                    .encode()[..10],
                );
            }
        }
        drop(c);
        s.assert_healthy();
    }
    // The cut write wrote nothing.
    let mut c = s.go(false);
    c.read(1, 0, 0, 1000);
    assert_eq!(c.reply().data(1), vec![0u8; 1000]);
    c.disc();
}

/// Sends `bytes` at `stage` (0: before the client flags, 1: in option
/// haggling, 2/3: in transmission, simple/structured), half-closes, and
/// drains what the server answers until it closes, which it must do within
/// the timeout. Returns the bytes answered.
fn garbage_session(s: &Server, stage: u32, bytes: &[u8]) -> u64 {
    let mut c = match stage {
        0 => s.connect(),
        1 => {
            let mut c = s.connect();
            c.start(true);
            c
        }
        _ => s.go(stage == 3),
    };
    let mut rd = c.s.try_clone().unwrap();
    // Drain in parallel: a server answering big reads must never block our sends.
    let drain = std::thread::spawn(move || -> Result<u64, String> {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match rd.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(total),
                Err(e) => return Err(format!("server did not close: {e}")),
            }
        }
    });
    // The server may close first (bad magic): a failed send is fine.
    let _ = c.s.write_all(bytes);
    let _ = c.s.shutdown(Shutdown::Write);
    drain
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("stage {stage}: {e}"))
}

/// Random bytes, or (half the time) a stream of well-framed requests and
/// options with random fields, which reach deeper into the parsers.
fn garbage(rng: &mut SmallRng, stage: u32) -> Vec<u8> {
    let mut v = Vec::new();
    let n = rng.gen_range(1..6);
    for _ in 0..n {
        if rng.gen_bool(0.5) {
            let mut g = vec![0u8; rng.gen_range(1..2048)];
            rng.fill_bytes(&mut g);
            v.extend_from_slice(&g);
            continue;
        }
        let len: u32 = match rng.gen_range(0..4) {
            0 => 0,
            1 => rng.gen_range(1..4096),
            2 => rng.gen_range(0..(MAX_REQ + 10)),
            _ => rng.gen(),
        };
        if stage == 1 {
            v.extend_from_slice(&IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&rng.gen_range(0u32..12).to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
        } else {
            let kind = if rng.gen_bool(0.8) {
                rng.gen_range(0u16..8)
            } else {
                rng.gen()
            };
            let offset = if rng.gen_bool(0.8) {
                rng.gen_range(0..SIZE)
            } else {
                rng.gen()
            };
            let flags = if rng.gen_bool(0.7) { 0 } else { rng.gen() };
            v.extend_from_slice(
                &Request {
                    flags,
                    kind,
                    cookie: rng.gen(),
                    offset,
                    len,
                }
                .encode(),
            );
        }
        // Some payload, usually shorter than announced.
        let mut p = vec![0u8; rng.gen_range(0..4096).min(len as usize)];
        rng.fill_bytes(&mut p);
        v.extend_from_slice(&p);
    }
    v
}

#[test]
fn seeded_garbage_never_crashes_hangs_or_leaks() {
    let mut s = start(&[]);
    // Let the readiness probe's connection finish before counting.
    std::thread::sleep(Duration::from_millis(200));
    let baseline = s.open_fds();
    let mut rng = SmallRng::seed_from_u64(0x5eed_7a3b);
    let mut answered = [0u64; 4];
    for i in 0..120u32 {
        let stage = i % 4;
        let bytes = garbage(&mut rng, stage);
        answered[stage as usize] += garbage_session(&s, stage, &bytes);
        if i % 20 == 19 {
            s.assert_healthy();
        }
    }
    // The garbage reached the option and request parsers, which answered.
    assert!(
        answered[1] > 0 && answered[2] > 0 && answered[3] > 0,
        "{answered:?}"
    );
    s.assert_healthy();
    // Every connection's descriptors are released once it ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = s.open_fds();
        if now <= baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server holds {now} descriptors, {baseline} before the garbage"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM still ends it cleanly.
    assert!(s.proc.stop().success(), "log:\n{}", s.log_text());
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
