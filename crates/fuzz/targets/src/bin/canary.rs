//! A target that crashes on any input containing `FUZZ`: proves that the runner reports a
//! crash and its input (crates/fuzz/tests/fuzz.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.windows(4).any(|w| w == b"FUZZ") {
        panic!("the canary found FUZZ");
    }
});
