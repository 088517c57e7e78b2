//! Supervised training and evaluation with cross-entropy: SGD ([`sgd`], momentum and weight
//! decay) under a per-epoch learning-rate [`schedule`], evaluation (top-1, top-5, mean loss),
//! per-epoch metrics in `RUN_DIR/metrics.jsonl` and a checkpoint after every epoch
//! (`checkpoint.safetensors`, the momentum buffers in `checkpoint-optimizer.safetensors` and
//! `checkpoint.json`, each written atomically) from which `resume` continues.
//!
//! Determinism: the model is initialised after `tch::manual_seed(seed)`, and the data order
//! and augmentation of epoch `e` come from brelu's own generator seeded with (seed, e), so a
//! resumed run sees the same batches and optimizer state as an uninterrupted one and, on the
//! CPU, ends with the same weights.
//!
//! Segmentation sets ([`segment`]) train on the per-pixel cross-entropy of the logits resized
//! to the crop (ignore label 255) and evaluate to mIoU; their recipes count `iterations`
//! instead of epochs, with a checkpoint (and evaluation) every `checkpoint_every` iterations
//! from which a resumed run continues mid-epoch with the same batches.
//!
//! Data-parallel runs ([`TrainOptions::group`], docs/cluster.md): each rank takes its shard of
//! every epoch and `batch_size / world` images per step, the gradients are averaged over the
//! ranks before each update, and rank 0 alone evaluates and writes; the ranks check at every
//! checkpoint that their weights are still identical. [`precision`] adds bf16 autocast and
//! channels-last.
pub mod config;
pub mod precision;
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
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;
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
    if opts.channels_last {
        for (_, t) in model.var_store().variables() {
            precision::channels_last(&t)?;
        }
    }
    let o = &cfg.optimizer;
    let mut opt = sgd::Sgd::new(model.var_store(), o.lr, o.momentum, o.weight_decay);
    if (start > 0 || start_it > 0) && dir.join(CHECKPOINT_OPTIMIZER).exists() {
        opt.load(&dir.join(CHECKPOINT_OPTIMIZER))?;
    }
    if let Some(g) = &opts.group {
        // Rank 0's weights are everyone's (as DDP's constructor does), whether fresh, loaded
        // or resumed.
        let mut vars: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
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

/// Running sums of the training loss and accuracy since the last metrics line.
#[derive(Default, Clone, Copy)]
struct Window {
    loss: f64,
    correct: i64,
    /// Samples (segmentation: labelled pixels) counted for the accuracy.
    counted: i64,
    /// Images seen.
    images: usize,
    /// Batches, for the mean loss.
    batches: usize,
}

/// The state of one [`train_on`] call.
struct Run<'a> {
    cfg: &'a Config,
    model: &'a mut Model,
    opt: sgd::Sgd,
    teacher: Option<Model>,
    train_set: &'a Dataset,
    test_set: &'a Dataset,
    opts: &'a TrainOptions,
    hash: String,
    metrics_path: PathBuf,
    norm: Normalize,
    out: Vec<EpochMetrics>,
    /// Single process, or rank 0: evaluates, writes and shows progress.
    leader: bool,
}

impl<'a> Run<'a> {
    /// The training batches of `epoch` (borrowing the data set, not the run, so they stream
    /// while the run steps).
    fn batches(&self, epoch: usize) -> BatchIter<'a> {
        let (rank, world) = self
            .opts
            .group
            .as_ref()
            .map_or((0, 1), |g| (g.rank, g.world));
        BatchIter::train(
            self.train_set,
            self.cfg.batch_size / world,
            self.cfg.seed,
            epoch,
            self.cfg.dataset.augmentation(),
            self.norm.clone(),
            self.model.device(),
        )
        .shard(self.cfg.seed, epoch, rank, world)
    }

    /// Data-parallel runs: `w` summed over the ranks, and a check that the ranks' weights
    /// are still identical.
    fn gather_window(&self, w: &Window) -> Result<Window> {
        let Some(g) = &self.opts.group else {
            return Ok(*w);
        };
        g.check_same(&self.opt.params(), "weights")?;
        let t = Tensor::from_slice(&[
            w.loss,
            w.correct as f64,
            w.counted as f64,
            w.images as f64,
            w.batches as f64,
        ])
        .to_device(self.model.device());
        g.all_reduce_sum(&t)?;
        let v = Vec::<f64>::try_from(t.to_device(Device::Cpu)).expect("f64 vector");
        Ok(Window {
            loss: v[0],
            correct: v[1] as i64,
            counted: v[2] as i64,
            images: v[3] as usize,
            batches: v[4] as usize,
        })
    }

    /// One optimizer step on a batch at rate `lr`.
    fn step(&mut self, x: &Tensor, y: &Tensor, lr: f64, w: &mut Window, when: &str) -> Result<()> {
        self.opt.lr = lr;
        if self.opts.channels_last {
            precision::channels_last(x)?;
        }
        let autocast = precision::Autocast::begin(x.device(), self.opts.precision);
        let logits = self.model.forward_t(x, true);
        let seg = self.train_set.seg.is_some();
        let (ce, pred, counted) = if seg {
            let (ce, valid, up) = segment::seg_loss(&logits, y);
            let hit = up
                .argmax(1, false)
                .eq_tensor(y)
                .logical_and(&y.ne(data::seg::IGNORE as i64));
            (ce, hit, valid)
        } else {
            let ce = logits.cross_entropy_for_logits(y);
            (ce, logits.argmax(1, false).eq_tensor(y), y.size()[0])
        };
        let loss = match (&self.teacher, &self.cfg.distill) {
            (Some(t), Some(d)) => {
                let tl = tch::no_grad(|| t.forward_t(x, false));
                ce + distillation_loss(&logits, &tl, d.alpha, d.temperature)
            }
            _ => ce,
        };
        drop(autocast);
        self.opt.backward_step(&loss)?;
        let l = loss.double_value(&[]);
        if !l.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "training diverged at {when} (loss {l}); lower optimizer.lr"
            )));
        }
        let b = x.size()[0] as usize;
        w.loss += l * b as f64;
        w.correct += pred.sum(Kind::Int64).int64_value(&[]);
        w.counted += counted;
        w.images += b;
        w.batches += 1;
        Ok(())
    }

    /// Evaluates, appends the metrics line and writes the checkpoint (all atomically but the
    /// append, which [`trim_metrics`] repairs on resume).
    fn checkpoint(
        &mut self,
        epoch: usize,
        iteration: Option<usize>,
        lr: f64,
        w: &Window,
        t0: Instant,
        train_secs: f64,
    ) -> Result<()> {
        let w = &self.gather_window(w)?;
        if !self.leader {
            // Rank 0 evaluates and writes; the others wait for it at the barrier.
            return self.opts.group.as_ref().map_or(Ok(()), |g| g.barrier());
        }
        let eval_bs = self.cfg.eval_batch_size.unwrap_or(self.cfg.batch_size);
        let test = evaluate(self.model, self.test_set, &self.norm, eval_bs)?;
        let m = EpochMetrics {
            epoch,
            iteration,
            lr,
            train_loss: w.loss / w.images.max(1) as f64,
            train_top1: w.correct as f64 / w.counted.max(1) as f64,
            test,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s: w.images as f64 / train_secs.max(1e-9),
        };
        append_line(
            &self.metrics_path,
            &serde_json::to_string(&m).expect("metrics"),
        )?;
        let dir = &self.opts.run_dir;
        self.model.save_weights(&dir.join(CHECKPOINT_WEIGHTS))?;
        self.opt.save(&dir.join(CHECKPOINT_OPTIMIZER))?;
        let ck = Checkpoint {
            // Iteration runs: the epochs completed (the resume point comes from `iteration`).
            epoch: if iteration.is_some() {
                epoch.saturating_sub(1)
            } else {
                epoch
            },
            iteration,
            seed: self.cfg.seed,
            config_hash: self.hash.clone(),
            spec: self.opts.spec.clone(),
            momentum_saved: true,
            last: Some(m.clone()),
        };
        let text = serde_json::to_string_pretty(&ck).expect("checkpoint");
        write_atomic(&dir.join(CHECKPOINT_JSON), text.as_bytes())?;
        self.out.push(m);
        match &self.opts.group {
            Some(g) => g.barrier(),
            None => Ok(()),
        }
    }

    fn by_epochs(&mut self, start: usize) -> Result<()> {
        let cfg = self.cfg;
        for epoch in start..cfg.epochs {
            let lr = lr_at(&cfg.schedule, cfg.optimizer.lr, epoch, cfg.epochs);
            let t0 = Instant::now();
            let it = self.batches(epoch);
            let bar = progress_bar(
                self.opts.progress && self.leader,
                it.batches() as u64,
                format!("epoch {}/{}", epoch + 1, cfg.epochs),
            );
            let mut w = Window::default();
            let batches = it.batches();
            for (i, b) in it.prefetch(self.opts.loader)?.enumerate() {
                let (x, y) = b?;
                let lr_b = lr_for_batch(
                    &cfg.schedule,
                    cfg.optimizer.lr,
                    epoch,
                    i,
                    batches,
                    cfg.epochs,
                );
                self.step(&x, &y, lr_b, &mut w, &format!("epoch {}", epoch + 1))?;
                bar.inc(1);
                bar.set_message(window_message(&w, t0));
            }
            bar.finish_and_clear();
            let train_secs = t0.elapsed().as_secs_f64();
            self.checkpoint(epoch + 1, None, lr, &w, t0, train_secs)?;
        }
        Ok(())
    }

    fn by_iterations(&mut self, start: usize, total: usize) -> Result<()> {
        let cfg = self.cfg;
        let every = cfg.checkpoint_every.unwrap_or(1000).clamp(1, total);
        let per_epoch = self.batches(0).batches().max(1);
        let bar = progress_bar(
            self.opts.progress && self.leader,
            total as u64,
            "iterations".to_string(),
        );
        bar.set_position(start as u64);
        let mut it = start;
        let (mut w, mut t0) = (Window::default(), Instant::now());
        while it < total {
            let epoch = it / per_epoch;
            let mut batches = self.batches(epoch);
            batches.skip_batches(it % per_epoch);
            for b in batches.prefetch(self.opts.loader)?.take(total - it) {
                let (x, y) = b?;
                let lr = lr_at_iteration(&cfg.schedule, cfg.optimizer.lr, it, total);
                self.step(&x, &y, lr, &mut w, &format!("iteration {}", it + 1))?;
                it += 1;
                bar.inc(1);
                bar.set_message(window_message(&w, t0));
                if it.is_multiple_of(every) || it == total {
                    let secs = t0.elapsed().as_secs_f64();
                    self.checkpoint(epoch + 1, Some(it), lr, &w, t0, secs)?;
                    (w, t0) = (Window::default(), Instant::now());
                }
            }
        }
        bar.finish_and_clear();
        Ok(())
    }
}

fn window_message(w: &Window, t0: Instant) -> String {
    format!(
        "loss {:.4} acc {:.2}% {:.0} img/s",
        w.loss / w.images.max(1) as f64,
        100.0 * w.correct as f64 / w.counted.max(1) as f64,
        w.images as f64 / t0.elapsed().as_secs_f64().max(1e-9)
    )
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

fn progress_bar(show: bool, len: u64, prefix: String) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}
