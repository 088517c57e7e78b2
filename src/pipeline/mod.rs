//! The whole method in one run directory: baseline -> distortion -> specs (knapsack and two
//! uniform baselines per budget) -> fine-tune -> evaluate -> secure inference -> report.
//!
//! Every stage records `stages/<stage>.json` with a hash of its inputs (its configuration and
//! the hashes of the outputs it reads) and a hash of its outputs. A stage whose record matches
//! is skipped; a changed input re-runs that stage, which changes its output hash and so
//! re-runs the stages after it. Stages that take long (training, extraction) resume inside
//! themselves, so a killed pipeline continues where it stopped.
pub mod config;
pub mod report;

pub use config::PipelineConfig;

use crate::data::Split;
use crate::distortion::extract::{self, fnv_hex};
use crate::distortion::{collect, DistortionTables, PlanOptions, Shard};
use crate::error::{write_atomic, Error, Result};
use crate::knapsack::{self, budget_from_ratio, BuildOptions, Problem, Solver};
use crate::models::Model;
use crate::secure;
use crate::spec::{spec_cost, Catalog, PatchOption, SiteInfo, Spec};
use crate::train::{self, TrainOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

/// What a stage left behind.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub input: String,
    pub output: String,
    pub seconds: f64,
}

/// A spec of the sweep: method ("knapsack", "uniform", "per-site") at a budget.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SpecEntry {
    pub name: String,
    pub method: String,
    /// The requested budget as a fraction of the ReLUs (for absolute budgets: budget/ReLUs).
    pub ratio: f64,
    pub budget: u64,
    pub drelus: u64,
    /// Predicted total distortion (from the tables; `None` when the spec uses an option the
    /// tables lack, e.g. a uniform 3x3 patch on a map whose catalog has no 3x3).
    pub distortion: Option<f64>,
    pub file: PathBuf,
}

/// One row of the final table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub spec: Option<SpecEntry>,
    pub drelus: u64,
    pub eval: train::EvalResult,
    pub secure: Option<SecureSummary>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SecureSummary {
    pub images: usize,
    pub agree_plaintext: usize,
    pub mean_seconds: f64,
    pub mean_bytes: u64,
    pub setup_bytes: u64,
}

/// Progress messages go here (stderr in the CLI, nowhere in tests).
pub type Log<'a> = &'a dyn Fn(&str);

/// Hash of a file's bytes.
fn file_hash(p: &Path) -> Result<String> {
    let b = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    Ok(fnv_hex(b))
}

fn hash_of<T: Serialize>(v: &T) -> String {
    fnv_hex(serde_json::to_vec(v).expect("serialisable"))
}

struct Runner<'a> {
    dir: PathBuf,
    log: Log<'a>,
    /// Stages run (not skipped) in this call, in order.
    ran: Vec<String>,
}

impl Runner<'_> {
    fn stopped(self, stage: &str) -> Outcome {
        Outcome {
            ran: self.ran,
            rows: Vec::new(),
            report: None,
            stopped_after: Some(stage.to_string()),
        }
    }

    fn record_path(&self, stage: &str) -> PathBuf {
        self.dir.join("stages").join(format!("{stage}.json"))
    }

    /// Runs `f` unless the stage's record says it already ran on these inputs; returns the
    /// stage's output hash.
    fn stage(
        &mut self,
        stage: &str,
        input: String,
        f: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<String> {
        let rp = self.record_path(stage);
        if let Ok(text) = std::fs::read_to_string(&rp) {
            if let Ok(r) = serde_json::from_str::<StageRecord>(&text) {
                if r.input == input {
                    (self.log)(&format!("[skip] {stage} (up to date)"));
                    return Ok(r.output);
                }
                (self.log)(&format!("[redo] {stage}: its inputs changed"));
            }
        }
        (self.log)(&format!("[run ] {stage}"));
        let t0 = Instant::now();
        let output = f(&self.dir)?;
        let rec = StageRecord {
            input,
            output: output.clone(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        write_atomic(
            &rp,
            serde_json::to_string_pretty(&rec)
                .expect("record serialises")
                .as_bytes(),
        )?;
        self.ran.push(stage.to_string());
        Ok(output)
    }
}

fn write_json<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    write_atomic(
        p,
        serde_json::to_string_pretty(v)
            .expect("serialisable")
            .as_bytes(),
    )
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::parse(p, e.to_string()))
}

/// What [`run`] did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Stages run now (the others were up to date).
    pub ran: Vec<String>,
    pub rows: Vec<Row>,
    /// `None` when the run stopped early.
    pub report: Option<PathBuf>,
    pub stopped_after: Option<String>,
}

/// Runs (or resumes) the pipeline of `cfg` in `dir`. `stop_after` ends the run after the
/// named stage group: "baseline", "distortion", "specs", or "finetune" (after the first
/// fine-tuned spec).
pub fn run(
    cfg: &PipelineConfig,
    dir: &Path,
    stop_after: Option<&str>,
    log: Log,
) -> Result<Outcome> {
    let base_cfg = &cfg.train_config;
    let ft_cfg = &cfg.finetune_config;
    let mut r = Runner {
        dir: dir.to_path_buf(),
        log,
        ran: Vec::new(),
    };
    let stop = |s: &str| stop_after == Some(s);

    // 1. Baseline weights.
    let base_w = dir.join("baseline").join(train::CHECKPOINT_WEIGHTS);
    let base_in = hash_of(&(base_cfg, base_cfg.epochs, cfg.weights_hash()?));
    let base_hash = r.stage("baseline", base_in, |d| {
        let run_dir = d.join("baseline");
        if let Some(w) = &cfg.weights {
            std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
            std::fs::copy(w, &base_w).map_err(|e| Error::io(w, e))?;
        } else {
            // A different recipe than the checkpoint's cannot resume it.
            if let Some(ck) = train::read_checkpoint(&run_dir)? {
                if ck.config_hash != base_cfg.hash() {
                    std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
                }
            }
            let mut model = train::build_model(base_cfg, Device::Cpu)?;
            let opts = TrainOptions {
                run_dir: run_dir.clone(),
                resume: true,
                progress: cfg.progress,
                spec: None,
                teacher: None,
            };
            train::train(base_cfg, &mut model, &opts)?;
        }
        file_hash(&base_w)
    })?;
    if stop("baseline") {
        return Ok(r.stopped("baseline"));
    }
    let load_model = |w: &Path, spec: Option<&Spec>| -> Result<Model> {
        let mut m = train::build_model(base_cfg, Device::Cpu)?;
        m.load_weights(w)?;
        if let Some(s) = spec {
            m.apply_spec(s)?;
        }
        Ok(m)
    };

    // 2. Distortion tables.
    let ddir = dir.join("distortion");
    let dist_in = hash_of(&(&base_hash, &cfg.distortion));
    let dist_hash = r.stage("distortion", dist_in, |_| {
        let model = load_model(&base_w, None)?;
        let d = &cfg.distortion;
        let samples = extract::training_samples(base_cfg, d.samples, d.seed)?;
        let opts = PlanOptions {
            estimator: d.estimator.parse().map_err(Error::InvalidArgument)?,
            seed: d.seed,
            batch: d.batch,
            stack: d.stack,
            chunk: d.chunk,
            probes: base_cfg.num_classes.min(64),
            sites: None,
            zero: false,
            skip_unchanged: true,
            baseline: None,
        };
        let job = extract::plan(&model, &Catalog::builtin(), &samples, &opts)?;
        if ddir.join("job.json").exists() && extract::init_dir(&ddir, &job).is_err() {
            std::fs::remove_dir_all(&ddir).map_err(|e| Error::io(&ddir, e))?;
        }
        extract::init_dir(&ddir, &job)?;
        let make = |_: Device| load_model(&base_w, None);
        extract::run(
            &job,
            &ddir,
            &samples,
            Shard::ALL,
            &[Device::Cpu],
            &make,
            None,
        )?;
        collect(&ddir)?;
        file_hash(&ddir.join("manifest.json")).map(|h| h + &job.hash())
    })?;
    if stop("distortion") {
        return Ok(r.stopped("distortion"));
    }

    // 3. Specs: knapsack and the two uniform baselines at every budget.
    let model0 = load_model(&base_w, None)?;
    let sites = model0.sites().to_vec();
    let relus: u64 = sites.iter().map(|s| s.relus() as u64).sum();
    let mut budgets: Vec<(f64, u64)> = cfg
        .ratios
        .iter()
        .map(|&q| Ok((q, budget_from_ratio(relus, q)?)))
        .collect::<Result<_>>()?;
    budgets.extend(cfg.budgets.iter().map(|&b| (b as f64 / relus as f64, b)));
    let specs_path = dir.join("specs").join("specs.json");
    let specs_in = hash_of(&(&dist_hash, &budgets, cfg.baselines));
    r.stage("specs", specs_in, |d| {
        let tables = DistortionTables::read(&ddir)?;
        let entries = make_specs(&tables, &sites, &budgets, cfg.baselines, &d.join("specs"))?;
        write_json(&specs_path, &entries)?;
        file_hash(&specs_path)
    })?;
    if stop("specs") {
        return Ok(r.stopped("specs"));
    }
    let specs: Vec<SpecEntry> = read_json(&specs_path)?;

    // 4-6. Per spec (and the baseline network): fine-tune, evaluate, secure inference.
    let test = train::load_split(ft_cfg, Split::Test)?;
    let norm = train::normalization(ft_cfg.dataset.kind);
    let eval_bs = ft_cfg.eval_batch_size.unwrap_or(ft_cfg.batch_size);
    let mut rows = Vec::new();
    let mut all: Vec<Option<SpecEntry>> = vec![None];
    all.extend(specs.into_iter().map(Some));
    for entry in all {
        let name = entry
            .as_ref()
            .map(|e| e.name.clone())
            .unwrap_or("baseline".into());
        let spec = match &entry {
            Some(e) => Some(Spec::load(
                &dir.join(&e.file),
                model0.name(),
                model0.config().input,
                &sites,
            )?),
            None => None,
        };
        let (weights, w_hash) = match &spec {
            None => (base_w.clone(), base_hash.clone()),
            Some(s) => {
                let run_dir = dir.join("finetune").join(&name);
                let w = run_dir.join(train::CHECKPOINT_WEIGHTS);
                let ft_in = hash_of(&(&base_hash, hash_of(&s.sites), ft_cfg, ft_cfg.epochs));
                let h = r.stage(&format!("finetune-{name}"), ft_in, |_| {
                    if let Some(ck) = train::read_checkpoint(&run_dir)? {
                        if ck.config_hash != ft_cfg.hash() {
                            std::fs::remove_dir_all(&run_dir)
                                .map_err(|e| Error::io(&run_dir, e))?;
                        }
                    }
                    let mut m = load_model(&base_w, Some(s))?;
                    let opts = TrainOptions {
                        run_dir: run_dir.clone(),
                        resume: true,
                        progress: cfg.progress,
                        spec: entry.as_ref().map(|e| dir.join(&e.file)),
                        // With `[distill]` in the fine-tune recipe: the original network.
                        teacher: Some(base_w.clone()),
                    };
                    train::train(ft_cfg, &mut m, &opts)?;
                    file_hash(&w)
                })?;
                (w, h)
            }
        };
        let model = load_model(&weights, spec.as_ref())?;
        let drelus = match &spec {
            Some(s) => spec_cost(s, &sites).drelus as u64,
            None => relus,
        };
        let epath = dir.join("eval").join(format!("{name}.json"));
        let e_in = match test.seg {
            None => hash_of(&(&w_hash, ft_cfg.test_limit, eval_bs)),
            // Segmentation scores also depend on the test scale and the inference mode.
            Some(_) => hash_of(&(&w_hash, ft_cfg.test_limit, eval_bs, &ft_cfg.dataset)),
        };
        r.stage(&format!("eval-{name}"), e_in, |_| {
            let res = train::evaluate(&model, &test, &norm, eval_bs)?;
            write_json(&epath, &res)?;
            file_hash(&epath)
        })?;
        let eval: train::EvalResult = read_json(&epath)?;
        let secure = if cfg.secure.images > 0 {
            let spath = dir.join("secure").join(format!("{name}.json"));
            let s_in = hash_of(&(&w_hash, entry.as_ref().map(|e| &e.name), &cfg.secure));
            r.stage(&format!("secure-{name}"), s_in, |_| {
                let n = cfg.secure.images.min(test.len());
                let first: Vec<i64> = (0..n as i64).collect();
                let x = norm.apply(&test.select(&first)?);
                let per: usize = x.size()[1..].iter().product::<i64>() as usize;
                let flat = Vec::<f32>::try_from(x.flatten(0, -1))?;
                let images: Vec<Vec<f32>> = flat.chunks(per).map(|c| c.to_vec()).collect();
                // Segmentation: the images come at the input size (fixed transform) and
                // there is no per-image label to compare with.
                let labels: Option<Vec<usize>> = match test.seg {
                    Some(_) => None,
                    None => Some(
                        Vec::<i64>::try_from(test.labels.narrow(0, 0, n as i64))?
                            .into_iter()
                            .map(|l| l as usize)
                            .collect(),
                    ),
                };
                let rep = secure::report::run_compare(
                    &model,
                    &images,
                    labels.as_deref(),
                    secure::plan::Settings::default(),
                    false,
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
            Some(read_json::<SecureSummary>(&spath)?)
        } else {
            None
        };
        rows.push(Row {
            spec: entry,
            drelus,
            eval,
            secure,
        });
        if stop("finetune") && rows.len() > 1 {
            return Ok(r.stopped("finetune"));
        }
    }

    // 7. Report.
    let report = report::write(cfg, dir, &rows, relus, &sites)?;
    write_json(&dir.join("results.json"), &rows)?;
    Ok(Outcome {
        ran: r.ran,
        rows,
        report: Some(report),
        stopped_after: None,
    })
}

/// The knapsack spec and the two uniform baselines at every budget, written under `dir`.
fn make_specs(
    tables: &DistortionTables,
    sites: &[SiteInfo],
    budgets: &[(f64, u64)],
    baselines: bool,
    dir: &Path,
) -> Result<Vec<SpecEntry>> {
    let problem = Problem::build(tables, sites, BuildOptions::default())?;
    let catalog = Catalog::builtin();
    let mut out = Vec::new();
    for &(ratio, budget) in budgets {
        let label = format!("{:.2}pct", ratio * 100.0);
        let mut specs: Vec<(String, Spec)> = Vec::new();
        let (_, sol) = knapsack::solve(&problem, budget, Solver::Auto, 2 << 30)?;
        specs.push(("knapsack".into(), problem.to_spec(&sol.choice)));
        if baselines {
            // No uniform patch may fit a small budget (one DReLU per channel is the floor).
            if let Some(u) = uniform_spec(tables, sites, budget) {
                specs.push(("uniform".into(), u));
            }
            specs.push((
                "per-site".into(),
                per_site_spec(tables, sites, &catalog, budget)?,
            ));
        }
        for (method, spec) in specs {
            let name = format!("{method}-{label}");
            let file = PathBuf::from("specs").join(format!("{name}.json"));
            spec.write(&dir.join(format!("{name}.json")))?;
            out.push(SpecEntry {
                drelus: spec_cost(&spec, sites).drelus as u64,
                distortion: crate::distortion::compare::spec_distortion(tables, &spec).ok(),
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

/// Patch options of a site's catalog (identity and zero left out), most DReLUs first.
fn patches(catalog: &Catalog, s: &SiteInfo) -> Vec<PatchOption> {
    let mut v: Vec<PatchOption> = catalog
        .options(s)
        .into_iter()
        .filter(|o| matches!(o, PatchOption::Patch { .. }))
        .collect();
    v.sort_by_key(|o| std::cmp::Reverse(o.drelus(s.height, s.width)));
    v
}

fn spec_for(
    tables: &DistortionTables,
    sites: &[SiteInfo],
    pick: impl Fn(&SiteInfo) -> PatchOption,
) -> Spec {
    Spec {
        model: tables.model.clone(),
        input: tables.input,
        sites: sites
            .iter()
            .map(|s| (s.name.clone(), vec![pick(s); s.channels]))
            .collect(),
        source: None,
    }
}

/// One patch size for every channel: the one with the most DReLUs within the budget (the
/// candidates are the square patches 1x1 .. of the largest map, clipped to each site); `None`
/// when even one DReLU per channel exceeds the budget.
fn uniform_spec(tables: &DistortionTables, sites: &[SiteInfo], budget: u64) -> Option<Spec> {
    let side = sites
        .iter()
        .map(|s| s.height.max(s.width))
        .max()
        .unwrap_or(1) as u32;
    (1..=side)
        .map(|k| Spec::uniform(&tables.model, tables.input, sites, PatchOption::patch(k, k)))
        .find(|spec| spec_cost(spec, sites).drelus as u64 <= budget)
}

/// The budget split across sites in proportion to their ReLUs; per site the catalog patch
/// with the most DReLUs that fits its share (identity when none does).
fn per_site_spec(
    tables: &DistortionTables,
    sites: &[SiteInfo],
    catalog: &Catalog,
    budget: u64,
) -> Result<Spec> {
    let relus: u64 = sites.iter().map(|s| s.relus() as u64).sum();
    Ok(spec_for(tables, sites, |s| {
        let share = budget as f64 * s.relus() as f64 / relus as f64;
        patches(catalog, s)
            .into_iter()
            .find(|o| (o.drelus(s.height, s.width) * s.channels) as f64 <= share)
            .unwrap_or(PatchOption::Identity)
    }))
}
