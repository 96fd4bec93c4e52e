//! libFuzzer target `virtio_guest` (see `fuzz::TARGETS`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (fuzz::target("virtio_guest").expect("known target").body)(data);
});
