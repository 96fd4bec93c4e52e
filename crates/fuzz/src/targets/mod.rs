//! The targets' bodies: each feeds its input to the production parser and panics only when an
//! invariant breaks (a parser that panics, or a round trip that changes what parsed).

pub mod api;
pub mod handoff;
pub mod snapshot;
pub mod vfu;
pub mod virtio;
pub mod xfer;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parse `b` as JSON `T`; if it parses, check that its own encoding parses back to the same
/// encoding (`parse(encode(x)) == x`, compared through the encoding since not every message
/// type has `PartialEq`).
pub(crate) fn json_round_trip<T: Serialize + DeserializeOwned>(b: &[u8]) -> bool {
    json_round_trip_with(b, |v: T| v)
}

/// As [`json_round_trip`], comparing `norm(x)` (to leave out a free-form field whose floats
/// the JSON library may not round-trip to the bit).
pub(crate) fn json_round_trip_with<T: Serialize + DeserializeOwned, U: Serialize>(
    b: &[u8],
    norm: impl Fn(T) -> U,
) -> bool {
    let Ok(v) = serde_json::from_slice::<T>(b) else {
        return false;
    };
    let e = serde_json::to_vec(&v).expect("a parsed message encodes");
    let again: T = serde_json::from_slice(&e).unwrap_or_else(|err| {
        panic!(
            "its own encoding does not parse back ({err}): {}",
            String::from_utf8_lossy(&e)
        )
    });
    let (a, b) = (
        serde_json::to_vec(&norm(v)).expect("encodes"),
        serde_json::to_vec(&norm(again)).expect("encodes"),
    );
    assert_eq!(
        String::from_utf8_lossy(&a),
        String::from_utf8_lossy(&b),
        "round trip changed the message"
    );
    true
}
