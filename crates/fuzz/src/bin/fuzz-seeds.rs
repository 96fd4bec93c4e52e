//! `fuzz-seeds`: write the seeds made from real traffic (see `fuzz::seeds`) into
//! `crates/fuzz/corpus/TARGET/`, replacing what is there. Needs /dev/kvm (a snapshot of a
//! running guest).

fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let seeds = fuzz::seeds::all(dir.path());
    for t in fuzz::TARGETS {
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
