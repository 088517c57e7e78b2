//! Block-ReLU throughput: fused kernels vs the framework-ops reference on the ReLU-site
//! shapes of ResNet18-CIFAR (batch 64) and ResNet50-ImageNet (batch 32), with a realistic
//! mix of patch sizes, beside a copy of the same tensor measured in the same run (the
//! bandwidth ceiling for a one-read, one-write op).
//!
//! Throughput bytes = input read + output written (8 bytes per element) for every entry,
//! so the GB/s columns compare directly. `cpu::forward` into a preallocated buffer is the
//! kernel itself; `fused_tensor` is the public op (`f_block_relu_with`, allocating its
//! output as the reference does). `*_cold` entries cycle through buffers larger than the
//! last-level cache, so they measure the memory-bound case. Groups: `cpu_*` always,
//! `gpu_*` with `--features cuda` and a CUDA device (each timed region ends with a device
//! synchronize).
//! Run: `cargo bench --bench block_relu` (filter e.g. `-- cpu_`); scripts/bench_table.py
//! turns target/criterion into the BENCHMARKS.md table.
use brelu::ops::{self, cpu, reference, table, Backend};
use brelu::spec::PatchOption;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// (group suffix, NCHW) of the sites benchmarked.
const SHAPES: [(&str, [i64; 4]); 8] = [
    ("r18_64x64x32x32", [64, 64, 32, 32]),
    ("r18_64x128x16x16", [64, 128, 16, 16]),
    ("r18_64x256x8x8", [64, 256, 8, 8]),
    ("r18_64x512x4x4", [64, 512, 4, 4]),
    ("r50_32x256x56x56", [32, 256, 56, 56]),
    ("r50_32x512x28x28", [32, 512, 28, 28]),
    ("r50_32x1024x14x14", [32, 1024, 14, 14]),
    ("r50_32x2048x7x7", [32, 2048, 7, 7]),
];

/// Bytes of input/output buffers the `*_cold` entries cycle through: several times the
/// 32 MiB L3 of the development machines.
const COLD_BYTES: usize = 256 << 20;

/// A spec-like mix: each channel draws uniformly from the catalog below (seeded).
fn patch_mix(c: usize, seed: u64) -> Vec<PatchOption> {
    let catalog = [
        PatchOption::patch(1, 1),
        PatchOption::patch(1, 2),
        PatchOption::patch(2, 1),
        PatchOption::patch(2, 2),
        PatchOption::patch(2, 3),
        PatchOption::patch(3, 3),
        PatchOption::patch(4, 4),
        PatchOption::Identity,
    ];
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..c)
        .map(|_| catalog[r.gen_range(0..catalog.len())])
        .collect()
}

fn group_settings(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    bytes: u64,
) {
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
}

fn cpu_benches(c: &mut Criterion) {
    // As the `brelu` binary does (see its doc); without it `fused_tensor` and `reference`
    // on the 100 MB sites mostly measure 4 KiB page faults of their fresh outputs.
    ops::prefer_huge_pages();
    for (i, (name, shape)) in SHAPES.iter().enumerate() {
        let x = Tensor::randn(*shape, (Kind::Float, Device::Cpu));
        let opts = patch_mix(shape[1] as usize, i as u64);
        let numel = x.numel();
        let xs = Vec::<f32>::try_from(x.flatten(0, -1)).expect("f32 tensor");
        let s = cpu::Shape::new(
            shape[0] as usize,
            shape[1] as usize,
            shape[2] as usize,
            shape[3] as usize,
        );
        let t = table::build_table(&opts, "bench").expect("valid options");
        let mut g = c.benchmark_group(format!("cpu_{name}"));
        group_settings(&mut g, 8 * numel as u64);

        // Copies of the same size: slices on all cores, and torch's copy_.
        let mut dst = vec![0f32; numel];
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.par_chunks_mut(1 << 16)
                    .zip(xs.par_chunks(1 << 16))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            })
        });
        let mut tdst = x.zeros_like();
        g.bench_function("tensor_copy", |b| b.iter(|| tdst.copy_(&x)));
        let mut y = vec![0f32; numel];
        g.bench_function("fused", |b| {
            b.iter(|| cpu::forward(&xs, &mut y, s, &t).expect("forward"))
        });
        g.bench_function("fused_tensor", |b| {
            b.iter(|| ops::f_block_relu_with(Backend::Cpu, &x, &opts).expect("forward"))
        });
        // A plain framework ReLU, allocating its output too: what a site costs without
        // block ReLU.
        g.bench_function("torch_relu", |b| b.iter(|| x.relu()));
        g.bench_function("reference", |b| b.iter(|| reference::block_relu(&x, &opts)));

        // The same in memory-bound form: successive calls cycle through input/output pairs
        // that together exceed the last-level cache, so every call streams from DRAM (the
        // sites above that fit in L3 are otherwise measured against a cache-speed copy).
        let pairs = COLD_BYTES.div_ceil(8 * numel).max(2);
        let cold_x: Vec<Vec<f32>> = (0..pairs).map(|_| xs.clone()).collect();
        let mut cold_y: Vec<Vec<f32>> = (0..pairs).map(|_| vec![1f32; numel]).collect();
        let cold_tx: Vec<Tensor> = (0..pairs).map(|_| x.copy()).collect();
        let mut cold_ty: Vec<Tensor> = (0..pairs).map(|_| x.ones_like()).collect();
        let mut k = 0;
        g.bench_function("memcpy_cold", |b| {
            b.iter(|| {
                k = (k + 1) % pairs;
                cold_y[k]
                    .par_chunks_mut(1 << 16)
                    .zip(cold_x[k].par_chunks(1 << 16))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            })
        });
        g.bench_function("tensor_copy_cold", |b| {
            b.iter(|| {
                k = (k + 1) % pairs;
                cold_ty[k].copy_(&cold_tx[k]);
            })
        });
        g.bench_function("fused_cold", |b| {
            b.iter(|| {
                k = (k + 1) % pairs;
                cpu::forward(&cold_x[k], &mut cold_y[k], s, &t).expect("forward")
            })
        });
        g.finish();
    }
    // Simulation for distortion extraction: 16 perturbations of a CIFAR-sized site.
    let shape = [8i64, 64, 32, 32];
    let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let perts: Vec<(usize, PatchOption)> = patch_mix(16, 99)
        .into_iter()
        .enumerate()
        .map(|(j, o)| (j * 4, o))
        .collect();
    let mut g = c.benchmark_group("cpu_simulate_8x64x32x32_j16");
    // Bytes: x read once, J copies written.
    group_settings(&mut g, 4 * x.numel() as u64 * (1 + perts.len() as u64));
    g.bench_function("fused_tensor", |b| {
        b.iter(|| ops::f_simulate_with(Backend::Cpu, &x, &perts).expect("simulate"))
    });
    g.bench_function("reference", |b| b.iter(|| reference::simulate(&x, &perts)));
    g.finish();
}

/// Bytes of input/output tensors the GPU `*_cold` entries cycle through: 5x the H100's
/// 50 MB L2.
#[cfg(feature = "cuda")]
const GPU_COLD_BYTES: usize = 256 << 20;

#[cfg(feature = "cuda")]
fn gpu_benches(c: &mut Criterion) {
    use std::time::Instant;
    if !tch::Cuda::is_available() {
        eprintln!("gpu benches skipped: no CUDA device");
        return;
    }
    let dev = Device::Cuda(0);
    // Times `iters` runs of `f` between two device synchronisations.
    fn timed(iters: u64, mut f: impl FnMut()) -> Duration {
        tch::Cuda::synchronize(0);
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        tch::Cuda::synchronize(0);
        t.elapsed()
    }
    for (i, (name, shape)) in SHAPES.iter().enumerate() {
        let x = Tensor::randn(*shape, (Kind::Float, dev));
        let opts = patch_mix(shape[1] as usize, i as u64);
        let mut g = c.benchmark_group(format!("gpu_{name}"));
        group_settings(&mut g, 8 * x.numel() as u64);
        let mut dst = x.zeros_like();
        g.bench_function("tensor_copy", |b| {
            b.iter_custom(|n| timed(n, || dst.copy_(&x)))
        });
        g.bench_function("fused_tensor", |b| {
            b.iter_custom(|n| {
                timed(n, || {
                    drop(ops::f_block_relu_with(Backend::Cuda, &x, &opts).expect("forward"))
                })
            })
        });
        g.bench_function("reference", |b| {
            b.iter_custom(|n| timed(n, || drop(reference::block_relu(&x, &opts))))
        });
        // Memory-bound form, as on the CPU: inputs cycled through so that they exceed the
        // L2 (50 MB on an H100), which otherwise serves the smaller sites' copies.
        let pairs = GPU_COLD_BYTES.div_ceil(8 * x.numel()).max(2);
        let cold_x: Vec<Tensor> = (0..pairs).map(|_| x.copy()).collect();
        let mut cold_y: Vec<Tensor> = (0..pairs).map(|_| x.zeros_like()).collect();
        let mut k = 0;
        g.bench_function("tensor_copy_cold", |b| {
            b.iter_custom(|n| {
                timed(n, || {
                    k = (k + 1) % pairs;
                    cold_y[k].copy_(&cold_x[k]);
                })
            })
        });
        g.bench_function("fused_cold", |b| {
            b.iter_custom(|n| {
                timed(n, || {
                    k = (k + 1) % pairs;
                    drop(ops::f_block_relu_with(Backend::Cuda, &cold_x[k], &opts).expect("forward"))
                })
            })
        });
        g.finish();

        // Simulation: 16 perturbations on a quarter of the batch.
        let xs = x.narrow(0, 0, shape[0] / 4).contiguous();
        let perts: Vec<(usize, PatchOption)> = patch_mix(16, 100 + i as u64)
            .into_iter()
            .enumerate()
            .map(|(j, o)| (j * 3 % shape[1] as usize, o))
            .collect();
        let mut g = c.benchmark_group(format!("gpu_simulate_{name}_j16"));
        group_settings(&mut g, 4 * xs.numel() as u64 * (1 + perts.len() as u64));
        g.bench_function("fused_tensor", |b| {
            b.iter_custom(|n| {
                timed(n, || {
                    drop(ops::f_simulate_with(Backend::Cuda, &xs, &perts).expect("simulate"))
                })
            })
        });
        g.bench_function("reference", |b| {
            b.iter_custom(|n| timed(n, || drop(reference::simulate(&xs, &perts))))
        });
        g.finish();
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_benches(_c: &mut Criterion) {}

criterion_group!(benches, cpu_benches, gpu_benches);
criterion_main!(benches);
