//! The page-handler hand-off: a `u32` length prefix and a JSON body, as `recv_msg` reads it
//! (the handler reads a [`Handoff`], the VMM a [`HandoffReply`]).

use vmm::restore::{Handoff, HandoffReply, msg_len, parse_body};

use super::json_round_trip;

/// A whole message: prefix, then body.
pub fn message(data: &[u8]) -> bool {
    let Some((prefix, body)) = data.split_first_chunk::<4>() else {
        return false;
    };
    let Ok(len) = msg_len(*prefix) else {
        return false;
    };
    assert!(len <= 1 << 20, "bounded before use");
    let Some(body) = body.get(..len) else {
        return false;
    };
    let h = parse_body::<Handoff>(body).is_ok();
    if h {
        assert!(json_round_trip::<Handoff>(body));
    }
    let r = parse_body::<HandoffReply>(body).is_ok();
    if r {
        assert!(json_round_trip::<HandoffReply>(body));
    }
    h || r
}
