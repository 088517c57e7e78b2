//! Supervised training and evaluation with cross-entropy: SGD ([`sgd`], momentum and weight
//! decay, optionally over `accumulate` micro-batches per step: `run`) under a per-epoch
//! learning-rate [`schedule`], evaluation (top-1, top-5, mean loss),
//! per-epoch metrics in `RUN_DIR/metrics.jsonl` and a checkpoint after every epoch
//! (`checkpoint.safetensors`, the momentum buffers in `checkpoint-optimizer.safetensors` and
//! `checkpoint.json`, each written atomically) from which `resume` continues.
//!
//! Determinism: the model is initialised after `tch::manual_seed(seed)`, and the data order
//! and augmentation of epoch `e` come from brelu's own generator seeded with (seed, e), and
//! torch's generator (dropout) is reseeded where a run can resume (`run`), so a resumed run
//! sees the same batches, dropout masks and optimizer state as an uninterrupted one and, on
//! the CPU, ends with the same weights.
//!
//! Segmentation sets ([`segment`]) train on the per-pixel cross-entropy of the logits resized
//! to the crop (ignore label 255), plus `aux_loss_weight` times that of the network's
//! training-only auxiliary head when the configuration sets it, and evaluate to mIoU; their
//! recipes count `iterations` instead of epochs, with a checkpoint (and evaluation) every
//! `checkpoint_every` iterations from which a resumed run continues mid-epoch with the same
//! batches.
//!
//! Data-parallel runs ([`TrainOptions::group`], docs/cluster.md): the ranks first check that
//! they started alike ([`crate::dist::Fingerprint`]); each rank takes its shard of every epoch
//! and `batch_size / world` images per step ([`micro_batch`]), the gradients are averaged over
//! the ranks before each update, each rank evaluates a share of the test split
//! ([`evaluate_sharded`]) and rank 0 alone writes; the ranks check at every checkpoint that
//! their weights are still identical. [`precision`] adds bf16 autocast and
//! channels-last.
pub mod config;
pub mod precision;
pub mod recalibrate;
mod run;
pub use run::host_syncs;
pub mod schedule;
pub mod segment;
pub mod sgd;

pub use config::{Config, OptimizerConfig, ScheduleConfig, ScheduleKind};
pub use recalibrate::recalibrate_bn;
pub use schedule::{lr_at, lr_at_iteration, lr_at_progress, lr_for_batch};

use crate::data::{self, BatchIter, Dataset, Normalize, Split, Task};
use crate::dist::Group;
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use crate::models::{find, ArchConfig, Model};
use run::Run;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// The configured split of `cfg` (see [`crate::data::Source::load_split`]).
pub fn load_split(cfg: &Config, split: Split) -> Result<Dataset> {
    cfg.source().load_split(split)
}

/// A freshly initialised model for `cfg` (seeded with `cfg.seed`).
pub fn build_model(cfg: &Config, device: Device) -> Result<Model> {
    tch::manual_seed(cfg.seed as i64);
    Model::new(
        find(&cfg.model)?,
        ArchConfig {
            input: cfg.input,
            num_classes: cfg.num_classes,
        },
        device,
    )
}

/// Evaluation figures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// Fraction in [0, 1] (segmentation: pixel accuracy).
    pub top1: f64,
    /// Fraction in [0, 1] (top-k with k = min(5, classes); segmentation: per pixel).
    pub top5: f64,
    /// Mean cross-entropy (segmentation: per labelled pixel).
    pub loss: f64,
    pub images: usize,
    /// Segmentation figures (absent for classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<SegMetrics>,
}

/// Segmentation figures over all labelled (not ignored) pixels of a split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SegMetrics {
    /// Mean IoU over the classes present in the labels or the predictions, in [0, 1].
    pub miou: f64,
    pub pixel_accuracy: f64,
    /// IoU per class; `null` for a class absent from both labels and predictions (left out
    /// of the mean, like mmseg's NaN).
    pub per_class_iou: Vec<Option<f64>>,
    /// Labelled pixels counted.
    pub pixels: u64,
}

impl EvalResult {
    /// The task's headline metric, a fraction: mIoU for segmentation, top-1 otherwise.
    pub fn metric(&self) -> f64 {
        match &self.segmentation {
            Some(s) => s.miou,
            None => self.top1,
        }
    }

    pub fn task(&self) -> Task {
        match self.segmentation {
            Some(_) => Task::Segmentation,
            None => Task::Classification,
        }
    }
}

/// Evaluates `model` (evaluation mode, no gradients) on `data` in order. Segmentation sets
/// are evaluated image by image at the test scale with the set's inference mode
/// ([`segment::evaluate`], `batch_size` images decoded at once).
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<EvalResult> {
    evaluate_sharded(model, data, normalize, batch_size, None)
}

/// [`evaluate`] spread over the ranks of `group`: each rank evaluates a contiguous share of
/// the split (no image twice, unlike a padded sampler) and the sums are added over the ranks,
/// so every rank gets the one-process figures: the counts exactly, the loss to float
/// rounding.
pub fn evaluate_sharded(
    model: &Model,
    data: &Dataset,
    normalize: &Normalize,
    batch_size: usize,
    group: Option<&Group>,
) -> Result<EvalResult> {
    let n = data.len();
    let (rank, world) = group.map_or((0, 1), |g| (g.rank, g.world));
    let part = n * rank / world..n * (rank + 1) / world;
    let total = |v: Vec<f64>| -> Result<Vec<f64>> {
        let Some(g) = group else { return Ok(v) };
        let t = Tensor::from_slice(&v).to_device(model.device());
        g.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    };
    if let Some(s) = &data.seg {
        let e = segment::SegEval::of(&s.transforms, batch_size);
        let sums = segment::evaluate_part(model, data, normalize, &e, part)?;
        let all = total(sums.to_vec())?;
        return Ok(segment::SegSums::from_vec(data.num_classes, &all).finish(n));
    }
    let _g = tch::no_grad_guard();
    let k = 5.min(data.num_classes) as i64;
    let (mut loss, mut c1, mut c5, mut seen) = (0f64, 0i64, 0i64, 0usize);
    let batches = BatchIter::eval(data, batch_size, normalize.clone(), model.device()).part(part);
    for b in batches.prefetch(data::LoaderOptions::default())? {
        let (x, y) = b?;
        let b = y.size()[0];
        let logits = model.forward_t(&x, false);
        loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * b as f64;
        let (_, top) = logits.topk(k, 1, true, true);
        let hit = top.eq_tensor(&y.unsqueeze(1));
        c1 += hit.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
        c5 += hit.sum(Kind::Int64).int64_value(&[]);
        seen += b as usize;
    }
    let v = total(vec![loss, c1 as f64, c5 as f64, seen as f64])?;
    let d = v[3].max(1.0);
    Ok(EvalResult {
        top1: v[1] / d,
        top5: v[2] / d,
        loss: v[0] / d,
        images: v[3] as usize,
        segmentation: None,
    })
}

/// One line of `metrics.jsonl` (per epoch, or per checkpoint of an iteration-based run).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based number of the finished epoch (iteration runs: the epoch being run).
    pub epoch: usize,
    /// Iteration runs: the number of finished iterations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<usize>,
    pub lr: f64,
    pub train_loss: f64,
    /// Since the previous line (segmentation: pixel accuracy).
    pub train_top1: f64,
    pub test: EvalResult,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Undecodable training images replaced since the previous line (`--bad-images
    /// substitute`), over all ranks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub substituted_images: u64,
    /// Times the training loop on rank 0 waited for the device to read values back since the
    /// previous line (one per optimizer step: [`host_syncs`]).
    #[serde(default)]
    pub host_syncs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `checkpoint.json`: where a run stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// Number of finished epochs (the next epoch to run, 0-based).
    pub epoch: usize,
    /// Iteration runs: the number of finished iterations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<usize>,
    pub seed: u64,
    pub config_hash: String,
    /// The spec the model was trained with, if any.
    pub spec: Option<PathBuf>,
    /// False (checkpoints of older versions): no momentum buffers; a resume restarts them
    /// from zero.
    pub momentum_saved: bool,
    pub last: Option<EpochMetrics>,
}

/// How to run [`train`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Continue from `run_dir/checkpoint.*` when present.
    pub resume: bool,
    /// Show progress: a bar on a terminal, a line every `BRELU_PROGRESS_INTERVAL` seconds in
    /// a log ([`crate::progress`]).
    pub progress: bool,
    /// The spec applied to the model, recorded in the checkpoint.
    pub spec: Option<PathBuf>,
    /// The weights file the model started from (none: a fresh initialisation); the ranks of a
    /// data-parallel run check that they started from the same.
    pub weights: Option<PathBuf>,
    /// Teacher weights for knowledge distillation (used when the configuration has a
    /// `[distill]` section; the teacher runs with ordinary ReLUs in evaluation mode).
    pub teacher: Option<PathBuf>,
    /// A data-parallel run's process group (see [`crate::dist`]): every rank trains on its
    /// shard of each epoch with `batch_size / (world * accumulate)` images per micro-batch and
    /// the gradients averaged, so a step sees `batch_size` images in all, as in one process;
    /// the ranks evaluate a share of the test split each, and rank 0 alone writes the run
    /// directory.
    pub group: Option<Rc<Group>>,
    /// Decoding threads and batches decoded ahead (class-folder and segmentation sets).
    pub loader: data::LoaderOptions,
    /// Forward pass in bf16 autocast ([`precision`]).
    pub precision: precision::Precision,
    /// Weights and inputs channels-last.
    pub channels_last: bool,
    /// Data-parallel runs: batch norms use the statistics of all ranks' batches together
    /// (`torch.nn.SyncBatchNorm`), so training equals one process on the whole batch.
    pub sync_bn: bool,
    /// Data-parallel runs: how the gradients are averaged.
    pub ddp: DdpOptions,
}

/// Gradient averaging in a data-parallel run ([`crate::dist::Ddp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DdpOptions {
    /// Bucket size in MiB.
    pub bucket_mb: usize,
    pub compress: crate::dist::GradCompress,
}

impl Default for DdpOptions {
    fn default() -> DdpOptions {
        DdpOptions {
            bucket_mb: crate::dist::BUCKET_MB,
            compress: Default::default(),
        }
    }
}

impl TrainOptions {
    /// A fresh single-process run into `run_dir`: no resume, progress bar, spec, teacher or
    /// process group; the default loader, f32, weights as stored, no synchronised batch norm.
    pub fn new(run_dir: impl Into<PathBuf>) -> TrainOptions {
        TrainOptions {
            run_dir: run_dir.into(),
            resume: false,
            progress: false,
            spec: None,
            weights: None,
            teacher: None,
            group: None,
            loader: Default::default(),
            precision: Default::default(),
            channels_last: false,
            sync_bn: false,
            ddp: Default::default(),
        }
    }
}

/// The distillation term alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
/// averaged over the batch.
pub fn distillation_loss(student: &Tensor, teacher: &Tensor, alpha: f64, t: f64) -> Tensor {
    let ls = (student / t).log_softmax(1, Kind::Float);
    let lt = (teacher / t).log_softmax(1, Kind::Float);
    let kl = (lt.exp() * (&lt - ls))
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .mean(Kind::Float);
    kl * (alpha * t * t)
}

pub const CHECKPOINT_WEIGHTS: &str = "checkpoint.safetensors";
pub const CHECKPOINT_JSON: &str = "checkpoint.json";
/// SGD momentum buffers, saved with every checkpoint.
pub const CHECKPOINT_OPTIMIZER: &str = "checkpoint-optimizer.safetensors";
pub const METRICS: &str = "metrics.jsonl";

/// Reads `run_dir/checkpoint.json` if it exists.
pub fn read_checkpoint(run_dir: &Path) -> Result<Option<Checkpoint>> {
    let p = run_dir.join(CHECKPOINT_JSON);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::parse(&p, e.to_string()))
}

/// Keeps the metrics lines of epochs (iteration runs: iterations) `<= upto` (drops those of a
/// run being redone).
fn trim_metrics(path: &Path, upto: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut keep = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let m: EpochMetrics =
            serde_json::from_str(line).map_err(|e| Error::parse(path, e.to_string()))?;
        if m.iteration.unwrap_or(m.epoch) <= upto {
            keep.push_str(line);
            keep.push('\n');
        }
    }
    write_atomic(path, keep.as_bytes())
}

/// The auxiliary head's variables when the configuration trains it (it trains only when asked
/// for; its variables then join the optimizer, the broadcast and the checkpoint), else none.
fn aux_variables_to_train(
    cfg: &Config,
    model: &mut Model,
) -> Result<std::collections::HashMap<String, Tensor>> {
    match cfg.aux_loss_weight {
        Some(_) if !model.has_aux_head() => Err(Error::InvalidArgument(format!(
            "aux_loss_weight is set but {} has no auxiliary head",
            model.name()
        ))),
        Some(_) => {
            model.set_aux_head_used();
            Ok(model.aux_variables())
        }
        None => Ok(Default::default()),
    }
}

/// Trains `model` (already built, weights loaded and spec applied by the caller) for
/// `cfg.epochs` epochs on the configured data set; returns the metrics of the epochs run.
pub fn train(cfg: &Config, model: &mut Model, opts: &TrainOptions) -> Result<Vec<EpochMetrics>> {
    let (train_set, test_set) = load_splits(cfg, opts.group.as_deref(), Some(&opts.run_dir))?;
    train_on(cfg, model, opts, &train_set, &test_set)
}

/// Both splits of `cfg`'s data set, class folders listed through an index in `index_dir`.
/// Under a process group the first rank of each node lists first (walking the folders once,
/// writing the index) while the node's other ranks wait, then read the index.
pub fn load_splits(
    cfg: &Config,
    group: Option<&Group>,
    index_dir: Option<&Path>,
) -> Result<(Dataset, Dataset)> {
    let load = || -> Result<(Dataset, Dataset)> {
        let src = cfg.source();
        Ok((
            src.load_split_indexed(Split::Train, index_dir)?,
            src.load_split_indexed(Split::Test, index_dir)?,
        ))
    };
    let Some(g) = group else { return load() };
    if g.local_rank == 0 {
        let r = load();
        g.barrier()?;
        r
    } else {
        g.barrier()?;
        load()
    }
}

/// What the ranks of a data-parallel run must agree on before training (see
/// [`crate::dist::Fingerprint`]).
fn fingerprint(
    cfg: &Config,
    opts: &TrainOptions,
    world: usize,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<crate::dist::Fingerprint> {
    let mut f = crate::dist::Fingerprint::new(world);
    f.add_keys("configuration key", cfg);
    f.add_file("spec", opts.spec.as_deref())?;
    f.add_file("starting weights", opts.weights.as_deref())?;
    f.add("resume", opts.resume.to_string());
    f.add("training set length", train_set.len().to_string());
    f.add("test set length", test_set.len().to_string());
    f.add("synchronised batch norm", opts.sync_bn.to_string());
    f.add("gradient all-reduce", format!("{:?}", opts.ddp));
    Ok(f)
}

/// Images per micro-batch on each rank: `batch_size` is one optimizer step's batch over all
/// ranks, split into `accumulate` micro-batches per rank.
pub fn micro_batch(cfg: &Config, world: usize) -> Result<usize> {
    let parts = world * cfg.accumulate.max(1);
    if !cfg.batch_size.is_multiple_of(parts) {
        return Err(Error::InvalidArgument(format!(
            "batch_size {} is the images of one optimizer step over all ranks and must be a \
             multiple of the ranks ({world}) times accumulate ({}), the micro-batches per rank",
            cfg.batch_size, cfg.accumulate
        )));
    }
    Ok(cfg.batch_size / parts)
}

/// Images below which train-mode batch norm statistics get noisy (a warning, not an error).
const SMALL_BN_BATCH: usize = 16;

/// Says how the step's batch is split, and warns when each batch norm would normalise over
/// fewer than [`SMALL_BN_BATCH`] images.
fn report_batches(cfg: &Config, model: &Model, opts: &TrainOptions, micro: usize) {
    let world = opts.group.as_ref().map_or(1, |g| g.world);
    eprintln!(
        "batch: {} images per optimizer step = {world} rank(s) x {} micro-batch(es) x {micro} \
         images",
        cfg.batch_size, cfg.accumulate
    );
    let has_bn = model
        .var_store()
        .variables()
        .keys()
        .any(|k| k.ends_with("running_mean"));
    let bn_images = if opts.sync_bn { micro * world } else { micro };
    if has_bn && bn_images < SMALL_BN_BATCH {
        eprintln!(
            "warning: train-mode batch norm sees {bn_images} images per rank (fewer than \
             {SMALL_BN_BATCH}): its statistics are noisy. Use --sync-bn, a larger batch_size or \
             less accumulation (docs/cluster.md, \"Batches\")"
        );
    }
}

/// [`recalibrate_bn`] on each rank's own batches (seed + rank), then the statistics averaged
/// over the ranks so every rank starts from the same network. A later resume keeps them (the
/// checkpoint holds them).
fn recalibrate_on_ranks(
    cfg: &Config,
    model: &Model,
    opts: &TrainOptions,
    train_set: &Dataset,
    batches: usize,
) -> Result<()> {
    let rank = opts.group.as_ref().map_or(0, |g| g.rank);
    let batch = cfg.eval_batch_size.unwrap_or(cfg.batch_size);
    let norm = cfg.dataset.normalization();
    let used = recalibrate_bn(
        model,
        train_set,
        &norm,
        batch,
        batches,
        cfg.seed + rank as u64,
    )?;
    if let Some(g) = &opts.group {
        for t in recalibrate::running_stats(model) {
            let sum = t.to_device(g.device);
            g.all_reduce_sum(&sum)?;
            tch::no_grad(|| t.shallow_clone().copy_(&(sum / g.world as f64)));
        }
    }
    if opts.group.as_ref().is_none_or(|g| g.is_leader()) && opts.progress {
        eprintln!("batch norm recalibrated on {used} batches of {batch} images per rank");
    }
    Ok(())
}

/// [`train`] on data sets already in memory.
pub fn train_on(
    cfg: &Config,
    model: &mut Model,
    opts: &TrainOptions,
    train_set: &Dataset,
    test_set: &Dataset,
) -> Result<Vec<EpochMetrics>> {
    let dir = &opts.run_dir;
    let leader = opts.group.as_ref().is_none_or(|g| g.is_leader());
    let micro = micro_batch(cfg, opts.group.as_ref().map_or(1, |g| g.world))?;
    if let Some(g) = &opts.group {
        let f = fingerprint(cfg, opts, g.world, train_set, test_set)?;
        g.agree(&f)?;
    }
    if leader {
        report_batches(cfg, model, opts, micro);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let hash = cfg.hash();
    let metrics_path = dir.join(METRICS);
    let (mut start, mut start_it) = (0, 0);
    if opts.resume {
        if let Some(ck) = read_checkpoint(dir)? {
            if ck.config_hash != hash || ck.seed != cfg.seed {
                return Err(Error::InvalidArgument(format!(
                    "{}: checkpoint was made with another configuration (hash {} seed {}, \
                     now {} seed {}); start a new run directory",
                    dir.join(CHECKPOINT_JSON).display(),
                    ck.config_hash,
                    ck.seed,
                    hash,
                    cfg.seed
                )));
            }
            model.load_weights(&dir.join(CHECKPOINT_WEIGHTS))?;
            start = ck.epoch;
            start_it = ck.iteration.unwrap_or(0);
        }
    }
    if let (Some(n), 0, 0) = (cfg.recalibrate_bn, start, start_it) {
        recalibrate_on_ranks(cfg, model, opts, train_set, n)?;
    }
    if leader {
        trim_metrics(
            &metrics_path,
            if cfg.iterations.is_some() {
                start_it
            } else {
                start
            },
        )?;
    }
    let aux = aux_variables_to_train(cfg, model)?;
    let vars = || {
        let aux = aux.iter().map(|(n, t)| (n.clone(), t.shallow_clone()));
        model.var_store().variables().into_iter().chain(aux)
    };
    if opts.channels_last {
        for (_, t) in vars() {
            precision::channels_last(&t)?;
        }
    }
    let o = &cfg.optimizer;
    let mut opt = sgd::Sgd::with_variables(vars(), o.lr, o.momentum, o.weight_decay);
    if (start > 0 || start_it > 0) && dir.join(CHECKPOINT_OPTIMIZER).exists() {
        opt.load(&dir.join(CHECKPOINT_OPTIMIZER))?;
    }
    if let Some(g) = &opts.group {
        // Rank 0's weights are everyone's (as DDP's constructor does), whether fresh, loaded
        // or resumed.
        let mut vars: Vec<(String, Tensor)> = vars().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        g.broadcast_vars(&vars.into_iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        opt.set_group(g.clone(), opts.ddp.bucket_mb, opts.ddp.compress)?;
    }
    let teacher = match (&cfg.distill, &opts.teacher) {
        (Some(_), Some(w)) => {
            let mut t = build_model(cfg, model.device())?;
            t.load_weights(w)?;
            Some(t)
        }
        (Some(_), None) => {
            return Err(Error::InvalidArgument(
                "the configuration asks for distillation but no teacher weights were given".into(),
            ))
        }
        (None, _) => None,
    };
    let _sync_bn = match (&opts.group, opts.sync_bn) {
        (Some(g), true) => Some(crate::dist::SyncBatchNormScope::enter(g.clone())),
        _ => None,
    };
    let mut run = Run {
        cfg,
        model,
        opt,
        teacher,
        train_set,
        test_set,
        opts,
        hash,
        metrics_path,
        norm: cfg.dataset.normalization(),
        out: Vec::new(),
        leader,
        micro_batch: micro,
        substituted_mark: 0,
        syncs_mark: host_syncs(),
    };
    match cfg.iterations {
        None => run.by_epochs(start)?,
        Some(total) => run.by_iterations(start_it, total)?,
    }
    Ok(run.out)
}
