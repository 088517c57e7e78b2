//! What all three parties know: the network as a list of ring layers (shapes, convolution
//! geometry, pooling windows, the per-channel block-ReLU layout of every site), plus what only
//! the server knows: the fixed-point weights with batch norm folded into the convolutions.
//! Also the plaintext fixed-point forward pass that secure results are checked against.
use super::gemm::{self, ConvGeom};
use super::ring::{self, Fixed};
use crate::error::{Error, Result};
use crate::models::{Model, Op, Slot};
use crate::spec::PatchOption;
use tch::Kind;

/// Fractional bits of the reciprocal used by average pooling (`sum * round(2^s / count) >> s`).
pub const AVG_SHIFT: u32 = 16;

/// Pixel layout of one ReLU site.
#[derive(Clone, Debug, PartialEq)]
pub struct ActPlan {
    /// Elements of the site's map (C * H * W).
    pub len: usize,
    /// Elements passed through unchanged (identity channels).
    pub identity: Vec<u32>,
    /// Elements under a patch option, in order, and the patch each belongs to.
    pub active: Vec<u32>,
    pub patch_of: Vec<u32>,
    /// Number of patches = DReLUs of the site.
    pub patches: usize,
}

impl ActPlan {
    pub fn new(options: &[PatchOption], c: usize, h: usize, w: usize) -> ActPlan {
        let mut p = ActPlan {
            len: c * h * w,
            identity: Vec::new(),
            active: Vec::new(),
            patch_of: Vec::new(),
            patches: 0,
        };
        for (ch, opt) in options.iter().enumerate().take(c) {
            let base = ch * h * w;
            match *opt {
                PatchOption::Identity => p.identity.extend((0..h * w).map(|i| (base + i) as u32)),
                PatchOption::Zero => {}
                PatchOption::Patch { bh, bw } => {
                    let (bh, bw) = (bh.max(1) as usize, bw.max(1) as usize);
                    let pw = w.div_ceil(bw);
                    for y in 0..h {
                        for x in 0..w {
                            p.active.push((base + y * w + x) as u32);
                            p.patch_of.push((p.patches + (y / bh) * pw + x / bw) as u32);
                        }
                    }
                    p.patches += h.div_ceil(bh) * pw;
                }
            }
        }
        p
    }

    /// Patch sums of (a share of) the site's input: local and exact in the ring.
    pub fn patch_sums(&self, x: &[u64]) -> Vec<u64> {
        let mut s = vec![0u64; self.patches];
        for (&i, &p) in self.active.iter().zip(&self.patch_of) {
            s[p as usize] = s[p as usize].wrapping_add(x[i as usize]);
        }
        s
    }
}

/// Pooling windows: for every output element, the in-bounds input elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Windows {
    pub idx: Vec<Vec<u32>>,
}

impl Windows {
    pub fn new(c: usize, h: usize, w: usize, k: usize, s: usize, p: usize) -> Windows {
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let mut idx = Vec::with_capacity(c * ho * wo);
        for ch in 0..c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut v = Vec::with_capacity(k * k);
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - p as isize;
                            let ix = (ox * s + kx) as isize - p as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                v.push((ch * h * w + iy as usize * w + ix as usize) as u32);
                            }
                        }
                    }
                    idx.push(v);
                }
            }
        }
        Windows { idx }
    }

    /// Window sums of (a share of) the input.
    pub fn sums(&self, x: &[u64]) -> Vec<u64> {
        self.idx
            .iter()
            .map(|v| v.iter().fold(0u64, |s, &i| s.wrapping_add(x[i as usize])))
            .collect()
    }

    /// round(2^AVG_SHIFT / count) per output.
    pub fn reciprocals(&self) -> Vec<u64> {
        self.idx.iter().map(|v| reciprocal(v.len())).collect()
    }
}

/// A bilinear resize (align_corners=False, PyTorch's source-index rule) as a public linear map
/// on each channel plane: for every output pixel, its source pixels and their weights in fixed
/// point with [`AVG_SHIFT`] fractional bits. An output with one source of weight 1 (every pixel
/// of a broadcast from 1x1) is copied exactly, without a truncation.
#[derive(Clone, Debug, PartialEq)]
pub struct Interp {
    pub c: usize,
    pub in_hw: [usize; 2],
    pub out_hw: [usize; 2],
    /// Per output pixel: (source pixel within the plane, weight).
    pub taps: Vec<Vec<(u32, u64)>>,
}

impl Interp {
    pub fn new(c: usize, in_hw: [usize; 2], out_hw: [usize; 2]) -> Interp {
        // (i0, i1, weight of i1) along one axis.
        let axis = |inl: usize, outl: usize, o: usize| -> (usize, usize, f64) {
            let scale = inl as f64 / outl as f64;
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(inl - 1);
            let i1 = (i0 + 1).min(inl - 1);
            (i0, i1, src - i0 as f64)
        };
        let one = (1u64 << AVG_SHIFT) as f64;
        let mut taps = Vec::with_capacity(out_hw[0] * out_hw[1]);
        for oy in 0..out_hw[0] {
            let (y0, y1, ly) = axis(in_hw[0], out_hw[0], oy);
            for ox in 0..out_hw[1] {
                let (x0, x1, lx) = axis(in_hw[1], out_hw[1], ox);
                let mut t: Vec<(u32, f64)> = Vec::with_capacity(4);
                for (yy, wy) in [(y0, 1.0 - ly), (y1, ly)] {
                    for (xx, wx) in [(x0, 1.0 - lx), (x1, lx)] {
                        let i = (yy * in_hw[1] + xx) as u32;
                        match t.iter_mut().find(|(j, _)| *j == i) {
                            Some(e) => e.1 += wy * wx,
                            None => t.push((i, wy * wx)),
                        }
                    }
                }
                // Rounded once, after taps on the same pixel are merged.
                let mut t: Vec<(u32, u64)> = t
                    .into_iter()
                    .map(|(i, w)| (i, (w * one).round() as u64))
                    .filter(|&(_, w)| w > 0)
                    .collect();
                t.sort_unstable();
                taps.push(t);
            }
        }
        Interp {
            c,
            in_hw,
            out_hw,
            taps,
        }
    }

    pub fn out_len(&self) -> usize {
        self.c * self.out_hw[0] * self.out_hw[1]
    }

    /// The resize of (a share of) the input; `party` selects the share-truncation rule (0 or 1),
    /// `None` truncates a plaintext value.
    pub fn apply(&self, x: &[u64], party: Option<usize>) -> Vec<u64> {
        let (hw_in, hw_out) = (self.in_hw[0] * self.in_hw[1], self.taps.len());
        let mut y = vec![0u64; self.c * hw_out];
        for ch in 0..self.c {
            let plane = &x[ch * hw_in..(ch + 1) * hw_in];
            for (o, t) in self.taps.iter().enumerate() {
                y[ch * hw_out + o] = match t.as_slice() {
                    [(i, w)] if *w == 1 << AVG_SHIFT => plane[*i as usize],
                    _ => {
                        let s = t.iter().fold(0u64, |s, &(i, w)| {
                            s.wrapping_add(plane[i as usize].wrapping_mul(w))
                        });
                        match party {
                            Some(j) => ring::trunc_share(s, AVG_SHIFT, j),
                            None => ring::trunc_plain(s, AVG_SHIFT),
                        }
                    }
                };
            }
        }
        y
    }
}

pub fn reciprocal(count: usize) -> u64 {
    (((1u64 << AVG_SHIFT) as f64) / count.max(1) as f64).round() as u64
}

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
    /// Bits compared by a DReLU: 64 = exact; fewer = approximate window.
    pub drelu_bits: u32,
    /// For an approximate DReLU: the largest |value| (in real units, as a power of two) the
    /// window covers; the low bits below the window are dropped.
    pub drelu_range_bits: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            fixed: Fixed::default(),
            drelu_bits: 64,
            drelu_range_bits: 12,
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
    /// The plan of a model (its active spec included) and the server's weights, with batch
    /// norm folded into the convolutions.
    pub fn from_model(model: &Model, settings: Settings) -> Result<(Plan, Weights)> {
        settings.validate()?;
        let folded = model.fold_bn()?;
        let graph = folded.graph();
        let cfg = folded.config();
        let shapes = graph.infer_shapes(cfg.input)?;
        let mut layers = Vec::with_capacity(graph.ops.len());
        let mut names = Vec::with_capacity(graph.ops.len());
        let mut weights = Vec::with_capacity(graph.ops.len());
        let chw = |s: Slot| -> Result<(usize, usize, usize)> {
            match shapes[s].as_slice() {
                [c, h, w] => Ok((*c, *h, *w)),
                s => Err(Error::Shape {
                    op: "secure plan".into(),
                    msg: format!("expected a [C, H, W] value, got {s:?}"),
                }),
            }
        };
        let enc = |t: &tch::Tensor| -> Result<Vec<u64>> {
            let v: Vec<f32> = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1))?;
            Ok(settings.fixed.encode_all(&v))
        };
        for (i, op) in graph.ops.iter().enumerate() {
            let params = folded.op_params(i);
            let (layer, name, w) = match op {
                Op::Conv {
                    x,
                    y,
                    name,
                    cin,
                    cout,
                    kernel,
                    stride,
                    pad,
                    dilation,
                    groups,
                    ..
                } => {
                    let (_, h, w) = chw(*x)?;
                    let geom = ConvGeom {
                        cin: *cin,
                        cout: *cout,
                        h,
                        w,
                        kernel: *kernel,
                        stride: *stride,
                        pad: *pad,
                        dilation: *dilation,
                        groups: *groups,
                    };
                    let bias = match params.get(1) {
                        Some(b) => enc(b)?,
                        None => vec![0; *cout],
                    };
                    (
                        Layer::Conv { x: *x, y: *y, geom },
                        name.clone(),
                        Some((enc(&params[0])?, bias)),
                    )
                }
                Op::Linear {
                    x,
                    y,
                    name,
                    cin,
                    cout,
                } => (
                    Layer::Linear {
                        x: *x,
                        y: *y,
                        cin: *cin,
                        cout: *cout,
                    },
                    name.clone(),
                    Some((enc(&params[0])?, enc(&params[1])?)),
                ),
                Op::BatchNorm { name, .. } => {
                    return Err(Error::NotImplemented(format!(
                        "secure inference of batch norm '{name}' that does not follow a \
                         convolution"
                    )))
                }
                Op::Act { x, y, site } => {
                    let (c, h, w) = chw(*x)?;
                    let opts = folded
                        .site_options(*site)
                        .map(|o| o.to_vec())
                        .unwrap_or_else(|| vec![PatchOption::RELU; c]);
                    (
                        Layer::Act {
                            x: *x,
                            y: *y,
                            site: *site,
                            act: ActPlan::new(&opts, c, h, w),
                        },
                        graph.sites[*site].clone(),
                        None,
                    )
                }
                Op::Add { a, b, y } => (
                    Layer::Add {
                        a: *a,
                        b: *b,
                        y: *y,
                    },
                    format!("add%{y}"),
                    None,
                ),
                Op::MaxPool {
                    x,
                    y,
                    kernel,
                    stride,
                    pad,
                } => {
                    let (c, h, w) = chw(*x)?;
                    (
                        Layer::MaxPool {
                            x: *x,
                            y: *y,
                            win: Windows::new(c, h, w, *kernel, *stride, *pad),
                        },
                        format!("maxpool%{y}"),
                        None,
                    )
                }
                Op::AvgPool {
                    x,
                    y,
                    kernel,
                    stride,
                    pad,
                } => {
                    let (c, h, w) = chw(*x)?;
                    (
                        Layer::AvgPool {
                            x: *x,
                            y: *y,
                            win: Windows::new(c, h, w, *kernel, *stride, *pad),
                        },
                        format!("avgpool%{y}"),
                        None,
                    )
                }
                Op::GlobalAvgPool { x, y, .. } => {
                    let (c, h, w) = chw(*x)?;
                    (
                        Layer::GlobalAvgPool {
                            x: *x,
                            y: *y,
                            c,
                            hw: h * w,
                        },
                        "global_avg_pool".to_string(),
                        None,
                    )
                }
                Op::Concat { xs, y } => (
                    Layer::Concat {
                        xs: xs.clone(),
                        y: *y,
                    },
                    format!("concat%{y}"),
                    None,
                ),
                Op::Resize { x, y, .. } => {
                    let (c, h, w) = chw(*x)?;
                    let (_, ho, wo) = chw(*y)?;
                    (
                        Layer::Resize {
                            x: *x,
                            y: *y,
                            interp: Interp::new(c, [h, w], [ho, wo]),
                        },
                        format!("resize%{y}"),
                        None,
                    )
                }
                Op::Dropout { .. } => {
                    return Err(Error::NotImplemented(
                        "secure inference of dropout (batch-norm folding removes it)".into(),
                    ))
                }
            };
            layers.push(layer);
            names.push(name);
            weights.push(w);
        }
        Ok((
            Plan {
                model: folded.name().to_string(),
                input: cfg.input,
                classes: cfg.num_classes,
                slots: graph.slots,
                output: graph.output,
                outputs: shapes[graph.output].iter().product(),
                layers,
                names,
                settings,
            },
            Weights { layers: weights },
        ))
    }

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
            for s in layer_inputs(l) {
                last[s] = i;
            }
        }
        last[self.output] = usize::MAX;
        last
    }
}

pub fn layer_inputs(l: &Layer) -> Vec<Slot> {
    match l {
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

pub fn layer_output(l: &Layer) -> Slot {
    match l {
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

/// The plaintext fixed-point forward pass of one image: what secure inference computes, up to
/// the +-1 ulp of each local truncation. Returns the logits in the ring.
pub fn forward_fixed(plan: &Plan, weights: &Weights, input: &[u64]) -> Vec<u64> {
    let f = plan.settings.fixed.frac;
    let mut vals: Vec<Option<Vec<u64>>> = vec![None; plan.slots];
    vals[0] = Some(input.to_vec());
    for (i, l) in plan.layers.iter().enumerate() {
        let get = |s: Slot| vals[s].as_ref().expect("slot written before read");
        let y = match l {
            Layer::Conv { x, geom, .. } => {
                let (w, b) = weights.layers[i].as_ref().expect("conv has weights");
                let mut y = gemm::conv(get(*x), w, geom);
                let npix = geom.out_len() / geom.cout;
                for (j, v) in y.iter_mut().enumerate() {
                    *v = ring::trunc_plain(*v, f).wrapping_add(b[j / npix]);
                }
                y
            }
            Layer::Linear { x, cin, cout, .. } => {
                let (w, b) = weights.layers[i].as_ref().expect("linear has weights");
                let mut y = gemm::linear(get(*x), w, *cin, *cout);
                for (j, v) in y.iter_mut().enumerate() {
                    *v = ring::trunc_plain(*v, f).wrapping_add(b[j]);
                }
                y
            }
            Layer::Act { x, act, .. } => {
                let xv = get(*x);
                let sums = act.patch_sums(xv);
                let mut y = vec![0u64; act.len];
                for &i in &act.identity {
                    y[i as usize] = xv[i as usize];
                }
                for (&i, &p) in act.active.iter().zip(&act.patch_of) {
                    if (sums[p as usize] as i64) > 0 {
                        y[i as usize] = xv[i as usize];
                    }
                }
                y
            }
            Layer::Add { a, b, .. } => ring::add(get(*a), get(*b)),
            Layer::MaxPool { x, win, .. } => {
                let xv = get(*x);
                win.idx
                    .iter()
                    .map(|v| v.iter().map(|&i| xv[i as usize] as i64).max().unwrap_or(0) as u64)
                    .collect()
            }
            Layer::AvgPool { x, win, .. } => win
                .sums(get(*x))
                .iter()
                .zip(win.reciprocals())
                .map(|(s, r)| ring::trunc_plain(s.wrapping_mul(r), AVG_SHIFT))
                .collect(),
            Layer::GlobalAvgPool { x, c, hw, .. } => {
                let xv = get(*x);
                let r = reciprocal(*hw);
                (0..*c)
                    .map(|ch| {
                        let s = xv[ch * hw..(ch + 1) * hw]
                            .iter()
                            .fold(0u64, |a, v| a.wrapping_add(*v));
                        ring::trunc_plain(s.wrapping_mul(r), AVG_SHIFT)
                    })
                    .collect()
            }
            Layer::Concat { xs, .. } => xs.iter().flat_map(|&s| get(s).iter().copied()).collect(),
            Layer::Resize { x, interp, .. } => interp.apply(get(*x), None),
        };
        vals[layer_output(l)] = Some(y);
    }
    vals[plan.output].take().unwrap_or_default()
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}
