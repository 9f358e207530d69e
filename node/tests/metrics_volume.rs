//! The node plugin's per-volume metrics over a real engine volume, with
//! no kernel NBD client: an in-process region service (`r3map backend`'s
//! gRPC service over `memory:`), a managed `r3map::Volume` fenced for
//! `node-1` as NodeStageVolume opens it, and the kernel's end of a
//! socketpair played by hand with raw NBD requests (as
//! `r3map/examples/embed.rs` does). The snapshot `NodeService` takes
//! (`VolumeMetrics::of`) is served by the same exporter and HTTP server as
//! the binary's, scraped, parsed strictly, and compared with the I/O done
//! and with the engine's own counters.

use std::net::SocketAddr;
use std::sync::Arc;

use csi::metrics::{parse, scrape, Exporter, Exposition};
use r3map::nbd::proto::*;
use r3map::remote::{RegionService, Store, DEFAULT_MAX_REQUEST};
use r3map::{Volume, VolumeSpec};
use r3map_csi_node::metrics::{registry, VolumeMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const VOL: &str = "pv-metrics";

async fn request(s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32) {
    let h = Request {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    }
    .encode();
    s.write_all(&h).await.unwrap();
}

/// The error field of the next simple reply, which must be for `cookie`.
async fn reply(s: &mut UnixStream, cookie: u64) -> u32 {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(r[0..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), cookie);
    u32::from_be_bytes(r[4..8].try_into().unwrap())
}

async fn metrics(addr: SocketAddr) -> Exposition {
    let s = scrape(addr, "/metrics").await.unwrap();
    assert_eq!(s.status, 200);
    parse(&s.body).unwrap_or_else(|e| panic!("{e}\n{}", s.body))
}

fn get(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l = vec![("volume", VOL)];
    l.extend_from_slice(labels);
    e.value(name, &l)
        .unwrap_or_else(|| panic!("no single sample {name} {l:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_metrics_follow_real_nbd_traffic() {
    // The region service, in this process.
    let svc = RegionService::open(
        Store::open("memory:").await.unwrap(),
        r3map::backend::DEFAULT_CHUNK_SIZE,
        DEFAULT_MAX_REQUEST,
    )
    .await
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let region_addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );

    // The volume, opened as NodeStageVolume opens it (fenced for us).
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("r3map://{region_addr}/{VOL}?fence=node-1");
    let vol = Arc::new(
        Volume::open(VolumeSpec::managed(
            VOL,
            uri.as_str(),
            SIZE,
            dir.path().join("cache"),
        ))
        .await
        .unwrap(),
    );
    let epoch = vol.backend().epoch().expect("fenced volumes have an epoch");
    assert!(epoch > 0);

    // /metrics as the binary serves it, over this one volume.
    let ml = csi::metrics::bind("127.0.0.1:0").await.unwrap();
    let maddr = ml.local_addr().unwrap();
    let v = vol.clone();
    let exporter = Exporter::new(Default::default()).with_snapshot(move || {
        let v = v.clone();
        async move { registry(vec![VolumeMetrics::of(VOL, epoch, Some(&v))]) }
    });
    tokio::spawn(csi::metrics::serve(
        ml,
        Arc::new(exporter),
        std::future::pending(),
    ));

    let (mut kernel, ours) = UnixStream::pair().unwrap();
    let conn = vol.serve_kernel(ours);

    let e0 = metrics(maddr).await;
    assert_eq!(e0.value("r3map_node_staged_volumes", &[]), Some(1.0));
    assert_eq!(get(&e0, "r3map_node_volume_attached", &[]), 1.0);
    assert_eq!(get(&e0, "r3map_node_volume_fenced", &[]), 0.0);
    assert_eq!(get(&e0, "r3map_node_volume_epoch", &[]), epoch as f64);
    assert_eq!(get(&e0, "r3map_node_volume_size_bytes", &[]), SIZE as f64);
    assert_eq!(get(&e0, "r3map_node_volume_connections", &[]), 1.0);
    let region_chunks = get(&e0, "r3map_node_volume_region_chunks", &[]);
    assert_eq!(region_chunks, (SIZE / MIB) as f64);
    let write = [("command", "write")];
    let read = [("command", "read")];
    assert_eq!(get(&e0, "r3map_node_nbd_requests_total", &write), 0.0);
    let pushed0 = get(&e0, "r3map_node_volume_pushed_bytes_total", &[]);

    // 1 MiB across two chunks, a flush (pushes: flush durability), the
    // same bytes read back, and a read past the end (refused).
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    let off = 3 * MIB + 4096;
    request(&mut kernel, CMD_WRITE, 1, off, MIB as u32).await;
    kernel.write_all(&data).await.unwrap();
    assert_eq!(reply(&mut kernel, 1).await, 0);
    request(&mut kernel, CMD_FLUSH, 2, 0, 0).await;
    assert_eq!(reply(&mut kernel, 2).await, 0);
    request(&mut kernel, CMD_READ, 3, off, MIB as u32).await;
    assert_eq!(reply(&mut kernel, 3).await, 0);
    let mut back = vec![0u8; MIB as usize];
    kernel.read_exact(&mut back).await.unwrap();
    assert!(back == data);
    request(&mut kernel, CMD_READ, 4, SIZE, 4096).await;
    assert_ne!(reply(&mut kernel, 4).await, 0, "a read past the end");

    let e1 = metrics(maddr).await;
    let flush = [("command", "flush")];
    assert_eq!(get(&e1, "r3map_node_nbd_requests_total", &write), 1.0);
    assert_eq!(get(&e1, "r3map_node_nbd_requests_total", &flush), 1.0);
    assert_eq!(get(&e1, "r3map_node_nbd_requests_total", &read), 2.0);
    assert_eq!(get(&e1, "r3map_node_nbd_errors_total", &read), 1.0);
    assert_eq!(get(&e1, "r3map_node_nbd_errors_total", &write), 0.0);
    let bytes = "r3map_node_nbd_request_bytes_total";
    assert_eq!(get(&e1, bytes, &write), MIB as f64);
    assert_eq!(get(&e1, bytes, &read), MIB as f64, "only successful bytes");

    // Latency histograms: _count equals the requests, buckets are the
    // engine's log2 bounds in seconds (cumulative and ending in +Inf with
    // _count: parse checked that), and a 1 MiB write took some time.
    for cmd in ["read", "write", "flush", "trim", "write_zeroes", "cache"] {
        let c = [("command", cmd)];
        let n = get(&e1, "r3map_node_nbd_requests_total", &c);
        let h = "r3map_node_nbd_request_duration_seconds";
        assert_eq!(get(&e1, &format!("{h}_count"), &c), n, "{cmd}");
        let les: Vec<String> = e1
            .samples(&format!("{h}_bucket"), &[("volume", VOL), ("command", cmd)])
            .map(|s| s.labels["le"].clone())
            .collect();
        assert_eq!(les.len(), 24, "{cmd}: 23 bounds and +Inf");
        for (i, le) in les.iter().enumerate().take(23) {
            let want = (1u64 << i) as f64 / 1e6;
            let got: f64 = le.parse().unwrap();
            assert!(
                (got - want).abs() <= want * 1e-12,
                "{cmd} le {le} != {want}"
            );
        }
        assert_eq!(les[23], "+Inf");
    }
    let wsum = get(&e1, "r3map_node_nbd_request_duration_seconds_sum", &write);
    assert!(wsum > 0.0 && wsum < 30.0, "{wsum}");

    // Cache state: the two written chunks went to the region at the
    // flush; the chunk states add up to the region's chunks.
    let pushed1 = get(&e1, "r3map_node_volume_pushed_bytes_total", &[]);
    assert!(
        pushed1 >= pushed0 + 2.0 * MIB as f64,
        "pushed {pushed0} -> {pushed1}"
    );
    assert!(get(&e1, "r3map_node_volume_pushed_chunks_total", &[]) >= 2.0);
    let chunks = |s| get(&e1, "r3map_node_volume_chunks", &[("state", s)]);
    assert_eq!(chunks("dirty"), 0.0, "flushed");
    assert!(chunks("local") >= 2.0);
    assert_eq!(
        chunks("local") + chunks("dirty") + chunks("missing"),
        region_chunks
    );

    // The exported numbers are the engine's.
    let st = vol.stats();
    let p = st.managed.as_ref().unwrap();
    assert_eq!(pushed1, p.bytes_pushed as f64);
    assert_eq!(
        get(&e1, "r3map_node_volume_pulled_bytes_total", &[]),
        p.bytes_pulled as f64
    );
    assert_eq!(
        get(&e1, "r3map_node_nbd_request_duration_seconds_sum", &write),
        st.nbd.write.latency.sum_us as f64 / 1e6
    );

    // More writes, counters only grow.
    request(&mut kernel, CMD_WRITE, 5, 0, 4096).await;
    kernel.write_all(&[1u8; 4096]).await.unwrap();
    assert_eq!(reply(&mut kernel, 5).await, 0);
    let e2 = metrics(maddr).await;
    assert_eq!(get(&e2, "r3map_node_nbd_requests_total", &write), 2.0);
    assert_eq!(get(&e2, bytes, &write), (MIB + 4096) as f64);
    assert_eq!(
        get(&e2, "r3map_node_volume_chunks", &[("state", "dirty")]),
        1.0,
        "written, not flushed"
    );

    request(&mut kernel, CMD_DISC, 6, 0, 0).await;
    conn.await.unwrap();
}
