//! The average pool's divisor: padding counted (`count_include_pad=True`, PyTorch's default,
//! the published avg-pool networks) or in-bounds pixels only, in plaintext against tch and in
//! secure inference against the float model; the `-countpad` stems keep their models'
//! parameters and sites.
use crate::common;
use brelu::models::{find, ArchConfig, Architecture, GraphBuilder, Model, Slot};
use brelu::secure::{run_compare, LinkConfig, Settings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

/// A 3x3/2 average pool with padding 1, then (with `gap`) a global average pool to [N, C]
/// logits.
struct Pool {
    count_pad: bool,
    gap: bool,
}

impl Architecture for Pool {
    fn name(&self) -> &'static str {
        "pool"
    }
    fn summary(&self) -> &'static str {
        "test network"
    }
    fn default_input(&self) -> [usize; 3] {
        [4, 7, 6]
    }
    fn default_classes(&self) -> usize {
        4
    }
    fn build(&self, g: &mut GraphBuilder, _cfg: &ArchConfig) -> Slot {
        let x = g.input();
        let y = g.avg_pool_divisor(x, 3, 2, 1, self.count_pad);
        if self.gap {
            g.global_avg_pool(y)
        } else {
            y
        }
    }
    fn mmlab_name(&self, _name: &str) -> Option<String> {
        None
    }
}

static POOLS: [Pool; 4] = [
    Pool {
        count_pad: false,
        gap: false,
    },
    Pool {
        count_pad: true,
        gap: false,
    },
    Pool {
        count_pad: false,
        gap: true,
    },
    Pool {
        count_pad: true,
        gap: true,
    },
];

fn model(p: &'static Pool, input: [usize; 3]) -> Model {
    let cfg = ArchConfig {
        input,
        num_classes: 4,
    };
    Model::new(p, cfg, Device::Cpu).unwrap()
}

#[test]
fn avg_pool_divisor_matches_tch_both_ways() {
    let _rng = common::torch_rng();
    tch::manual_seed(11);
    let x = Tensor::randn([2, 4, 7, 6], tch::kind::FLOAT_CPU);
    let _g = tch::no_grad_guard();
    let mut outs = Vec::new();
    for p in &POOLS[..2] {
        let y = model(p, [4, 7, 6]).forward_t(&x, false);
        let want = x.avg_pool2d([3, 3], [2, 2], [1, 1], false, p.count_pad, None);
        assert_eq!(y.size(), want.size());
        let err = (&y - &want).abs().max().double_value(&[]);
        assert!(err < 1e-6, "count_pad {}: error {err}", p.count_pad);
        outs.push(y);
    }
    // The corner window holds 4 of 9 pixels: the two divisors differ by 9/4 there.
    let ratio = outs[0].get(0).get(0).get(0).get(0).double_value(&[])
        / outs[1].get(0).get(0).get(0).get(0).double_value(&[]);
    assert!((ratio - 9.0 / 4.0).abs() < 1e-4, "{ratio}");
    // Interior windows agree.
    let d = (outs[0].get(0).get(0).get(1).get(1) - outs[1].get(0).get(0).get(1).get(1)).abs();
    assert!(d.double_value(&[]) < 1e-6);
}

#[test]
fn secure_avg_pool_uses_the_ops_divisor() {
    let _rng = common::torch_rng();
    let input = [4, 6, 6];
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    // Positive pixels, so the border windows' divisors move every logit the same way.
    let images: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..4 * 36).map(|_| rng.gen_range(2.0f32..6.0)).collect())
        .collect();
    let mut float = Vec::new();
    for p in &POOLS[2..] {
        let m = model(p, input);
        let r = run_compare(
            &m,
            &images,
            None,
            Settings::default(),
            LinkConfig::default(),
        )
        .unwrap();
        for im in &r.images {
            let e = im.max_float_error.unwrap();
            assert!(e < 0.01, "count_pad {}: secure - float {e}", p.count_pad);
        }
        let x = Tensor::from_slice(&images.concat()).reshape([2, 4, 6, 6]);
        float.push(tch::no_grad(|| m.forward_t(&x, false)).to_kind(Kind::Double));
    }
    // The two divisors give logits far apart compared with the secure error.
    let gap = (&float[0] - &float[1]).abs().min().double_value(&[]);
    assert!(gap > 0.3, "divisors differ by only {gap}");
}

#[test]
fn countpad_variants_share_parameters_and_sites() {
    let _rng = common::torch_rng();
    let tmp = tempfile::tempdir().unwrap();
    for (a, b, input) in [
        ("resnet50-avgpool", "resnet50-avgpool-countpad", [3, 32, 32]),
        (
            "deeplabv3-resnet50-d8",
            "deeplabv3-resnet50-d8-countpad",
            [3, 32, 32],
        ),
    ] {
        let build = |name: &str| {
            tch::manual_seed(4);
            let cfg = ArchConfig {
                input,
                num_classes: 5,
            };
            Model::new(find(name).unwrap(), cfg, Device::Cpu).unwrap()
        };
        let (ma, mut mb) = (build(a), build(b));
        assert_eq!(ma.sites(), mb.sites(), "{b}");
        let shapes = |m: &Model| {
            let mut v: Vec<(String, Vec<i64>)> = m
                .var_store()
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(shapes(&ma), shapes(&mb), "{b}");
        // a's weights load into b unchanged; only the stem pool's border differs.
        let w = tmp.path().join(format!("{a}.safetensors"));
        ma.save_weights(&w).unwrap();
        mb.load_weights(&w).unwrap();
        let x = Tensor::rand(
            [1, 3, input[1] as i64, input[2] as i64],
            tch::kind::FLOAT_CPU,
        );
        let _g = tch::no_grad_guard();
        let d = (ma.forward_t(&x, false) - mb.forward_t(&x, false))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d > 1e-4, "{b}: the stem pool's divisor changed nothing");
    }
}
