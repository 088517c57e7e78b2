//! `brelu distortion ...`: extract, collect, compare and plot distortion tables.
use super::{print_json, ModelArgs};
use crate::distortion::extract::{self, Extracted, Extraction, Job};
use crate::distortion::{collect, DistortionTables, PlanOptions, Settings, Shard};
use crate::experiment::Experiment;
use crate::hash::fnv_hex;
use crate::knapsack::budget_from_ratio;
use crate::knapsack::compare::compare;
use crate::models::{find, sites as model_sites};
use crate::ops::DeviceChoice;
use crate::spec::{Catalog, PatchOption, Spec};
use crate::train::Config;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Subcommand, Debug)]
pub enum DistortionCommand {
    /// Measure D(site, channel, option) of a trained network on samples of its training set
    /// (docs/method.md section 5). Resumable: run the same command again after a kill. Shardable:
    /// `--shard i/n` in n processes (or SLURM / Kubernetes indexed jobs), then `collect`.
    Extract(Box<ExtractArgs>),
    /// Check that every shard of an extraction finished and agrees, then write the tables.
    Collect(CollectArgs),
    /// Compare two sets of tables of one model (e.g. a fast estimator against exact): per-site
    /// Spearman rank correlation and what choosing with the first costs as the second measures.
    Compare(CompareArgs),
    /// PNG plots of tables: per-site heatmaps (channel x option) and distortion against cost.
    Plot(PlotArgs),
    /// Is distortion additive? The true distortion of whole specs (all channels switched at
    /// once) and of each site's part, against the sum of table entries the knapsack assumed;
    /// writes additivity.json and a plot.
    Additivity(Box<super::additivity::AdditivityArgs>),
    /// Write synthetic tables over a model's real sites and catalog (distortion growing with
    /// patch area, identity the largest), to try the knapsack without a trained network.
    Synthetic(SyntheticArgs),
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// Training configuration (TOML) naming the model and data set; the samples are a seeded
    /// subset of its training split with the evaluation transform.
    #[arg(long = "data", visible_alias = "config", short = 'c')]
    pub data: PathBuf,
    /// Model name; must match the configuration's (default: the configuration's).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Trained weights (safetensors).
    #[arg(long, short, required_unless_present = "random_init")]
    pub weights: Option<PathBuf>,
    /// Use freshly initialised weights (seeded by the configuration) instead of --weights:
    /// for benchmarks and smoke tests only.
    #[arg(long, conflicts_with = "weights")]
    pub random_init: bool,
    #[command(flatten)]
    pub settings: Settings,
    /// Measure on top of this spec (default: ordinary ReLU everywhere).
    #[arg(long)]
    pub baseline_spec: Option<PathBuf>,
    /// With --baseline-spec: measure each change against the all-ReLU network, i.e. how much
    /// switching one channel changes the whole baseline spec's distortion (negative entries
    /// are improvements). The iterative knapsack (`brelu iterate`) solves
    /// on such tables.
    #[arg(long, requires = "baseline_spec")]
    pub against_relu: bool,
    /// Only these sites (comma-separated names; see `brelu sites`).
    #[arg(long, value_delimiter = ',')]
    pub sites: Option<Vec<String>>,
    /// Also measure the "zero" option (channel removed).
    #[arg(long)]
    pub zero: bool,
    /// Run every (sample, perturbation) row, even those whose activation is unchanged (for
    /// benchmarks; the result differs only by rounding noise where D is 0).
    #[arg(long)]
    pub no_skip: bool,
    /// Patch-size catalog (JSON; default: the built-in one).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Run only shard i of n (0-based), e.g. 2/8. Without it the shard comes from the
    /// environment, first found of: SLURM_ARRAY_TASK_ID (array jobs), JOB_COMPLETION_INDEX
    /// (Kubernetes indexed jobs), RANK / WORLD_SIZE (torchrun), SLURM_PROCID / SLURM_NTASKS
    /// (srun with several tasks).
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Shard count when the index comes from the environment (default: SLURM_ARRAY_TASK_COUNT,
    /// WORLD_SIZE or SLURM_NTASKS).
    #[arg(long)]
    pub shard_count: Option<usize>,
    /// Devices, one worker each: cpu (default), cuda:0,cuda:1, ...
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<DeviceChoice>,
    /// Do not write the tables at the end even when every unit is done.
    #[arg(long)]
    pub no_collect: bool,
    /// Extraction directory (units, job.json, and the tables).
    #[arg(long, short)]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct CollectArgs {
    /// Extraction directory.
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Tables whose choices are judged (e.g. a fast estimator).
    pub a: PathBuf,
    /// Reference tables (e.g. exact).
    pub b: PathBuf,
    /// DReLU budget for the knapsack part as a fraction of the ReLUs of the sites A has
    /// tables for (other sites keep their ReLUs).
    #[arg(long, default_value_t = 0.06, conflicts_with = "budget")]
    pub ratio: f64,
    /// DReLU budget as an absolute count.
    #[arg(long)]
    pub budget: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Tables directory (manifest.json + <site>.npy).
    pub dir: PathBuf,
    /// Output directory for the PNGs (default: DIR/plots).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
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
        DistortionCommand::Extract(a) => extract_cmd(*a),
        DistortionCommand::Collect(a) => {
            let t = collect(&a.dir).context("collecting the extraction")?;
            println!(
                "wrote {} site tables and manifest.json to {}",
                t.sites.len(),
                a.dir.display()
            );
            Ok(())
        }
        DistortionCommand::Compare(a) => compare_cmd(a),
        DistortionCommand::Plot(a) => plot_cmd(a),
        DistortionCommand::Additivity(a) => super::additivity::run(*a),
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

/// The shard of this process: `--shard`, else the scheduler's environment, else all.
fn resolve_shard(a: &ExtractArgs) -> Result<(Shard, Option<&'static str>)> {
    if let Some(s) = a.shard {
        return Ok((s, None));
    }
    let env_u = |k: &str| -> Result<Option<usize>> {
        match std::env::var(k) {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .with_context(|| format!("environment variable {k}={v}: expected an integer")),
            Err(_) => Ok(None),
        }
    };
    let (index, count, from) = if let Some(id) = env_u("SLURM_ARRAY_TASK_ID")? {
        let min = env_u("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let count = a.shard_count.or(env_u("SLURM_ARRAY_TASK_COUNT")?);
        (id.saturating_sub(min), count, "SLURM_ARRAY_TASK_ID")
    } else if let Some(id) = env_u("JOB_COMPLETION_INDEX")? {
        (id, a.shard_count, "JOB_COMPLETION_INDEX")
    } else if let (Some(r), Some(w)) = (env_u("RANK")?, env_u("WORLD_SIZE")?) {
        // torchrun: the launcher script of a data-parallel fine-tune serves this stage too.
        (r, Some(a.shard_count.unwrap_or(w)), "RANK")
    } else if let (Some(r), Some(w @ 2..)) = (env_u("SLURM_PROCID")?, env_u("SLURM_NTASKS")?) {
        (r, Some(a.shard_count.unwrap_or(w)), "SLURM_PROCID")
    } else {
        return Ok((Shard::ALL, None));
    };
    let Some(count) = count else {
        bail!("{from} is set but the shard count is unknown: pass --shard-count N");
    };
    if index >= count {
        bail!("{from} gives shard {index}, but there are only {count} shards");
    }
    Ok((Shard { index, count }, Some(from)))
}

fn extract_cmd(a: ExtractArgs) -> Result<()> {
    let cfg = Config::load(&a.data).context("reading the data configuration")?;
    if let Some(m) = &a.model {
        if find(m)?.name() != cfg.model {
            bail!(
                "--model {m} differs from the configuration's model {} ({})",
                cfg.model,
                a.data.display()
            );
        }
    }
    let (shard, shard_from) = resolve_shard(&a)?;
    if let Some(k) = a.settings.zero_field() {
        bail!("--{k} must be at least 1");
    }
    let devices: Vec<Device> = if a.devices.is_empty() {
        vec![Device::Cpu]
    } else {
        a.devices
            .iter()
            .map(|d| d.resolve(None))
            .collect::<crate::error::Result<_>>()?
    };
    let catalog = match &a.catalog {
        Some(p) => {
            Catalog::from_file(p).with_context(|| format!("reading catalog {}", p.display()))?
        }
        None => Catalog::builtin(),
    };
    let baseline_text = match &a.baseline_spec {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    // The spec is read once: its text is what the job's hash names.
    let baseline = match (&a.baseline_spec, &baseline_text) {
        (Some(p), Some(text)) => Some(Spec::from_json_str(text, Some(p))?),
        _ => None,
    };
    let exp = Experiment::of_config(&cfg).with_weights(a.weights.as_deref());
    let make_model = |device: Device| exp.model_with(device, baseline.as_ref());
    let model = make_model(Device::Cpu).with_context(|| match &a.weights {
        Some(w) => format!("loading {} with weights {}", cfg.model, w.display()),
        None => format!("building {}", cfg.model),
    })?;
    if a.random_init {
        eprintln!("warning: --random-init: measuring a freshly initialised network");
    }
    let samples = extract::training_samples(cfg.source(), a.settings.samples, a.settings.seed)
        .context("choosing the samples")?;
    let opts = PlanOptions {
        sites: a.sites.clone(),
        zero: a.zero,
        skip_unchanged: !a.no_skip,
        baseline: baseline_text.as_ref().map(|t| fnv_hex(t.bytes())),
        against_relu: a.against_relu,
        ..a.settings.plan_options(&cfg)
    };
    let pb = crate::progress::bar(true, 0, "extraction", "units");
    let x = Extraction {
        dir: &a.output,
        catalog: &catalog,
        samples: &samples,
        options: &opts,
        shard,
        devices: &devices,
        make_model: &make_model,
        replace_stale: false,
        collect: !a.no_collect,
        progress: Some(&pb),
    };
    // Only errors of the run itself name the directory (planning errors read better alone).
    let started = Cell::new(false);
    let announce = |job: &Job| {
        started.set(true);
        announce_job(job, shard, shard_from);
    };
    let done = match extract::extract(&x, model, &announce) {
        Ok(done) => done,
        Err(e) if started.get() => {
            return Err(e).with_context(|| format!("extracting into {}", a.output.display()))
        }
        Err(e) => return Err(e.into()),
    };
    finish(&a.output, shard, done)
}

/// What the run did, and the tables or why they are not collected yet.
fn finish(output: &Path, shard: Shard, done: Extracted) -> Result<()> {
    let (r, secs) = (&done.run, done.seconds);
    eprintln!(
        "{} of {} units computed in {secs:.1} s ({} already done); {:.0} evaluations/s",
        r.computed,
        r.units,
        r.units - r.computed,
        r.evaluations as f64 / secs.max(1e-9)
    );
    match done.tables {
        None => Ok(()),
        Some(Ok(t)) => {
            eprintln!(
                "tables ({} sites) in {}: feed them to `brelu knapsack -m {} -d {} --ratio 0.06 -o spec.json`",
                t.sites.len(),
                output.display(),
                t.model,
                output.display()
            );
            Ok(())
        }
        Some(Err(e)) if shard.count > 1 => {
            eprintln!("shard done; not collecting yet: {e}");
            Ok(())
        }
        Some(Err(e)) => Err(e).context("collecting the tables"),
    }
}

/// The line printed when the run starts: what is measured, and which shard.
fn announce_job(job: &Job, shard: Shard, shard_from: Option<&str>) {
    let evals_total: usize = job
        .sites
        .values()
        .map(|s| s.shape[0] * s.options.len())
        .sum::<usize>()
        * job.samples;
    eprintln!(
        "{} estimator on {} ({} sites, {} samples in batches of {}, {} (channel, option, sample) \
         evaluations){}",
        job.estimator,
        job.model,
        job.sites.len(),
        job.samples,
        job.batch,
        evals_total,
        match shard_from {
            Some(f) => format!("; shard {}/{} from {f}", shard.index, shard.count),
            None if shard.count > 1 => format!("; shard {}/{}", shard.index, shard.count),
            None => String::new(),
        }
    );
}

fn read_tables(p: &Path) -> Result<DistortionTables> {
    DistortionTables::read(p).with_context(|| format!("reading distortion tables {}", p.display()))
}

fn compare_cmd(a: CompareArgs) -> Result<()> {
    let (ta, tb) = (read_tables(&a.a)?, read_tables(&a.b)?);
    let arch = find(&ta.model)?;
    let sites = model_sites(arch, ta.input)?;
    // Sites without a table keep their ReLUs; the ratio applies to the sites A covers.
    let (covered, fixed) = sites.iter().fold((0u64, 0u64), |(c, f), s| {
        if ta.sites.contains_key(&s.name) {
            (c + s.relus() as u64, f)
        } else {
            (c, f + s.relus() as u64)
        }
    });
    let budget = match a.budget {
        Some(b) => b,
        None => fixed + budget_from_ratio(covered, a.ratio)?,
    };
    let c = compare(
        &ta,
        &tb,
        &sites,
        budget,
        crate::knapsack::DEFAULT_MAX_MEMORY,
    )?;
    if a.json {
        return print_json(&serde_json::json!({
            "a": a.a, "b": a.b, "comparison": c, "ratio": c.ratio(),
        }));
    }
    let mut table = super::table::Table::new(&["site", "entries", "spearman"]).left(0);
    for s in &c.sites {
        table.row(vec![
            s.site.clone(),
            s.entries.to_string(),
            format!("{:.3}", s.spearman),
        ]);
    }
    print!("{}", table.render());
    let finite: Vec<f64> = c
        .sites
        .iter()
        .map(|s| s.spearman)
        .filter(|v| v.is_finite())
        .collect();
    println!(
        "mean Spearman {:.3}, min {:.3}",
        finite.iter().sum::<f64>() / finite.len().max(1) as f64,
        finite.iter().copied().fold(f64::INFINITY, f64::min)
    );
    println!(
        "knapsack at {budget} DReLUs: B's distortion of A's choice {:.6e}, of B's own choice \
         {:.6e} (ratio {:.4})",
        c.b_objective_of_a_solution,
        c.b_objective_of_b_solution,
        c.ratio()
    );
    Ok(())
}

fn plot_cmd(a: PlotArgs) -> Result<()> {
    let t = read_tables(&a.dir)?;
    let out = a.output.unwrap_or_else(|| a.dir.join("plots"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut series = Vec::new();
    for (name, s) in &t.sites {
        let (h, w) = (s.shape[1], s.shape[2]);
        let labels: Vec<String> = s.options.iter().map(|o| o.to_string()).collect();
        let rows: Vec<Vec<f64>> = (0..s.channels())
            .map(|c| (0..s.options.len()).map(|k| s.get(c, k)).collect())
            .collect();
        crate::plot::heatmap(
            &out.join(format!("heatmap_{name}.png")),
            &format!("{name}: log10 distortion ({} estimator)", t.estimator),
            "option",
            "channel",
            &labels,
            &rows,
        )?;
        // Mean over channels against the fraction of ReLUs kept, cheapest option last.
        let mut pts: Vec<(f64, f64)> = s
            .options
            .iter()
            .enumerate()
            .filter(|(_, o)| **o != PatchOption::Zero)
            .map(|(k, o)| {
                let mean =
                    (0..s.channels()).map(|c| s.get(c, k)).sum::<f64>() / s.channels() as f64;
                (
                    o.drelus(h, w) as f64 / (h * w) as f64,
                    mean.max(1e-30).log10(),
                )
            })
            .filter(|(_, y)| *y > -30.0)
            .collect();
        pts.sort_by(|x, y| x.0.total_cmp(&y.0));
        series.push((name.as_str(), pts));
    }
    crate::plot::line_plot(
        &out.join("distortion_vs_cost.png"),
        "mean distortion per option against DReLUs kept",
        "DReLUs per ReLU",
        "log10 mean distortion",
        &series,
    )?;
    println!("wrote {} plots to {}", t.sites.len() + 1, out.display());
    Ok(())
}
