//! The report's PNG plots: the metric, bytes and seconds per image against DReLUs for each
//! method, and the knapsack's per-site allocation.
use super::super::Row;
use crate::error::Result;
use crate::plot::{line_plot, xy_plot, Series, Style, XAxis};
use crate::spec::{spec_cost, SiteInfo, Spec};
use std::path::Path;

fn series(
    rows: &[Row],
    method: &str,
    x: &dyn Fn(&Row) -> Option<f64>,
    y: &dyn Fn(&Row) -> Option<f64>,
) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.spec.as_ref().is_some_and(|s| s.method == method))
        .filter_map(|r| Some((x(r)?, y(r)?)))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Every plot of the report, into `dir`.
pub(super) fn write(dir: &Path, rows: &[Row], metric: &str, sites: &[SiteInfo]) -> Result<()> {
    metric_plots(dir, rows, metric)?;
    allocation_plot(dir, rows, sites)
}

/// Metric, bytes and seconds per image against the DReLU budget, one line per method: in % of
/// the network's ReLUs on a log axis (budgets are ratios: 3, 6, 12%), the all-ReLU baseline a
/// dashed line; DReLUs per image on a linear axis when the report has no baseline row.
fn metric_plots(dir: &Path, rows: &[Row], metric: &str) -> Result<()> {
    let base = rows.iter().find(|r| r.spec.is_none());
    let relus = base.map(|b| b.drelus).filter(|&n| n > 0);
    let budget = |r: &Row| match relus {
        Some(n) => Some(100.0 * r.drelus as f64 / n as f64),
        None => Some(r.drelus as f64),
    };
    let xaxis = (
        if relus.is_some() {
            "DReLU budget (% of the network's ReLUs, log scale)"
        } else {
            "DReLUs per image"
        },
        XAxis {
            log: relus.is_some(),
            percent: relus.is_some(),
        },
    );
    let xs: Vec<f64> = rows
        .iter()
        .filter(|r| r.spec.is_some())
        .filter_map(budget)
        .collect();
    let (x0, x1) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let plot = |file: &str,
                title: &str,
                ylabel: &str,
                y: &dyn Fn(&Row) -> Option<f64>,
                with_base: bool|
     -> Result<()> {
        let mut s: Vec<Series> = super::METHODS
            .iter()
            .map(|(m, _)| (*m, series(rows, m, &budget, y), Style::Line))
            .filter(|(_, p, _)| !p.is_empty())
            .collect();
        if with_base {
            if let Some(yb) = base.and_then(y) {
                if x0.is_finite() {
                    let line = vec![(x0, yb), (x1, yb)];
                    s.push(("baseline (all ReLUs)", line, Style::Dashed));
                }
            }
        }
        if s.is_empty() {
            return Ok(());
        }
        xy_plot(&dir.join(file), title, xaxis, ylabel, &s)
    };
    plot(
        "accuracy.png",
        &format!("test {metric} against DReLU budget"),
        &format!("{metric} (%)"),
        &|r| Some(100.0 * r.eval.metric()),
        true,
    )?;
    plot(
        "secure_bytes.png",
        "secure inference: bytes per image",
        "MB per image",
        &|r| r.secure.as_ref().map(|s| s.mean_bytes as f64 / 1e6),
        false,
    )?;
    plot(
        "secure_runtime.png",
        "secure inference: seconds per image (3 parties, this machine)",
        "seconds per image",
        &|r| r.secure.as_ref().map(|s| s.mean_seconds),
        false,
    )?;
    // The metric against the ReLU layers' bytes (the `bytes` method's budget).
    let mb = |r: &Row| r.spec.as_ref()?.relu_bytes.map(|b| b as f64 / 1e6);
    let pct = |r: &Row| Some(100.0 * r.eval.metric());
    let s: Vec<(&str, Vec<(f64, f64)>)> = super::METHODS
        .iter()
        .map(|(m, _)| (*m, series(rows, m, &mb, &pct)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if !s.is_empty() {
        line_plot(
            &dir.join("accuracy_bytes.png"),
            &format!("test {metric} against ReLU-layer bytes"),
            "ReLU-layer MB per image (brelu's engine)",
            &format!("{metric} (%)"),
            &s,
        )?;
    }
    Ok(())
}

/// Per-site allocation of the knapsack specs.
fn allocation_plot(dir: &Path, rows: &[Row], sites: &[SiteInfo]) -> Result<()> {
    let mut alloc: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let Some(e) = r.spec.as_ref().filter(|e| e.method == "knapsack") else {
            continue;
        };
        let spec = Spec::read(&dir.join(&e.file))?;
        let cost = spec_cost(&spec, sites);
        let pts = cost
            .sites
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64, 100.0 * s.drelus as f64 / s.relus.max(1) as f64))
            .collect();
        alloc.push((format!("{:.1}%", 100.0 * e.ratio), pts));
    }
    if !alloc.is_empty() {
        let s: Vec<(&str, Vec<(f64, f64)>)> =
            alloc.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
        line_plot(
            &dir.join("allocation.png"),
            "knapsack: DReLUs kept per site (site index in network order)",
            "site",
            "DReLUs / ReLUs (%)",
            &s,
        )?;
    }
    Ok(())
}
