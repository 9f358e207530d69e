//! Valid client sessions used as the seed corpus (written to
//! `corpus/<target>/seed-*` by `cargo run --example seeds`) and by the
//! deterministic tests. They stay under 4 KiB, libFuzzer's default
//! `-max_len`, so mutations stay cheap.

use r3map::nbd::proto::*;

/// Client flags, then each option with its magic and length.
pub fn handshake(flags: u32, opts: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut v = flags.to_be_bytes().to_vec();
    for (opt, data) in opts {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }
    v
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// One request header, followed by `payload` for writes.
pub fn req(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    }
    .encode()
    .to_vec();
    if kind == CMD_WRITE {
        // A recognisable, non-zero pattern so reads of it differ from holes.
        v.extend((0..len).map(|i| (i as u8) ^ (cookie as u8) ^ 0x5a));
    }
    v
}

/// A session touching every command, crossing a chunk edge (64 KiB).
pub fn requests() -> Vec<u8> {
    let edge = crate::CHUNK - 512;
    [
        req(CMD_WRITE, 0, 1, 0, 1024),
        req(CMD_READ, 0, 2, 0, 1024),
        req(CMD_WRITE, CMD_FLAG_FUA, 3, edge, 1024),
        req(CMD_READ, CMD_FLAG_DF, 4, edge, 1024),
        req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 512, 256),
        req(CMD_TRIM, 0, 6, 0, 4096),
        req(CMD_CACHE, 0, 7, 0, 8192),
        req(CMD_FLUSH, 0, 8, 0, 0),
        req(CMD_READ, 0, 9, crate::EXPORT_SIZE - 4096, 4096),
        req(CMD_READ, 0, 10, 0, 0),
        req(CMD_DISC, 0, 11, 0, 0),
    ]
    .concat()
}

/// Requests every check must refuse: bad flags, out of range, oversize,
/// offset overflow, unknown command; then a truncated oversize write.
pub fn refusals() -> Vec<u8> {
    [
        req(CMD_READ, CMD_FLAG_FUA, 20, 0, 512),
        req(CMD_READ, 0, 21, crate::EXPORT_SIZE, 1),
        req(CMD_READ, 0, 22, 0, crate::MAX_REQUEST + 1),
        req(CMD_TRIM, 0, 23, u64::MAX, 2),
        req(CMD_WRITE, 1 << 3, 24, 0, 16),
        req(CMD_WRITE, 0, 25, crate::EXPORT_SIZE - 8, 16),
        req(CMD_FLUSH, CMD_FLAG_FUA, 26, 0, 0),
        req(42, 0, 27, 0, 0),
        req(CMD_CACHE, 0, 28, 0, 0),
        // Oversize: its payload must be skipped, here it is cut short.
        Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 29,
            offset: 0,
            len: crate::MAX_REQUEST + 1,
        }
        .encode()
        .to_vec(),
        vec![0xab; 100],
    ]
    .concat()
}

const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

pub fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let full = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    vec![
        (
            "go-structured",
            [
                handshake(
                    BOTH,
                    &[
                        (OPT_STRUCTURED_REPLY, vec![]),
                        (OPT_LIST, vec![]),
                        (OPT_INFO, info("r3map", &full)),
                        (OPT_GO, info("", &[])),
                    ],
                ),
                requests(),
            ]
            .concat(),
        ),
        (
            "export-name-zeroes",
            [
                handshake(
                    FLAG_C_FIXED_NEWSTYLE,
                    &[(OPT_EXPORT_NAME, b"r3map".to_vec())],
                ),
                requests(),
            ]
            .concat(),
        ),
        (
            "go-ro-simple",
            [
                handshake(BOTH, &[(OPT_GO, info("ro", &[INFO_NAME]))]),
                refusals(),
            ]
            .concat(),
        ),
        (
            "refused-options-abort",
            handshake(
                BOTH,
                &[
                    (OPT_STARTTLS, vec![]),
                    (OPT_LIST_META_CONTEXT, vec![0; 8]),
                    (OPT_STRUCTURED_REPLY, vec![1]),
                    (OPT_STRUCTURED_REPLY, vec![]),
                    (OPT_SET_META_CONTEXT, vec![0; 8]),
                    (OPT_LIST, vec![0]),
                    (OPT_GO, info("nope", &[])),
                    (OPT_INFO, vec![0, 0, 0, 9, b'x']),
                    (99, vec![1, 2, 3]),
                    (OPT_ABORT, vec![]),
                ],
            ),
        ),
        ("list-hangup", handshake(BOTH, &[(OPT_LIST, vec![])])),
    ]
}

pub fn transmission_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with_mode = |mode: u8, body: Vec<u8>| [vec![mode], body].concat();
    vec![
        ("simple", with_mode(0, requests())),
        ("structured", with_mode(1, requests())),
        ("ro-simple", with_mode(2, requests())),
        ("refusals-structured", with_mode(1, refusals())),
        ("refusals-ro", with_mode(2, refusals())),
        (
            "bad-magic",
            with_mode(1, [req(CMD_FLUSH, 0, 1, 0, 0), vec![0; 28]].concat()),
        ),
    ]
}
