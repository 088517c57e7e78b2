//! `brelu distortion ...`: distortion tables.
use super::ModelArgs;
use crate::distortion::DistortionTables;
use crate::models::sites as model_sites;
use crate::spec::Catalog;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum DistortionCommand {
    /// Write synthetic tables over a model's real sites and catalog (distortion growing with
    /// patch area, identity the largest), to try the knapsack without a trained network.
    Synthetic(SyntheticArgs),
}

#[derive(Args, Debug)]
pub struct SyntheticArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed of the synthetic values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (manifest.json + one <site>.npy per site).
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn run(c: DistortionCommand) -> Result<()> {
    match c {
        DistortionCommand::Synthetic(a) => {
            let (arch, input) = super::resolve_model(&a.model)?;
            let sites = model_sites(arch, input)?;
            let t = DistortionTables::synthetic(
                arch.name(),
                input,
                &sites,
                &Catalog::builtin(),
                a.seed,
            );
            t.write(&a.output)
                .with_context(|| format!("writing {}", a.output.display()))?;
            println!(
                "wrote synthetic tables for {} sites to {}",
                sites.len(),
                a.output.display()
            );
            Ok(())
        }
    }
}
