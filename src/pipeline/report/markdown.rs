//! The text of `report.md`, section by section.
use super::super::{PipelineConfig, Row};
use std::fmt::Write as _;
use std::path::Path;

/// The whole report.
pub(super) fn render(cfg: &PipelineConfig, dir: &Path, rows: &[Row], relus: u64) -> String {
    let mut md = String::new();
    intro(&mut md, cfg, dir, relus);
    accuracy(&mut md, cfg, rows);
    against_bytes(&mut md, cfg, rows);
    numbers(&mut md, cfg, rows, relus);
    closing(&mut md, cfg, dir, rows);
    md
}

/// Title, what was run and how to reproduce it.
fn intro(md: &mut String, cfg: &PipelineConfig, dir: &Path, relus: u64) {
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
}

/// The headline table, its plot and where the knapsack is not ahead.
fn accuracy(md: &mut String, cfg: &PipelineConfig, rows: &[Row]) {
    let metric = cfg.train_config.task().metric_name();
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
}

/// Accuracy against the ReLU layers' bytes, next to accuracy against DReLUs: at a few percent
/// of the DReLUs, the pixel-level multiplications of patches cost more bytes than the DReLUs.
fn against_bytes(md: &mut String, cfg: &PipelineConfig, rows: &[Row]) {
    if !rows
        .iter()
        .any(|r| r.spec.as_ref().is_some_and(|e| e.relu_bytes.is_some()))
    {
        return;
    }
    let metric = cfg.train_config.task().metric_name();
    let _ = writeln!(
        md,
        "## Accuracy against bytes (test {metric}, %)\n\n![accuracy against bytes](accuracy_bytes.png)\n"
    );
    let _ = writeln!(
        md,
        "ReLU-layer bytes per image in brelu's engine (docs/method.md 8.6; the linear layers \
         cost the same whatever the spec). The method `bytes` solves the knapsack on these \
         bytes within those of the knapsack's spec at the same DReLU budget.\n"
    );
    let _ = writeln!(
        md,
        "| spec | DReLUs | ReLU-layer MB/image | {metric} % |\n|---|---|---|---|"
    );
    for r in rows {
        let Some(e) = &r.spec else { continue };
        let Some(b) = e.relu_bytes else { continue };
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.2} |",
            e.name,
            r.drelus,
            b as f64 / 1e6,
            100.0 * r.eval.metric()
        );
    }
    let _ = writeln!(md);
}

/// Every number of every row.
fn numbers(md: &mut String, cfg: &PipelineConfig, rows: &[Row], relus: u64) {
    let seg = cfg.train_config.task() == crate::data::Task::Segmentation;
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
}

/// Test-set sizes, how to re-evaluate a row, the secure-inference and allocation plots.
fn closing(md: &mut String, cfg: &PipelineConfig, dir: &Path, rows: &[Row]) {
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
}

/// The budget x method table of the task's metric (markdown), baseline first; one column per
/// method the run has.
pub fn headline(rows: &[Row]) -> String {
    let methods: Vec<(&str, &str)> = super::METHODS
        .iter()
        .copied()
        .filter(|(m, _)| {
            // The three original methods always have a column (a '-' says a budget is too small).
            !super::optional(m)
                || rows
                    .iter()
                    .any(|r| r.spec.as_ref().is_some_and(|e| e.method == *m))
        })
        .collect();
    let titles: Vec<&str> = methods.iter().map(|m| m.1).collect();
    let mut s = format!(
        "| DReLU budget | {} |\n|---|{}\n",
        titles.join(" | "),
        "---|".repeat(methods.len())
    );
    if let Some(b) = rows.iter().find(|r| r.spec.is_none()) {
        let _ = writeln!(
            s,
            "| all ReLUs ({}) | {:.2} (baseline) |{}",
            b.drelus,
            100.0 * b.eval.metric(),
            " |".repeat(methods.len() - 1)
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
        let cells: Vec<String> = methods.iter().map(|(m, _)| acc(m)).collect();
        let _ = writeln!(
            s,
            "| {:.1}% ({budget}) | {} |",
            100.0 * ratio,
            cells.join(" | ")
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
