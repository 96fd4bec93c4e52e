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

/// A described path with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{drive_id}", "rootfs")
        .replace("{iface_id}", "eth0")
}

/// An operation's example body, its placeholders made real under `dir`.
fn example(op: &Value, dir: &Path) -> String {
    op.pointer("/requestBody/content/application~1json/example")
        .map(|e| {
            e.to_string()
                .replace("SNAPSHOT_DIR", dir.join("snap").to_str().unwrap())
                .replace("DEST_SOCKET", dir.join("nobody.sock").to_str().unwrap())
                .replace("VSOCK_SOCKET", dir.join("v.sock").to_str().unwrap())
                .replace("IMAGE", dir.join("disk.img").to_str().unwrap())
                .replace("\"TAP\"", "\"TAP_NAME\"")
        })
        .unwrap_or_default()
}

/// Before boot (`--boot-via-api`): the device calls and the start answer as described, the
/// configuration shows the devices, and the start of a VM that cannot boot is a 400 that can
/// be fixed and started again.
#[test]
fn a_vm_configured_and_booted_through_the_api() {
    let spec = spec();
    let paths = &spec["paths"];
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("api.sock");
    let _vm = Proc(
        bin()
            .args([
                "run",
                "--guest",
                "virtio",
                "--boot-via-api",
                "--timeout",
                "60",
                "--api-sock",
            ])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let r = call(&sock, "GET", "/vm", "");
    check(&spec, &paths["/vm"]["get"], "GET /vm (before boot)", &r);
    assert_eq!(r.1["state"], "not_started", "{}", r.1);
    let r = call(&sock, "PUT", "/vm/pause", "");
    assert_eq!(r.0, 409, "pause before boot: {}", r.1);
    // A drive whose image does not exist yet: the start says why, with 400.
    let missing = json!({"path_on_host": dir.path().join("none.img")}).to_string();
    let r = call(&sock, "PUT", "/drives/rootfs", &missing);
    check(
        &spec,
        &paths["/drives/{drive_id}"]["put"],
        "PUT /drives",
        &r,
    );
    assert_eq!(r.0, 204, "{}", r.1);
    let start = example(&paths["/actions"]["put"], dir.path());
    let r = call(&sock, "PUT", "/actions", &start);
    check(&spec, &paths["/actions"]["put"], "PUT /actions", &r);
    assert_eq!(r.0, 400, "{}", r.1);
    assert!(
        r.1["error"].as_str().unwrap().contains("none.img"),
        "{}",
        r.1
    );
    for p in ["/drives/{drive_id}", "/entropy"] {
        let body = example(&paths[p]["put"], dir.path());
        let r = call(&sock, "PUT", &concrete(p), &body);
        check(&spec, &paths[p]["put"], p, &r);
        assert_eq!(r.0, 204, "{p}: {}", r.1);
    }
    let r = call(&sock, "GET", "/vm", "");
    check(&spec, &paths["/vm"]["get"], "GET /vm (configured)", &r);
    let kinds: Vec<&str> = r.1["config"]["virtio"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["block", "rng"], "{}", r.1);
    let r = call(&sock, "PUT", "/actions", &start);
    assert_eq!(r.0, 204, "{}", r.1);
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
        ("PUT", "/drives/{drive_id}"),
        ("PUT", "/network-interfaces/{iface_id}"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/actions"),
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
    for (method, spec_path) in order {
        let path = &*concrete(spec_path);
        let op = &paths[spec_path][method.to_lowercase()];
        let what = format!("{method} {path}");
        let body = example(op, dir.path());
        if let Some(schema) = op.pointer("/requestBody/content/application~1json/schema") {
            // The example itself is a valid request.
            let root = json!({ "$ref": schema["$ref"], "components": spec["components"] });
            let v = jsonschema::validator_for(&root).unwrap();
            let b: Value = serde_json::from_str(&body).unwrap();
            assert!(v.is_valid(&b), "{what}: its own example is invalid: {b}");
        }
        // Requests this description forbids, before the real one.
        for other in ["POST", "DELETE", "PATCH", "GET", "PUT"] {
            if paths[spec_path].get(other.to_lowercase()).is_none() {
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
            // Devices and the start are for a VM that has not booted: this one runs.
            ("PUT", "/actions" | "/vsock" | "/entropy") => 400,
            ("PUT", _) if path.starts_with("/drives/") || path.starts_with("/network-") => 400,
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
            "/actions" => &["{}", "{\"action_type\": \"Reboot\"}", "[]"],
            "/vsock" => &["{\"uds_path\": \"/x\"}", "{\"guest_cid\": 3}"],
            p if p.starts_with("/drives/") => {
                &["{}", "{\"drive_id\": \"other\", \"path_on_host\": \"/x\"}"]
            }
            p if p.starts_with("/network-") => {
                &["{}", "{\"host_dev_name\": \"t\", \"guest_mac\": \"zz\"}"]
            }
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
