//! libFuzzer target `snapshot_state` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("snapshot_state").expect("known target").body)(data);
});
