//! The SVG plot of a run (`plotters`, SVG backend only): one panel for the host paths, one
//! for the guest paths; per path a dot at p50 and a bar up to p99, one colour per series
//! (implementation, placement, handler), latency on a log scale.

use std::path::Path;

use plotters::prelude::*;

use super::{IrqBenchError, Line};
use crate::report::PALETTE;

fn series(l: &Line) -> String {
    match &l.handler {
        Some(h) => format!("{} {} {h}", l.r#impl, l.placement),
        None => format!("{} {}", l.r#impl, l.placement),
    }
}

fn plot_err(e: impl std::error::Error + Send + Sync + 'static) -> IrqBenchError {
    IrqBenchError::Plot(Box::new(e))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    lines: &[&Line],
) -> Result<(), IrqBenchError>
where
    DB::ErrorType: 'static,
{
    let mut paths: Vec<&str> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for l in lines {
        if !paths.contains(&l.path.as_str()) {
            paths.push(&l.path);
        }
        let s = series(l);
        if !names.contains(&s) {
            names.push(s);
        }
    }
    let title = if lines.is_empty() {
        format!("{title}: no path measured in this run")
    } else {
        title.to_string()
    };
    let n = paths.len().max(1);
    let (lo, hi) = lines.iter().fold((f64::MAX, f64::MIN), |(lo, hi), l| {
        (lo.min(l.p50_us), hi.max(l.p99_us))
    });
    let (lo, hi) = if lines.is_empty() {
        (0.1, 1000.0)
    } else {
        // Headroom above the highest bar for the legend (upper right).
        ((lo / 2.0).max(0.01), hi * 30.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (lo..hi).log_scale())
        .map_err(plot_err)?;
    let labels = paths.clone();
    chart
        .configure_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels
                    .get(i as usize)
                    .map_or(String::new(), |s| s.to_string())
            } else {
                String::new()
            }
        })
        .x_desc("path (dot: p50, bar: p50 to p99)")
        .y_desc("one-way latency, µs")
        .draw()
        .map_err(plot_err)?;
    let k = names.len().max(1) as f64;
    for (si, name) in names.iter().enumerate() {
        let colour = PALETTE[si % PALETTE.len()];
        let off = (si as f64 - (k - 1.0) / 2.0) * 0.6 / k;
        let pts: Vec<&&Line> = lines.iter().filter(|l| &series(l) == name).collect();
        let x = |l: &Line| paths.iter().position(|p| *p == l.path).unwrap_or(0) as f64 + off;
        chart
            .draw_series(pts.iter().map(|l| {
                PathElement::new(
                    vec![(x(l), l.p50_us), (x(l), l.p99_us)],
                    colour.stroke_width(2),
                )
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|l| Circle::new((x(l), l.p50_us), 4, colour.filled())),
            )
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| Circle::new((x, y), 4, colour.filled()));
    }
    if !names.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

/// Draw `lines` into the SVG file `file`: host paths above, guest paths (`guest-*`) below.
pub fn plot(lines: &[Line], file: &Path) -> Result<(), IrqBenchError> {
    let root = SVGBackend::new(file, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (top, bottom) = root.split_vertically(500);
    let host: Vec<&Line> = lines
        .iter()
        .filter(|l| !l.path.starts_with("guest-"))
        .collect();
    let guest: Vec<&Line> = lines
        .iter()
        .filter(|l| l.path.starts_with("guest-"))
        .collect();
    panel(&top, "host: device thread -> handler thread", &host)?;
    panel(&bottom, "guest: trigger -> guest IDT handler", &guest)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq_bench::line;
    use crate::report::svgcheck::{self, Raster};

    /// Render `svg` with [`crate::report::svgcheck`], installing `rsvg-convert` first if it
    /// is missing (`scripts/tools.sh`, as root).
    fn render(svg: &Path) -> Raster {
        let have = || {
            std::process::Command::new("rsvg-convert")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !have() {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/tools.sh");
            let st = std::process::Command::new("bash").arg(script).status();
            assert!(
                have(),
                "rsvg-convert (Debian's librsvg2-bin) is missing and {script} could not \
                 install it ({st:?}): run it as root"
            );
        }
        svgcheck::render(svg).unwrap()
    }

    #[test]
    fn the_rendered_plot_has_both_panels_their_axis_labels_and_marks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("irq.svg");
        let mut g = line(
            "guest-irqfd-msi",
            "cross-cpu",
            "faultline",
            vec![30.0, 40.0, 90.0],
            0.0,
        );
        g.handler = Some("cpl0".into());
        let lines = vec![
            line("eventfd", "same-cpu", "faultline", vec![1.0, 2.0, 3.0], 0.0),
            line("eventfd", "same-cpu", "c", vec![1.5, 2.0, 4.0], 0.0),
            line("futex", "cross-cpu", "faultline", vec![20.0, 30.0], 0.0),
            g,
        ];
        plot(&lines, &f).unwrap();
        let svg = std::fs::read_to_string(&f).unwrap();
        for label in [
            "one-way latency",
            "path (dot: p50",
            "futex",
            "guest-irqfd-msi",
            "faultline same-cpu",
        ] {
            assert!(svg.contains(label), "the SVG lacks the text {label:?}");
        }
        let img = render(&f);
        let (w, h) = (img.width, img.height);
        assert_eq!((w, h), (1400, 1000));
        let all = img.ink(0, w, 0, h);
        assert!(
            all > w * h / 200,
            "the rendering is nearly blank: {all} dark pixels"
        );
        // Each panel (top and bottom halves): a caption, the y axis's label on the left and
        // the x axis's label at the bottom carry ink; coloured marks in its plotting area.
        for (y0, y1) in [(0, h / 2), (h / 2, h)] {
            assert!(
                img.ink(0, w, y0, y0 + 40) > 100,
                "panel at {y0}: no caption"
            );
            assert!(
                img.ink(0, 40, y0 + 60, y1 - 60) > 100,
                "panel at {y0}: no y label"
            );
            assert!(
                img.ink(w / 3, 2 * w / 3, y1 - 40, y1) > 100,
                "panel at {y0}: no x label"
            );
            assert!(
                img.colour(70, w, y0 + 40, y1 - 50) > 50,
                "panel at {y0}: no marks"
            );
        }
    }

    #[test]
    fn the_plot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("irq.svg");
        let lines = vec![
            line("eventfd", "same-cpu", "faultline", vec![1.0, 2.0, 3.0], 0.0),
            line("eventfd", "same-cpu", "c", vec![1.5, 2.0, 4.0], 0.0),
            line("futex", "cross-cpu", "faultline", vec![20.0, 30.0], 0.0),
        ];
        plot(&lines, &f).unwrap();
        let svg = std::fs::read_to_string(&f).unwrap();
        assert!(svg.len() > 1000 && svg.contains("<svg"));
        assert!(svg.contains("eventfd") && svg.contains("guest"));
    }
}
