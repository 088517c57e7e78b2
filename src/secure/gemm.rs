//! Ring linear algebra: a cache-blocked wrapping `u64` matrix multiply (rayon over row blocks)
//! and convolution as im2col + that multiply. Everything is exact modulo 2^64, so the fast
//! paths are tested for equality against the naive loops below.
use rayon::prelude::*;

/// Rows of C computed together by the micro-kernel.
const MR: usize = 4;
/// Columns of C computed together by the micro-kernel (a packed panel of B).
const NR: usize = 2;

/// C = A * B with A [m, k], B [k, n], all row-major, wrapping arithmetic.
///
/// B is packed into panels of NR columns (contiguous over k); each task computes MR rows of C
/// panel by panel in an MR x NR block of registers, so every loaded value feeds several
/// multiply-adds and C is written once.
pub fn gemm(m: usize, k: usize, n: usize, a: &[u64], b: &[u64]) -> Vec<u64> {
    assert_eq!(a.len(), m * k, "gemm: A has the wrong size");
    assert_eq!(b.len(), k * n, "gemm: B has the wrong size");
    let mut c = vec![0u64; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    if n == 1 {
        c.par_iter_mut().enumerate().for_each(|(i, ci)| {
            let row = &a[i * k..(i + 1) * k];
            *ci = row
                .iter()
                .zip(b)
                .fold(0u64, |s, (x, y)| s.wrapping_add(x.wrapping_mul(*y)));
        });
        return c;
    }
    let panels = n.div_ceil(NR);
    let mut packed = vec![0u64; panels * k * NR];
    packed
        .par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            let c0 = p * NR;
            let w = NR.min(n - c0);
            for kk in 0..k {
                panel[kk * NR..kk * NR + w].copy_from_slice(&b[kk * n + c0..kk * n + c0 + w]);
            }
        });
    c.par_chunks_mut(MR * n)
        .enumerate()
        .for_each(|(blk, cblk)| {
            let rows = cblk.len() / n;
            let r0 = blk * MR;
            let arow = |r: usize| &a[(r0 + r.min(rows - 1)) * k..(r0 + r.min(rows - 1) + 1) * k];
            let (a0, a1, a2, a3) = (arow(0), arow(1), arow(2), arow(3));
            for p in 0..panels {
                let panel = &packed[p * k * NR..(p + 1) * k * NR];
                let mut acc = [[0u64; NR]; MR];
                for (kk, bv) in panel.chunks_exact(NR).enumerate() {
                    let av = [a0[kk], a1[kk], a2[kk], a3[kk]];
                    for r in 0..MR {
                        for j in 0..NR {
                            acc[r][j] = acc[r][j].wrapping_add(av[r].wrapping_mul(bv[j]));
                        }
                    }
                }
                let c0 = p * NR;
                let w = NR.min(n - c0);
                for (r, row) in acc.iter().enumerate().take(rows) {
                    cblk[r * n + c0..r * n + c0 + w].copy_from_slice(&row[..w]);
                }
            }
        });
    c
}

/// Geometry of a 2-d convolution on one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvGeom {
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |len: usize, i: usize| {
            (len + 2 * self.pad[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) / self.stride[i]
                + 1
        };
        (o(self.h, 0), o(self.w, 1))
    }

    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    pub fn out_len(&self) -> usize {
        let (ho, wo) = self.out_hw();
        self.cout * ho * wo
    }

    pub fn weight_len(&self) -> usize {
        self.cout * (self.cin / self.groups) * self.kernel[0] * self.kernel[1]
    }

    /// Multiply-adds of one convolution.
    pub fn macs(&self) -> u64 {
        (self.out_len() * (self.cin / self.groups) * self.kernel[0] * self.kernel[1]) as u64
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.pad == [0, 0]
    }
}

/// im2col of group `g`: [cin_g * kh * kw, ho * wo].
fn im2col(x: &[u64], g: &ConvGeom, group: usize) -> Vec<u64> {
    let cg = g.cin / g.groups;
    let (ho, wo) = g.out_hw();
    let [kh, kw] = g.kernel;
    let npix = ho * wo;
    let mut cols = vec![0u64; cg * kh * kw * npix];
    cols.par_chunks_mut(npix)
        .enumerate()
        .for_each(|(row, out)| {
            let ci = group * cg + row / (kh * kw);
            let ky = (row / kw) % kh;
            let kx = row % kw;
            let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for oy in 0..ho {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                let dst = &mut out[oy * wo..(oy + 1) * wo];
                for (ox, d) in dst.iter_mut().enumerate() {
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad[1] as isize;
                    if ix >= 0 && ix < g.w as isize {
                        *d = src[ix as usize];
                    }
                }
            }
        });
    cols
}

/// Convolution of one image x [cin, h, w] with weights [cout, cin/groups, kh, kw] in the ring.
pub fn conv(x: &[u64], w: &[u64], g: &ConvGeom) -> Vec<u64> {
    assert_eq!(x.len(), g.in_len(), "conv: input has the wrong size");
    assert_eq!(w.len(), g.weight_len(), "conv: weight has the wrong size");
    let (ho, wo) = g.out_hw();
    let npix = ho * wo;
    let cg = g.cin / g.groups;
    let og = g.cout / g.groups;
    let kk = cg * g.kernel[0] * g.kernel[1];
    if g.groups == 1 {
        if g.is_pointwise() {
            return gemm(g.cout, kk, npix, w, x);
        }
        return gemm(g.cout, kk, npix, w, &im2col(x, g, 0));
    }
    if cg == 1 && og == 1 {
        // Depthwise: one small dot product per output pixel, parallel over channels.
        let mut out = vec![0u64; g.cout * npix];
        out.par_chunks_mut(npix).enumerate().for_each(|(c, o)| {
            let cols = im2col_channel(x, g, c);
            let wc = &w[c * kk..(c + 1) * kk];
            for (t, wv) in wc.iter().enumerate() {
                let row = &cols[t * npix..(t + 1) * npix];
                for (ov, xv) in o.iter_mut().zip(row) {
                    *ov = ov.wrapping_add(wv.wrapping_mul(*xv));
                }
            }
        });
        return out;
    }
    let mut out = Vec::with_capacity(g.cout * npix);
    for grp in 0..g.groups {
        let wg = &w[grp * og * kk..(grp + 1) * og * kk];
        out.extend(gemm(og, kk, npix, wg, &im2col(x, g, grp)));
    }
    out
}

/// im2col of one channel (single-threaded; used inside a parallel loop).
fn im2col_channel(x: &[u64], g: &ConvGeom, c: usize) -> Vec<u64> {
    let (ho, wo) = g.out_hw();
    let [kh, kw] = g.kernel;
    let npix = ho * wo;
    let mut cols = vec![0u64; kh * kw * npix];
    let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
    for ky in 0..kh {
        for kx in 0..kw {
            let out = &mut cols[(ky * kw + kx) * npix..(ky * kw + kx + 1) * npix];
            for oy in 0..ho {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                for ox in 0..wo {
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad[1] as isize;
                    if ix >= 0 && ix < g.w as isize {
                        out[oy * wo + ox] = plane[iy as usize * g.w + ix as usize];
                    }
                }
            }
        }
    }
    cols
}

/// y = W x for W [cout, cin] (a fully connected layer on one sample).
pub fn linear(x: &[u64], w: &[u64], cin: usize, cout: usize) -> Vec<u64> {
    gemm(cout, cin, 1, w, x)
}

/// The obviously correct convolution: the test oracle for [`conv`].
pub fn conv_naive(x: &[u64], w: &[u64], g: &ConvGeom) -> Vec<u64> {
    let (ho, wo) = g.out_hw();
    let cg = g.cin / g.groups;
    let og = g.cout / g.groups;
    let [kh, kw] = g.kernel;
    let mut out = vec![0u64; g.cout * ho * wo];
    for co in 0..g.cout {
        let grp = co / og;
        for oy in 0..ho {
            for ox in 0..wo {
                let mut s = 0u64;
                for cj in 0..cg {
                    let ci = grp * cg + cj;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                - g.pad[0] as isize;
                            let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                - g.pad[1] as isize;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            let xv = x[(ci * g.h + iy as usize) * g.w + ix as usize];
                            let wv = w[((co * cg + cj) * kh + ky) * kw + kx];
                            s = s.wrapping_add(xv.wrapping_mul(wv));
                        }
                    }
                }
                out[(co * ho + oy) * wo + ox] = s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<u64> {
        (0..n).map(|_| rng.gen()).collect()
    }

    #[test]
    fn conv_matches_naive_on_ragged_shapes() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let cases = [
            (3, 8, 7, 9, 3, 1, 1, 1, 1),
            (4, 6, 8, 8, 3, 2, 1, 1, 2),
            (5, 5, 9, 6, 3, 2, 1, 1, 5),
            (8, 16, 5, 5, 1, 1, 0, 1, 1),
            (6, 4, 11, 7, 1, 2, 0, 1, 1),
            (4, 4, 9, 9, 3, 1, 2, 2, 1),
            (3, 5, 13, 13, 7, 2, 3, 1, 1),
            // ASPP-style dilation larger than the map (most taps in the padding), and a
            // dilated depthwise conv (MobileNetV2-D8).
            (4, 4, 5, 6, 3, 1, 12, 12, 1),
            (6, 6, 7, 7, 3, 1, 4, 4, 6),
        ];
        for (cin, cout, h, w, k, s, p, d, groups) in cases {
            let g = ConvGeom {
                cin,
                cout,
                h,
                w,
                kernel: [k, k],
                stride: [s, s],
                pad: [p, p],
                dilation: [d, d],
                groups,
            };
            let x = rand_vec(&mut rng, g.in_len());
            let wt = rand_vec(&mut rng, g.weight_len());
            assert_eq!(conv(&x, &wt, &g), conv_naive(&x, &wt, &g), "{g:?}");
        }
    }

    #[test]
    fn gemm_matches_naive() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        for (m, k, n) in [(1, 1, 1), (7, 13, 1), (5, 3, 600), (9, 17, 33)] {
            let a = rand_vec(&mut rng, m * k);
            let b = rand_vec(&mut rng, k * n);
            let c = gemm(m, k, n, &a, &b);
            for i in 0..m {
                for j in 0..n {
                    let s = (0..k).fold(0u64, |s, t| {
                        s.wrapping_add(a[i * k + t].wrapping_mul(b[t * n + j]))
                    });
                    assert_eq!(c[i * n + j], s);
                }
            }
        }
    }
}
