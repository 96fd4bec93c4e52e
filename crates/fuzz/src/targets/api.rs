//! REST requests as raw bytes from a client: the API server's HTTP parser
//! ([`vmm::api::wire::parse_request`]), then [`vmm::api::route`] with what it parsed.

use vmm::api::route;
use vmm::api::wire::parse_request;
use vmm::controller::Command;

/// One request, as raw bytes from a client.
pub fn request(data: &[u8]) -> bool {
    let req = match parse_request(data) {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) => {
            assert!(
                e.status().is_some_and(|c| (400..500).contains(&c)),
                "a malformed request is answered with a 4xx: {e}"
            );
            return false;
        }
    };
    let (method, url, body) = (&req.method, req.url.as_str(), req.body.as_str());
    match route(method, url, body) {
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
