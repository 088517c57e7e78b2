//! Train and eval step throughput (images/s) of the Fashion-MNIST default network
//! (resnet18-cifar-light, batch 128, 1x28x28, 10 classes), ResNet18-CIFAR (batch 64, 32x32,
//! 100 classes) and ResNet50 (batch 16, 224x224, 1000 classes) on random data: brelu's graph
//! runtime with plain ReLUs and with a block-ReLU spec (2x2 everywhere), the same step as
//! `brelu train` (forward, cross-entropy, backward, brelu's SGD with momentum 0.9 and weight
//! decay) and `brelu eval` (evaluation mode, no autograd).
//!
//! Each figure is the median of `BRELU_BENCH_STEPS` (default 5) steps after one warm-up step.
//! `scripts/bench-train.sh` runs this and the PyTorch eager reference
//! (`scripts/bench_train_pytorch.py`, the same networks and steps) in one go, so their ratio
//! comes from the same machine state. Output: one JSON line per measurement.
//! Run: `cargo bench --bench train_step [-- resnet18-cifar]`.
use brelu::models::{find, ArchConfig, Model};
use brelu::spec::{PatchOption, Spec};
use brelu::train::sgd::Sgd;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const MODELS: [(&str, usize, [usize; 3], i64); 3] = [
    // (name, classes, input, batch); the same list as scripts/bench_train_pytorch.py
    ("resnet18-cifar-light", 10, [1, 28, 28], 128),
    ("resnet18-cifar", 100, [3, 32, 32], 64),
    ("resnet50", 1000, [3, 224, 224], 16),
];

fn median_secs(steps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..steps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn report(model: &str, variant: &str, step: &str, batch: i64, secs: f64) {
    println!(
        "{}",
        serde_json::json!({
            "impl": "brelu",
            "model": model,
            "variant": variant,
            "step": step,
            "batch": batch,
            "median_s": secs,
            "images_per_s": batch as f64 / secs,
            "threads": tch::get_num_threads(),
        })
    );
}

fn main() {
    // Allocate as the `brelu` binary does.
    brelu::ops::prefer_huge_pages();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let steps: usize = std::env::var("BRELU_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    for (name, classes, input, batch) in MODELS {
        if !filter.is_empty() && !filter.iter().any(|f| f == name) {
            continue;
        }
        tch::manual_seed(0);
        let cfg = ArchConfig {
            input,
            num_classes: classes,
        };
        let mut model =
            Model::new(find(name).expect("zoo model"), cfg, Device::Cpu).expect("model builds");
        let shape = [batch, input[0] as i64, input[1] as i64, input[2] as i64];
        let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let y = Tensor::randint(classes as i64, [batch], (Kind::Int64, Device::Cpu));
        let spec2x2 = Spec::uniform(name, cfg.input, model.sites(), PatchOption::patch(2, 2));
        for (variant, spec) in [("relu", None), ("brelu-2x2", Some(&spec2x2))] {
            match spec {
                Some(s) => model.apply_spec(s).expect("spec matches the model"),
                None => model.clear_spec(),
            }
            let mut opt = Sgd::new(model.var_store(), 0.01, 0.9, 1e-4);
            let train = median_secs(steps, || {
                let loss = model.forward_t(&x, true).cross_entropy_for_logits(&y);
                opt.backward_step(&loss).unwrap();
            });
            report(name, variant, "train", batch, train);
            let eval = median_secs(steps, || {
                let _g = tch::no_grad_guard();
                let _ = model.forward_t(&x, false);
            });
            report(name, variant, "eval", batch, eval);
        }
    }
}
