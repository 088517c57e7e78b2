//! `brelu bench`: measurements of the scale-out machinery on the machine at hand, each printed
//! as one JSON object so that scripts/bench-cluster.sh can set them beside PyTorch's figures.
//!
//! - `allreduce`: one gradient-sized all-reduce over the ranks of a launcher (c10d Gloo or
//!   NCCL), as nccl-tests reports it: time, algorithm and bus bandwidth.
//! - `loader`: images per second of the training loader on a configuration's training split.
//! - `overlap`: one epoch's wall time next to its decoding alone and its computation alone.
use crate::data::{BatchIter, LoaderOptions, Split};
use crate::dist::{Group, Launch};
use crate::train::{self, Config};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time a sum all-reduce of N floats over the ranks of a torchrun/Slurm launch (Gloo on
    /// the CPU, NCCL with --device cuda); rank 0 prints the medians.
    Allreduce(AllreduceArgs),
    /// Images per second of the training loader (decode, augment, normalise) on the
    /// configuration's training split.
    Loader(LoaderArgs),
    /// One training epoch's wall time against the same epoch's decoding alone and its
    /// computation alone (on one cached batch): how well the loader overlaps.
    Overlap(LoaderArgs),
}

#[derive(Args, Debug)]
pub struct AllreduceArgs {
    /// Floats per all-reduce (ResNet50's gradient: 25,557,032).
    #[arg(long, default_value_t = 25_600_000)]
    pub floats: usize,
    /// Timed repetitions (after two warm-up ones).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// cpu (Gloo) or cuda (NCCL, cuda:LOCAL_RANK).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct LoaderArgs {
    /// Training configuration naming the data set (batch size and augmentation from it).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Decoding threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Batches decoded ahead.
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// Stop after this many batches (default: one epoch).
    #[arg(long)]
    pub batches: Option<usize>,
}

pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Allreduce(a) => allreduce(a),
        BenchCommand::Loader(a) => loader(a),
        BenchCommand::Overlap(a) => overlap(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[derive(Serialize)]
struct AllreduceReport {
    engine: &'static str,
    backend: &'static str,
    ranks: usize,
    floats: usize,
    median_s: f64,
    min_s: f64,
    /// Bytes / time.
    algbw_gb_s: f64,
    /// algbw * 2 (n - 1) / n, as nccl-tests reports it.
    busbw_gb_s: f64,
}

fn allreduce(a: AllreduceArgs) -> Result<()> {
    let Some(l) = Launch::from_env()? else {
        bail!("run under a launcher with at least 2 ranks (RANK, WORLD_SIZE, MASTER_ADDR set)");
    };
    let device = crate::ops::parse_device(Some(&match a.device.as_str() {
        "cuda" => format!("cuda:{}", l.local_rank),
        d => d.to_string(),
    }))?;
    let g = Group::join(&l, device.is_cuda(), crate::dist::timeout_from_env()?)?;
    let t = Tensor::ones([a.floats as i64], (Kind::Float, device));
    let mut times = Vec::new();
    for i in 0..a.iters + 2 {
        g.barrier()?;
        let t0 = Instant::now();
        g.all_reduce_sum(&t)?;
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    if g.is_leader() {
        let m = median(times.clone());
        let bytes = (a.floats * 4) as f64;
        let n = g.world as f64;
        super::print_json(&AllreduceReport {
            engine: "brelu (c10d shim)",
            backend: if g.nccl { "nccl" } else { "gloo" },
            ranks: g.world,
            floats: a.floats,
            median_s: m,
            min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
            algbw_gb_s: bytes / m / 1e9,
            busbw_gb_s: bytes / m / 1e9 * 2.0 * (n - 1.0) / n,
        })?;
    }
    Ok(())
}

fn setup(a: &LoaderArgs) -> Result<(Config, crate::data::Dataset)> {
    let cfg = Config::load(&a.config).context("reading the training configuration")?;
    let data = train::load_split(&cfg, Split::Train)?;
    Ok((cfg, data))
}

fn batches<'a>(cfg: &Config, data: &'a crate::data::Dataset) -> BatchIter<'a> {
    BatchIter::train(
        data,
        cfg.batch_size,
        cfg.seed,
        0,
        cfg.dataset.augmentation(),
        cfg.dataset.normalization(),
        tch::Device::Cpu,
    )
}

#[derive(Serialize)]
struct LoaderReport {
    engine: &'static str,
    workers: usize,
    batch_size: usize,
    images: usize,
    seconds: f64,
    images_per_s: f64,
}

/// Decodes up to `limit` batches; (images, seconds).
fn drain(it: BatchIter<'_>, o: LoaderOptions, limit: Option<usize>) -> Result<(usize, f64)> {
    let t0 = Instant::now();
    let mut n = 0;
    for b in it.prefetch(o)?.take(limit.unwrap_or(usize::MAX)) {
        n += b?.0.size()[0] as usize;
    }
    Ok((n, t0.elapsed().as_secs_f64()))
}

fn loader(a: LoaderArgs) -> Result<()> {
    let (cfg, data) = setup(&a)?;
    let o = LoaderOptions {
        workers: a.workers,
        prefetch: a.prefetch,
    };
    let (images, seconds) = drain(batches(&cfg, &data), o, a.batches)?;
    super::print_json(&LoaderReport {
        engine: "brelu",
        workers: a.workers,
        batch_size: cfg.batch_size,
        images,
        seconds,
        images_per_s: images as f64 / seconds,
    })
}

#[derive(Serialize)]
struct OverlapReport {
    batches: usize,
    decode_s: f64,
    compute_s: f64,
    epoch_s: f64,
    /// epoch / max(decode, compute): 1.0 is perfect overlap.
    ratio: f64,
}

fn overlap(a: LoaderArgs) -> Result<()> {
    let (cfg, data) = setup(&a)?;
    let o = LoaderOptions {
        workers: a.workers,
        prefetch: a.prefetch,
    };
    let model = train::build_model(&cfg, tch::Device::Cpu)?;
    let opt_cfg = &cfg.optimizer;
    let mut opt = train::sgd::Sgd::new(
        model.var_store(),
        opt_cfg.lr,
        opt_cfg.momentum,
        opt_cfg.weight_decay,
    );
    let count = batches(&cfg, &data)
        .batches()
        .min(a.batches.unwrap_or(usize::MAX));
    let (_, decode_s) = drain(batches(&cfg, &data), o, Some(count))?;
    let mut step = |x: &Tensor, y: &Tensor| -> Result<()> {
        let loss = model.forward_t(x, true).cross_entropy_for_logits(y);
        opt.backward_step(&loss)?;
        Ok(())
    };
    let (x, y) = batches(&cfg, &data)
        .next()
        .context("an empty training split")??;
    let t0 = Instant::now();
    for _ in 0..count {
        step(&x, &y)?;
    }
    let compute_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for b in batches(&cfg, &data).prefetch(o)?.take(count) {
        let (x, y) = b?;
        step(&x, &y)?;
    }
    let epoch_s = t0.elapsed().as_secs_f64();
    super::print_json(&OverlapReport {
        batches: count,
        decode_s,
        compute_s,
        epoch_s,
        ratio: epoch_s / decode_s.max(compute_s),
    })
}
