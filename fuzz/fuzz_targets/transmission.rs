//! A request stream served straight to `transmission::serve`; the first
//! byte picks structured replies and a read-only export. See
//! `r3map_fuzz::fuzz_transmission` for the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    r3map_fuzz::fuzz_transmission(data);
});
