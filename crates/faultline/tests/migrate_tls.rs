//! End to end: who may migrate. Two `faultline` processes over real TCP with TLS 1.3 (rustls):
//! a pre-shared key, and X.509 with a CA and allow-lists; plain TCP only with `--insecure`.
//! Every refused peer is turned away while the destination keeps waiting for the real source,
//! which then migrates with verified memory.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Proc, api, bin_short_deadline, heartbeats, migrate_bg, source, text, wait_for};
use serde_json::Value;

fn wait_until(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < t, "{what}: not within {t:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn destination(ep: &str, dir: &Path, security: &[&str]) -> (Proc, PathBuf) {
    let sock = dir.join("dst.sock");
    let mut extra = vec!["--api-sock", sock.to_str().unwrap()];
    extra.extend_from_slice(security);
    (common::destination(ep, &extra), sock)
}

/// `faultline migrate` (post-copy); its output, within a deadline.
fn migrate(sock: &Path, to: &str, security: &[&str]) -> Output {
    migrate_bg(sock, to, "postcopy", security).join().unwrap().0
}

/// The attempt fails naming TLS, and the source's guest still runs (it never left).
fn refused(out: &Output, src: &Path, why: &str) {
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        !out.status.success(),
        "{why}: the migration went through: {all}"
    );
    // A plain client only sees the connection end (the destination read its hello as a
    // broken TLS record); a TLS client is told what TLS refused.
    let named = if why == "plain TCP" {
        "handshake"
    } else {
        "securing the connection"
    };
    assert!(
        all.contains(named),
        "{why}: the error does not say {named:?}: {all}"
    );
    let before = heartbeats(src);
    wait_until(
        &format!("{why}: the source guest beats on"),
        Duration::from_secs(10),
        || heartbeats(src) > before,
    );
}

fn completed(out: &Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stats: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap_or(Value::Null);
    assert_eq!(stats["digest_verified"], true, "{stats}");
}

fn write_secret(path: &Path, byte: u8) {
    std::fs::write(path, [byte; 32]).unwrap();
}

#[test]
fn a_pre_shared_key_admits_only_its_holder_and_the_real_source_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("psk"), dir.path().join("other"));
    write_secret(&good, 0x5a);
    write_secret(&bad, 0xa5);
    let ep = format!("tcp:127.0.0.1:{}", free_port());
    let (_dst, dst_sock) = destination(&ep, dir.path(), &["--tls-psk", good.to_str().unwrap()]);
    let (_src, src) = source(dir.path());
    // Plain TCP to a TLS destination, then the wrong key: both turned away.
    refused(&migrate(&src, &ep, &["--insecure"]), &src, "plain TCP");
    refused(
        &migrate(&src, &ep, &["--tls-psk", bad.to_str().unwrap()]),
        &src,
        "a wrong key",
    );
    // The destination still waits; the holder of the key migrates.
    completed(&migrate(&src, &ep, &["--tls-psk", good.to_str().unwrap()]));
    wait_for(&dst_sock);
    wait_until(
        "the guest runs at the destination",
        Duration::from_secs(20),
        || api(&dst_sock, "GET", "/vm")["state"] == "running",
    );
}

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA (and a second, foreign one) with leaf certificates for each name.
    fn new(dir: &Path, names: &[&str]) -> Pki {
        let ca = |dir: &Path, tag: &str, leaves: &[&str]| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("{tag} CA"));
            let cert = p.self_signed(&key).unwrap();
            std::fs::write(dir.join(format!("{tag}-ca.pem")), cert.pem()).unwrap();
            for n in leaves {
                let k = rcgen::KeyPair::generate().unwrap();
                let c = rcgen::CertificateParams::new(vec![n.to_string()])
                    .unwrap()
                    .signed_by(&k, &cert, &key)
                    .unwrap();
                std::fs::write(dir.join(format!("{tag}-{n}.pem")), c.pem()).unwrap();
                std::fs::write(dir.join(format!("{tag}-{n}.key")), k.serialize_pem()).unwrap();
            }
        };
        ca(dir, "ours", names);
        ca(dir, "foreign", names);
        Pki { dir: dir.into() }
    }

    /// `--tls-cert --tls-key --tls-ca` for `name` under CA `tag`, trusting our CA.
    fn args(&self, tag: &str, name: &str, allow: &str) -> Vec<String> {
        let f = |s: String| self.dir.join(s).to_str().unwrap().to_string();
        vec![
            "--tls-cert".into(),
            f(format!("{tag}-{name}.pem")),
            "--tls-key".into(),
            f(format!("{tag}-{name}.key")),
            "--tls-ca".into(),
            f("ours-ca.pem".into()),
            "--tls-allow".into(),
            allow.into(),
        ]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn x509_checks_the_chain_and_the_allow_list_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(
        dir.path(),
        &["dest.example", "src.example", "rogue.example"],
    );
    let ep = format!("tcp:127.0.0.1:{}", free_port());
    let dst_args = pki.args("ours", "dest.example", "src.example");
    let (_dst, _) = destination(&ep, dir.path(), &strs(&dst_args));
    let (_src, src) = source(dir.path());
    // Signed by our CA but not on the destination's allow-list.
    let rogue = pki.args("ours", "rogue.example", "dest.example");
    refused(
        &migrate(&src, &ep, &strs(&rogue)),
        &src,
        "a name not allowed",
    );
    // The right name, signed by a foreign CA.
    let foreign = pki.args("foreign", "src.example", "dest.example");
    refused(&migrate(&src, &ep, &strs(&foreign)), &src, "a foreign CA");
    // The source checks the destination too: it expects another name.
    let wrong_dest = pki.args("ours", "src.example", "other.example");
    refused(
        &migrate(&src, &ep, &strs(&wrong_dest)),
        &src,
        "a destination not allowed",
    );
    let good = pki.args("ours", "src.example", "dest.example");
    completed(&migrate(&src, &ep, &strs(&good)));
}

#[test]
fn plain_tcp_needs_insecure_and_says_so() {
    let ep = format!("tcp:127.0.0.1:{}", free_port());
    let out = bin_short_deadline()
        .args(["run", "--incoming", &ep])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("--tls-psk"),
        "{err}"
    );
    let out = bin_short_deadline()
        .args(["migrate", "--api-sock", "/nonexistent", "--to", &ep])
        .output()
        .expect("migrate");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("refusing plain TCP"), "{err}");
    // A short key is refused before anything runs.
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    std::fs::write(&k, b"tooshort").unwrap();
    let out = bin_short_deadline()
        .args(["run", "--incoming", &ep, "--tls-psk", k.to_str().unwrap()])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("at least 32"),
        "{}",
        text(&out.stderr)
    );
}
