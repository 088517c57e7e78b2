//! `brelu train`, `brelu finetune` and `brelu eval`: configuration files in, run directories
//! (checkpoints, metrics) and accuracy figures out.
use super::print_json;
use crate::data::Split;
use crate::dist::Group;
use crate::experiment::Experiment;
use crate::ops::DeviceChoice;
use crate::spec::spec_cost;
use crate::train::{self, Config, TrainOptions};
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training configuration (TOML, see configs/).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Run directory for checkpoints and metrics (default: runs/<config name>).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Continue from the run directory's last finished epoch.
    #[arg(long)]
    pub resume: bool,
    /// Override the configuration's epoch count.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override the iteration count of an iteration-based configuration.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Override the configuration's learning rate (optimizer.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Override the configuration's batch size: images per optimizer step over all ranks.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Override the configuration's gradient accumulation (micro-batches per optimizer step;
    /// e.g. 1 on as many data-parallel ranks as the published GPUs).
    #[arg(long)]
    pub accumulate: Option<usize>,
    /// Override the configuration's seed (initialisation, data order, augmentation).
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda (under a launcher: each rank's GPU, cuda:LOCAL_RANK) or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Teacher weights for a configuration with `[distill]` (fine-tuning: default the
    /// starting weights, i.e. the original network).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Threads decoding and augmenting images of class-folder and segmentation sets (0: the
    /// cores divided by the ranks on this node, LOCAL_WORLD_SIZE). The batches do not depend
    /// on it.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Forward-pass arithmetic: fp32, or bf16 autocast (CPU or CUDA; weights stay f32).
    #[arg(long, value_enum, default_value_t = train::precision::Precision::Fp32)]
    pub precision: train::precision::Precision,
    /// Channels-last weights and inputs (faster convolutions on recent GPUs).
    #[arg(long)]
    pub channels_last: bool,
    /// Data-parallel runs: synchronised batch norm (statistics over all ranks' batches, as
    /// torch.nn.SyncBatchNorm; the published segmentation recipes use it).
    #[arg(long)]
    pub sync_bn: bool,
    /// Data-parallel runs: gradient bucket size in MiB (DDP's bucket_cap_mb). Each full bucket
    /// is all-reduced while the backward pass goes on.
    #[arg(long, default_value_t = crate::dist::BUCKET_MB, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub bucket_mb: usize,
    /// Data-parallel runs: all-reduce the gradients in fp16 or bf16 (DDP's compression hook;
    /// halves the bytes, rounds the gradients).
    #[arg(long, value_enum, default_value_t = crate::dist::GradCompress::None)]
    pub grad_compress: crate::dist::GradCompress,
    /// A training image that cannot be decoded (truncated, corrupt): `error` stops naming the
    /// file; `substitute` replaces it with the next decodable image of this rank's epoch
    /// order, warns, and counts it in the log and metrics.jsonl (`substituted_images`).
    #[arg(long, value_enum, default_value_t = crate::data::BadImages::Error)]
    pub bad_images: crate::data::BadImages,
    /// Batches decoded ahead of the training step.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub prefetch: usize,
}

#[derive(Args, Debug)]
pub struct TrainCmdArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Start from these weights (safetensors) instead of a fresh initialisation, e.g. ResNet50
    /// weights for the avg-pool stem swap (`model = "resnet50-avgpool"`).
    #[arg(long, short)]
    pub weights: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Starting weights (safetensors).
    #[arg(long, short)]
    pub weights: PathBuf,
    /// Block-ReLU spec used at every site during fine-tuning.
    #[arg(long, short)]
    pub spec: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Configuration naming the model and data set.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Weights (safetensors).
    #[arg(long, short)]
    pub weights: PathBuf,
    /// Block-ReLU spec to evaluate with (default: ordinary ReLU).
    #[arg(long, short)]
    pub spec: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reads the configuration and applies the command-line overrides, validating the result
/// like the file itself (the overrides are part of the run's configuration hash, so a resume
/// with other overrides is refused).
fn load_config(path: &Path, a: Option<&TrainArgs>) -> Result<Config> {
    let mut cfg = Config::load(path).context("reading the training configuration")?;
    let Some(a) = a else { return Ok(cfg) };
    if let Some(e) = a.epochs {
        anyhow::ensure!(e > 0, "--epochs must be at least 1");
        anyhow::ensure!(
            cfg.iterations.is_none(),
            "{} counts iterations: use --iterations",
            path.display()
        );
        cfg.epochs = e;
    }
    if let Some(i) = a.iterations {
        anyhow::ensure!(i > 0, "--iterations must be at least 1");
        anyhow::ensure!(
            cfg.iterations.is_some(),
            "{} counts epochs: use --epochs",
            path.display()
        );
        cfg.iterations = Some(i);
    }
    if let Some(lr) = a.lr {
        anyhow::ensure!(
            lr.is_finite() && lr > 0.0,
            "--lr must be a positive number, got {lr}"
        );
        cfg.optimizer.lr = lr;
    }
    if let Some(b) = a.batch_size {
        anyhow::ensure!(b > 0, "--batch-size must be at least 1");
        cfg.batch_size = b;
    }
    if let Some(n) = a.accumulate {
        anyhow::ensure!(n > 0, "--accumulate must be at least 1");
        cfg.accumulate = n;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    cfg.validate(path)
        .context("the configuration with the command-line overrides")?;
    Ok(cfg)
}

/// "top-1 12.34%" or "mIoU 12.34% pixel acc 56.78%".
fn metric_text(r: &train::EvalResult) -> String {
    match &r.segmentation {
        Some(s) => format!(
            "mIoU {:.2}% pixel acc {:.2}%",
            100.0 * s.miou,
            100.0 * s.pixel_accuracy
        ),
        None => format!("top-1 {:.2}% top-5 {:.2}%", 100.0 * r.top1, 100.0 * r.top5),
    }
}

fn loader_options(a: &TrainArgs) -> crate::data::LoaderOptions {
    crate::data::LoaderOptions {
        workers: a.workers,
        prefetch: a.prefetch,
        bad_images: a.bad_images,
    }
}

fn run_training(a: &TrainArgs, weights: Option<&Path>, spec: Option<&Path>) -> Result<()> {
    let cfg = load_config(&a.config, Some(a))?;
    let (device, group) = Group::from_env(a.device)?;
    let leader = group.as_ref().is_none_or(|g| g.is_leader());
    let run_dir = a.output.clone().unwrap_or_else(|| {
        let stem = a
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        PathBuf::from("runs").join(stem)
    });
    let mut model = Experiment::of_config(&cfg)
        .with_weights(weights)
        .with_spec(spec)
        .model_on(device)?;
    let opts = TrainOptions {
        run_dir: run_dir.clone(),
        resume: a.resume,
        progress: true,
        spec: spec.map(Path::to_path_buf),
        weights: weights.map(Path::to_path_buf),
        teacher: a.teacher.clone().or_else(|| weights.map(Path::to_path_buf)),
        group,
        loader: loader_options(a),
        precision: a.precision,
        channels_last: a.channels_last,
        sync_bn: a.sync_bn,
        ddp: train::DdpOptions {
            bucket_mb: a.bucket_mb,
            compress: a.grad_compress,
        },
    };
    let metrics = train::train(&cfg, &mut model, &opts)
        .with_context(|| format!("training {} into {}", cfg.model, run_dir.display()))?;
    if !leader {
        return Ok(());
    }
    let (unit, total) = match cfg.iterations {
        Some(n) => ("iteration", n),
        None => ("epoch", cfg.epochs),
    };
    for m in &metrics {
        eprintln!(
            "{unit} {:>3}/{total}  lr {:.2e}  train loss {:.4} acc {:.2}%  test loss {:.4} \
             {}  {:.1}s ({:.0} img/s)",
            m.iteration.unwrap_or(m.epoch),
            m.lr,
            m.train_loss,
            100.0 * m.train_top1,
            m.test.loss,
            metric_text(&m.test),
            m.seconds,
            m.images_per_s
        );
    }
    if metrics.is_empty() {
        eprintln!(
            "nothing to do: {} already finished {total} {unit}s",
            run_dir.display(),
        );
    }
    eprintln!(
        "weights: {}",
        run_dir.join(train::CHECKPOINT_WEIGHTS).display()
    );
    Ok(())
}

pub fn train_cmd(a: TrainCmdArgs) -> Result<()> {
    run_training(&a.train, a.weights.as_deref(), None)
}

pub fn finetune_cmd(a: FinetuneArgs) -> Result<()> {
    run_training(&a.train, Some(&a.weights), Some(&a.spec))
}

#[derive(Serialize)]
struct EvalReport {
    model: String,
    weights: PathBuf,
    spec: Option<PathBuf>,
    #[serde(flatten)]
    result: train::EvalResult,
    relus: usize,
    drelus: usize,
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let cfg = load_config(&a.config, None)?;
    let exp = Experiment::of_config(&cfg)
        .with_weights(Some(&a.weights))
        .with_spec(a.spec.as_deref())
        .with_device(a.device);
    let model = exp.load_model()?;
    let relus: usize = model.sites().iter().map(|s| s.relus()).sum();
    let drelus = match exp.load_spec(&model)? {
        Some(spec) => spec_cost(&spec, model.sites()).drelus,
        None => relus,
    };
    let test = cfg
        .source()
        .load_split(Split::Test)
        .context("loading the test set")?;
    let result = train::evaluate(
        &model,
        &test,
        &cfg.dataset.normalization(),
        cfg.eval_batch_size.unwrap_or(cfg.batch_size),
    )?;
    let r = EvalReport {
        model: cfg.model.clone(),
        weights: a.weights.clone(),
        spec: a.spec.clone(),
        result,
        relus,
        drelus,
    };
    if a.json {
        return print_json(&r);
    }
    println!(
        "{} on {} test images: {}  loss {:.4}  DReLUs {} of {} ReLUs ({:.2}%)",
        r.model,
        r.result.images,
        metric_text(&r.result),
        r.result.loss,
        r.drelus,
        r.relus,
        100.0 * r.drelus as f64 / r.relus.max(1) as f64
    );
    if let Some(s) = &r.result.segmentation {
        println!("per-class IoU (%; '-': class absent from labels and predictions):");
        let cells: Vec<String> = s
            .per_class_iou
            .iter()
            .enumerate()
            .map(|(c, v)| match v {
                Some(v) => format!("{c:>3}: {:>6.2}", 100.0 * v),
                None => format!("{c:>3}: {:>6}", "-"),
            })
            .collect();
        for row in cells.chunks(6) {
            println!("  {}", row.join("  "));
        }
    }
    Ok(())
}
