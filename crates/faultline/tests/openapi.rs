//! `docs/api.yaml` (OpenAPI 3.1) against the real API of a running VM: every path and method
//! it describes is called, every answer's status is one it lists and its body validates
//! against that answer's schema (`jsonschema`), and requests it forbids (methods it does not
//! list, bodies its schemas reject, paths it does not have) get a 4xx.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::*;

fn spec() -> Value {
    let f = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.yaml");
    let text = std::fs::read_to_string(f).expect("docs/api.yaml");
    serde_yaml::from_str(&text).expect("docs/api.yaml is YAML")
}

/// One request; the status and the body (`Value::Null` if empty).
fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("API socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let code = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {r:.80}"));
    let b = r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v = if b.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(b)
            .unwrap_or_else(|e| panic!("{method} {path}: body not JSON ({e}): {b}"))
    };
    (code, v)
}

/// Follow a local `$ref` (`#/components/...`).
fn deref<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let p = r.strip_prefix('#').expect("local refs only");
            spec.pointer(p).unwrap_or_else(|| panic!("dangling {r}"))
        }
        None => v,
    }
}

/// Check an answer against the operation's responses.
fn check(spec: &Value, op: &Value, what: &str, (code, body): &(u16, Value)) {
    let Some(resp) = op["responses"].get(code.to_string()) else {
        panic!("{what}: status {code} is not described ({body})");
    };
    let resp = deref(spec, resp);
    match resp.pointer("/content/application~1json/schema") {
        Some(schema) => {
            let root = json!({ "$ref": schema["$ref"], "components": spec["components"] });
            let root = if schema.get("$ref").is_some() {
                root
            } else {
                schema.clone()
            };
            let v = jsonschema::validator_for(&root)
                .unwrap_or_else(|e| panic!("{what}: the schema does not compile: {e}"));
            let errors: Vec<String> = v
                .iter_errors(body)
                .map(|e| format!("{e} at {}", e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{what} ({code}): {errors:?} in {body}");
        }
        None => assert_eq!(
            body,
            &Value::Null,
            "{what} ({code}) has an undescribed body"
        ),
    }
}

#[test]
fn every_described_call_answers_as_described_and_forbidden_calls_get_4xx() {
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let (_vm, sock) = source(dir.path());
    let paths = spec["paths"].as_object().expect("paths");
    let described: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (p.clone(), m.to_uppercase()))
        })
        .collect();
    // The order a user would follow; the VM is stopped last.
    let order = [
        ("GET", "/vm"),
        ("GET", "/vm/stats"),
        ("GET", "/migrate"),
        ("PUT", "/vm/pause"),
        ("PUT", "/vm/resume"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/migrate"),
        ("PUT", "/migrate/reclaim"),
        ("PUT", "/vm/stop"),
    ];
    let done: BTreeSet<(String, String)> = order
        .iter()
        .map(|(m, p)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(
        done, described,
        "the test's calls and the description differ"
    );
    let snap = dir.path().join("snap");
    let nobody = dir.path().join("nobody.sock");
    for (method, path) in order {
        let op = &paths[path][method.to_lowercase()];
        let what = format!("{method} {path}");
        let body = op
            .pointer("/requestBody/content/application~1json/example")
            .map(|e| {
                e.to_string()
                    .replace("SNAPSHOT_DIR", snap.to_str().unwrap())
                    .replace("DEST_SOCKET", nobody.to_str().unwrap())
            })
            .unwrap_or_default();
        if let Some(schema) = op.pointer("/requestBody/content/application~1json/schema") {
            // The example itself is a valid request.
            let root = json!({ "$ref": schema["$ref"], "components": spec["components"] });
            let v = jsonschema::validator_for(&root).unwrap();
            let b: Value = serde_json::from_str(&body).unwrap();
            assert!(v.is_valid(&b), "{what}: its own example is invalid: {b}");
        }
        // Requests this description forbids, before the real one.
        for other in ["POST", "DELETE", "PATCH", "GET", "PUT"] {
            if paths[path].get(other.to_lowercase()).is_none() {
                let (code, b) = call(&sock, other, path, "");
                assert!((400..500).contains(&code), "{other} {path}: {code} {b}");
                check(
                    &spec,
                    &json!({"responses": {code.to_string(): {"$ref": "#/components/responses/Error"}}}),
                    &format!("{other} {path}"),
                    &(code, b),
                );
            }
        }
        let r = call(&sock, method, path, &body);
        check(&spec, op, &what, &r);
        // What the description promises for each.
        let want = match (method, path) {
            ("GET", "/migrate") => 404, // none started yet
            ("PUT", "/migrate") => 202,
            ("PUT", "/migrate/reclaim") => 409, // not in doubt
            ("PUT", _) if path.starts_with("/vm/") => 204,
            _ => 200,
        };
        assert_eq!(r.0, want, "{what}: {}", r.1);
        if path == "/migrate" && method == "PUT" {
            // Nobody listens there: it fails, and GET /migrate describes that as well.
            let t = Instant::now();
            loop {
                let r = call(&sock, "GET", "/migrate", "");
                check(&spec, &paths["/migrate"]["get"], "GET /migrate", &r);
                if r.1["state"] == "failed" {
                    assert!(r.1["error"].as_str().is_some_and(|e| !e.is_empty()));
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "{}", r.1);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if path == "/vm/stop" {
            break;
        }
        // Bodies the schemas reject.
        let bad: &[&str] = match path {
            "/snapshot/create" => &["{}", "{\"snapshot_dir\": 5}", "not json"],
            "/migrate" if method == "PUT" => &[
                "{\"mode\": \"postcopy\"}",
                "{\"to\": \"unix:/x\", \"mode\": \"sideways\"}",
                "{\"to\": \"unix:/x\", \"tls\": {\"neither\": {}}}",
            ],
            _ => &[],
        };
        for b in bad {
            let (code, v) = call(&sock, method, path, b);
            assert_eq!(code, 400, "{what} with {b}: {v}");
            check(&spec, op, &format!("{what} with {b}"), &(code, v));
        }
    }
    // A path it does not describe.
    let (code, v) = call(&sock, "GET", "/nope", "");
    assert_eq!(code, 404, "{v}");
}
