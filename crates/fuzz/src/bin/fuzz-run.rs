//! `fuzz-run [SECONDS]`: build the libFuzzer targets and run each for SECONDS (default 60),
//! printing one line per target (target, executions, crashes); exits 1 if any crashed.

fn main() {
    let seconds = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => 60,
        Some(Ok(s)) if s > 0 => s,
        Some(_) => {
            eprintln!("usage: fuzz-run [SECONDS]");
            std::process::exit(2);
        }
    };
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = fuzz::run::build().and_then(|bins| fuzz::run::run_all(&bins, seconds, jobs));
    match result {
        Ok(all) if all.iter().all(|o| o.crashes.is_empty()) => {}
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("fuzz-run: {}", uffd_chain(&e));
            std::process::exit(1);
        }
    }
}

fn uffd_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
