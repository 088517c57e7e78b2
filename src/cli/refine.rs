//! `brelu refine`: local search on measured distortion from a knapsack spec.
use super::print_json;
use crate::distortion::extract;
use crate::knapsack::local::{search, SearchOptions};
use crate::spec::Spec;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RefineArgs {
    /// The tables propose the moves; measurements decide them.
    #[command(flatten)]
    pub measured: super::additivity::MeasuredArgs,
    /// The starting spec (e.g. the knapsack's).
    #[arg(long, short)]
    pub spec: PathBuf,
    /// DReLU budget as a fraction of the ReLU count (default: the starting spec's own cost).
    #[arg(long, conflicts_with = "budget")]
    pub ratio: Option<f64>,
    /// DReLU budget as a count.
    #[arg(long)]
    pub budget: Option<u64>,
    /// Moves to try (one forward pass over the samples each).
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Random channels considered to pay for each upgrade.
    #[arg(long, default_value_t = 64)]
    pub candidates: usize,
    /// Samples the moves are judged on: training images after the tables' own in their
    /// seeded order, so held out from what the tables measured.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Seed of the proposed moves.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Where to write the improved spec; `<stem>.search.json` (the search's trace) goes beside.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the search report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: RefineArgs) -> Result<()> {
    if a.steps == 0 || a.samples == 0 || a.batch == 0 || a.candidates == 0 {
        bail!("--steps, --samples, --batch and --candidates must be at least 1");
    }
    let (exp, tables, mut model) = a.measured.load()?;
    let start = Spec::load(&a.spec, model.name(), model.config().input, model.sites())
        .with_context(|| format!("loading spec {}", a.spec.display()))?;
    let cost = crate::spec::spec_cost(&start, model.sites());
    let budget = match (a.ratio, a.budget) {
        (Some(r), _) => crate::knapsack::budget_from_ratio(cost.relus as u64, r)?,
        (None, Some(b)) => b,
        (None, None) => cost.drelus as u64,
    };
    let samples = extract::held_out_samples(
        exp.data()?.source(),
        a.samples,
        tables.seed,
        tables.samples as usize,
    )
    .context("choosing the held-out samples")?;
    let opts = SearchOptions {
        steps: a.steps,
        candidates: a.candidates,
        seed: a.seed,
        batch: a.batch,
    };
    let (spec, report) = search(&mut model, &samples, &tables, &start, budget, &opts)?;
    spec.write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let trace = super::beside(&a.output, "search.json");
    crate::fs::write_atomic(&trace, serde_json::to_string_pretty(&report)?.as_bytes())?;
    if a.json {
        return print_json(&report);
    }
    println!(
        "measured distortion {:.4e} -> {:.4e} ({:.1}% lower) after {} of {} moves; DReLUs {} -> {} \
         (budget {})",
        report.start,
        report.result,
        100.0 * (1.0 - report.result / report.start.max(f64::MIN_POSITIVE)),
        report.accepted,
        report.steps,
        report.drelus_start,
        report.drelus,
        report.budget
    );
    println!("wrote {} and {}", a.output.display(), trace.display());
    Ok(())
}
