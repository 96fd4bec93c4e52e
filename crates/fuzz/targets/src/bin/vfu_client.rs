//! libFuzzer target `vfu_client` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("vfu_client").expect("known target").body)(data);
});
