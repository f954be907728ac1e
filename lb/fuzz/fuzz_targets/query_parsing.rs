//! Fuzz target: `dnslb::fuzz::query_parsing` (see its doc for the invariants checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dnslb::fuzz::query_parsing(data));
