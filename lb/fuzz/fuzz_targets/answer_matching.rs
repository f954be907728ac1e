//! Fuzz target: `dnslb::fuzz::answer_matching` (see its doc for the invariants checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dnslb::fuzz::answer_matching(data));
