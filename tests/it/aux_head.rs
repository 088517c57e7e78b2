//! The segmentation models' auxiliary FCN head (mmseg `auxiliary_head`, loss weight 0.4 in
//! the published configs): it reads the published stage, trains beside the decode head when
//! `aux_loss_weight` is set, travels with the weights, and is never a site nor part of the
//! network that evaluation, batch-norm folding and secure inference run.
use crate::common;
use crate::seg_pipeline::voc_tree;
use brelu::data::Split;
use brelu::models::{build_graph, find, ArchConfig, Model};
use brelu::train::{self, Config, TrainOptions};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn config_text(data: &Path, extra: &str, momentum: f64, iterations: usize) -> String {
    format!(
        "model = \"deeplabv3-mobilenetv2\"\nnum_classes = 21\ninput = [3, 32, 32]\n\
         iterations = {iterations}\ncheckpoint_every = 1\nbatch_size = 2\nseed = 3\n{extra}\n\
         [dataset]\nkind = \"voc\"\npath = \"{}\"\ntest_scale = [36, 32]\n\
         [optimizer]\nlr = 0.05\nmomentum = {momentum}\nweight_decay = 0\n\
         [schedule]\nkind = \"constant\"\n",
        data.display()
    )
}

fn config(data: &Path, extra: &str, momentum: f64, iterations: usize) -> Config {
    let text = config_text(data, extra, momentum, iterations);
    Config::from_toml_str(&text, Path::new("aux.toml")).unwrap()
}

/// The test network, initialised from `seed`.
fn mobilenet(seed: i64) -> Model {
    tch::manual_seed(seed);
    let cfg = ArchConfig {
        input: [3, 32, 32],
        num_classes: 21,
    };
    Model::new(find("deeplabv3-mobilenetv2").unwrap(), cfg, Device::Cpu).unwrap()
}

/// Trains `c` from its seeded initialisation; returns the initial and the final tensors of
/// the checkpoint file by name.
fn run(
    c: &Config,
    dir: &Path,
    resume: bool,
) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let (tr, te) = (
        train::load_split(c, Split::Train).unwrap(),
        train::load_split(c, Split::Test).unwrap(),
    );
    let mut m = train::build_model(c, Device::Cpu).unwrap();
    let mut init: BTreeMap<String, Tensor> = m
        .named_tensors()
        .into_iter()
        .chain(m.aux_variables())
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let opts = TrainOptions {
        resume,
        ..TrainOptions::new(dir)
    };
    train::train_on(c, &mut m, &opts, &tr, &te).unwrap();
    let file = Tensor::read_safetensors(dir.join(train::CHECKPOINT_WEIGHTS)).unwrap();
    init.retain(|n, _| !n.ends_with("running_mean") && !n.ends_with("running_var"));
    (init, file.into_iter().collect())
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn aux_head_reads_the_published_stage_and_holds_no_site() {
    for (name, in_channels) in [
        ("deeplabv3-mobilenetv2", 96),
        ("deeplabv3-resnet50-d8", 1024),
    ] {
        let cfg = ArchConfig {
            input: [3, 32, 32],
            num_classes: 21,
        };
        let g = build_graph(find(name).unwrap(), &cfg).unwrap();
        let aux = g.aux.expect("an auxiliary head");
        // mmseg: in_channels 96 (MobileNetV2 out_indices (1, 2, 4, 6), in_index 2) and 1024
        // (ResNet stage 3), channels 256, dropout 0.1.
        assert_eq!(
            (aux.in_channels, aux.channels, aux.dropout),
            (in_channels, 256, 0.1),
            "{name}"
        );
        let shapes = g.infer_shapes(cfg.input).unwrap();
        assert_eq!(
            shapes[aux.input],
            vec![in_channels, 4, 4],
            "{name}: output stride 8"
        );
        // No site or op is the head's.
        assert!(g.sites.iter().all(|s| !s.contains("aux")), "{name}");
        assert!(
            g.ops
                .iter()
                .all(|op| !format!("{op:?}").contains("auxiliary")),
            "{name}"
        );
    }
}

/// One SGD step without momentum or weight decay moves each weight by -lr * gradient. With
/// the auxiliary loss weighted w, weights after the head's input move by the decode loss
/// alone (the same step for every w) and weights before it by the decode gradient plus w
/// times the auxiliary one (so linearly in w); the head itself moves only when it trains.
#[test]
fn aux_loss_adds_its_weighted_gradient_before_its_input_only() {
    let _s = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    voc_tree(&tmp.path().join("voc"), 4, 2);
    let data = tmp.path().join("voc");
    let mut steps = Vec::new();
    for (i, extra) in ["", "aux_loss_weight = 0.4", "aux_loss_weight = 0.8"]
        .into_iter()
        .enumerate()
    {
        let (init, last) = run(
            &config(&data, extra, 0.0, 1),
            &tmp.path().join(format!("r{i}")),
            false,
        );
        let delta: BTreeMap<String, Tensor> = init
            .iter()
            .filter_map(|(n, t0)| last.get(n).map(|t1| (n.clone(), t1 - t0)))
            .collect();
        let aux_saved = last
            .keys()
            .filter(|n| n.starts_with("auxiliary_head."))
            .count();
        // conv weight, BN (4) and classifier (2): saved only when trained.
        assert_eq!(aux_saved, if extra.is_empty() { 0 } else { 7 }, "{extra:?}");
        steps.push(delta);
    }
    for n in [
        "auxiliary_head.convs.0.conv.weight",
        "auxiliary_head.conv_seg.weight",
    ] {
        assert!(max_abs(&steps[1][n]) > 0.0, "{n} trains");
        assert!(!steps[0].contains_key(n));
    }
    // After the input (stage 5): the decode head and the last backbone stage.
    for n in [
        "decode_head.conv_seg.weight",
        "decode_head.bottleneck.conv.weight",
        "features.17.conv.0.0.weight",
    ] {
        let (a, b, c) = (&steps[0][n], &steps[1][n], &steps[2][n]);
        let scale = max_abs(a);
        assert!(scale > 0.0, "{n} trains");
        assert!(
            max_abs(&(b - a)) <= 1e-5 * scale,
            "{n}: {}",
            max_abs(&(b - a)) / scale
        );
        assert!(max_abs(&(c - a)) <= 1e-5 * scale, "{n}");
    }
    // Before it: the stem and stage 2.
    for n in ["features.0.0.weight", "features.4.conv.0.0.weight"] {
        let (a, b, c) = (&steps[0][n], &steps[1][n], &steps[2][n]);
        let aux_part = b - a;
        let size = max_abs(&aux_part);
        assert!(
            size > 1e-3 * max_abs(a),
            "{n}: the auxiliary loss reaches it"
        );
        // Float error of the whole step (the decode loss's part dominates it) on top.
        let nonlinear = max_abs(&((c - b) - &aux_part));
        let tol = 1e-3 * size + 2e-5 * max_abs(a);
        assert!(nonlinear <= tol, "{n}: {nonlinear} of {size}");
    }
}

/// The head's weights (and momentum) resume with the run; the trained network evaluates,
/// folds and loads as without the head, and its weights file round-trips the head.
#[test]
fn aux_head_resumes_round_trips_and_stays_out_of_inference() {
    let _s = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    voc_tree(&tmp.path().join("voc"), 4, 2);
    let data = tmp.path().join("voc");
    let extra = "aux_loss_weight = 0.4";
    let (_, straight) = run(&config(&data, extra, 0.9, 2), &tmp.path().join("a"), false);
    let dir = tmp.path().join("b");
    run(&config(&data, extra, 0.9, 1), &dir, false);
    let (_, resumed) = run(&config(&data, extra, 0.9, 2), &dir, true);
    assert_eq!(straight.len(), resumed.len());
    for (n, t) in &straight {
        let gap = max_abs(&(t - &resumed[n]));
        assert!(
            gap <= 1e-6 * max_abs(t).max(1e-6),
            "{n}: resumed differs by {gap}"
        );
    }

    let weights = dir.join(train::CHECKPOINT_WEIGHTS);
    let load = || {
        let mut m = mobilenet(99);
        m.load_weights(&weights).unwrap();
        m
    };
    let m = load();
    assert!(m.aux_head_used());
    for (n, t) in m.aux_variables() {
        assert!(t.equal(&resumed[&n]), "{n} loads from the file");
    }
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (out, aux) = m.forward_with_aux(&x, false);
    assert!(
        out.equal(&m.forward_t(&x, false)),
        "the head leaves the output alone"
    );
    let aux = aux.expect("auxiliary logits");
    assert_eq!(aux.size(), vec![2, 21, 4, 4]);
    assert!(aux.equal(&load().forward_with_aux(&x, false).1.unwrap()));
    let folded = m.fold_bn().unwrap();
    assert!(!folded.has_aux_head());
    let gap = max_abs(&(folded.forward_t(&x, false) - &out));
    assert!(
        gap <= 1e-4 * max_abs(&out),
        "folded: {gap} of {}",
        max_abs(&out)
    );
    // Saved again, the file holds the head; a file holding only part of it is refused.
    let again = tmp.path().join("again.safetensors");
    m.save_weights(&again).unwrap();
    let mut part: Vec<(String, Tensor)> = Tensor::read_safetensors(&again)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "auxiliary_head.conv_seg.bias")
        .collect();
    assert_eq!(
        part.iter()
            .filter(|(n, _)| n.starts_with("auxiliary_head."))
            .count(),
        6
    );
    part.sort_by(|a, b| a.0.cmp(&b.0));
    let partial = tmp.path().join("partial.safetensors");
    Tensor::write_safetensors(&part, &partial).unwrap();
    let mut fresh = load();
    let e = fresh.load_weights(&partial).unwrap_err().to_string();
    assert!(e.contains("auxiliary_head.conv_seg.bias"), "{e}");
    // Without any of it, the network loads and the head stays unused.
    let plain: Vec<(String, Tensor)> = part
        .into_iter()
        .filter(|(n, _)| !n.starts_with("auxiliary_head."))
        .collect();
    Tensor::write_safetensors(&plain, &partial).unwrap();
    let mut m2 = mobilenet(98);
    m2.load_weights(&partial).unwrap();
    assert!(!m2.aux_head_used());
    assert!(m2.forward_t(&x, false).equal(&out));
}

#[test]
fn aux_loss_weight_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("voc");
    for (extra, want) in [
        ("aux_loss_weight = -0.4", "must be a number > 0"),
        ("aux_loss_weight = 0", "must be a number > 0"),
    ] {
        let text = config_text(&data, extra, 0.0, 1);
        let e = Config::from_toml_str(&text, Path::new("aux.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("aux_loss_weight") && e.contains(want), "{e}");
    }
    let text = "model = \"resnet18-cifar\"\nnum_classes = 10\ninput = [3, 32, 32]\nepochs = 1\n\
                batch_size = 2\naux_loss_weight = 0.4\n[dataset]\nkind = \"cifar10\"\n\
                path = \"x\"\n[optimizer]\nlr = 0.05\n[schedule]\nkind = \"constant\"\n";
    let e = Config::from_toml_str(text, Path::new("aux.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("aux_loss_weight") && e.contains("segmentation"),
        "{e}"
    );
}
