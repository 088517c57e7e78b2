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
//! Data-parallel runs ([`TrainOptions::group`], docs/cluster.md): each rank takes its shard of
//! every epoch and `batch_size / world` images per step, the gradients are averaged over the
//! ranks before each update, and rank 0 alone evaluates and writes; the ranks check at every
//! checkpoint that their weights are still identical. [`precision`] adds bf16 autocast and
//! channels-last.
pub mod config;
pub mod precision;
mod run;
pub mod schedule;
pub mod segment;
pub mod sgd;

pub use config::{Config, OptimizerConfig, ScheduleConfig, ScheduleKind};
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
    if let Some(s) = &data.seg {
        let e = segment::SegEval::of(&s.transforms, batch_size);
        return segment::evaluate(model, data, normalize, &e);
    }
    let _g = tch::no_grad_guard();
    let k = 5.min(data.num_classes) as i64;
    let (mut loss, mut c1, mut c5, mut n) = (0f64, 0i64, 0i64, 0usize);
    let batches = BatchIter::eval(data, batch_size, normalize.clone(), model.device());
    for b in batches.prefetch(data::LoaderOptions::default())? {
        let (x, y) = b?;
        let b = y.size()[0];
        let logits = model.forward_t(&x, false);
        loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * b as f64;
        let (_, top) = logits.topk(k, 1, true, true);
        let hit = top.eq_tensor(&y.unsqueeze(1));
        c1 += hit.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
        c5 += hit.sum(Kind::Int64).int64_value(&[]);
        n += b as usize;
    }
    let d = n.max(1) as f64;
    Ok(EvalResult {
        top1: c1 as f64 / d,
        top5: c5 as f64 / d,
        loss: loss / d,
        images: n,
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
    /// Draw a progress bar (only shown on a terminal).
    pub progress: bool,
    /// The spec applied to the model, recorded in the checkpoint.
    pub spec: Option<PathBuf>,
    /// Teacher weights for knowledge distillation (used when the configuration has a
    /// `[distill]` section; the teacher runs with ordinary ReLUs in evaluation mode).
    pub teacher: Option<PathBuf>,
    /// A data-parallel run's process group (see [`crate::dist`]): every rank trains on its
    /// shard of each epoch with `batch_size / world` images per step and the gradients
    /// averaged, so a step sees `batch_size` images in all, as in one process; rank 0 alone
    /// evaluates and writes the run directory.
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
            teacher: None,
            group: None,
            loader: Default::default(),
            precision: Default::default(),
            channels_last: false,
            sync_bn: false,
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
    let train_set = load_split(cfg, Split::Train)?;
    let test_set = load_split(cfg, Split::Test)?;
    train_on(cfg, model, opts, &train_set, &test_set)
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
    if let Some(g) = &opts.group {
        if !cfg.batch_size.is_multiple_of(g.world) {
            return Err(Error::InvalidArgument(format!(
                "batch_size {} is the images per step over all ranks and must be a multiple of \
                 the world size {}",
                cfg.batch_size, g.world
            )));
        }
    }
    if leader {
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
        opt.set_group(g.clone());
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
    };
    match cfg.iterations {
        None => run.by_epochs(start)?,
        Some(total) => run.by_iterations(start_it, total)?,
    }
    Ok(run.out)
}
