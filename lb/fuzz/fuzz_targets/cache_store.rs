//! Fuzz target: `dnslb::fuzz::cache_store` (see its doc for the invariants checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dnslb::fuzz::cache_store(data));
