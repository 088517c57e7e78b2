//! Knapsack benchmarks: the exact solver against a reference that follows the published
//! structure (full uint8 back-pointer table, one pass per option over the whole budget row,
//! every option of every channel), on a ResNet18-CIFAR-sized instance at 6%; and the exact and
//! Lagrangian solvers on a ResNet50-ImageNet-sized instance (run with
//! `cargo bench --bench knapsack -- resnet50`). Instances are synthetic with a realistic shape:
//! distortion grows with patch area, identity is the largest.
use brelu::distortion::DistortionTables;
use brelu::knapsack::{dp, lagrange, BuildOptions, Problem};
use brelu::models::{find, sites};
use brelu::spec::Catalog;
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::{Duration, Instant};

fn synthetic(model: &str, input: [usize; 3]) -> (Problem, Problem) {
    let infos = sites(find(model).unwrap(), input).unwrap();
    let t = DistortionTables::synthetic(model, input, &infos, &Catalog::builtin(), 12345);
    let p = Problem::build(&t, &infos, BuildOptions::default()).unwrap();
    let raw = Problem::build(
        &t,
        &infos,
        BuildOptions {
            raw: true,
            ..Default::default()
        },
    )
    .unwrap();
    (p, raw)
}

/// The published structure: dp rows over the whole budget, one pass per option, a full
/// channels x (budget+1) uint8 back-pointer table, then a backtrack.
fn reference(p: &Problem, budget: u64) -> (f64, Vec<usize>) {
    let b1 = budget as usize + 1;
    let n = p.items.len();
    let mut bp = vec![0u8; n * b1];
    let mut prev = vec![0.0f64; b1];
    let mut cur = vec![0.0f64; b1];
    for (c, items) in p.items.iter().enumerate() {
        cur.fill(f64::INFINITY);
        let row = &mut bp[c * b1..(c + 1) * b1];
        for (k, it) in items.iter().enumerate() {
            let cost = it.cost as usize;
            for b in cost..b1 {
                let v = prev[b - cost] + it.dist;
                if v < cur[b] {
                    cur[b] = v;
                    row[b] = k as u8;
                }
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let mut choice = vec![0; n];
    let mut b = budget as usize;
    for c in (0..n).rev() {
        let k = bp[c * b1 + b] as usize;
        choice[c] = k;
        b -= p.items[c][k].cost as usize;
    }
    (prev[budget as usize], choice)
}

fn resnet18(c: &mut Criterion) {
    let (p, raw) = synthetic("resnet18-cifar", [3, 32, 32]);
    let budget = (p.relus() as f64 * 0.06).floor() as u64;
    // One-shot comparison printed beside criterion's numbers (same process, same instance).
    let t = Instant::now();
    let (ref_obj, _) = reference(&raw, budget);
    let t_ref = t.elapsed();
    let t = Instant::now();
    let ex = dp::solve(&p, budget, 2_000_000_000).unwrap();
    let t_ex = t.elapsed();
    let rel = (ex.objective - ref_obj).abs() / ref_obj;
    eprintln!(
        "resnet18-cifar 6% (budget {budget}, {} channels): reference {:.3} s, exact {:.3} s ({:.1}x), objective rel. diff {rel:.2e}",
        p.items.len(),
        t_ref.as_secs_f64(),
        t_ex.as_secs_f64(),
        t_ref.as_secs_f64() / t_ex.as_secs_f64()
    );
    let mut g = c.benchmark_group("knapsack-resnet18-cifar-6pct");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("reference", |b| b.iter(|| reference(&raw, budget)));
    g.bench_function("exact", |b| {
        b.iter(|| dp::solve(&p, budget, 2_000_000_000).unwrap())
    });
    g.bench_function("lagrange", |b| {
        b.iter(|| lagrange::solve(&p, budget).unwrap())
    });
    g.finish();
}

fn resnet50(c: &mut Criterion) {
    let (p, _) = synthetic("resnet50", [3, 224, 224]);
    let budget = (p.relus() as f64 * 0.06).floor() as u64;
    let t = Instant::now();
    let lg = lagrange::solve(&p, budget).unwrap();
    let t_lg = t.elapsed();
    let reduced = dp::reduce(&p, budget).unwrap();
    let plan = dp::plan(&reduced.problem, budget, 2_000_000_000).unwrap();
    let items = |q: &Problem| q.items.iter().map(Vec::len).sum::<usize>();
    eprintln!(
        "resnet50 6%: reduced-cost fixing keeps {} of {} items",
        items(&reduced.problem),
        items(&p)
    );
    let t = Instant::now();
    let ex = dp::solve(&p, budget, 2_000_000_000).unwrap();
    let t_ex = t.elapsed();
    eprintln!(
        "resnet50 6% (budget {budget}, {} channels): exact {:.1} s (planned DP peak {:.2} GB, {:.2e} cells; process peak RSS so far {}), lagrange {:.3} s, lagrange rel. gap to its bound {:.2e}, to exact {:.2e}",
        p.items.len(),
        t_ex.as_secs_f64(),
        plan.peak_bytes as f64 / 1e9,
        plan.cells,
        peak_rss(),
        t_lg.as_secs_f64(),
        lg.gap() / lg.objective,
        (lg.objective - ex.objective) / ex.objective
    );
    let mut g = c.benchmark_group("knapsack-resnet50-6pct");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("lagrange", |b| {
        b.iter(|| lagrange::solve(&p, budget).unwrap())
    });
    g.finish();
}

/// VmHWM of this process (Linux), e.g. "812 MB".
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

criterion_group!(benches, resnet18, resnet50);
criterion_main!(benches);
