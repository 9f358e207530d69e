//! `r3map backend` (the region server) as a real process, driven through
//! the library's client and `RemoteBackend`, and through `r3map serve
//! --backend r3map://...` with nbdcopy.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    free_port, r3map_bin, require, run, serve, sock, tmp, Addr, Proc, RedisServer, TestCa,
};
use r3map::auth::ClientTls;
use r3map::backend::{Backend, Error as BackendError};
use r3map::remote::client::{Client, ConnectOptions};
use r3map::remote::pb;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tonic::Code;

const MIB: u64 = 1 << 20;
const TOKEN: &str = "s3cr3t-t0ken-0123456789";

/// A running `r3map backend`.
struct Server {
    proc: Proc,
    port: u16,
    args: Vec<String>,
}

impl Server {
    fn start(store: &str, extra: &[&str]) -> Server {
        let port = free_port();
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--store".to_string(),
            store.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Server {
            proc: spawn(&args, port),
            port,
            args,
        }
    }

    /// Stops with SIGTERM (which must exit cleanly) and starts again on the
    /// same port and store.
    fn restart(&mut self) {
        let st = self.proc.stop();
        assert!(st.success(), "r3map backend exited with {st} on SIGTERM");
        self.proc = spawn(&self.args, self.port);
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn opts(&self) -> ConnectOptions {
        ConnectOptions::plain(self.addr())
    }

    async fn client(&self) -> Client {
        Client::connect(&self.opts()).await.expect("connect")
    }
}

fn spawn(args: &[String], port: u16) -> Proc {
    let child = Command::new(r3map_bin())
        .arg("backend")
        .args(args)
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn r3map backend");
    let mut p = Proc {
        child,
        name: "r3map backend".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("r3map backend exited early: {st}");
        }
        assert!(Instant::now() < deadline, "r3map backend did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn random_bytes(seed: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn dir_store(dir: &Path) -> String {
    format!("dir:{}", dir.join("regions").display())
}

async fn read(b: &dyn Backend, offset: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0xAAu8; len as usize];
    b.read_at(offset, &mut v).await.expect("read");
    v
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("call should have failed").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_lifecycle() {
    let dir = tmp();
    let srv = Server::start(&dir_store(dir.path()), &["--chunk-size", "64KiB"]);
    let c = srv.client().await;

    assert!(c.list_regions().await.unwrap().is_empty());
    let a = c.create_region(Some("a"), MIB).await.unwrap();
    assert_eq!((a.id.as_str(), a.size), ("a", MIB));
    let gen = c.create_region(None, 4096).await.unwrap();
    assert!(!gen.id.is_empty() && gen.id != "a", "{gen:?}");
    let list = c.list_regions().await.unwrap();
    let mut ids: Vec<_> = list.iter().map(|r| (r.id.clone(), r.size)).collect();
    ids.sort();
    let mut want = vec![("a".to_string(), MIB), (gen.id.clone(), 4096)];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(c.get_region("a").await.unwrap().size, MIB);

    // Same id, same size: idempotent. Another size: refused.
    assert_eq!(c.create_region(Some("a"), MIB).await.unwrap().size, MIB);
    assert_eq!(
        code(c.create_region(Some("a"), 2 * MIB).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.create_region(Some("../x"), MIB).await),
        Code::InvalidArgument
    );

    // Grow keeps the data and reads zeros past the old end.
    let data = random_bytes(1, MIB);
    let b = c.backend("a").await.unwrap();
    b.write_at(0, &data).await.unwrap();
    assert_eq!(c.resize_region("a", 3 * MIB).await.unwrap().size, 3 * MIB);
    let b = c.backend("a").await.unwrap();
    assert_eq!(b.size(), 3 * MIB);
    assert_eq!(read(&b, 0, MIB).await, data);
    assert!(read(&b, MIB, 2 * MIB).await.iter().all(|&x| x == 0));
    b.write_at(2 * MIB, &data).await.unwrap();

    // Shrink to an unaligned size then grow: what was cut off is zeros.
    let cut = MIB / 2 + 1234;
    c.resize_region("a", cut).await.unwrap();
    let small = c.backend("a").await.unwrap();
    assert_eq!(read(&small, 0, cut).await, data[..cut as usize]);
    c.resize_region("a", 3 * MIB).await.unwrap();
    let b = c.backend("a").await.unwrap();
    assert_eq!(read(&b, 0, cut).await, data[..cut as usize]);
    assert!(read(&b, cut, 3 * MIB - cut).await.iter().all(|&x| x == 0));

    // Delete: gone from the list, and calls on it are NotFound.
    c.delete_region("a").await.unwrap();
    assert_eq!(code(c.get_region("a").await), Code::NotFound);
    assert_eq!(code(c.delete_region("a").await), Code::NotFound);
    let err = b.read_at(0, &mut [0u8; 16]).await.unwrap_err();
    assert!(
        err.to_string().contains("NotFound") || err.to_string().contains("not found"),
        "{err}"
    );
    let ids: Vec<_> = c
        .list_regions()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec![gen.id.clone()]);
    // Re-created, it starts from zeros again.
    c.create_region(Some("a"), 3 * MIB).await.unwrap();
    let b = c.backend("a").await.unwrap();
    assert!(read(&b, 0, 3 * MIB).await.iter().all(|&x| x == 0));
}

/// Random writes, trims, zeroing and reads against an in-memory model, from
/// several tasks at once over the one channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_remote_backend() {
    let dir = tmp();
    // A small request limit, so the client's splitting is exercised too.
    let srv = Server::start(
        &dir_store(dir.path()),
        &["--chunk-size", "64KiB", "--max-request", "256KiB"],
    );
    let c = srv.client().await;
    assert_eq!(c.limits().max_request, 256 << 10);
    // Not a multiple of the chunk size: the last chunk is partial.
    let size = 8 * MIB + 4321;
    c.create_region(Some("conf"), size).await.unwrap();
    let b = Arc::new(c.backend("conf").await.unwrap());
    assert_eq!(b.size(), size);
    assert!(b.flush_is_global());

    const TASKS: u64 = 4;
    let span = size / TASKS;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let b = b.clone();
        let base = t * span;
        let len = if t == TASKS - 1 { size - base } else { span };
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(100 + t);
            let mut model = vec![0u8; len as usize];
            for _ in 0..150 {
                let off = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - off).min(700 << 10));
                match rng.gen_range(0..10) {
                    0..=4 => {
                        let mut d = vec![0u8; n as usize];
                        rng.fill_bytes(&mut d);
                        b.write_at(base + off, &d).await.unwrap();
                        model[off as usize..(off + n) as usize].copy_from_slice(&d);
                    }
                    5 => {
                        b.trim(base + off, n).await.unwrap();
                        model[off as usize..(off + n) as usize].fill(0);
                    }
                    6 => {
                        b.write_zeroes(base + off, n).await.unwrap();
                        model[off as usize..(off + n) as usize].fill(0);
                    }
                    7 => b.flush().await.unwrap(),
                    _ => {
                        let got = read(&*b, base + off, n).await;
                        assert!(
                            got == model[off as usize..(off + n) as usize],
                            "task {t}: read {off}+{n} differs from the model"
                        );
                    }
                }
            }
            let got = read(&*b, base, len).await;
            assert!(got == model, "task {t}: final contents differ");
            model
        }));
    }
    let mut whole = Vec::new();
    for t in tasks {
        whole.extend(t.await.unwrap());
    }
    b.flush().await.unwrap();
    // One big read across every task's part, and the unaligned tail.
    assert!(read(&*b, 0, size).await == whole, "whole region differs");
    assert_eq!(read(&*b, size - 7, 7).await, whole[(size - 7) as usize..]);

    // Out of range: refused, nothing written.
    for (off, n) in [(size - 10, 11), (size, 1), (u64::MAX - 2, 4)] {
        let err = b.write_at(off, &vec![1u8; n as usize]).await.unwrap_err();
        assert!(matches!(err, BackendError::OutOfRange { .. }), "{err}");
        let mut buf = vec![0u8; n as usize];
        assert!(matches!(
            b.read_at(off, &mut buf).await,
            Err(BackendError::OutOfRange { .. })
        ));
    }
    // The server refuses it too, for a client that does not check first.
    let r = c
        .grpc()
        .write(pb::WriteRequest {
            region: "conf".into(),
            offset: size - 1,
            data: vec![1, 2].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    let r = c
        .grpc()
        .trim(pb::RangeRequest {
            region: "conf".into(),
            offset: size,
            length: 1,
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::OutOfRange);
    assert_eq!(
        read(&*b, size - 10, 10).await,
        whole[(size - 10) as usize..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_streamed_reads() {
    let dir = tmp();
    let srv = Server::start(&dir_store(dir.path()), &[]);
    let c = srv.client().await;
    let max = c.limits().max_request;
    assert_eq!(max, 32 * MIB, "default maximum request");
    let size = 64 * MIB;
    c.create_region(Some("r"), size).await.unwrap();

    let too_big = pb::WriteRequest {
        region: "r".into(),
        offset: 0,
        data: vec![7u8; (max + 1) as usize].into(),
        ..Default::default()
    };
    assert_eq!(code(c.grpc().write(too_big).await), Code::InvalidArgument);
    let r = c
        .grpc()
        .read(pb::ReadRequest {
            region: "r".into(),
            offset: 0,
            length: max + 1,
        })
        .await;
    assert_eq!(code(r.map(|_| ())), Code::InvalidArgument);
    let r = c
        .grpc()
        .read(pb::ReadRequest {
            region: "r".into(),
            offset: size - 1,
            length: 2,
        })
        .await;
    assert_eq!(code(r.map(|_| ())), Code::OutOfRange);
    for region in ["nope", ""] {
        let r = c
            .grpc()
            .flush(pb::FlushRequest {
                region: region.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(r), Code::NotFound);
    }
    assert!(c.backend("nope").await.is_err());

    // A write of exactly the maximum passes; a read of it comes in pieces.
    let data = random_bytes(7, max);
    let w = pb::WriteRequest {
        region: "r".into(),
        offset: 12345,
        data: data.clone().into(),
        ..Default::default()
    };
    c.grpc().write(w).await.unwrap();
    let mut s = c
        .grpc()
        .read(pb::ReadRequest {
            region: "r".into(),
            offset: 12345,
            length: max,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut pieces, mut got) = (0, Vec::new());
    while let Some(p) = s.message().await.unwrap() {
        assert_eq!(p.offset, 12345 + got.len() as u64);
        assert!(p.data.len() as u64 <= c.limits().read_piece);
        pieces += 1;
        got.extend_from_slice(&p.data);
    }
    assert!(pieces >= 32, "{pieces} pieces for {max} bytes");
    assert!(got == data, "streamed read differs");

    // Through the backend, a read over the maximum is split into calls.
    let b = c.backend("r").await.unwrap();
    let all = read(&b, 0, size).await;
    assert!(all[12345..12345 + max as usize] == data[..]);
    assert!(all[..12345].iter().all(|&x| x == 0));

    // A store the server cannot open, or an exposed address without
    // authentication: the server refuses to start.
    let out = Command::new(r3map_bin())
        .args(["backend", "--listen", "0.0.0.0:1", "--store", "memory:"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication"), "{err}");
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth() {
    let dir = tmp();
    let good = write_token(dir.path(), "good", TOKEN);
    let bad = write_token(dir.path(), "bad", "s3cr3t-t0ken-0123456780");
    let srv = Server::start("memory:", &["--token-file", good.to_str().unwrap()]);

    let none = Client::connect(&srv.opts()).await.err().expect("no token");
    assert_eq!(none.code(), Some(Code::Unauthenticated), "{none}");
    let mut o = srv.opts();
    o.token_file = Some(bad);
    let wrong = Client::connect(&o).await.err().expect("wrong token");
    assert_eq!(wrong.code(), Some(Code::Unauthenticated), "{wrong}");

    o.token_file = Some(good.clone());
    let c = Client::connect(&o).await.unwrap();
    c.create_region(Some("t"), MIB).await.unwrap();
    let b = c.backend("t").await.unwrap();
    b.write_at(5, b"hello").await.unwrap();
    assert_eq!(read(&b, 5, 5).await, b"hello");

    // And through the URI a mount uses.
    let uri = format!("r3map://{}/t?token-file={}", srv.addr(), good.display());
    let b = r3map::uri::open(&uri, MIB, MIB).await.unwrap();
    assert_eq!(read(&*b, 5, 5).await, b"hello");
    let uri = format!("r3map://{}/t", srv.addr());
    assert!(r3map::uri::open(&uri, MIB, MIB).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let dir = tmp();
    let d = dir.path();
    let ca = TestCa::new("r3map test CA");
    let other = TestCa::new("someone else's CA");
    let ca_pem = d.join("ca.crt");
    std::fs::write(&ca_pem, ca.cert.pem()).unwrap();
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let (scert, skey) = ca.issue(d, "server", &["localhost", "127.0.0.1"], ServerAuth);
    let (ccert, ckey) = ca.issue(d, "client", &["node-1"], ClientAuth);
    let (ocert, okey) = other.issue(d, "intruder", &["node-x"], ClientAuth);

    let srv = Server::start(
        "memory:",
        &[
            "--tls-cert",
            scert.to_str().unwrap(),
            "--tls-key",
            skey.to_str().unwrap(),
            "--client-ca",
            ca_pem.to_str().unwrap(),
        ],
    );
    let tls = |cert: Option<&PathBuf>, key: Option<&PathBuf>| ConnectOptions {
        addr: srv.addr(),
        token_file: None,
        tls: Some(ClientTls {
            ca: ca_pem.clone(),
            cert: cert.cloned(),
            key: key.cloned(),
            server_name: None,
        }),
    };
    let connect = |o: ConnectOptions| async move {
        tokio::time::timeout(Duration::from_secs(20), Client::connect(&o))
            .await
            .expect("connect timed out")
    };

    let e = connect(srv.opts()).await.err();
    assert!(e.is_some(), "plain HTTP/2 to a TLS server must fail");
    let e = connect(tls(None, None)).await.err();
    assert!(
        e.is_some(),
        "a client without a certificate must be refused"
    );
    eprintln!("no client certificate: {}", e.unwrap());
    let e = connect(tls(Some(&ocert), Some(&okey))).await.err();
    assert!(e.is_some(), "a certificate from another CA must be refused");
    eprintln!("certificate from another CA: {}", e.unwrap());

    let c = connect(tls(Some(&ccert), Some(&ckey)))
        .await
        .expect("a good certificate is accepted");
    c.create_region(Some("m"), 4 * MIB).await.unwrap();
    let b = c.backend("m").await.unwrap();
    let data = random_bytes(3, 3 * MIB);
    b.write_at(777, &data).await.unwrap();
    assert!(read(&b, 777, 3 * MIB).await == data);

    // The URI form, with the server's name given explicitly.
    let uri = format!(
        "r3map://{}/m?ca={}&cert={}&key={}&tls-name=localhost",
        srv.addr(),
        ca_pem.display(),
        ccert.display(),
        ckey.display()
    );
    let b = r3map::uri::open(&uri, 0, MIB).await.unwrap();
    assert_eq!(b.size(), 4 * MIB);
    assert!(read(&*b, 777, 3 * MIB).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_survive_restart() {
    let dir = tmp();
    let mut srv = Server::start(&dir_store(dir.path()), &["--chunk-size", "256KiB"]);
    let (a, b) = (random_bytes(11, 3 * MIB), random_bytes(12, MIB));
    {
        let c = srv.client().await;
        c.create_region(Some("one"), 5 * MIB + 17).await.unwrap();
        c.create_region(Some("two"), 2 * MIB).await.unwrap();
        c.create_region(Some("gone"), MIB).await.unwrap();
        c.delete_region("gone").await.unwrap();
        let one = c.backend("one").await.unwrap();
        one.write_at(100, &a).await.unwrap();
        let two = c.backend("two").await.unwrap();
        two.write_at(MIB, &b).await.unwrap();
        c.resize_region("two", 3 * MIB).await.unwrap();
    }
    srv.restart();
    let c = srv.client().await;
    let list: Vec<_> = c
        .list_regions()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.size))
        .collect();
    assert_eq!(
        list,
        vec![
            ("one".to_string(), 5 * MIB + 17),
            ("two".to_string(), 3 * MIB)
        ]
    );
    let one = c.backend("one").await.unwrap();
    assert!(read(&one, 100, 3 * MIB).await == a);
    let two = c.backend("two").await.unwrap();
    assert!(read(&two, MIB, MIB).await == b);
    assert!(read(&two, 2 * MIB, MIB).await.iter().all(|&x| x == 0));
}

/// memory:, redis:// and s3:// stores, including a resize (a copy for
/// memory:) and, for redis and s3, a restart of the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_redis_and_s3_stores() {
    let redis = RedisServer::start();
    let redis_store = format!("{}?prefix=rs", redis.url(3));
    let s3 = common::S3Server::start();
    let s3_store = s3.uri(common::S3_BUCKET, "store");
    for store in ["memory:", redis_store.as_str(), s3_store.as_str()] {
        let mut srv = Server::start(store, &["--chunk-size", "64KiB"]);
        let c = srv.client().await;
        c.create_region(Some("x"), MIB + 3).await.unwrap();
        let data = random_bytes(5, MIB + 3);
        let b = c.backend("x").await.unwrap();
        b.write_at(0, &data).await.unwrap();
        c.resize_region("x", 2 * MIB).await.unwrap();
        let b = c.backend("x").await.unwrap();
        assert!(read(&b, 0, MIB + 3).await == data, "{store}");
        assert!(read(&b, MIB + 3, MIB - 3).await.iter().all(|&x| x == 0));
        c.resize_region("x", 1000).await.unwrap();
        c.resize_region("x", 2 * MIB).await.unwrap();
        let b = c.backend("x").await.unwrap();
        assert!(read(&b, 0, 1000).await == data[..1000], "{store}");
        assert!(read(&b, 1000, 2 * MIB - 1000).await.iter().all(|&x| x == 0));
        if store != "memory:" {
            c.create_region(Some("y"), MIB).await.unwrap();
            c.delete_region("y").await.unwrap();
            srv.restart();
            let c = srv.client().await;
            let list = c.list_regions().await.unwrap();
            assert_eq!(list.len(), 1, "{list:?}");
            assert_eq!((list[0].id.as_str(), list[0].size), ("x", 2 * MIB));
            let b = c.backend("x").await.unwrap();
            assert!(read(&b, 0, 1000).await == data[..1000]);
        } else {
            srv.restart();
            assert!(srv.client().await.list_regions().await.unwrap().is_empty());
        }
    }
}

/// `r3map serve` on a remote region, filled and read back by nbdcopy.
#[test]
fn serve_on_remote_region_nbdcopy() {
    require("nbdcopy");
    let dir = tmp();
    let token = write_token(dir.path(), "token", TOKEN);
    let srv = Server::start(
        &dir_store(dir.path()),
        &["--token-file", token.to_str().unwrap()],
    );
    let size = 64 * MIB;
    let uri = format!("r3map://{}/vol?token-file={}", srv.addr(), token.display());
    let addr = Addr::Unix(sock(dir.path()));
    let size_arg = size.to_string();
    let mut nbd = serve(&addr, &["--backend", &uri, "--size", &size_arg]);

    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    let data = random_bytes(42, size);
    std::fs::write(&src, &data).unwrap();
    let t = Instant::now();
    run(Command::new("nbdcopy").arg(&src).arg(addr.uri()));
    let write_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    run(Command::new("nbdcopy").arg(addr.uri()).arg(&dst));
    let read_s = t.elapsed().as_secs_f64();
    let out = std::fs::read(&dst).unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "nbdcopy read back other bytes than it wrote");
    eprintln!(
        "nbdcopy 64 MiB via serve -> r3map backend (dir:, token, loopback): \
         in {:.2} s ({:.0} MiB/s), out {:.2} s ({:.0} MiB/s)",
        write_s,
        64.0 / write_s,
        read_s,
        64.0 / read_s
    );
    assert!(nbd.stop().success(), "r3map serve failed on SIGTERM");

    // The bytes are in the region, as seen by another client.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o = srv.opts();
        o.token_file = Some(token.clone());
        let c = Client::connect(&o).await.unwrap();
        assert_eq!(c.get_region("vol").await.unwrap().size, size);
        let b = c.backend("vol").await.unwrap();
        let got = read(&b, size - 3 * MIB - 5, 3 * MIB).await;
        let at = (size - 3 * MIB - 5) as usize;
        assert!(got == data[at..at + 3 * MIB as usize]);
    });
    // A region of another size is refused rather than served.
    let st = Command::new(r3map_bin())
        .args(["serve", "--backend", &uri, "--size", "1MiB", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "serving a 64 MiB region as 1 MiB must fail");
}

/// Fencing: one writer per region. A fence raises the region's epoch after
/// the writes in flight; from then on an older writer's writes, trims and
/// flushes are refused with the `fenced` kind, and the epoch survives a
/// restart of the server (dir:, redis://; memory: keeps nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_refuses_stale_writers() {
    use r3map::ErrorKind;
    let redis = RedisServer::start();
    let dir = tmp();
    let redis_store = format!("{}?prefix=fence", redis.url(4));
    let s3 = common::S3Server::start();
    let s3_store = s3.uri(common::S3_BUCKET, "fence");
    for store in [
        dir_store(dir.path()),
        "memory:".to_string(),
        redis_store,
        s3_store,
    ] {
        let mut srv = Server::start(&store, &["--chunk-size", "64KiB"]);
        let c = srv.client().await;
        let r = c.create_region(Some("f"), MIB).await.unwrap();
        assert_eq!((r.epoch, r.owner.as_str()), (0, ""), "{store}");
        // Never fenced: an unfenced writer (epoch 0) writes.
        let old = c.backend("f").await.unwrap();
        old.write_at(0, &[1; 4096]).await.unwrap();
        old.flush().await.unwrap();
        // Node a takes the region over; the unfenced writer is out.
        let a = c.backend("f").await.unwrap();
        a.fence(1, "node-a").await.unwrap();
        assert_eq!(a.epoch(), Some(1));
        a.fence(1, "node-a")
            .await
            .expect("a repeated fence is idempotent");
        let e = old.write_at(0, &[2; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Fenced, "{store}: {e}");
        assert_eq!(old.flush().await.unwrap_err().kind(), ErrorKind::Fenced);
        assert_eq!(
            old.trim(0, 4096).await.unwrap_err().kind(),
            ErrorKind::Fenced
        );
        assert_eq!(
            old.write_zeroes(0, 4096).await.unwrap_err().kind(),
            ErrorKind::Fenced
        );
        // The same epoch for another owner is refused: two writers never
        // share an epoch.
        let rival = c.backend("f").await.unwrap();
        let e = rival.fence(1, "node-b").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
        // A writer claiming an epoch nobody took is refused too.
        rival.set_epoch(9);
        let e = rival.write_at(0, &[3; 10]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        a.write_at(4096, &[4; 4096]).await.unwrap();
        a.flush().await.unwrap();
        // Node b takes over at epoch 2: a is out, and cannot go back.
        let b = c.backend("f").await.unwrap();
        b.fence(2, "node-b").await.unwrap();
        assert_eq!(
            a.write_at(0, &[5; 1]).await.unwrap_err().kind(),
            ErrorKind::Fenced
        );
        assert_eq!(
            a.fence(1, "node-a").await.unwrap_err().kind(),
            ErrorKind::Fenced
        );
        b.write_at(8192, &[6; 4096]).await.unwrap();
        b.flush().await.unwrap();
        let r = c.get_region("f").await.unwrap();
        assert_eq!((r.epoch, r.owner.as_str()), (2, "node-b"));
        // Reads are never fenced; only the holder's writes landed.
        let got = read(&a, 0, 3 * 4096).await;
        assert!(
            got[..4096].iter().all(|&x| x == 1),
            "{store}: a fenced write landed"
        );
        assert!(got[4096..8192].iter().all(|&x| x == 4));
        assert!(got[8192..].iter().all(|&x| x == 6));
        if store == "memory:" {
            continue;
        }
        srv.restart();
        let c = srv.client().await;
        let r = c.get_region("f").await.unwrap();
        assert_eq!(
            (r.epoch, r.owner.as_str()),
            (2, "node-b"),
            "{store}: epoch lost on restart"
        );
        let stale = c.backend("f").await.unwrap();
        stale.set_epoch(1);
        assert_eq!(
            stale.write_at(0, &[7; 1]).await.unwrap_err().kind(),
            ErrorKind::Fenced
        );
        stale.set_epoch(2);
        stale
            .write_at(0, &[7; 1])
            .await
            .expect("the holder writes after a restart");
    }
}
