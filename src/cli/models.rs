//! `brelu models` and `brelu sites`.
use super::table::{thousands, Table};
use super::{print_json, resolve_model, ModelArgs};
use crate::models::{architectures, sites as model_sites};
use crate::spec::Catalog;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SitesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct ModelRow {
    name: &'static str,
    summary: &'static str,
    input: [usize; 3],
    classes: usize,
    sites: usize,
    channels: usize,
    relus: usize,
}

pub fn models(a: ModelsArgs) -> Result<()> {
    let rows = architectures()
        .iter()
        .map(|arch| {
            let s = model_sites(*arch, arch.default_input())?;
            Ok(ModelRow {
                name: arch.name(),
                summary: arch.summary(),
                input: arch.default_input(),
                classes: arch.default_classes(),
                sites: s.len(),
                channels: s.iter().map(|x| x.channels).sum(),
                relus: s.iter().map(|x| x.relus()).sum(),
            })
        })
        .collect::<crate::error::Result<Vec<_>>>()?;
    if a.json {
        return print_json(&rows);
    }
    let mut t = Table::new(&["model", "input", "classes", "sites", "ReLUs", "description"]).left(5);
    for r in &rows {
        t.row(vec![
            r.name.into(),
            format!("{}x{}x{}", r.input[0], r.input[1], r.input[2]),
            r.classes.to_string(),
            r.sites.to_string(),
            thousands(r.relus as u64),
            r.summary.into(),
        ]);
    }
    println!("{}", t.render());
    Ok(())
}

#[derive(Serialize)]
struct SiteRow {
    name: String,
    channels: usize,
    height: usize,
    width: usize,
    relus: usize,
    /// Catalog options at this site (identity included).
    options: usize,
}

#[derive(Serialize)]
struct SitesReport {
    model: String,
    input: [usize; 3],
    sites: Vec<SiteRow>,
    total_sites: usize,
    total_channels: usize,
    total_relus: usize,
}

pub fn sites(a: SitesArgs) -> Result<()> {
    let (arch, input) = resolve_model(&a.model)?;
    let sites = model_sites(arch, input)
        .with_context(|| format!("model {} cannot run at input {input:?}", arch.name()))?;
    let catalog = Catalog::builtin();
    let report = SitesReport {
        model: arch.name().to_string(),
        input,
        total_sites: sites.len(),
        total_channels: sites.iter().map(|s| s.channels).sum(),
        total_relus: sites.iter().map(|s| s.relus()).sum(),
        sites: sites
            .iter()
            .map(|s| SiteRow {
                name: s.name.clone(),
                channels: s.channels,
                height: s.height,
                width: s.width,
                relus: s.relus(),
                options: catalog.options(s).len(),
            })
            .collect(),
    };
    if a.json {
        return print_json(&report);
    }
    let mut t = Table::new(&["site", "C", "H", "W", "ReLUs", "options"]);
    for s in &report.sites {
        t.row(vec![
            s.name.clone(),
            s.channels.to_string(),
            s.height.to_string(),
            s.width.to_string(),
            thousands(s.relus as u64),
            s.options.to_string(),
        ]);
    }
    println!(
        "{} at input {}x{}x{}",
        report.model, input[0], input[1], input[2]
    );
    println!("{}", t.render());
    println!(
        "{} sites, {} channels, {} ReLUs",
        report.total_sites,
        thousands(report.total_channels as u64),
        thousands(report.total_relus as u64)
    );
    Ok(())
}
