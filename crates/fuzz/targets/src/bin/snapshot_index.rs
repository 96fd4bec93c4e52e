//! libFuzzer target `snapshot_index` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("snapshot_index").expect("known target").body)(data);
});
