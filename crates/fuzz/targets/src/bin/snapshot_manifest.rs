//! libFuzzer target `snapshot_manifest` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("snapshot_manifest")
        .expect("known target")
        .body)(data);
});
