//! `brelu train`, `finetune` and `eval` as a user runs them, on a tiny generated MNIST-layout
//! data set: run directories, JSON reports checked against a direct computation, the
//! command-line overrides, starting from weights, and clear errors.
use crate::common;

use brelu::models::{find, ArchConfig, Model};
use brelu::spec::{spec_cost, Spec};
use brelu::train;
use common::brelu;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn ok(args: &[&str]) -> String {
    let (success, out, err) = brelu(args);
    assert!(success, "brelu {args:?} failed:\n{err}");
    out
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Top-1 of `weights` (with `spec`) on the test split, computed here from the forward pass.
fn direct_top1(cfg_path: &Path, weights: &Path, spec: Option<&Spec>) -> f64 {
    let cfg = train::Config::load(cfg_path).unwrap();
    let arch = find(&cfg.model).unwrap();
    let cfgm = ArchConfig {
        input: cfg.input,
        num_classes: cfg.num_classes,
    };
    let mut m = Model::new(arch, cfgm, Device::Cpu).unwrap();
    m.load_weights(weights).unwrap();
    if let Some(s) = spec {
        m.apply_spec(s).unwrap();
    }
    let test = train::load_split(&cfg, brelu::data::Split::Test).unwrap();
    let idx: Vec<i64> = (0..test.len() as i64).collect();
    let x = brelu::data::normalization(cfg.dataset.kind).apply(&test.select(&idx).unwrap());
    let logits = tch::no_grad(|| m.forward_t(&x, false));
    let hits = logits
        .argmax(1, false)
        .eq_tensor(&test.labels)
        .sum(Kind::Int64)
        .int64_value(&[]);
    hits as f64 / test.len() as f64
}

#[test]
fn train_eval_finetune_from_the_command_line() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let c = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();

    ok(&[
        "train", "--config", c, "-o", r, "--epochs", "2", "--lr", "0.02",
    ]);
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let epochs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(epochs.len(), 2);
    assert_eq!(epochs[1]["epoch"], 2);
    // Cosine over 2 epochs starting at the overridden rate.
    assert_eq!(epochs[0]["lr"].as_f64().unwrap(), 0.02);
    let w = run.join("checkpoint.safetensors");
    let w_s = w.to_str().unwrap();

    // eval --json against a forward pass done here.
    let rep: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "--config", c, "-w", w_s, "--json"])).unwrap();
    assert_eq!(rep["images"], 10);
    let top1 = rep["top1"].as_f64().unwrap();
    assert!((top1 - direct_top1(&cfg, &w, None)).abs() < 1e-12, "{rep}");
    assert!(rep["top5"].as_f64().unwrap() >= top1);
    assert_eq!(rep["relus"], rep["drelus"]);

    // A 2x2 spec: fine-tune with it, then eval reports its DReLU count.
    let spec_p = tmp.path().join("spec.json");
    let sp = spec_p.to_str().unwrap();
    ok(&[
        "spec",
        "uniform",
        "--model",
        "resnet18-cifar-light",
        "--input",
        "1,8,8",
        "--patch",
        "2x2",
        "-o",
        sp,
    ]);
    let ft = tmp.path().join("ft");
    ok(&[
        "finetune",
        "--config",
        c,
        "-w",
        w_s,
        "--spec",
        sp,
        "-o",
        ft.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    let wf = ft.join("checkpoint.safetensors");
    let rep: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--config",
        c,
        "-w",
        wf.to_str().unwrap(),
        "--spec",
        sp,
        "--json",
    ]))
    .unwrap();
    let model = Model::new(
        find("resnet18-cifar-light").unwrap(),
        ArchConfig {
            input: [1, 8, 8],
            num_classes: 10,
        },
        Device::Cpu,
    )
    .unwrap();
    let spec = Spec::load(&spec_p, model.name(), [1, 8, 8], model.sites()).unwrap();
    let drelus = spec_cost(&spec, model.sites()).drelus;
    assert_eq!(rep["drelus"].as_u64().unwrap() as usize, drelus);
    assert!(drelus < rep["relus"].as_u64().unwrap() as usize);
    let top1 = rep["top1"].as_f64().unwrap();
    assert!((top1 - direct_top1(&cfg, &wf, Some(&spec))).abs() < 1e-12);
}

#[test]
fn train_from_weights_with_overrides_and_refused_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let c = cfg.to_str().unwrap();
    let a = tmp.path().join("a");
    ok(&[
        "train",
        "--config",
        c,
        "-o",
        a.to_str().unwrap(),
        "--batch-size",
        "16",
    ]);
    let w = a.join("checkpoint.safetensors");

    // From weights with a vanishing rate: the parameters stay where they started (batch-norm
    // running statistics still move, so only weights and biases are compared).
    let b = tmp.path().join("b");
    ok(&[
        "train",
        "--config",
        c,
        "-o",
        b.to_str().unwrap(),
        "-w",
        w.to_str().unwrap(),
        "--lr",
        "1e-12",
        "--seed",
        "9",
    ]);
    let (start, end) = (tensors(&w), tensors(&b.join("checkpoint.safetensors")));
    assert_eq!(start.len(), end.len());
    let mut compared = 0;
    for ((n, t0), (n1, t1)) in start.iter().zip(&end) {
        assert_eq!(n, n1);
        if n.ends_with("weight") || n.ends_with("bias") {
            let d = (t0 - t1).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{n} moved by {d}");
            compared += 1;
        }
    }
    assert!(compared > 10);

    // Resuming with another override (the rate, or the micro-batches per step) is refused,
    // naming the checkpoint.
    for flag in [["--lr", "0.5"], ["--accumulate", "2"]] {
        let (success, _, err) = brelu(&[
            "train",
            "--config",
            c,
            "-o",
            b.to_str().unwrap(),
            "--resume",
            flag[0],
            flag[1],
        ]);
        assert!(!success, "{flag:?}");
        assert!(
            err.contains("checkpoint.json") && err.contains("another configuration"),
            "{flag:?}: {err}"
        );
    }
}

#[test]
fn bad_flags_and_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let c = cfg.to_str().unwrap();
    let o = tmp.path().join("o");
    let o = o.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["train", "--config", c, "-o", o, "--batch-size", "0"],
            "--batch-size",
        ),
        (vec!["train", "--config", c, "-o", o, "--lr=-1"], "--lr"),
        (
            vec!["train", "--config", c, "-o", o, "--epochs", "0"],
            "--epochs",
        ),
        (
            vec!["train", "--config", c, "-o", o, "--accumulate", "0"],
            "--accumulate",
        ),
        (
            vec!["train", "--config", "/nonexistent/x.toml", "-o", o],
            "/nonexistent/x.toml",
        ),
        (
            vec!["eval", "--config", c, "-w", "/nonexistent/w.safetensors"],
            "/nonexistent/w.safetensors",
        ),
        (
            vec!["train", "--config", c, "-o", o, "--device", "tpu"],
            "unknown device",
        ),
    ] {
        let (success, _, err) = brelu(&args);
        assert!(!success, "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// With stderr going to a file (not a terminal), training and extraction write progress lines
/// (done/total, rate, ETA) every `BRELU_PROGRESS_INTERVAL` seconds: 0 here, so every update.
#[test]
fn progress_lines_with_an_eta_when_stderr_is_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::tiny_dataset(tmp.path());
    let c = cfg.to_str().unwrap();
    let log_of = |args: &[&str], name: &str| {
        let log = tmp.path().join(name);
        let status = std::process::Command::new(common::brelu_exe())
            .args(args)
            .env(brelu::progress::INTERVAL_VAR, "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .status()
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "{text}");
        text
    };
    let run = tmp.path().join("run");
    let log = log_of(
        &[
            "train",
            "-c",
            c,
            "-o",
            run.to_str().unwrap(),
            "--epochs",
            "2",
        ],
        "train.log",
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("epoch 2/2: ") && l.contains("batches (") && l.contains("ETA"))
        .unwrap_or_else(|| panic!("no progress line for epoch 2:\n{log}"));
    assert!(line.contains("/5 batches"), "{line}");
    let out = tmp.path().join("dist");
    let log = log_of(
        &[
            "distortion",
            "extract",
            "--data",
            c,
            "--random-init",
            "--samples",
            "8",
            "--batch",
            "2",
            "--sites",
            "stem",
            "-o",
            out.to_str().unwrap(),
        ],
        "extract.log",
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("extraction: ") && l.contains("units") && l.contains("ETA")),
        "no extraction progress line:\n{log}"
    );
}
