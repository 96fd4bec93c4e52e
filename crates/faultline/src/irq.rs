//! `faultline bench irq`: printing the interrupt bench's lines, as JSON or as a table with
//! our p50 over C's.

use bench::irq_bench::{self, Out, Params};

use crate::error::{CliResult, failed};

fn print(json: bool, o: &Out) {
    match (json, o) {
        (true, Out::Line(l)) => println!(
            "{}",
            serde_json::to_string(l).expect("plain struct serialises")
        ),
        (
            true,
            Out::Unavailable {
                path,
                placement,
                reason,
            },
        ) => println!(
            "{}",
            serde_json::json!({
                "bench": "irq", "path": path, "placement": placement, "unavailable": reason
            })
        ),
        (false, Out::Line(l)) => println!(
            "{:<22} {:<9} {:<9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6.2} {:>8}",
            l.path,
            l.placement,
            l.r#impl,
            l.p50_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            l.exits_per_irq,
            l.vs_c_p50.map_or(String::new(), |r| format!("{r:.2}x")),
        ),
        (
            false,
            Out::Unavailable {
                path,
                placement,
                reason,
            },
        ) => println!("{path:<22} {placement:<9} unavailable: {reason}"),
    }
}

/// Run the bench and print it (and plot it into `plot`).
pub fn bench(
    json: bool,
    runs: usize,
    round_trips: usize,
    plot: Option<&std::path::Path>,
) -> CliResult {
    if !json {
        println!(
            "{:<22} {:<9} {:<9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8}",
            "path", "placement", "impl", "p50_us", "p99_us", "p999_us", "max_us", "exits", "vs C"
        );
    }
    let p = Params { round_trips, runs };
    let mut lines = Vec::new();
    irq_bench::run_host(&p, |o| {
        print(json, &o);
        if let Out::Line(l) = o {
            lines.push(l);
        }
    })
    .map_err(failed("bench irq"))?;
    if let Some(f) = plot {
        irq_bench::plot::plot(&lines, f).map_err(failed("bench irq: plot"))?;
        eprintln!("faultline bench irq: plot written to {}", f.display());
    }
    Ok(())
}
