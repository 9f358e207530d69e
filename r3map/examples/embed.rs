//! Embedding the engine the way the CSI node plugin does.
//!
//! 1. An in-process region service (`r3map backend`'s gRPC service over a
//!    `memory:` store) on 127.0.0.1:0 stands in for the remote host.
//! 2. A managed [`Volume`] over `r3map://127.0.0.1:PORT/vol1`, its cache in
//!    a temporary directory.
//! 3. A socketpair: one end is served with [`Volume::serve_kernel`], the
//!    other plays the kernel, sending raw NBD transmission requests (WRITE,
//!    FLUSH, READ, DISC) as the kernel would after a netlink CONNECT.
//! 4. The volume's counters as JSON.
//! 5. A migration to a second volume handle in the same process: the
//!    first volume's `Seed` service on a unix socket, a `Leech` pulling it
//!    into a second cache, finalize (the region's fencing epoch moves to
//!    the destination; the source refuses writes from then on), and a
//!    second `Volume` serving the destination, read through its own
//!    socketpair.
//! 6. [`Volume::close`] of both with a deadline, then a fresh client reads
//!    the region back to show the writes reached the remote.
//!
//! Run: `cargo run --release -p r3map --example embed`. Every step prints
//! one line; tests/volume.rs checks them.

use std::time::{Duration, Instant};

use r3map::migration::pb::seed_server::SeedServer;
use r3map::migration::seed::SeedService;
use r3map::migration::{leech, Leech};
use r3map::nbd::proto::*;
use r3map::remote::client::ConnectOptions;
use r3map::remote::{Client, RegionService, Store, DEFAULT_MAX_REQUEST};
use r3map::volume::BackendSpec;
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

    // 5. Migrate to a second volume handle in this process.
    let seed_ep: r3map::net::Endpoint =
        dir.path().join("seed.sock").display().to_string().parse()?;
    let seed_l = r3map::net::Listener::bind(&seed_ep, None, None).await?;
    let seed_svc = SeedServer::new(SeedService::new(vol.source().clone()));
    let stop_seed = CancellationToken::new();
    let seed = tokio::spawn(seed_l.serve(
        r3map::net::server(None, r3map::net::Keepalive::MIGRATION)?.add_service(seed_svc),
        stop_seed.clone().cancelled_owned(),
    ));
    let leech = Leech::start(leech::Config {
        from: seed_ep,
        token: None,
        tls: None,
        cache: dir.path().join("vol1-b.cache"),
        fallback: Some(uri.clone()),
        owner: Some("node-b".into()),
        patience: Duration::from_secs(10),
        pull_workers: 4,
        volume: None,
        reuse: None,
        precopy: Default::default(),
    })
    .await?;
    // Written at the source during the pre-copy: in the dirty list.
    let late: Vec<u8> = (0..4096u64).map(|i| (i % 13) as u8 + 1).collect();
    let late_off = 9 * MIB;
    request(&mut kernel, CMD_WRITE, 4, late_off, late.len() as u32).await?;
    kernel.write_all(&late).await?;
    expect_reply(&mut kernel, 4).await?;
    let out = leech.finalize(false).await?;
    println!(
        "migrated: dirty_chunks={} epoch={}",
        out.dirty_chunks,
        out.epoch.unwrap_or(0)
    );
    let vol_b = Volume::open(VolumeSpec::direct(
        "vol1-b",
        BackendSpec::Open(leech.managed().clone()),
        SIZE,
    ))
    .await?;
    let (mut kernel_b, ours_b) = UnixStream::pair()?;
    let conn_b = vol_b.serve_kernel(ours_b);
    request(&mut kernel_b, CMD_READ, 1, late_off, late.len() as u32).await?;
    expect_reply(&mut kernel_b, 1).await?;
    let mut got = vec![0u8; late.len()];
    kernel_b.read_exact(&mut got).await?;
    println!(
        "second volume reads the bytes written during the migration: {}",
        if got == late { "yes" } else { "NO" }
    );
    // The source handed its region over: its writes fail (EIO).
    request(&mut kernel, CMD_WRITE, 5, 0, 4096).await?;
    kernel.write_all(&[9u8; 4096]).await?;
    let refused = expect_reply(&mut kernel, 5).await.is_err();
    println!(
        "source refuses writes after the hand-over: {}",
        if refused { "yes" } else { "NO" }
    );
    request(&mut kernel_b, CMD_DISC, 2, 0, 0).await?;
    conn_b.await?;
    vol_b
        .close(Instant::now() + Duration::from_secs(30))
        .await?;
    drop(leech);
    println!("closed the destination volume");

    request(&mut kernel, CMD_DISC, 6, 0, 0).await?;
    conn.await?;
    println!("connection ended after DISC");
    stop_seed.cancel();
    seed.await??;

    vol.close(Instant::now() + Duration::from_secs(30)).await?;
    println!("closed volume");

    // What the flush promised: the bytes are at the remote.
    let remote = Client::connect(&ConnectOptions::plain(addr.to_string()))
        .await?
        .backend("vol1")
        .await?;
    let mut there = vec![0u8; data.len()];
    remote.read_at(off, &mut there).await?;
    let mut there_late = vec![0u8; late.len()];
    remote.read_at(late_off, &mut there_late).await?;
    println!(
        "remote region holds the written bytes: {}",
        if there == data && there_late == late {
            "yes"
        } else {
            "NO"
        }
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
