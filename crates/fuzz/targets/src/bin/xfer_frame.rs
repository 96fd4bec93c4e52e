//! libFuzzer target `xfer_frame` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("xfer_frame").expect("known target").body)(data);
});
