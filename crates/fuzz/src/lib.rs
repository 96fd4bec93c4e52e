//! Coverage-guided fuzzing of every parser of untrusted bytes in faultline.
//!
//! Engine: LLVM's libFuzzer through the `libfuzzer-sys` crate, built with the **stable**
//! toolchain and the same coverage flags `cargo fuzz build -s none` passes (SanitizerCoverage
//! as an LLVM pass, inline 8-bit counters, PC table, compare tracing, `--cfg fuzzing`), no
//! nightly, no `-Z` flag and no `cargo-fuzz` binary (see [`run`]).
//!
//! The targets' bodies live here, in [`targets`], as plain functions of `&[u8]`; the libFuzzer
//! binaries in `crates/fuzz/targets` (a cargo project of its own, excluded from the workspace)
//! are one line each around them. Each body feeds the bytes to the production parser, asserts
//! that it returns `Ok` or `Err` without panicking, and, where an encoder exists, that what
//! parses survives a round trip (`parse(encode(x)) == x`). Each returns whether the input
//! parsed, which the tests use to show that the committed seeds are accepted traffic.
//!
//! Seeds (`crates/fuzz/corpus/TARGET/`) are made from real traffic by the `fuzz-seeds` binary
//! ([`seeds`]): frames from xfer's and the migration's own send paths over a real socket, the
//! vfio-user client's messages to a server and a real server's replies, a snapshot taken of a
//! running KVM guest, a real hand-off message, real REST requests, and virtio driver sessions run through
//! the real devices.

pub mod run;
pub mod seeds;
pub mod targets;

/// A fuzz target: its name (the libFuzzer binary and the corpus directory) and its body.
pub struct Target {
    /// Name.
    pub name: &'static str,
    /// What it fuzzes.
    pub what: &'static str,
    /// The body: `true` when the input parsed.
    pub body: fn(&[u8]) -> bool,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "xfer_frame",
        what: "migration frames: xfer::wire::read_frame (header decode and bounds), then each payload's parser by kind",
        body: targets::xfer::frames,
    },
    Target {
        name: "vfu_server",
        what: "vfio-user on the server side: header decode, then parse_request for every command",
        body: targets::vfu::server,
    },
    Target {
        name: "vfu_client",
        what: "vfio-user on the client side: a real Client connecting to a socket whose replies are the input",
        body: targets::vfu::client,
    },
    Target {
        name: "snapshot_manifest",
        what: "snapshot manifest.json: vmm::snapshot::parse_manifest",
        body: targets::snapshot::manifest,
    },
    Target {
        name: "snapshot_index",
        what: "snapshot memory.idx: MemoryIndex::decode (and the working set, WorkingSet::decode)",
        body: targets::snapshot::index,
    },
    Target {
        name: "snapshot_state",
        what: "snapshot state.bin (also the migration State frame): snapshot::state::decode",
        body: targets::snapshot::state,
    },
    Target {
        name: "device_record",
        what: "a device's record in state.bin: virtio::decode (a virtio-mmio device), SerialRecord::decode (COM1) or PciRecord::decode (a vfio-user device)",
        body: targets::snapshot::device_record,
    },
    Target {
        name: "handoff",
        what: "the page-handler hand-off: msg_len, then parse_body as Handoff and HandoffReply",
        body: targets::handoff::message,
    },
    Target {
        name: "api_request",
        what: "REST requests: method, URL and body (as the API server reads them) through vmm::api::route and its body deserialization",
        body: targets::api::request,
    },
    Target {
        name: "virtio_guest",
        what: "a hostile guest driving a virtio device (blk, rng, net, vsock) through the virtio-mmio transport: registers, rings and buffers from the input",
        body: targets::virtio::guest,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
