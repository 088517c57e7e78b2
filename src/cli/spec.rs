//! `brelu spec ...`: make and inspect spec files.
use super::table::{human_bytes, thousands, Table};
use super::{print_json, resolve_model, ModelArgs};
use crate::models::sites as model_sites;
use crate::spec::{spec_cost, PatchOption, Spec};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum SpecCommand {
    /// DReLUs a spec uses against the original network, per site, and predicted bytes.
    Stats(StatsArgs),
    /// Write a spec with the same option at every channel (a baseline to compare against).
    Uniform(UniformArgs),
    /// Convert a spec saved by the published code (a pickle of layer name -> [channels, 2]
    /// patch sizes, [0,1] = identity, [1,0] = zero) into brelu's spec JSON, checking every
    /// layer, channel count and option against the model.
    ImportPublished(ImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The published spec file (`.pickle`).
    pub file: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write brelu's spec JSON.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the spec's statistics as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Architecture name (see `brelu models`).
    #[arg(long, short)]
    pub model: String,
    /// The spec file (JSON, docs/method.md section 10).
    #[arg(long, short)]
    pub spec: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct UniformArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The option for every channel: BHxBW (e.g. 2x2), relu, identity or zero. A patch larger
    /// than a site's map is clipped to the map.
    #[arg(long, value_parser = parse_option)]
    pub patch: PatchOption,
    /// Where to write the spec.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the spec's statistics as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_option(s: &str) -> std::result::Result<PatchOption, String> {
    PatchOption::parse(s)
        .ok_or_else(|| format!("expected BHxBW (e.g. 2x2), relu, identity or zero, got '{s}'"))
}

pub fn run(c: SpecCommand) -> Result<()> {
    match c {
        SpecCommand::Stats(a) => stats(a),
        SpecCommand::Uniform(a) => uniform(a),
        SpecCommand::ImportPublished(a) => import(a),
    }
}

fn import(a: ImportArgs) -> Result<()> {
    let (arch, input) = resolve_model(&a.model)?;
    let sites = model_sites(arch, input)?;
    let spec = crate::spec::import_published(&a.file, arch.name(), input, &sites)?;
    spec.write(&a.output)?;
    if !a.json {
        println!("wrote {}", a.output.display());
    }
    report(&spec, &sites, a.json)
}

fn stats(a: StatsArgs) -> Result<()> {
    let arch = crate::models::find(&a.model)?;
    let spec = Spec::read(&a.spec)?;
    let sites = model_sites(arch, spec.input).with_context(|| {
        format!(
            "{}: model {} cannot run at the spec's input {:?}",
            a.spec.display(),
            arch.name(),
            spec.input
        )
    })?;
    spec.validate(arch.name(), spec.input, &sites)?;
    report(&spec, &sites, a.json)
}

fn uniform(a: UniformArgs) -> Result<()> {
    let (arch, input) = resolve_model(&a.model)?;
    let sites = model_sites(arch, input)?;
    if sites.is_empty() {
        bail!("{} has no ReLU sites", arch.name());
    }
    let spec = Spec::uniform(arch.name(), input, &sites, a.patch);
    spec.write(&a.output)?;
    if !a.json {
        println!("wrote {}", a.output.display());
    }
    report(&spec, &sites, a.json)
}

fn report(spec: &Spec, sites: &[crate::spec::SiteInfo], json: bool) -> Result<()> {
    let cost = spec_cost(spec, sites);
    if json {
        return print_json(&cost);
    }
    let mut t = Table::new(&[
        "site", "shape", "ReLUs", "DReLUs", "ratio", "share", "identity", "zero",
    ]);
    for s in &cost.sites {
        t.row(vec![
            s.site.clone(),
            format!("{}x{}x{}", s.shape[0], s.shape[1], s.shape[2]),
            thousands(s.relus as u64),
            thousands(s.drelus as u64),
            format!("{:.2}%", 100.0 * s.drelus as f64 / s.relus.max(1) as f64),
            format!(
                "{:.1}%",
                100.0 * s.drelus as f64 / cost.drelus.max(1) as f64
            ),
            s.identity_channels.to_string(),
            s.zero_channels.to_string(),
        ]);
    }
    println!("{}", t.render());
    println!(
        "{} at {:?}: {} DReLUs of {} ReLUs ({:.3}%)",
        cost.model,
        cost.input,
        thousands(cost.drelus as u64),
        thousands(cost.relus as u64),
        100.0 * cost.ratio
    );
    println!(
        "predicted ReLU-layer bytes per image: {} in brelu's engine ({} with all ReLUs); \
         published models: {} Porthos-style ({}), {} SecureNN-style ({})",
        human_bytes(cost.bytes_engine),
        human_bytes(cost.original_bytes_engine),
        human_bytes(cost.bytes_porthos),
        human_bytes(cost.original_bytes_porthos),
        human_bytes(cost.bytes_securenn),
        human_bytes(cost.original_bytes_securenn)
    );
    Ok(())
}
