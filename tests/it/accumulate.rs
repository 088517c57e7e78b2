//! Gradient accumulation (`accumulate = N`): a step of `batch_size` images taken as N
//! micro-batches of `batch_size / N` trains like one batch of `batch_size` images. The model is the BN-free ResNet18 fixture (its batch norms
//! folded by the exporter, as in `dist.rs`), so no batch statistics differ; only the order of
//! float sums does, hence 1e-5 relative.
use crate::common;
use brelu::data::Split;
use brelu::train::{self, Config, TrainOptions};
use std::path::Path;
use tch::{Kind, Tensor};

fn config(dir: &Path, run: &str, batch: usize, accumulate: usize) -> Config {
    let text = config_text(dir, run, batch, accumulate);
    Config::from_toml_str(&text, Path::new("acc.toml")).unwrap()
}

fn config_text(dir: &Path, run: &str, batch: usize, accumulate: usize) -> String {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/resnet18-w16.onnx");
    format!(
        "model = \"onnx:{}\"\nnum_classes = 10\ninput = [3, 32, 32]\n{run}\nbatch_size = {batch}\n\
         accumulate = {accumulate}\nseed = 5\ntest_limit = 4\n[dataset]\nkind = \"cifar10\"\n\
         path = \"{}\"\naugment = {{ pad = 0, flip = false }}\n[optimizer]\nlr = 0.02\n\
         momentum = 0.9\nweight_decay = 1e-4\n[schedule]\nkind = \"cosine\"\nwarmup_epochs = 0\n",
        model.display(),
        dir.display()
    )
}

/// Trains `c` in `out`; returns the final weights sorted by name.
fn run(c: &Config, out: &Path) -> Vec<(String, Tensor)> {
    let opts = TrainOptions::new(out);
    let (tr, te) = (
        train::load_split(c, Split::Train).unwrap(),
        train::load_split(c, Split::Test).unwrap(),
    );
    let mut m = train::build_model(c, tch::Device::Cpu).unwrap();
    train::train_on(c, &mut m, &opts, &tr, &te).unwrap();
    let mut v = Tensor::read_safetensors(out.join(train::CHECKPOINT_WEIGHTS)).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest |a - b| over all tensors relative to the largest |a|.
fn gap(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut gap, mut scale) = (0f64, 0f64);
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let ta = ta.to_kind(Kind::Double);
        let d = (&ta - tb.to_kind(Kind::Double)).abs().max();
        gap = gap.max(d.double_value(&[]));
        scale = scale.max(ta.abs().max().double_value(&[]));
    }
    gap / scale
}

#[test]
fn accumulated_micro_batches_train_like_one_big_batch() {
    let _serial = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    common::tiny_cifar10(tmp.path());
    let dir = |s: &str| tmp.path().join(s);

    // Epochs: 38 images, 3 x 4 against 12, per-iteration cosine. The epoch's last step has
    // one micro-batch of 2 images, as the big batch's last has 2 images.
    let epochs = "epochs = 2\ntrain_limit = 38";
    let mut big = config(tmp.path(), epochs, 12, 1);
    let mut acc = config(tmp.path(), epochs, 12, 3);
    big.schedule.per_iteration = true;
    acc.schedule.per_iteration = true;
    let (wb, wa) = (run(&big, &dir("big")), run(&acc, &dir("acc")));
    let g = gap(&wb, &wa);
    assert!(g <= 1e-5, "epochs: weights differ by {g} of their scale");
    // Without accumulation the 4-image batches take other steps.
    let small = run(&config(tmp.path(), epochs, 4, 1), &dir("small"));
    assert!(gap(&wb, &small) > 1e-3);

    // Iterations: 3 steps of 2 x 4 against 3 of 8.
    let its = "iterations = 3\ncheckpoint_every = 3";
    let (wb, wa) = (
        run(&config(tmp.path(), its, 8, 1), &dir("ib")),
        run(&config(tmp.path(), its, 8, 2), &dir("ia")),
    );
    let g = gap(&wb, &wa);
    assert!(
        g <= 1e-5,
        "iterations: weights differ by {g} of their scale"
    );
}

#[test]
fn accumulate_must_be_positive() {
    let tmp = tempfile::tempdir().unwrap();
    let c = config(tmp.path(), "epochs = 1", 4, 2);
    assert_eq!(c.accumulate, 2);
    // batch_size is the step's images: it must split into the micro-batches.
    let text = config_text(tmp.path(), "epochs = 1", 6, 4);
    let e = Config::from_toml_str(&text, Path::new("acc.toml")).unwrap_err();
    assert!(e.to_string().contains("batch_size"), "{e}");
    let text = config_text(tmp.path(), "epochs = 1", 4, 0);
    let e = Config::from_toml_str(&text, Path::new("acc.toml")).unwrap_err();
    assert!(e.to_string().contains("accumulate"), "{e}");
    // The default (1) leaves the configuration hash as before the key existed.
    let one = config(tmp.path(), "epochs = 1", 4, 1);
    assert!(!serde_json::to_string(&one).unwrap().contains("accumulate"));
}
