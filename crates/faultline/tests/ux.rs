//! What a user sees around the work, the binary started as a user would: the README's
//! quick start (`faultline demo`) with its output piped as into a log, shell completions, man
//! pages, and log events (`FAULTLINE_LOG`, `--log-format json`).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Proc(
        bin()
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start faultline"),
    )
    .finish_within(Duration::from_secs(300))
}

/// The README's quick start, first command (`cargo run --release -p faultline -- demo`; here
/// the built binary's `demo`), its output piped as `faultline demo | tee demo.log` would:
/// it succeeds, prints what the README says (the statistics, the memory verified, the guest
/// going on at the destination), and no line is longer than 200 characters (progress comes
/// as plain lines, not carriage-return updates).
#[test]
fn the_quick_start_demo_prints_what_the_readme_says_in_short_lines() {
    kvm_present();
    let o = run(&["demo"], &[]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "demo failed: {err}\n{out}");
    for l in out.lines().chain(err.lines()) {
        assert!(
            l.chars().count() <= 200,
            "a line of {} characters: {l:.120}...",
            l.chars().count()
        );
        assert!(!l.contains('\r'), "a carriage-return update: {l:.120}");
    }
    let all = out.to_lowercase();
    assert!(
        all.contains("postcopy") || all.contains("post-copy"),
        "{out}"
    );
    for said in [
        "tls 1.3",
        "total",
        "downtime",
        "max pause",
        "faults",
        "blocktime",
        "equal on both sides",
        "went on at the destination",
    ] {
        assert!(
            all.contains(said),
            "the demo's output lacks {said:?}:\n{out}"
        );
    }
    assert!(
        err.lines().any(|l| l.starts_with("migration: ")),
        "no progress line on stderr:\n{err}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell], &[]);
        assert!(o.status.success(), "{shell}: {}", text(&o.stderr));
        let s = text(&o.stdout);
        for sub in ["demo", "migrate", "restore", "page-server", "bench"] {
            assert!(s.contains(sub), "{shell}: no {sub} in the script");
        }
    }
    // The bash script parses.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("faultline.bash");
    std::fs::write(&f, run(&["completions", "bash"], &[]).stdout).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success(), "bash -n rejects the completion script");
}

#[test]
fn man_pages_render_with_nroff() {
    let o = run(&["man"], &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let page = text(&o.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH faultline"),
        "{page:.200}"
    );
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["man", "--dir", dir.path().to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for p in [
        "faultline.1",
        "faultline-migrate.1",
        "faultline-bench-irq.1",
    ] {
        let f = dir.path().join(p);
        assert!(f.exists(), "{p} was not written");
        let r = Command::new("nroff")
            .args(["-man"])
            .arg(&f)
            .output()
            .expect("nroff (groff-base; scripts/tools.sh installs it)");
        // nroff emboldens by overstriking (`N\x08N`): keep the last of each pair.
        let mut shown = String::new();
        for c in text(&r.stdout).chars() {
            if c == '\x08' {
                shown.pop();
            } else {
                shown.push(c);
            }
        }
        assert!(r.status.success(), "nroff {p}: {}", text(&r.stderr));
        assert!(
            shown.contains("NAME") && shown.contains("SYNOPSIS"),
            "{p} renders without its sections:\n{shown:.400}"
        );
    }
}

#[test]
fn log_events_follow_faultline_log_as_text_or_json() {
    kvm_present();
    let args = [
        "--log-format",
        "json",
        "run",
        "--mem",
        "36M",
        "--guest",
        "irq",
        "--seconds",
        "0.2",
    ];
    let o = run(&args, &[("FAULTLINE_LOG", "info")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let events: Vec<serde_json::Value> = text(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO"
                && e["target"].as_str().is_some_and(|t| t.starts_with("vmm"))),
        "no INFO event from vmm as JSON: {}",
        text(&o.stderr)
    );
    // Filtered out at warn.
    let o = run(&args, &[("FAULTLINE_LOG", "warn")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !text(&o.stderr).contains("\"INFO\""),
        "INFO events at FAULTLINE_LOG=warn: {}",
        text(&o.stderr)
    );
    // A filter that does not parse is a usage error naming the variable.
    let o = run(&["probe"], &[("FAULTLINE_LOG", "vmm=notalevel")]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("FAULTLINE_LOG"),
        "{}",
        text(&o.stderr)
    );
}

/// `--report DIR` as a person would look at it: an index.html that shows every plot, each
/// plot rendered (rsvg-convert) not blank, with its caption, axis labels and marks.
fn check_report(dir: &std::path::Path, plots: &[&str]) {
    let html = std::fs::read_to_string(dir.join("index.html")).expect("index.html");
    for p in plots {
        assert!(
            html.contains(&format!("src=\"{p}\"")),
            "index.html does not show {p}"
        );
        let img = bench::report::svgcheck::render(&dir.join(p)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            img.ink(0, img.width, 0, img.height) > img.width * img.height / 200,
            "{p} is nearly blank"
        );
        assert!(img.ink(0, img.width, 0, 40) > 100, "{p}: no caption");
        assert!(img.ink(0, 40, 60, img.height / 2) > 30, "{p}: no y label");
        assert!(
            img.colour(70, img.width, 40, img.height - 50) > 50,
            "{p}: no marks"
        );
    }
}

#[test]
fn demo_and_the_benches_write_reports_with_plots_that_render() {
    kvm_present();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let o = run(
        &[
            "demo",
            "--mem-mib",
            "256",
            "--hot-mib",
            "64",
            "--report",
            d.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    check_report(&d, &["heartbeats.svg", "faults.svg", "progress.svg"]);
    let html = std::fs::read_to_string(d.join("index.html")).unwrap();
    assert!(
        html.contains("downtime") && html.contains("remote faults"),
        "{html}"
    );
    let i = dir.path().join("irq");
    let o = run(
        &[
            "bench",
            "irq",
            "--round-trips",
            "50",
            "--guest-irqs",
            "10",
            "--report",
            i.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    check_report(&i, &["irq.svg"]);
    // bench migrate: a report per cell, linked from the top one.
    let m = dir.path().join("migrate");
    let o = run(
        &[
            "bench",
            "migrate",
            "--runs",
            "1",
            "--workloads",
            "dirty",
            "--links",
            "unlimited",
            "--modes",
            "postcopy",
            "--mem-mib",
            "128",
            "--hot-mib",
            "32",
            "--report",
            m.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let top = std::fs::read_to_string(m.join("index.html")).unwrap();
    assert!(
        top.contains("href=\"dirty-unlimited-postcopy-plain/index.html\""),
        "{top}"
    );
    check_report(
        &m.join("dirty-unlimited-postcopy-plain"),
        &["heartbeats.svg", "faults.svg", "progress.svg"],
    );
    // faultline migrate --report, between two processes a user started.
    let ep = format!("unix:{}", dir.path().join("mig.sock").display());
    let dst = destination(&ep, &[]);
    let (src, sock) = source(dir.path());
    let mr = dir.path().join("migrate-cli");
    let (out, _) = migrate_bg(&sock, &ep, "postcopy", &["--report", mr.to_str().unwrap()])
        .join()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    check_report(&mr, &["heartbeats.svg", "faults.svg", "progress.svg"]);
    drop((dst, src));
    // bench restore.
    let r = dir.path().join("restore");
    let o = run(
        &[
            "bench",
            "restore",
            "--runs",
            "1",
            "--mem-mib",
            "64",
            "--touch-mib",
            "16",
            "--report",
            r.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    check_report(&r, &["restore.svg"]);
}

/// A restore with prefetch shows how far the prefetch has come (plain lines when stderr is
/// not a terminal).
#[test]
fn a_restore_with_prefetch_shows_its_progress() {
    let t = tempfile::tempdir().unwrap();
    let snap = t.path().join("snap");
    make_snapshot(t.path(), &snap);
    // The first prefetch restore records the working set, the second prefetches it.
    for _ in 0..2 {
        let o = restore(&snap, &["--mode", "prefetch", "--verify"]);
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    let o = restore(&snap, &["--mode", "prefetch", "--verify"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("prefetch: ") && l.contains("working-set pages in")),
        "no prefetch progress on stderr:\n{err}"
    );
}

/// The other benches' `--report DIR`: a chart and an index.html each.
#[test]
fn the_uffd_vfio_user_and_vm_benches_write_reports() {
    kvm_present();
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        (
            "uffd",
            &[
                "bench",
                "uffd",
                "--faults",
                "64",
                "--runs",
                "1",
                "--threads",
                "1",
            ][..],
        ),
        ("vfio-user", &["bench", "vfio-user", "--quick"][..]),
        (
            "vm",
            &["bench", "vm", "--boots", "1", "--seconds", "0.3"][..],
        ),
    ] {
        let d = dir.path().join(name);
        let mut a = args.to_vec();
        a.extend(["--report", d.to_str().unwrap()]);
        let o = run(&a, &[]);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        check_report(&d, &["bench.svg"]);
    }
}
