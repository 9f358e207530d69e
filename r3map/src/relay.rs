//! A TCP relay that delays every byte by a fixed time in each direction,
//! keeping the stream pipelined: bytes read at t are written at t + delay,
//! however many are still in flight. Tests and `bench` use it to put a
//! round-trip time between two hosts on a kernel without `netem`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Accepts connections on `listener` and relays each to `target`, adding
/// `rtt / 2` in each direction. Runs until the listener fails.
pub async fn run(listener: TcpListener, target: SocketAddr, rtt: Duration) -> io::Result<()> {
    let one_way = rtt / 2;
    info!(listen = %listener.local_addr()?, %target, ?rtt, "relaying");
    loop {
        let (client, peer) = listener.accept().await?;
        tokio::spawn(async move {
            match relay_one(client, target, one_way).await {
                Ok(()) => debug!(%peer, "relay connection closed"),
                Err(e) => warn!(%peer, error = %e, "relay connection failed"),
            }
        });
    }
}

async fn relay_one(client: TcpStream, target: SocketAddr, one_way: Duration) -> io::Result<()> {
    let server = TcpStream::connect(target).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, one_way));
    let down = tokio::spawn(pump(sr, cw, one_way));
    let (a, b) = tokio::join!(up, down);
    a.map_err(io::Error::other)??;
    b.map_err(io::Error::other)??;
    Ok(())
}

/// Copies `rd` to `wr`, each read released `delay` after it arrived.
async fn pump(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf, delay: Duration) -> io::Result<()> {
    // Bounded so a slow receiver pushes back on the sender, as a real link would.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(4096);
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if data.is_empty() {
                break; // EOF, delayed like the data before it
            }
            wr.write_all(&data).await?;
        }
        wr.shutdown().await
    });
    loop {
        // Not zero-filled: a read often returns far less than 256 KiB.
        let mut buf = Vec::with_capacity(256 << 10);
        let n = match rd.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send((Instant::now() + delay, Vec::new())).await;
                drop(tx);
                let _ = writer.await;
                return Err(e);
            }
        };
        buf.truncate(n);
        let eof = n == 0;
        if tx.send((Instant::now() + delay, buf)).await.is_err() || eof {
            break;
        }
    }
    drop(tx);
    writer.await.map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the relay: one round trip takes at least the RTT,
    /// and pipelined writes are not serialised by it.
    #[tokio::test]
    async fn adds_rtt_and_keeps_pipelining() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let rtt = Duration::from_millis(40);
        tokio::spawn(run(relay, echo_addr, rtt));

        let mut c = TcpStream::connect(relay_addr).await.unwrap();
        let t = Instant::now();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        let one = t.elapsed();
        assert_eq!(&b, b"ping");
        assert!(one >= rtt, "round trip {one:?} shorter than the rtt");

        // 20 messages sent back to back come back after about one RTT, not 20.
        let t = Instant::now();
        for i in 0..20u8 {
            c.write_all(&[i; 100]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut got = vec![0u8; 2000];
        c.read_exact(&mut got).await.unwrap();
        let all = t.elapsed();
        assert!(all < rtt * 4, "pipelined writes took {all:?}");
        for i in 0..20u8 {
            assert!(got[i as usize * 100..(i as usize + 1) * 100]
                .iter()
                .all(|&x| x == i));
        }
    }
}
