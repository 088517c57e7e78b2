//! ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016).
//!
//! Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
//! `fc`), so a torchvision state dict saved as safetensors loads as is. Sites (docs/method.md 4):
//! `stem`, then `layer{i}_{j}_{k}`: k = 1, 2 after the block's first convs and the last k after
//! the residual add. ResNet50 uses torchvision's v1.5 Bottleneck (stride on the 3x3 conv).
//! Strides and dilations per stage and mmseg's deep stem are parameters, so the dilated
//! ResNet50-D8 backbone of DeepLabV3 (`deeplabv3.rs`) is the same code.
use super::graph::{GraphBuilder, Slot};
use super::{ArchConfig, Architecture};

/// Stem of a ResNet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stem {
    /// CIFAR stem: 3x3 conv with the given stride, no pooling.
    Cifar { stride: usize },
    /// ImageNet stem: 7x7/2 conv, then a 3x3/2 max pool.
    MaxPool,
    /// ImageNet stem with the max pool swapped for a 3x3/2 average pool (cheap to evaluate on
    /// secret shares). `count_pad`: the pool divides by 9 everywhere, padding counted
    /// (`nn.AvgPool2d`'s default `count_include_pad=True`, as the published avg-pool networks
    /// were trained and run), else by the in-bounds pixels (4 or 6 on the border).
    AvgPool { count_pad: bool },
    /// mmseg's ResNetV1c deep stem: three 3x3 convs (32/2, 32, 64 channels, parameters
    /// `stem.{0,1}`, `stem.{3,4}`, `stem.{6,7}` as in mmseg's `nn.Sequential`, sites `stem_0`,
    /// `stem_1`, `stem_2`), then a 3x3/2 average pool in place of mmseg's max pool (divisor as
    /// for `AvgPool`).
    DeepAvgPool { count_pad: bool },
}

/// A ResNet of BasicBlocks (expansion 1) or Bottlenecks (expansion 4).
pub struct ResNet {
    pub name: &'static str,
    pub summary: &'static str,
    pub blocks: [usize; 4],
    pub bottleneck: bool,
    pub base: usize,
    pub stem: Stem,
    /// Stride of each stage's first block (torchvision: 1, 2, 2, 2).
    pub strides: [usize; 4],
    /// Dilation of each stage's 3x3 convs (1 = none). With `contract_dilation` (mmseg), a
    /// dilated stage's first block uses half the dilation.
    pub dilations: [usize; 4],
    pub contract_dilation: bool,
    pub input: [usize; 3],
    pub classes: usize,
}

pub const RESNET18_CIFAR: ResNet = ResNet {
    name: "resnet18-cifar",
    summary: "ResNet18 for 32x32 images (3x3 stride-1 stem, no max-pool)",
    blocks: [2, 2, 2, 2],
    bottleneck: false,
    base: 64,
    stem: Stem::Cifar { stride: 1 },
    strides: [1, 2, 2, 2],
    dilations: [1; 4],
    contract_dilation: false,
    input: [3, 32, 32],
    classes: 100,
};

pub const RESNET18_CIFAR_LIGHT: ResNet = ResNet {
    name: "resnet18-cifar-light",
    summary: "lightweight ResNet18 for 32x32 images (32 base channels, stride-2 stem)",
    base: 32,
    stem: Stem::Cifar { stride: 2 },
    ..RESNET18_CIFAR
};

pub const RESNET50: ResNet = ResNet {
    name: "resnet50",
    summary: "ResNet50 for ImageNet (torchvision v1.5, 7x7 stem + 3x3/2 max-pool)",
    blocks: [3, 4, 6, 3],
    bottleneck: true,
    base: 64,
    stem: Stem::MaxPool,
    strides: [1, 2, 2, 2],
    dilations: [1; 4],
    contract_dilation: false,
    input: [3, 224, 224],
    classes: 1000,
};

pub const RESNET50_AVGPOOL: ResNet = ResNet {
    name: "resnet50-avgpool",
    summary: "ResNet50 with the stem max-pool replaced by a 3x3/2 average pool",
    stem: Stem::AvgPool { count_pad: false },
    ..RESNET50
};

/// `resnet50-avgpool` with the published divisor: padding counted, as PyTorch's
/// `nn.AvgPool2d(3, 2, 1)` in the published `AvgPoolResNet`, so its checkpoints give the same
/// outputs. Same parameters and sites.
pub const RESNET50_AVGPOOL_COUNTPAD: ResNet = ResNet {
    name: "resnet50-avgpool-countpad",
    summary: "resnet50-avgpool whose stem pool counts the padding (PyTorch's default divisor)",
    stem: Stem::AvgPool { count_pad: true },
    ..RESNET50
};

/// mmseg's ResNetV1c-50 at output stride 8 (the backbone of `deeplabv3-resnet50-d8`): deep
/// stem, stages 3 and 4 dilated by 2 and 4 instead of strided, contracted first dilations
/// (`contract_dilation=True` in mmseg's r50-d8 configs). Not a classifier of its own.
pub const RESNET50_D8: ResNet = ResNet {
    name: "resnet50-d8",
    summary: "dilated ResNetV1c-50 backbone (output stride 8)",
    stem: Stem::DeepAvgPool { count_pad: false },
    strides: [1, 2, 1, 1],
    dilations: [1, 1, 2, 4],
    contract_dilation: true,
    ..RESNET50
};

/// [`RESNET50_D8`] whose stem pool counts the padding (the published `AvgPoolResNetSeg`).
pub const RESNET50_D8_COUNTPAD: ResNet = ResNet {
    name: "resnet50-d8-countpad",
    stem: Stem::DeepAvgPool { count_pad: true },
    ..RESNET50_D8
};

impl Architecture for ResNet {
    fn name(&self) -> &'static str {
        self.name
    }

    fn summary(&self) -> &'static str {
        self.summary
    }

    fn default_input(&self) -> [usize; 3] {
        self.input
    }

    fn default_classes(&self) -> usize {
        self.classes
    }

    fn build(&self, g: &mut GraphBuilder, cfg: &ArchConfig) -> Slot {
        let (x, channels) = *self.trunk(g, cfg.input[0]).last().expect("four stages");
        let x = g.global_avg_pool(x);
        g.linear(x, "fc", channels, cfg.num_classes)
    }

    fn mmlab_name(&self, name: &str) -> Option<String> {
        // mmcls: `backbone.<torchvision name>` for the trunk, `head.fc.*` for the classifier.
        name.strip_prefix("backbone.")
            .map(str::to_string)
            .or_else(|| name.strip_prefix("head.").map(str::to_string))
    }
}

impl ResNet {
    /// Stem and the four stages, from the graph input; returns each stage's output slot and
    /// channels, in order.
    pub(crate) fn trunk(&self, g: &mut GraphBuilder, cin: usize) -> Vec<(Slot, usize)> {
        let x = g.input();
        let mut x = match self.stem {
            Stem::Cifar { stride } => {
                let x = g.conv(x, "conv1", cin, self.base, 3, stride);
                let x = g.bn(x, "bn1", self.base);
                g.act(x, "stem")
            }
            Stem::MaxPool | Stem::AvgPool { .. } => {
                let x = g.conv(x, "conv1", cin, self.base, 7, 2);
                let x = g.bn(x, "bn1", self.base);
                g.act(x, "stem")
            }
            Stem::DeepAvgPool { .. } => {
                let half = self.base / 2;
                let mut x = x;
                let mut c = cin;
                for (i, (out, stride)) in [(half, 2), (half, 1), (self.base, 1)]
                    .into_iter()
                    .enumerate()
                {
                    x = g.conv(x, &format!("stem.{}", 3 * i), c, out, 3, stride);
                    x = g.bn(x, &format!("stem.{}", 3 * i + 1), out);
                    x = g.act(x, &format!("stem_{i}"));
                    c = out;
                }
                x
            }
        };
        x = match self.stem {
            Stem::Cifar { .. } => x,
            Stem::MaxPool => g.max_pool(x, 3, 2, 1),
            Stem::AvgPool { count_pad } | Stem::DeepAvgPool { count_pad } => {
                g.avg_pool_divisor(x, 3, 2, 1, count_pad)
            }
        };
        let expansion = if self.bottleneck { 4 } else { 1 };
        let mut channels = self.base;
        let mut outputs = Vec::with_capacity(self.blocks.len());
        for (stage, &n) in self.blocks.iter().enumerate() {
            let width = self.base << stage;
            let d = self.dilations[stage];
            for block in 0..n {
                let stride = if block == 0 { self.strides[stage] } else { 1 };
                let dilation = if block == 0 && self.contract_dilation && d > 1 {
                    d / 2
                } else {
                    d
                };
                let names = BlockNames {
                    params: format!("layer{}.{block}", stage + 1),
                    site: format!("layer{}_{block}", stage + 1),
                };
                x = if self.bottleneck {
                    bottleneck(g, x, &names, channels, width, stride, dilation)
                } else {
                    basic_block(g, x, &names, channels, width, stride, dilation)
                };
                channels = width * expansion;
            }
            outputs.push((x, channels));
        }
        outputs
    }
}

struct BlockNames {
    params: String,
    site: String,
}

/// The residual branch input, with the 1x1 projection when the shape changes. Emitted before
/// the block's first conv so that only its result (not the block input) is live across the
/// block's sites.
fn shortcut(
    g: &mut GraphBuilder,
    x: Slot,
    n: &BlockNames,
    cin: usize,
    cout: usize,
    stride: usize,
) -> Slot {
    if stride == 1 && cin == cout {
        return x;
    }
    let p = &n.params;
    let s = g.conv(x, &format!("{p}.downsample.0"), cin, cout, 1, stride);
    g.bn(s, &format!("{p}.downsample.1"), cout)
}

fn basic_block(
    g: &mut GraphBuilder,
    x: Slot,
    n: &BlockNames,
    cin: usize,
    width: usize,
    stride: usize,
    dilation: usize,
) -> Slot {
    let (p, s) = (&n.params, &n.site);
    let sc = shortcut(g, x, n, cin, width, stride);
    let conv3 = |g: &mut GraphBuilder, x: Slot, name: &str, cin: usize, stride: usize| {
        g.conv_full(x, name, cin, width, 3, stride, dilation, 1, false)
    };
    let h = conv3(g, x, &format!("{p}.conv1"), cin, stride);
    let h = g.bn(h, &format!("{p}.bn1"), width);
    let h = g.act(h, &format!("{s}_1"));
    let h = conv3(g, h, &format!("{p}.conv2"), width, 1);
    let h = g.bn(h, &format!("{p}.bn2"), width);
    let h = g.add(h, sc);
    g.act(h, &format!("{s}_2"))
}

fn bottleneck(
    g: &mut GraphBuilder,
    x: Slot,
    n: &BlockNames,
    cin: usize,
    width: usize,
    stride: usize,
    dilation: usize,
) -> Slot {
    let (p, s) = (&n.params, &n.site);
    let cout = width * 4;
    let sc = shortcut(g, x, n, cin, cout, stride);
    let h = g.conv(x, &format!("{p}.conv1"), cin, width, 1, 1);
    let h = g.bn(h, &format!("{p}.bn1"), width);
    let h = g.act(h, &format!("{s}_1"));
    let h = g.conv_full(
        h,
        &format!("{p}.conv2"),
        width,
        width,
        3,
        stride,
        dilation,
        1,
        false,
    );
    let h = g.bn(h, &format!("{p}.bn2"), width);
    let h = g.act(h, &format!("{s}_2"));
    let h = g.conv(h, &format!("{p}.conv3"), width, cout, 1, 1);
    let h = g.bn(h, &format!("{p}.bn3"), cout);
    let h = g.add(h, sc);
    g.act(h, &format!("{s}_3"))
}
