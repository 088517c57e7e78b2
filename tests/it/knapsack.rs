//! Knapsack solvers against brute force on small random instances, the Lagrangian certificate
//! against the exact optimum, and the CLI end to end on synthetic tables for a real model.
use brelu::distortion::{DistortionTables, SiteTable};
use brelu::knapsack::{dp, lagrange, BuildOptions, Problem};
use brelu::models::{find, sites};
use brelu::spec::{Catalog, PatchOption, SiteInfo, Spec};
use indexmap::IndexMap;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const OPTIONS: [PatchOption; 6] = [
    PatchOption::Patch { bh: 1, bw: 1 },
    PatchOption::Patch { bh: 1, bw: 2 },
    PatchOption::Patch { bh: 2, bw: 1 },
    PatchOption::Patch { bh: 2, bw: 2 },
    PatchOption::Patch { bh: 3, bw: 3 },
    PatchOption::Identity,
];

/// A random instance: `n_sites` sites of a few channels; distortions are small integers (so
/// ties happen) with some infinite entries; identity is always finite.
fn instance(rng: &mut Rng, n_sites: usize, max_ch: u64) -> (Vec<SiteInfo>, DistortionTables) {
    let mut infos = Vec::new();
    let mut tables = IndexMap::new();
    for s in 0..n_sites {
        let (h, w) = (3 + rng.below(3) as usize, 3 + rng.below(3) as usize);
        let c = 1 + rng.below(max_ch) as usize;
        let name = format!("s{s}");
        let mut values = Vec::new();
        for _ in 0..c {
            for (k, o) in OPTIONS.iter().enumerate() {
                let v = if k == 0 {
                    0.0
                } else if *o != PatchOption::Identity && rng.below(8) == 0 {
                    f64::INFINITY
                } else {
                    rng.below(6) as f64 * 0.25
                };
                values.push(v);
            }
        }
        infos.push(SiteInfo {
            name: name.clone(),
            channels: c,
            height: h,
            width: w,
        });
        tables.insert(
            name,
            SiteTable {
                shape: [c, h, w],
                options: OPTIONS.to_vec(),
                values,
            },
        );
    }
    let t = DistortionTables {
        model: "toy".into(),
        input: [3, 8, 8],
        estimator: "exact".into(),
        samples: 1,
        seed: 0,
        model_hash: "x".into(),
        sites: tables,
    };
    (infos, t)
}

/// Least total distortion over every assignment within `budget` (None: infeasible).
fn brute(p: &Problem, budget: u64) -> Option<f64> {
    fn rec(p: &Problem, c: usize, left: i64, acc: f64, best: &mut Option<f64>) {
        if left < 0 {
            return;
        }
        if c == p.items.len() {
            if best.is_none_or(|b| acc < b) {
                *best = Some(acc);
            }
            return;
        }
        for it in &p.items[c] {
            rec(p, c + 1, left - it.cost as i64, acc + it.dist, best);
        }
    }
    let mut best = None;
    rec(p, 0, budget as i64 - p.fixed_cost as i64, 0.0, &mut best);
    best
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn exact_equals_brute_force_and_lagrange_brackets_it() {
    let mut rng = Rng(7);
    for case in 0..150 {
        let n_sites = 1 + rng.below(3) as usize;
        let (infos, t) = instance(&mut rng, n_sites, 3);
        // Raw items so brute force sees every option, pruned for the solvers.
        let raw = Problem::build(
            &t,
            &infos,
            BuildOptions {
                raw: true,
                ..Default::default()
            },
        )
        .unwrap();
        let p = Problem::build(&t, &infos, BuildOptions::default()).unwrap();
        if raw.items.iter().map(|i| i.len() as f64).product::<f64>() > 3e5 {
            continue;
        }
        let max = p.max_cost();
        for budget in [0, 1, max / 3, max / 2, max.saturating_sub(1), max, max + 10] {
            let want = brute(&raw, budget).expect("identity makes every budget feasible");
            let got = dp::solve(&p, budget, 1 << 30).unwrap();
            assert!(
                got.cost <= budget,
                "case {case} budget {budget}: cost {} > budget",
                got.cost
            );
            assert!(
                close(got.objective, want),
                "case {case} budget {budget}: exact {} brute {want}",
                got.objective
            );
            // Every path (whole table or checkpoint segments of 1 and 2 channels, with and
            // without reduced-cost fixing) finds the same optimum.
            for (seg, reduced) in [(1, true), (2, true), (1, false), (1000, false)] {
                let cp = dp::solve_segmented(&p, budget, seg, reduced).unwrap();
                assert!(
                    close(cp.objective, want),
                    "case {case}: checkpointed {} brute {want}",
                    cp.objective
                );
                assert!(cp.cost <= budget);
            }
            let lg = lagrange::solve(&p, budget).unwrap();
            assert!(lg.cost <= budget);
            assert!(
                lg.objective >= want - 1e-9,
                "case {case}: lagrange below optimum"
            );
            assert!(
                lg.bound <= want + 1e-9,
                "case {case}: bound {} above optimum {want}",
                lg.bound
            );
        }
    }
}

#[test]
fn budget_edges() {
    let mut rng = Rng(3);
    let (infos, t) = instance(&mut rng, 3, 4);
    let p = Problem::build(&t, &infos, BuildOptions::default()).unwrap();
    // Budget 0: identity everywhere.
    let s = dp::solve(&p, 0, 1 << 30).unwrap();
    assert_eq!(s.cost, 0);
    let spec = p.to_spec(&s.choice);
    assert!(spec
        .sites
        .values()
        .flatten()
        .all(|o| *o == PatchOption::Identity));
    // Above the all-ReLU cost: every channel at zero distortion.
    let s = dp::solve(&p, p.relus() * 2, 1 << 30).unwrap();
    assert_eq!(s.objective, 0.0);
    // Below the cheapest assignment: an error saying the minimum.
    let mut t2 = t.clone();
    for tab in t2.sites.values_mut() {
        let k = tab.options.len();
        for c in 0..tab.shape[0] {
            tab.values[c * k + k - 1] = f64::NAN; // identity unusable
        }
    }
    let p2 = Problem::build(&t2, &infos, BuildOptions::default()).unwrap();
    assert!(p2.warnings.iter().any(|w| w.contains("non-finite")));
    let e = dp::solve(&p2, 1, 1 << 30).unwrap_err().to_string();
    assert!(e.contains("below the cheapest possible assignment"), "{e}");
    // A missing site is an error unless kept as ReLU.
    let mut t3 = t.clone();
    t3.sites.shift_remove("s1");
    let e = Problem::build(&t3, &infos, BuildOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("'s1' has no distortion table"), "{e}");
    let p3 = Problem::build(
        &t3,
        &infos,
        BuildOptions {
            keep_relu_for_missing: true,
            raw: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p3.fixed_cost, infos[1].relus() as u64);
    let s = dp::solve(&p3, p3.fixed_cost + 5, 1 << 30).unwrap();
    assert!(s.cost <= p3.fixed_cost + 5);
    assert!(p3.to_spec(&s.choice).sites["s1"]
        .iter()
        .all(|o| *o == PatchOption::RELU));
}

/// Synthetic tables for a real model: distortion grows with patch area, identity the largest.
fn synthetic_tables(
    model: &str,
    input: [usize; 3],
    seed: u64,
) -> (Vec<SiteInfo>, DistortionTables) {
    let infos = sites(find(model).unwrap(), input).unwrap();
    let t = DistortionTables::synthetic(model, input, &infos, &Catalog::builtin(), seed);
    (infos, t)
}

#[test]
fn cli_writes_a_spec_within_budget_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let (infos, t) = synthetic_tables("resnet18-cifar-light", [3, 32, 32], 11);
    let tdir = dir.path().join("dist");
    t.write(&tdir).unwrap();
    let spec_path = dir.path().join("spec.json");
    for solver in ["exact", "lagrange"] {
        let out = std::process::Command::new(crate::common::brelu_exe())
            .args([
                "knapsack",
                "--model",
                "resnet18-cifar-light",
                "--ratio",
                "0.06",
                "--json",
                "--solver",
                solver,
                "-d",
            ])
            .arg(&tdir)
            .arg("-o")
            .arg(&spec_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let budget = rep["budget"].as_u64().unwrap();
        assert_eq!(budget, (69_632f64 * 0.06).floor() as u64);
        let spec = Spec::load(&spec_path, "resnet18-cifar-light", [3, 32, 32], &infos).unwrap();
        let cost = brelu::spec::spec_cost(&spec, &infos);
        assert!(cost.drelus as u64 <= budget);
        assert_eq!(rep["drelus"].as_u64().unwrap(), cost.drelus as u64);
        assert!(rep["bound"].as_f64().unwrap() <= rep["objective"].as_f64().unwrap() + 1e-9);
    }
    // A sweep writes one spec per ratio, the numbers and the plot.
    let sweep = dir.path().join("sweep");
    let out = std::process::Command::new(crate::common::brelu_exe())
        .args([
            "knapsack",
            "--model",
            "resnet18-cifar-light",
            "--sweep",
            "0.03,0.09",
            "-d",
        ])
        .arg(&tdir)
        .arg("-o")
        .arg(&sweep)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sweep.join("sweep.json")).unwrap()).unwrap();
    let (lo, hi) = (&reps[0], &reps[1]);
    assert!(lo["drelus"].as_u64() <= hi["drelus"].as_u64());
    assert!(lo["objective"].as_f64().unwrap() >= hi["objective"].as_f64().unwrap());
    for r in ["0.03", "0.09"] {
        Spec::load(
            &sweep.join(format!("spec-{r}.json")),
            "resnet18-cifar-light",
            [3, 32, 32],
            &infos,
        )
        .unwrap();
    }
    let png = std::fs::read(sweep.join("sweep.png"))
        .expect("sweep.png (needs a TrueType font, e.g. fonts-dejavu-core)");
    assert_eq!(&png[1..4], b"PNG");

    // A budget below the minimum is refused, naming the minimum (identity costs 0, so use
    // tables without identity).
    let mut t2 = t.clone();
    for tab in t2.sites.values_mut() {
        let k = tab.options.len();
        for c in 0..tab.shape[0] {
            tab.values[c * k + k - 1] = f64::INFINITY;
        }
    }
    let t2dir = dir.path().join("dist2");
    t2.write(&t2dir).unwrap();
    let out = std::process::Command::new(crate::common::brelu_exe())
        .args([
            "knapsack",
            "--model",
            "resnet18-cifar-light",
            "--budget",
            "10",
            "-d",
        ])
        .arg(&t2dir)
        .arg("-o")
        .arg(dir.path().join("never.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("below the cheapest possible assignment"));
    assert!(!dir.path().join("never.json").exists());
}

#[test]
fn lagrange_gap_is_small_on_a_realistic_instance() {
    let (infos, t) = synthetic_tables("resnet18-cifar", [3, 32, 32], 5);
    let p = Problem::build(&t, &infos, BuildOptions::default()).unwrap();
    let budget = 33_423;
    let ex = dp::solve(&p, budget, 1 << 31).unwrap();
    let lg = lagrange::solve(&p, budget).unwrap();
    assert!(ex.cost <= budget && lg.cost <= budget);
    assert!(lg.bound <= ex.objective * (1.0 + 1e-12));
    assert!(lg.objective >= ex.objective * (1.0 - 1e-12));
    assert!(
        (lg.objective - ex.objective) / ex.objective < 1e-3,
        "lagrange {} exact {}",
        lg.objective,
        ex.objective
    );
}

#[test]
fn cli_synthetic_tables_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::common::brelu_exe())
        .args([
            "distortion",
            "synthetic",
            "--model",
            "resnet18-cifar-light",
            "--seed",
            "4",
            "-o",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = DistortionTables::read(dir.path()).unwrap();
    let (_, want) = synthetic_tables("resnet18-cifar-light", [3, 32, 32], 4);
    assert_eq!(back, want);
    // A truncated table is an error naming the file.
    let f = dir.path().join("stem.npy");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 8]).unwrap();
    let e = DistortionTables::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains("stem.npy") && e.contains("truncated"), "{e}");
}

/// A budget in bytes: items cost their bytes in brelu's engine (rounded up per channel to the
/// unit), the exact solver is optimal on that instance (brute force), the spec never exceeds
/// the budget in bytes, and through the CLI a larger byte budget never gives more distortion.
#[test]
fn byte_budgets_are_solved_exactly_and_kept() {
    use brelu::knapsack::CostUnit;
    let mut rng = Rng(23);
    for case in 0..60 {
        let n_sites = 1 + rng.below(3) as usize;
        let (infos, t) = instance(&mut rng, n_sites, 3);
        let unit = 1 + rng.below(300);
        let opts = |raw| BuildOptions {
            cost: CostUnit::Bytes(unit),
            raw,
            ..Default::default()
        };
        let raw = Problem::build(&t, &infos, opts(true)).unwrap();
        if raw.items.iter().map(|i| i.len() as f64).product::<f64>() > 3e5 {
            continue;
        }
        let p = Problem::build(&t, &infos, opts(false)).unwrap();
        let max = p.max_cost();
        for budget in [0, max / 3, max / 2, max] {
            let want = brute(&raw, budget).expect("identity costs nothing");
            let got = dp::solve(&p, budget, 1 << 30).unwrap();
            assert!(close(got.objective, want), "case {case} budget {budget}");
            let spec = p.to_spec(&got.choice);
            let bytes = brelu::spec::spec_cost(&spec, &infos).bytes_engine;
            assert!(
                bytes <= budget * unit,
                "case {case}: {bytes} > {}",
                budget * unit
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (infos, t) = synthetic_tables("resnet18-cifar-light", [3, 32, 32], 12);
    let tdir = dir.path().join("dist");
    t.write(&tdir).unwrap();
    let mut last = f64::INFINITY;
    for (mb, budget) in [("2M", 2_000_000u64), ("4M", 4_000_000), ("8M", 8_000_000)] {
        let spec_path = dir.path().join(format!("spec-{mb}.json"));
        let (ok, out, err) = crate::common::brelu(&[
            "knapsack",
            "--model",
            "resnet18-cifar-light",
            "--bytes",
            mb,
            "--json",
            "-d",
            tdir.to_str().unwrap(),
            "-o",
            spec_path.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(rep["budget_unit"], "bytes");
        assert!(rep["budget"].as_u64().unwrap() <= budget);
        let spec = Spec::load(&spec_path, "resnet18-cifar-light", [3, 32, 32], &infos).unwrap();
        let bytes = brelu::spec::spec_cost(&spec, &infos).bytes_engine;
        assert!(bytes <= budget, "{mb}: {bytes} bytes");
        assert_eq!(rep["bytes_engine"].as_u64().unwrap(), bytes);
        let obj = rep["objective"].as_f64().unwrap();
        assert!(obj <= last + 1e-9, "{mb}: distortion {obj} above {last}");
        last = obj;
    }
}
