//! ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016).
//!
//! Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
//! `fc`), so a torchvision state dict saved as safetensors loads as is. Sites (SPEC.md 4):
//! `stem`, then `layer{i}_{j}_{k}`: k = 1, 2 after the block's first convs and the last k after
//! the residual add. ResNet50 uses torchvision's v1.5 Bottleneck (stride on the 3x3 conv).
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
    /// secret shares).
    AvgPool,
}

/// A ResNet of BasicBlocks (expansion 1) or Bottlenecks (expansion 4).
pub struct ResNet {
    pub name: &'static str,
    pub summary: &'static str,
    pub blocks: [usize; 4],
    pub bottleneck: bool,
    pub base: usize,
    pub stem: Stem,
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
    input: [3, 224, 224],
    classes: 1000,
};

pub const RESNET50_AVGPOOL: ResNet = ResNet {
    name: "resnet50-avgpool",
    summary: "ResNet50 with the stem max-pool replaced by a 3x3/2 average pool",
    stem: Stem::AvgPool,
    ..RESNET50
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
        let cin = cfg.input[0];
        let x = g.input();
        let mut x = match self.stem {
            Stem::Cifar { stride } => g.conv(x, "conv1", cin, self.base, 3, stride),
            Stem::MaxPool | Stem::AvgPool => g.conv(x, "conv1", cin, self.base, 7, 2),
        };
        x = g.bn(x, "bn1", self.base);
        x = g.act(x, "stem");
        x = match self.stem {
            Stem::Cifar { .. } => x,
            Stem::MaxPool => g.max_pool(x, 3, 2, 1),
            Stem::AvgPool => g.avg_pool(x, 3, 2, 1),
        };
        let expansion = if self.bottleneck { 4 } else { 1 };
        let mut channels = self.base;
        for (stage, &n) in self.blocks.iter().enumerate() {
            let width = self.base << stage;
            for block in 0..n {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                let names = BlockNames {
                    params: format!("layer{}.{block}", stage + 1),
                    site: format!("layer{}_{block}", stage + 1),
                };
                x = if self.bottleneck {
                    bottleneck(g, x, &names, channels, width, stride)
                } else {
                    basic_block(g, x, &names, channels, width, stride)
                };
                channels = width * expansion;
            }
        }
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
) -> Slot {
    let (p, s) = (&n.params, &n.site);
    let sc = shortcut(g, x, n, cin, width, stride);
    let h = g.conv(x, &format!("{p}.conv1"), cin, width, 3, stride);
    let h = g.bn(h, &format!("{p}.bn1"), width);
    let h = g.act(h, &format!("{s}_1"));
    let h = g.conv(h, &format!("{p}.conv2"), width, width, 3, 1);
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
) -> Slot {
    let (p, s) = (&n.params, &n.site);
    let cout = width * 4;
    let sc = shortcut(g, x, n, cin, cout, stride);
    let h = g.conv(x, &format!("{p}.conv1"), cin, width, 1, 1);
    let h = g.bn(h, &format!("{p}.bn1"), width);
    let h = g.act(h, &format!("{s}_1"));
    let h = g.conv(h, &format!("{p}.conv2"), width, width, 3, stride);
    let h = g.bn(h, &format!("{p}.bn2"), width);
    let h = g.act(h, &format!("{s}_2"));
    let h = g.conv(h, &format!("{p}.conv3"), width, cout, 1, 1);
    let h = g.bn(h, &format!("{p}.bn3"), cout);
    let h = g.add(h, sc);
    g.act(h, &format!("{s}_3"))
}
