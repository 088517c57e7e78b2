//! Distortion extraction against brute force (the whole network re-run with one channel
//! changed), exactness properties of the estimators, sharding / resume byte-identity, shard
//! consistency checks, and the rank statistics of `compare`.
use crate::common;

use brelu::distortion::extract::{init_dir, plan, run};
use brelu::distortion::{collect, DistortionTables, Estimator, PlanOptions, Samples, Shard};
use brelu::knapsack::compare::{compare, spearman};
use brelu::models::{find, ArchConfig, Model};
use brelu::spec::{Catalog, PatchOption, Spec};
use common::tiny_dataset;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub(crate) const INPUT: [usize; 3] = [1, 8, 8];

/// A random light ResNet18 at 1x8x8, saved so every worker loads the same weights, with its
/// batch-norm statistics made non-trivial.
pub(crate) fn tiny_model(dir: &Path) -> PathBuf {
    let arch = find("resnet18-cifar-light").unwrap();
    let m = Model::new(
        arch,
        ArchConfig {
            input: INPUT,
            num_classes: 10,
        },
        Device::Cpu,
    )
    .unwrap();
    let _g = tch::no_grad_guard();
    for (name, mut t) in m.named_tensors() {
        if name.ends_with("running_mean") {
            let v = t.rand_like() * 0.2 - 0.1;
            t.copy_(&v);
        } else if name.ends_with("running_var") {
            let v = t.rand_like() * 0.5 + 0.75;
            t.copy_(&v);
        }
    }
    let p = dir.join("w.safetensors");
    m.save_weights(&p).unwrap();
    p
}

pub(crate) fn load(weights: &Path, spec: Option<&Spec>) -> Model {
    let arch = find("resnet18-cifar-light").unwrap();
    let mut m = Model::new(
        arch,
        ArchConfig {
            input: INPUT,
            num_classes: 10,
        },
        Device::Cpu,
    )
    .unwrap();
    m.load_weights(weights).unwrap();
    if let Some(s) = spec {
        m.apply_spec(s).unwrap();
    }
    m
}

pub(crate) fn samples(n: usize) -> Samples {
    tch::manual_seed(11);
    let x = Tensor::randn([n as i64, 1, 8, 8], (Kind::Float, Device::Cpu));
    Samples::from_tensor(&x).unwrap()
}

pub(crate) fn opts(estimator: Estimator, sites: &[&str]) -> PlanOptions {
    PlanOptions {
        estimator,
        seed: 0,
        batch: 3,
        stack: 5,
        chunk: 16,
        probes: 10,
        sites: Some(sites.iter().map(|s| s.to_string()).collect()),
        zero: true,
        skip_unchanged: true,
        baseline: None,
        against_relu: false,
    }
}

/// Runs a whole job (all shards listed) into `dir` and collects it.
pub(crate) fn extract_all(
    weights: &Path,
    spec: Option<&Spec>,
    s: &Samples,
    o: &PlanOptions,
    dir: &Path,
    shards: &[Shard],
) -> DistortionTables {
    let m = load(weights, spec);
    let job = plan(&m, &Catalog::builtin(), s, o).unwrap();
    init_dir(dir, &job).unwrap();
    let make = |_: Device| Ok(load(weights, spec));
    for sh in shards {
        run(&job, dir, s, *sh, &[Device::Cpu], &make, None).unwrap();
    }
    collect(dir).unwrap()
}

/// D by brute force: the whole network with only channel c of `site` switched to `o`.
fn brute(m: &mut Model, s: &Samples, site: &str, c: usize, o: PatchOption) -> f64 {
    let _g = tch::no_grad_guard();
    let x = Tensor::from_slice(&s.data).view([s.shape[0] as i64, 1, 8, 8]);
    let clean = m.forward_t(&x, false).to_kind(Kind::Double);
    let si = m.site_index(site).unwrap();
    let before = m.site_options(si).map(<[_]>::to_vec);
    let ch = m.sites()[si].channels;
    let mut opts = before
        .clone()
        .unwrap_or_else(|| vec![PatchOption::RELU; ch]);
    opts[c] = o;
    m.set_site_options(si, Some(opts)).unwrap();
    let pert = m.forward_t(&x, false).to_kind(Kind::Double);
    m.set_site_options(si, before).unwrap();
    (pert - clean).square().mean(Kind::Double).double_value(&[])
}

pub(crate) fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()) + 1e-14
}

#[test]
fn exact_matches_brute_force_and_relu_option_is_zero() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(7);
    let sites = ["stem", "layer2_0_2", "layer4_1_2"];
    let t = extract_all(
        &w,
        None,
        &s,
        &opts(Estimator::Exact, &sites),
        tmp.path(),
        &[Shard::ALL],
    );
    assert_eq!(t.estimator, "exact");
    assert_eq!(t.samples, 7);
    let mut m = load(&w, None);
    for name in sites {
        let tab = &t.sites[name];
        let relu = tab
            .options
            .iter()
            .position(|o| *o == PatchOption::RELU)
            .unwrap();
        assert!(tab.options.contains(&PatchOption::Identity));
        assert!(tab.options.contains(&PatchOption::Zero));
        for c in 0..tab.channels() {
            assert_eq!(
                tab.get(c, relu),
                0.0,
                "{name} channel {c}: D(1x1) must be exactly 0"
            );
        }
        for (c, k) in [
            (0, tab.options.len() - 1),
            (5, 1),
            (tab.channels() - 1, tab.options.len() - 2),
        ] {
            let want = brute(&mut m, &s, name, c, tab.options[k]);
            let got = tab.get(c, k);
            assert!(
                rel_close(got, want, 1e-4),
                "{name} c{c} {}: extracted {got:e}, brute force {want:e}",
                tab.options[k]
            );
        }
    }
}

#[test]
fn baseline_spec_is_measured_on_top_of() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let m = load(&w, None);
    let mut spec = Spec::uniform(m.name(), INPUT, m.sites(), PatchOption::patch(2, 2));
    spec.sites["stem"][3] = PatchOption::Identity;
    let s = samples(5);
    let mut o = opts(Estimator::Exact, &["stem", "layer1_0_1"]);
    o.baseline = Some("test".into());
    let t = extract_all(&w, Some(&spec), &s, &o, tmp.path(), &[Shard::ALL]);
    let mut m = load(&w, Some(&spec));
    let tab = &t.sites["stem"];
    let k22 = tab
        .options
        .iter()
        .position(|o| *o == PatchOption::patch(2, 2))
        .unwrap();
    let kid = tab
        .options
        .iter()
        .position(|o| *o == PatchOption::Identity)
        .unwrap();
    let k11 = tab
        .options
        .iter()
        .position(|o| *o == PatchOption::RELU)
        .unwrap();
    assert_eq!(
        tab.get(0, k22),
        0.0,
        "the baseline's own option costs nothing"
    );
    assert_eq!(tab.get(3, kid), 0.0);
    assert!(tab.get(3, k22) > 0.0);
    for (c, k) in [(0, k11), (3, k22), (7, kid)] {
        let want = brute(&mut m, &s, "stem", c, tab.options[k]);
        assert!(
            rel_close(tab.get(c, k), want, 1e-4),
            "stem c{c} {}: {} vs brute force {want}",
            tab.options[k],
            tab.get(c, k)
        );
    }
}

#[test]
fn shards_workers_and_resume_give_identical_bytes() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(7);
    let o = opts(Estimator::Exact, &["stem", "layer2_1_2", "layer3_0_1"]);
    let sh = |i, n| Shard { index: i, count: n };
    let dirs: Vec<PathBuf> = (0..4).map(|i| tmp.path().join(format!("r{i}"))).collect();
    extract_all(&w, None, &s, &o, &dirs[0], &[Shard::ALL]);
    extract_all(&w, None, &s, &o, &dirs[1], &[sh(1, 2), sh(0, 2)]);
    extract_all(&w, None, &s, &o, &dirs[2], &[sh(2, 3), sh(0, 3), sh(1, 3)]);

    // Two workers, and a "kill" (every other unit file removed, a stray temp file left), then
    // the same command again.
    let m = load(&w, None);
    let job = plan(&m, &Catalog::builtin(), &s, &o).unwrap();
    init_dir(&dirs[3], &job).unwrap();
    let make = |_: Device| Ok(load(&w, None));
    run(
        &job,
        &dirs[3],
        &s,
        Shard::ALL,
        &[Device::Cpu, Device::Cpu],
        &make,
        None,
    )
    .unwrap();
    let mut removed = 0;
    for site in ["stem", "layer2_1_2", "layer3_0_1"] {
        let d = dirs[3].join("units").join(site);
        let mut files: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().step_by(2) {
            std::fs::remove_file(f).unwrap();
            removed += 1;
        }
        std::fs::write(d.join(".b00000-c0000.npy.999.tmp"), b"partial").unwrap();
    }
    assert!(removed > 3);
    assert!(
        collect(&dirs[3]).is_err(),
        "incomplete extraction must not collect"
    );
    let r = run(&job, &dirs[3], &s, Shard::ALL, &[Device::Cpu], &make, None).unwrap();
    assert_eq!(r.computed, removed, "only the missing units are recomputed");
    collect(&dirs[3]).unwrap();

    for site in ["stem", "layer2_1_2", "layer3_0_1"] {
        let f = format!("{site}.npy");
        let a = std::fs::read(dirs[0].join(&f)).unwrap();
        for d in &dirs[1..] {
            assert_eq!(
                a,
                std::fs::read(d.join(&f)).unwrap(),
                "{} differs",
                d.join(&f).display()
            );
        }
    }
    let m0 = std::fs::read(dirs[0].join("manifest.json")).unwrap();
    assert_eq!(m0, std::fs::read(dirs[2].join("manifest.json")).unwrap());
}

#[test]
fn collect_lists_missing_shards_and_refuses_mixed_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(4);
    let o = opts(Estimator::Exact, &["layer3_1_1"]);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let m = load(&w, None);
    let make = |_: Device| Ok(load(&w, None));
    let job = plan(&m, &Catalog::builtin(), &s, &o).unwrap();
    init_dir(&a, &job).unwrap();
    run(
        &job,
        &a,
        &s,
        Shard { index: 0, count: 3 },
        &[Device::Cpu],
        &make,
        None,
    )
    .unwrap();
    let e = collect(&a).unwrap_err().to_string();
    assert!(e.contains("shard(s) 1, 2 of 3"), "{e}");

    // Another seed is another job: the directory refuses it...
    let mut o2 = o.clone();
    o2.seed = 5;
    let job2 = plan(&m, &Catalog::builtin(), &s, &o2).unwrap();
    let e = init_dir(&a, &job2).unwrap_err().to_string();
    assert!(e.contains("'seed' is 5 vs 0"), "{e}");
    // ... and a shard made elsewhere with it cannot be collected with ours.
    init_dir(&b, &job2).unwrap();
    run(
        &job2,
        &b,
        &s,
        Shard { index: 1, count: 3 },
        &[Device::Cpu],
        &make,
        None,
    )
    .unwrap();
    std::fs::copy(b.join("shards/1-of-3.json"), a.join("shards/1-of-3.json")).unwrap();
    let e = collect(&a).unwrap_err().to_string();
    assert!(
        e.contains("refusing to mix shards") && e.contains("seed"),
        "{e}"
    );

    // Changed weights are refused by the worker.
    let other = tempfile::tempdir().unwrap();
    let w2 = tiny_model(other.path());
    let make2 = |_: Device| Ok(load(&w2, None));
    let e = run(&job, &a, &s, Shard::ALL, &[Device::Cpu], &make2, None).unwrap_err();
    assert!(e.to_string().contains("differs from the job"), "{e}");
    assert!(collect(&tmp.path().join("none")).is_err());
}

#[test]
fn first_order_is_exact_where_the_rest_of_the_network_is_linear() {
    let _rng = common::torch_rng();
    // After the last site comes global average pooling and the classifier: linear, so the
    // first-order term with a full probe basis is the exact distortion.
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(6);
    let sites = ["layer4_1_2", "layer2_0_1"];
    let exact = extract_all(
        &w,
        None,
        &s,
        &opts(Estimator::Exact, &sites),
        &tmp.path().join("e"),
        &[Shard::ALL],
    );
    let fo = extract_all(
        &w,
        None,
        &s,
        &opts(Estimator::FirstOrder, &sites),
        &tmp.path().join("f"),
        &[Shard::ALL],
    );
    assert_eq!(fo.estimator, "first-order");
    let (te, tf) = (&exact.sites["layer4_1_2"], &fo.sites["layer4_1_2"]);
    for (a, b) in te.values.iter().zip(&tf.values) {
        assert!(rel_close(*a, *b, 1e-3), "exact {a:e} vs first-order {b:e}");
    }
    // Deeper in, it is an approximation that still ranks channels and options.
    let (te, tf) = (&exact.sites["layer2_0_1"], &fo.sites["layer2_0_1"]);
    let rho = spearman(&te.values, &tf.values);
    assert!(rho > 0.5, "Spearman {rho}");
    // Random probes (fewer than outputs): unbiased, so close on average at the linear site.
    let mut o = opts(Estimator::FirstOrder, &["layer4_1_2"]);
    o.probes = 4;
    let few = extract_all(&w, None, &s, &o, &tmp.path().join("p"), &[Shard::ALL]);
    let (se, sp): (f64, f64) = (
        exact.sites["layer4_1_2"].values.iter().sum(),
        few.sites["layer4_1_2"].values.iter().sum(),
    );
    assert!((sp / se - 1.0).abs() < 0.5, "sum {sp} vs exact {se}");
}

#[test]
fn snr_at_the_last_site_is_the_normalised_output_error() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(4);
    let t = extract_all(
        &w,
        None,
        &s,
        &opts(Estimator::Snr, &["layer4_1_2"]),
        tmp.path(),
        &[Shard::ALL],
    );
    let mut m = load(&w, None);
    let tab = &t.sites["layer4_1_2"];
    let _g = tch::no_grad_guard();
    let x = Tensor::from_slice(&s.data).view([4, 1, 8, 8]);
    let clean = m.forward_t(&x, false).to_kind(Kind::Double);
    let power = clean.square().mean_dim(1, false, Kind::Double);
    let si = m.site_index("layer4_1_2").unwrap();
    for c in [0usize, 100, 255] {
        let mut o = vec![PatchOption::RELU; 256];
        o[c] = PatchOption::Identity;
        m.set_site_options(si, Some(o)).unwrap();
        let pert = m.forward_t(&x, false).to_kind(Kind::Double);
        let want = ((pert - &clean).square().mean_dim(1, false, Kind::Double) / &power)
            .mean(Kind::Double)
            .double_value(&[]);
        let k = tab
            .options
            .iter()
            .position(|o| *o == PatchOption::Identity)
            .unwrap();
        assert!(
            rel_close(tab.get(c, k), want, 1e-4),
            "c{c}: {} vs {want}",
            tab.get(c, k)
        );
    }
}

#[test]
fn spearman_and_compare() {
    let _rng = common::torch_rng();
    // Hand-computed: ranks of [1, 2, 2, 5] are [1, 2.5, 2.5, 4]; of [4, 3, 2, 1] [4, 3, 2, 1].
    let r = spearman(&[1.0, 2.0, 2.0, 5.0], &[4.0, 3.0, 2.0, 1.0]);
    assert!((r - (-0.9486832980505138)).abs() < 1e-12, "{r}");
    assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 35.0]) - 1.0).abs() < 1e-12);
    assert!(spearman(&[1.0, 1.0], &[2.0, 3.0]).is_nan());

    let arch = find("resnet18-cifar").unwrap();
    let sites = brelu::models::sites(arch, [3, 32, 32]).unwrap();
    let a = DistortionTables::synthetic(
        "resnet18-cifar",
        [3, 32, 32],
        &sites,
        &Catalog::builtin(),
        1,
    );
    let b = DistortionTables::synthetic(
        "resnet18-cifar",
        [3, 32, 32],
        &sites,
        &Catalog::builtin(),
        2,
    );
    let relus: u64 = sites.iter().map(|s| s.relus() as u64).sum();
    let same = compare(&a, &a, &sites, relus / 16, 1 << 30).unwrap();
    assert!(same.sites.iter().all(|s| (s.spearman - 1.0).abs() < 1e-12));
    assert_eq!(same.ratio(), 1.0);
    let diff = compare(&a, &b, &sites, relus / 16, 1 << 30).unwrap();
    assert!(
        diff.ratio() >= 1.0 - 1e-9,
        "B's own optimum is the best B knows: {}",
        diff.ratio()
    );
}

fn brelu_cmd(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(common::brelu_exe());
    c.args(args);
    c
}

fn run_ok(args: &[&str]) -> String {
    let out = brelu_cmd(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "brelu {args:?} failed: {err}");
    err + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn cli_extract_killed_and_resumed_equals_uninterrupted_and_feeds_the_knapsack() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_dataset(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let common = [
        "distortion",
        "extract",
        "--data",
        cfg,
        "--random-init",
        "--estimator",
        "exact",
        "--samples",
        "12",
        "--batch",
        "2",
        "--chunk",
        "8",
        "--sites",
        "stem,layer1_0_1,layer2_1_2",
    ];
    let with_out = |o: &str| -> Vec<String> {
        common
            .iter()
            .map(|s| s.to_string())
            .chain(["-o".into(), o.into()])
            .collect()
    };
    let args_a = with_out(a_s);
    let args_b = with_out(b_s);
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let log = run_ok(&args_a);
    assert!(log.contains("units computed"), "{log}");

    // Kill the second run once a few units are on disk, then run the same command again.
    let mut child = brelu_cmd(&args_b)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let units = b.join("units");
    let count = || {
        std::fs::read_dir(&units)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_dir(e.path()).map(|f| f.count()).unwrap_or(0))
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while count() < 4 && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = run_ok(&args_b);
    assert!(log.contains("already done"), "{log}");
    for f in [
        "stem.npy",
        "layer1_0_1.npy",
        "layer2_1_2.npy",
        "manifest.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs after kill + resume"
        );
    }

    // Shards from torchrun's RANK / WORLD_SIZE (two processes, one after the other): the
    // second collects, and the tables are the uninterrupted run's.
    let c = tmp.path().join("c");
    let args_c = with_out(c.to_str().unwrap());
    let args_c: Vec<&str> = args_c.iter().map(String::as_str).collect();
    for rank in ["0", "1"] {
        let out = brelu_cmd(&args_c)
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {rank}: {err}");
        assert!(err.contains("RANK"), "the shard's source is named: {err}");
    }
    assert!(c.join("shards/0-of-2.json").exists() && c.join("shards/1-of-2.json").exists());
    for f in ["stem.npy", "layer2_1_2.npy", "manifest.json"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(c.join(f)).unwrap(),
            "{f} differs between the RANK shards and one process"
        );
    }

    // A shard refused for a different seed, with the field named.
    let mut other = args_b.clone();
    other.extend(["--seed", "9"]);
    let out = brelu_cmd(&other).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'seed'"));

    // The tables feed the knapsack unchanged.
    let spec = tmp.path().join("spec.json");
    run_ok(&[
        "knapsack",
        "-m",
        "resnet18-cifar-light",
        "-d",
        a_s,
        "--ratio",
        "0.8",
        "--keep-relu-for-missing",
        "-o",
        spec.to_str().unwrap(),
    ]);
    let s = Spec::read(&spec).unwrap();
    assert_eq!(s.model, "resnet18-cifar-light");

    // Plots and compare run on them.
    run_ok(&["distortion", "plot", a_s]);
    assert!(a.join("plots/heatmap_stem.png").exists());
    assert!(a.join("plots/distortion_vs_cost.png").exists());
    let cmp = run_ok(&["distortion", "compare", a_s, b_s]);
    assert!(cmp.contains("ratio 1.0000"), "{cmp}");
}

/// Additivity (`knapsack::additivity`): a spec that switches one channel measures exactly its
/// exact-table entry; a knapsack spec's sites add up to the objective it assumed; the model's
/// options are restored afterwards. Through the CLI: extract, knapsack, then additivity writes
/// its JSON and plot.
#[test]
fn additivity_measures_whole_specs_against_the_tables() {
    use brelu::knapsack::additivity::measure;
    use brelu::knapsack::{solve, BuildOptions, Problem, Solver};
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(7);
    let sites = ["stem", "layer2_0_2", "layer4_1_2"];
    let t = extract_all(
        &w,
        None,
        &s,
        &opts(Estimator::Exact, &sites),
        tmp.path(),
        &[Shard::ALL],
    );
    let mut m = load(&w, None);
    let infos = m.sites().to_vec();
    let tab = &t.sites["layer2_0_2"];
    let k = (0..tab.options.len())
        .max_by(|&a, &b| tab.get(5, a).total_cmp(&tab.get(5, b)))
        .unwrap();
    let mut one = Spec::uniform(m.name(), INPUT, &infos, PatchOption::RELU);
    one.sites["layer2_0_2"][5] = tab.options[k];
    let p = Problem::build(
        &t,
        &infos,
        BuildOptions {
            keep_relu_for_missing: true,
            ..Default::default()
        },
    )
    .unwrap();
    let budget = p.relus() - (p.relus() - p.min_cost()) / 2;
    let (_, sol) = solve(&p, budget, Solver::Exact, 1 << 30).unwrap();
    let knap = p.to_spec(&sol.choice);
    let x = Tensor::from_slice(&s.data).view([7, 1, 8, 8]);
    let before = m.forward_t(&x, false);
    let specs = [("one".to_string(), one), ("knapsack".to_string(), knap)];
    let rows = measure(&mut m, &s, 3, &t, &specs, true).unwrap();
    let d = tab.get(5, k);
    assert!(d > 0.0);
    assert_eq!(rows[0].assumed, d);
    assert!(
        rel_close(rows[0].measured, d, 1e-4),
        "{} vs {d}",
        rows[0].measured
    );
    assert_eq!(rows[0].sites.len(), 1);
    assert!(rel_close(
        rows[0].sites[0].measured,
        rows[0].measured,
        1e-12
    ));
    let r = &rows[1];
    assert!(
        rel_close(r.assumed, sol.objective, 1e-9),
        "{} vs {}",
        r.assumed,
        sol.objective
    );
    let parts: f64 = r.sites.iter().map(|s| s.assumed).sum();
    assert!(rel_close(parts, r.assumed, 1e-9));
    assert!(r.measured.is_finite() && r.measured > 0.0);
    assert!(r
        .sites
        .iter()
        .all(|s| s.measured.is_finite() && s.measured >= 0.0));
    let after = m.forward_t(&x, false);
    assert!(
        before.equal(&after),
        "the model's options were not restored"
    );

    // The CLI on a configuration's data set, with saved weights.
    let cfg_path = tiny_dataset(tmp.path());
    let cfg = brelu::train::Config::load(&cfg_path).unwrap();
    let wpath = tmp.path().join("cfg-w.safetensors");
    brelu::train::build_model(&cfg, Device::Cpu)
        .unwrap()
        .save_weights(&wpath)
        .unwrap();
    let (c, wp) = (cfg_path.to_str().unwrap(), wpath.to_str().unwrap());
    let tdir = tmp.path().join("tables");
    let tdir_s = tdir.to_str().unwrap();
    run_ok(&[
        "distortion",
        "extract",
        "--data",
        c,
        "-w",
        wp,
        "--estimator",
        "exact",
        "--samples",
        "6",
        "--batch",
        "3",
        "--sites",
        "stem,layer1_0_1",
        "-o",
        tdir_s,
    ]);
    let spec = tmp.path().join("spec.json");
    run_ok(&[
        "knapsack",
        "--model",
        &cfg.model,
        "-d",
        tdir_s,
        "--ratio",
        "0.9",
        "--keep-relu-for-missing",
        "-o",
        spec.to_str().unwrap(),
    ]);
    let out = tmp.path().join("add");
    let log = run_ok(&[
        "distortion",
        "additivity",
        "--data",
        c,
        "-w",
        wp,
        "-d",
        tdir_s,
        "--spec",
        spec.to_str().unwrap(),
        "--samples",
        "6",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(log.contains("measured/assumed"), "{log}");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("additivity.json")).unwrap()).unwrap();
    assert!(j[0]["measured"].as_f64().unwrap().is_finite());
    assert!(std::fs::metadata(out.join("additivity.png")).unwrap().len() > 1000);
}

/// Local search (`knapsack::local`, `brelu refine`): from a knapsack spec, the result stays
/// within the budget and measures no more distortion than the start on the samples it was
/// judged on, re-measured independently (`additivity::measure`); the model's own options are
/// restored.
#[test]
fn local_search_stays_in_budget_and_never_measures_worse() {
    use brelu::knapsack::additivity::measure;
    use brelu::knapsack::local::{search, SearchOptions};
    use brelu::knapsack::{solve, BuildOptions, Problem, Solver};
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let w = tiny_model(tmp.path());
    let s = samples(6);
    let mut m = load(&w, None);
    let infos = m.sites().to_vec();
    let t = DistortionTables::synthetic(m.name(), INPUT, &infos, &Catalog::builtin(), 5);
    let p = Problem::build(&t, &infos, BuildOptions::default()).unwrap();
    let budget = p.relus() / 4;
    let (_, sol) = solve(&p, budget, Solver::Exact, 1 << 30).unwrap();
    let start = p.to_spec(&sol.choice);
    let x = Tensor::from_slice(&s.data).view([6, 1, 8, 8]);
    let before = m.forward_t(&x, false);
    let o = SearchOptions {
        steps: 80,
        candidates: 16,
        seed: 3,
        batch: 4,
    };
    let (best, r) = search(&mut m, &s, &t, &start, budget, &o).unwrap();
    assert!(r.drelus <= budget && r.drelus_start <= budget);
    let cost = brelu::spec::spec_cost(&best, &infos).drelus as u64;
    assert_eq!(cost, r.drelus);
    assert!(r.result <= r.start);
    assert!(
        r.accepted > 0,
        "no move improved a random network's knapsack spec"
    );
    assert!(r.trace.windows(2).all(|w| w[1].1 < w[0].1));
    let specs = [("start".to_string(), start), ("best".to_string(), best)];
    let rows = measure(&mut m, &s, 4, &t, &specs, false).unwrap();
    assert!(
        rel_close(rows[0].measured, r.start, 1e-9),
        "{} {}",
        rows[0].measured,
        r.start
    );
    assert!(
        rel_close(rows[1].measured, r.result, 1e-9),
        "{} {}",
        rows[1].measured,
        r.result
    );
    assert!(rows[1].measured <= rows[0].measured);
    assert!(
        before.equal(&m.forward_t(&x, false)),
        "options not restored"
    );
    // A start over the budget is refused.
    let e = search(&mut m, &s, &t, &specs[0].1, budget / 2, &o).unwrap_err();
    assert!(e.to_string().contains("over the budget"), "{e}");
    // The first site's channels without ReLU, the other sites fixed at ReLU, 3 DReLUs to
    // spend: a ReLU costs 16 on the first site's 4x4 map, so every move the search can make
    // is to an intermediate patch. (Proposing only the table's best option, ReLU, it made
    // none.)
    let mut t1 = t.clone();
    t1.sites.truncate(1);
    let first = infos[0].name.clone();
    assert_eq!((infos[0].height, infos[0].width), (4, 4));
    let mut start = Spec::uniform(m.name(), INPUT, &infos, PatchOption::RELU);
    start.sites.insert(
        first.clone(),
        vec![PatchOption::Identity; infos[0].channels],
    );
    let budget = brelu::spec::spec_cost(&start, &infos).drelus as u64 + 3;
    let o = SearchOptions { steps: 300, ..o };
    let (best, r) = search(&mut m, &s, &t1, &start, budget, &o).unwrap();
    assert!(r.accepted > 0 && r.result < r.start, "{r:?}");
    let kept: Vec<PatchOption> = best.sites[&first]
        .iter()
        .copied()
        .filter(|o| *o != PatchOption::Identity)
        .collect();
    assert!(
        !kept.is_empty() && kept.iter().all(|o| *o != PatchOption::RELU),
        "{kept:?}"
    );
    assert!(r.drelus <= budget);
}
