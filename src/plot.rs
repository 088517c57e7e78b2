//! PNG plots with plotters. Text needs a TrueType font: the first of `BRELU_FONT` and the
//! usual Debian font paths (package `fonts-dejavu-core`) is used.
use crate::error::{Error, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
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

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Markers joined by a line.
    Line,
    /// Markers only.
    Scatter,
    /// A dashed line without markers (a reference level such as a baseline).
    Dashed,
}

/// A series of [`xy_plot`]: its legend name, its points and how it is drawn.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>, Style);

/// The x axis: linear, or logarithmic (positive values only); ticks as plain numbers or as
/// percentages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XAxis {
    pub log: bool,
    pub percent: bool,
}

/// A line plot with one line (with markers) per series.
pub fn line_plot(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let joined: Vec<Series> = series
        .iter()
        .map(|(n, p)| (*n, p.clone(), Style::Line))
        .collect();
    xy_plot(path, title, (xlabel, XAxis::default()), ylabel, &joined)
}

/// Every series on one chart, the legend beside it (never over the data). Written atomically.
pub fn xy_plot(
    path: &Path,
    title: &str,
    (xlabel, xaxis): (&str, XAxis),
    ylabel: &str,
    series: &[Series],
) -> Result<()> {
    let perr = |m: String| Error::Plot {
        path: path.to_path_buf(),
        msg: m,
    };
    ensure_font().map_err(perr)?;
    let usable = |x: f64, y: f64| x.is_finite() && y.is_finite() && (!xaxis.log || x > 0.0);
    let pts = series.iter().flat_map(|(_, p, _)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts.filter(|(x, y)| usable(*x, *y)) {
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
    let (x0, x1) = if xaxis.log {
        // 5% of the span in log space on each side.
        let (l0, l1) = pad(x0.log10(), x1.log10());
        (10f64.powf(l0), 10f64.powf(l1))
    } else {
        pad(x0, x1)
    };
    let (y0, y1) = pad(y0, y1);
    // The encoder picks the format from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp.png", std::process::id()));
    let longest = series.iter().map(|(n, _, _)| n.chars().count()).max();
    let legend_w = (longest.unwrap_or(0) as u32 * 8 + 60).clamp(120, 340);
    {
        let root = BitMapBackend::new(&tmp, (900 + legend_w, 600)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| perr(e.to_string());
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (left, right) = root.split_horizontally(900);
        let builder = |area| {
            let mut b = ChartBuilder::on(area);
            b.caption(title, ("sans-serif", 22))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(80);
            b
        };
        let xfmt = move |v: &f64| {
            if xaxis.percent {
                format!("{}%", tick(*v))
            } else {
                tick(*v)
            }
        };
        if xaxis.log {
            // Ticks at the data's own x values (budgets such as 3, 6, 12%), where a log axis
            // over less than a decade would otherwise show one label or none.
            let mut keys: Vec<f64> = series
                .iter()
                .flat_map(|(_, p, _)| p.iter().map(|q| q.0))
                .filter(|&x| usable(x, 0.0))
                .collect();
            keys.sort_by(f64::total_cmp);
            keys.dedup();
            // At most about ten labels.
            let step = keys.len().div_ceil(10).max(1);
            let keys: Vec<f64> = keys.iter().copied().step_by(step).collect();
            let mut chart = builder(&left)
                .build_cartesian_2d((x0..x1).log_scale().with_key_points(keys), y0..y1)
                .map_err(|x| e(&x))?;
            draw_chart(&mut chart, (xlabel, &xfmt), ylabel, series, &usable).map_err(|x| e(&x))?;
        } else {
            let mut chart = builder(&left)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|x| e(&x))?;
            draw_chart(&mut chart, (xlabel, &xfmt), ylabel, series, &usable).map_err(|x| e(&x))?;
        }
        legend(&right, series).map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawError<'a> = DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>;

/// The axes, their labels and every series, on a linear or a logarithmic x axis.
fn draw_chart<'a, X>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, RangedCoordf64>>,
    (xlabel, xfmt): (&str, &dyn Fn(&f64) -> String),
    ylabel: &str,
    series: &[Series],
    usable: &dyn Fn(f64, f64) -> bool,
) -> std::result::Result<(), DrawError<'a>>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .x_label_formatter(xfmt)
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (_, p, style)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let p: Vec<(f64, f64)> = p.iter().copied().filter(|&(x, y)| usable(x, y)).collect();
        match style {
            Style::Dashed => {
                chart.draw_series(DashedLineSeries::new(p, 10, 6, color.stroke_width(2)))?;
                continue;
            }
            Style::Line => {
                chart.draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))?;
            }
            Style::Scatter => {}
        }
        chart.draw_series(p.iter().map(|&pt| Circle::new(pt, 4, color.filled())))?;
    }
    Ok(())
}

/// One row per series in the area right of the chart: a sample of its line or marker, its name.
fn legend<'a>(area: &Area<'a>, series: &[Series]) -> std::result::Result<(), DrawError<'a>> {
    for (i, (name, _, style)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let y = 60 + 26 * i as i32;
        match style {
            Style::Dashed => {
                area.draw(&PathElement::new(
                    vec![(0, y), (8, y)],
                    color.stroke_width(2),
                ))?;
                area.draw(&PathElement::new(
                    vec![(14, y), (22, y)],
                    color.stroke_width(2),
                ))?;
            }
            Style::Line => {
                area.draw(&PathElement::new(
                    vec![(0, y), (22, y)],
                    color.stroke_width(2),
                ))?;
                area.draw(&Circle::new((11, y), 4, color.filled()))?;
            }
            Style::Scatter => area.draw(&Circle::new((11, y), 4, color.filled()))?,
        }
        area.draw(&Text::new(
            name.to_string(),
            (30, y - 8),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    Ok(())
}

/// A compact tick label: plain for moderate magnitudes (no trailing zeros: 86, 0.25),
/// scientific otherwise.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e6).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let t = format!("{v:.3}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_carry_no_spurious_decimals() {
        let got: Vec<String> = [86.0, 0.25, 2.5, 12.125, 123.4, 0.0, -3.0, 1e-3, 2.5e7]
            .iter()
            .map(|&v| tick(v))
            .collect();
        assert_eq!(
            got,
            ["86", "0.25", "2.5", "12.125", "123", "0", "-3", "1.00e-3", "2.50e7"]
        );
    }

    #[test]
    fn log_axis_plot_with_a_dashed_baseline_is_written() {
        if ensure_font().is_err() {
            return; // no font on this machine: the error path is tested elsewhere
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let series = [
            (
                "knapsack",
                vec![(3.0, 80.0), (6.0, 84.0), (12.0, 86.0)],
                Style::Line,
            ),
            (
                "baseline (all ReLUs)",
                vec![(3.0, 88.0), (12.0, 88.0)],
                Style::Dashed,
            ),
            ("ignored where x <= 0", vec![(0.0, 1.0)], Style::Scatter),
        ];
        let x = XAxis {
            log: true,
            percent: true,
        };
        xy_plot(&path, "t", ("budget", x), "acc (%)", &series).unwrap();
        let img = image::open(&path).unwrap();
        // The legend column widens the image beyond the 900-pixel chart.
        assert!(img.width() > 900 && img.height() == 600);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 1,
            "temporary left"
        );
    }
}
