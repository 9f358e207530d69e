//! The client side of a connection, byte for byte: option haggling, then
//! (once GO or EXPORT_NAME succeeds) requests served against a 1 MiB
//! memory export. See `r3map_fuzz::fuzz_handshake` for the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    r3map_fuzz::fuzz_handshake(data);
});
