//! The pipeline end to end on a tiny generated data set and model: every stage writes its
//! outputs, an interrupted run continues where it stopped, an unchanged run does nothing, and a
//! changed budget list re-runs only the stages after the distortion tables.
use crate::common;

use brelu::pipeline::{self, PipelineConfig};
use std::path::Path;

fn write_pipeline(dir: &Path, ratios: &str) -> std::path::PathBuf {
    common::tiny_dataset(dir);
    let ft = std::fs::read_to_string(dir.join("tiny.toml"))
        .unwrap()
        .replace("lr = 0.05", "lr = 0.01");
    std::fs::write(dir.join("tiny-ft.toml"), ft).unwrap();
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        format!(
            "train = \"tiny.toml\"\nfinetune = \"tiny-ft.toml\"\nratios = [{ratios}]\n\
             [distortion]\nsamples = 8\nbatch = 4\n[secure]\nimages = 1\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn tiny_pipeline_runs_resumes_and_reruns_only_what_changed() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let cfgp = write_pipeline(tmp.path(), "0.4");
    let cfg = PipelineConfig::load(&cfgp).unwrap();
    let run_dir = tmp.path().join("run");
    let quiet = |_: &str| {};

    // Interrupted after the distortion stage.
    let out = pipeline::run(&cfg, &run_dir, Some("distortion"), &quiet).unwrap();
    assert_eq!(out.ran, ["baseline", "distortion"]);
    assert_eq!(out.stopped_after.as_deref(), Some("distortion"));
    assert!(out.report.is_none());
    assert!(run_dir.join("distortion/manifest.json").exists());

    // Continued: earlier stages are not run again.
    let out = pipeline::run(&cfg, &run_dir, None, &quiet).unwrap();
    assert!(
        !out.ran.iter().any(|s| s == "baseline" || s == "distortion"),
        "{:?}",
        out.ran
    );
    assert!(out.ran.contains(&"specs".to_string()));
    for m in ["knapsack", "uniform", "per-site"] {
        assert!(
            out.ran.contains(&format!("finetune-{m}-40.00pct")),
            "{:?}",
            out.ran
        );
    }
    // baseline + 3 specs, each evaluated and run securely; within budget.
    assert_eq!(out.rows.len(), 4);
    let relus = out.rows[0].drelus;
    for r in &out.rows[1..] {
        let e = r.spec.as_ref().unwrap();
        assert!(r.drelus <= e.budget, "{} over budget", e.name);
        assert_eq!(e.budget, (relus as f64 * 0.4).floor() as u64);
        let s = r.secure.as_ref().unwrap();
        assert_eq!((s.images, s.agree_plaintext), (1, 1), "{}", e.name);
        assert!(r.eval.images == 10);
    }
    let report = std::fs::read_to_string(out.report.unwrap()).unwrap();
    assert!(report.contains("| 40.0% ("), "{report}");
    for f in [
        "accuracy.png",
        "secure_bytes.png",
        "secure_runtime.png",
        "allocation.png",
        "results.json",
    ] {
        assert!(run_dir.join(f).exists(), "{f} missing");
    }

    // Nothing changed: nothing runs.
    let out = pipeline::run(&cfg, &run_dir, None, &quiet).unwrap();
    assert!(out.ran.is_empty(), "{:?}", out.ran);

    // Another budget list: specs onwards, not the baseline or the tables.
    let cfgp = write_pipeline(tmp.path(), "0.4, 0.7");
    let cfg = PipelineConfig::load(&cfgp).unwrap();
    let out = pipeline::run(&cfg, &run_dir, None, &quiet).unwrap();
    assert!(
        !out.ran.iter().any(|s| s == "baseline" || s == "distortion"),
        "{:?}",
        out.ran
    );
    assert!(out.ran.contains(&"specs".to_string()));
    assert!(out.ran.contains(&"finetune-knapsack-70.00pct".to_string()));
    assert!(
        !out.ran.contains(&"finetune-knapsack-40.00pct".to_string()),
        "{:?}",
        out.ran
    );
    assert_eq!(out.rows.len(), 7);
}

#[test]
fn pipeline_config_errors_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_pipeline(tmp.path(), "1.5");
    let e = PipelineConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("ratios") && e.contains("1.5"), "{e}");
    std::fs::write(
        &p,
        "train = \"tiny.toml\"\nfinetune = \"missing.toml\"\nratios = [0.1]\n",
    )
    .unwrap();
    let e = PipelineConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("missing.toml"), "{e}");
    std::fs::write(
        &p,
        "train = \"tiny.toml\"\nfinetune = \"tiny.toml\"\nratio = [0.1]\n",
    )
    .unwrap();
    let e = PipelineConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("ratio"), "{e}");
    for (extra, field) in [
        ("[iterative]\nrounds = 2\nstart = 0.5\n", "iterative.start"),
        (
            "[distortion]\nestimator = \"snr\"\n[iterative]\nrounds = 2\n",
            "iterative.rounds",
        ),
        ("[distortion]\nprobes = 0\n", "distortion.probes"),
        ("device = \"gpu\"\n", "device"),
        ("bad_images = \"skip\"\n", "bad_images"),
    ] {
        std::fs::write(
            &p,
            format!("train = \"tiny.toml\"\nfinetune = \"tiny.toml\"\nratios = [0.1]\n{extra}"),
        )
        .unwrap();
        let e = PipelineConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    std::fs::write(
        &p,
        "train = \"tiny.toml\"\nfinetune = \"tiny.toml\"\nratios = [0.1]\n\
         device = \"cuda:1\"\nbad_images = \"substitute\"\n",
    )
    .unwrap();
    let c = PipelineConfig::load(&p).unwrap();
    assert_eq!(
        c.device_setting,
        Some(brelu::ops::DeviceChoice::Cuda(Some(1)))
    );
    assert_eq!(c.bad_images, brelu::data::BadImages::Substitute);
}

/// The extra methods: `[refine]` (local search), `[iterative]` and `bytes = true` each add a
/// spec per budget with its own column in the report. The refined and iterative specs stay
/// within the budget and measure no worse than the knapsack's on the samples they were
/// judged on; the bytes spec stays within the knapsack spec's ReLU-layer bytes; the report
/// shows accuracy against bytes.
#[test]
fn pipeline_extra_methods() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let p = write_pipeline(tmp.path(), "0.4");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace(
            "ratios = [0.4]",
            "ratios = [0.4]\nbaselines = false\nbytes = true",
        )
        .replace(
            "[secure]",
            "[refine]\nsteps = 30\nsamples = 8\n[iterative]\nrounds = 2\n[secure]",
        );
    std::fs::write(&p, text).unwrap();
    let cfg = PipelineConfig::load(&p).unwrap();
    let run_dir = tmp.path().join("run");
    let out = pipeline::run(&cfg, &run_dir, None, &|_: &str| {}).unwrap();
    let entries: Vec<&brelu::pipeline::SpecEntry> =
        out.rows.iter().filter_map(|r| r.spec.as_ref()).collect();
    let methods: Vec<&str> = entries.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(methods, ["knapsack", "refine", "iterative", "bytes"]);
    for r in &out.rows[1..4] {
        let e = r.spec.as_ref().unwrap();
        assert!(
            r.drelus <= e.budget,
            "{}: {} > {}",
            e.name,
            r.drelus,
            e.budget
        );
    }
    let (knap, bytes) = (entries[0], entries[3]);
    assert_eq!(bytes.bytes_budget, knap.relu_bytes);
    assert!(bytes.relu_bytes.unwrap() <= bytes.bytes_budget.unwrap());
    let report = std::fs::read_to_string(out.report.unwrap()).unwrap();
    for col in [
        "| knapsack + local search |",
        "| iterative knapsack |",
        "| knapsack on bytes |",
    ] {
        assert!(report.contains(col), "{col} missing: {report}");
    }
    assert!(report.contains("## Accuracy against bytes"), "{report}");
    assert!(run_dir.join("accuracy_bytes.png").exists());
    // The refined and iterative specs measure no worse than the knapsack's on the samples
    // each was judged on: the iterative knapsack on the distortion stage's 8, local search on
    // the 8 held out after them.
    use brelu::distortion::{extract, DistortionTables};
    use brelu::knapsack::additivity::measure;
    let mut model = brelu::train::build_model(&cfg.train_config, tch::Device::Cpu).unwrap();
    model
        .load_weights(&run_dir.join("baseline/checkpoint.safetensors"))
        .unwrap();
    let tables = DistortionTables::read(&run_dir.join("distortion")).unwrap();
    let samples = extract::training_samples(cfg.train_config.source(), 8, 0).unwrap();
    let held_out = extract::held_out_samples(cfg.train_config.source(), 8, 0, 8).unwrap();
    assert_ne!(samples.data, held_out.data);
    let spec = |name: &str| {
        let f = run_dir.join("specs").join(format!("{name}-40.00pct.json"));
        (name.to_string(), brelu::spec::Spec::read(&f).unwrap())
    };
    let specs = [spec("knapsack"), spec("iterative")];
    let rows = measure(&mut model, &samples, 64, &tables, &specs, false).unwrap();
    assert!(rows[1].measured <= rows[0].measured, "{rows:?}");
    let specs = [spec("knapsack"), spec("refine")];
    let rows = measure(&mut model, &held_out, 64, &tables, &specs, false).unwrap();
    assert!(rows[1].measured <= rows[0].measured, "{rows:?}");
}
