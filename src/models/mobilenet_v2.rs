//! MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
//! 2018) with ReLU in place of ReLU6, as the method fine-tunes it.
//!
//! Parameter names follow torchvision (`features.0.0`, `features.3.conv.1.0`, `classifier.1`).
//! Sites follow the mmseg layout (docs/method.md 4): `conv1` (stem), `layer{s}_{b}_{k}` for stage s
//! (1..7) and block b, k = 0 after the expansion 1x1 conv and 1 after the depthwise conv
//! (stage 1 has no expansion: only `layer1_0_0`), and `conv2` for the final 1x1 conv.
use super::graph::{GraphBuilder, Slot};
use super::{ArchConfig, Architecture};

/// (expansion t, output channels c, blocks n, first stride s) per stage, from the paper.
const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

pub struct MobileNetV2;

impl Architecture for MobileNetV2 {
    fn name(&self) -> &'static str {
        "mobilenetv2"
    }

    fn summary(&self) -> &'static str {
        "MobileNetV2 (width 1.0) for ImageNet, ReLU instead of ReLU6"
    }

    fn default_input(&self) -> [usize; 3] {
        [3, 224, 224]
    }

    fn default_classes(&self) -> usize {
        1000
    }

    fn build(&self, g: &mut GraphBuilder, cfg: &ArchConfig) -> Slot {
        let strides = STAGES.map(|s| s.3);
        let (x, cin) = *backbone(g, cfg.input[0], strides, [1; 7])
            .last()
            .expect("seven stages");
        let feature = 1 + STAGES.iter().map(|s| s.2).sum::<usize>();
        let x = g.conv(x, &format!("features.{feature}.0"), cin, 1280, 1, 1);
        let x = g.bn(x, &format!("features.{feature}.1"), 1280);
        let x = g.act(x, "conv2");
        let x = g.global_avg_pool(x);
        g.linear(x, "classifier.1", 1280, cfg.num_classes)
    }

    fn mmlab_name(&self, name: &str) -> Option<String> {
        mmcls_to_torchvision(name)
    }
}

/// The stem and the seven stages of inverted residuals (without the final 1x1 conv), from the
/// graph input, with per-stage first-block strides and dilations. As in mmseg's MobileNetV2,
/// a stage's dilation applies to its first block only (the others use 1). Returns each
/// stage's output slot and channels, in order.
pub(crate) fn backbone(
    g: &mut GraphBuilder,
    in_channels: usize,
    strides: [usize; 7],
    dilations: [usize; 7],
) -> Vec<(Slot, usize)> {
    let x = g.input();
    let x = g.conv(x, "features.0.0", in_channels, 32, 3, 2);
    let x = g.bn(x, "features.0.1", 32);
    let mut x = g.act(x, "conv1");
    let mut cin = 32;
    let mut feature = 1;
    let mut outputs = Vec::with_capacity(STAGES.len());
    for (stage, &(t, c, n, _)) in STAGES.iter().enumerate() {
        for block in 0..n {
            let (stride, dilation) = if block == 0 {
                (strides[stage], dilations[stage])
            } else {
                (1, 1)
            };
            let p = format!("features.{feature}.conv");
            let site = format!("layer{}_{block}", stage + 1);
            x = inverted_residual(g, x, &p, &site, cin, c, t, stride, dilation);
            cin = c;
            feature += 1;
        }
        outputs.push((x, cin));
    }
    outputs
}

fn inverted_residual(
    g: &mut GraphBuilder,
    x: Slot,
    p: &str,
    site: &str,
    cin: usize,
    cout: usize,
    t: usize,
    stride: usize,
    dilation: usize,
) -> Slot {
    let hidden = cin * t;
    let mut h = x;
    let mut i = 0;
    if t != 1 {
        h = g.conv(h, &format!("{p}.0.0"), cin, hidden, 1, 1);
        h = g.bn(h, &format!("{p}.0.1"), hidden);
        h = g.act(h, &format!("{site}_0"));
        i = 1;
    }
    h = g.conv_full(
        h,
        &format!("{p}.{i}.0"),
        hidden,
        hidden,
        3,
        stride,
        dilation,
        hidden,
        false,
    );
    h = g.bn(h, &format!("{p}.{i}.1"), hidden);
    h = g.act(h, &format!("{site}_{i}"));
    h = g.conv(h, &format!("{p}.{}", i + 1), hidden, cout, 1, 1);
    h = g.bn(h, &format!("{p}.{}", i + 2), cout);
    if stride == 1 && cin == cout {
        h = g.add(h, x);
    }
    h
}

/// mmcls MobileNetV2 names -> torchvision names:
/// `backbone.conv1.{conv,bn}` -> `features.0.{0,1}`; `backbone.layer{s}.{b}.conv.{k}.{conv,bn}`
/// -> `features.{f}.conv.{..}` where f counts blocks from 1; `backbone.conv2.{conv,bn}` ->
/// `features.18.{0,1}`; `head.fc` -> `classifier.1`.
pub fn mmcls_to_torchvision(name: &str) -> Option<String> {
    let layer = |conv_bn: &str| match conv_bn {
        "conv" => Some(0),
        "bn" => Some(1),
        _ => None,
    };
    if let Some(rest) = name.strip_prefix("head.fc.") {
        return Some(format!("classifier.1.{rest}"));
    }
    let rest = name.strip_prefix("backbone.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    match parts.as_slice() {
        ["conv1", cb, param] => Some(format!("features.0.{}.{param}", layer(cb)?)),
        ["conv2", cb, param] => Some(format!("features.18.{}.{param}", layer(cb)?)),
        [l, b, "conv", k, cb, param] => {
            let stage: usize = l.strip_prefix("layer")?.parse().ok()?;
            let (t, _, n, _) = *STAGES.get(stage.checked_sub(1)?)?;
            let block: usize = b.parse().ok()?;
            let k: usize = k.parse().ok()?;
            if block >= n {
                return None;
            }
            let feature = 1 + STAGES[..stage - 1].iter().map(|s| s.2).sum::<usize>() + block;
            let cb = layer(cb)?;
            // Convs with an activation are (conv, bn) pairs; the last (projection) conv and its
            // bn are flat entries.
            let with_act = if t == 1 { 1 } else { 2 };
            let tv = if k < with_act {
                format!("{k}.{cb}")
            } else {
                format!("{}", with_act + cb)
            };
            Some(format!("features.{feature}.conv.{tv}.{param}"))
        }
        _ => None,
    }
}
