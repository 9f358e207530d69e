//! Always-on guard for the fuzz harnesses, on stable without libFuzzer:
//! the seeds, a few hand-made edge cases, and a few thousand deterministic
//! mutations, all under a watchdog so a hang fails instead of blocking.

use std::sync::mpsc;
use std::time::Duration;

use r3map::nbd::proto::*;
use r3map_fuzz::seeds::{handshake_seeds, req, requests, transmission_seeds};
use r3map_fuzz::{check_transmission, fuzz_handshake, fuzz_transmission, MAX_REQUEST};

/// Runs `f` on its own thread; a panic fails the test, so does a hang.
fn watchdog(secs: u64, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(h.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("harness still running after {secs}s"),
    }
}

#[test]
fn seeds_pass() {
    watchdog(60, || {
        // Replies checked in transmission; None: the session never got there.
        let hs: Vec<_> = handshake_seeds()
            .iter()
            .map(|(_, s)| fuzz_handshake(s))
            .collect();
        assert_eq!(hs, [Some(10), Some(10), Some(9), None, None]);
        let tr: Vec<_> = transmission_seeds()
            .iter()
            .map(|(_, s)| fuzz_transmission(s))
            .collect();
        assert_eq!(tr, [10, 10, 10, 9, 9, 1]);
    });
}

#[test]
fn oversize_write_is_skipped_and_the_connection_goes_on() {
    watchdog(60, || {
        for mode in 0..4u8 {
            let input = [
                vec![mode],
                req(CMD_WRITE, 0, 1, 0, MAX_REQUEST + 1), // header + full payload
                req(CMD_READ, 0, 2, 0, 4096),
                req(CMD_WRITE, 0, 3, 4096, MAX_REQUEST),
                req(CMD_READ, 0, 4, 0, MAX_REQUEST),
                req(CMD_DISC, 0, 5, 0, 0),
                req(CMD_READ, 0, 6, 0, 4096), // after DISC: never read
            ]
            .concat();
            assert_eq!(fuzz_transmission(&input), 4);
        }
    });
}

#[test]
fn many_requests_exceed_the_inflight_budget() {
    // 40 reads of 64 KiB = 2.5 MiB queued against a 1 MiB budget.
    watchdog(60, || {
        let input: Vec<u8> = std::iter::once(vec![1u8])
            .chain((0..40).map(|i| req(CMD_READ, 0, i, (i % 16) * 65536, MAX_REQUEST)))
            .collect::<Vec<_>>()
            .concat();
        assert_eq!(fuzz_transmission(&input), 40);
    });
}

#[test]
fn the_checker_rejects_a_lost_or_extra_reply() {
    let input = [req(CMD_FLUSH, 0, 7, 0, 0), req(CMD_FLUSH, 0, 8, 0, 0)].concat();
    let reply = |cookie: u64| simple_reply(cookie, 0);
    let good = [reply(7), reply(8)].concat();
    assert_eq!(check_transmission(&input, false, false, &Ok(()), &good), 2);
    for bad in [
        reply(7),
        [reply(7), reply(8), reply(8)].concat(),
        [reply(7), reply(9)].concat(),
    ] {
        let r =
            std::panic::catch_unwind(|| check_transmission(&input, false, false, &Ok(()), &bad));
        assert!(r.is_err(), "accepted a wrong reply stream {bad:?}");
    }
    // A clean return for a stream cut inside a header is wrong too.
    let cut = &input[..40];
    let r = std::panic::catch_unwind(|| check_transmission(cut, false, false, &Ok(()), &reply(7)));
    assert!(r.is_err());
}

/// xorshift64*: deterministic, so a failure here reproduces exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 if !v.is_empty() => {
                let (a, b) = (rng.below(v.len()), rng.below(v.len()));
                let (a, b) = (a.min(b), a.max(b).min(a + 64));
                let piece = v[a..b].to_vec();
                let at = rng.below(v.len());
                v.splice(at..at, piece);
            }
            _ => v.extend_from_slice(&requests()[..28]),
        }
    }
    v
}

#[test]
fn deterministic_mutations() {
    watchdog(300, || {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let hs = handshake_seeds();
        let tr = transmission_seeds();
        for _ in 0..3000 {
            let (_, s) = &hs[rng.below(hs.len())];
            fuzz_handshake(&mutate(&mut rng, s.clone()));
            let (_, s) = &tr[rng.below(tr.len())];
            fuzz_transmission(&mutate(&mut rng, s.clone()));
        }
    });
}
