//! What all three parties know: the network as a list of ring layers (shapes, convolution
//! geometry, pooling windows, the per-channel block-ReLU layout of every site), plus what only
//! the server knows: the fixed-point weights with batch norm folded into the convolutions.
//! Also the plaintext fixed-point forward pass that secure results are checked against.
//!
//! Files: [`geometry`] (site layouts, pooling windows, resizes), [`lower`] (model to plan),
//! [`oracle`] (the plaintext forward pass).
mod geometry;
mod lower;
mod oracle;

pub use geometry::{reciprocal, ActPlan, Interp, Windows, AVG_SHIFT};
pub use oracle::{argmax, forward_fixed};

use super::gemm::ConvGeom;
use super::ring::Fixed;
use crate::error::{Error, Result};
use crate::models::Slot;

/// One layer of the ring network (one op of the folded graph).
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    Conv {
        x: Slot,
        y: Slot,
        geom: ConvGeom,
    },
    Linear {
        x: Slot,
        y: Slot,
        cin: usize,
        cout: usize,
    },
    Act {
        x: Slot,
        y: Slot,
        site: usize,
        act: ActPlan,
    },
    Add {
        a: Slot,
        b: Slot,
        y: Slot,
    },
    MaxPool {
        x: Slot,
        y: Slot,
        win: Windows,
    },
    AvgPool {
        x: Slot,
        y: Slot,
        win: Windows,
    },
    GlobalAvgPool {
        x: Slot,
        y: Slot,
        c: usize,
        hw: usize,
    },
    /// Channel concatenation (local: the shares are concatenated).
    Concat {
        xs: Vec<Slot>,
        y: Slot,
    },
    /// Bilinear resize (local: a public linear map).
    Resize {
        x: Slot,
        y: Slot,
        interp: Interp,
    },
}

impl Layer {
    /// Short name for tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Conv { .. } => "conv",
            Layer::Linear { .. } => "linear",
            Layer::Act { .. } => "act",
            Layer::Add { .. } => "add",
            Layer::MaxPool { .. } => "maxpool",
            Layer::AvgPool { .. } => "avgpool",
            Layer::GlobalAvgPool { .. } => "gap",
            Layer::Concat { .. } => "concat",
            Layer::Resize { .. } => "resize",
        }
    }

    /// Slots this layer reads.
    pub fn inputs(&self) -> Vec<Slot> {
        match self {
            Layer::Add { a, b, .. } => vec![*a, *b],
            Layer::Concat { xs, .. } => xs.clone(),
            Layer::Conv { x, .. }
            | Layer::Linear { x, .. }
            | Layer::Act { x, .. }
            | Layer::MaxPool { x, .. }
            | Layer::AvgPool { x, .. }
            | Layer::GlobalAvgPool { x, .. }
            | Layer::Resize { x, .. } => vec![*x],
        }
    }

    /// The slot this layer writes.
    pub fn output(&self) -> Slot {
        match self {
            Layer::Conv { y, .. }
            | Layer::Linear { y, .. }
            | Layer::Act { y, .. }
            | Layer::Add { y, .. }
            | Layer::MaxPool { y, .. }
            | Layer::AvgPool { y, .. }
            | Layer::GlobalAvgPool { y, .. }
            | Layer::Concat { y, .. }
            | Layer::Resize { y, .. } => *y,
        }
    }

    /// Elements of the weight of a linear layer (0 for others).
    pub fn weight_len(&self) -> usize {
        match self {
            Layer::Conv { geom, .. } => geom.weight_len(),
            Layer::Linear { cin, cout, .. } => cin * cout,
            _ => 0,
        }
    }
}

/// Protocol settings every party must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub fixed: Fixed,
    /// How a DReLU is computed.
    pub drelu: DreluProtocol,
    /// DReLUs computed together: a larger site runs in batches of this many, which bounds the
    /// memory of every party (and the dealer's lead) whatever the model's size.
    pub drelu_batch: usize,
    /// Bits compared by a DReLU: 64 = exact; fewer = approximate window.
    pub drelu_bits: u32,
    /// For an approximate DReLU: the largest |value| (in real units, as a power of two) the
    /// window covers; the low bits below the window are dropped.
    pub drelu_range_bits: u32,
    /// The server's policy: the client learns only each image's arg-max, never the logits.
    /// Part of the session hash (every party must agree before any data flows) and checked
    /// again on every image by the server and the dealer.
    pub argmax_only: bool,
}

/// The DReLU protocol (docs/method.md 8.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DreluProtocol {
    /// One PrivateCompare on the low k-1 bits of a dealer mask whose bits are shared
    /// (MSB extraction as in Falcon): 3 message trips, 221 bytes at k = 64.
    Msb,
    /// SecureNN's ShareConvert + ComputeMSB, two PrivateCompares (the published protocol):
    /// 6 message trips, 456 bytes at k = 64.
    ShareConvert,
}

impl DreluProtocol {
    pub fn name(self) -> &'static str {
        match self {
            DreluProtocol::Msb => "msb",
            DreluProtocol::ShareConvert => "share-convert",
        }
    }

    pub fn parse(s: &str) -> Option<DreluProtocol> {
        [DreluProtocol::Msb, DreluProtocol::ShareConvert]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// DReLUs computed together by default ([`Settings::drelu_batch`], and the CLI's).
pub const DEFAULT_DRELU_BATCH: usize = 1 << 20;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            fixed: Fixed::default(),
            drelu: DreluProtocol::Msb,
            drelu_batch: DEFAULT_DRELU_BATCH,
            drelu_bits: 64,
            drelu_range_bits: 12,
            argmax_only: false,
        }
    }
}

impl Settings {
    /// Low bits dropped before an approximate DReLU: the window [shift, shift + bits) must hold
    /// |value| < 2^(frac + range) with two bits to spare.
    pub fn drelu_shift(&self) -> u32 {
        if self.drelu_bits >= 64 {
            0
        } else {
            (self.fixed.frac + self.drelu_range_bits + 2).saturating_sub(self.drelu_bits)
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(4..=64).contains(&self.drelu_bits) {
            return Err(Error::InvalidArgument(format!(
                "--drelu-bits must be in 4..=64, got {}",
                self.drelu_bits
            )));
        }
        if !(1..=30).contains(&self.fixed.frac) {
            return Err(Error::InvalidArgument(format!(
                "fractional bits must be in 1..=30, got {}",
                self.fixed.frac
            )));
        }
        if self.drelu_batch == 0 {
            return Err(Error::InvalidArgument(
                "--drelu-batch must be at least 1".into(),
            ));
        }
        // The window's top, frac + range + 2 bits, must stay inside the 64-bit ring with room
        // for a patch sum's extra bits; a larger value would shift by 64 or more.
        let most = 60 - self.fixed.frac;
        if !(1..=most).contains(&self.drelu_range_bits) {
            return Err(Error::InvalidArgument(format!(
                "--drelu-range-bits must be in 1..={most} with {} fractional bits, got {}",
                self.fixed.frac, self.drelu_range_bits
            )));
        }
        Ok(())
    }
}

/// The public description of a network for secure inference.
#[derive(Clone, Debug)]
pub struct Plan {
    pub model: String,
    pub input: [usize; 3],
    pub classes: usize,
    pub slots: usize,
    pub output: Slot,
    /// Elements of the output of one image: `classes` for a classifier, classes x H x W for
    /// a segmentation model's logit map.
    pub outputs: usize,
    pub layers: Vec<Layer>,
    /// Per layer, a name for tables (parameter name or site name).
    pub names: Vec<String>,
    pub settings: Settings,
}

/// The server's private weights: per layer, (weight, bias) in fixed point.
pub struct Weights {
    pub layers: Vec<Option<(Vec<u64>, Vec<u64>)>>,
}

impl Plan {
    /// A hash of everything the parties must agree on: architecture, input, spec, settings.
    /// Layer geometry is hashed as text, the per-pixel layouts of sites and pools as raw bytes
    /// (a ResNet50 at 224x224 has millions of entries).
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(
            format!(
                "brelu-secure-v1|{}|{:?}|{}|{:?}|{}|{}",
                self.model, self.input, self.classes, self.settings, self.slots, self.output
            )
            .as_bytes(),
        );
        let words = |h: &mut Sha256, v: &[u32]| {
            h.update((v.len() as u64).to_le_bytes());
            for x in v {
                h.update(x.to_le_bytes());
            }
        };
        for l in &self.layers {
            match l {
                Layer::Act { x, y, site, act } => {
                    h.update(format!("|act {x} {y} {site} {} {}", act.len, act.patches));
                    words(&mut h, &act.identity);
                    words(&mut h, &act.active);
                    words(&mut h, &act.patch_of);
                }
                Layer::MaxPool { x, y, win } | Layer::AvgPool { x, y, win } => {
                    h.update(format!("|{} {x} {y} {}", l.kind(), win.idx.len()));
                    for w in &win.idx {
                        words(&mut h, w);
                    }
                }
                Layer::Resize { x, y, interp } => {
                    h.update(format!(
                        "|resize {x} {y} {} {:?} {:?}",
                        interp.c, interp.in_hw, interp.out_hw
                    ));
                    for t in &interp.taps {
                        h.update((t.len() as u64).to_le_bytes());
                        for (i, w) in t {
                            h.update(i.to_le_bytes());
                            h.update(w.to_le_bytes());
                        }
                    }
                }
                other => h.update(format!("|{other:?}")),
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Elements of the value in `slot` (per image).
    pub fn len_of(&self, slot: Slot) -> usize {
        if slot == 0 {
            return self.input.iter().product();
        }
        for l in &self.layers {
            let (y, n) = match l {
                Layer::Conv { y, geom, .. } => (*y, geom.out_len()),
                Layer::Linear { y, cout, .. } => (*y, *cout),
                Layer::Act { y, act, .. } => (*y, act.len),
                Layer::Add { y, a, .. } => (*y, self.len_of(*a)),
                Layer::MaxPool { y, win, .. } | Layer::AvgPool { y, win, .. } => {
                    (*y, win.idx.len())
                }
                Layer::GlobalAvgPool { y, c, .. } => (*y, *c),
                Layer::Concat { y, xs } => (*y, xs.iter().map(|&s| self.len_of(s)).sum()),
                Layer::Resize { y, interp, .. } => (*y, interp.out_len()),
            };
            if y == slot {
                return n;
            }
        }
        0
    }

    /// Total DReLUs of one image (sites, max-pool comparisons).
    pub fn drelus(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Act { act, .. } => act.patches,
                Layer::MaxPool { win, .. } => win.idx.iter().map(|v| v.len().max(1) - 1).sum(),
                _ => 0,
            })
            .sum()
    }

    /// For each slot, the index of the last layer reading it (to free values early).
    pub fn last_use(&self) -> Vec<usize> {
        let mut last = vec![0usize; self.slots];
        for (i, l) in self.layers.iter().enumerate() {
            for s in l.inputs() {
                last[s] = i;
            }
        }
        last[self.output] = usize::MAX;
        last
    }
}
