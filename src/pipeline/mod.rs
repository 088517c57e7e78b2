//! The whole method in one run directory: baseline -> distortion -> specs (knapsack and two
//! uniform baselines per budget) -> fine-tune -> evaluate -> secure inference -> report.
//!
//! Every stage records `stages/<stage>.json` with a hash of its inputs (its configuration and
//! the hashes of the outputs it reads) and a hash of its outputs. A stage whose record matches
//! is skipped; a changed input re-runs that stage, which changes its output hash and so
//! re-runs the stages after it. Stages that take long (training, extraction) resume inside
//! themselves, so a killed pipeline continues where it stopped.
pub mod config;
pub mod report;
mod runner;
mod stages;

pub use config::PipelineConfig;
pub use runner::{duration_text, StageRecord};

use crate::data::Split;
use crate::error::Result;
use crate::train;
use runner::{read_json, write_json, Runner};
use serde::{Deserialize, Serialize};
use stages::{Network, TestSet};
use std::path::{Path, PathBuf};

/// A spec of the sweep: method ("knapsack", "uniform", "per-site", and the extra methods
/// "refine", "iterative", "bytes") at a budget.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SpecEntry {
    pub name: String,
    pub method: String,
    /// The requested budget as a fraction of the ReLUs (for absolute budgets: budget/ReLUs).
    pub ratio: f64,
    pub budget: u64,
    pub drelus: u64,
    /// Predicted total distortion (from the tables; `None` when the spec uses an option the
    /// tables lack, e.g. a uniform 3x3 patch on a map whose catalog has no 3x3).
    pub distortion: Option<f64>,
    /// Bytes per image of the ReLU layers in brelu's engine (docs/method.md 8.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relu_bytes: Option<u64>,
    /// The method `bytes`: its budget in ReLU-layer bytes per image (that of the knapsack's
    /// spec at the same DReLU budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_budget: Option<u64>,
    pub file: PathBuf,
}

/// One row of the final table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub spec: Option<SpecEntry>,
    pub drelus: u64,
    pub eval: train::EvalResult,
    pub secure: Option<SecureSummary>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SecureSummary {
    pub images: usize,
    pub agree_plaintext: usize,
    pub mean_seconds: f64,
    pub mean_bytes: u64,
    pub setup_bytes: u64,
}

/// Progress messages go here (stderr in the CLI, nowhere in tests).
pub type Log<'a> = &'a dyn Fn(&str);

/// What [`run`] did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Stages run now (the others were up to date).
    pub ran: Vec<String>,
    /// Seconds of each stage run now, in order.
    pub times: Vec<(String, f64)>,
    pub rows: Vec<Row>,
    /// `None` when the run stopped early.
    pub report: Option<PathBuf>,
    pub stopped_after: Option<String>,
}

/// Runs (or resumes) the pipeline of `cfg` in `dir`. `stop_after` ends the run after the
/// named stage group: "baseline", "distortion", "specs", or "finetune" (after the first
/// fine-tuned spec).
pub fn run(
    cfg: &PipelineConfig,
    dir: &Path,
    stop_after: Option<&str>,
    log: Log,
) -> Result<Outcome> {
    let mut r = Runner::new(dir, log, cfg.group.clone());
    let stop = |s: &str| stop_after == Some(s);
    let base = stages::baseline(&mut r, cfg)?;
    if stop("baseline") {
        return Ok(r.stopped("baseline"));
    }
    let dist_hash = stages::distortion(&mut r, cfg, &base)?;
    if stop("distortion") {
        return Ok(r.stopped("distortion"));
    }
    let net = Network::load(cfg, &base)?;
    let specs_path = stages::specs(&mut r, cfg, &base, &net, &dist_hash)?;
    if stop("specs") {
        return Ok(r.stopped("specs"));
    }
    let specs: Vec<SpecEntry> = read_json(&specs_path)?;
    let ft_cfg = &cfg.finetune_config;
    let test = TestSet {
        data: ft_cfg.source().load_split(Split::Test)?,
        norm: ft_cfg.dataset.normalization(),
        batch: ft_cfg.eval_batch_size.unwrap_or(ft_cfg.batch_size),
    };
    let mut rows = Vec::new();
    // The baseline network first, then every spec.
    for entry in std::iter::once(None).chain(specs.into_iter().map(Some)) {
        rows.push(stages::row(&mut r, cfg, &base, &net, &test, entry)?);
        if stop("finetune") && rows.len() > 1 {
            return Ok(r.stopped("finetune"));
        }
    }
    // 7. Report, by rank 0 (the others wait, so every rank ends with it written).
    let report = match r.leader() {
        true => {
            let rep = report::write(cfg, dir, &rows, net.relus, &net.sites)?;
            write_json(&dir.join("results.json"), &rows)?;
            Some(rep)
        }
        false => None,
    };
    r.barrier()?;
    Ok(Outcome {
        ran: r.ran,
        times: r.times,
        rows,
        report,
        stopped_after: None,
    })
}
