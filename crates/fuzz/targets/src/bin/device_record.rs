//! libFuzzer target `device_record` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("device_record").expect("known target").body)(data);
});
