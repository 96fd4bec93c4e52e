//! The vfio-user wire format (QEMU `docs/interop/vfio-user.rst`, protocol version 0.1).
//!
//! Every message is a 16-byte [`Header`] followed by a command-specific payload; file
//! descriptors travel as `SCM_RIGHTS` ancillary data with the message's first bytes. All
//! integers are in host byte order (the protocol is local to one host). The decoders here are
//! pure functions over bytes: they never allocate more than the message's declared size, which
//! is checked against the negotiated maximum first, and they are fuzzed
//! (`tests/fuzz.rs`, proptest).
//!
//! Files: `header` (framing, command numbers, errors), `msg` (per-command payloads, flags,
//! migration states, region capabilities), `caps` (the `VERSION` JSON), `request` (decoding a
//! client's command); everything is re-exported here.

mod caps;
mod header;
mod msg;
mod request;

pub use caps::*;
pub use header::*;
pub use msg::*;
pub use request::*;
