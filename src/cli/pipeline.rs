//! `brelu pipeline`: every stage of the method in one resumable run directory.
use crate::pipeline::{self, report, PipelineConfig};
use anyhow::{Context, Result};
use clap::Args;
use std::io::IsTerminal;
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
}

pub fn run(a: PipelineArgs) -> Result<()> {
    if let Some(l) = crate::dist::Launch::from_env()? {
        anyhow::bail!(
            "brelu pipeline runs in one process, but this is rank {} of {} ({} variables): \
             every rank would run the whole pipeline into the same directory. Launch \
             `brelu train` / `brelu finetune` data-parallel instead (docs/cluster.md)",
            l.rank,
            l.world,
            l.source
        );
    }
    let mut cfg = PipelineConfig::load(&a.config).context("reading the pipeline configuration")?;
    cfg.progress = std::io::stderr().is_terminal();
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
