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
pub mod config;
pub mod schedule;
pub mod sgd;

pub use config::{Config, DatasetConfig, OptimizerConfig, ScheduleConfig, ScheduleKind};
pub use schedule::{lr_at, lr_at_progress, lr_for_batch};

use crate::data::{self, BatchIter, Dataset, DatasetKind, Normalize, Split};
use crate::error::{write_atomic, Error, Result};
use crate::models::{find, ArchConfig, Model};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The normalisation used for a data set kind: the published per-channel training-set
/// statistics (so evaluation needs no pass over the training set).
pub fn normalization(kind: DatasetKind) -> Normalize {
    let (mean, std): (&[f64], &[f64]) = match kind {
        DatasetKind::Mnist => (&[0.1307], &[0.3081]),
        DatasetKind::FashionMnist => (&[0.2860], &[0.3530]),
        DatasetKind::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
        DatasetKind::Cifar100 => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
        DatasetKind::Imagenet => (&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225]),
    };
    Normalize {
        mean: mean.to_vec(),
        std: std.to_vec(),
    }
}

/// Loads a split of the configured data set, capped by `train_limit` / `test_limit`, and
/// checks the image size against the configured input.
pub fn load_split(cfg: &Config, split: Split) -> Result<Dataset> {
    let dir = cfg.dataset.dir();
    let mut d = data::load_sized(cfg.dataset.kind, &dir, split, cfg.input, cfg.num_classes)?;
    let limit = match split {
        Split::Train => cfg.train_limit,
        Split::Test => cfg.test_limit,
    };
    if let Some(n) = limit {
        d.truncate(n);
    }
    if d.image_shape() != cfg.input {
        return Err(Error::data(
            &dir,
            format!(
                "images are {:?} but the configuration's input is {:?}",
                d.image_shape(),
                cfg.input
            ),
        ));
    }
    Ok(d)
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
    /// Fraction in [0, 1].
    pub top1: f64,
    /// Fraction in [0, 1] (top-k with k = min(5, classes)).
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    pub images: usize,
}

/// Evaluates `model` (evaluation mode, no gradients) on `data` in order.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<EvalResult> {
    let _g = tch::no_grad_guard();
    let k = 5.min(data.num_classes) as i64;
    let (mut loss, mut c1, mut c5, mut n) = (0f64, 0i64, 0i64, 0usize);
    for b in BatchIter::eval(data, batch_size, normalize.clone(), model.device()) {
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
    })
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    /// 1-based number of the finished epoch.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
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

/// Keeps the metrics lines of epochs `<= upto` (drops those of a run being redone).
fn trim_metrics(path: &Path, upto: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut keep = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let m: EpochMetrics =
            serde_json::from_str(line).map_err(|e| Error::parse(path, e.to_string()))?;
        if m.epoch <= upto {
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
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let hash = cfg.hash();
    let metrics_path = dir.join(METRICS);
    let mut start = 0;
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
        }
    }
    trim_metrics(&metrics_path, start)?;
    let norm = normalization(cfg.dataset.kind);
    let augment = cfg.dataset.augmentation();
    let eval_bs = cfg.eval_batch_size.unwrap_or(cfg.batch_size);
    let o = &cfg.optimizer;
    let mut opt = sgd::Sgd::new(model.var_store(), o.lr, o.momentum, o.weight_decay);
    if start > 0 && dir.join(CHECKPOINT_OPTIMIZER).exists() {
        opt.load(&dir.join(CHECKPOINT_OPTIMIZER))?;
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
    let mut out = Vec::new();
    for epoch in start..cfg.epochs {
        let lr = lr_at(&cfg.schedule, o.lr, epoch, cfg.epochs);
        opt.lr = lr;
        let t0 = Instant::now();
        let it = BatchIter::train(
            train_set,
            cfg.batch_size,
            cfg.seed,
            epoch,
            augment,
            norm.clone(),
            model.device(),
        );
        let bar = progress_bar(opts.progress, it.batches() as u64, epoch, cfg.epochs);
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0i64, 0usize);
        let batches = it.batches();
        for (i, b) in it.enumerate() {
            opt.lr = lr_for_batch(&cfg.schedule, o.lr, epoch, i, batches, cfg.epochs);
            let (x, y) = b?;
            let b = y.size()[0];
            let logits = model.forward_t(&x, true);
            let ce = logits.cross_entropy_for_logits(&y);
            let loss = match (&teacher, &cfg.distill) {
                (Some(t), Some(d)) => {
                    let tl = tch::no_grad(|| t.forward_t(&x, false));
                    ce + distillation_loss(&logits, &tl, d.alpha, d.temperature)
                }
                _ => ce,
            };
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "training diverged at epoch {} (loss {l}); lower optimizer.lr",
                    epoch + 1
                )));
            }
            loss_sum += l * b as f64;
            correct += logits
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            seen += b as usize;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% {:.0} img/s",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / t0.elapsed().as_secs_f64().max(1e-9)
            ));
        }
        bar.finish_and_clear();
        let train_secs = t0.elapsed().as_secs_f64();
        let test = evaluate(model, test_set, &norm, eval_bs)?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_top1: correct as f64 / seen.max(1) as f64,
            test,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s: seen as f64 / train_secs.max(1e-9),
        };
        append_line(&metrics_path, &serde_json::to_string(&m).expect("metrics"))?;
        model.save_weights(&dir.join(CHECKPOINT_WEIGHTS))?;
        opt.save(&dir.join(CHECKPOINT_OPTIMIZER))?;
        let ck = Checkpoint {
            epoch: epoch + 1,
            seed: cfg.seed,
            config_hash: hash.clone(),
            spec: opts.spec.clone(),
            momentum_saved: true,
            last: Some(m.clone()),
        };
        let text = serde_json::to_string_pretty(&ck).expect("checkpoint");
        write_atomic(&dir.join(CHECKPOINT_JSON), text.as_bytes())?;
        out.push(m);
    }
    Ok(out)
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

fn progress_bar(show: bool, len: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
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
    bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    bar
}

/// Picks the device: `cpu` (default), `cuda` or `cuda:N` (only when CUDA is available).
pub fn parse_device(s: Option<&str>) -> Result<Device> {
    match s.unwrap_or("cpu") {
        "cpu" => Ok(Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            if !tch::Cuda::is_available() {
                return Err(Error::InvalidArgument(format!(
                    "device {d}: CUDA is not available in this libtorch/machine"
                )));
            }
            let n = match d.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::InvalidArgument(format!("device {d}: expected cuda:N")))?,
                None => 0,
            };
            if n >= tch::Cuda::device_count() as usize {
                return Err(Error::InvalidArgument(format!(
                    "device {d}: only {} CUDA device(s)",
                    tch::Cuda::device_count()
                )));
            }
            Ok(Device::Cuda(n))
        }
        d => Err(Error::InvalidArgument(format!(
            "unknown device '{d}' (expected cpu, cuda or cuda:N)"
        ))),
    }
}
