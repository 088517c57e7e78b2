//! DeepLabV3 segmentation models: site lists and ReLU counts at 512x512 (by hand from the
//! architecture), output shapes, the new graph ops (resize, concat, keep-dim pooling, dropout)
//! against independent references, batch-norm folding, running from a site, mmseg-named
//! weights, distortion extraction on 4-D logits and secure inference.
use crate::common;
use brelu::distortion::extract::{init_dir, plan, run};
use brelu::distortion::{collect, Estimator, PlanOptions, Samples, Shard};
use brelu::models::{find, sites, ArchConfig, Architecture, GraphBuilder, Model, Op, Slot};
use brelu::secure::engine::with_parties;
use brelu::secure::link::LinkConfig;
use brelu::secure::plan::{Interp, Plan, Settings};
use brelu::secure::proto;
use brelu::secure::report::run_compare;
use brelu::secure::ring::Fixed;
use brelu::secure::Role;
use brelu::spec::{Catalog, PatchOption};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const MNV2: &str = "deeplabv3-mobilenetv2";
const R50: &str = "deeplabv3-resnet50-d8";

fn totals(model: &str, input: [usize; 3]) -> (usize, usize, usize) {
    let s = sites(find(model).unwrap(), input).unwrap();
    (
        s.len(),
        s.iter().map(|x| x.channels).sum(),
        s.iter().map(|x| x.relus()).sum(),
    )
}

/// Pixels of a square map of side s.
fn px(s: usize) -> usize {
    s * s
}

#[test]
fn mobilenetv2_d8_sites_at_512() {
    let s = sites(find(MNV2).unwrap(), [3, 512, 512]).unwrap();
    let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
    // conv1, stage 1 (one site), 16 expanded blocks with two sites each, six head sites.
    assert_eq!(s.len(), 1 + 1 + 2 * 16 + 6);
    assert_eq!(
        &names[..5],
        [
            "conv1",
            "layer1_0_0",
            "layer2_0_0",
            "layer2_0_1",
            "layer2_1_0"
        ]
    );
    assert_eq!(names[33], "layer7_0_1");
    assert_eq!(
        &names[34..],
        ["decode_0", "decode_1", "decode_2", "decode_3", "decode_4", "decode_5"]
    );
    // Shapes: stem /2 (256), stage 2 /4 (128), stage 3 on /8 (64) and no stride after that.
    let by = |n: &str| s.iter().find(|x| x.name == n).unwrap();
    let shape = |n: &str| (by(n).channels, by(n).height, by(n).width);
    assert_eq!(shape("conv1"), (32, 256, 256));
    assert_eq!(shape("layer1_0_0"), (32, 256, 256));
    assert_eq!(shape("layer2_0_0"), (96, 256, 256));
    assert_eq!(shape("layer2_0_1"), (96, 128, 128));
    assert_eq!(shape("layer3_0_1"), (144, 64, 64));
    assert_eq!(shape("layer7_0_1"), (960, 64, 64));
    assert_eq!(shape("decode_0"), (512, 1, 1));
    assert_eq!(shape("decode_5"), (512, 64, 64));

    // ReLUs by hand: hidden = 6 x block input channels; two sites per expanded block, the
    // expansion at the block's input size and the depthwise at its output size.
    let stem = 32 * px(256);
    let stage1 = 32 * px(256);
    let stage2 = 96 * px(256) + 96 * px(128) + 2 * 144 * px(128);
    let stage3 = 144 * px(128) + 144 * px(64) + 2 * (2 * 192 * px(64));
    let stage4 = 2 * 192 * px(64) + 3 * (2 * 384 * px(64));
    let stage5 = 2 * 384 * px(64) + 2 * (2 * 576 * px(64));
    let stage6 = 2 * 576 * px(64) + 2 * (2 * 960 * px(64));
    let stage7 = 2 * 960 * px(64);
    let head = 512 + 5 * 512 * px(64);
    let relus = stem + stage1 + stage2 + stage3 + stage4 + stage5 + stage6 + stage7 + head;
    assert_eq!(relus, 85_262_848);
    let channels = 32
        + 32
        + (96 * 2 + 144 * 2)
        + (144 * 2 + 192 * 4)
        + (192 * 2 + 384 * 6)
        + (384 * 2 + 576 * 4)
        + (576 * 2 + 960 * 4)
        + 960 * 2
        + 6 * 512;
    assert_eq!(totals(MNV2, [3, 512, 512]), (40, channels, relus));
}

#[test]
fn resnet50_d8_sites_at_512() {
    let s = sites(find(R50).unwrap(), [3, 512, 512]).unwrap();
    let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(s.len(), 3 + 3 * (3 + 4 + 6 + 3) + 6);
    assert_eq!(&names[..4], ["stem_0", "stem_1", "stem_2", "layer1_0_1"]);
    assert_eq!(names[50], "layer4_2_3");
    assert_eq!(names[51], "decode_0");
    assert_eq!(names[56], "decode_5");
    let by = |n: &str| s.iter().find(|x| x.name == n).unwrap();
    let shape = |n: &str| (by(n).channels, by(n).height, by(n).width);
    assert_eq!(shape("stem_0"), (32, 256, 256));
    assert_eq!(shape("stem_2"), (64, 256, 256));
    assert_eq!(shape("layer1_0_1"), (64, 128, 128));
    assert_eq!(shape("layer2_0_1"), (128, 128, 128));
    assert_eq!(shape("layer2_0_2"), (128, 64, 64));
    assert_eq!(shape("layer4_2_3"), (2048, 64, 64));
    assert_eq!(shape("decode_0"), (512, 1, 1));

    // By hand: stem at 256, avg-pool to 128, stage 2 strided to 64, stages 3-4 dilated.
    let stem = (32 + 32 + 64) * px(256);
    let layer1 = 3 * (64 + 64 + 256) * px(128);
    let layer2 = 128 * px(128) + (128 + 512) * px(64) + 3 * (128 + 128 + 512) * px(64);
    let layer3 = 6 * (256 + 256 + 1024) * px(64);
    let layer4 = 3 * (512 + 512 + 2048) * px(64);
    let head = 512 + 5 * 512 * px(64);
    let relus = stem + layer1 + layer2 + layer3 + layer4 + head;
    assert_eq!(relus, 127_402_496);
    let channels = 128 + 3 * 384 + 4 * 768 + 6 * 1536 + 3 * 3072 + 6 * 512;
    assert_eq!(totals(R50, [3, 512, 512]), (57, channels, relus));
}

/// The dilations the graph holds, per conv name, to check them against the mmseg configs.
fn conv_dilations(model: &str, input: [usize; 3]) -> BTreeMap<String, (usize, usize, usize)> {
    let m = Model::new(
        find(model).unwrap(),
        ArchConfig {
            input,
            num_classes: 3,
        },
        Device::Cpu,
    )
    .unwrap();
    m.graph()
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Conv {
                name,
                stride,
                pad,
                dilation,
                ..
            } => Some((name.clone(), (stride[0], pad[0], dilation[0]))),
            _ => None,
        })
        .collect()
}

#[test]
fn dilations_follow_the_mmseg_configs() {
    let _serial = common::torch_rng();
    let r = conv_dilations(R50, [3, 64, 64]);
    // contract_dilation: a dilated stage's first block uses half the dilation.
    assert_eq!(r["layer2.0.conv2"], (2, 1, 1));
    assert_eq!(r["layer3.0.conv2"], (1, 1, 1));
    assert_eq!(r["layer3.1.conv2"], (1, 2, 2));
    assert_eq!(r["layer4.0.conv2"], (1, 2, 2));
    assert_eq!(r["layer4.2.conv2"], (1, 4, 4));
    assert_eq!(r["layer3.0.downsample.0"], (1, 0, 1));
    assert_eq!(r["stem.0"], (2, 1, 1));
    assert_eq!(r["decode_head.aspp_modules.0.conv"], (1, 0, 1));
    assert_eq!(r["decode_head.aspp_modules.3.conv"], (1, 36, 36));
    assert_eq!(r["decode_head.bottleneck.conv"], (1, 1, 1));
    let m = conv_dilations(MNV2, [3, 64, 64]);
    // Stage 4 (features 7..10) starts with dilation 2, only in its first block (mmseg).
    assert_eq!(m["features.7.conv.1.0"], (1, 2, 2));
    assert_eq!(m["features.8.conv.1.0"], (1, 1, 1));
    assert_eq!(m["features.14.conv.1.0"], (1, 4, 4));
    assert_eq!(m["features.17.conv.1.0"], (1, 4, 4));
    assert_eq!(m["features.4.conv.1.0"], (2, 1, 1));
    assert_eq!(m["decode_head.aspp_modules.1.conv"], (1, 12, 12));
}

fn seg_model(name: &str, input: [usize; 3], classes: usize, seed: i64) -> Model {
    tch::manual_seed(seed);
    Model::new(
        find(name).unwrap(),
        ArchConfig {
            input,
            num_classes: classes,
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
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            t.copy_(&(Tensor::randn_like(&t) * 0.1));
        }
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[]).max(1e-12)
}

fn image(input: [usize; 3], n: i64) -> Tensor {
    Tensor::randn(
        [n, input[0] as i64, input[1] as i64, input[2] as i64],
        tch::kind::FLOAT_CPU,
    )
}

#[test]
fn output_is_the_logit_map_at_one_eighth() {
    let _serial = common::torch_rng();
    for (name, input, want) in [
        (MNV2, [3, 64, 48], [8, 6]),
        // Odd sizes: every stride-2 conv (and the avg pool) rounds up.
        (MNV2, [3, 65, 50], [9, 7]),
        (R50, [3, 40, 57], [5, 8]),
    ] {
        let m = seg_model(name, input, 7, 1);
        let shapes = m.graph().infer_shapes(input).unwrap();
        assert_eq!(
            shapes[m.graph().output],
            vec![7, want[0], want[1]],
            "{name}"
        );
        let _g = tch::no_grad_guard();
        let y = m.forward_t(&image(input, 2), false);
        assert_eq!(y.size(), [2, 7, want[0] as i64, want[1] as i64], "{name}");
    }
}

/// A probe network for the new ops: a 2x2/2 average pool resized back up (bilinear, not a
/// broadcast), an image-pooling branch (broadcast) and the input itself, concatenated, then
/// channel dropout.
struct Probe;

impl Architecture for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn summary(&self) -> &'static str {
        "test network"
    }
    fn default_input(&self) -> [usize; 3] {
        [2, 5, 7]
    }
    fn default_classes(&self) -> usize {
        1
    }
    fn build(&self, g: &mut GraphBuilder, _cfg: &ArchConfig) -> Slot {
        let x = g.input();
        let small = g.avg_pool(x, 2, 2, 0);
        let up = g.resize_like(small, x);
        let pooled = g.global_avg_pool_keepdim(x);
        let wide = g.resize_like(pooled, x);
        let cat = g.concat(&[up, wide, x]);
        g.dropout2d(cat, 0.5)
    }
    fn mmlab_name(&self, _name: &str) -> Option<String> {
        None
    }
}

static PROBE: Probe = Probe;

/// PyTorch's bilinear rule (align_corners=False), written out for one plane.
fn bilinear(plane: &[f64], h: usize, w: usize, ho: usize, wo: usize) -> Vec<f64> {
    let src = |o: usize, inl: usize, outl: usize| {
        let s = ((o as f64 + 0.5) * inl as f64 / outl as f64 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inl - 1);
        (i0, (i0 + 1).min(inl - 1), s - i0 as f64)
    };
    let mut out = Vec::with_capacity(ho * wo);
    for oy in 0..ho {
        let (y0, y1, ly) = src(oy, h, ho);
        for ox in 0..wo {
            let (x0, x1, lx) = src(ox, w, wo);
            let v = |y: usize, x: usize| plane[y * w + x];
            out.push(
                (1.0 - ly) * ((1.0 - lx) * v(y0, x0) + lx * v(y0, x1))
                    + ly * ((1.0 - lx) * v(y1, x0) + lx * v(y1, x1)),
            );
        }
    }
    out
}

#[test]
fn resize_concat_pool_and_dropout_match_references() {
    let _serial = common::torch_rng();
    let input = [2, 5, 7];
    let m = Model::new(
        &PROBE,
        ArchConfig {
            input,
            num_classes: 1,
        },
        Device::Cpu,
    )
    .unwrap();
    tch::manual_seed(4);
    let x = image(input, 3);
    let _g = tch::no_grad_guard();
    let y = m.forward_t(&x, false);
    assert_eq!(y.size(), [3, 6, 5, 7]);
    let xv: Vec<f64> = Vec::try_from(x.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let yv: Vec<f64> = Vec::try_from(y.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    for n in 0..3 {
        for c in 0..2 {
            let plane = &xv[(n * 2 + c) * 35..(n * 2 + c + 1) * 35];
            // 2x2/2 average pool (no padding) to 2x3, then back to 5x7.
            let mut small = vec![0.0; 6];
            for (i, s) in small.iter_mut().enumerate() {
                let (py, px) = (i / 3, i % 3);
                *s = (0..4)
                    .map(|k| plane[(2 * py + k / 2) * 7 + 2 * px + k % 2])
                    .sum::<f64>()
                    / 4.0;
            }
            let up = bilinear(&small, 2, 3, 5, 7);
            let mean = plane.iter().sum::<f64>() / 35.0;
            let at = |ch: usize, i: usize| yv[(n * 6 + ch) * 35 + i];
            for i in 0..35 {
                assert!((at(c, i) - up[i]).abs() < 1e-5, "resize n{n} c{c} px{i}");
                assert!((at(2 + c, i) - mean).abs() < 1e-5, "broadcast n{n} c{c}");
                assert_eq!(at(4 + c, i), plane[i], "concat n{n} c{c}");
            }
        }
    }
    // Dropout: the identity in evaluation, whole channels zeroed (the rest scaled by 2) in
    // training.
    let t = m.forward_t(&x, true);
    let mut dropped = 0;
    for n in 0..3 {
        for c in 0..6 {
            let (a, b) = (t.get(n).get(c), y.get(n).get(c));
            if a.abs().max().double_value(&[]) == 0.0 {
                dropped += 1;
            } else {
                assert!(
                    rel_err(&a, &(b * 2.0)) < 1e-6,
                    "kept channels are scaled by 2"
                );
            }
        }
    }
    assert!(
        dropped > 0 && dropped < 18,
        "{dropped} of 18 channels dropped"
    );
    // Folding removes dropout and keeps the result.
    let f = m.fold_bn().unwrap();
    assert!(!f
        .graph()
        .ops
        .iter()
        .any(|o| matches!(o, Op::Dropout { .. })));
    assert!(f.forward_t(&x, false).equal(&y));
}

#[test]
fn ring_resize_matches_bilinear_within_rounding() {
    let fx = Fixed { frac: 12 };
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    for (h, w, ho, wo) in [(1, 1, 4, 6), (2, 3, 5, 7), (4, 4, 9, 3), (3, 5, 3, 5)] {
        let c = 2;
        let x: Vec<f64> = (0..c * h * w).map(|_| rng.gen_range(-4.0..4.0)).collect();
        let enc: Vec<u64> = x.iter().map(|&v| fx.encode(v)).collect();
        let it = Interp::new(c, [h, w], [ho, wo], false);
        let got = fx.decode_all(&it.apply(&enc, None));
        for ch in 0..c {
            let xr: Vec<f64> = enc[ch * h * w..(ch + 1) * h * w]
                .iter()
                .map(|&v| fx.decode(v))
                .collect();
            let want = bilinear(&xr, h, w, ho, wo);
            for (i, wv) in want.iter().enumerate() {
                let g = got[ch * ho * wo + i];
                // A weight rounded to 2^-16 and one truncation: within two ulps.
                assert!(
                    (g - wv).abs() <= 2.0 / fx.scale(),
                    "{h}x{w}->{ho}x{wo}: {g} vs {wv}"
                );
                if h == 1 && w == 1 {
                    assert_eq!(g, xr[0], "a broadcast is exact");
                }
            }
        }
    }
}

#[test]
fn bn_folding_matches_eval_mode() {
    let _serial = common::torch_rng();
    for (name, input) in [(MNV2, [3, 32, 40]), (R50, [3, 32, 32])] {
        let m = seg_model(name, input, 5, 2);
        randomize_bn(&m);
        let f = m.fold_bn().unwrap();
        assert!(!f
            .graph()
            .ops
            .iter()
            .any(|o| matches!(o, Op::BatchNorm { .. } | Op::Dropout { .. })));
        let x = image(input, 2);
        let _g = tch::no_grad_guard();
        let e = rel_err(&f.forward_t(&x, false), &m.forward_t(&x, false));
        assert!(e < 1e-5, "{name}: relative error {e}");
    }
}

#[test]
fn forward_from_a_site_equals_full_forward() {
    let _serial = common::torch_rng();
    for (name, input) in [(MNV2, [3, 32, 32]), (R50, [3, 32, 32])] {
        let m = seg_model(name, input, 4, 3);
        randomize_bn(&m);
        let x = image(input, 2);
        let _g = tch::no_grad_guard();
        let full = m.forward_t(&x, false);
        let n = m.sites().len();
        // A backbone site, the image-pooling site (the other branches' input is cached),
        // a dilated branch and the projection.
        for site in [0, n / 2, n - 6, n - 4, n - 1] {
            let st = m.prefix(&x, site);
            let y = m.forward_from(&st, &st.pre.relu());
            assert!(y.equal(&full), "{name} site {}", m.sites()[site].name);
            // Two stacked copies: the cached values are repeated to match.
            let two = Tensor::cat(&[st.pre.relu(), st.pre.relu()], 0);
            let y2 = m.forward_from(&st, &two);
            // (Another batch size may change the float rounding of the convolutions.)
            assert!(rel_err(&y2.narrow(0, 2, 2), &full) < 1e-5);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mmseg-named weights
// ---------------------------------------------------------------------------------------------

/// Our name -> the mmseg checkpoint name, written from the mmseg module layout (the inverse
/// of what the loader does, derived independently).
fn to_mmseg(model: &str, ours: &str) -> String {
    if ours.starts_with("decode_head.") {
        return ours.to_string();
    }
    if model == R50 {
        return format!("backbone.{ours}");
    }
    // MobileNetV2: features.0.{0,1} = conv1.{conv,bn}; features.f = stage/block by the
    // cumulative block counts; torchvision's flat projection entries map to conv.{k}.{conv,bn}.
    let parts: Vec<&str> = ours.split('.').collect();
    let cb = |i: &str| if i == "0" { "conv" } else { "bn" };
    let f: usize = parts[1].parse().unwrap();
    if f == 0 {
        return format!("backbone.conv1.{}.{}", cb(parts[2]), parts[3]);
    }
    let blocks = [1, 2, 3, 4, 3, 3, 1];
    let (mut stage, mut first) = (0, 1);
    while f >= first + blocks[stage] {
        first += blocks[stage];
        stage += 1;
    }
    let block = f - first;
    let expanded = stage > 0;
    let k: usize = parts[3].parse().unwrap();
    let (mk, which, param) = if parts.len() == 6 {
        (k, cb(parts[4]), parts[5])
    } else {
        // Flat projection: conv then bn at k = 1, 2 (stage 1) or 2, 3.
        let proj = if expanded { 2 } else { 1 };
        (proj, if k == proj { "conv" } else { "bn" }, parts[4])
    };
    format!(
        "backbone.layer{}.{block}.conv.{mk}.{which}.{param}",
        stage + 1
    )
}

fn save_mmseg(m: &Model, path: &Path, extra: &[(&str, Tensor)]) {
    let mut tensors: Vec<(String, Tensor)> = m
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (to_mmseg(m.name(), &n), t.detach().contiguous()))
        .collect();
    for (n, t) in extra {
        tensors.push((n.to_string(), t.shallow_clone()));
    }
    Tensor::write_safetensors(&tensors, path).unwrap();
}

#[test]
fn loads_mmseg_checkpoints_with_their_auxiliary_head() {
    let _serial = common::torch_rng();
    let dir = tempfile::tempdir().unwrap();
    for (name, input) in [(MNV2, [3, 32, 32]), (R50, [3, 16, 16])] {
        let m = seg_model(name, input, 6, 5);
        randomize_bn(&m);
        let names: Vec<String> = m
            .named_tensors()
            .keys()
            .map(|n| to_mmseg(name, n))
            .collect();
        // The mapping is one to one and lands on mmseg's module names.
        assert_eq!(
            names
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            names.len()
        );
        assert!(names
            .iter()
            .any(|n| n == "decode_head.image_pool.1.bn.running_var"));
        assert!(names.iter().any(|n| n == "decode_head.conv_seg.bias"));
        if name == MNV2 {
            assert!(names.iter().any(|n| n == "backbone.conv1.conv.weight"));
            assert!(names
                .iter()
                .any(|n| n == "backbone.layer1.0.conv.1.bn.bias"));
            assert!(names
                .iter()
                .any(|n| n == "backbone.layer7.0.conv.2.conv.weight"));
        } else {
            assert!(names.iter().any(|n| n == "backbone.stem.7.running_mean"));
            assert!(names
                .iter()
                .any(|n| n == "backbone.layer3.0.downsample.1.weight"));
        }
        let p = dir.path().join(format!("{name}.safetensors"));
        // mmseg's auxiliary head as a checkpoint holds it (another seed's, so the values
        // differ from the head the loading model starts with).
        let donor = seg_model(name, input, 6, 7);
        let mut aux: Vec<(String, Tensor)> = donor
            .aux_variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().contiguous()))
            .collect();
        assert_eq!(aux.len(), 7, "{name}: conv, bn (4) and classifier (2)");
        aux.push((
            "decode_head.bottleneck.bn.num_batches_tracked".into(),
            Tensor::from_slice(&[7i64]),
        ));
        let extra: Vec<(&str, Tensor)> = aux
            .iter()
            .map(|(n, t)| (n.as_str(), t.shallow_clone()))
            .collect();
        save_mmseg(&m, &p, &extra);
        let mut other = seg_model(name, input, 6, 99);
        other.load_weights(&p).unwrap();
        assert!(other.aux_head_used());
        for (n, t) in other.aux_variables() {
            assert!(t.equal(&donor.aux_variables()[&n]), "{name}: {n} loads");
        }
        let x = image(input, 1);
        let _g = tch::no_grad_guard();
        assert!(
            m.forward_t(&x, false).equal(&other.forward_t(&x, false)),
            "{name}"
        );
        // Our own file round-trips too.
        let own = dir.path().join(format!("{name}-own.safetensors"));
        m.save_weights(&own).unwrap();
        let mut third = seg_model(name, input, 6, 98);
        third.load_weights(&own).unwrap();
        assert!(m.forward_t(&x, false).equal(&third.forward_t(&x, false)));
    }
    // Unknown head tensors are errors (auxiliary_head.* goes to the auxiliary head), as are
    // missing ones.
    let m = seg_model(MNV2, [3, 32, 32], 6, 5);
    let p = dir.path().join("bad.safetensors");
    save_mmseg(
        &m,
        &p,
        &[(
            "decode_head.extra.weight",
            Tensor::ones([2], tch::kind::FLOAT_CPU),
        )],
    );
    let mut other = seg_model(MNV2, [3, 32, 32], 6, 5);
    let e = other.load_weights(&p).unwrap_err().to_string();
    assert!(e.contains("decode_head.extra.weight"), "{e}");
    let mut tensors: Vec<(String, Tensor)> = m
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| n != "decode_head.conv_seg.weight")
        .map(|(n, t)| (to_mmseg(MNV2, &n), t.detach()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&tensors, &p).unwrap();
    let e = other.load_weights(&p).unwrap_err().to_string();
    assert!(
        e.contains("decode_head.conv_seg.weight") && e.contains("missing"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Distortion extraction on 4-D logits
// ---------------------------------------------------------------------------------------------

fn popts(estimator: Estimator, sites: &[&str], probes: usize) -> PlanOptions {
    PlanOptions {
        estimator,
        seed: 0,
        batch: 2,
        stack: 8,
        chunk: 512,
        probes,
        sites: Some(sites.iter().map(|s| s.to_string()).collect()),
        zero: false,
        skip_unchanged: true,
        baseline: None,
        against_relu: false,
    }
}

#[test]
fn distortion_on_the_logit_map() {
    let _serial = common::torch_rng();
    let input = [3, 16, 16];
    let classes = 3;
    let dir = tempfile::tempdir().unwrap();
    let m = seg_model(MNV2, input, classes, 6);
    randomize_bn(&m);
    let w = dir.path().join("w.safetensors");
    m.save_weights(&w).unwrap();
    let load = || {
        let mut m = seg_model(MNV2, input, classes, 0);
        m.load_weights(&w).unwrap();
        m
    };
    tch::manual_seed(12);
    let x = image(input, 3);
    let s = Samples::from_tensor(&x).unwrap();
    let sites = ["decode_5", "layer3_0_1"];
    let extract = |o: &PlanOptions, sub: &str| {
        let d = dir.path().join(sub);
        let job = plan(&load(), &Catalog::builtin(), &s, o).unwrap();
        init_dir(&d, &job).unwrap();
        let make = |_: Device| Ok(load());
        run(&job, &d, &s, Shard::ALL, &[Device::Cpu], &make, None).unwrap();
        collect(&d).unwrap()
    };
    let exact = extract(&popts(Estimator::Exact, &sites, 1), "e");
    // Brute force: the whole network with one channel switched, mean over every logit of
    // every pixel.
    let mut bm = load();
    let _g = tch::no_grad_guard();
    let clean = bm.forward_t(&x, false).to_kind(Kind::Double);
    assert_eq!(clean.dim(), 4);
    let power = clean.square().mean(Kind::Double).double_value(&[]);
    for name in sites {
        let tab = &exact.sites[name];
        let si = bm.site_index(name).unwrap();
        let ch = bm.sites()[si].channels;
        for (c, k) in [(0, tab.options.len() - 1), (ch - 1, 1)] {
            let mut o = vec![PatchOption::RELU; ch];
            o[c] = tab.options[k];
            bm.set_site_options(si, Some(o)).unwrap();
            let pert = bm.forward_t(&x, false).to_kind(Kind::Double);
            bm.set_site_options(si, None).unwrap();
            let want = (pert - &clean)
                .square()
                .mean(Kind::Double)
                .double_value(&[]);
            let got = tab.get(c, k);
            // Float32 rounding of the logits (relative 1e-7) bounds the absolute noise.
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(got.abs()) + 1e-10 * power,
                "{name} c{c} {}: {got:e} vs brute force {want:e}",
                tab.options[k]
            );
        }
    }
    drop(_g);
    // First order with a full probe basis (3 classes x 2 x 2 pixels): exact at decode_5,
    // since dropout (evaluation) and the 1x1 classifier after it are linear.
    let fo = extract(&popts(Estimator::FirstOrder, &sites, 12), "f");
    let (te, tf) = (&exact.sites["decode_5"], &fo.sites["decode_5"]);
    // The claim is exact in real arithmetic, but the exact side differences two float32
    // forward passes: each logit carries a rounding error δ of a few ulps of the logit scale,
    // |δ| <= κ·ε·sqrt(power), whatever kernels the processor gets. Squaring the perturbed
    // difference turns that into |D̃ - D| <= 2·sqrt(D)·|δ| + δ², which is not small relative
    // to D when D is tiny (4e-8 here): a pure relative tolerance holds on one CPU and fails on
    // another. κ = 8 is ten times the worst seen over oneDNN's SSE4.1/AVX2/AVX-512 kernels and
    // ATen's default/AVX2/AVX-512 ones (0.82); at D ~ 1e-6 the term is still only 1-2% of D.
    let delta = 8.0 * f64::from(f32::EPSILON) * power.sqrt();
    let noise = |d: f64| 2.0 * d.sqrt() * delta + delta * delta;
    for (a, b) in te.values.iter().zip(&tf.values) {
        assert!(
            (a - b).abs() <= 1e-3 * a.abs().max(b.abs()) + noise(a.abs().max(b.abs())),
            "exact {a:e} vs first-order {b:e}"
        );
    }
    assert!(fo.sites["layer3_0_1"]
        .values
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0));
}

// ---------------------------------------------------------------------------------------------
// Secure inference
// ---------------------------------------------------------------------------------------------

/// Random weights with random batch-norm statistics and biases (so the logits are far from 0)
/// and a small last batch-norm scale per bottleneck: random residual branches at full scale
/// double the activations' variance per block (logits in the hundreds after 16 bottlenecks),
/// which turns every +-1 ulp truncation and every near-zero patch decision into a large logit
/// difference. Trained networks keep their values O(1) too.
fn well_scaled(name: &str, input: [usize; 3], classes: usize, seed: i64) -> Model {
    let m = seg_model(name, input, classes, seed);
    randomize_bn(&m);
    let _g = tch::no_grad_guard();
    for (n, mut t) in m.named_tensors() {
        if n.ends_with("bn3.weight") {
            let _ = t.fill_(0.25);
        }
    }
    m
}

fn secure_check(name: &str, input: [usize; 3], check_argmax_error: bool) {
    let classes = 4;
    let mut m = well_scaled(name, input, classes, 8);
    common::mixed_spec(&mut m);
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let img: Vec<f32> = (0..input.iter().product::<usize>())
        .map(|_| rng.gen_range(-2.0f32..2.0))
        .collect();
    // 16 fractional bits make patch-decision flips near zero rare (see tests/it/secure.rs).
    let settings = Settings {
        fixed: Fixed { frac: 16 },
        ..Settings::default()
    };
    let (plan, _) = Plan::from_model(&m, settings).unwrap();
    let (h, w) = (input[1].div_ceil(8), input[2].div_ceil(8));
    assert_eq!(plan.outputs, classes * h * w);
    let r = run_compare(
        &m,
        std::slice::from_ref(&img),
        None,
        settings,
        LinkConfig::default(),
    )
    .unwrap();
    let im = &r.images[0];
    assert_eq!(im.plaintext_logits.len(), classes * h * w);
    let e = im.max_logit_error.unwrap();
    let big = im
        .plaintext_logits
        .iter()
        .fold(0.0f64, |a, v| a.max(v.abs()));
    // Logits far above the tolerance: the check is not passed by a network that outputs ~0
    // (which untouched batch-norm statistics give after many depthwise convs).
    assert!(big > 2.0, "{name}: degenerate logits (max {big})");
    assert!(e < 0.1, "{name}: logit error {e}");
    // One DReLU per patch, as the spec says.
    let expected: usize = m
        .sites()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            m.site_options(i)
                .unwrap()
                .iter()
                .map(|o| o.drelus(s.height, s.width))
                .sum::<usize>()
        })
        .sum();
    assert_eq!(r.drelus_per_image, expected);
    // Per-pixel classes agree (a flip needs a near tie of two logits within the error).
    let agree = im
        .pixel_agreement
        .expect("a map output reports pixel agreement");
    assert!(agree > 0.9, "{name}: pixel agreement {agree}");
    if !check_argmax_error {
        return;
    }
    // Arg-max-only mode reveals one class per pixel, the classes of the plaintext pass.
    let a = run_compare(
        &m,
        &[img],
        None,
        Settings {
            argmax_only: true,
            ..settings
        },
        LinkConfig::default(),
    )
    .unwrap();
    let im = &a.images[0];
    assert!(im.max_logit_error.is_none());
    let agree = im.pixel_agreement.unwrap();
    assert!(agree > 0.9, "{name}: arg-max-only pixel agreement {agree}");
}

#[test]
fn secure_argmax_per_column_reveals_each_columns_largest() {
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    for (n, m) in [(1usize, 3usize), (2, 5), (7, 4), (150, 6)] {
        // Small integers: many ties, which go to the lower index.
        let v: Vec<i64> = (0..n * m).map(|_| rng.gen_range(-3..4)).collect();
        let vu: Vec<u64> = v.iter().map(|&x| x as u64).collect();
        let s0: Vec<u64> = vu.iter().map(|_| rng.gen()).collect();
        let s1 = brelu::secure::ring::sub(&vu, &s0);
        let out = with_parties(Settings::default(), |p| {
            let mine: &[u64] = match p.role {
                Role::Client => &s0,
                Role::Server => &s1,
                Role::Dealer => &[],
            };
            proto::argmax_columns(p, mine, n, m)
        })
        .unwrap();
        let idx = brelu::secure::ring::add(&out[0], &out[1]);
        assert_eq!(idx.len(), m);
        for (col, &got) in idx.iter().enumerate() {
            let best = (0..n)
                .max_by_key(|&k| (v[k * m + col], std::cmp::Reverse(k)))
                .unwrap();
            assert_eq!(got as usize, best, "n {n} column {col}");
        }
    }
}

#[test]
fn secure_inference_mobilenetv2_d8_matches_plaintext() {
    let _serial = common::torch_rng();
    secure_check(MNV2, [3, 32, 32], true);
}

#[test]
fn secure_inference_resnet50_d8_matches_plaintext() {
    let _serial = common::torch_rng();
    secure_check(R50, [3, 24, 32], false);
}

// ---------------------------------------------------------------------------------------------
// The command line on a segmentation model: synthetic tables -> knapsack -> secure run
// ---------------------------------------------------------------------------------------------

fn run_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(common::brelu_exe())
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "brelu {args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_knapsack_spec_runs_securely_on_the_segmentation_model() {
    let _serial = common::torch_rng();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let input = "3,32,32";
    let m = well_scaled(MNV2, [3, 32, 32], 5, 13);
    m.save_weights(&d.join("w.safetensors")).unwrap();
    run_ok(&[
        "distortion",
        "synthetic",
        "--model",
        MNV2,
        "--input",
        input,
        "-o",
        &p("t"),
    ]);
    run_ok(&[
        "knapsack",
        "--model",
        MNV2,
        "--distortion",
        &p("t"),
        "--ratio",
        "0.06",
        "-o",
        &p("spec.json"),
    ]);
    let out = run_ok(&[
        "secure",
        "run",
        "--model",
        MNV2,
        "--input",
        input,
        "--classes",
        "5",
        "--weights",
        &p("w.safetensors"),
        "--spec",
        &p("spec.json"),
        "--frac-bits",
        "16",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let relus = r["relus"].as_u64().unwrap();
    let drelus = r["drelus_per_image"].as_u64().unwrap();
    // By hand at 32x32 (maps 16, 8, 4 and the 1x1 image pool), as in the 512 test.
    let px = |s: u64| s * s;
    let backbone = 32 * px(16)
        + 32 * px(16)
        + (96 * px(16) + 96 * px(8) + 2 * 144 * px(8))
        + (144 * px(8) + 144 * px(4) + 4 * 192 * px(4))
        + (2 * 192 + 6 * 384 + 2 * 384 + 4 * 576 + 2 * 576 + 4 * 960 + 2 * 960) * px(4);
    assert_eq!(relus, backbone + 512 + 5 * 512 * px(4));
    assert!(
        drelus <= relus * 6 / 100 && drelus > relus * 5 / 100,
        "{drelus} of {relus}"
    );
    let im = &r["images"][0];
    assert_eq!(im["plaintext_logits"].as_array().unwrap().len(), 5 * 4 * 4);
    assert!(im["max_logit_error"].as_f64().unwrap() < 0.1, "{im}");
    assert!(im["pixel_agreement"].as_f64().unwrap() > 0.9, "{im}");
}
