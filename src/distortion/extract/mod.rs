//! Distortion extraction (docs/method.md section 5): D(site, channel, option) for every site, channel
//! and catalog option, with the exact estimator or a cheaper one.
//!
//! The work is a fixed list of *units*, independent of how it is split: for the exact and SNR
//! estimators a unit is (site, sample batch, channel chunk); for the first-order estimator it
//! is one sample batch (all sites at once, since one backward pass serves every site). A unit
//! writes the *sum over its samples* of the per-sample distortion for its channels as one
//! `.npy` file, atomically. Shard i of n runs the units whose index is i modulo n; a resumed
//! run skips units whose file exists; [`collect`] adds the batches in batch order and divides
//! by the sample count. Every unit's numbers depend only on the job, never on the sharding,
//! the worker count or the resume points, so all of those give byte-identical tables.
//!
//! Layout of an extraction directory:
//! `job.json` (what is computed; every process checks it matches), `units/<site>/b<batch>-c<chunk>.npy`,
//! `shards/<i>-of-<n>.json` (written when a shard finished), and after collection the tables
//! (`manifest.json` + `<site>.npy`, docs/method.md section 10).
//!
//! Files: [`job`] (the job, its units and shards, the directory), [`samples`], [`run`] (a shard
//! over one worker per device), the workers ([`exact`] for the exact and SNR estimators,
//! [`first_order`]), [`collect`]; [`extract()`] does all of it as the CLI and the pipeline do.
mod collect;
mod exact;
mod first_order;
pub mod job;
mod run;
pub mod samples;
mod worker;

pub use collect::collect;
pub use job::{init_dir, plan, Job, JobSite, PlanOptions, Shard, Unit};
pub use run::{run, RunReport};
pub use samples::{held_out_samples, training_samples, Samples};

use crate::error::{Error, Result};
use crate::models::Model;
use crate::spec::Catalog;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;
use tch::Device;

/// How D is computed. Written as its name (`"first-order"`) in files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Estimator {
    /// Mean squared change of the logits, by running the network on from the site.
    Exact,
    /// Squared change at the site's block output over that block's mean squared activation.
    Snr,
    /// |J delta|^2 from probe-vector gradients at the site (one backward pass per probe).
    FirstOrder,
}

impl Estimator {
    pub fn name(self) -> &'static str {
        match self {
            Estimator::Exact => "exact",
            Estimator::Snr => "snr",
            Estimator::FirstOrder => "first-order",
        }
    }
}

impl FromStr for Estimator {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(Estimator::Exact),
            "snr" => Ok(Estimator::Snr),
            "first-order" => Ok(Estimator::FirstOrder),
            _ => Err(format!("expected exact, snr or first-order, got '{s}'")),
        }
    }
}

impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for Estimator {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Estimator> for String {
    fn from(e: Estimator) -> String {
        e.name().to_string()
    }
}

/// An extraction as the CLI and the pipeline run it.
pub struct Extraction<'a> {
    pub dir: &'a Path,
    pub catalog: &'a Catalog,
    pub samples: &'a Samples,
    pub options: &'a PlanOptions,
    pub shard: Shard,
    pub devices: &'a [Device],
    /// Builds a worker's model on a device (weights and baseline spec loaded).
    pub make_model: &'a (dyn Fn(Device) -> Result<Model> + Sync),
    /// When `dir` holds a different job: start it over (`true`) or refuse (`false`).
    pub replace_stale: bool,
    /// Collect the tables after the run.
    pub collect: bool,
    /// Filled while the run goes and cleared when it ends.
    pub progress: Option<&'a indicatif::ProgressBar>,
}

/// What [`extract()`] did.
pub struct Extracted {
    pub job: Job,
    pub run: RunReport,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// With [`Extraction::collect`]: the tables, or why they could not be collected (with
    /// several shards, typically that the others have not finished).
    pub tables: Option<Result<super::DistortionTables>>,
}

/// Initialises `dir` for `job`; a directory holding another job is started over when
/// `replace_stale`, else refused ([`init_dir`]).
pub fn prepare(dir: &Path, job: &Job, replace_stale: bool) -> Result<()> {
    if replace_stale && dir.join("job.json").exists() && init_dir(dir, job).is_err() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    init_dir(dir, job)
}

/// Plans the job on `model` (then dropped), initialises the directory, calls `started` with the
/// job, runs this shard and collects the tables if asked.
pub fn extract(x: &Extraction, model: Model, started: &dyn Fn(&Job)) -> Result<Extracted> {
    let job = plan(&model, x.catalog, x.samples, x.options)?;
    drop(model);
    prepare(x.dir, &job, x.replace_stale)?;
    started(&job);
    let t0 = Instant::now();
    let report = run(
        &job,
        x.dir,
        x.samples,
        x.shard,
        x.devices,
        x.make_model,
        x.progress,
    )?;
    if let Some(pb) = x.progress {
        pb.finish_and_clear();
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Extracted {
        tables: x.collect.then(|| collect(x.dir)),
        job,
        run: report,
        seconds,
    })
}
