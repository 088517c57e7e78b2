//! `brelu iterate`: the iterative knapsack (re-extract on top of the chosen spec, re-solve).
use super::print_json;
use crate::distortion::{extract, Estimator, PlanOptions};
use crate::knapsack::budget_from_ratio;
use crate::knapsack::iterative::{iterate, IterOptions};
use crate::models::Model;
use crate::train;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tch::Device;

#[derive(Args, Debug)]
pub struct IterateArgs {
    /// The one-shot tables the first spec is solved on.
    #[command(flatten)]
    pub measured: super::additivity::MeasuredArgs,
    /// DReLU budget as a fraction of the ReLU count.
    #[arg(long, conflicts_with = "budget", required_unless_present = "budget")]
    pub ratio: Option<f64>,
    /// DReLU budget as a count.
    #[arg(long)]
    pub budget: Option<u64>,
    /// Shrinking schedule: start from the knapsack at this larger ratio and lower the budget
    /// geometrically to the target over the rounds (default: every round at the target).
    #[arg(long)]
    pub start_ratio: Option<f64>,
    /// Re-extractions.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Estimator of the re-extractions (exact or first-order).
    #[arg(long, default_value = "first-order")]
    pub estimator: Estimator,
    /// First-order probes (default: the number of outputs, at most 64).
    #[arg(long)]
    pub probes: Option<usize>,
    /// Samples each round measures on (and the specs are judged on).
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Seed of the sample choice and the probes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Perturbed copies per forward pass (exact).
    #[arg(long, default_value_t = 8)]
    pub stack: usize,
    /// Where to write the spec; `<stem>.iterate.json` (the rounds) goes beside it and the
    /// rounds' extractions under `<stem>.iterate/` (a rerun resumes them).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: IterateArgs) -> Result<()> {
    if a.rounds == 0 || a.samples == 0 || a.batch == 0 || a.stack == 0 {
        bail!("--rounds, --samples, --batch and --stack must be at least 1");
    }
    if a.estimator == Estimator::Snr {
        bail!("--estimator: the iterative knapsack measures against the network's output; use exact or first-order");
    }
    let (cfg, tables, mut model) = a.measured.load()?;
    let relus: u64 = model.sites().iter().map(|s| s.relus() as u64).sum();
    let budget = match (a.ratio, a.budget) {
        (Some(r), _) => budget_from_ratio(relus, r)?,
        (None, Some(b)) => b,
        (None, None) => unreachable!("clap requires one"),
    };
    let start_budget = a
        .start_ratio
        .map(|r| budget_from_ratio(relus, r))
        .transpose()?;
    let samples = extract::training_samples(cfg.source(), a.samples, a.seed)
        .context("choosing the samples")?;
    let make_model = |device: Device| -> crate::error::Result<Model> {
        let mut m = train::build_model(&cfg, device)?;
        m.load_weights(&a.measured.weights)?;
        Ok(m)
    };
    let opts = IterOptions {
        rounds: a.rounds,
        start_budget,
        plan: PlanOptions {
            estimator: a.estimator,
            seed: a.seed,
            batch: a.batch,
            stack: a.stack,
            chunk: a.batch,
            probes: a.probes.unwrap_or(cfg.default_probes()),
            sites: None,
            zero: false,
            skip_unchanged: true,
            baseline: None,
            against_relu: true,
        },
        batch: a.batch,
    };
    let work = a.output.with_extension("iterate");
    let (spec, report) = iterate(
        &mut model,
        &make_model,
        &samples,
        &tables,
        budget,
        &opts,
        &work,
    )?;
    spec.write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let trace = super::beside(&a.output, "iterate.json");
    crate::fs::write_atomic(&trace, serde_json::to_string_pretty(&report)?.as_bytes())?;
    if a.json {
        return print_json(&report);
    }
    for r in &report.rounds {
        println!(
            "round {}: budget {} DReLUs, {} channels changed (penalty {:.3e}), predicted change {:+.4e}, measured {:.4e}{}",
            r.round,
            r.budget,
            r.changed,
            r.penalty,
            r.predicted_change,
            r.measured,
            if r.kept { " (kept)" } else { "" }
        );
    }
    println!(
        "measured distortion {:.4e} (one-shot knapsack) -> {:.4e}; {} DReLUs (budget {})",
        report.start, report.result, report.drelus, report.budget
    );
    println!("wrote {} and {}", a.output.display(), trace.display());
    Ok(())
}
