//! `redis://HOST:PORT/DB?prefix=NAME` — one key per chunk under a
//! per-region prefix. Writes use SETRANGE and reads GETRANGE, so a partial
//! chunk write is one atomic command (no read-modify-write race between
//! concurrent writers), and a missing or short key reads as zeros.

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;

use super::{check_range, chunk_spans, Backend, Error, Result};

/// A region stored in Redis as one string key per chunk, `{prefix}:{index}`.
///
/// Keys are created by the first write into their chunk and only as long as
/// the furthest byte written; a missing key, or bytes past a key's end, read
/// as zeros. A trim that covers a whole chunk deletes its key. Backends on
/// the same server, database and prefix share the region; the prefix also
/// records the chunk size (`{prefix}:chunk-size`), and a backend opened with
/// another chunk size is refused.
pub struct Redis {
    conn: MultiplexedConnection,
    prefix: String,
    size: u64,
    chunk: u64,
}

impl Redis {
    /// Connects to `url` (a plain redis:// URL without our `prefix` parameter)
    /// and serves the keys under `prefix` as a region of `size` bytes in
    /// chunks of `chunk` bytes.
    pub async fn connect(url: &str, prefix: &str, size: u64, chunk: u64) -> Result<Self> {
        if chunk == 0 || chunk > 512 << 20 {
            return Err(Error::InvalidArgument(
                "redis chunk size must be between 1 byte and 512 MiB".into(),
            ));
        }
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        // First opener records the chunk size; a later one with another
        // size would read every key at the wrong offsets.
        let key = format!("{prefix}:chunk-size");
        let (stored,): (u64,) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(chunk)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        if stored != chunk {
            return Err(Error::FailedPrecondition(format!(
                "redis prefix {prefix:?} holds chunks of {stored} bytes, not {chunk}"
            )));
        }
        Ok(Redis {
            conn,
            prefix: prefix.to_string(),
            size,
            chunk,
        })
    }

    fn key(&self, idx: u64) -> String {
        format!("{}:{idx}", self.prefix)
    }

    fn chunk_len(&self, idx: u64) -> u64 {
        (self.size - idx * self.chunk).min(self.chunk)
    }
}

#[async_trait]
impl Backend for Redis {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let spans: Vec<_> = chunk_spans(offset, buf.len() as u64, self.chunk).collect();
        if spans.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for &(idx, within, _, n) in &spans {
            pipe.cmd("GETRANGE")
                .arg(self.key(idx))
                .arg(within)
                .arg(within + n - 1);
        }
        let parts: Vec<Vec<u8>> = pipe.query_async(&mut self.conn.clone()).await?;
        for (&(_, _, pos, n), part) in spans.iter().zip(parts) {
            let out = &mut buf[pos as usize..(pos + n) as usize];
            // Every byte not returned (missing key, short key) is zero:
            // never leave what the caller's buffer held before.
            let k = part.len().min(out.len());
            out[..k].copy_from_slice(&part[..k]);
            out[k..].fill(0);
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        let mut pipe = redis::pipe();
        for (idx, within, pos, n) in chunk_spans(offset, data.len() as u64, self.chunk) {
            pipe.cmd("SETRANGE")
                .arg(self.key(idx))
                .arg(within)
                .arg(&data[pos as usize..(pos + n) as usize])
                .ignore();
        }
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// A write is in Redis once its reply arrived; how durable Redis keeps it
    /// (appendfsync) is the Redis server's configuration.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        let mut pipe = redis::pipe();
        let mut any = false;
        for (idx, within, _, n) in chunk_spans(offset, len, self.chunk) {
            any = true;
            if n == self.chunk_len(idx) {
                pipe.cmd("DEL").arg(self.key(idx)).ignore();
            } else {
                // Zero only bytes the key already holds; beyond its end they read as zeros.
                pipe.cmd("EVAL")
                    .arg(ZERO_RANGE)
                    .arg(1)
                    .arg(self.key(idx))
                    .arg(within)
                    .arg(n)
                    .ignore();
            }
        }
        if any {
            let () = pipe.query_async(&mut self.conn.clone()).await?;
        }
        Ok(())
    }
}

/// Zeros `len` bytes at `off` in a key without growing it.
const ZERO_RANGE: &str = r#"
local cur = redis.call('STRLEN', KEYS[1])
local off = tonumber(ARGV[1])
local n = math.min(tonumber(ARGV[2]), cur - off)
if n > 0 then redis.call('SETRANGE', KEYS[1], off, string.rep('\0', n)) end
return 0
"#;

/// Takes our `prefix=` query parameter out of a redis URL; the rest goes
/// to the redis client unchanged.
pub fn split_prefix(uri: &str) -> Result<(String, String)> {
    let Some((base, query)) = uri.split_once('?') else {
        return Ok((uri.to_string(), "r3map".to_string()));
    };
    let mut prefix = None;
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("prefix", v)) if !v.is_empty() => prefix = Some(v.to_string()),
            Some(("prefix", _)) => {
                return Err(Error::InvalidUri {
                    uri: uri.to_string(),
                    reason: "prefix must not be empty".into(),
                })
            }
            _ => rest.push(kv),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, prefix.unwrap_or_else(|| "r3map".to_string())))
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn redis_prefix_is_taken_out() {
        let (u, p) = split_prefix("redis://127.0.0.1:6379/2?prefix=vol1").unwrap();
        assert_eq!(
            (u.as_str(), p.as_str()),
            ("redis://127.0.0.1:6379/2", "vol1")
        );
        let (u, p) = split_prefix("redis://h:1/0").unwrap();
        assert_eq!((u.as_str(), p.as_str()), ("redis://h:1/0", "r3map"));
        assert!(split_prefix("redis://h:1/0?prefix=").is_err());
    }
}
