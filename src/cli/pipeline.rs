//! `brelu pipeline`: every stage of the method in one resumable run directory.
use crate::pipeline::{self, report, PipelineConfig};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// Pipeline configuration (TOML, e.g. configs/demo.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Run directory (default: runs/<config name>). Running again skips finished stages.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Stop after a stage group (baseline, distortion, specs, finetune), e.g. to inspect the
    /// specs before fine-tuning; the next run continues from there.
    #[arg(long, value_parser = ["baseline", "distortion", "specs", "finetune"])]
    pub stop_after: Option<String>,
    /// cpu, cuda or cuda:N for every stage (default: the configuration's `device`, else cpu).
    /// Under torchrun or srun each rank takes its GPU (`cuda`), trains and fine-tunes
    /// data-parallel, extracts its shard of the distortion units and evaluates its share of
    /// the test split; rank 0 solves the knapsack, runs secure inference (on the CPU) and
    /// writes the report while the others wait. The run directory must be on a file system
    /// every rank sees.
    #[arg(long)]
    pub device: Option<crate::ops::DeviceChoice>,
    /// A training image that cannot be decoded: error (stop, naming the file) or substitute
    /// (replace it, warn and count it); default: the configuration's `bad_images`, else error.
    #[arg(long, value_enum)]
    pub bad_images: Option<crate::data::BadImages>,
}

pub fn run(a: PipelineArgs) -> Result<()> {
    let mut cfg = PipelineConfig::load(&a.config).context("reading the pipeline configuration")?;
    let device = a.device.or(cfg.device_setting).unwrap_or_default();
    // Under torchrun or srun every rank runs every stage the way the stage runs alone.
    let (device, group) = crate::dist::Group::from_env(device)?;
    let leader = group.as_ref().is_none_or(|g| g.is_leader());
    cfg.device = device;
    cfg.bad_images = a.bad_images.unwrap_or(cfg.bad_images);
    cfg.group = group;
    cfg.progress = leader;
    let dir = a.output.clone().unwrap_or_else(|| {
        let stem = a
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into());
        PathBuf::from("runs").join(stem)
    });
    let t0 = std::time::Instant::now();
    let log = |m: &str| eprintln!("{m}");
    let out = pipeline::run(&cfg, &dir, a.stop_after.as_deref(), &log)
        .with_context(|| format!("pipeline {}", dir.display()))?;
    if !leader {
        return Ok(());
    }
    if !out.times.is_empty() {
        eprintln!("stage times:");
        for (stage, s) in &out.times {
            eprintln!("  {stage:<28} {:>12}", pipeline::duration_text(*s));
        }
    }
    let Some(rep) = out.report else {
        eprintln!(
            "stopped after {}; run the same command again to continue",
            out.stopped_after.unwrap_or_default()
        );
        return Ok(());
    };
    println!("{}", report::headline(&out.rows));
    eprintln!(
        "{} stage(s) run, the rest up to date; {:.1} s. Report: {}",
        out.ran.len(),
        t0.elapsed().as_secs_f64(),
        rep.display()
    );
    Ok(())
}
