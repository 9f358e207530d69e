//! The demo's application: a separate process that mmaps the published
//! block device MAP_SHARED, as a pod would, and writes pages whose content
//! depends on (seed, generation, page), msync'ing batch by batch; on
//! SIGTERM it finishes its batch, msyncs, and writes the generation of
//! every page to a file, which is the model a verifier checks every byte
//! against on the node the volume moved to.

use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::mman::{mmap, msync, munmap, MapFlags, MsFlags, ProtFlags};

/// Page size of the writes.
pub const PAGE: usize = 4096;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The 4 KiB a page holds at generation `gen` (0: never written, zeros).
pub fn fill(buf: &mut [u8], seed: u64, gen: u8, page: u64) {
    if gen == 0 {
        buf.fill(0);
        return;
    }
    let mut x = seed
        ^ (u64::from(gen)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ page.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for c in buf.chunks_mut(8) {
        // xorshift64*: cheap, and every page and generation differs.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// A MAP_SHARED mapping of a whole device or file.
struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
    _file: std::fs::File,
}

impl Mapping {
    fn open(path: &Path, write: bool) -> Result<Mapping, Error> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let len = device_size(&file)? as usize;
        let prot = if write {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        let n = NonZeroUsize::new(len).ok_or("the device has no size")?;
        // SAFETY: a fresh shared mapping of an open file; nothing else in
        // this process aliases it.
        let ptr = unsafe { mmap(None, n, prot, MapFlags::MAP_SHARED, file.as_fd(), 0) }
            .map_err(|e| format!("mmap {}: {e}", path.display()))?;
        Ok(Mapping {
            ptr,
            len,
            _file: file,
        })
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is len bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }

    fn sync(&self) -> Result<(), Error> {
        // SAFETY: the range is this mapping.
        unsafe { msync(self.ptr, self.len, MsFlags::MS_SYNC) }
            .map_err(|e| format!("msync: {e}"))?;
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what mmap returned.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

fn device_size(f: &std::fs::File) -> Result<u64, Error> {
    use std::os::fd::AsRawFd;
    let m = f.metadata()?;
    if m.is_file() {
        return Ok(m.len());
    }
    let mut n = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut n) }.map_err(|e| format!("BLKGETSIZE64: {e}"))?;
    Ok(n)
}

/// `app-write`: fills every page at generation 1 and msyncs (then writes
/// `ready`), then rewrites a rotating set of pages at the next generation
/// in batches of `batch`, msync after each, until SIGTERM; then msyncs and
/// writes the generation of every page to `gens`.
pub fn write(path: &Path, seed: u64, batch: usize, ready: &Path, gens: &Path) -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook_stop(&stop)?;
    let mut m = Mapping::open(path, true)?;
    let pages = m.len / PAGE;
    let mut gen = vec![1u8; pages];
    let t = Instant::now();
    {
        let s = m.slice();
        for p in 0..pages {
            fill(&mut s[p * PAGE..(p + 1) * PAGE], seed, 1, p as u64);
        }
    }
    m.sync()?;
    std::fs::write(ready, format!("{}", t.elapsed().as_millis()))?;
    // A stride coprime with the page count visits every page in turn.
    let stride = (pages / 3) | 1;
    let mut next = 0usize;
    let mut batches = 0u64;
    while !stop.load(Ordering::SeqCst) {
        {
            let s = m.slice();
            for _ in 0..batch {
                let p = next % pages;
                next = next.wrapping_add(stride);
                gen[p] = gen[p].wrapping_add(1).max(1);
                fill(&mut s[p * PAGE..(p + 1) * PAGE], seed, gen[p], p as u64);
            }
        }
        m.sync()?;
        batches += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    m.sync()?;
    let tmp = gens.with_extension("tmp");
    std::fs::write(&tmp, &gen)?;
    std::fs::rename(&tmp, gens)?;
    eprintln!("app-write: {batches} batches of {batch} pages after the first fill");
    Ok(())
}

/// `app-verify`: maps the device and checks every page against the
/// generations in `gens`; prints the time to the first page read and the
/// bytes checked. Fails at the first page that differs.
pub fn verify(path: &Path, seed: u64, gens: &Path) -> Result<(u64, Duration), Error> {
    let gen = std::fs::read(gens).map_err(|e| format!("reading {}: {e}", gens.display()))?;
    let t = Instant::now();
    let mut m = Mapping::open(path, false)?;
    let pages = m.len / PAGE;
    if pages != gen.len() {
        return Err(format!("device has {pages} pages, the model {}", gen.len()).into());
    }
    let mut want = vec![0u8; PAGE];
    let mut first = None;
    let s = m.slice();
    for p in 0..pages {
        fill(&mut want, seed, gen[p], p as u64);
        let have = &s[p * PAGE..(p + 1) * PAGE];
        first.get_or_insert_with(|| t.elapsed());
        if have != want.as_slice() {
            let at = have
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "page {p} (generation {}) differs at byte {at}: {:#04x} != {:#04x}",
                gen[p], have[at], want[at]
            )
            .into());
        }
    }
    Ok(((pages * PAGE) as u64, first.unwrap_or_default()))
}

fn signal_hook_stop(stop: &Arc<AtomicBool>) -> Result<(), Error> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = STOP.set(stop.clone());
    extern "C" fn on_term(_: nix::libc::c_int) {
        if let Some(s) = STOP.get() {
            s.store(true, Ordering::SeqCst);
        }
    }
    let act = SigAction::new(
        SigHandler::Handler(on_term),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    unsafe { sigaction(Signal::SIGTERM, &act) }.map_err(|e| format!("sigaction: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_differ_by_generation_and_page_and_zero_is_zeros() {
        let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
        fill(&mut a, 7, 1, 3);
        fill(&mut b, 7, 2, 3);
        assert_ne!(a, b);
        fill(&mut b, 7, 1, 4);
        assert_ne!(a, b);
        fill(&mut b, 7, 0, 3);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn write_then_verify_a_file_and_catch_a_flipped_byte() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("dev");
        std::fs::write(&f, vec![0u8; 64 * PAGE]).unwrap();
        let (ready, gens) = (d.path().join("ready"), d.path().join("gens"));
        let path = f.clone();
        let (r2, g2) = (ready.clone(), gens.clone());
        let h = std::thread::spawn(move || write(&path, 9, 5, &r2, &g2));
        while !ready.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        h.join().unwrap().unwrap();
        let g = std::fs::read(&gens).unwrap();
        assert!(g.iter().any(|&x| x > 1), "no page was rewritten");
        assert_eq!(verify(&f, 9, &gens).unwrap().0, 64 * PAGE as u64);
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[5 * PAGE + 17] ^= 1;
        std::fs::write(&f, bytes).unwrap();
        let e = verify(&f, 9, &gens).unwrap_err().to_string();
        assert!(e.contains("page 5"), "{e}");
    }
}
