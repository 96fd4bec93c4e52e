//! Look at a plot as a person would: render the SVG to PNG with `rsvg-convert` (Debian's
//! `librsvg2-bin`; `scripts/tools.sh` installs it) and count what is drawn. The tests of every
//! plot use it; a missing `rsvg-convert` is an error that names the package.

use std::path::Path;
use std::process::Command;

/// A rendered plot: RGB pixels, row-major.
#[derive(Debug, Clone)]
pub struct Raster {
    /// Width, pixels.
    pub width: usize,
    /// Height, pixels.
    pub height: usize,
    /// The pixels.
    pub rgb: Vec<[u8; 3]>,
}

/// Render `svg` on white; the PNG is written beside it.
pub fn render(svg: &Path) -> Result<Raster, String> {
    let png = svg.with_extension("png");
    // One at a time: the first runs on a fresh machine build fontconfig's cache, and two of
    // them doing so at once was seen to fail once (a second try then succeeds).
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let run = || {
        Command::new("rsvg-convert")
            .args(["-b", "white", "-o"])
            .arg(&png)
            .arg(svg)
            .output()
            .map_err(|e| {
                format!(
                    "rsvg-convert could not be run ({e}): install librsvg2-bin (scripts/tools.sh does, as root)"
                )
            })
    };
    let mut out = run()?;
    if !out.status.success() {
        out = run()?;
    }
    if !out.status.success() {
        return Err(format!(
            "rsvg-convert {}: {}",
            svg.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let f = std::fs::File::open(&png).map_err(|e| format!("{}: {e}", png.display()))?;
    let mut dec = png::Decoder::new(f);
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut r = dec.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let ch = info.color_type.samples();
    let rgb = buf[..info.buffer_size()]
        .chunks(ch)
        .map(|p| {
            if ch >= 3 {
                [p[0], p[1], p[2]]
            } else {
                [p[0]; 3]
            }
        })
        .collect();
    Ok(Raster {
        width: info.width as usize,
        height: info.height as usize,
        rgb,
    })
}

impl Raster {
    fn count(&self, [x0, x1, y0, y1]: [usize; 4], pick: fn([u8; 3]) -> bool) -> usize {
        (y0..y1.min(self.height))
            .flat_map(|y| (x0..x1.min(self.width)).map(move |x| (x, y)))
            .filter(|&(x, y)| pick(self.rgb[y * self.width + x]))
            .count()
    }

    /// Dark pixels (text, axes) in the box `[x0, x1) x [y0, y1)`.
    pub fn ink(&self, x0: usize, x1: usize, y0: usize, y1: usize) -> usize {
        self.count([x0, x1, y0, y1], |p| {
            p.iter().map(|&c| u32::from(c)).sum::<u32>() < 3 * 128
        })
    }

    /// Coloured pixels (marks) in the box.
    pub fn colour(&self, x0: usize, x1: usize, y0: usize, y1: usize) -> usize {
        self.count([x0, x1, y0, y1], |p| {
            p.iter().max().unwrap_or(&0) - p.iter().min().unwrap_or(&0) > 60
        })
    }

    /// Panic unless the plot (one panel, caption on top, y label on the left, x label at the
    /// bottom) is not blank, carries text where its caption and axis labels go, and has
    /// coloured marks.
    pub fn assert_looks_like_a_plot(&self, what: &str) {
        let (w, h) = (self.width, self.height);
        let all = self.ink(0, w, 0, h);
        assert!(
            all > w * h / 200,
            "{what}: nearly blank ({all} dark pixels)"
        );
        assert!(self.ink(0, w, 0, 40) > 100, "{what}: no caption");
        assert!(self.ink(0, 40, 60, h - 60) > 50, "{what}: no y label");
        assert!(
            self.ink(w / 3, 2 * w / 3, h - 40, h) > 100,
            "{what}: no x label"
        );
        assert!(self.colour(70, w, 40, h - 50) > 50, "{what}: no marks");
    }
}
