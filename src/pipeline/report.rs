//! `RUN_DIR/report.md` and its PNG plots.
use super::{PipelineConfig, Row};
use crate::error::{write_atomic, Result};
use crate::plot::line_plot;
use crate::spec::{spec_cost, SiteInfo, Spec};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const METHODS: [&str; 3] = ["knapsack", "uniform", "per-site"];

fn series(rows: &[Row], method: &str, y: impl Fn(&Row) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.spec.as_ref().is_some_and(|s| s.method == method))
        .filter_map(|r| y(r).map(|y| (r.drelus as f64, y)))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Plots, then the markdown report; returns the report's path.
pub fn write(
    cfg: &PipelineConfig,
    dir: &Path,
    rows: &[Row],
    relus: u64,
    sites: &[SiteInfo],
) -> Result<PathBuf> {
    let base = rows.iter().find(|r| r.spec.is_none());
    // The task's metric: top-1 for classification, mIoU for segmentation.
    let metric = cfg.train_config.task().metric_name();
    let seg = cfg.train_config.task() == crate::data::Task::Segmentation;
    let xs: Vec<f64> = rows
        .iter()
        .filter(|r| r.spec.is_some())
        .map(|r| r.drelus as f64)
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
        let mut s: Vec<(&str, Vec<(f64, f64)>)> = METHODS
            .iter()
            .map(|m| (*m, series(rows, m, y)))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if with_base {
            if let Some(yb) = base.and_then(y) {
                if x0.is_finite() {
                    s.push(("baseline (all ReLUs)", vec![(x0, yb), (x1, yb)]));
                }
            }
        }
        if s.is_empty() {
            return Ok(());
        }
        line_plot(&dir.join(file), title, "DReLUs per image", ylabel, &s)
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
    // Per-site allocation of the knapsack specs.
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

    let mut md = String::new();
    let _ = writeln!(md, "# brelu pipeline report\n");
    let _ = writeln!(
        md,
        "Configuration `{}` (baseline recipe `{}`, fine-tune recipe `{}`), model `{}` at {:?}, \
         {} ReLUs per image. Distortion: {} estimator on {} training samples.\n",
        cfg.path.display(),
        cfg.train_path.display(),
        cfg.finetune_path.display(),
        cfg.train_config.model,
        cfg.train_config.input,
        relus,
        cfg.distortion.estimator,
        cfg.distortion.samples
    );
    let _ = writeln!(
        md,
        "Reproduce: `brelu pipeline --config {} -o {}`\n",
        cfg.path.display(),
        dir.display()
    );
    let _ = writeln!(md, "## Accuracy against DReLU budget (test {metric}, %)\n");
    let _ = writeln!(md, "{}", headline(rows));
    let _ = writeln!(md, "![accuracy](accuracy.png)\n");
    let _ = writeln!(
        md,
        "A '-' means the baseline cannot meet that budget: a uniform patch spends at least one \
         DReLU per channel of every site.\n"
    );
    let notes = shortfalls(rows);
    if !notes.is_empty() {
        let _ = writeln!(md, "Where the knapsack is not ahead of both baselines:\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        let _ = writeln!(
            md,
            "\nLikely causes: the fine-tune is short (the demo runs one short epoch per spec), so \
             accuracy differences of a few tenths are within run-to-run noise; the distortion \
             tables come from {} on {} samples, which ranks options well (see BENCHMARKS.md) but \
             is not the exact estimator; and the knapsack minimises summed per-channel distortion, \
             which ignores interactions between channels.\n",
            cfg.distortion.estimator, cfg.distortion.samples
        );
    }
    let _ = writeln!(md, "## Every number\n");
    let (m1, m2) = if seg {
        ("mIoU %", "pixel acc. %")
    } else {
        ("top-1 %", "top-5 %")
    };
    let _ = writeln!(
        md,
        "| spec | method | budget | DReLUs | DReLUs % | predicted distortion | {m1} | {m2} | loss | secure MB/image | secure s/image | secure = plaintext |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (name, method, budget, dist) = match &r.spec {
            Some(e) => (
                e.name.clone(),
                e.method.clone(),
                e.budget.to_string(),
                e.distortion
                    .map(|d| format!("{d:.4e}"))
                    .unwrap_or_else(|| "-".into()),
            ),
            None => ("baseline".into(), "all ReLU".into(), "-".into(), "0".into()),
        };
        let (mb, secs, agree) = match &r.secure {
            Some(s) => (
                format!("{:.2}", s.mean_bytes as f64 / 1e6),
                format!("{:.2}", s.mean_seconds),
                format!("{}/{}", s.agree_plaintext, s.images),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            md,
            "| {name} | {method} | {budget} | {} | {:.2} | {dist} | {:.2} | {:.2} | {:.4} | {mb} | {secs} | {agree} |",
            r.drelus,
            100.0 * r.drelus as f64 / relus as f64,
            100.0 * r.eval.metric(),
            100.0 * if seg { r.eval.top1 } else { r.eval.top5 },
            r.eval.loss
        );
    }
    let _ = writeln!(
        md,
        "\nTest images: {} per evaluation; secure inference: {} test images per spec, all three \
         parties on this machine over loopback TCP, exact 64-bit DReLU, weight masks opened once \
         per session (not counted per image).\n",
        rows.first().map(|r| r.eval.images).unwrap_or(0),
        cfg.secure.images
    );
    let _ = writeln!(md, "Evaluate one row again: `brelu eval --config {} --weights {}/finetune/<spec>/checkpoint.safetensors --spec {}/specs/<spec>.json`\n",
        cfg.finetune_path.display(), dir.display(), dir.display());
    let _ = writeln!(
        md,
        "## Secure inference\n\n![bytes](secure_bytes.png)\n\n![runtime](secure_runtime.png)\n"
    );
    let _ = writeln!(
        md,
        "## Where the knapsack spends DReLUs\n\n![allocation](allocation.png)\n"
    );
    let path = dir.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// The budget x method table of the task's metric (markdown), baseline first.
pub fn headline(rows: &[Row]) -> String {
    let mut s = String::from(
        "| DReLU budget | knapsack | uniform | per-site uniform |\n|---|---|---|---|\n",
    );
    if let Some(b) = rows.iter().find(|r| r.spec.is_none()) {
        let _ = writeln!(
            s,
            "| all ReLUs ({}) | {:.2} (baseline) | | |",
            b.drelus,
            100.0 * b.eval.metric()
        );
    }
    let mut budgets: Vec<(f64, u64)> = rows
        .iter()
        .filter_map(|r| r.spec.as_ref().map(|e| (e.ratio, e.budget)))
        .collect();
    budgets.sort_by_key(|b| b.1);
    budgets.dedup_by_key(|b| b.1);
    for (ratio, budget) in budgets {
        let acc = |m: &str| {
            rows.iter()
                .find(|r| {
                    r.spec
                        .as_ref()
                        .is_some_and(|e| e.method == m && e.budget == budget)
                })
                .map(|r| format!("{:.2}", 100.0 * r.eval.metric()))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            s,
            "| {:.1}% ({budget}) | {} | {} | {} |",
            100.0 * ratio,
            acc("knapsack"),
            acc("uniform"),
            acc("per-site")
        );
    }
    s
}

/// Budgets where the knapsack's metric is below a baseline's.
fn shortfalls(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rows {
        let Some(e) = r.spec.as_ref().filter(|e| e.method == "knapsack") else {
            continue;
        };
        for m in ["uniform", "per-site"] {
            if let Some(o) = rows.iter().find(|o| {
                o.spec
                    .as_ref()
                    .is_some_and(|x| x.method == m && x.budget == e.budget)
            }) {
                if o.eval.metric() > r.eval.metric() {
                    out.push(format!(
                        "{:.1}%: knapsack {:.2}% < {m} {:.2}%",
                        100.0 * e.ratio,
                        100.0 * r.eval.metric(),
                        100.0 * o.eval.metric()
                    ));
                }
            }
        }
    }
    out
}
