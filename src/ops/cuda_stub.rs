//! Stand-in for `cuda.rs` when brelu is built without the `cuda` feature: the same API,
//! every entry point returning [`Error::CudaNotCompiled`], so nothing above `ops` needs a
//! `cfg` (a CUDA tensor simply yields a typed error).
use super::table::{ChannelOpt, SimEntry};
use crate::error::{Error, Result};
use tch::Tensor;

/// Whether the CUDA kernels were compiled into this build.
pub fn is_compiled() -> bool {
    false
}

/// Inference forward on a CUDA tensor.
pub fn forward(_x: &Tensor, _table: &[ChannelOpt]) -> Result<Tensor> {
    Err(Error::CudaNotCompiled {
        op: "cuda::forward",
    })
}

/// The f32 0/1 mask of a CUDA tensor.
pub fn mask(_x: &Tensor, _table: &[ChannelOpt]) -> Result<Tensor> {
    Err(Error::CudaNotCompiled { op: "cuda::mask" })
}

/// Forward writing `y` and a u8 mask in one pass.
pub fn forward_mask(_x: &Tensor, _table: &[ChannelOpt]) -> Result<(Tensor, Tensor)> {
    Err(Error::CudaNotCompiled {
        op: "cuda::forward_mask",
    })
}

/// `grad_x = mask * grad_y`.
pub fn backward(_grad_y: &Tensor, _mask: &Tensor) -> Result<Tensor> {
    Err(Error::CudaNotCompiled {
        op: "cuda::backward",
    })
}

/// Batched simulation.
pub fn simulate(_x: &Tensor, _entries: &[SimEntry]) -> Result<Tensor> {
    Err(Error::CudaNotCompiled {
        op: "cuda::simulate",
    })
}
