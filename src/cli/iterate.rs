//! `brelu iterate`: the iterative knapsack (re-extract on top of the chosen spec, re-solve).
use super::print_json;
use crate::distortion::{extract, Estimator, Settings};
use crate::knapsack::budget_from_ratio;
use crate::knapsack::iterative::{iterate, IterOptions};
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
    /// How each round re-measures (the estimator exact or first-order).
    #[command(flatten)]
    pub settings: Settings,
    /// Where to write the spec; `<stem>.iterate.json` (the rounds) goes beside it and the
    /// rounds' extractions under `<stem>.iterate/` (a rerun resumes them).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: IterateArgs) -> Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if let Some(k) = a.settings.zero_field() {
        bail!("--{k} must be at least 1");
    }
    if a.settings.estimator == Estimator::Snr {
        bail!("--estimator: the iterative knapsack measures against the network's output; use exact or first-order");
    }
    let (exp, tables, mut model) = a.measured.load()?;
    let cfg = exp.data()?;
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
    let samples = extract::training_samples(cfg.source(), a.settings.samples, a.settings.seed)
        .context("choosing the samples")?;
    let make_model = |device: Device| exp.model_on(device);
    let opts = IterOptions {
        rounds: a.rounds,
        start_budget,
        plan: a.settings.plan_options(cfg),
        batch: a.settings.batch,
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
