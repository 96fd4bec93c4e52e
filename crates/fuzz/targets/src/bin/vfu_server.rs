//! libFuzzer target `vfu_server` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("vfu_server").expect("known target").body)(data);
});
