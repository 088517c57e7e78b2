//! Fused CPU block-ReLU kernels over plain `f32` slices in NCHW order (SPEC.md section 2).
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
use super::table::{ChannelOpt, SimEntry, KIND_IDENTITY, KIND_PATCH, KIND_ZERO};
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
        m as u8
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
    if sum > 0.0 {
        1.0
    } else {
        0.0
    }
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

/// Runs one (n, c) plane `x` (h * w floats) with option `opt`.
fn plane<M: MaskElem>(
    x: &[f32],
    h: usize,
    w: usize,
    opt: ChannelOpt,
    s: &mut Scratch,
    out: PlaneOut<'_, M>,
) {
    let PlaneOut { mut y, mut mask } = out;
    let constant = match opt.kind {
        KIND_IDENTITY => Some(1.0f32),
        KIND_ZERO => Some(0.0f32),
        _ => None,
    };
    if let Some(k) = constant {
        // x * 1 and x * 0 (not a fill) so the bits match the reference, -0.0 and NaN included.
        if let Some(y) = y.as_deref_mut() {
            y.iter_mut().zip(x).for_each(|(o, a)| *o = a * k);
        }
        if let Some(m) = mask.as_deref_mut() {
            m.fill(M::from_unit(k));
        }
        return;
    }
    debug_assert_eq!(opt.kind, KIND_PATCH);
    let (bh, bw) = (opt.bh as usize, opt.bw as usize);
    if bh == 1 && bw == 1 {
        // Plain ReLU: the patch sum is the pixel itself; one vectorisable loop.
        if let Some(y) = y.as_deref_mut() {
            y.iter_mut().zip(x).for_each(|(o, a)| *o = a * keep(*a));
        }
        if let Some(m) = mask.as_deref_mut() {
            m.iter_mut()
                .zip(x)
                .for_each(|(o, a)| *o = M::from_unit(keep(*a)));
        }
        return;
    }
    let mut r0 = 0;
    while r0 < h {
        let rows = bh.min(h - r0);
        let xs = &x[r0 * w..(r0 + rows) * w];
        strip_mask(xs, rows, w, bw, s);
        let mcol = &s.mcol[..w];
        for r in 0..rows {
            let xr = &xs[r * w..(r + 1) * w];
            let at = (r0 + r) * w;
            if let Some(y) = y.as_deref_mut() {
                let yr = &mut y[at..at + w];
                yr.iter_mut()
                    .zip(xr)
                    .zip(mcol)
                    .for_each(|((o, a), m)| *o = a * m);
            }
            if let Some(mk) = mask.as_deref_mut() {
                let mr = &mut mk[at..at + w];
                mr.iter_mut()
                    .zip(mcol)
                    .for_each(|(o, m)| *o = M::from_unit(*m));
            }
        }
        r0 += rows;
    }
}

/// Fills `s.mcol[..w]` with the mask of every column of a strip of `rows` rows (`xs`),
/// cut into patches `bw` wide. Sum order: columns top to bottom, then left to right.
#[inline]
fn strip_mask(xs: &[f32], rows: usize, w: usize, bw: usize, s: &mut Scratch) {
    let colsum: &[f32] = if rows == 1 {
        &xs[..w]
    } else {
        let cs = &mut s.colsum[..w];
        cs.copy_from_slice(&xs[..w]);
        for r in 1..rows {
            cs.iter_mut()
                .zip(&xs[r * w..(r + 1) * w])
                .for_each(|(c, a)| *c += a);
        }
        &s.colsum[..w]
    };
    let mcol = &mut s.mcol[..w];
    if bw == 1 {
        mcol.iter_mut().zip(colsum).for_each(|(m, c)| *m = keep(*c));
    } else {
        for (mc, cs) in mcol.chunks_mut(bw).zip(colsum.chunks(bw)) {
            let sum = cs[1..].iter().fold(cs[0], |acc, v| acc + v);
            mc.fill(keep(sum));
        }
    }
}

/// Planes per rayon task for planes of `plane` elements.
fn planes_per_task(plane: usize) -> usize {
    (TASK_ELEMS / plane.max(1)).max(1)
}

/// Runs `plane` over every (n, c) plane, in parallel tasks of whole planes, writing `y`
/// and/or `mask` (lengths checked by the caller).
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
            let first = t * (chunk / plane_len);
            for (i, xp) in xc.chunks(plane_len).enumerate() {
                let r = i * plane_len..(i + 1) * plane_len;
                let out = PlaneOut {
                    y: yc.as_deref_mut().map(|v| &mut v[r.clone()]),
                    mask: mc.as_deref_mut().map(|v| &mut v[r]),
                };
                plane(
                    xp,
                    shape.h,
                    shape.w,
                    table[(first + i) % shape.c],
                    &mut s,
                    out,
                );
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

/// Backward: `grad_x = mask * grad_y` (the mask is a constant, SPEC.md section 2).
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
