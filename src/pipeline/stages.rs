//! One function per stage of the pipeline; [`super::run`] calls them in order.
use super::runner::{file_hash, read_json, write_json, Runner};
use super::{PipelineConfig, Row, SecureSummary, SpecEntry};
use crate::data::{Dataset, Normalize};
use crate::distortion::extract::{self, Extraction};
use crate::distortion::{DistortionTables, Samples, Shard};
use crate::error::{Error, Result};
use crate::experiment::{Experiment, TestImages};
use crate::hash::of_json;
use crate::knapsack::iterative::{iterate, IterOptions};
use crate::knapsack::local::{search, SearchOptions};
use crate::knapsack::{
    self, baselines, budget_from_ratio, byte_budget, BuildOptions, Problem, Solver,
};
use crate::models::Model;
use crate::secure;
use crate::spec::{spec_cost, Catalog, SiteInfo, Spec};
use crate::train::{self, TrainOptions};
use std::path::{Path, PathBuf};
use tch::Device;

/// The baseline network's weights and their hash.
pub(super) struct Baseline {
    pub(super) weights: PathBuf,
    pub(super) hash: String,
}

/// The baseline network as the later stages see it.
pub(super) struct Network {
    pub(super) model: Model,
    pub(super) sites: Vec<SiteInfo>,
    /// ReLUs per image.
    pub(super) relus: u64,
}

impl Network {
    pub(super) fn load(cfg: &PipelineConfig, base: &Baseline) -> Result<Network> {
        let model = load_model(cfg, &base.weights, None)?;
        let sites = model.sites().to_vec();
        let relus: u64 = sites.iter().map(|s| s.relus() as u64).sum();
        Ok(Network {
            model,
            sites,
            relus,
        })
    }
}

/// The baseline recipe with `weights`: the experiment every stage builds its models from.
fn experiment(cfg: &PipelineConfig, weights: &Path) -> Experiment {
    Experiment::of_config(&cfg.train_config).with_weights(Some(weights))
}

/// The baseline recipe's model with `weights` and, if given, a spec applied, on the pipeline's
/// device.
fn load_model(cfg: &PipelineConfig, weights: &Path, spec: Option<&Spec>) -> Result<Model> {
    experiment(cfg, weights).model_with(cfg.device, spec)
}

/// The training loader: default threads and queue, the configured bad-image policy.
fn loader(cfg: &PipelineConfig) -> crate::data::LoaderOptions {
    crate::data::LoaderOptions {
        bad_images: cfg.bad_images,
        ..Default::default()
    }
}

/// Single process, or rank 0 of the pipeline's process group.
fn leader(cfg: &PipelineConfig) -> bool {
    cfg.group.as_ref().is_none_or(|g| g.is_leader())
}

/// Removes a training run directory whose checkpoint was made with another recipe (it cannot
/// be resumed); rank 0 removes, the others wait for it.
fn drop_stale_run(cfg: &PipelineConfig, run_dir: &Path, recipe: &train::Config) -> Result<()> {
    if leader(cfg) {
        if let Some(ck) = train::read_checkpoint(run_dir)? {
            if ck.config_hash != recipe.hash() {
                std::fs::remove_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
            }
        }
    }
    cfg.group.as_ref().map_or(Ok(()), |g| g.barrier())
}

/// 1. Baseline weights: copied from the configuration (rank 0), or trained (every rank).
pub(super) fn baseline(r: &mut Runner, cfg: &PipelineConfig) -> Result<Baseline> {
    let base_cfg = &cfg.train_config;
    let base_w = r.dir.join("baseline").join(train::CHECKPOINT_WEIGHTS);
    let base_in = of_json(&(base_cfg, base_cfg.epochs, cfg.weights_hash()?));
    let train_it = cfg.weights.is_none();
    let hash = r.stage_on("baseline", base_in, train_it, |d| {
        let run_dir = d.join("baseline");
        if let Some(w) = &cfg.weights {
            std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
            std::fs::copy(w, &base_w).map_err(|e| Error::io(w, e))?;
        } else {
            drop_stale_run(cfg, &run_dir, base_cfg)?;
            let mut model = train::build_model(base_cfg, cfg.device)?;
            let opts = TrainOptions {
                resume: true,
                progress: cfg.progress,
                group: cfg.group.clone(),
                loader: loader(cfg),
                ..TrainOptions::new(run_dir.clone())
            };
            train::train(base_cfg, &mut model, &opts)?;
        }
        file_hash(&base_w)
    })?;
    Ok(Baseline {
        weights: base_w,
        hash,
    })
}

/// 2. Distortion tables of the baseline network; returns the stage's output hash.
pub(super) fn distortion(r: &mut Runner, cfg: &PipelineConfig, base: &Baseline) -> Result<String> {
    let base_cfg = &cfg.train_config;
    let ddir = r.dir.join("distortion");
    let opts = cfg.distortion.plan_options(&cfg.train_config);
    // The probes actually used: their default follows the task (`distortion::settings::default_probes`).
    let dist_in = of_json(&(&base.hash, &cfg.distortion, opts.probes));
    // Every rank measures its shard of the units; rank 0 prepares the directory first and
    // collects the tables after all shards are done (the tables do not depend on the split).
    r.stage("distortion", dist_in, |_| {
        let d = &cfg.distortion;
        let samples = extract::training_samples(base_cfg.source(), d.samples, d.seed)?;
        let catalog = Catalog::builtin();
        let group = cfg.group.as_deref();
        let shard = group.map_or(Shard::ALL, |g| Shard {
            index: g.rank,
            count: g.world,
        });
        let model = load_model(cfg, &base.weights, None)?;
        if let Some(g) = group {
            if g.is_leader() {
                let job = extract::plan(&model, &catalog, &samples, &opts)?;
                extract::prepare(&ddir, &job, true)?;
            }
            g.barrier()?;
        }
        let exp = experiment(cfg, &base.weights);
        let make = move |dev: Device| exp.model_with(dev, None);
        let bar = crate::progress::bar(cfg.progress, 0, "distortion", "units");
        let x = Extraction {
            dir: &ddir,
            catalog: &catalog,
            samples: &samples,
            options: &opts,
            shard,
            devices: &[cfg.device],
            make_model: &make,
            replace_stale: group.is_none(),
            collect: group.is_none(),
            progress: Some(&bar),
        };
        let done = extract::extract(&x, model, &|_| {})?;
        if let Some(g) = group {
            g.barrier()?;
            if !g.is_leader() {
                return Ok(String::new());
            }
            extract::collect(&ddir)?;
        } else {
            done.tables.expect("collection was asked for")?;
        }
        file_hash(&ddir.join("manifest.json")).map(|h| h + &done.job.hash())
    })
}

/// Stage 3, specs: the knapsack, the two uniform baselines and the extra methods asked for
/// (local search, iterative knapsack, knapsack on bytes), at every budget.
pub(super) fn specs(
    r: &mut Runner,
    cfg: &PipelineConfig,
    base: &Baseline,
    net: &Network,
    dist_hash: &str,
) -> Result<PathBuf> {
    let relus = net.relus;
    let mut budgets: Vec<(f64, u64)> = cfg
        .ratios
        .iter()
        .map(|&q| Ok((q, budget_from_ratio(relus, q)?)))
        .collect::<Result<_>>()?;
    budgets.extend(cfg.budgets.iter().map(|&b| (b as f64 / relus as f64, b)));
    let ddir = r.dir.join("distortion");
    let specs_path = r.dir.join("specs").join("specs.json");
    // Settings of a method that is off do not invalidate the stage.
    let refine = (cfg.refine.steps > 0).then_some(&cfg.refine);
    let iterative = (cfg.iterative.rounds > 0).then_some((&cfg.iterative, &cfg.distortion));
    let specs_in = match (iterative, cfg.bytes) {
        (None, false) => of_json(&(dist_hash, &budgets, cfg.baselines, refine)),
        extra => of_json(&(dist_hash, &budgets, cfg.baselines, refine, extra)),
    };
    let run_dir = r.dir.clone();
    r.stage_leader("specs", specs_in, |d| {
        let tables = DistortionTables::read(&ddir)?;
        let refiner = match refine {
            Some(rs) => Some(Refiner {
                model: load_model(cfg, &base.weights, None)?,
                samples: extract::held_out_samples(
                    cfg.train_config.source(),
                    rs.samples.unwrap_or(256),
                    tables.seed,
                    tables.samples as usize,
                )?,
                opts: SearchOptions {
                    steps: rs.steps,
                    candidates: 64,
                    seed: rs.seed,
                    batch: 64,
                },
            }),
            None => None,
        };
        let exp = experiment(cfg, &base.weights);
        let make = move |dev: Device| exp.model_with(dev, None);
        let iterative = match iterative {
            Some((it, dist)) => Some(Iterative {
                model: load_model(cfg, &base.weights, None)?,
                make: &make,
                samples: extract::training_samples(
                    cfg.train_config.source(),
                    dist.samples,
                    dist.seed,
                )?,
                opts: IterOptions {
                    rounds: it.rounds,
                    start_budget: None,
                    plan: dist.plan_options(&cfg.train_config),
                    batch: dist.batch,
                },
                start: it.start,
                dir: run_dir.join("distortion").join("iterative"),
            }),
            None => None,
        };
        let mut extra = Extra {
            refiner,
            iterative,
            bytes: cfg.bytes,
        };
        let entries = make_specs(
            &tables,
            &net.sites,
            &budgets,
            cfg.baselines,
            &mut extra,
            &d.join("specs"),
        )?;
        write_json(&specs_path, &entries)?;
        file_hash(&specs_path)
    })?;
    Ok(specs_path)
}

/// The test split the rows are measured on, its normalisation and evaluation batch size.
pub(super) struct TestSet {
    pub(super) data: Dataset,
    pub(super) norm: Normalize,
    pub(super) batch: usize,
}

/// 4-6. One row: fine-tune (unless `entry` is the baseline network), evaluate, secure
/// inference.
pub(super) fn row(
    r: &mut Runner,
    cfg: &PipelineConfig,
    base: &Baseline,
    net: &Network,
    test: &TestSet,
    entry: Option<SpecEntry>,
) -> Result<Row> {
    let name = entry
        .as_ref()
        .map(|e| e.name.clone())
        .unwrap_or("baseline".into());
    let spec = match &entry {
        Some(e) => Some(Spec::load(
            &r.dir.join(&e.file),
            net.model.name(),
            net.model.config().input,
            &net.sites,
        )?),
        None => None,
    };
    let (weights, w_hash) = match (&spec, &entry) {
        (Some(s), Some(e)) => finetune(r, cfg, base, e, s)?,
        _ => (base.weights.clone(), base.hash.clone()),
    };
    let model = load_model(cfg, &weights, spec.as_ref())?;
    let drelus = match &spec {
        Some(s) => spec_cost(s, &net.sites).drelus as u64,
        None => net.relus,
    };
    let eval = evaluate(r, cfg, &name, &w_hash, &model, test)?;
    let secure = if cfg.secure.images > 0 {
        let label = entry.as_ref().map(|e| &e.name);
        let trained = (&model, weights.as_path(), spec.as_ref());
        Some(secure_inference(
            r, cfg, &name, &w_hash, label, trained, test,
        )?)
    } else {
        None
    };
    Ok(Row {
        spec: entry,
        drelus,
        eval,
        secure,
    })
}

/// 4. Fine-tunes the baseline under spec `s`; returns the weights and their hash.
fn finetune(
    r: &mut Runner,
    cfg: &PipelineConfig,
    base: &Baseline,
    e: &SpecEntry,
    s: &Spec,
) -> Result<(PathBuf, String)> {
    let ft_cfg = &cfg.finetune_config;
    let dir = r.dir.clone();
    let run_dir = dir.join("finetune").join(&e.name);
    let w = run_dir.join(train::CHECKPOINT_WEIGHTS);
    let ft_in = of_json(&(&base.hash, of_json(&s.sites), ft_cfg, ft_cfg.epochs));
    let h = r.stage(&format!("finetune-{}", e.name), ft_in, |_| {
        drop_stale_run(cfg, &run_dir, ft_cfg)?;
        let mut m = load_model(cfg, &base.weights, Some(s))?;
        let opts = TrainOptions {
            resume: true,
            progress: cfg.progress,
            group: cfg.group.clone(),
            loader: loader(cfg),
            spec: Some(dir.join(&e.file)),
            weights: Some(base.weights.clone()),
            // With `[distill]` in the fine-tune recipe: the original network.
            teacher: Some(base.weights.clone()),
            ..TrainOptions::new(run_dir.clone())
        };
        train::train(ft_cfg, &mut m, &opts)?;
        file_hash(&w)
    })?;
    Ok((w, h))
}

/// 5. Test-set evaluation of `model`.
fn evaluate(
    r: &mut Runner,
    cfg: &PipelineConfig,
    name: &str,
    w_hash: &str,
    model: &Model,
    test: &TestSet,
) -> Result<train::EvalResult> {
    let ft_cfg = &cfg.finetune_config;
    let eval_bs = test.batch;
    let epath = r.dir.join("eval").join(format!("{name}.json"));
    let e_in = match test.data.seg {
        None => of_json(&(w_hash, ft_cfg.test_limit, eval_bs)),
        // Segmentation scores also depend on the test scale and the inference mode.
        Some(_) => of_json(&(w_hash, ft_cfg.test_limit, eval_bs, &ft_cfg.dataset)),
    };
    // Every rank evaluates its share; rank 0 writes the figures.
    r.stage(&format!("eval-{name}"), e_in, |_| {
        let group = cfg.group.as_deref();
        let res = train::evaluate_sharded(model, &test.data, &test.norm, eval_bs, group)?;
        if !leader(cfg) {
            return Ok(String::new());
        }
        write_json(&epath, &res)?;
        file_hash(&epath)
    })?;
    read_json(&epath)
}

/// 6. Secure inference of the first test images with `model`.
fn secure_inference(
    r: &mut Runner,
    cfg: &PipelineConfig,
    name: &str,
    w_hash: &str,
    label: Option<&String>,
    (model, weights, spec): (&Model, &Path, Option<&Spec>),
    test: &TestSet,
) -> Result<SecureSummary> {
    let spath = r.dir.join("secure").join(format!("{name}.json"));
    let s_in = of_json(&(w_hash, label, &cfg.secure));
    r.stage_leader(&format!("secure-{name}"), s_in, |_| {
        // The engine computes on the CPU, whatever device trained the network.
        let cpu_model;
        let model = if model.device() == Device::Cpu {
            model
        } else {
            cpu_model = experiment(cfg, weights).model_with(Device::Cpu, spec)?;
            &cpu_model
        };
        let first = TestImages::of(&test.data, &test.norm, cfg.secure.images)?;
        let rep = secure::report::run_compare(
            model,
            &first.images,
            first.labels.as_deref(),
            secure::plan::Settings::default(),
            secure::link::LinkConfig::default(),
        )?;
        let sum = SecureSummary {
            images: rep.images.len(),
            agree_plaintext: rep.agree_plaintext,
            mean_seconds: rep.mean_seconds,
            mean_bytes: rep.mean_bytes.total,
            setup_bytes: rep.setup_bytes.total,
        };
        write_json(&spath, &sum)?;
        file_hash(&spath)
    })?;
    read_json(&spath)
}

/// What the `refine` method needs: the baseline network, the samples moves are judged on and
/// the search's settings.
pub(super) struct Refiner {
    model: Model,
    samples: Samples,
    opts: SearchOptions,
}

/// What the `iterative` method needs: the baseline network (and how to build it for the
/// extractions), the samples each round measures on, the rounds' settings and where they
/// work (one directory per budget, so a rerun resumes their extractions).
pub(super) struct Iterative<'a> {
    model: Model,
    make: &'a (dyn Fn(Device) -> Result<Model> + Sync),
    samples: Samples,
    opts: IterOptions,
    /// The shrinking schedule's start as a multiple of the budget.
    start: f64,
    dir: PathBuf,
}

/// The methods beyond the knapsack and the uniform baselines; each is off when `None`/false.
pub(super) struct Extra<'a> {
    refiner: Option<Refiner>,
    iterative: Option<Iterative<'a>>,
    bytes: bool,
}

/// The knapsack on bytes: the ReLU layers send at most `bytes` per image on the wire.
fn bytes_spec(tables: &DistortionTables, sites: &[SiteInfo], bytes: u64) -> Result<Spec> {
    let (cost, budget) = byte_budget(bytes, sites.len());
    let opts = BuildOptions {
        cost,
        ..Default::default()
    };
    let p = Problem::build(tables, sites, opts)?;
    let (_, sol) = knapsack::solve(&p, budget, Solver::Auto, knapsack::DEFAULT_MAX_MEMORY)?;
    Ok(p.to_spec(&sol.choice))
}

/// The knapsack spec, the two uniform baselines and the extra methods' specs at every budget,
/// written under `dir`.
pub(super) fn make_specs(
    tables: &DistortionTables,
    sites: &[SiteInfo],
    budgets: &[(f64, u64)],
    baselines: bool,
    extra: &mut Extra,
    dir: &Path,
) -> Result<Vec<SpecEntry>> {
    let problem = Problem::build(tables, sites, BuildOptions::default())?;
    let catalog = Catalog::builtin();
    let mut out = Vec::new();
    for &(ratio, budget) in budgets {
        let label = format!("{:.2}pct", ratio * 100.0);
        let mut specs: Vec<(String, Spec, Option<u64>)> = Vec::new();
        let (_, sol) =
            knapsack::solve(&problem, budget, Solver::Auto, knapsack::DEFAULT_MAX_MEMORY)?;
        let knap = problem.to_spec(&sol.choice);
        if let Some(rf) = extra.refiner.as_mut() {
            let s = search(&mut rf.model, &rf.samples, tables, &knap, budget, &rf.opts)?.0;
            specs.push(("refine".into(), s, None));
        }
        if let Some(it) = extra.iterative.as_mut() {
            let start = (it.start > 1.0).then(|| (budget as f64 * it.start).round() as u64);
            let o = IterOptions {
                start_budget: start,
                ..it.opts.clone()
            };
            let wdir = it.dir.join(&label);
            let (s, rep) = iterate(
                &mut it.model,
                it.make,
                &it.samples,
                tables,
                budget,
                &o,
                &wdir,
            )?;
            write_json(&wdir.join("iterate.json"), &rep)?;
            specs.push(("iterative".into(), s, None));
        }
        if extra.bytes {
            let b = spec_cost(&knap, sites).bytes_engine;
            specs.push(("bytes".into(), bytes_spec(tables, sites, b)?, Some(b)));
        }
        specs.insert(0, ("knapsack".into(), knap, None));
        if baselines {
            // No uniform patch may fit a small budget (one DReLU per channel is the floor).
            if let Some(u) = baselines::uniform_spec(tables, sites, budget) {
                specs.push(("uniform".into(), u, None));
            }
            specs.push((
                "per-site".into(),
                baselines::per_site_spec(tables, sites, &catalog, budget)?,
                None,
            ));
        }
        for (method, spec, bytes_budget) in specs {
            let name = format!("{method}-{label}");
            let file = PathBuf::from("specs").join(format!("{name}.json"));
            spec.write(&dir.join(format!("{name}.json")))?;
            let cost = spec_cost(&spec, sites);
            out.push(SpecEntry {
                drelus: cost.drelus as u64,
                relu_bytes: Some(cost.bytes_engine),
                bytes_budget,
                distortion: crate::knapsack::compare::spec_distortion(tables, &spec).ok(),
                name,
                method,
                ratio,
                budget,
                file,
            });
        }
    }
    Ok(out)
}
