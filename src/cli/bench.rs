//! `brelu bench`: measurements of the scale-out machinery on the machine at hand, each printed
//! as one JSON object so that scripts/bench-cluster.sh can set them beside PyTorch's figures.
//!
//! - `allreduce`: one gradient-sized all-reduce over the ranks of a launcher (c10d Gloo or
//!   NCCL), as nccl-tests reports it: time, algorithm and bus bandwidth.
//! - `loader`: images per second of the training loader on a configuration's training split.
//! - `overlap`: one epoch's wall time next to its decoding alone and its computation alone.
//! - `ddp`: a data-parallel training step with DDP's Reducer (gradient all-reduce during the
//!   backward pass) against the backward pass followed by the all-reduce: how much of the
//!   all-reduce the backward pass hides.
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
    /// Under a launcher: a data-parallel forward + backward with DDP's Reducer (all-reduce
    /// while the backward pass runs) against the same pass then the all-reduce of every
    /// gradient, and the pass alone; rank 0 prints the medians and the fraction hidden.
    Ddp(DdpArgs),
    /// Listing a class-folder split: a `stat` per file (brelu before the folder index) against
    /// one walk on the entry types `readdir` gives, and against reading the cached index.
    Listing(ListingArgs),
}

#[derive(Args, Debug)]
pub struct ListingArgs {
    /// Data set root (ROOT/train/<class>/*.JPEG).
    pub root: PathBuf,
    /// First create ROOT with this many empty .JPEG files in 1000 class folders (the root must
    /// not exist yet).
    #[arg(long)]
    pub generate: Option<usize>,
    /// Timed repetitions of each (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

#[derive(Args, Debug)]
pub struct DdpArgs {
    /// Training configuration naming the model, its input and classes (no data is read:
    /// random images).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Images per rank per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed steps of each kind (after two warm-up ones; medians are reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Gradient bucket size in MiB.
    #[arg(long, default_value_t = crate::dist::BUCKET_MB)]
    pub bucket_mb: usize,
    /// libtorch's threads per rank (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
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
    pub device: crate::ops::DeviceChoice,
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
        BenchCommand::Listing(a) => listing(a),
        BenchCommand::Ddp(a) => ddp(a),
    }
}

#[derive(Serialize)]
struct ListingReport {
    files: usize,
    stat_per_file_s: f64,
    walk_s: f64,
    index_s: f64,
    walk_speedup: f64,
    index_speedup: f64,
}

/// The listing brelu did before the index: per class folder, `is_dir` on it and `is_file` (a
/// `stat`) on every entry. Kept here only as the benchmark's baseline.
fn list_with_stat(root: &std::path::Path) -> Result<usize> {
    let dir = root.join("train");
    let mut n = 0;
    for c in std::fs::read_dir(&dir)? {
        let c = c?.path();
        if !c.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&c)? {
            let p = e?.path();
            let img = p
                .extension()
                .map(|x| x.to_string_lossy().to_ascii_lowercase())
                .is_some_and(|x| ["jpg", "jpeg", "png"].contains(&x.as_str()));
            if p.is_file() && img {
                n += 1;
            }
        }
    }
    Ok(n)
}

fn listing(a: ListingArgs) -> Result<()> {
    use crate::data::folder;
    if let Some(n) = a.generate {
        anyhow::ensure!(
            !a.root.exists(),
            "{} exists; --generate makes a new tree",
            a.root.display()
        );
        for i in 0..n {
            let d = a.root.join("train").join(format!("n{:08}", i % 1000));
            if i < 1000 {
                std::fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
            }
            let f = d.join(format!("n{:08}_{i}.JPEG", i % 1000));
            std::fs::File::create(&f).with_context(|| f.display().to_string())?;
        }
    }
    let index = tempfile_dir()?;
    let time = |f: &dyn Fn() -> Result<usize>| -> Result<(f64, usize)> {
        let mut t = Vec::new();
        let mut n = 0;
        for _ in 0..a.repeats.max(1) {
            let t0 = Instant::now();
            n = f()?;
            t.push(t0.elapsed().as_secs_f64());
        }
        Ok((median(t), n))
    };
    let (stat, files) = time(&|| list_with_stat(&a.root))?;
    let (walk, n) = time(&|| Ok(folder::open(&a.root, Split::Train, 224)?.paths.len()))?;
    anyhow::ensure!(
        n == files,
        "the two listings disagree: {n} and {files} files"
    );
    folder::open_indexed(&a.root, Split::Train, 224, Some(&index))?;
    let (idx, _) = time(&|| {
        Ok(
            folder::open_indexed(&a.root, Split::Train, 224, Some(&index))?
                .paths
                .len(),
        )
    })?;
    let _ = std::fs::remove_dir_all(&index);
    println!(
        "{}",
        serde_json::to_string(&ListingReport {
            files,
            stat_per_file_s: stat,
            walk_s: walk,
            index_s: idx,
            walk_speedup: stat / walk,
            index_speedup: stat / idx,
        })?
    );
    Ok(())
}

/// A fresh directory for the benchmark's index.
fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("brelu-bench-index-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
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

/// This rank's place in the launch; the multi-rank benchmarks need one.
fn launched() -> Result<Launch> {
    match Launch::from_env()? {
        Some(l) => Ok(l),
        None => {
            bail!("run under a launcher with at least 2 ranks (RANK, WORLD_SIZE, MASTER_ADDR set)")
        }
    }
}

fn allreduce(a: AllreduceArgs) -> Result<()> {
    let l = launched()?;
    let device = l.device(a.device)?;
    let g = Group::join(&l, device, crate::dist::Timeouts::from_env()?)?;
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

#[derive(Serialize)]
struct DdpReport {
    model: String,
    ranks: usize,
    images_per_rank: usize,
    gradient_floats: i64,
    buckets_mb: usize,
    /// Forward + backward, gradients kept local.
    compute_s: f64,
    /// Forward + backward, then every gradient all-reduced (flattened in buckets).
    sequential_s: f64,
    /// Forward + backward with the Reducer's all-reduce overlapped.
    reducer_s: f64,
    /// The all-reduce alone: sequential - compute.
    allreduce_s: f64,
    /// (sequential - reducer) / allreduce: 1.0 hides the whole all-reduce.
    hidden_fraction: f64,
    /// sequential / reducer.
    speedup: f64,
}

fn ddp(a: DdpArgs) -> Result<()> {
    let l = launched()?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    let cfg = Config::load(&a.config).context("reading the training configuration")?;
    let g = std::rc::Rc::new(Group::join(
        &l,
        tch::Device::Cpu,
        crate::dist::Timeouts::from_env()?,
    )?);
    let model = train::build_model(&cfg, tch::Device::Cpu)?;
    // The trainable variables in the training step's order (sorted by name).
    let params = train::sgd::Sgd::new(model.var_store(), 0.0, 0.0, 0.0).params();
    let reducer = crate::dist::Ddp::new(
        g.clone(),
        &params,
        a.bucket_mb << 20,
        crate::dist::GradCompress::None,
    )?;
    let [c, h, w] = cfg.input.map(|d| d as i64);
    tch::manual_seed(g.rank as i64);
    let x = Tensor::randn([a.batch as i64, c, h, w], (Kind::Float, tch::Device::Cpu));
    let y = Tensor::randint(
        cfg.num_classes as i64,
        [a.batch as i64],
        (Kind::Int64, tch::Device::Cpu),
    );
    let zero = || {
        for p in &params {
            let mut gr = p.grad();
            if gr.defined() {
                let _ = gr.zero_();
            }
        }
    };
    let pass = || model.forward_t(&x, true).cross_entropy_for_logits(&y);
    // The all-reduce brelu ran before the Reducer: after the backward pass, buckets of the
    // flattened gradients, each summed and divided by the world size.
    let after = || -> Result<()> {
        let _g = tch::no_grad_guard();
        let bytes = params.iter().map(|p| p.numel() * 4);
        for b in crate::dist::buckets(bytes, a.bucket_mb << 20) {
            let grads: Vec<Tensor> = b.iter().map(|&i| params[i].grad().view([-1])).collect();
            let flat = Tensor::cat(&grads, 0);
            g.all_reduce_sum(&flat)?;
            let mut off = 0;
            for &i in &b {
                let (p, k) = (&params[i], params[i].numel() as i64);
                p.grad()
                    .copy_(&(flat.narrow(0, off, k) / g.world as f64).view_as(&p.grad()));
                off += k;
            }
        }
        Ok(())
    };
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for it in 0..a.iters + 2 {
        for (kind, t) in times.iter_mut().enumerate() {
            zero();
            g.barrier()?;
            let t0 = Instant::now();
            let loss = pass();
            if kind == 2 {
                reducer.arm()?;
            }
            loss.f_backward().context("backward pass")?;
            if kind == 1 {
                after()?;
            }
            if it >= 2 {
                t.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    if g.is_leader() {
        let [compute_s, sequential_s, reducer_s] = times.map(median);
        let allreduce_s = (sequential_s - compute_s).max(1e-12);
        super::print_json(&DdpReport {
            model: cfg.model.clone(),
            ranks: g.world,
            images_per_rank: a.batch,
            gradient_floats: params.iter().map(|p| p.numel() as i64).sum(),
            buckets_mb: a.bucket_mb,
            compute_s,
            sequential_s,
            reducer_s,
            allreduce_s,
            hidden_fraction: (sequential_s - reducer_s) / allreduce_s,
            speedup: sequential_s / reducer_s,
        })?;
    }
    Ok(())
}

fn setup(a: &LoaderArgs) -> Result<(Config, crate::data::Dataset)> {
    let cfg = Config::load(&a.config).context("reading the training configuration")?;
    let data = train::load_split(&cfg, Split::Train)?;
    Ok((cfg, data))
}

/// One process's micro-batches of the configuration (`batch_size / accumulate` images).
fn batches<'a>(cfg: &Config, data: &'a crate::data::Dataset) -> BatchIter<'a> {
    BatchIter::train(
        data,
        cfg.batch_size / cfg.accumulate.max(1),
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
        ..Default::default()
    };
    let (images, seconds) = drain(batches(&cfg, &data), o, a.batches)?;
    super::print_json(&LoaderReport {
        engine: "brelu",
        workers: a.workers,
        batch_size: cfg.batch_size / cfg.accumulate.max(1),
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
        ..Default::default()
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
