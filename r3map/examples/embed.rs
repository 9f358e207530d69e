//! Embedding the engine the way the CSI node plugin does.
//!
//! 1. An in-process region service (`r3map backend`'s gRPC service over a
//!    `memory:` store) on 127.0.0.1:0 stands in for the remote host.
//! 2. A managed [`Volume`] over `r3map://127.0.0.1:PORT/vol1`, its cache in
//!    a temporary directory.
//! 3. A socketpair: one end is served with [`Volume::serve_kernel`], the
//!    other plays the kernel, sending raw NBD transmission requests (WRITE,
//!    FLUSH, READ, DISC) as the kernel would after a netlink CONNECT.
//! 4. The volume's counters as JSON, then [`Volume::close`] with a deadline,
//!    then a fresh client reads the region back to show the write reached
//!    the remote.
//!
//! Run: `cargo run --release -p r3map --example embed`. Every step prints
//! one line; tests/volume.rs checks them.

use std::time::{Duration, Instant};

use r3map::nbd::proto::*;
use r3map::remote::client::ConnectOptions;
use r3map::remote::{Client, RegionService, Store, DEFAULT_MAX_REQUEST};
use r3map::{Backend, Volume, VolumeSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // 1. The remote side, in this process.
    let svc = RegionService::open(
        Store::open("memory:").await?,
        r3map::backend::DEFAULT_CHUNK_SIZE,
        DEFAULT_MAX_REQUEST,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop_grpc = CancellationToken::new();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop_grpc.clone().cancelled_owned(),
            ),
    );
    println!("region service on {addr}");

    // 2. The volume, through a local cache.
    let dir = tempfile::tempdir()?;
    let uri = format!("r3map://{addr}/vol1");
    let vol = Volume::open(VolumeSpec::managed(
        "vol1",
        uri.as_str(),
        SIZE,
        dir.path().join("vol1.cache"),
    ))
    .await?;
    println!(
        "opened volume {} ({} bytes) over {uri}",
        vol.name(),
        vol.size()
    );

    // 3. The kernel's end of a socketpair, driven by hand.
    let (mut kernel, ours) = UnixStream::pair()?;
    let conn = vol.serve_kernel(ours);
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    let off = 3 * MIB + 4096;

    request(&mut kernel, CMD_WRITE, 1, off, data.len() as u32).await?;
    kernel.write_all(&data).await?;
    expect_reply(&mut kernel, 1).await?;
    println!("WRITE {} bytes at {off}: ok", data.len());

    request(&mut kernel, CMD_FLUSH, 2, 0, 0).await?;
    expect_reply(&mut kernel, 2).await?;
    println!("FLUSH: ok");

    request(&mut kernel, CMD_READ, 3, off, data.len() as u32).await?;
    expect_reply(&mut kernel, 3).await?;
    let mut back = vec![0u8; data.len()];
    kernel.read_exact(&mut back).await?;
    if back != data {
        return Err("READ returned other bytes than written".into());
    }
    println!("READ {} bytes at {off}: same bytes", back.len());

    // 4. Counters, as the CSI layer would export them.
    println!("stats {}", vol.stats().to_json());

    request(&mut kernel, CMD_DISC, 4, 0, 0).await?;
    conn.await?;
    println!("connection ended after DISC");

    vol.close(Instant::now() + Duration::from_secs(30)).await?;
    println!("closed volume");

    // What the flush promised: the bytes are at the remote.
    let remote = Client::connect(&ConnectOptions::plain(addr.to_string()))
        .await?
        .backend("vol1")
        .await?;
    let mut there = vec![0u8; data.len()];
    remote.read_at(off, &mut there).await?;
    println!(
        "remote region holds the written bytes: {}",
        if there == data { "yes" } else { "NO" }
    );

    stop_grpc.cancel();
    grpc.await??;
    Ok(())
}

/// Sends one request header (a WRITE's payload follows separately).
async fn request(
    s: &mut UnixStream,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> std::io::Result<()> {
    let h = Request {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    }
    .encode();
    s.write_all(&h).await
}

/// Reads one simple reply header and checks it is a success for `cookie`
/// (a READ's data follows it).
async fn expect_reply(s: &mut UnixStream, cookie: u64) -> Result<(), BoxError> {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).await?;
    let magic = u32::from_be_bytes(r[0..4].try_into()?);
    let error = u32::from_be_bytes(r[4..8].try_into()?);
    let got = u64::from_be_bytes(r[8..16].try_into()?);
    if magic != SIMPLE_REPLY_MAGIC || got != cookie || error != 0 {
        return Err(format!("reply magic {magic:#x} cookie {got} error {error}").into());
    }
    Ok(())
}
