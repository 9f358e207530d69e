//! A raw NBD transmission-phase client over any tokio stream: the kernel's
//! side of a socketpair, for tests that serve streams without a handshake.

use std::collections::HashMap;
use std::time::Duration;

use r3map::nbd::proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A stuck server fails the test instead of hanging it.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// One simple reply: its cookie, NBD error, and a READ's data.
#[derive(Debug)]
pub struct RawReply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

/// Sends requests and reads replies (in whatever order they come),
/// remembering each READ's length to know how much data follows.
pub struct RawClient<S> {
    pub s: S,
    reads: HashMap<u64, usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn new(s: S) -> Self {
        RawClient {
            s,
            reads: HashMap::new(),
        }
    }

    /// Sends one request; `payload` follows the header (a WRITE's data).
    pub async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let h = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode();
        let mut b = h.to_vec();
        b.extend_from_slice(payload);
        tokio::time::timeout(TIMEOUT, self.s.write_all(&b))
            .await
            .expect("server stopped reading")
            .expect("send request");
        if kind == CMD_READ {
            self.reads.insert(cookie, len as usize);
        }
    }

    pub async fn read(&mut self, cookie: u64, offset: u64, len: u32) {
        self.send(CMD_READ, 0, cookie, offset, len, &[]).await;
    }

    pub async fn write(&mut self, cookie: u64, flags: u16, offset: u64, data: &[u8]) {
        self.send(CMD_WRITE, flags, cookie, offset, data.len() as u32, data)
            .await;
    }

    /// The next reply, whichever request it answers.
    pub async fn reply(&mut self) -> RawReply {
        tokio::time::timeout(TIMEOUT, self.reply_inner())
            .await
            .expect("no reply in time")
    }

    async fn reply_inner(&mut self) -> RawReply {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.expect("reply header");
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        assert_eq!(magic, SIMPLE_REPLY_MAGIC, "simple reply expected");
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = Vec::new();
        if let Some(len) = self.reads.remove(&cookie) {
            if error == 0 {
                data = vec![0u8; len];
                self.s.read_exact(&mut data).await.expect("read data");
            }
        }
        RawReply {
            cookie,
            error,
            data,
        }
    }

    /// The next reply, which must be a success for `cookie`.
    pub async fn expect_ok(&mut self, cookie: u64) -> Vec<u8> {
        let r = self.reply().await;
        assert_eq!((r.cookie, r.error), (cookie, 0), "reply {r:?}");
        r.data
    }

    /// Reads `len` bytes at `offset` (one request, waited for).
    pub async fn read_back(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.read(cookie, offset, len).await;
        self.expect_ok(cookie).await
    }
}
