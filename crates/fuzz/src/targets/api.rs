//! REST requests as the API server hands them to [`vmm::api::route`]: a method, the request
//! target, and the body read as UTF-8 (at most 64 KiB; a body that is not UTF-8 reads as
//! empty, as `Read::read_to_string` leaves it).
//!
//! Input format: `METHOD SP TARGET LF BODY` (the request line's shape).

use vmm::api::route;
use vmm::controller::Command;

/// One request.
pub fn request(data: &[u8]) -> bool {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let (method, url) = line.split_once(' ').unwrap_or((line, "/"));
    let Ok(method) = method.parse::<tiny_http::Method>() else {
        return false;
    };
    let body = std::str::from_utf8(&body[..body.len().min(1 << 16)]).unwrap_or("");
    match route(&method, url, body) {
        Ok(cmd) => {
            if let Command::Migrate(r) = &cmd {
                let e = serde_json::to_vec(r).expect("a request encodes");
                let again: vmm::migration::MigrateRequest =
                    serde_json::from_slice(&e).expect("its own encoding parses");
                assert_eq!(&again, r, "round trip");
            }
            true
        }
        Err((code, v)) => {
            assert!((400..600).contains(&code), "an error status: {code}");
            assert!(
                v.get("error").and_then(|e| e.as_str()).is_some(),
                "says why"
            );
            false
        }
    }
}
