//! libFuzzer target `handoff` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("handoff").expect("known target").body)(data);
});
