//! Fused CPU block-ReLU kernels over plain `f32` slices in NCHW order (docs/method.md section 2).
//!
//! Every kernel makes one pass over memory: the (n, c) planes are split into groups that
//! rayon hands to the cores, and inside a plane the rows are walked one strip of `bh` rows
//! at a time. A strip is at most `bh * W` floats, so after its column sums are accumulated
//! (the one read from memory) the strip is still in L1/L2 when the output is written.
//! Nothing is allocated per plane: each task owns two scratch rows of length `W`.
//!
//! Sum order (the CUDA kernels use the same one, see `kernels/common.cuh`): for each column
//! of the patch the rows are added top to bottom, then those column sums left to right,
//! each as a left fold starting from its first element. Any order is exact when the inputs
//! make every partial sum exact (small integers, dyadic values), which is what the
//! bit-for-bit tests rely on. A patch is kept iff its sum is `> 0` (an exact 0 gives 0),
//! and the output is `x * m` with `m` in {0.0, 1.0}, exactly as the reference computes it.
use super::table::{ChannelOpt, SimEntry, KIND_IDENTITY, KIND_ZERO};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// The sizes of an NCHW tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        Shape { n, c, h, w }
    }
    /// Number of elements, `None` on overflow.
    pub fn numel(&self) -> Option<usize> {
        self.n
            .checked_mul(self.c)?
            .checked_mul(self.h)?
            .checked_mul(self.w)
    }
    fn dims(&self) -> Vec<usize> {
        vec![self.n, self.c, self.h, self.w]
    }
}

/// A mask element: `u8` (compact, for saving between forward and backward) or `f32`
/// (multiplies straight into a tensor op).
pub trait MaskElem: Copy + Send + Sync + 'static {
    /// From a mask value that is exactly 0.0 or 1.0.
    fn from_unit(m: f32) -> Self;
    /// Back to 0.0 or 1.0 (any non-zero `u8` counts as 1).
    fn to_unit(self) -> f32;
}

impl MaskElem for u8 {
    #[inline(always)]
    fn from_unit(m: f32) -> Self {
        // 1.0 is 0x3f80_0000: its top bits are 001, those of 0.0 are 000. Integer bits, as
        // a saturating float-to-int conversion costs several instructions per element.
        (m.to_bits() >> 29) as u8
    }
    #[inline(always)]
    fn to_unit(self) -> f32 {
        if self != 0 {
            1.0
        } else {
            0.0
        }
    }
}

impl MaskElem for f32 {
    #[inline(always)]
    fn from_unit(m: f32) -> Self {
        m
    }
    #[inline(always)]
    fn to_unit(self) -> f32 {
        self
    }
}

/// Planes are handed to rayon in groups of about this many elements, so tiny maps (4x4)
/// do not pay one task per plane and big ones still spread over all cores.
const TASK_ELEMS: usize = 1 << 14;

/// The tie rule: a patch is kept iff its sum is strictly positive.
#[inline(always)]
fn keep(sum: f32) -> f32 {
    // Bits, not an `if` (or a float select, which LLVM may lower to a branch): signs are
    // random, and a mispredicted branch per patch costs more than the patch.
    f32::from_bits(u32::from(sum > 0.0).wrapping_neg() & 1f32.to_bits())
}

fn check_len(
    op: &'static str,
    what: &'static str,
    shape: Shape,
    len: usize,
    copies: usize,
) -> Result<()> {
    let want = shape.numel().and_then(|e| e.checked_mul(copies));
    if want == Some(len) {
        return Ok(());
    }
    let mut expected = shape.dims();
    expected[0] = shape.n.saturating_mul(copies);
    Err(Error::ShapeMismatch {
        op,
        what,
        expected,
        got: vec![len],
    })
}

fn check_table(op: &'static str, shape: Shape, table: &[ChannelOpt]) -> Result<()> {
    if table.len() != shape.c {
        return Err(Error::ShapeMismatch {
            op,
            what: "option table",
            expected: vec![shape.c],
            got: vec![table.len()],
        });
    }
    table
        .iter()
        .enumerate()
        .try_for_each(|(c, t)| t.validate(c, op))
}

/// Per-task scratch: column sums and the per-column mask of the current strip.
struct Scratch {
    colsum: Vec<f32>,
    mcol: Vec<f32>,
}

impl Scratch {
    fn new(w: usize) -> Self {
        Scratch {
            colsum: vec![0.0; w],
            mcol: vec![0.0; w],
        }
    }
}

/// Where one plane's results go. Both outputs are optional so one plane walker serves
/// inference (y only), training (mask only, or y and mask) and simulation.
struct PlaneOut<'a, M> {
    y: Option<&'a mut [f32]>,
    mask: Option<&'a mut [M]>,
}

/// The code for one plane under one option (see [`kernel_for`]).
type PlaneFn<M> = fn(&[f32], usize, usize, ChannelOpt, &mut Scratch, PlaneOut<'_, M>);

/// Picks the code for option `opt` on maps `w` wide. Looked up once per channel, so a
/// plane costs one indirect call rather than a chain of data-dependent branches, which
/// mispredict on a random mix of options and cost as much as a whole 4x4 plane.
///
/// Patches on maps of the ResNet widths (4 to 32 for CIFAR, 7 to 56 for ImageNet) get code
/// compiled for that width (rows as arrays, sums in registers), and the patch sizes of the
/// 6% specs code compiled for that size: on small planes the per-strip bookkeeping of a
/// generic loop cost 3-5x the arithmetic, and on 32x32 maps the fixed width took the
/// cache-hot kernel from 41% to 51-76% of a copy (three runs).
fn kernel_for<M: MaskElem>(opt: ChannelOpt, w: usize) -> PlaneFn<M> {
    match opt.kind {
        KIND_IDENTITY => |x, _, _, _, _, out| scale(x, 1.0, out),
        KIND_ZERO => |x, _, _, _, _, out| scale(x, 0.0, out),
        _ if opt.bh == 1 && opt.bw == 1 => |x, _, _, _, _, out| relu(x, out),
        _ => match w {
            4 => sizes::<M, 4>(opt),
            7 => sizes::<M, 7>(opt),
            8 => sizes::<M, 8>(opt),
            14 => sizes::<M, 14>(opt),
            16 => sizes::<M, 16>(opt),
            28 => sizes::<M, 28>(opt),
            32 => sizes::<M, 32>(opt),
            56 => sizes::<M, 56>(opt),
            _ => sizes::<M, 0>(opt),
        },
    }
}

/// Runs one (n, c) plane `x` (h * w floats) with option `opt`.
fn plane<M: MaskElem>(
    x: &[f32],
    h: usize,
    w: usize,
    opt: ChannelOpt,
    s: &mut Scratch,
    out: PlaneOut<'_, M>,
) {
    kernel_for(opt, w)(x, h, w, opt, s, out)
}

/// Identity (`k = 1`) and zero (`k = 0`) channels: `x * k`, not a copy or a fill, so the
/// bits match the reference, -0.0 and NaN included.
#[inline(always)]
fn scale<M: MaskElem>(x: &[f32], k: f32, out: PlaneOut<'_, M>) {
    if let Some(y) = out.y {
        y.iter_mut().zip(x).for_each(|(o, a)| *o = a * k);
    }
    if let Some(m) = out.mask {
        m.fill(M::from_unit(k));
    }
}

/// 1x1 patches, the plain ReLU: the patch sum is the pixel itself.
#[inline(always)]
fn relu<M: MaskElem>(x: &[f32], out: PlaneOut<'_, M>) {
    if let Some(y) = out.y {
        y.iter_mut().zip(x).for_each(|(o, a)| *o = a * keep(*a));
    }
    if let Some(m) = out.mask {
        m.iter_mut()
            .zip(x)
            .for_each(|(o, a)| *o = M::from_unit(keep(*a)));
    }
}

/// The code for the patches of `opt` on maps `W` wide (`W = 0`: any width).
fn sizes<M: MaskElem, const W: usize>(opt: ChannelOpt) -> PlaneFn<M> {
    match (opt.bh, opt.bw) {
        (1, 2) => strips::<M, W, 1, 2>,
        (1, 3) => strips::<M, W, 1, 3>,
        (2, 1) => strips::<M, W, 2, 1>,
        (2, 2) => strips::<M, W, 2, 2>,
        (2, 3) => strips::<M, W, 2, 3>,
        (3, 2) => strips::<M, W, 3, 2>,
        (3, 3) => strips::<M, W, 3, 3>,
        (4, 4) => strips::<M, W, 4, 4>,
        _ => strips::<M, W, 0, 0>,
    }
}

/// One plane of patches, strip by strip of `bh` rows: column sums (top to bottom), patch
/// sums of those (left to right; the last patch of a row may be narrower), then every row
/// of the strip times the column mask. Non-zero `W`, `BH`, `BW` fix the width and the
/// patch size at compile time.
fn strips<M: MaskElem, const W: usize, const BH: usize, const BW: usize>(
    x: &[f32],
    h: usize,
    w: usize,
    opt: ChannelOpt,
    s: &mut Scratch,
    out: PlaneOut<'_, M>,
) {
    let bh = if BH > 0 { BH } else { opt.bh as usize };
    let bw = if BW > 0 { BW } else { opt.bw as usize };
    if W > 0 {
        if h == W {
            // Square maps (all of the ResNets'): the strip loop unrolls too.
            fixed_width::<M, W>(x, W, bh, bw, out)
        } else {
            fixed_width::<M, W>(x, h, bh, bw, out)
        }
    } else {
        any_width(x, h, w, bh, bw, s, out)
    }
}

/// A strip's column mask from its column sums `cs`.
#[inline(always)]
fn column_mask(cs: &[f32], mc: &mut [f32], bw: usize) {
    let w = cs.len();
    let mut j = 0;
    while j + bw <= w {
        let mut sum = cs[j];
        for t in 1..bw {
            sum += cs[j + t];
        }
        let k = keep(sum);
        mc[j..j + bw].iter_mut().for_each(|o| *o = k);
        j += bw;
    }
    if j < w {
        let k = keep(cs[j + 1..].iter().fold(cs[j], |acc, v| acc + v));
        mc[j..].iter_mut().for_each(|o| *o = k);
    }
}

/// [`strips`] on maps of a width known at compile time: rows are arrays, the column sums
/// and mask live in registers.
#[inline(always)]
fn fixed_width<M: MaskElem, const W: usize>(
    x: &[f32],
    h: usize,
    bh: usize,
    bw: usize,
    out: PlaneOut<'_, M>,
) {
    let PlaneOut { mut y, mut mask } = out;
    let row = |r: usize| -> &[f32; W] { x[r * W..(r + 1) * W].try_into().expect("row") };
    let mut r0 = 0;
    while r0 < h {
        let rows = bh.min(h - r0);
        let mut cs = *row(r0);
        for r in r0 + 1..r0 + rows {
            let xr = row(r);
            for j in 0..W {
                cs[j] += xr[j];
            }
        }
        let mut mc = [0f32; W];
        column_mask(&cs, &mut mc, bw);
        for r in r0..r0 + rows {
            let xr = row(r);
            if let Some(y) = y.as_deref_mut() {
                let yr: &mut [f32; W] = (&mut y[r * W..(r + 1) * W]).try_into().expect("row");
                for j in 0..W {
                    yr[j] = xr[j] * mc[j];
                }
            }
            if let Some(mk) = mask.as_deref_mut() {
                let mr: &mut [M; W] = (&mut mk[r * W..(r + 1) * W]).try_into().expect("row");
                for j in 0..W {
                    mr[j] = M::from_unit(mc[j]);
                }
            }
        }
        r0 += rows;
    }
}

/// [`strips`] on maps of any width, with the column sums and mask in the task's scratch.
/// Explicit row offsets rather than `chunks(w)`, which divides by `w` per strip.
#[inline(always)]
fn any_width<M: MaskElem>(
    x: &[f32],
    h: usize,
    w: usize,
    bh: usize,
    bw: usize,
    s: &mut Scratch,
    out: PlaneOut<'_, M>,
) {
    let PlaneOut { mut y, mut mask } = out;
    let x = &x[..h * w];
    let cs = &mut s.colsum[..w];
    let mc = &mut s.mcol[..w];
    let mut r0 = 0;
    while r0 < h {
        let rows = bh.min(h - r0);
        let base = r0 * w;
        cs.copy_from_slice(&x[base..base + w]);
        for r in 1..rows {
            let xr = &x[base + r * w..base + (r + 1) * w];
            cs.iter_mut().zip(xr).for_each(|(c, a)| *c += a);
        }
        column_mask(cs, mc, bw);
        for r in 0..rows {
            let at = base + r * w;
            if let Some(y) = y.as_deref_mut() {
                y[at..at + w]
                    .iter_mut()
                    .zip(&x[at..at + w])
                    .zip(mc.iter())
                    .for_each(|((o, a), m)| *o = a * m);
            }
            if let Some(mk) = mask.as_deref_mut() {
                mk[at..at + w]
                    .iter_mut()
                    .zip(mc.iter())
                    .for_each(|(o, m)| *o = M::from_unit(*m));
            }
        }
        r0 += rows;
    }
}

/// Planes per rayon task for planes of `plane` elements.
fn planes_per_task(plane: usize) -> usize {
    (TASK_ELEMS / plane.max(1)).max(1)
}

/// Runs every (n, c) plane with its channel's kernel, in parallel tasks of whole planes,
/// writing `y` and/or `mask` (lengths checked by the caller). Planes are visited in memory
/// order so the hardware prefetcher streams them (visiting a task's planes option by
/// option, to save the per-plane indirect call, was slower on data not in cache).
fn run_planes<M: MaskElem>(
    x: &[f32],
    y: Option<&mut [f32]>,
    mask: Option<&mut [M]>,
    shape: Shape,
    table: &[ChannelOpt],
) {
    let plane_len = shape.h * shape.w;
    if plane_len == 0 || x.is_empty() {
        return;
    }
    let kernels: Vec<PlaneFn<M>> = table.iter().map(|&o| kernel_for(o, shape.w)).collect();
    let chunk = planes_per_task(plane_len) * plane_len;
    let tasks = x.len().div_ceil(chunk);
    fn split<T>(s: Option<&mut [T]>, chunk: usize, tasks: usize) -> Vec<Option<&mut [T]>> {
        match s {
            Some(s) => s.chunks_mut(chunk).map(Some).collect(),
            None => (0..tasks).map(|_| None).collect(),
        }
    }
    split(y, chunk, tasks)
        .into_par_iter()
        .zip(split(mask, chunk, tasks))
        .zip(x.par_chunks(chunk))
        .enumerate()
        .for_each(|(t, ((mut yc, mut mc), xc))| {
            let mut s = Scratch::new(shape.w);
            // A running channel index: a `%` per plane costs as much as a 4x4 plane.
            let mut c = t * (chunk / plane_len) % shape.c;
            for (i, xp) in xc.chunks_exact(plane_len).enumerate() {
                let r = i * plane_len..(i + 1) * plane_len;
                let out = PlaneOut {
                    y: yc.as_deref_mut().map(|v| &mut v[r.clone()]),
                    mask: mc.as_deref_mut().map(|v| &mut v[r]),
                };
                kernels[c](xp, shape.h, shape.w, table[c], &mut s, out);
                c += 1;
                if c == shape.c {
                    c = 0;
                }
            }
        });
}

/// Inference forward: `y = block_relu(x)` with one table entry per channel.
pub fn forward(x: &[f32], y: &mut [f32], shape: Shape, table: &[ChannelOpt]) -> Result<()> {
    const OP: &str = "cpu::forward";
    check_len(OP, "input", shape, x.len(), 1)?;
    check_len(OP, "output", shape, y.len(), 1)?;
    check_table(OP, shape, table)?;
    run_planes::<u8>(x, Some(y), None, shape, table);
    Ok(())
}

/// Training forward: `y = block_relu(x)` and the per-pixel mask (0/1) for the backward.
pub fn forward_mask<M: MaskElem>(
    x: &[f32],
    y: &mut [f32],
    mask: &mut [M],
    shape: Shape,
    table: &[ChannelOpt],
) -> Result<()> {
    const OP: &str = "cpu::forward_mask";
    check_len(OP, "input", shape, x.len(), 1)?;
    check_len(OP, "output", shape, y.len(), 1)?;
    check_len(OP, "mask", shape, mask.len(), 1)?;
    check_table(OP, shape, table)?;
    run_planes(x, Some(y), Some(mask), shape, table);
    Ok(())
}

/// The mask alone (0/1 per pixel), for callers that apply it themselves (the tch
/// autograd path multiplies `x` by it).
pub fn mask<M: MaskElem>(
    x: &[f32],
    mask: &mut [M],
    shape: Shape,
    table: &[ChannelOpt],
) -> Result<()> {
    const OP: &str = "cpu::mask";
    check_len(OP, "input", shape, x.len(), 1)?;
    check_len(OP, "mask", shape, mask.len(), 1)?;
    check_table(OP, shape, table)?;
    run_planes(x, None, Some(mask), shape, table);
    Ok(())
}

/// Backward: `grad_x = mask * grad_y` (the mask is a constant, docs/method.md section 2).
pub fn backward<M: MaskElem>(grad_y: &[f32], mask: &[M], grad_x: &mut [f32]) -> Result<()> {
    const OP: &str = "cpu::backward";
    if mask.len() != grad_y.len() || grad_x.len() != grad_y.len() {
        return Err(Error::ShapeMismatch {
            op: OP,
            what: "mask / grad_x",
            expected: vec![grad_y.len(), grad_y.len()],
            got: vec![mask.len(), grad_x.len()],
        });
    }
    grad_x
        .par_chunks_mut(TASK_ELEMS)
        .zip(grad_y.par_chunks(TASK_ELEMS))
        .zip(mask.par_chunks(TASK_ELEMS))
        .for_each(|((gx, gy), m)| {
            gx.iter_mut()
                .zip(gy)
                .zip(m)
                .for_each(|((o, g), m)| *o = g * m.to_unit());
        });
    Ok(())
}

/// Batched simulation for distortion extraction. Copy `j` (batch rows `j*N..(j+1)*N` of
/// `out`, which is `[J*N, C, H, W]`) is ReLU(x) except channel `entries[j].channel`, which
/// uses `entries[j]`'s option.
///
/// The copies are never built from a materialised stack of x: the work is split by
/// (sample, block of channels), each task reads its block of x once, keeps its ReLU in a
/// scratch buffer that stays in cache, and writes it into all J copies.
pub fn simulate(x: &[f32], shape: Shape, entries: &[SimEntry], out: &mut [f32]) -> Result<()> {
    const OP: &str = "cpu::simulate";
    check_len(OP, "input", shape, x.len(), 1)?;
    check_len(OP, "output", shape, out.len(), entries.len())?;
    for (j, e) in entries.iter().enumerate() {
        if e.channel as usize >= shape.c {
            return Err(Error::BadOption {
                op: OP,
                channel: e.channel as usize,
                reason: format!("perturbation {j}: channel out of range (C = {})", shape.c),
            });
        }
        e.opt().validate(e.channel as usize, OP)?;
    }
    let plane_len = shape.h * shape.w;
    let sample = shape.c * plane_len;
    if sample == 0 || out.is_empty() {
        return Ok(());
    }
    let cb = planes_per_task(plane_len).min(shape.c);
    let blocks = shape.c.div_ceil(cb);
    // groups[n * blocks + b] holds the J output slices of channel block b of sample n.
    let mut groups: Vec<Vec<&mut [f32]>> = (0..shape.n * blocks)
        .map(|_| Vec::with_capacity(entries.len()))
        .collect();
    for (k, s) in out.chunks_mut(sample).enumerate() {
        let n = k % shape.n;
        for (b, blk) in s.chunks_mut(cb * plane_len).enumerate() {
            groups[n * blocks + b].push(blk);
        }
    }
    groups.into_par_iter().enumerate().for_each(|(g, outs)| {
        let (n, b) = (g / blocks, g % blocks);
        let c0 = b * cb;
        let start = n * sample + c0 * plane_len;
        let len = outs.first().map_or(0, |o| o.len());
        let xb = &x[start..start + len];
        let relu: Vec<f32> = xb.iter().map(|a| a * keep(*a)).collect();
        let mut s = Scratch::new(shape.w);
        for (j, ob) in outs.into_iter().enumerate() {
            ob.copy_from_slice(&relu);
            let c = entries[j].channel as usize;
            if (c0..c0 + len / plane_len).contains(&c) {
                let at = (c - c0) * plane_len;
                let yp = &mut ob[at..at + plane_len];
                let xp = &xb[at..at + plane_len];
                plane::<u8>(
                    xp,
                    shape.h,
                    shape.w,
                    entries[j].opt(),
                    &mut s,
                    PlaneOut {
                        y: Some(yp),
                        mask: None,
                    },
                );
            }
        }
    });
    Ok(())
}
