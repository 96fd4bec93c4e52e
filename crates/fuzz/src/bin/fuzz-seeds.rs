//! `fuzz-seeds [TARGET...]`: write the seeds made from real traffic (see `fuzz::seeds`) into
//! `crates/fuzz/corpus/TARGET/`, replacing what is there: every target's (needs /dev/kvm, for
//! a snapshot of a running guest), or only those named.

fn main() {
    let only: Vec<String> = std::env::args().skip(1).collect();
    for name in &only {
        assert!(fuzz::target(name).is_some(), "no target {name}");
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let seeds = match only.as_slice() {
        [] => fuzz::seeds::all(dir.path()),
        [v] if v == "virtio_guest" => fuzz::seeds::virtio(),
        _ => fuzz::seeds::all(dir.path())
            .into_iter()
            .filter(|(t, _, _)| only.iter().any(|o| o == t))
            .collect(),
    };
    for t in fuzz::TARGETS {
        if !only.is_empty() && !only.iter().any(|o| o == t.name) {
            continue;
        }
        let d = fuzz::run::seeds_dir(t.name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating the corpus directory");
    }
    for (target, name, bytes) in &seeds {
        let p = fuzz::run::seeds_dir(target).join(name);
        std::fs::write(&p, bytes).expect("writing a seed");
        println!("{:>7} bytes  {}", bytes.len(), p.display());
    }
}
