//! Distortion extraction (SPEC.md section 5): D(site, channel, option) for every site, channel
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
//! (`manifest.json` + `<site>.npy`, SPEC.md section 10).
use super::tables::{DistortionTables, SiteTable};
use crate::data::Rng;
use crate::error::{write_atomic, Error, Result};
use crate::models::Model;
use crate::npy;
use crate::ops;
use crate::spec::{Catalog, PatchOption};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// How D is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

pub use crate::hash::fnv_hex;

/// The sample images of an extraction: float32 [N, C, H, W] on the CPU, evaluation transform
/// applied. Kept as plain data so every worker can put them on its own device.
#[derive(Clone, Debug)]
pub struct Samples {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl Samples {
    pub fn from_tensor(x: &Tensor) -> Result<Samples> {
        let s = x.size();
        if s.len() != 4 {
            return Err(Error::InvalidArgument(format!(
                "samples must be [N, C, H, W], got {s:?}"
            )));
        }
        let data =
            Vec::<f32>::try_from(x.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))?;
        Ok(Samples {
            shape: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize],
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    pub fn hash(&self) -> String {
        fnv_hex(self.data.iter().flat_map(|v| v.to_le_bytes()))
    }

    /// Samples `lo..hi` as a tensor on `device`.
    fn batch(&self, lo: usize, hi: usize, device: Device) -> Tensor {
        let per = self.shape[1] * self.shape[2] * self.shape[3];
        Tensor::from_slice(&self.data[lo * per..hi * per])
            .view([
                (hi - lo) as i64,
                self.shape[1] as i64,
                self.shape[2] as i64,
                self.shape[3] as i64,
            ])
            .to_device(device)
    }
}

/// The samples of SPEC.md section 5: a seeded subset of `cfg`'s training split, in a seeded
/// order, with the evaluation transform (normalisation only).
pub fn training_samples(cfg: &crate::train::Config, n: usize, seed: u64) -> Result<Samples> {
    let data = crate::train::load_split(cfg, crate::data::Split::Train)?;
    if n == 0 || n > data.len() {
        return Err(Error::InvalidArgument(format!(
            "{n} samples requested: the training split has {} images (need 1..={})",
            data.len(),
            data.len()
        )));
    }
    let mut order: Vec<i64> = (0..data.len() as i64).collect();
    Rng::for_epoch(seed, 0, 7).shuffle(&mut order);
    order.truncate(n);
    let x = data.select(&order)?;
    Samples::from_tensor(&crate::train::normalization(cfg.dataset.kind).apply(&x))
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

    fn chunks(&self, s: &JobSite) -> usize {
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
    fn unit_files(&self, dir: &Path, u: Unit) -> Vec<PathBuf> {
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

    fn unit_done(&self, dir: &Path, u: Unit) -> bool {
        self.unit_files(dir, u).iter().all(|p| p.exists())
    }

    /// Cheap content hash of the job.
    pub fn hash(&self) -> String {
        fnv_hex(
            serde_json::to_string(self)
                .expect("job serialises")
                .into_bytes(),
        )
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
fn first_difference(a: &serde_json::Value, b: &serde_json::Value) -> String {
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

fn read_job(path: &Path) -> Result<Job> {
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

/// What a call of [`run`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// Units of this shard.
    pub units: usize,
    /// Units computed now (the rest were already done).
    pub computed: usize,
    /// Perturbed (channel, option, sample) evaluations computed now.
    pub evaluations: u64,
}

/// Runs shard `shard` of `job` into `dir` (created by [`init_dir`]) with one worker per entry
/// of `devices`; each worker gets its model from `make_model(device)` (weights and baseline
/// spec loaded). A killed run leaves only whole unit files, so running again resumes it.
pub fn run(
    job: &Job,
    dir: &Path,
    samples: &Samples,
    shard: Shard,
    devices: &[Device],
    make_model: &(dyn Fn(Device) -> Result<Model> + Sync),
    progress: Option<&indicatif::ProgressBar>,
) -> Result<RunReport> {
    if samples.len() != job.samples || samples.hash() != job.samples_hash {
        return Err(Error::InvalidArgument(
            "the samples differ from the job's (data set, seed or count changed)".into(),
        ));
    }
    let mine: Vec<Unit> = job
        .units()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % shard.count == shard.index)
        .map(|(_, u)| u)
        .collect();
    let todo: Vec<Unit> = mine
        .iter()
        .copied()
        .filter(|u| !job.unit_done(dir, *u))
        .collect();
    if let Some(pb) = progress {
        pb.set_length(mine.len() as u64);
        pb.set_position((mine.len() - todo.len()) as u64);
        pb.reset_eta();
    }
    let devices = if devices.is_empty() {
        &[Device::Cpu][..]
    } else {
        devices
    };
    let workers = devices.len().min(todo.len()).max(1);
    let results: Vec<Result<(usize, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let todo = &todo;
                let device = devices[w];
                scope.spawn(move || -> Result<(usize, u64)> {
                    let model = make_model(device)?;
                    if model.param_hash() != job.model_hash {
                        return Err(Error::InvalidArgument(format!(
                            "the model on {device:?} differs from the job's (weights changed?)"
                        )));
                    }
                    let mut worker = Worker::new(job, &model, samples, device)?;
                    let (mut done, mut evals) = (0, 0);
                    for u in todo.iter().skip(w).step_by(workers) {
                        evals += worker.unit(dir, *u)?;
                        done += 1;
                        if let Some(pb) = progress {
                            pb.inc(1);
                        }
                    }
                    Ok((done, evals))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::InvalidArgument("a worker panicked".into())))
            })
            .collect()
    });
    let mut report = RunReport {
        units: mine.len(),
        computed: 0,
        evaluations: 0,
    };
    for r in results {
        let (d, e) = r?;
        report.computed += d;
        report.evaluations += e;
    }
    if mine.iter().all(|u| job.unit_done(dir, *u)) {
        let rec = serde_json::json!({
            "shard": [shard.index, shard.count],
            "units": mine.len(),
            "job": job,
        });
        write_atomic(
            &dir.join("shards")
                .join(format!("{}-of-{}.json", shard.index, shard.count)),
            serde_json::to_string_pretty(&rec)
                .expect("shard record serialises")
                .as_bytes(),
        )?;
    }
    Ok(report)
}

/// Cached values of the last (site, batch) a worker touched.
struct SiteCache {
    key: (usize, usize),
    state: crate::models::SiteState,
    /// The site's baseline activation.
    base: Tensor,
    /// The clean output (logits, or the block output for SNR) [n, ...].
    clean: Tensor,
    /// SNR: per-sample mean squared clean block output.
    power: Vec<f64>,
}

struct Worker<'a> {
    job: &'a Job,
    model: &'a Model,
    samples: &'a Samples,
    device: Device,
    estimator: Estimator,
    cache: Option<SiteCache>,
}

impl<'a> Worker<'a> {
    fn new(job: &'a Job, model: &'a Model, samples: &'a Samples, device: Device) -> Result<Self> {
        Ok(Worker {
            job,
            model,
            samples,
            device,
            estimator: job.estimator()?,
            cache: None,
        })
    }

    fn batch_range(&self, b: usize) -> (usize, usize) {
        let lo = b * self.job.batch;
        (lo, (lo + self.job.batch).min(self.job.samples))
    }

    /// Computes and writes one unit; returns the number of perturbed evaluations.
    fn unit(&mut self, dir: &Path, u: Unit) -> Result<u64> {
        match u.site {
            Some(si) => {
                let _guard = tch::no_grad_guard();
                self.site_unit(dir, si, u)
            }
            None => self.first_order_unit(dir, u),
        }
    }

    /// The baseline option of every channel of a site.
    fn baseline(&self, index: usize, channels: usize) -> Vec<PatchOption> {
        self.model
            .site_options(index)
            .map(<[_]>::to_vec)
            .unwrap_or_else(|| vec![PatchOption::RELU; channels])
    }

    fn activate(&self, index: usize, z: &Tensor) -> Tensor {
        match self.model.site_options(index) {
            None => z.relu(),
            Some(o) => ops::block_relu(z, o),
        }
    }

    fn site_unit(&mut self, dir: &Path, si: usize, u: Unit) -> Result<u64> {
        let site = &self.job.sites[si];
        let (lo, hi) = self.batch_range(u.batch);
        let n = hi - lo;
        let stop = match self.estimator {
            Estimator::Snr => self.model.block_output_op(site.index),
            _ => self.model.graph().ops.len() - 1,
        };
        if self.cache.as_ref().map(|c| c.key) != Some((site.index, u.batch)) {
            self.cache = None; // free the old one first
            let x = self.samples.batch(lo, hi, self.device);
            let state = self.model.prefix(&x, site.index);
            let base = self.activate(site.index, &state.pre);
            let clean = self
                .model
                .forward_from_to(&state, &base, stop)
                .to_kind(Kind::Double)
                .reshape([n as i64, -1]);
            let power = if self.estimator == Estimator::Snr {
                Vec::<f64>::try_from(clean.square().mean_dim(1, false, Kind::Double))?
            } else {
                vec![1.0; n]
            };
            self.cache = Some(SiteCache {
                key: (site.index, u.batch),
                state,
                base,
                clean,
                power,
            });
        }
        let cache = self.cache.as_ref().expect("cache filled");
        let baseline = self.baseline(site.index, site.shape[0]);
        let c0 = u.chunk * site.chunk;
        let c1 = (c0 + site.chunk).min(site.shape[0]);
        let nopt = site.options.len();
        let mut sums = vec![0.0f64; (c1 - c0) * nopt];
        // Perturbations that can change anything: the baseline's own option gives D = 0.
        let pairs: Vec<(usize, usize)> = (c0..c1)
            .flat_map(|c| (0..nopt).map(move |k| (c, k)))
            .filter(|&(c, k)| site.options[k] != baseline[c])
            .collect();
        let all_relu = self.model.site_options(site.index).is_none();
        for group in pairs.chunks(self.job.stack) {
            let perts: Vec<(usize, PatchOption)> =
                group.iter().map(|&(c, k)| (c, site.options[k])).collect();
            let j = group.len() as i64;
            let mut act = ops::f_simulate(&cache.state.pre, &perts)?;
            if !all_relu {
                // Copy j is the baseline except channel c_j.
                let sz = cache.base.size();
                let mut sel = vec![false; group.len() * sz[1] as usize];
                for (i, &(c, _)) in group.iter().enumerate() {
                    sel[i * sz[1] as usize + c] = true;
                }
                let sel = Tensor::from_slice(&sel)
                    .view([j, 1, sz[1], 1, 1])
                    .to_device(self.device);
                let mut full = vec![j];
                full.extend_from_slice(&sz);
                act = act
                    .view(full.as_slice())
                    .where_self(&sel, &cache.base.unsqueeze(0))
                    .view([j * sz[0], sz[1], sz[2], sz[3]]);
            }
            // Rows (copy i, sample x) in copy-major order; with `skip_unchanged`, only those
            // whose activation differs from the baseline: the others have D = 0 exactly.
            let rows: Vec<usize> = if self.job.skip_unchanged {
                let sz = cache.base.size();
                let actv = act.view([j, n as i64, sz[1], sz[2], sz[3]]);
                let mut changed = Vec::with_capacity(group.len());
                for (i, &(c, _)) in group.iter().enumerate() {
                    let a = actv.get(i as i64).select(1, c as i64);
                    let b = cache.base.select(1, c as i64);
                    changed.push(a.ne_tensor(&b).flatten(1, -1).any_dim(1, false));
                }
                let changed = Vec::<bool>::try_from(Tensor::cat(&changed, 0))?;
                (0..changed.len()).filter(|&r| changed[r]).collect()
            } else {
                (0..group.len() * n).collect()
            };
            if rows.is_empty() {
                continue;
            }
            let (out, clean) = if rows.len() == group.len() * n {
                let out = self.model.forward_rows(&cache.state, &act, None, stop);
                let clean = cache.clean.repeat([j, 1]);
                (out, clean)
            } else {
                let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                let idx = Tensor::from_slice(&idx).to_device(self.device);
                let sample: Vec<i64> = rows.iter().map(|&r| (r % n) as i64).collect();
                let sample = Tensor::from_slice(&sample).to_device(self.device);
                let out = self.model.forward_rows(
                    &cache.state,
                    &act.index_select(0, &idx),
                    Some(&sample),
                    stop,
                );
                (out, cache.clean.index_select(0, &sample))
            };
            let d = (out.to_kind(Kind::Double).reshape([rows.len() as i64, -1]) - clean)
                .square()
                .mean_dim(1, false, Kind::Double);
            let d = Vec::<f64>::try_from(d)?;
            // Per pair, samples are added in sample order whatever was skipped.
            for (&r, x) in rows.iter().zip(&d) {
                let (c, k) = group[r / n];
                let p = cache.power[r % n];
                sums[(c - c0) * nopt + k] += if p > 0.0 { x / p } else { *x };
            }
        }
        let path = &self.job.unit_files(dir, u)[0];
        npy::write_f64(path, &[c1 - c0, nopt], &sums)?;
        Ok((pairs.len() * n) as u64)
    }

    fn first_order_unit(&mut self, dir: &Path, u: Unit) -> Result<u64> {
        let (lo, hi) = self.batch_range(u.batch);
        let n = hi - lo;
        let x = self
            .samples
            .batch(lo, hi, self.device)
            .set_requires_grad(true);
        let (out, sites) = self.model.forward_with_sites(&x);
        let out = out.reshape([n as i64, -1]);
        let k_out = out.size()[1] as usize;
        let basis = self.job.probes >= k_out;
        let probes = if basis { k_out } else { self.job.probes };
        // E[(r.v)^2] = |v|^2 for Rademacher r; the basis sums instead. Then the mean over
        // output elements.
        let weight = if basis { 1.0 } else { 1.0 / probes as f64 } / k_out as f64;
        let chosen: Vec<(&JobSite, &(Tensor, Tensor))> = self
            .job
            .sites
            .values()
            .map(|s| (s, &sites[s.index]))
            .collect();
        let acts: Vec<Tensor> = chosen.iter().map(|(_, (_, a))| a.shallow_clone()).collect();
        let mut sums: Vec<Vec<f64>> = chosen
            .iter()
            .map(|(s, _)| vec![0.0; s.shape[0] * s.options.len()])
            .collect();
        for p in 0..probes {
            let r = if basis {
                Tensor::zeros([n as i64, k_out as i64], (Kind::Float, self.device)).index_fill(
                    1,
                    &Tensor::from_slice(&[p as i64]).to_device(self.device),
                    1.0,
                )
            } else {
                let mut rng = Rng::for_epoch(self.job.seed, u.batch, 1000 + p as u64);
                let v: Vec<f32> = (0..n * k_out)
                    .map(|_| if rng.next_u64() >> 63 == 0 { 1.0 } else { -1.0 })
                    .collect();
                Tensor::from_slice(&v)
                    .view([n as i64, k_out as i64])
                    .to_device(self.device)
            };
            let target = (&out * r).sum(Kind::Float);
            let grads = Tensor::run_backward(&[target], &acts, true, false);
            let _guard = tch::no_grad_guard();
            for ((site, (pre, act)), (g, sum)) in
                chosen.iter().zip(grads.iter().zip(sums.iter_mut()))
            {
                let c = site.shape[0];
                let nopt = site.options.len();
                let base = act.detach();
                let pre = pre.detach();
                for (k, o) in site.options.iter().enumerate() {
                    let delta = ops::f_block_relu(&pre, &vec![*o; c])? - &base;
                    let s = (g * delta)
                        .sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Double)
                        .square()
                        .sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
                    let s = Vec::<f64>::try_from(s)?;
                    for ch in 0..c {
                        sum[ch * nopt + k] += weight * s[ch];
                    }
                }
            }
        }
        let baseline: Vec<Vec<PatchOption>> = chosen
            .iter()
            .map(|(s, _)| self.baseline(s.index, s.shape[0]))
            .collect();
        let mut evals = 0u64;
        for (((site, _), sum), (base, path)) in chosen
            .iter()
            .zip(sums.iter_mut())
            .zip(baseline.iter().zip(self.job.unit_files(dir, u)))
        {
            let nopt = site.options.len();
            for (c, b) in base.iter().enumerate() {
                for (k, o) in site.options.iter().enumerate() {
                    if o == b {
                        sum[c * nopt + k] = 0.0;
                    } else {
                        evals += n as u64;
                    }
                }
            }
            npy::write_f64(&path, &[site.shape[0], nopt], sum)?;
        }
        Ok(evals)
    }
}

/// Why [`collect`] could not finish.
fn missing_error(dir: &Path, missing: &[usize], total: usize, counts: &[usize]) -> Error {
    let mut msg = format!(
        "{}: {} of {total} units are missing",
        dir.display(),
        missing.len()
    );
    for &n in counts {
        let mut idx: Vec<usize> = missing.iter().map(|u| u % n).collect();
        idx.sort_unstable();
        idx.dedup();
        let list: Vec<String> = idx.iter().map(|i| i.to_string()).collect();
        msg.push_str(&format!(
            "; with {n} shards, shard(s) {} of {n} have not finished",
            list.join(", ")
        ));
    }
    if counts.is_empty() {
        msg.push_str("; run the extract command again to finish them");
    }
    Error::InvalidArgument(msg)
}

/// Checks that every unit of the extraction in `dir` is present and every shard record agrees
/// with `job.json`, then averages the units into tables and writes them (manifest last).
pub fn collect(dir: &Path) -> Result<DistortionTables> {
    let jpath = dir.join("job.json");
    if !jpath.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} is not an extraction directory (no job.json)",
            dir.display()
        )));
    }
    let job = read_job(&jpath)?;
    let jv = serde_json::to_value(&job).expect("job serialises");
    let mut counts = Vec::new();
    let sdir = dir.join("shards");
    if sdir.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sdir)
            .map_err(|e| Error::io(&sdir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::parse(&f, format!("malformed shard record: {e}")))?;
            if v["job"] != jv {
                return Err(Error::InvalidArgument(format!(
                    "refusing to mix shards: {} was made by a different extraction than {} ({})",
                    f.display(),
                    jpath.display(),
                    first_difference(&v["job"], &jv)
                )));
            }
            if let Some(n) = v["shard"][1].as_u64() {
                if !counts.contains(&(n as usize)) {
                    counts.push(n as usize);
                }
            }
        }
    }
    let units = job.units();
    let missing: Vec<usize> = units
        .iter()
        .enumerate()
        .filter(|(_, u)| !job.unit_done(dir, **u))
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        return Err(missing_error(dir, &missing, units.len(), &counts));
    }
    let mut tables = IndexMap::new();
    for (name, site) in &job.sites {
        let nopt = site.options.len();
        let c = site.shape[0];
        let mut values = vec![0.0f64; c * nopt];
        let chunks = if job.estimator == Estimator::FirstOrder.name() {
            1
        } else {
            job.chunks(site)
        };
        for batch in 0..job.batches() {
            for chunk in 0..chunks {
                let p = dir
                    .join("units")
                    .join(name)
                    .join(format!("b{batch:05}-c{chunk:04}.npy"));
                let arr = npy::read_f64(&p)?;
                let c0 = chunk * site.chunk;
                let rows = (c0 + site.chunk).min(c) - c0;
                if arr.shape != [rows, nopt] {
                    return Err(Error::parse(
                        &p,
                        format!("unit shape {:?}, expected [{rows}, {nopt}]", arr.shape),
                    ));
                }
                for (dst, src) in values[c0 * nopt..(c0 + rows) * nopt]
                    .iter_mut()
                    .zip(&arr.data)
                {
                    *dst += src;
                }
            }
        }
        for v in &mut values {
            *v /= job.samples as f64;
        }
        tables.insert(
            name.clone(),
            SiteTable {
                shape: site.shape,
                options: site.options.clone(),
                values,
            },
        );
    }
    let t = DistortionTables {
        model: job.model.clone(),
        input: job.input,
        estimator: job.estimator.clone(),
        samples: job.samples as u64,
        seed: job.seed,
        model_hash: job.model_hash.clone(),
        sites: tables,
    };
    t.write(dir)?;
    Ok(t)
}
