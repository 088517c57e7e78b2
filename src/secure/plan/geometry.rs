//! Public index maps of the layers that are not matrix products: the per-channel block-ReLU
//! layout of a site, pooling windows and bilinear resizes.
use crate::secure::ring;
use crate::spec::PatchOption;

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
    /// Per patch, ceil(log2(pixels)): an approximate DReLU compares the patch sum in a window
    /// moved up by this many bits, so the window bounds the patch mean, whatever the patch
    /// size (docs/method.md 8.4).
    pub sum_bits: Vec<u8>,
}

impl ActPlan {
    pub fn new(options: &[PatchOption], c: usize, h: usize, w: usize) -> ActPlan {
        let mut p = ActPlan {
            len: c * h * w,
            identity: Vec::new(),
            active: Vec::new(),
            patch_of: Vec::new(),
            patches: 0,
            sum_bits: Vec::new(),
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
        let mut pixels = vec![0u32; p.patches];
        for &q in &p.patch_of {
            pixels[q as usize] += 1;
        }
        p.sum_bits = pixels
            .iter()
            .map(|&n| n.max(1).next_power_of_two().trailing_zeros() as u8)
            .collect();
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
    /// The divisor of every window when padding counts (`count_include_pad=True`: k*k), else
    /// `None` (each window's in-bounds count).
    pub full: Option<usize>,
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
        Windows { idx, full: None }
    }

    /// The same windows averaged over the whole k x k window, padding included.
    pub fn counting_padding(mut self, k: usize) -> Windows {
        self.full = Some(k * k);
        self
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
        self.idx
            .iter()
            .map(|v| reciprocal(self.full.unwrap_or(v.len())))
            .collect()
    }
}

/// A bilinear resize (PyTorch's source-index rule, align_corners either way) as a public linear map
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
    pub fn new(c: usize, in_hw: [usize; 2], out_hw: [usize; 2], align_corners: bool) -> Interp {
        // (i0, i1, weight of i1) along one axis.
        let axis = |inl: usize, outl: usize, o: usize| -> (usize, usize, f64) {
            let src = if align_corners {
                if outl > 1 {
                    o as f64 * (inl - 1) as f64 / (outl - 1) as f64
                } else {
                    0.0
                }
            } else {
                let scale = inl as f64 / outl as f64;
                ((o as f64 + 0.5) * scale - 0.5).max(0.0)
            };
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
