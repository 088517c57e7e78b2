//! Secure inference: every protocol against plaintext on random and edge inputs, end-to-end
//! runs on small random networks, session and transport failures.
use crate::common;
use brelu::secure::engine::with_parties;
use brelu::secure::gemm::ConvGeom;
use brelu::secure::plan::{ActPlan, DreluProtocol, Windows};
use brelu::secure::proto::{self, LinOp};
use brelu::secure::ring::{self, Fixed};
use brelu::secure::{Role, Settings};
use brelu::spec::PatchOption;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Random additive shares of `v`.
fn share(rng: &mut impl Rng, v: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let x0: Vec<u64> = v.iter().map(|_| rng.gen()).collect();
    let x1 = ring::sub(v, &x0);
    (x0, x1)
}

fn open(out: &[Vec<u64>; 3]) -> Vec<u64> {
    ring::add(&out[0], &out[1])
}

/// The input of party `p` from the pair of shares.
fn mine(role: Role, s: &(Vec<u64>, Vec<u64>)) -> &[u64] {
    match role {
        Role::Client => &s.0,
        Role::Server => &s.1,
        Role::Dealer => &[],
    }
}

fn edge_values() -> Vec<i64> {
    let l = 1i64 << 62;
    vec![
        0,
        1,
        -1,
        2,
        -2,
        4096,
        -4096,
        4095,
        -4097,
        l - 1,
        -(l - 1),
        -l + 1,
        l - 2,
        1 << 61,
        -(1 << 61),
        123_456_789,
        -987_654_321,
    ]
}

#[test]
fn drelu_exact_on_edges_and_random() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut vals = edge_values();
    for _ in 0..3000 {
        let bits = rng.gen_range(1..62);
        vals.push(rng.gen_range(-(1i64 << bits)..(1i64 << bits)));
    }
    let v: Vec<u64> = vals.iter().map(|&x| x as u64).collect();
    let n = v.len();
    // Several sharings of the same values, including shares at the 2^63 boundary.
    let mut sh = share(&mut rng, &v);
    for i in 0..20 {
        sh.0[i] = 1u64 << 63;
        sh.1[i] = v[i].wrapping_sub(sh.0[i]);
    }
    for i in 20..40 {
        sh.0[i] = u64::MAX;
        sh.1[i] = v[i].wrapping_sub(sh.0[i]);
    }
    for protocol in [DreluProtocol::Msb, DreluProtocol::ShareConvert] {
        let s = Settings {
            drelu: protocol,
            ..Settings::default()
        };
        let out = with_parties(s, |p| proto::drelu(p, mine(p.role, &sh), n)).unwrap();
        let d = open(&out);
        for i in 0..n {
            assert_eq!(
                d[i],
                (vals[i] > 0) as u64,
                "{protocol:?} DReLU({})",
                vals[i]
            );
        }
    }
}

/// The MSB protocol is exact on the whole signed range but i64::MIN (ShareConvert stops at
/// 2^62 - 1): values next to +-2^63 and every power of two.
#[test]
fn msb_drelu_is_exact_up_to_the_ring_edge() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let mut vals = vec![i64::MAX, i64::MAX - 1, -i64::MAX, i64::MIN + 2, 0, 1, -1];
    for b in 0..63 {
        vals.extend([1i64 << b, -(1i64 << b), (1i64 << b) - 1, -(1i64 << b) + 1]);
    }
    let v: Vec<u64> = vals.iter().map(|&x| x as u64).collect();
    let sh = share(&mut rng, &v);
    let out = with_parties(Settings::default(), |p| {
        proto::drelu(p, mine(p.role, &sh), v.len())
    })
    .unwrap();
    let d = open(&out);
    for i in 0..v.len() {
        assert_eq!(d[i], (vals[i] > 0) as u64, "DReLU({})", vals[i]);
    }
}

/// Bytes and message trips per DReLU of each protocol, measured on the wire against the
/// formulas of docs/method.md 8.4 and the knapsack's byte model.
#[test]
fn drelu_bytes_and_trips_match_the_cost_model() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    for (protocol, bits, per) in [
        (DreluProtocol::Msb, 64, 221u64),
        (DreluProtocol::Msb, 16, 59),
        (DreluProtocol::ShareConvert, 64, 456),
        (DreluProtocol::ShareConvert, 16, 120),
    ] {
        let s = Settings {
            drelu: protocol,
            drelu_bits: bits,
            ..Settings::default()
        };
        // Bytes sent by all three parties for n values, then for 2n: the difference is n
        // DReLUs (frame and record overheads cancel but for the records of the larger frames).
        let mut sent = |n: usize| -> (u64, u64) {
            let v: Vec<u64> = (0..n)
                .map(|_| rng.gen_range(-5000i64..5000) as u64)
                .collect();
            let sh = share(&mut rng, &v);
            let out = with_parties(s, |p| {
                proto::drelu(p, mine(p.role, &sh), n)?;
                Ok((p.bytes_sent().iter().sum::<u64>(), p.stats[0].rounds))
            })
            .unwrap();
            (out.iter().map(|o| o.0).sum(), out[0].1)
        };
        let n = 20_000;
        let (a, trips) = sent(n);
        let (b, _) = sent(2 * n);
        let per_drelu = (b - a) as f64 / n as f64;
        assert!(
            (per_drelu - per as f64).abs() < 0.01 * per as f64,
            "{protocol:?} {bits}-bit: {per_drelu} bytes per DReLU, expected {per}"
        );
        assert_eq!(
            brelu::spec::cost::engine_bytes_per_drelu(protocol == DreluProtocol::Msb, bits),
            per
        );
        let want_trips = if protocol == DreluProtocol::Msb { 3 } else { 6 };
        assert_eq!(trips, want_trips, "{protocol:?}");
    }
}

#[test]
fn drelu_approximate_window_is_exact_away_from_zero() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let s = Settings {
        drelu_bits: 16,
        ..Settings::default()
    };
    // Window of 16 bits: |value| < 2^(12 + 12) in ring units, resolution 2^shift.
    let shift = s.drelu_shift();
    assert_eq!(shift, 10);
    let vals: Vec<i64> = (0..2000)
        .map(|_| {
            let m = rng.gen_range((4i64 << shift)..(1i64 << 23));
            if rng.gen() {
                m
            } else {
                -m
            }
        })
        .collect();
    let v: Vec<u64> = vals.iter().map(|&x| x as u64).collect();
    let sh = share(&mut rng, &v);
    let out = with_parties(s, |p| proto::drelu(p, mine(p.role, &sh), v.len())).unwrap();
    let d = open(&out);
    for i in 0..v.len() {
        assert_eq!(d[i], (vals[i] > 0) as u64, "DReLU16({})", vals[i]);
    }
}

#[test]
fn beaver_multiply_with_expansion() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let (n, m) = (500, 37);
    let mut x: Vec<u64> = (0..n).map(|_| rng.gen()).collect();
    let mut y: Vec<u64> = (0..m).map(|_| rng.gen()).collect();
    // Edge values: 0, +-1, the 2^63 boundary.
    let edges = [0u64, 1, u64::MAX, 1 << 63, (1 << 63) - 1, (1 << 63) + 1];
    x[..edges.len()].copy_from_slice(&edges);
    y[..edges.len()].copy_from_slice(&edges);
    let map: Vec<u32> = (0..n).map(|_| rng.gen_range(0..m as u32)).collect();
    let (sx, sy) = (share(&mut rng, &x), share(&mut rng, &y));
    let out = with_parties(Settings::default(), |p| {
        proto::mul_expand(p, n, m, mine(p.role, &sx), mine(p.role, &sy), Some(&map))
    })
    .unwrap();
    let z = open(&out);
    for i in 0..n {
        assert_eq!(z[i], x[i].wrapping_mul(y[map[i] as usize]));
    }
}

#[test]
fn linear_layers_match_plaintext_within_one_ulp() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let fx = Fixed::default();
    let geoms = [
        LinOp::Conv(ConvGeom {
            cin: 3,
            cout: 8,
            h: 9,
            w: 7,
            kernel: [3, 3],
            stride: [2, 2],
            pad: [1, 1],
            dilation: [1, 1],
            groups: 1,
        }),
        LinOp::Conv(ConvGeom {
            cin: 6,
            cout: 6,
            h: 5,
            w: 5,
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            groups: 6,
        }),
        LinOp::Fc { cin: 40, cout: 10 },
    ];
    let mut failures = 0;
    for op in geoms {
        let x: Vec<u64> = (0..op.in_len())
            .map(|_| fx.encode(rng.gen_range(-8.0..8.0)))
            .collect();
        let w: Vec<u64> = (0..op.weight_len())
            .map(|_| fx.encode(rng.gen_range(-1.0..1.0)))
            .collect();
        let per = op.per_channel();
        let nb = op.out_len() / per;
        let bias: Vec<u64> = (0..nb)
            .map(|_| fx.encode(rng.gen_range(-1.0..1.0)))
            .collect();
        let want: Vec<u64> = op
            .apply(&x, &w)
            .iter()
            .enumerate()
            .map(|(i, v)| ring::trunc_plain(*v, 12).wrapping_add(bias[i / per]))
            .collect();
        let sx = share(&mut rng, &x);
        let out = with_parties(Settings::default(), |p| {
            let wt = (p.role == Role::Server).then_some(w.as_slice());
            let mask = proto::setup_linear(p, &op, wt)?;
            let b = (p.role == Role::Server).then_some(bias.as_slice());
            proto::linear(p, &op, &mask, mine(p.role, &sx), b)
        })
        .unwrap();
        let got = open(&out);
        for (g, w) in got.iter().zip(&want) {
            let d = g.wrapping_sub(*w) as i64;
            if !(-1..=1).contains(&d) {
                failures += 1;
            }
        }
    }
    // Local truncation fails with probability ~|x| / 2^64: none expected here.
    assert_eq!(failures, 0, "truncation failures");
}

fn block_relu_plain(act: &ActPlan, x: &[u64]) -> Vec<u64> {
    let sums = act.patch_sums(x);
    let mut y = vec![0u64; act.len];
    for &i in &act.identity {
        y[i as usize] = x[i as usize];
    }
    for (&i, &p) in act.active.iter().zip(&act.patch_of) {
        if (sums[p as usize] as i64) > 0 {
            y[i as usize] = x[i as usize];
        }
    }
    y
}

#[test]
fn block_relu_matches_plaintext_with_mixed_options_and_ties() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(15);
    let (c, h, w) = (6, 7, 5);
    let opts = vec![
        PatchOption::RELU,
        PatchOption::patch(2, 2),
        PatchOption::patch(3, 2),
        PatchOption::Identity,
        PatchOption::Zero,
        PatchOption::patch(7, 5),
    ];
    let act = ActPlan::new(&opts, c, h, w);
    let mut x: Vec<u64> = (0..c * h * w)
        .map(|_| rng.gen_range(-5000i64..5000) as u64)
        .collect();
    // Ties: a 2x2 patch summing to exactly zero, and single 0 / +-1 values.
    let base = h * w;
    x[base] = 7;
    x[base + 1] = (-3i64) as u64;
    x[base + w] = (-5i64) as u64;
    x[base + w + 1] = 1;
    x[0] = 0;
    x[1] = 1;
    x[2] = u64::MAX;
    let sx = share(&mut rng, &x);
    let out = with_parties(Settings::default(), |p| {
        proto::block_relu(p, &act, mine(p.role, &sx))
    })
    .unwrap();
    assert_eq!(open(&out), block_relu_plain(&act, &x));
    assert_eq!(out[0].len(), c * h * w);
}

/// An approximate (16-bit) DReLU on big patches whose means reach the window's edge: the
/// window follows the patch size, so the decision is the sign of the patch sum. (With one
/// window for all patches, a 56x56 patch of mean 1.5 already wrapped: its sum is 4704 > 2^12.)
#[test]
fn approximate_block_relu_follows_the_patch_mean() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(16);
    let s = Settings {
        drelu_bits: 16,
        ..Settings::default()
    };
    let (c, h, w) = (4, 56, 56);
    let opts = vec![
        PatchOption::patch(56, 56),
        PatchOption::patch(7, 8),
        PatchOption::patch(16, 16),
        PatchOption::RELU,
    ];
    let act = ActPlan::new(&opts, c, h, w);
    assert_eq!(act.sum_bits[0], 12); // 3,136 pixels
    let fixed = s.fixed;
    let range = (1i64 << s.drelu_range_bits) as f64;
    for trial in 0..3 {
        // One mean per patch: |mean| in [1, 0.95 * 2^range), random sign; pixels scatter
        // around it by +-0.5, so they stay inside the window too.
        let means: Vec<f64> = (0..act.patches)
            .map(|i| {
                let m = match (trial, i % 3) {
                    (0, _) => 1.5,
                    (_, 0) => rng.gen_range(0.9..0.95) * range,
                    _ => rng.gen_range(1.0..0.95 * range),
                };
                if rng.gen() {
                    m
                } else {
                    -m
                }
            })
            .collect();
        let mut x = vec![0u64; c * h * w];
        for (&i, &q) in act.active.iter().zip(&act.patch_of) {
            let v = means[q as usize] + rng.gen_range(-0.5..0.5);
            x[i as usize] = fixed.encode(v);
        }
        let sx = share(&mut rng, &x);
        let out = with_parties(s, |p| proto::block_relu(p, &act, mine(p.role, &sx))).unwrap();
        let got = open(&out);
        let want = block_relu_plain(&act, &x);
        let wrong = (0..got.len()).filter(|&i| got[i] != want[i]).count();
        assert_eq!(wrong, 0, "trial {trial}: {wrong} pixels decided wrongly");
    }
}

#[test]
fn pools_match_plaintext() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(16);
    let (c, h, w) = (3, 9, 8);
    let x: Vec<u64> = (0..c * h * w)
        .map(|_| rng.gen_range(-9000i64..9000) as u64)
        .collect();
    let win = Windows::new(c, h, w, 3, 2, 1);
    let sx = share(&mut rng, &x);
    let out = with_parties(Settings::default(), |p| {
        let m = proto::max_pool(p, &win, mine(p.role, &sx))?;
        let a = proto::avg_pool(p, &win, mine(p.role, &sx));
        let g = proto::global_avg_pool(p, c, h * w, mine(p.role, &sx));
        Ok((m, a, g))
    })
    .unwrap();
    let maxes = ring::add(&out[0].0, &out[1].0);
    for (o, v) in win.idx.iter().enumerate() {
        let want = v.iter().map(|&i| x[i as usize] as i64).max().unwrap();
        assert_eq!(maxes[o] as i64, want);
    }
    let avg = ring::add(&out[0].1, &out[1].1);
    for (o, v) in win.idx.iter().enumerate() {
        let s = v.iter().map(|&i| x[i as usize] as i64).sum::<i64>() as f64 / v.len() as f64;
        assert!((avg[o] as i64 as f64 - s).abs() <= 1.5, "avg {o}");
    }
    let gap = ring::add(&out[0].2, &out[1].2);
    for ch in 0..c {
        let s = x[ch * h * w..(ch + 1) * h * w]
            .iter()
            .map(|&v| v as i64)
            .sum::<i64>() as f64
            / (h * w) as f64;
        assert!((gap[ch] as i64 as f64 - s).abs() <= 1.5, "gap {ch}");
    }
}

#[test]
fn secure_argmax_reveals_the_largest() {
    let _rng = common::torch_rng();
    let mut rng = ChaCha20Rng::seed_from_u64(17);
    for n in [1usize, 2, 7, 10] {
        let v: Vec<i64> = (0..n).map(|_| rng.gen_range(-100_000..100_000)).collect();
        let vu: Vec<u64> = v.iter().map(|&x| x as u64).collect();
        let sv = share(&mut rng, &vu);
        let out = with_parties(Settings::default(), |p| {
            proto::argmax(p, mine(p.role, &sv), n)
        })
        .unwrap();
        let idx = open(&out)[0] as usize;
        let best = (0..n)
            .max_by_key(|&i| (v[i], std::cmp::Reverse(i)))
            .unwrap();
        assert_eq!(idx, best, "{v:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

use brelu::models::{find, ArchConfig, Model};
use brelu::secure::{run_compare, LinkConfig};

/// Secure logits differ from the plaintext fixed-point logits by the +-1 ulp of every local
/// truncation (random: it depends on the shares), carried through the network. A block-ReLU
/// patch whose sum lies within a few ulps of zero can then decide differently from the
/// plaintext pass, which moves the logits by more than the ulps. Observed with 16 fractional
/// bits: ~5e-5 without such a flip, up to ~0.02 with one; with 12 bits ~1e-3 for ReLU-only
/// networks and up to ~0.05 when patches flip. Random networks have near-tied logits, so a
/// prediction may differ from the plaintext one only when the plaintext logits of the two
/// classes are within the observed error of each other.
const LOGIT_TOLERANCE: f64 = 0.1;

/// Checks one image: logits within the tolerance, and the same prediction as the plaintext
/// fixed-point pass unless the two classes are tied within the logit error.
fn check_image(im: &brelu::secure::report::ImageReport, what: &str) {
    let e = im.max_logit_error.unwrap_or(0.0);
    assert!(
        e < LOGIT_TOLERANCE,
        "{what}: image {}: logit error {e}",
        im.index
    );
    if im.prediction != im.plaintext_prediction {
        let l = &im.plaintext_logits;
        let gap = l[im.plaintext_prediction] - l[im.prediction];
        assert!(
            gap <= 2.0 * e,
            "{what}: image {}: secure predicts {}, plaintext {} (margin {gap}, error {e})",
            im.index,
            im.prediction,
            im.plaintext_prediction
        );
    }
}

fn small_model(name: &str, input: [usize; 3], seed: i64) -> Model {
    tch::manual_seed(seed);
    Model::new(
        find(name).unwrap(),
        ArchConfig {
            input,
            num_classes: 10,
        },
        tch::Device::Cpu,
    )
    .unwrap()
}

fn random_images(n: usize, input: [usize; 3], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..input.iter().product::<usize>())
                .map(|_| rng.gen_range(-2.0f32..2.0))
                .collect()
        })
        .collect()
}

#[test]
fn end_to_end_block_relu_network_matches_plaintext() {
    let _rng = common::torch_rng();
    let input = [1, 16, 16];
    let mut model = small_model("resnet18-cifar-light", input, 3);
    common::mixed_spec(&mut model);
    let images = random_images(3, input, 4);
    // 16 fractional bits make patch-decision flips (see LOGIT_TOLERANCE) rare.
    let settings = Settings {
        fixed: Fixed { frac: 16 },
        ..Settings::default()
    };
    let r = run_compare(&model, &images, None, settings, LinkConfig::default()).unwrap();
    assert!(r.drelus_per_image < r.relus);
    // One DReLU per patch, none for identity and zero channels (docs/method.md 2).
    let expected: usize = model
        .sites()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            model
                .site_options(i)
                .unwrap()
                .iter()
                .map(|o| o.drelus(s.height, s.width))
                .sum::<usize>()
        })
        .sum();
    assert_eq!(r.drelus_per_image, expected);
    let counted: u64 = r.layers.iter().map(|l| l.drelus).sum();
    assert_eq!(counted as usize, expected);
    for im in &r.images {
        check_image(im, "mixed spec");
        assert!(im.bytes.client_server > 0 && im.bytes.client_dealer > 0);
    }
    // The weight masks travel once per session, not per image.
    assert!(r.setup_bytes.client_server > 8 * 100_000);
    assert_eq!(
        r.images[0].bytes, r.images[1].bytes,
        "bytes are data-independent"
    );
    // Per-layer counters add up to the per-image totals (all bytes are counted per layer).
    let layer_bytes: u64 = r.layers.iter().map(|l| l.bytes).sum();
    assert_eq!(layer_bytes, r.images[0].bytes.total);
}

#[test]
fn end_to_end_argmax_only_and_relu_network() {
    let _rng = common::torch_rng();
    let input = [1, 12, 12];
    let model = small_model("resnet18-cifar-light", input, 5);
    let images = random_images(2, input, 6);
    let full = run_compare(
        &model,
        &images,
        None,
        Settings::default(),
        LinkConfig::default(),
    )
    .unwrap();
    let arg = run_compare(
        &model,
        &images,
        None,
        Settings {
            argmax_only: true,
            ..Settings::default()
        },
        LinkConfig::default(),
    )
    .unwrap();
    for (a, f) in arg.images.iter().zip(&full.images) {
        check_image(f, "relu");
        assert!(a.max_logit_error.is_none());
        // The arg-max tournament compares the secure logits: a different answer than the
        // plaintext needs a near tie.
        let l = &a.plaintext_logits;
        assert!(
            l[a.plaintext_prediction] - l[a.prediction] <= 0.01,
            "arg-max only"
        );
    }
}

#[test]
fn end_to_end_every_model_in_the_zoo() {
    let _rng = common::torch_rng();
    // Max-pool stem (resnet50), average-pool stem (resnet50-avgpool), depthwise convolutions
    // (mobilenetv2), at tiny inputs to stay fast.
    for (name, input) in [
        ("resnet50", [3, 24, 24]),
        ("resnet50-avgpool", [3, 24, 24]),
        ("resnet50-avgpool-countpad", [3, 24, 24]),
        ("mobilenetv2", [3, 16, 16]),
        ("resnet18-cifar", [3, 8, 8]),
    ] {
        let model = small_model(name, input, 7);
        let images = random_images(1, input, 8);
        let r = run_compare(
            &model,
            &images,
            None,
            Settings::default(),
            LinkConfig::default(),
        )
        .unwrap();
        check_image(&r.images[0], name);
    }
}

/// The Fashion-MNIST default model (`brelu train --config configs/fashion-mnist.toml`), when
/// its weights are named by `BRELU_FMNIST_WEIGHTS`: secure predictions equal the plaintext
/// fixed-point predictions on the first 20 test images. Ignored by default (needs the trained
/// weights and the data set); run with `cargo test --test it -- --ignored secure::`.
#[test]
#[ignore]
fn fashion_mnist_trained_model_matches_plaintext() {
    let _rng = common::torch_rng();
    // Run on request only (ignored), so a missing variable is a failure, not a silent pass.
    let weights = std::env::var("BRELU_FMNIST_WEIGHTS")
        .expect("set BRELU_FMNIST_WEIGHTS to the trained Fashion-MNIST checkpoint");
    let cfg = brelu::train::Config::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/fashion-mnist.toml"
    )))
    .unwrap();
    let mut model = brelu::train::build_model(&cfg, tch::Device::Cpu).unwrap();
    model.load_weights(std::path::Path::new(&weights)).unwrap();
    let mut test = brelu::train::load_split(&cfg, brelu::data::Split::Test).unwrap();
    test.truncate(20);
    let x = brelu::data::normalization(cfg.dataset.kind).apply(&test.images);
    let images: Vec<Vec<f32>> = (0..20)
        .map(|i| Vec::<f32>::try_from(x.get(i).flatten(0, -1)).unwrap())
        .collect();
    let r = run_compare(
        &model,
        &images,
        None,
        Settings::default(),
        LinkConfig::default(),
    )
    .unwrap();
    for im in &r.images {
        assert_eq!(im.prediction, im.plaintext_prediction, "image {}", im.index);
        assert!(im.max_logit_error.unwrap() < 0.05);
    }
}

#[test]
fn secure_run_cli_prints_a_json_report() {
    let out = std::process::Command::new(common::brelu_exe())
        .args([
            "secure",
            "run",
            "--model",
            "resnet18-cifar-light",
            "--input",
            "1,8,8",
            "--classes",
            "4",
            "--images",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["images"].as_array().unwrap().len(), 2);
    assert!(r["mean_bytes"]["total"].as_u64().unwrap() > 0);
    assert!(r["setup_bytes"]["client_server"].as_u64().unwrap() > 0);
    let layers = r["layers"].as_array().unwrap();
    // A ReLU layer: the DReLU's 3 message trips, then the multiply's 1.
    assert!(layers
        .iter()
        .any(|l| l["kind"] == "act" && l["rounds"] == 4));
    assert_eq!(layers.last().unwrap()["kind"], "reveal");
}

/// Truncation failures in real runs are counted and reported, not only in a synthetic test:
/// with 28 fractional bits local truncations fail often enough to corrupt logits; with 12 they
/// do not.
#[test]
fn truncation_failures_are_counted_in_real_runs() {
    let _rng = common::torch_rng();
    let model = small_model("resnet18-cifar-light", [1, 16, 16], 3);
    let images = random_images(4, [1, 16, 16], 8);
    let run = |frac: u32| {
        let s = Settings {
            fixed: Fixed { frac },
            ..Settings::default()
        };
        run_compare(&model, &images, None, s, LinkConfig::default()).unwrap()
    };
    let bad = run(28);
    assert!(bad.far_off_images >= 1, "no failure at 28 fractional bits");
    for im in &bad.images {
        let far = im.far_off.unwrap();
        assert_eq!(
            far > 0,
            im.max_logit_error.unwrap() > 1.0,
            "image {}",
            im.index
        );
    }
    let good = run(12);
    assert_eq!(good.far_off_images, 0);
    assert!(good.images.iter().all(|i| i.far_off == Some(0)));
}

/// Protocol settings that would shift by 64 or more, and values fixed point cannot hold, are
/// errors naming the setting or the element, not panics or silent zeros.
#[test]
fn settings_and_encodings_are_checked() {
    let s = Settings {
        drelu_bits: 16,
        drelu_range_bits: 100,
        ..Settings::default()
    };
    let e = s.validate().unwrap_err().to_string();
    assert!(e.contains("--drelu-range-bits"), "{e}");
    assert!(Settings::default().validate().is_ok());
    let f = Fixed::default();
    for bad in [f32::NAN, f32::INFINITY, -1e30] {
        let e = f
            .encode_all(&[0.5, bad], "image 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("image 3") && e.contains("element 1"), "{e}");
    }
    assert_eq!(
        f.encode_all(&[0.5, -2.0], "x").unwrap(),
        vec![2048, (-8192i64) as u64]
    );
    // Through the CLI: an error message, exit code 1, no panic.
    let out = std::process::Command::new(common::brelu_exe())
        .args([
            "secure",
            "run",
            "--model",
            "resnet18-cifar-light",
            "--input",
            "1,8,8",
            "--classes",
            "4",
            "--drelu-bits",
            "16",
            "--drelu-range-bits",
            "100",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--drelu-range-bits") && !err.contains("panicked"),
        "{err}"
    );
}

/// A dealer that sends bit shares outside Z_67 is named; the client does not underflow.
#[test]
fn out_of_range_dealer_randomness_is_refused() {
    use brelu::secure::wire::Kind;
    let n = 4;
    // The client's offline DReLU material: ring vectors, then bit shares in Z_67.
    for (protocol, len, at) in [
        (
            DreluProtocol::ShareConvert,
            3 * n * 8 + 2 * n * 64,
            2 * n * 8,
        ),
        (DreluProtocol::Msb, n * 8 + n * 63, n * 8),
    ] {
        let s = Settings {
            drelu: protocol,
            ..Settings::default()
        };
        let out = with_parties(s, |p| match p.role {
            Role::Dealer => {
                let mut msg = vec![0u8; len];
                msg[at] = 200;
                p.send_bytes(Role::Client, Kind::Offline, &msg)?;
                Ok(Vec::new())
            }
            _ => proto::drelu(p, &[0u64; 4], n),
        });
        let e = out.expect_err("the client must refuse").to_string();
        assert!(
            e.contains("dealer") && e.contains("Z_67"),
            "{protocol:?}: {e}"
        );
    }
}

/// The dealer's offline thread runs a bounded number of DReLU batches ahead, so a client that
/// keeps at most 1 MiB of material ahead of use completes the session, in batches, with the
/// plaintext predictions (before, the dealer sent an image's whole offline part first, and the
/// client had to keep nearly all of it).
#[test]
fn the_dealer_runs_a_bounded_number_of_batches_ahead() {
    let _rng = common::torch_rng();
    let model = small_model("resnet18-cifar-light", [1, 32, 32], 5);
    let images = random_images(2, [1, 32, 32], 9);
    let tight = LinkConfig {
        max_ahead: 1 << 20,
        ahead_batches: 1,
        ..LinkConfig::default()
    };
    let batched = Settings {
        drelu_batch: 256,
        ..Settings::default()
    };
    let r = run_compare(&model, &images, None, batched, tight).unwrap();
    for im in &r.images {
        check_image(im, "batched");
    }
    assert!(r.client_peak_ahead <= 1 << 20, "{}", r.client_peak_ahead);
    // Batches add message trips: a site of n DReLUs takes ceil(n / 256) x 3 + 1.
    let act = r.layers.iter().find(|l| l.kind == "act").unwrap();
    assert_eq!(act.rounds, act.drelus.div_ceil(256) * 3 + 1, "{act:?}");
}
