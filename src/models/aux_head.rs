//! The parameters and forward pass of a graph's training-only auxiliary head ([`AuxHead`],
//! mmseg's `FCNHead` with one conv). They live in their own `VarStore`, so the network's
//! parameters, its hash, batch-norm folding and secure inference never see them; the trainer
//! adds them to the optimizer and the weights file carries them (mmseg's names) once they
//! were trained or loaded.
use super::graph::AuxHead;
use super::norm::batch_norm;
use super::Model;
use std::collections::HashMap;
use tch::{nn, Device, Tensor};

/// mmseg's name prefix of the auxiliary head's tensors.
pub const PREFIX: &str = "auxiliary_head.";

pub(super) struct AuxParams {
    pub head: AuxHead,
    vs: nn::VarStore,
    /// 3x3 conv weight, no bias.
    conv: Tensor,
    /// Batch norm: weight, bias, running mean, running variance.
    bn: [Tensor; 4],
    /// 1x1 classifier weight and bias.
    seg: [Tensor; 2],
    /// Trained or loaded from a file: only then is it worth saving.
    pub used: bool,
}

impl AuxParams {
    /// mmseg's initialisation: Kaiming (fan out) for the conv, N(0, 0.01) for the classifier.
    pub fn new(head: AuxHead, classes: usize, device: Device) -> AuxParams {
        let vs = nn::VarStore::new(device);
        let root = vs.root() / "auxiliary_head";
        let (c, cin, k) = (
            head.channels as i64,
            head.in_channels as i64,
            classes as i64,
        );
        let conv = (&root / "convs" / "0" / "conv").var(
            "weight",
            &[c, cin, 3, 3],
            nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / (c * 9) as f64).sqrt(),
            },
        );
        let bn_path = &root / "convs" / "0" / "bn";
        let bn = [
            bn_path.var("weight", &[c], nn::Init::Const(1.0)),
            bn_path.var("bias", &[c], nn::Init::Const(0.0)),
            bn_path.zeros_no_train("running_mean", &[c]),
            bn_path.ones_no_train("running_var", &[c]),
        ];
        let seg_path = &root / "conv_seg";
        let seg = [
            seg_path.var(
                "weight",
                &[k, c, 1, 1],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            ),
            seg_path.var("bias", &[k], nn::Init::Const(0.0)),
        ];
        AuxParams {
            head,
            vs,
            conv,
            bn,
            seg,
            used: false,
        }
    }

    /// Parameters and buffers by mmseg name.
    pub fn variables(&self) -> HashMap<String, Tensor> {
        self.vs.variables()
    }

    /// Logits [N, classes, h, w] from the head's input value.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.conv2d(&self.conv, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let [w, b, m, v] = &self.bn;
        let y = batch_norm(&y, [w, b, m, v], train, 1e-5).relu();
        let y = y.feature_dropout(self.head.dropout, train);
        y.conv2d(&self.seg[0], Some(&self.seg[1]), [1, 1], [0, 0], [1, 1], 1)
    }
}

impl Model {
    /// The auxiliary head's parameters and buffers by mmseg name (empty without one).
    pub fn aux_variables(&self) -> HashMap<String, Tensor> {
        self.aux.as_ref().map(|a| a.variables()).unwrap_or_default()
    }

    pub fn has_aux_head(&self) -> bool {
        self.aux.is_some()
    }

    /// Whether the auxiliary head was trained or loaded (then it is saved with the weights).
    pub fn aux_head_used(&self) -> bool {
        self.aux.as_ref().is_some_and(|a| a.used)
    }

    /// Marks the auxiliary head as trained (saved with the weights from now on).
    pub fn set_aux_head_used(&mut self) {
        if let Some(a) = &mut self.aux {
            a.used = true;
        }
    }
}
