//! Block ReLU with framework ops (docs/method.md section 2): the obviously-correct twin that tests
//! compare the fused kernels with, and the baseline the benchmarks measure against.
//!
//! For each group of channels sharing a patch size: pad to whole patches (zeros leave the
//! sums unchanged), sum each patch, compare with 0, expand back to pixels, crop, scatter.
use crate::spec::PatchOption;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Channels grouped by their option, in a fixed (sorted) order.
pub fn group_channels(options: &[PatchOption]) -> BTreeMap<PatchOption, Vec<i64>> {
    let mut groups: BTreeMap<PatchOption, Vec<i64>> = BTreeMap::new();
    for (c, o) in options.iter().enumerate() {
        groups.entry(*o).or_default().push(c as i64);
    }
    groups
}

/// Mask of one patch size for `x` [N, c, H, W]: 1 where the pixel's patch sum is > 0.
pub fn patch_mask(x: &Tensor, bh: i64, bw: i64) -> Tensor {
    let (n, c, h, w) = x.size4().expect("block ReLU input must be [N, C, H, W]");
    let (ph, pw) = ((h + bh - 1) / bh, (w + bw - 1) / bw);
    let padded = x.constant_pad_nd([0, pw * bw - w, 0, ph * bh - h]);
    let sums =
        padded
            .view([n, c, ph, bh, pw, bw])
            .sum_dim_intlist([3i64, 5].as_slice(), false, x.kind());
    sums.gt(0.0)
        .to_kind(x.kind())
        .view([n, c, ph, 1, pw, 1])
        .expand([n, c, ph, bh, pw, bw], false)
        .reshape([n, c, ph * bh, pw * bw])
        .narrow(2, 0, h)
        .narrow(3, 0, w)
}

/// The 0/1 mask of block ReLU over `x` [N, C, H, W] with one option per channel.
/// The mask is computed without gradient: docs/method.md treats it as a constant.
pub fn block_relu_mask(x: &Tensor, options: &[PatchOption]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let x = x.detach();
    let (_, c, _, _) = x.size4().expect("block ReLU input must be [N, C, H, W]");
    assert_eq!(c as usize, options.len(), "one option per channel");
    let groups = group_channels(options);
    if groups.len() == 1 {
        return option_mask(&x, *groups.keys().next().unwrap());
    }
    let mut mask = x.zeros_like();
    for (o, channels) in groups {
        let idx = Tensor::from_slice(&channels).to_device(x.device());
        let m = option_mask(&x.index_select(1, &idx), o);
        let _ = mask.index_copy_(1, &idx, &m);
    }
    mask
}

fn option_mask(x: &Tensor, o: PatchOption) -> Tensor {
    match o {
        PatchOption::Patch { bh: 1, bw: 1 } => x.gt(0.0).to_kind(x.kind()),
        PatchOption::Patch { bh, bw } => patch_mask(x, bh as i64, bw as i64),
        PatchOption::Identity => x.ones_like(),
        PatchOption::Zero => x.zeros_like(),
    }
}

/// Block ReLU: `x * mask`, differentiable in `x` with the mask held constant.
pub fn block_relu(x: &Tensor, options: &[PatchOption]) -> Tensor {
    if options.iter().all(|o| *o == PatchOption::RELU) {
        return x.relu();
    }
    x * block_relu_mask(x, options)
}

/// Batched simulation for distortion extraction: for each perturbation j = (channel c_j,
/// option o_j) a copy of ReLU(x) whose channel c_j uses o_j; copies stacked on the batch
/// axis (copy-major), giving [J*N, C, H, W].
pub fn simulate(x: &Tensor, perturbations: &[(usize, PatchOption)]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let relu = x.relu();
    let copies: Vec<Tensor> = perturbations
        .iter()
        .map(|&(c, o)| {
            let y = relu.copy();
            let xc = x.narrow(1, c as i64, 1);
            y.narrow(1, c as i64, 1).copy_(&(&xc * option_mask(&xc, o)));
            y
        })
        .collect();
    if copies.is_empty() {
        let (_, c, h, w) = x.size4().expect("[N, C, H, W]");
        return Tensor::zeros([0, c, h, w], (Kind::Float, x.device()));
    }
    Tensor::cat(&copies, 0)
}
