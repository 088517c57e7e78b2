//! Model runtime: block-ReLU semantics against a plain loop, running from a site, batch-norm
//! folding, and weight files (our own and a hand-made torchvision-named one).
use crate::common;
use brelu::models::{find, ArchConfig, Model};
use brelu::ops;
use brelu::spec::{PatchOption, Spec};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Block ReLU of docs/method.md 2 as a plain loop over patches: the independent oracle.
fn naive_block_relu(
    x: &[f32],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    opts: &[PatchOption],
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            let base = (b * c + ch) * h * w;
            match opts[ch] {
                PatchOption::Identity => {
                    y[base..base + h * w].copy_from_slice(&x[base..base + h * w])
                }
                PatchOption::Zero => {}
                PatchOption::Patch { bh, bw } => {
                    let (bh, bw) = (bh as usize, bw as usize);
                    for py in (0..h).step_by(bh) {
                        for px in (0..w).step_by(bw) {
                            let mut s = 0f64;
                            for i in py..(py + bh).min(h) {
                                for j in px..(px + bw).min(w) {
                                    s += x[base + i * w + j] as f64;
                                }
                            }
                            for i in py..(py + bh).min(h) {
                                for j in px..(px + bw).min(w) {
                                    if s > 0.0 {
                                        y[base + i * w + j] = x[base + i * w + j];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

/// Deterministic small-integer inputs (exact sums, many exact-zero ties).
fn int_input(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * c * h * w)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 7) as f32 - 3.0
        })
        .collect()
}

#[test]
fn block_relu_ragged_edges_identity_zero() {
    let _rng = common::torch_rng();
    let cases: &[(usize, usize, &[PatchOption])] = &[
        (
            7,
            5,
            &[
                PatchOption::patch(2, 2),
                PatchOption::patch(3, 2),
                PatchOption::patch(7, 5),
            ],
        ),
        (
            5,
            9,
            &[
                PatchOption::patch(4, 4),
                PatchOption::Identity,
                PatchOption::Zero,
                PatchOption::RELU,
            ],
        ),
        (1, 1, &[PatchOption::patch(1, 1), PatchOption::Identity]),
        (
            6,
            6,
            &[
                PatchOption::patch(4, 5),
                PatchOption::patch(6, 1),
                PatchOption::patch(1, 6),
            ],
        ),
        (3, 3, &[PatchOption::Zero, PatchOption::Zero]),
        (3, 4, &[PatchOption::Identity; 3]),
    ];
    for (k, &(h, w, opts)) in cases.iter().enumerate() {
        let (n, c) = (3, opts.len());
        let x = int_input(n, c, h, w, k as u64);
        let expect = naive_block_relu(&x, n, c, h, w, opts);
        let t = Tensor::from_slice(&x).view([n as i64, c as i64, h as i64, w as i64]);
        let got = Vec::<f32>::try_from(ops::block_relu(&t, opts).flatten(0, -1)).unwrap();
        assert_eq!(got, expect, "case {k}: {h}x{w} {opts:?}");
    }
}

#[test]
fn block_relu_gradient_is_the_mask() {
    let _rng = common::torch_rng();
    let opts = [
        PatchOption::patch(2, 2),
        PatchOption::Identity,
        PatchOption::Zero,
    ];
    let x = Tensor::from_slice(&int_input(2, 3, 5, 5, 9))
        .view([2, 3, 5, 5])
        .set_requires_grad(true);
    let y = ops::block_relu(&x, &opts);
    let g = Tensor::randn([2, 3, 5, 5], tch::kind::FLOAT_CPU);
    (&y * &g).sum(Kind::Float).backward();
    let mask = ops::reference::block_relu_mask(&x, &opts);
    assert!(x.grad().equal(&(&g * mask)));
}

fn small_model(name: &str) -> Model {
    let arch = find(name).unwrap();
    let input = if arch.default_input()[1] > 64 {
        [3, 40, 40]
    } else {
        arch.default_input()
    };
    Model::new(
        arch,
        ArchConfig {
            input,
            num_classes: 10,
        },
        Device::Cpu,
    )
    .unwrap()
}

fn randomize_bn(model: &Model) {
    let _g = tch::no_grad_guard();
    for (name, mut t) in model.named_tensors() {
        if name.ends_with("running_var") {
            t.copy_(&(Tensor::rand_like(&t) + 0.5));
        } else if name.ends_with("running_mean") || (name.contains("bn") && name.ends_with("bias"))
        {
            t.copy_(&(Tensor::randn_like(&t) * 0.1));
        }
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-12)
}

#[test]
fn forward_from_site_equals_full_forward() {
    let _rng = common::torch_rng();
    tch::manual_seed(1);
    let mut model = small_model("resnet18-cifar");
    randomize_bn(&model);
    let x = Tensor::randn([2, 3, 32, 32], tch::kind::FLOAT_CPU);
    let _g = tch::no_grad_guard();
    let full = model.forward_t(&x, false);
    for site in [0, 1, 4, 9, 16] {
        let st = model.prefix(&x, site);
        let y = model.forward_from(&st, &st.pre.relu());
        assert!(y.equal(&full), "site {site}");
    }
    // Perturbing one channel of one site, two copies stacked on the batch axis.
    let site = 5;
    let info = model.sites()[site].clone();
    let st = model.prefix(&x, site);
    let mut opts = vec![PatchOption::RELU; info.channels];
    opts[3] = PatchOption::patch(2, 2);
    let stacked = ops::simulate(
        &st.pre,
        &[(3, PatchOption::patch(2, 2)), (7, PatchOption::Identity)],
    );
    let both = model.forward_from(&st, &stacked);
    model.set_site_options(site, Some(opts)).unwrap();
    let direct = model.forward_t(&x, false);
    assert!(rel_err(&both.narrow(0, 0, 2), &direct) < 1e-6);
    let mut opts = vec![PatchOption::RELU; info.channels];
    opts[7] = PatchOption::Identity;
    model.set_site_options(site, Some(opts)).unwrap();
    assert!(rel_err(&both.narrow(0, 2, 2), &model.forward_t(&x, false)) < 1e-6);
}

#[test]
fn bn_folding_matches_eval_mode() {
    let _rng = common::torch_rng();
    tch::manual_seed(2);
    for name in ["resnet18-cifar-light", "resnet50-avgpool", "mobilenetv2"] {
        let mut model = small_model(name);
        randomize_bn(&model);
        // A block-ReLU spec too, so folding keeps the sites' options.
        let spec = Spec::uniform(
            name,
            model.config().input,
            model.sites(),
            PatchOption::patch(2, 2),
        );
        // Folding keeps each site's options.
        model.apply_spec(&spec).unwrap();
        let with_spec = model.fold_bn().unwrap();
        for i in 0..model.sites().len() {
            assert_eq!(with_spec.site_options(i), model.site_options(i));
        }
        // The numeric comparison uses ordinary ReLUs: folding changes rounding, and a block
        // whose sum is within rounding of zero may legitimately flip its mask.
        model.clear_spec();
        let folded = model.fold_bn().unwrap();
        assert!(!folded
            .graph()
            .ops
            .iter()
            .any(|o| matches!(o, brelu::models::Op::BatchNorm { .. })));
        let x = Tensor::randn(
            [
                2,
                3,
                model.config().input[1] as i64,
                model.config().input[2] as i64,
            ],
            tch::kind::FLOAT_CPU,
        );
        let _g = tch::no_grad_guard();
        let a = model.forward_t(&x, false);
        let b = folded.forward_t(&x, false);
        let e = rel_err(&b, &a);
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
}

#[test]
fn weights_round_trip_and_errors() {
    let _rng = common::torch_rng();
    tch::manual_seed(3);
    let dir = tempfile::tempdir().unwrap();
    let model = small_model("resnet18-cifar");
    randomize_bn(&model);
    let p = dir.path().join("w.safetensors");
    model.save_weights(&p).unwrap();
    let mut other = small_model("resnet18-cifar");
    other.load_weights(&p).unwrap();
    let x = Tensor::randn([1, 3, 32, 32], tch::kind::FLOAT_CPU);
    let _g = tch::no_grad_guard();
    assert!(model
        .forward_t(&x, false)
        .equal(&other.forward_t(&x, false)));

    // Wrong architecture: a tensor the model does not have / a wrong shape.
    let mut r50 = small_model("resnet50");
    let e = r50.load_weights(&p).unwrap_err().to_string();
    assert!(e.contains("w.safetensors") && e.contains("tensor"), "{e}");
    let mut light = small_model("resnet18-cifar-light");
    let e = light.load_weights(&p).unwrap_err().to_string();
    assert!(e.contains("expects [32"), "{e}");
    let e = other
        .load_weights(&dir.path().join("nope.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
}

/// Writes a safetensors file by hand (header JSON + little-endian data), independent of tch.
fn write_safetensors(
    path: &std::path::Path,
    tensors: &BTreeMap<String, (Vec<i64>, Vec<u8>, &str)>,
) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, bytes, dtype)) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// torchvision's resnet18 state-dict names (BasicBlock, layers [2,2,2,2]), with the CIFAR
/// 3x3 stem shape, as `torch.save`-style tensors including `num_batches_tracked`.
fn torchvision_resnet18_cifar(classes: i64) -> BTreeMap<String, (Vec<i64>, Vec<u8>, &'static str)> {
    let mut t = BTreeMap::new();
    let mut k = 0f32;
    let mut f32s = |shape: Vec<i64>| {
        let n: i64 = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| {
                k += 1.0;
                (((i as f32 + k) % 13.0) / 64.0 + 0.25).to_le_bytes()
            })
            .collect();
        (shape, bytes, "F32")
    };
    let bn = |t: &mut BTreeMap<_, _>,
              f: &mut dyn FnMut(Vec<i64>) -> (Vec<i64>, Vec<u8>, &'static str),
              p: &str,
              c: i64| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            t.insert(format!("{p}.{s}"), f(vec![c]));
        }
        t.insert(
            format!("{p}.num_batches_tracked"),
            (vec![], 7i64.to_le_bytes().to_vec(), "I64"),
        );
    };
    t.insert("conv1.weight".into(), f32s(vec![64, 3, 3, 3]));
    bn(&mut t, &mut f32s, "bn1", 64);
    let mut cin = 64;
    for (i, w) in [64i64, 128, 256, 512].into_iter().enumerate() {
        for b in 0..2 {
            let p = format!("layer{}.{b}", i + 1);
            t.insert(
                format!("{p}.conv1.weight"),
                f32s(vec![w, if b == 0 { cin } else { w }, 3, 3]),
            );
            bn(&mut t, &mut f32s, &format!("{p}.bn1"), w);
            t.insert(format!("{p}.conv2.weight"), f32s(vec![w, w, 3, 3]));
            bn(&mut t, &mut f32s, &format!("{p}.bn2"), w);
            if b == 0 && i > 0 {
                t.insert(format!("{p}.downsample.0.weight"), f32s(vec![w, cin, 1, 1]));
                bn(&mut t, &mut f32s, &format!("{p}.downsample.1"), w);
            }
        }
        cin = w;
    }
    t.insert("fc.weight".into(), f32s(vec![classes, 512]));
    t.insert("fc.bias".into(), f32s(vec![classes]));
    t
}

#[test]
fn loads_hand_made_torchvision_file() {
    let _rng = common::torch_rng();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tv.safetensors");
    let tensors = torchvision_resnet18_cifar(10);
    write_safetensors(&p, &tensors);
    let mut model = small_model("resnet18-cifar");
    model.load_weights(&p).unwrap();
    let got = model.named_tensors();
    for (name, (shape, bytes, dtype)) in &tensors {
        if *dtype != "F32" {
            continue;
        }
        let want: Vec<f32> = bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let t = &got[name];
        assert_eq!(t.size(), *shape, "{name}");
        assert_eq!(
            Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap(),
            want,
            "{name}"
        );
    }

    // Missing tensor: an error naming it, never a silent random init.
    let mut partial = tensors.clone();
    partial.remove("layer3.1.bn2.running_var");
    write_safetensors(&p, &partial);
    let e = model.load_weights(&p).unwrap_err().to_string();
    assert!(
        e.contains("layer3.1.bn2.running_var") && e.contains("missing"),
        "{e}"
    );

    // Wrongly shaped tensor.
    let mut bad = tensors.clone();
    bad.insert("fc.bias".into(), (vec![11], vec![0u8; 44], "F32"));
    write_safetensors(&p, &bad);
    let e = model.load_weights(&p).unwrap_err().to_string();
    assert!(e.contains("fc.bias") && e.contains("[11]"), "{e}");

    // mmcls names (backbone./head.) map to the same tensors.
    let mm: BTreeMap<_, _> = tensors
        .iter()
        .map(|(k, v)| {
            let k = if k.starts_with("fc.") {
                format!("head.{k}")
            } else {
                format!("backbone.{k}")
            };
            (k, v.clone())
        })
        .collect();
    write_safetensors(&p, &mm);
    let mut m2 = small_model("resnet18-cifar");
    m2.load_weights(&p).unwrap();
    assert!(m2.named_tensors()["layer2.0.downsample.0.weight"]
        .equal(&got["layer2.0.downsample.0.weight"]));
}

#[test]
fn mobilenet_mmcls_names_map_to_torchvision() {
    let _rng = common::torch_rng();
    use brelu::models::mobilenet_v2::mmcls_to_torchvision as m;
    assert_eq!(
        m("backbone.conv1.conv.weight").as_deref(),
        Some("features.0.0.weight")
    );
    assert_eq!(
        m("backbone.layer1.0.conv.0.bn.bias").as_deref(),
        Some("features.1.conv.0.1.bias")
    );
    assert_eq!(
        m("backbone.layer1.0.conv.1.conv.weight").as_deref(),
        Some("features.1.conv.1.weight")
    );
    assert_eq!(
        m("backbone.layer2.1.conv.1.conv.weight").as_deref(),
        Some("features.3.conv.1.0.weight")
    );
    assert_eq!(
        m("backbone.layer2.1.conv.2.bn.running_mean").as_deref(),
        Some("features.3.conv.3.running_mean")
    );
    assert_eq!(
        m("backbone.conv2.bn.weight").as_deref(),
        Some("features.18.1.weight")
    );
    assert_eq!(m("head.fc.weight").as_deref(), Some("classifier.1.weight"));
    assert_eq!(m("backbone.layer2.5.conv.0.conv.weight"), None);
    // Every mapped name is a real parameter of the model.
    let model = small_model("mobilenetv2");
    let names = model.named_tensors();
    for n in [
        "features.3.conv.1.0.weight",
        "features.3.conv.3.running_mean",
        "features.18.1.weight",
        "features.1.conv.2.bias",
    ] {
        assert!(names.contains_key(n), "{n}");
    }
}
