//! `brelu distortion additivity`: the true distortion of whole specs against the sums the
//! knapsack assumed, per spec and per site, with a plot.
use super::print_json;
use super::table::{thousands, Table};
use crate::distortion::{extract, DistortionTables};
use crate::experiment::Experiment;
use crate::knapsack::additivity::{measure, SpecAdditivity};
use crate::models::Model;
use crate::spec::Spec;
use crate::train::Config;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

/// The network and tables that specs are measured on (`additivity`, `refine`, `iterate`).
#[derive(Args, Debug)]
pub struct MeasuredArgs {
    /// Training configuration (TOML) naming the model and data set (samples are chosen from
    /// its training split as `distortion extract` chooses them).
    #[arg(long = "data", visible_alias = "config", short = 'c')]
    pub data: PathBuf,
    /// Trained weights (safetensors): those the tables were extracted with.
    #[arg(long, short)]
    pub weights: PathBuf,
    /// The distortion tables (around the all-ReLU network, as `brelu knapsack` reads them).
    #[arg(long, short)]
    pub distortion: PathBuf,
}

#[derive(Args, Debug)]
pub struct AdditivityArgs {
    #[command(flatten)]
    pub measured: MeasuredArgs,
    /// Spec files to measure (repeat, or comma-separate; e.g. one per budget of a sweep).
    #[arg(long = "spec", value_delimiter = ',', required = true)]
    pub specs: Vec<PathBuf>,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Seed of the sample choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Skip the per-site measurements (one forward pass per changed site and spec).
    #[arg(long)]
    pub no_sites: bool,
    /// Output directory: additivity.json and additivity.png.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl MeasuredArgs {
    /// The configuration, the distortion tables (checked to be of its model) and the model
    /// with the weights the tables were extracted with: what measuring specs needs.
    pub(super) fn load(&self) -> Result<(Experiment, DistortionTables, Model)> {
        let cfg = Config::load(&self.data).context("reading the data configuration")?;
        let tables = DistortionTables::read(&self.distortion)?;
        if tables.model != cfg.model {
            bail!(
                "{}: the tables are for {}, the configuration's model is {}",
                self.distortion.display(),
                tables.model,
                cfg.model
            );
        }
        let exp = Experiment::of_config(&cfg).with_weights(Some(&self.weights));
        let model = exp.load_model()?;
        Ok((exp, tables, model))
    }
}

pub fn run(a: AdditivityArgs) -> Result<()> {
    let (exp, tables, mut model) = a.measured.load()?;
    let specs = a
        .specs
        .iter()
        .map(|p| {
            let s = Spec::load(p, model.name(), model.config().input, model.sites())?;
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            Ok((name.unwrap_or_default(), s))
        })
        .collect::<crate::error::Result<Vec<_>>>()?;
    let samples = extract::training_samples(exp.data()?.source(), a.samples, a.seed)
        .context("choosing the samples")?;
    let rows = measure(&mut model, &samples, a.batch, &tables, &specs, !a.no_sites)?;
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let json = serde_json::to_string_pretty(&rows)?;
    crate::fs::write_atomic(&a.output.join("additivity.json"), json.as_bytes())?;
    plot(&a.output.join("additivity.png"), &rows)?;
    if a.json {
        return print_json(&rows);
    }
    report(&rows);
    println!(
        "wrote additivity.json and additivity.png to {}",
        a.output.display()
    );
    Ok(())
}

/// log10 of measured against log10 of assumed, the whole specs and each site, with y = x.
fn plot(path: &std::path::Path, rows: &[SpecAdditivity]) -> Result<()> {
    let log = |v: f64| if v > 0.0 { v.log10() } else { f64::NAN };
    let specs: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (log(r.assumed), log(r.measured)))
        .collect();
    let sites: Vec<(f64, f64)> = rows
        .iter()
        .flat_map(|r| r.sites.iter().map(|s| (log(s.assumed), log(s.measured))))
        .collect();
    let finite = specs
        .iter()
        .chain(&sites)
        .flat_map(|p| [p.0, p.1])
        .filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    let diag = if lo.is_finite() {
        vec![(lo, lo), (hi, hi)]
    } else {
        Vec::new()
    };
    use crate::plot::Style;
    crate::plot::xy_plot(
        path,
        "additivity: measured against assumed distortion",
        (
            "log10 assumed (sum of the channels' table entries)",
            Default::default(),
        ),
        "log10 measured (all channels switched at once)",
        &[
            ("whole specs (one per budget)", specs, Style::Line),
            ("one site alone", sites, Style::Scatter),
            ("measured = assumed", diag, Style::Dashed),
        ],
    )?;
    Ok(())
}

fn report(rows: &[SpecAdditivity]) {
    let mut t = Table::new(&[
        "spec",
        "DReLUs",
        "ratio",
        "assumed",
        "measured",
        "measured/assumed",
    ]);
    for r in rows {
        t.row(vec![
            r.name.clone(),
            thousands(r.drelus as u64),
            format!("{:.2}%", 100.0 * r.drelus as f64 / r.relus.max(1) as f64),
            format!("{:.4e}", r.assumed),
            format!("{:.4e}", r.measured),
            format!("{:.3}", r.measured / r.assumed),
        ]);
    }
    println!("{}", t.render());
    for r in rows.iter().filter(|r| !r.sites.is_empty()) {
        let mut t = Table::new(&["site", "assumed", "measured", "measured/assumed"]).left(1);
        for s in &r.sites {
            t.row(vec![
                s.site.clone(),
                format!("{:.4e}", s.assumed),
                format!("{:.4e}", s.measured),
                format!("{:.3}", s.measured / s.assumed),
            ]);
        }
        println!("{}: each site alone\n{}", r.name, t.render());
    }
}
