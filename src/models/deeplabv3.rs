//! DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
//! 2017) as configured in mmsegmentation, on two dilated backbones at output stride 8:
//!
//! - `deeplabv3-mobilenetv2` (mmseg `mobilenet-v2-d8_deeplabv3`, ADE20K, 150 classes):
//!   MobileNetV2 with first-block strides (1, 2, 2, 1, 1, 1, 1) and dilations
//!   (1, 1, 1, 2, 2, 4, 4) per stage (mmseg dilates only a stage's first block), ReLU for
//!   ReLU6, no final 1280-channel conv; the head reads the 320-channel stage-7 output.
//! - `deeplabv3-resnet50-d8` (mmseg `deeplabv3_r50-d8`, VOC, 21 classes): ResNetV1c-50 with
//!   the deep stem (3x3 convs 32, 32, 64) and a 3x3/2 average pool in place of its max pool,
//!   stage strides (1, 2, 1, 1), dilations (1, 1, 2, 4) with mmseg's contracted first dilation
//!   (the first block of stage 3 uses 1, of stage 4 uses 2).
//!
//! The ASPP head (mmseg `ASPPHead`, 512 channels for both, dilations (1, 12, 24, 36)):
//! image pooling (global average pool -> 1x1 conv -> BN -> ReLU -> bilinear resize back, a
//! broadcast), a 1x1 branch and three dilated 3x3 branches (each conv -> BN -> ReLU),
//! concatenated in that order, a 3x3 projection ("bottleneck") conv -> BN -> ReLU, channel
//! dropout 0.1 (training only), and the 1x1 classifier `conv_seg` with bias. Every ReLU is a
//! site: the backbone's (`conv1`, `layer{s}_{b}_{k}` / `stem_0`..`stem_2`,
//! `layer{i}_{j}_{k}`) and `decode_0` (image pooling), `decode_1` (1x1), `decode_2`..`decode_4`
//! (dilations 12, 24, 36), `decode_5` (bottleneck).
//!
//! The graph output is the decoder logits at 1/8 of the input, [N, K, H', W'] with H', W' as
//! the strided convs round (ceil(H/8) for these strides). The data and training side resizes
//! them bilinearly to the label size for the loss and the metric; nothing here does.
//!
//! Parameter names: the backbone keeps its torchvision-style names (MobileNetV2
//! `features.{f}...`, ResNet `layer{i}.{j}...`, deep stem `stem.{0,1,3,4,6,7}`), the head
//! uses mmseg's names (`decode_head.image_pool.1.conv`, `decode_head.aspp_modules.{i}.bn`,
//! `decode_head.bottleneck.conv`, `decode_head.conv_seg`). An mmseg checkpoint maps by
//! [`Architecture::mmlab_name`].
//!
//! The auxiliary FCN head of the published configs (mmseg `FCNHead`, `_base_/models/
//! deeplabv3_r50-d8.py`: in_index 2, channels 256, one 3x3 conv, dropout 0.1, loss weight 0.4)
//! is declared on the graph ([`AuxHead`]) but is not part of the network: it reads the
//! stage-3 output of the ResNet (1024 channels) or, with mmseg's MobileNetV2 `out_indices`
//! (1, 2, 4, 6), the 96-channel stage-5 output, trains beside the decode head when a training
//! configuration sets `aux_loss_weight`, and is never a site or run at inference. Its
//! checkpoint tensors keep mmseg's names (`auxiliary_head.convs.0.conv`, `.convs.0.bn`,
//! `.conv_seg`).
use super::graph::{AuxHead, GraphBuilder, Slot};
use super::mobilenet_v2;
use super::resnet::{RESNET50_D8, RESNET50_D8_COUNTPAD};
use super::{ArchConfig, Architecture};

/// The backbone under the ASPP head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backbone {
    MobileNetV2D8,
    /// `count_pad`: the stem average pool counts the padding (PyTorch's default).
    ResNet50D8 {
        count_pad: bool,
    },
}

pub struct DeepLabV3 {
    pub name: &'static str,
    pub summary: &'static str,
    pub backbone: Backbone,
    /// Channels of every ASPP branch and of the projection.
    pub channels: usize,
    /// Dilations of the ASPP conv branches; 1 means the 1x1 branch.
    pub dilations: [usize; 4],
    /// Channel-dropout probability before the classifier (training only).
    pub dropout: f64,
    pub input: [usize; 3],
    pub classes: usize,
    /// The backbone stage (0-based) the auxiliary head reads (mmseg: `in_index` into the
    /// backbone's `out_indices`).
    pub aux_stage: usize,
    /// Channels of the auxiliary head's conv.
    pub aux_channels: usize,
}

pub const DEEPLABV3_MOBILENETV2: DeepLabV3 = DeepLabV3 {
    name: "deeplabv3-mobilenetv2",
    summary: "DeepLabV3 (ASPP) on MobileNetV2-D8, ReLU instead of ReLU6 (mmseg, ADE20K)",
    backbone: Backbone::MobileNetV2D8,
    channels: 512,
    dilations: [1, 12, 24, 36],
    dropout: 0.1,
    input: [3, 512, 512],
    classes: 150,
    // out_indices (1, 2, 4, 6), in_index 2: the 96-channel stage.
    aux_stage: 4,
    aux_channels: 256,
};

pub const DEEPLABV3_RESNET50_D8: DeepLabV3 = DeepLabV3 {
    name: "deeplabv3-resnet50-d8",
    summary: "DeepLabV3 (ASPP) on ResNetV1c-50-D8, avg-pool stem (mmseg, VOC)",
    backbone: Backbone::ResNet50D8 { count_pad: false },
    classes: 21,
    aux_stage: 2,
    ..DEEPLABV3_MOBILENETV2
};

/// `deeplabv3-resnet50-d8` whose stem pool counts the padding, as the published
/// `AvgPoolResNetSeg` (`nn.AvgPool2d(3, 2, 1)`); same parameters and sites.
pub const DEEPLABV3_RESNET50_D8_COUNTPAD: DeepLabV3 = DeepLabV3 {
    name: "deeplabv3-resnet50-d8-countpad",
    summary: "deeplabv3-resnet50-d8 whose stem pool counts the padding (PyTorch's default)",
    backbone: Backbone::ResNet50D8 { count_pad: true },
    ..DEEPLABV3_RESNET50_D8
};

impl Architecture for DeepLabV3 {
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
        let stages = match self.backbone {
            Backbone::MobileNetV2D8 => mobilenet_v2::backbone(
                g,
                cfg.input[0],
                [1, 2, 2, 1, 1, 1, 1],
                [1, 1, 1, 2, 2, 4, 4],
            ),
            Backbone::ResNet50D8 { count_pad: false } => RESNET50_D8.trunk(g, cfg.input[0]),
            Backbone::ResNet50D8 { count_pad: true } => RESNET50_D8_COUNTPAD.trunk(g, cfg.input[0]),
        };
        let (input, in_channels) = stages[self.aux_stage];
        g.aux_head(AuxHead {
            input,
            in_channels,
            channels: self.aux_channels,
            dropout: self.dropout,
        });
        let (x, cin) = *stages.last().expect("backbone stages");
        self.aspp_head(g, x, cin, cfg.num_classes)
    }

    fn mmlab_name(&self, name: &str) -> Option<String> {
        if name.starts_with("decode_head.") {
            return Some(name.to_string());
        }
        let rest = name.strip_prefix("backbone.")?;
        match self.backbone {
            Backbone::MobileNetV2D8 => mobilenet_v2::mmcls_to_torchvision(name),
            Backbone::ResNet50D8 { .. } => Some(rest.to_string()),
        }
    }

    /// The auxiliary head's tensors load into the model's auxiliary head where it has one
    /// ([`Model`](super::Model)), and are skipped otherwise.
    fn ignores_tensor(&self, name: &str) -> bool {
        name.starts_with(super::aux_head::PREFIX)
    }
}

impl DeepLabV3 {
    fn conv_bn_act(
        &self,
        g: &mut GraphBuilder,
        x: Slot,
        p: &str,
        cin: usize,
        k: usize,
        dilation: usize,
        site: &str,
    ) -> Slot {
        let c = self.channels;
        let y = g.conv_full(x, &format!("{p}.conv"), cin, c, k, 1, dilation, 1, false);
        let y = g.bn(y, &format!("{p}.bn"), c);
        g.act(y, site)
    }

    fn aspp_head(&self, g: &mut GraphBuilder, x: Slot, cin: usize, classes: usize) -> Slot {
        let pooled = g.global_avg_pool_keepdim(x);
        let pooled = self.conv_bn_act(g, pooled, "decode_head.image_pool.1", cin, 1, 1, "decode_0");
        let mut branches = vec![g.resize_like(pooled, x)];
        for (i, &d) in self.dilations.iter().enumerate() {
            let k = if d == 1 { 1 } else { 3 };
            let p = format!("decode_head.aspp_modules.{i}");
            branches.push(self.conv_bn_act(g, x, &p, cin, k, d, &format!("decode_{}", i + 1)));
        }
        let cat = g.concat(&branches);
        let n = branches.len() * self.channels;
        let y = self.conv_bn_act(g, cat, "decode_head.bottleneck", n, 3, 1, "decode_5");
        let y = g.dropout2d(y, self.dropout);
        g.conv_full(
            y,
            "decode_head.conv_seg",
            self.channels,
            classes,
            1,
            1,
            1,
            1,
            true,
        )
    }
}
