//! Block-ReLU operators on tch tensors (docs/method.md section 2).
//!
//! `block_relu` is what every site of every model calls; it picks the fastest implementation
//! for the tensor: the CUDA kernels (`kernels/*.cu`, feature `cuda`) for CUDA tensors, the
//! fused rayon kernels of [`cpu`] for contiguous CPU f32 tensors, and the framework-ops
//! [`reference`] (also the test oracle and bench baseline) for anything else.
//!
//! Autograd: tch has no user-defined autograd functions, so the training path (input that
//! requires grad) computes the 0/1 mask with a kernel, outside the graph, and returns
//! `x * mask`. Autograd then gives `dx = mask * dy`, which is exactly docs/method.md's gradient, at
//! the cost of one extra elementwise op in the forward. The inference path (no grad) writes
//! `y` in one pass. Following tch's convention each op exists twice: `f_*` returns a
//! `Result`, the plain name panics with the error's message.
pub mod cpu;
mod device;
pub mod reference;
pub mod table;
mod tensor_bridge;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;

pub use device::DeviceChoice;

use crate::error::{Error, Result};
use crate::spec::PatchOption;
use table::{build_sim_table, build_table, ChannelOpt};
use tch::{Device, Kind, Tensor};

/// Which implementation runs an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Framework ops (`reference`): any device and dtype, about ten passes over memory.
    Reference,
    /// Fused rayon kernels: contiguous CPU f32 only.
    Cpu,
    /// CUDA kernels: CUDA f32 tensors, feature `cuda`.
    Cuda,
}

impl Backend {
    /// The backend `block_relu` and `simulate` use for `x`.
    pub fn for_tensor(x: &Tensor) -> Backend {
        match x.device() {
            // Mixed precision (bf16 activations) takes the framework ops.
            Device::Cuda(_) if x.kind() == tch::Kind::Float => Backend::Cuda,
            Device::Cuda(_) => Backend::Reference,
            _ if tensor_bridge::cpu_f32_problem(x).is_none() => Backend::Cpu,
            _ => Backend::Reference,
        }
    }
}

/// Checks that `x` is [N, C, H, W] with one option per channel.
fn check_site(op: &'static str, x: &Tensor, options: usize) -> Result<cpu::Shape> {
    let shape = tensor_bridge::shape4(op, x)?;
    if shape.c != options {
        return Err(Error::ShapeMismatch {
            op,
            what: "options (one per channel)",
            expected: vec![shape.c],
            got: vec![options],
        });
    }
    Ok(shape)
}

fn dims(s: cpu::Shape) -> [i64; 4] {
    [s.n as i64, s.c as i64, s.h as i64, s.w as i64]
}

/// Block ReLU over `x` [N, C, H, W] with one option per channel; gradients flow through
/// `x` with the mask held constant. Picks the backend with [`Backend::for_tensor`].
pub fn f_block_relu(x: &Tensor, options: &[PatchOption]) -> Result<Tensor> {
    f_block_relu_with(Backend::for_tensor(x), x, options)
}

/// [`f_block_relu`] on a chosen backend (benchmarks and tests compare them).
pub fn f_block_relu_with(backend: Backend, x: &Tensor, options: &[PatchOption]) -> Result<Tensor> {
    const OP: &str = "block_relu";
    let shape = check_site(OP, x, options.len())?;
    let table = build_table(options, OP)?;
    if backend == Backend::Reference {
        return Ok(reference::block_relu(x, options));
    }
    if x.requires_grad() {
        // Training: the mask is a constant (computed without grad), autograd does the rest.
        let mask = mask_with(backend, OP, x, shape, &table)?;
        return Ok(x.f_mul(&mask)?);
    }
    match backend {
        Backend::Cuda => cuda::forward(x, &table),
        _ => {
            let xs = tensor_bridge::cpu_f32(OP, x)?;
            tensor_bridge::new_cpu_f32(OP, &dims(shape), |y| cpu::forward(xs, y, shape, &table))
        }
    }
}

/// The f32 0/1 mask of `x`, computed outside autograd.
fn mask_with(
    backend: Backend,
    op: &'static str,
    x: &Tensor,
    shape: cpu::Shape,
    table: &[ChannelOpt],
) -> Result<Tensor> {
    match backend {
        Backend::Cuda => cuda::mask(x, table),
        Backend::Cpu => {
            let xs = tensor_bridge::cpu_f32(op, x)?;
            tensor_bridge::new_cpu_f32(op, &dims(shape), |m| cpu::mask(xs, m, shape, table))
        }
        Backend::Reference => Ok(reference::block_relu_mask(
            x,
            &table.iter().map(|t| t.to_option()).collect::<Vec<_>>(),
        )),
    }
}

/// Panicking twin of [`f_block_relu`].
///
/// # Panics
/// When `x` is not [N, C, H, W], `options` does not have C entries, an option is malformed,
/// or a CUDA tensor meets a build without the `cuda` feature.
pub fn block_relu(x: &Tensor, options: &[PatchOption]) -> Tensor {
    f_block_relu(x, options).unwrap_or_else(|e| panic!("{e}"))
}

/// The f32 0/1 mask of block ReLU (no grad), on the backend [`Backend::for_tensor`] picks.
pub fn f_block_relu_mask(x: &Tensor, options: &[PatchOption]) -> Result<Tensor> {
    const OP: &str = "block_relu_mask";
    let shape = check_site(OP, x, options.len())?;
    let table = build_table(options, OP)?;
    let _guard = tch::no_grad_guard();
    mask_with(Backend::for_tensor(x), OP, &x.detach(), shape, &table)
}

/// Training forward for callers that run their own backward: `(y, mask)` with a u8 mask
/// (a quarter of the memory of an f32 one). `y` does not track gradients; pair with
/// [`f_backward`]. CPU f32 contiguous or CUDA tensors only.
pub fn f_forward_mask(x: &Tensor, options: &[PatchOption]) -> Result<(Tensor, Tensor)> {
    const OP: &str = "forward_mask";
    let shape = check_site(OP, x, options.len())?;
    let table = build_table(options, OP)?;
    let _guard = tch::no_grad_guard();
    match Backend::for_tensor(x) {
        Backend::Cuda => cuda::forward_mask(&x.detach(), &table),
        _ => {
            let xs = tensor_bridge::cpu_f32(OP, x)?;
            let mut y = None;
            let mask = tensor_bridge::new_cpu_u8(OP, &dims(shape), |m| {
                y = Some(tensor_bridge::new_cpu_f32(OP, &dims(shape), |y| {
                    cpu::forward_mask(xs, y, m, shape, &table)
                })?);
                Ok(())
            })?;
            let y = y.ok_or(Error::UnsupportedTensor {
                op: OP,
                reason: "output was not written".into(),
            })?;
            Ok((y, mask))
        }
    }
}

/// Backward of block ReLU: `grad_x = mask * grad_y`, with the u8 mask of [`f_forward_mask`].
pub fn f_backward(grad_y: &Tensor, mask: &Tensor) -> Result<Tensor> {
    const OP: &str = "backward";
    if grad_y.size() != mask.size() || mask.kind() != Kind::Uint8 {
        return Err(Error::UnsupportedTensor {
            op: OP,
            reason: format!(
                "mask must be u8 of grad's shape {:?}, got {:?} {:?}",
                grad_y.size(),
                mask.kind(),
                mask.size()
            ),
        });
    }
    let _guard = tch::no_grad_guard();
    if let Device::Cuda(_) = grad_y.device() {
        return cuda::backward(grad_y, mask);
    }
    let g = tensor_bridge::cpu_f32(OP, grad_y)?;
    let m = tensor_bridge::cpu_u8(OP, mask)?;
    tensor_bridge::new_cpu_f32(OP, &grad_y.size(), |gx| cpu::backward(g, m, gx))
}

/// The batched (channel, option) perturbation copies of ReLU(x), stacked copy-major:
/// `[J*N, C, H, W]` where copy j (rows j*N..(j+1)*N) is ReLU(x) except channel c_j, which
/// uses o_j. No gradient.
pub fn f_simulate(x: &Tensor, perturbations: &[(usize, PatchOption)]) -> Result<Tensor> {
    f_simulate_with(Backend::for_tensor(x), x, perturbations)
}

/// [`f_simulate`] on a chosen backend.
pub fn f_simulate_with(
    backend: Backend,
    x: &Tensor,
    perturbations: &[(usize, PatchOption)],
) -> Result<Tensor> {
    const OP: &str = "simulate";
    let shape = tensor_bridge::shape4(OP, x)?;
    let entries = build_sim_table(perturbations, shape.c, OP)?;
    let _guard = tch::no_grad_guard();
    match backend {
        Backend::Reference => Ok(reference::simulate(x, perturbations)),
        Backend::Cuda => cuda::simulate(&x.detach(), &entries),
        Backend::Cpu => {
            let xs = tensor_bridge::cpu_f32(OP, x)?;
            let mut size = dims(shape);
            size[0] *= entries.len() as i64;
            tensor_bridge::new_cpu_f32(OP, &size, |out| cpu::simulate(xs, shape, &entries, out))
        }
    }
}

/// Panicking twin of [`f_simulate`].
///
/// # Panics
/// When `x` is not [N, C, H, W] or a perturbation names a missing channel or a malformed
/// option.
pub fn simulate(x: &Tensor, perturbations: &[(usize, PatchOption)]) -> Tensor {
    f_simulate(x, perturbations).unwrap_or_else(|e| panic!("{e}"))
}

/// A block-ReLU site as a tch module, with its options validated once.
#[derive(Debug, Clone)]
pub struct BlockRelu {
    options: Vec<PatchOption>,
}

impl BlockRelu {
    /// Fails when an option is malformed (e.g. a 0 x 2 patch).
    pub fn new(options: Vec<PatchOption>) -> Result<Self> {
        build_table(&options, "BlockRelu::new")?;
        Ok(BlockRelu { options })
    }
    pub fn options(&self) -> &[PatchOption] {
        &self.options
    }
}

impl tch::nn::Module for BlockRelu {
    fn forward(&self, xs: &Tensor) -> Tensor {
        block_relu(xs, &self.options)
    }
}

/// Asks libtorch to back large CPU tensors with transparent huge pages (its documented
/// `THP_MEM_ALLOC_ENABLE` switch) unless the user set that variable. A fresh 100 MB output
/// is otherwise faulted in 4 KiB at a time on first write: on the development VMs that made
/// a ResNet50 56x56 block-ReLU call 4.5x slower than the kernel itself (BENCHMARKS.md).
/// Call it first thing in `main`: libtorch reads the variable on its first allocation.
pub fn prefer_huge_pages() {
    const VAR: &str = "THP_MEM_ALLOC_ENABLE";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}
