//! Fuzz target: `dnslb::fuzz::tcp_framing` (see its doc for the invariants checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dnslb::fuzz::tcp_framing(data));
