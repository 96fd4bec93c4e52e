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
            "{:<27} {:<9} {:<9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6.2} {:>6} {:>8}",
            match &l.handler {
                Some(h) => format!("{} ({h})", l.path),
                None => l.path.clone(),
            },
            l.placement,
            l.r#impl,
            l.p50_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            l.exits_per_irq,
            l.kvm_exits_per_irq
                .map_or(String::new(), |k| format!("{k:.2}")),
            l.vs_c_p50.map_or(String::new(), |r| format!("{r:.2}x")),
        ),
        (
            false,
            Out::Unavailable {
                path,
                placement,
                reason,
            },
        ) => println!("{path:<27} {placement:<9} unavailable: {reason}"),
        (true, Out::Probe { what, value }) => println!(
            "{}",
            serde_json::json!({ "bench": "irq", "probe": what, "value": value })
        ),
        (false, Out::Probe { what, value }) => println!("probe: {what}: {value}"),
    }
}

/// Run the bench and print it (and plot it into `plot`, and write a report into `report`).
pub fn bench(
    json: bool,
    runs: usize,
    round_trips: usize,
    guest_irqs: usize,
    plot: Option<&std::path::Path>,
    report: Option<&std::path::Path>,
) -> CliResult {
    if !json {
        println!(
            "{:<27} {:<9} {:<9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>8}",
            "path",
            "placement",
            "impl",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "exits",
            "kvm",
            "vs C"
        );
    }
    let p = Params {
        round_trips,
        runs,
        guest_irqs,
    };
    let mut lines = Vec::new();
    let mut progress = crate::progress::Progress::spinner("bench irq");
    let mut out = |o: Out| {
        print(json, &o);
        if let Out::Line(l) = o {
            progress.update(
                0.0,
                &format!(
                    "{} paths measured, last {} {}",
                    lines.len() + 1,
                    l.path,
                    l.placement
                ),
            );
            lines.push(l);
        }
    };
    irq_bench::run_host(&p, &mut out).map_err(failed("bench irq: host paths"))?;
    irq_bench::run_guest(&p, &mut out).map_err(failed("bench irq: guest paths"))?;
    progress.finish(&format!("{} paths measured", lines.len()));
    if let Some(f) = plot {
        irq_bench::plot::plot(&lines, f).map_err(failed("bench irq: plot"))?;
        eprintln!("faultline bench irq: plot written to {}", f.display());
    }
    if let Some(d) = report {
        let what = format!("bench irq: the report in {}", d.display());
        bench::report::create_dir(d).map_err(failed(what.clone()))?;
        irq_bench::plot::plot(&lines, &d.join("irq.svg")).map_err(failed(what.clone()))?;
        let rows: Vec<(String, String)> = lines
            .iter()
            .map(|l| {
                let handler = l
                    .handler
                    .as_deref()
                    .map(|h| format!(" {h}"))
                    .unwrap_or_default();
                (
                    format!("{} {} {}{handler}", l.path, l.placement, l.r#impl),
                    format!(
                        "p50 {:.2} µs, p99 {:.2} µs, {:.2} exits/irq",
                        l.p50_us, l.p99_us, l.exits_per_irq
                    ),
                )
            })
            .collect();
        let index = bench::report::index(
            d,
            "faultline bench irq",
            &[(
                "One-way latency per path: dot p50, bar p50 to p99",
                "irq.svg",
            )],
            &rows,
        )
        .map_err(failed(what.clone()))?;
        eprintln!("report: {}", index.display());
    }
    Ok(())
}
