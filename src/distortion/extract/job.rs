//! The job: what an extraction computes (`job.json`), its units and shards, and the directory
//! that holds them.
use super::{Estimator, Samples};
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use crate::models::Model;
use crate::spec::{Catalog, PatchOption};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// One site of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSite {
    /// Index of the site in the model.
    pub index: usize,
    /// [C, H, W] of the activation.
    pub shape: [usize; 3],
    pub options: Vec<PatchOption>,
    /// Channels per unit.
    pub chunk: usize,
}

/// Everything that determines the numbers of an extraction. Stored as `job.json`; processes
/// (shards, resumed runs) refuse to add to a directory whose job differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub model: String,
    pub input: [usize; 3],
    pub model_hash: String,
    /// Hash of the baseline spec (`None`: ordinary ReLU everywhere).
    pub baseline: Option<String>,
    pub estimator: String,
    pub samples: usize,
    pub seed: u64,
    /// Hash of the sample images (after the evaluation transform).
    pub samples_hash: String,
    /// Samples per unit.
    pub batch: usize,
    /// Perturbed copies per forward pass (exact and SNR).
    pub stack: usize,
    /// Probe vectors (first-order).
    pub probes: usize,
    /// Skip (sample, perturbation) rows whose site activation equals the baseline's (their D is
    /// exactly 0) instead of running them (exact and SNR).
    pub skip_unchanged: bool,
    /// Measure against the all-ReLU network instead of the baseline (see
    /// [`PlanOptions::against_relu`]). Left out of `job.json` when false, so jobs written
    /// before the field existed keep their hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub against_relu: bool,
    pub sites: IndexMap<String, JobSite>,
}

/// Settings of [`plan`].
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub estimator: Estimator,
    pub seed: u64,
    pub batch: usize,
    pub stack: usize,
    pub chunk: usize,
    pub probes: usize,
    /// Restrict to these sites (default: all).
    pub sites: Option<Vec<String>>,
    /// Add the zero option to every site's list.
    pub zero: bool,
    /// See [`Job::skip_unchanged`].
    pub skip_unchanged: bool,
    /// Hash of the baseline spec applied to the model, if any.
    pub baseline: Option<String>,
    /// D(c, o) becomes the change of the whole baseline spec's distortion against the
    /// *all-ReLU* network when channel c alone switches to o:
    /// E[mean (f_{S,c->o} - f)^2 - mean (f_S - f)^2], computed as E[mean d (d + 2 e)] with
    /// d = f_{S,c->o} - f_S and e = f_S - f, so a small change is not lost next to a large
    /// e. Negative entries are improvements. The iterative knapsack solves on these
    /// (`knapsack::iterative`); exact and first-order estimators only.
    pub against_relu: bool,
}

/// The job for `model` (with its baseline spec applied) on `samples`.
pub fn plan(model: &Model, catalog: &Catalog, samples: &Samples, o: &PlanOptions) -> Result<Job> {
    if samples.is_empty() {
        return Err(Error::InvalidArgument("no samples to measure on".into()));
    }
    let input = model.config().input;
    if samples.shape[1..] != input {
        return Err(Error::InvalidArgument(format!(
            "samples are {:?} images, the model takes {input:?}",
            &samples.shape[1..]
        )));
    }
    for (what, v) in [("batch", o.batch), ("stack", o.stack), ("chunk", o.chunk)] {
        if v == 0 {
            return Err(Error::InvalidArgument(format!("{what} must be at least 1")));
        }
    }
    if o.against_relu && o.estimator == Estimator::Snr {
        return Err(Error::InvalidArgument(
            "measuring against the all-ReLU network needs the exact or first-order estimator \
             (SNR compares block outputs, not the network's)"
                .into(),
        ));
    }
    if o.estimator == Estimator::FirstOrder && o.probes == 0 {
        return Err(Error::InvalidArgument("probes must be at least 1".into()));
    }
    if let Some(want) = &o.sites {
        if let Some(bad) = want.iter().find(|n| model.site_index(n).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "{} has no site '{bad}' (see `brelu sites --model {}`)",
                model.name(),
                model.name()
            )));
        }
    }
    let mut sites = IndexMap::new();
    for (index, s) in model.sites().iter().enumerate() {
        if o.sites.as_ref().is_some_and(|w| !w.contains(&s.name)) {
            continue;
        }
        let mut options = catalog.options(s);
        if o.zero && !options.contains(&PatchOption::Zero) {
            options.push(PatchOption::Zero);
        }
        let chunk = match o.estimator {
            Estimator::FirstOrder => s.channels,
            _ => o.chunk.min(s.channels),
        };
        sites.insert(
            s.name.clone(),
            JobSite {
                index,
                shape: [s.channels, s.height, s.width],
                options,
                chunk,
            },
        );
    }
    Ok(Job {
        model: model.name().to_string(),
        input,
        model_hash: model.param_hash(),
        baseline: o.baseline.clone(),
        estimator: o.estimator.name().to_string(),
        samples: samples.len(),
        samples_hash: samples.hash(),
        seed: o.seed,
        batch: o.batch.min(samples.len()),
        stack: o.stack,
        probes: if o.estimator == Estimator::FirstOrder {
            o.probes
        } else {
            0
        },
        skip_unchanged: o.skip_unchanged && o.estimator != Estimator::FirstOrder,
        against_relu: o.against_relu,
        sites,
    })
}

/// One unit of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Index into `Job::sites`; `None` = every site (first-order).
    pub site: Option<usize>,
    pub batch: usize,
    pub chunk: usize,
}

impl Job {
    pub fn estimator(&self) -> Result<Estimator> {
        self.estimator.parse().map_err(Error::InvalidArgument)
    }

    pub fn batches(&self) -> usize {
        self.samples.div_ceil(self.batch)
    }

    pub(super) fn chunks(&self, s: &JobSite) -> usize {
        s.shape[0].div_ceil(s.chunk)
    }

    /// Every unit in canonical order (site, batch, chunk).
    pub fn units(&self) -> Vec<Unit> {
        if self.estimator == Estimator::FirstOrder.name() {
            return (0..self.batches())
                .map(|batch| Unit {
                    site: None,
                    batch,
                    chunk: 0,
                })
                .collect();
        }
        let mut v = Vec::new();
        for (si, s) in self.sites.values().enumerate() {
            for batch in 0..self.batches() {
                for chunk in 0..self.chunks(s) {
                    v.push(Unit {
                        site: Some(si),
                        batch,
                        chunk,
                    });
                }
            }
        }
        v
    }

    /// The unit files a unit writes.
    pub(super) fn unit_files(&self, dir: &Path, u: Unit) -> Vec<PathBuf> {
        let one = |name: &str, chunk: usize| {
            dir.join("units")
                .join(name)
                .join(format!("b{:05}-c{chunk:04}.npy", u.batch))
        };
        match u.site {
            Some(si) => vec![one(self.sites.get_index(si).expect("unit site").0, u.chunk)],
            None => self.sites.keys().map(|n| one(n, 0)).collect(),
        }
    }

    pub(super) fn unit_done(&self, dir: &Path, u: Unit) -> bool {
        self.unit_files(dir, u).iter().all(|p| p.exists())
    }

    /// Cheap content hash of the job.
    pub fn hash(&self) -> String {
        crate::hash::of_json(self)
    }
}

/// A shard: index `i` (0-based) of `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;
    /// `i/n` with 0 <= i < n.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("expected a shard as i/n with 0 <= i < n (e.g. 0/4), got '{s}'");
        let (a, b) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = a.trim().parse().map_err(|_| bad())?;
        let count: usize = b.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };
}

/// The first top-level field where two JSON objects differ, as "field: a vs b".
pub(super) fn first_difference(a: &serde_json::Value, b: &serde_json::Value) -> String {
    if let (Some(x), Some(y)) = (a.as_object(), b.as_object()) {
        for (k, va) in x {
            let vb = y.get(k).unwrap_or(&serde_json::Value::Null);
            if va != vb {
                let short = |v: &serde_json::Value| {
                    let s = v.to_string();
                    if s.len() > 60 {
                        format!("{}...", &s[..60])
                    } else {
                        s
                    }
                };
                return format!("'{k}' is {} vs {}", short(va), short(vb));
            }
        }
    }
    "contents differ".into()
}

pub(super) fn read_job(path: &Path) -> Result<Job> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::parse(path, format!("not a brelu job file: {e}")))
}

/// Creates `dir/job.json`, or checks that the one there describes the same job.
pub fn init_dir(dir: &Path, job: &Job) -> Result<()> {
    let path = dir.join("job.json");
    if path.exists() {
        let old = read_job(&path)?;
        if &old != job {
            let diff = first_difference(
                &serde_json::to_value(job).expect("job serialises"),
                &serde_json::to_value(&old).expect("job serialises"),
            );
            return Err(Error::InvalidArgument(format!(
                "{} holds a different extraction ({diff} in {}); use another output directory",
                dir.display(),
                path.display()
            )));
        }
        return Ok(());
    }
    let text = serde_json::to_string_pretty(job).expect("job serialises");
    write_atomic(&path, text.as_bytes())
}
