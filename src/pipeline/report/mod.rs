//! `RUN_DIR/report.md` ([`markdown`]) and its PNG plots ([`plots`]).
mod markdown;
mod plots;

pub use markdown::headline;

use super::{PipelineConfig, Row};
use crate::error::Result;
use crate::fs::write_atomic;
use crate::spec::SiteInfo;
use std::path::{Path, PathBuf};

/// The spec methods in report order, with their column titles.
const METHODS: [(&str, &str); 6] = [
    ("knapsack", "knapsack"),
    ("refine", "knapsack + local search"),
    ("iterative", "iterative knapsack"),
    ("bytes", "knapsack on bytes"),
    ("uniform", "uniform"),
    ("per-site", "per-site uniform"),
];

/// Methods that have a column only when the run has them.
fn optional(method: &str) -> bool {
    matches!(method, "refine" | "iterative" | "bytes")
}

/// Plots, then the markdown report; returns the report's path.
pub fn write(
    cfg: &PipelineConfig,
    dir: &Path,
    rows: &[Row],
    relus: u64,
    sites: &[SiteInfo],
) -> Result<PathBuf> {
    // The task's metric: top-1 for classification, mIoU for segmentation.
    let metric = cfg.train_config.task().metric_name();
    plots::write(dir, rows, metric, sites)?;
    let md = markdown::render(cfg, dir, rows, relus);
    let path = dir.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}
