//! PNG plots with plotters. Text needs a TrueType font: the first of `BRELU_FONT` and the
//! usual Debian font paths (package `fonts-dejavu-core`) is used.
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font once; the error explains how to get one.
fn ensure_font() -> std::result::Result<(), String> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = std::env::var("BRELU_FONT").into_iter().chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for p in candidates {
            if let Ok(bytes) = std::fs::read(&p) {
                // Plot text lives for the whole process; the font bytes must too.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err("no TrueType font found: install the Debian package fonts-dejavu-core or set BRELU_FONT=/path/to/font.ttf".into())
    })
    .clone()
}

/// A series of [`xy_plot`]: its legend name, its points, and whether a line joins them.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>, bool);

/// A line plot with one line (with markers) per series.
pub fn line_plot(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let joined: Vec<Series> = series.iter().map(|(n, p)| (*n, p.clone(), true)).collect();
    xy_plot(path, title, xlabel, ylabel, &joined)
}

/// Markers per series, joined by a line where the series' flag says so (a scatter otherwise).
pub fn xy_plot(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
) -> Result<()> {
    let perr = |m: String| Error::Plot {
        path: path.to_path_buf(),
        msg: m,
    };
    ensure_font().map_err(perr)?;
    let pts = series.iter().flat_map(|(_, p, _)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return Err(perr("nothing to plot".into()));
    }
    let pad = |a: f64, b: f64| {
        let d = if b > a {
            (b - a) * 0.05
        } else {
            a.abs().max(1.0) * 0.05
        };
        (a - d, b + d)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    // The encoder picks the format from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (900, 600)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| perr(e.to_string());
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc(xlabel)
            .y_desc(ylabel)
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, (name, p, joined)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line = if *joined { p.clone() } else { Vec::new() };
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(p.iter().map(|&pt| Circle::new(pt, 4, color.filled())))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A compact tick label: plain for moderate magnitudes, scientific otherwise.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e6).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A heatmap of `rows` (one row per y entry, one column per x label) on a log10 colour scale
/// (entries <= 0 are drawn grey), with a colour bar.
pub fn heatmap(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xlabels: &[String],
    rows: &[Vec<f64>],
) -> Result<()> {
    let perr = |m: String| Error::Plot {
        path: path.to_path_buf(),
        msg: m,
    };
    ensure_font().map_err(perr)?;
    let logs: Vec<Vec<Option<f64>>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|&v| (v > 0.0 && v.is_finite()).then(|| v.log10()))
                .collect()
        })
        .collect();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in logs.iter().flatten().flatten() {
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    let (nx, ny) = (xlabels.len().max(1), rows.len().max(1));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (1000, 700)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| perr(e.to_string());
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (main, bar) = root.split_horizontally(880);
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(70)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..nx as f64, 0.0..ny as f64)
            .map_err(|x| e(&x))?;
        let step = nx.div_ceil(24).max(1);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(xlabel)
            .y_desc(ylabel)
            .x_labels(nx.min(24))
            .x_label_formatter(&|v| {
                let i = v.floor() as usize;
                if i < xlabels.len() && i.is_multiple_of(step) {
                    xlabels[i].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{}", v.floor() as i64))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|x| e(&x))?;
        let cells = logs.iter().enumerate().flat_map(|(y, r)| {
            r.iter().enumerate().map(move |(x, v)| {
                let color = match v {
                    Some(v) => colormap((v - lo) / (hi - lo)),
                    None => RGBColor(200, 200, 200),
                };
                Rectangle::new(
                    [(x as f64, y as f64), (x as f64 + 1.0, y as f64 + 1.0)],
                    color.filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(|x| e(&x))?;
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(50)
            .margin_bottom(85)
            .margin_right(10)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..1.0, lo..hi)
            .map_err(|x| e(&x))?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_label_formatter(&|v| format!("{v:.1}"))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|x| e(&x))?;
        let n = 100;
        cb.draw_series((0..n).map(|i| {
            let a = lo + (hi - lo) * i as f64 / n as f64;
            let b = lo + (hi - lo) * (i + 1) as f64 / n as f64;
            Rectangle::new(
                [(0.0, a), (1.0, b)],
                colormap((i as f64 + 0.5) / n as f64).filled(),
            )
        }))
        .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A perceptually ordered dark-blue -> green -> yellow ramp (viridis-like) for t in [0, 1].
fn colormap(t: f64) -> RGBColor {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let t = t.clamp(0.0, 1.0);
    let i = STOPS.iter().rposition(|(s, _)| *s <= t).unwrap_or(0).min(3);
    let (t0, c0) = STOPS[i];
    let (t1, c1) = STOPS[i + 1];
    let f = (t - t0) / (t1 - t0);
    let mix = |k: usize| (c0[k] + (c1[k] - c0[k]) * f).round() as u8;
    RGBColor(mix(0), mix(1), mix(2))
}
