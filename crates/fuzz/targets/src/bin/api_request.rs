//! libFuzzer target `api_request` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("api_request").expect("known target").body)(data);
});
