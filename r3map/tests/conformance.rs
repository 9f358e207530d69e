//! One conformance suite that every backend passes, each opened the way users
//! open it (`r3map::uri::open(uri, size, chunk)`): seeded random
//! operations checked byte for byte against an in-memory model, zeros for
//! never-written and trimmed ranges (into garbage-filled buffers),
//! out-of-range rejection, concurrent partial writes into shared chunks, and
//! persistence. Backend-specific checks follow (dir's chunk files and small
//! open-file cache, file's size refusal and hole punching, memory's freeing).
//!
//! Every check returns `Err(description)` instead of panicking, so the
//! `faults_are_caught` test can prove each one fails on a backend with the
//! defect it looks for.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use r3map::backend::{self, check_range, chunk_spans, Backend, Error};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

type Check = Result<(), String>;

/// Not a multiple of any chunk size used here: the last chunk is partial.
const SIZE: u64 = (1 << 20) + 1234;
/// Random operations per backend and chunk size.
const OPS: usize = 2500;
/// Concurrent writers in the concurrency check.
const TASKS: u64 = 16;

/// Tells where `actual` and `expected` first differ.
fn compare(what: &str, offset: u64, actual: &[u8], expected: &[u8]) -> Check {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: {} bytes read, {} expected",
            actual.len(),
            expected.len()
        ));
    }
    match actual.iter().zip(expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: byte {} is {:#04x}, the model says {:#04x} (range {offset}+{})",
            offset + i as u64,
            actual[i],
            expected[i],
            actual.len()
        )),
    }
}

/// Reads into a buffer full of garbage (0xAA), so a backend that leaves
/// bytes untouched instead of zeroing them is caught.
async fn read<B: Backend + ?Sized>(b: &B, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0xAA; len];
    b.read_at(offset, &mut buf)
        .await
        .map_err(|e| format!("read {offset}+{len}: {e}"))?;
    Ok(buf)
}

/// Reads through `read_pieces` (what a managed mount fetches with), which
/// must tile the range in order.
async fn read_pieces<B: Backend + ?Sized>(b: &B, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let pieces = b
        .read_pieces(offset, len)
        .await
        .map_err(|e| format!("read_pieces {offset}+{len}: {e}"))?;
    Ok(pieces.concat())
}

/// Reads the whole region and compares it with the model.
async fn verify_all<B: Backend + ?Sized>(b: &B, model: &[u8], what: &str) -> Check {
    let got = read(b, 0, model.len()).await?;
    compare(what, 0, &got, model)
}

fn io(op: &str, offset: u64, len: u64) -> impl FnOnce(Error) -> String + '_ {
    move |e| format!("{op} {offset}+{len}: {e}")
}

/// A random range: often tiny or empty, often across several chunks, often
/// ending at the region's end (the last, partial chunk), sometimes aligned.
fn pick_range(rng: &mut SmallRng, size: u64, chunk: u64) -> (u64, u64) {
    let len = match rng.gen_range(0..100) {
        0..=4 => 0,
        5..=34 => rng.gen_range(1..=64),
        35..=64 => rng.gen_range(1..=chunk),
        65..=89 => rng.gen_range(chunk..=4 * chunk),
        _ => rng.gen_range(1..=256 << 10),
    }
    .min(size);
    let offset = match rng.gen_range(0..10) {
        0 => size - len,
        1 => rng.gen_range(0..=size - len) / chunk * chunk,
        _ => rng.gen_range(0..=size - len),
    };
    (offset, len)
}

/// A run of whole chunks, the last one possibly the partial one at the end.
fn pick_chunks(rng: &mut SmallRng, size: u64, chunk: u64) -> (u64, u64) {
    let n = size.div_ceil(chunk);
    let first = rng.gen_range(0..n);
    let count = rng.gen_range(1..=4.min(n - first));
    let end = ((first + count) * chunk).min(size);
    (first * chunk, end - first * chunk)
}

/// A never-written region reads as zeros, whole and chunk by chunk, and a
/// short write leaves the rest of its chunk and the next chunk zero.
async fn fresh_reads_zeros<B: Backend + ?Sized>(b: &B, chunk: u64, model: &mut [u8]) -> Check {
    let size = b.size();
    verify_all(b, model, "fresh region").await?;
    let last = (size - 1) / chunk;
    for idx in [0, 1, last] {
        let off = idx * chunk;
        let len = chunk.min(size - off);
        let got = read(b, off, len as usize).await?;
        compare(
            "fresh chunk",
            off,
            &got,
            &model[off as usize..(off + len) as usize],
        )?;
    }
    // One byte in a chunk: the key/file/slot exists but is short.
    let (idx, off) = (1, chunk + 7);
    b.write_at(off, &[0x42])
        .await
        .map_err(io("write", off, 1))?;
    model[off as usize] = 0x42;
    let start = idx * chunk;
    let got = read(b, start, (2 * chunk) as usize).await?;
    compare(
        "short chunk and its neighbour",
        start,
        &got,
        &model[start as usize..(start + 2 * chunk) as usize],
    )
}

/// Seeded random reads, writes, flushes, trims and write_zeroes, each
/// mirrored in `model`; every read is compared byte for byte.
async fn random_ops<B: Backend + ?Sized>(
    b: &B,
    chunk: u64,
    seed: u64,
    ops: usize,
    model: &mut [u8],
) -> Check {
    let size = b.size();
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..ops {
        let what = |op: &str| format!("op {i} ({op}, seed {seed})");
        match rng.gen_range(0..100) {
            0..=34 => {
                let (off, len) = pick_range(&mut rng, size, chunk);
                let got = if rng.gen_bool(0.3) {
                    read_pieces(b, off, len).await?
                } else {
                    read(b, off, len as usize).await?
                };
                compare(
                    &what("read"),
                    off,
                    &got,
                    &model[off as usize..(off + len) as usize],
                )?;
            }
            35..=69 => {
                let (off, len) = pick_range(&mut rng, size, chunk);
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                b.write_at(off, &data)
                    .await
                    .map_err(io("write", off, len))?;
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            70..=72 => b
                .flush()
                .await
                .map_err(|e| format!("{}: {e}", what("flush")))?,
            73..=88 => {
                let (off, len) = if rng.gen_bool(0.5) {
                    pick_chunks(&mut rng, size, chunk)
                } else {
                    pick_range(&mut rng, size, chunk)
                };
                b.trim(off, len).await.map_err(io("trim", off, len))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let (off, len) = if rng.gen_bool(0.3) {
                    pick_chunks(&mut rng, size, chunk)
                } else {
                    pick_range(&mut rng, size, chunk)
                };
                b.write_zeroes(off, len)
                    .await
                    .map_err(io("write_zeroes", off, len))?;
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
        if i % 500 == 499 {
            verify_all(b, model, &what("full read")).await?;
        }
    }
    verify_all(b, model, &format!("after {ops} random ops (seed {seed})")).await
}

/// Ranges past the end, or whose end overflows u64, are refused with
/// OutOfRange by every operation, and change nothing.
async fn out_of_range<B: Backend + ?Sized>(b: &B, model: &mut [u8]) -> Check {
    let size = b.size();
    // Data at both ends, so a partly applied write or trim shows.
    for off in [0, size - (64 << 10)] {
        let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251 + 1) as u8).collect();
        b.write_at(off, &data)
            .await
            .map_err(io("write", off, 64 << 10))?;
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    let cases: [(u64, u64); 8] = [
        (size - 10, 11),
        (size, 1),
        (size + 1, 0),
        (0, size + 1),
        (size - 1, 4096),
        (u64::MAX, 1),
        (u64::MAX - 5, 10),
        (1, u64::MAX),
    ];
    let rejected = |op: &str, off: u64, len: u64, r: backend::Result<()>| match r {
        Err(Error::OutOfRange { .. }) => Ok(()),
        Err(e) => Err(format!("{op} {off}+{len}: expected OutOfRange, got {e:?}")),
        Ok(()) => Err(format!("{op} {off}+{len}: accepted, expected OutOfRange")),
    };
    for (off, len) in cases {
        // Buffers of these lengths would not fit in memory; the
        // overflowing cases with small buffers cover read and write.
        if len <= 1 << 24 {
            let mut buf = vec![0xAA; len as usize];
            rejected("read", off, len, b.read_at(off, &mut buf).await)?;
            let data = vec![0x77; len as usize];
            rejected("write", off, len, b.write_at(off, &data).await)?;
        }
        rejected("trim", off, len, b.trim(off, len).await)?;
        rejected("write_zeroes", off, len, b.write_zeroes(off, len).await)?;
    }
    verify_all(b, model, "after refused out-of-range operations").await
}

/// Writes `len` bytes at `off` in `model` the way task `task` does in round
/// `round`: a pattern that differs per task, round and position.
fn pattern(task: u64, round: u64, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|p| (p.wrapping_mul(31) ^ (task * 73 + round * 151 + 1)) as u8 | 1)
        .collect()
}

/// Many tasks write (and zero) disjoint ranges that share chunks, then the
/// whole region is checked: a read-modify-write race loses someone's bytes.
async fn concurrency<B: Backend + ?Sized>(b: Arc<B>, chunk: u64, seed: u64) -> Check {
    let size = b.size();
    b.trim(0, size).await.map_err(io("trim", 0, size))?;
    // Stripes: mostly a fraction of a chunk, some straddling a boundary.
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut stripes: Vec<Vec<(u64, u64)>> = vec![Vec::new(); TASKS as usize];
    let mut pos = 0;
    let mut i = 0;
    while pos < size {
        let len = if rng.gen_bool(0.8) {
            rng.gen_range(1..=(chunk / 4).min(2048))
        } else {
            rng.gen_range(chunk / 2..=chunk + chunk / 2)
        }
        .min(size - pos);
        stripes[i % TASKS as usize].push((pos, len));
        pos += len;
        i += 1;
    }
    const ROUNDS: u64 = 3;
    let mut handles = Vec::new();
    for (task, mine) in stripes.iter().cloned().enumerate() {
        let b = b.clone();
        let task = task as u64;
        handles.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed ^ ((task + 1) * 0x9e37_79b9));
            let mut expect = Vec::with_capacity(mine.len());
            for round in 0..ROUNDS {
                expect.clear();
                for &(off, len) in &mine {
                    // The last round only writes, so every stripe ends up
                    // with data that a lost update would visibly undo.
                    let zero = round + 1 < ROUNDS && rng.gen_bool(0.2);
                    if zero {
                        if rng.gen_bool(0.5) {
                            b.trim(off, len).await.map_err(io("trim", off, len))?;
                        } else {
                            b.write_zeroes(off, len)
                                .await
                                .map_err(io("write_zeroes", off, len))?;
                        }
                        expect.push(vec![0; len as usize]);
                    } else {
                        let data = pattern(task, round, off, len);
                        b.write_at(off, &data)
                            .await
                            .map_err(io("write", off, len))?;
                        expect.push(data);
                    }
                }
                for (&(off, len), want) in mine.iter().zip(&expect) {
                    let got = read(&*b, off, len as usize).await?;
                    compare(&format!("task {task} round {round}"), off, &got, want)?;
                }
            }
            Ok::<_, String>(mine.into_iter().zip(expect).collect::<Vec<_>>())
        }));
    }
    let mut model = vec![0u8; size as usize];
    for h in handles {
        for ((off, len), data) in h.await.map_err(|e| format!("task panicked: {e}"))?? {
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
    verify_all(&*b, &model, "after concurrent writers").await
}

/// The whole suite, run against one backend (size [`SIZE`]).
async fn conformance<B: Backend + ?Sized>(b: Arc<B>, chunk: u64, seed: u64) -> Check {
    if b.size() != SIZE {
        return Err(format!("size() is {}, opened with {SIZE}", b.size()));
    }
    let mut model = vec![0u8; SIZE as usize];
    fresh_reads_zeros(&*b, chunk, &mut model).await?;
    random_ops(&*b, chunk, seed, OPS, &mut model).await?;
    out_of_range(&*b, &mut model).await?;
    concurrency(b.clone(), chunk, seed).await?;
    b.trim(0, SIZE).await.map_err(io("trim", 0, SIZE))?;
    verify_all(&*b, &vec![0; SIZE as usize], "after trimming everything").await
}

/// Writes seeded random data, flushes, and returns the model, for the
/// persistence checks.
async fn fill_and_flush<B: Backend + ?Sized>(b: &B, chunk: u64, seed: u64) -> Vec<u8> {
    let mut model = vec![0u8; b.size() as usize];
    random_ops(b, chunk, seed, 300, &mut model).await.unwrap();
    b.flush().await.unwrap();
    model
}

fn must(r: Check) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

const CHUNKS: [u64; 2] = [4096, 64 << 10];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_conforms() {
    for (i, chunk) in CHUNKS.into_iter().enumerate() {
        let b = r3map::uri::open("memory:", SIZE, chunk).await.unwrap();
        must(conformance(b, chunk, 0x3e30 + i as u64).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_conforms_and_persists() {
    for (i, chunk) in CHUNKS.into_iter().enumerate() {
        let dir = common::tmp();
        let uri = format!("file:{}", dir.path().join("disk.img").display());
        let b = r3map::uri::open(&uri, SIZE, chunk).await.unwrap();
        must(conformance(b, chunk, 0xf11e + i as u64).await);

        let b = r3map::uri::open(&uri, SIZE, chunk).await.unwrap();
        let model = fill_and_flush(&*b, chunk, 0xf11f + i as u64).await;
        drop(b);
        let b = r3map::uri::open(&uri, SIZE, chunk).await.unwrap();
        must(verify_all(&*b, &model, "file reopened after flush").await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_conforms_and_persists() {
    for (i, chunk) in CHUNKS.into_iter().enumerate() {
        let dir = common::tmp();
        let uri = format!("dir:{}", dir.path().join("chunks").display());
        let b = r3map::uri::open(&uri, SIZE, chunk).await.unwrap();
        must(conformance(b, chunk, 0xd1 + i as u64).await);
        assert_eq!(
            chunk_files(&dir.path().join("chunks")),
            BTreeSet::new(),
            "trimming everything leaves chunk files behind"
        );

        let b = r3map::uri::open(&uri, SIZE, chunk).await.unwrap();
        let model = fill_and_flush(&*b, chunk, 0xd2 + i as u64).await;
        drop(b);
        let b = r3map::uri::open(&uri, SIZE, chunk).await.unwrap();
        must(verify_all(&*b, &model, "dir reopened after flush").await);
    }
}

/// Chunk indices of the files in a dir: backend's directory.
fn chunk_files(root: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != backend::dir::CHUNK_SIZE_FILE)
        .map(|name| {
            let hex = name
                .strip_suffix(".chunk")
                .unwrap_or_else(|| panic!("unexpected file {name} in the chunk dir"));
            u64::from_str_radix(hex, 16).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_with_tiny_open_file_cache() {
    const CHUNK: u64 = 4096;
    let dir = common::tmp();
    let root = dir.path().join("chunks");
    // 4 open files for 257 chunks: nearly every access reopens a file.
    let b = Arc::new(backend::dir::Dir::open(&root, SIZE, CHUNK, 4).unwrap());
    must(conformance(b.clone(), CHUNK, 0xd4).await);
    let model = fill_and_flush(&*b, CHUNK, 0xd5).await;
    drop(b);
    let b = backend::dir::Dir::open(&root, SIZE, CHUNK, 4).unwrap();
    must(verify_all(&b, &model, "dir (4 open files) reopened").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_trim_of_whole_chunks_removes_files() {
    const CHUNK: u64 = 4096;
    let dir = common::tmp();
    let root = dir.path().join("chunks");
    let b = backend::dir::Dir::open(&root, SIZE, CHUNK, 4).unwrap();
    let last = SIZE / CHUNK; // the partial one
    for idx in [0, 1, 2, 3, 7, last] {
        b.write_at(idx * CHUNK + 5, b"data").await.unwrap();
    }
    let files = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
    assert_eq!(chunk_files(&root), files(&[0, 1, 2, 3, 7, last]));
    // Partial chunk: the file stays (with a hole); whole chunk: it goes.
    b.trim(7 * CHUNK, CHUNK - 1).await.unwrap();
    assert_eq!(chunk_files(&root), files(&[0, 1, 2, 3, 7, last]));
    b.trim(7 * CHUNK, CHUNK).await.unwrap();
    assert_eq!(chunk_files(&root), files(&[0, 1, 2, 3, last]));
    // A span over chunks 0..=3, cutting into 0 and 3: only 1 and 2 are whole.
    b.trim(CHUNK / 2, 3 * CHUNK).await.unwrap();
    assert_eq!(chunk_files(&root), files(&[0, 3, last]));
    // The last chunk is whole at its 1234 bytes; write_zeroes discards too.
    b.write_zeroes(last * CHUNK, SIZE - last * CHUNK)
        .await
        .unwrap();
    assert_eq!(chunk_files(&root), files(&[0, 3]));
    let mut model = vec![0u8; SIZE as usize];
    model[5..9].copy_from_slice(b"data");
    must(verify_all(&b, &model, "after whole-chunk trims").await);
    b.flush().await.unwrap();
}

/// Reading chunk files at the wrong chunk size would scramble the region.
#[tokio::test]
async fn dir_refuses_another_chunk_size() {
    let dir = common::tmp();
    let uri = format!("dir:{}", dir.path().display());
    let b = r3map::uri::open(&uri, SIZE, 4096).await.unwrap();
    b.write_at(5000, b"kept").await.unwrap();
    b.flush().await.unwrap();
    drop(b);
    match r3map::uri::open(&uri, SIZE, 8192).await {
        Err(Error::FailedPrecondition(msg)) => assert!(msg.contains("4096"), "{msg}"),
        Err(e) => panic!("expected a FailedPrecondition error, got {e:?}"),
        Ok(_) => panic!("reopened 4096-byte chunks as 8192-byte ones"),
    }
    let b = r3map::uri::open(&uri, SIZE, 4096).await.unwrap();
    assert_eq!(read(&*b, 5000, 4).await.unwrap(), b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_refuses_a_larger_existing_file() {
    let dir = common::tmp();
    let path = dir.path().join("disk.img");
    let content: Vec<u8> = (0..2 * SIZE).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &content).unwrap();
    let uri = format!("file:{}", path.display());
    match r3map::uri::open(&uri, SIZE, 4096).await {
        Err(Error::FailedPrecondition(msg)) => assert!(msg.contains("refusing"), "{msg}"),
        Err(e) => panic!("expected a FailedPrecondition error, got {e:?}"),
        Ok(_) => panic!("opened a {}-byte file as {SIZE} bytes", 2 * SIZE),
    }
    assert!(
        std::fs::read(&path).unwrap() == content,
        "the refused file was changed"
    );
    // A smaller file is extended and keeps its bytes.
    std::fs::write(&path, &content[..1000]).unwrap();
    let b = r3map::uri::open(&uri, SIZE, 4096).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    let mut model = vec![0u8; SIZE as usize];
    model[..1000].copy_from_slice(&content[..1000]);
    must(verify_all(&*b, &model, "extended file").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_trim_punches_holes() {
    use std::os::unix::fs::MetadataExt;
    const MIB: u64 = 1 << 20;
    let dir = common::tmp();
    let path = dir.path().join("disk.img");
    let b = r3map::uri::open(&format!("file:{}", path.display()), SIZE, 4096)
        .await
        .unwrap();
    b.write_at(0, &vec![0x5A; MIB as usize]).await.unwrap();
    b.flush().await.unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    // st_blocks counts 512-byte units.
    assert!(before >= MIB / 512, "1 MiB written but {before} blocks");
    b.trim(0, MIB).await.unwrap();
    b.flush().await.unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(
        after + MIB / 512 <= before,
        "trim of 1 MiB freed only {} blocks ({before} -> {after})",
        before.saturating_sub(after)
    );
    must(verify_all(&*b, &vec![0; SIZE as usize], "after punching").await);
}

#[tokio::test]
async fn memory_trim_of_whole_chunks_frees_memory() {
    const CHUNK: u64 = 4096;
    let m = backend::memory::Memory::new(SIZE, CHUNK);
    assert_eq!(m.allocated(), 0);
    m.write_at(0, &vec![1; SIZE as usize]).await.unwrap();
    assert_eq!(m.allocated(), SIZE);
    m.trim(10, CHUNK).await.unwrap(); // touches chunks 0 and 1, covers neither
    assert_eq!(m.allocated(), SIZE);
    m.trim(CHUNK, 9 * CHUNK).await.unwrap();
    assert_eq!(m.allocated(), SIZE - 9 * CHUNK);
    m.write_zeroes(SIZE / CHUNK * CHUNK, SIZE % CHUNK)
        .await
        .unwrap();
    assert_eq!(m.allocated(), SIZE - 9 * CHUNK - SIZE % CHUNK);
    m.trim(0, SIZE).await.unwrap();
    assert_eq!(m.allocated(), 0);
    must(verify_all(&m, &vec![0; SIZE as usize], "memory after trims").await);
}

#[tokio::test]
async fn memory_pieces_keep_their_bytes_across_writes() {
    // read_pieces lends slices of the chunks; a write while one is out
    // must not change what the reader holds (it writes a copy), and a
    // write once none is out changes the chunk in place.
    const CHUNK: u64 = 4096;
    let m = backend::memory::Memory::new(SIZE, CHUNK);
    m.write_at(0, &[1; 3 * CHUNK as usize]).await.unwrap();
    let held = m.read_pieces(100, 2 * CHUNK).await.unwrap();
    assert_eq!(held.len(), 3, "one piece per chunk touched");
    m.write_at(0, &[2; 3 * CHUNK as usize]).await.unwrap();
    assert!(held.concat() == vec![1; 2 * CHUNK as usize]);
    drop(held);
    m.write_at(50, &[3; 10]).await.unwrap();
    let now = read(&m, 0, 3 * CHUNK as usize).await.unwrap();
    let mut want = vec![2u8; 3 * CHUNK as usize];
    want[50..60].fill(3);
    must(compare("after writes", 0, &now, &want));
    // Never-written chunks come as zeros, as many as asked for.
    let z = m.read_pieces(SIZE - 3 * CHUNK, 3 * CHUNK).await.unwrap();
    assert!(z.concat() == vec![0; 3 * CHUNK as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_conforms_and_shares_by_prefix() {
    let server = common::RedisServer::start();
    for (i, chunk) in CHUNKS.into_iter().enumerate() {
        let uri = |prefix: &str| format!("{}?prefix={prefix}-{chunk}", server.url(0));
        let b = r3map::uri::open(&uri("conf"), SIZE, chunk).await.unwrap();
        must(conformance(b, chunk, 0x7ed1 + i as u64).await);

        let b = r3map::uri::open(&uri("vol"), SIZE, chunk).await.unwrap();
        let model = fill_and_flush(&*b, chunk, 0x7ed2 + i as u64).await;
        let same = r3map::uri::open(&uri("vol"), SIZE, chunk).await.unwrap();
        must(verify_all(&*same, &model, "second backend on the same prefix").await);
        let zeros = vec![0; SIZE as usize];
        let other = r3map::uri::open(&uri("other"), SIZE, chunk).await.unwrap();
        must(verify_all(&*other, &zeros, "backend on another prefix").await);
        let other_db = format!("{}?prefix=vol-{chunk}", server.url(1));
        let other_db = r3map::uri::open(&other_db, SIZE, chunk).await.unwrap();
        must(verify_all(&*other_db, &zeros, "same prefix in another db").await);
        if i == 0 {
            // The default prefix is its own namespace too.
            let default = r3map::uri::open(&server.url(0), SIZE, chunk).await.unwrap();
            must(verify_all(&*default, &zeros, "default prefix").await);
        }
    }
    // Same prefix, other chunk size: refused (it would scramble the data).
    match r3map::uri::open(&format!("{}?prefix=vol-4096", server.url(0)), SIZE, 8192).await {
        Err(Error::FailedPrecondition(msg)) => assert!(msg.contains("4096"), "{msg}"),
        Err(e) => panic!("expected a FailedPrecondition error, got {e:?}"),
        Ok(_) => panic!("reopened 4096-byte chunks as 8192-byte ones"),
    }
}

/// The whole suite against a real S3 server (s3s-fs), persistence across
/// backend values, the chunk-size record, and the errors a user meets: a
/// bad credential, a missing bucket, a server that went away — each clear,
/// and nothing flushed lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_conforms_and_persists() {
    let mut server = common::S3Server::start();
    let bucket = common::S3_BUCKET;
    // One object per chunk and one request each: 4 KiB chunks would make
    // the suite thousands of HTTP requests; 64 KiB covers the same paths.
    for (i, chunk) in [64 << 10].into_iter().enumerate() {
        let uri = |prefix: &str| server.uri(bucket, &format!("{prefix}-{chunk}"));
        let b = r3map::uri::open(&uri("conf"), SIZE, chunk).await.unwrap();
        must(conformance(b, chunk, 0x53 + i as u64).await);
        let b = r3map::uri::open(&uri("vol"), SIZE, chunk).await.unwrap();
        let model = fill_and_flush(&*b, chunk, 0x54 + i as u64).await;
        let same = r3map::uri::open(&uri("vol"), SIZE, chunk).await.unwrap();
        must(verify_all(&*same, &model, "second backend on the same prefix").await);
        let other = r3map::uri::open(&uri("other"), SIZE, chunk).await.unwrap();
        must(verify_all(&*other, &vec![0; SIZE as usize], "another prefix").await);
    }
    match r3map::uri::open(&server.uri(bucket, "vol-65536"), SIZE, 8192).await {
        Err(Error::FailedPrecondition(msg)) => assert!(msg.contains("65536"), "{msg}"),
        Err(e) => panic!("expected a FailedPrecondition error, got {e:?}"),
        Ok(_) => panic!("reopened 4096-byte chunks as 8192-byte ones"),
    }
    // A bad credential: refused at open, saying so.
    let bad = server.dir.path().join("bad-creds");
    std::fs::write(
        &bad,
        "access_key_id = r3mapaccess\nsecret_access_key = wrong-secret-000\n",
    )
    .unwrap();
    let uri = format!(
        "s3://{bucket}/x?endpoint=http://127.0.0.1:{}&credentials-file={}",
        server.port,
        bad.display()
    );
    let e = r3map::uri::open(&uri, SIZE, 4096)
        .await
        .err()
        .expect("bad secret accepted");
    assert_eq!(e.kind(), r3map::ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("credentials"), "{e}");
    // A missing bucket.
    let e = r3map::uri::open(&server.uri("no-such-bucket", "x"), SIZE, 4096)
        .await
        .err()
        .expect("a missing bucket opened");
    assert_eq!(e.kind(), r3map::ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
    // The server goes away: a clear, retryable error, not a hang; what
    // was written and flushed before is there when it is back.
    let chunk = 4096;
    let b = r3map::uri::open(&server.uri(bucket, "gone"), SIZE, chunk)
        .await
        .unwrap();
    let model = fill_and_flush(&*b, chunk, 0x55).await;
    let port = server.port;
    server.proc.stop();
    let t = std::time::Instant::now();
    let e = b
        .write_at(0, &[1; 100])
        .await
        .expect_err("wrote to a dead server");
    assert_eq!(e.kind(), r3map::ErrorKind::Unavailable, "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    let root = server.dir.path().join("root");
    let child = std::process::Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--access-key",
            "r3mapaccess",
            "--secret-key",
            "r3mapsecretkey0123",
        ])
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    server.proc = common::Proc {
        child,
        name: "s3s-fs".into(),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s3s-fs did not restart"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let b = r3map::uri::open(&server.uri(bucket, "gone"), SIZE, chunk)
        .await
        .unwrap();
    must(verify_all(&*b, &model, "flushed data after the server came back").await);
}

// ---------------------------------------------------------------------------
// The suite can fail: a toy backend with one injected defect at a time.

#[derive(Clone, Copy, PartialEq, Debug)]
enum Defect {
    None,
    /// Leaves the caller's buffer as it was for never-written chunks.
    StaleOnMissing,
    /// Read-modify-write of whole chunks with a yield in between.
    RacyReadModifyWrite,
    /// Applies the in-range part of an out-of-range write or trim.
    PartialOutOfRange,
    /// Reports out-of-range as an I/O error.
    WrongError,
    /// Ignores trims that do not cover whole chunks.
    LazyPartialTrim,
    /// Every 100th write lands one byte further than asked.
    OffByOne,
}

struct Toy {
    size: u64,
    chunk: u64,
    chunks: Vec<Mutex<Option<Vec<u8>>>>,
    defect: Defect,
    writes: std::sync::atomic::AtomicU64,
}

impl Toy {
    fn new(size: u64, chunk: u64, defect: Defect) -> Self {
        let n = size.div_ceil(chunk) as usize;
        Toy {
            size,
            chunk,
            chunks: (0..n).map(|_| Mutex::new(None)).collect(),
            defect,
            writes: Default::default(),
        }
    }

    fn check(&self, offset: u64, len: u64) -> backend::Result<()> {
        let r = check_range(offset, len, self.size);
        if self.defect == Defect::WrongError && r.is_err() {
            return Err(Error::InvalidArgument("out of range".into()));
        }
        r
    }

    /// For PartialOutOfRange: the part of the range inside the region.
    fn clip(&self, offset: u64, len: u64) -> u64 {
        self.size.saturating_sub(offset).min(len)
    }

    fn chunk_len(&self, idx: u64) -> usize {
        (self.size - idx * self.chunk).min(self.chunk) as usize
    }
}

#[async_trait]
impl Backend for Toy {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> backend::Result<()> {
        self.check(offset, buf.len() as u64)?;
        for (idx, within, pos, n) in chunk_spans(offset, buf.len() as u64, self.chunk) {
            let out = &mut buf[pos as usize..(pos + n) as usize];
            match &*self.chunks[idx as usize].lock().unwrap() {
                Some(c) => out.copy_from_slice(&c[within as usize..(within + n) as usize]),
                None if self.defect == Defect::StaleOnMissing => {}
                None => out.fill(0),
            }
        }
        Ok(())
    }

    async fn write_at(&self, mut offset: u64, data: &[u8]) -> backend::Result<()> {
        let mut data = data;
        let r = self.check(offset, data.len() as u64);
        if r.is_err() {
            if self.defect != Defect::PartialOutOfRange || offset >= self.size {
                return r;
            }
            data = &data[..self.clip(offset, data.len() as u64) as usize];
        }
        let nth = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.defect == Defect::OffByOne
            && nth % 100 == 99
            && offset + (data.len() as u64) < self.size
        {
            offset += 1;
        }
        for (idx, within, pos, n) in chunk_spans(offset, data.len() as u64, self.chunk) {
            let src = &data[pos as usize..(pos + n) as usize];
            let range = within as usize..(within + n) as usize;
            let fresh = || vec![0u8; self.chunk_len(idx)];
            if self.defect == Defect::RacyReadModifyWrite {
                let mut copy = self.chunks[idx as usize]
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(fresh);
                tokio::task::yield_now().await;
                copy[range].copy_from_slice(src);
                *self.chunks[idx as usize].lock().unwrap() = Some(copy);
            } else {
                let mut slot = self.chunks[idx as usize].lock().unwrap();
                slot.get_or_insert_with(fresh)[range].copy_from_slice(src);
            }
        }
        r
    }

    async fn flush(&self) -> backend::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, mut len: u64) -> backend::Result<()> {
        let r = self.check(offset, len);
        if r.is_err() {
            if self.defect != Defect::PartialOutOfRange || offset >= self.size {
                return r;
            }
            len = self.clip(offset, len);
        }
        for (idx, within, _, n) in chunk_spans(offset, len, self.chunk) {
            let mut slot = self.chunks[idx as usize].lock().unwrap();
            if n as usize == self.chunk_len(idx) {
                *slot = None;
            } else if self.defect != Defect::LazyPartialTrim {
                if let Some(c) = slot.as_mut() {
                    c[within as usize..(within + n) as usize].fill(0);
                }
            }
        }
        r
    }
}

#[test]
fn compare_reports_the_first_difference() {
    let a = vec![0u8; 100];
    let mut b = a.clone();
    assert!(compare("same", 0, &a, &b).is_ok());
    b[37] = 1;
    let e = compare("x", 1000, &a, &b).unwrap_err();
    assert!(e.contains("byte 1037 is 0x00, the model says 0x01"), "{e}");
    assert!(compare("short", 0, &a, &b[..99]).is_err());
}

/// Deterministic: a current-thread runtime schedules the toy's tasks (which
/// do no I/O) in the same order every run.
#[tokio::test]
async fn faults_are_caught() {
    const CHUNK: u64 = 4096;
    must(conformance(Arc::new(Toy::new(SIZE, CHUNK, Defect::None)), CHUNK, 1).await);
    for (defect, stage) in [
        (Defect::StaleOnMissing, "fresh region"),
        (Defect::RacyReadModifyWrite, "task "),
        (Defect::PartialOutOfRange, "after refused out-of-range"),
        (Defect::WrongError, "expected OutOfRange"),
        (Defect::LazyPartialTrim, "seed 1"),
        (Defect::OffByOne, "seed 1"),
    ] {
        let toy = Arc::new(Toy::new(SIZE, CHUNK, defect));
        // Skip the stages before the one aimed at, so each defect is shown
        // to be caught by its own check.
        let mut model = vec![0u8; SIZE as usize];
        let r = match defect {
            Defect::RacyReadModifyWrite => concurrency(toy, CHUNK, 1).await,
            Defect::PartialOutOfRange | Defect::WrongError => out_of_range(&*toy, &mut model).await,
            Defect::LazyPartialTrim | Defect::OffByOne => {
                random_ops(&*toy, CHUNK, 1, OPS, &mut model).await
            }
            _ => conformance(toy, CHUNK, 1).await,
        };
        let err = r.expect_err(&format!("{defect:?} went unnoticed"));
        assert!(err.contains(stage), "{defect:?} caught, but by: {err}");
    }
}

/// A read that misses the open-file cache while a whole-chunk trim removes
/// that chunk's file must not leave the removed file in the cache: later
/// writes would go to it and vanish once it is evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_trim_racing_a_read_keeps_no_stale_file() {
    const CHUNK: u64 = 4096;
    let dir = common::tmp();
    let b = Arc::new(backend::dir::Dir::open(dir.path(), SIZE, CHUNK, 2).unwrap());
    let evict = |b: Arc<backend::dir::Dir>| async move {
        // Two other chunks push chunk 0 out of the 2-file cache.
        for idx in [10, 11] {
            b.write_at(idx * CHUNK, b"x").await.unwrap();
        }
    };
    for i in 0..3000u32 {
        let tag = i.to_le_bytes();
        b.write_at(0, b"old!").await.unwrap();
        evict(b.clone()).await;
        let (r, t) = (b.clone(), b.clone());
        let reader = tokio::spawn(async move { r.read_at(0, &mut [0u8; 4]).await });
        let trimmer = tokio::spawn(async move { t.trim(0, CHUNK).await });
        reader.await.unwrap().unwrap();
        trimmer.await.unwrap().unwrap();
        b.write_at(0, &tag).await.unwrap();
        evict(b.clone()).await;
        let got = read(&*b, 0, 4).await.unwrap();
        assert_eq!(got, tag, "iteration {i}: a write after the race was lost");
        b.trim(0, CHUNK).await.unwrap();
    }
}
