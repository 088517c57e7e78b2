//! `--precision bf16` (libtorch's autocast, on the CPU or CUDA), `--channels-last` (NHWC
//! weights and inputs, which cuDNN's tensor-core convolutions prefer) and the fused SGD kernel,
//! through the few C++ lines of src/train/precision.cpp: tch exposes autocast only for CUDA and
//! in fp16, and no op over tensor lists.
//!
//! Autocast runs the forward pass and the loss; the backward pass runs outside it, in the dtypes
//! the forward pass chose, as PyTorch recommends. Block ReLUs see bf16 activations and take the
//! framework ops ([`crate::ops::Backend::Reference`]); weights and optimizer state stay f32.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_long, c_void};
use tch::{Device, Tensor};

extern "C" {
    fn brelu_autocast_begin(cuda: c_int) -> c_long;
    fn brelu_autocast_end(cuda: c_int, prev: c_long);
    fn brelu_channels_last(t: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn brelu_fused_sgd(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        bufs: *const *mut c_void,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        first: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

fn shim_error(what: &str, err: &[u8]) -> Error {
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Error::InvalidArgument(format!("{what}: {}", String::from_utf8_lossy(&err[..end])))
}

/// Arithmetic precision of the forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// Autocast to bfloat16 where libtorch deems it safe (convolutions, matmuls); reductions
    /// and the loss in f32.
    Bf16,
}

/// While alive, the current thread's forward ops autocast to bf16 on `device`'s type.
pub struct Autocast {
    cuda: c_int,
    prev: c_long,
    /// Thread-local state: the guard must end on the thread that began it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Autocast {
    /// `None` for [`Precision::Fp32`].
    pub fn begin(device: Device, p: Precision) -> Option<Autocast> {
        if p == Precision::Fp32 {
            return None;
        }
        let cuda = device.is_cuda() as c_int;
        // SAFETY: plain values in and out; libtorch's autocast state is thread-local and this
        // guard restores it on the same thread (it is neither Send nor Sync).
        let prev = unsafe { brelu_autocast_begin(cuda) };
        Some(Autocast {
            cuda,
            prev,
            _thread: std::marker::PhantomData,
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: restores the state `begin` returned, on the thread that changed it.
        unsafe { brelu_autocast_end(self.cuda, self.prev) }
    }
}

/// Makes a 4-d tensor's data channels-last in place (all handles to it see the change);
/// tensors of other ranks are left as they are.
pub fn channels_last(t: &Tensor) -> Result<()> {
    let mut err = vec![0u8; 1024];
    // SAFETY: `t.as_ptr()` is a live `at::Tensor*` for the call; the shim replaces the data of
    // the TensorImpl it points to (not the handle) and writes at most 1024 bytes, NUL-ended,
    // into `err`.
    let rc = unsafe {
        brelu_channels_last(
            t.as_ptr() as *mut c_void,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        return Err(shim_error("channels-last", &err));
    }
    Ok(())
}

/// The SGD update of [`super::sgd`] over all of `params` at once, in libtorch's fused kernel
/// (`_fused_sgd_`): d = g + wd p; b = m b + d (b = d on the `first` step); p -= lr b.
/// `params`, `grads` and `bufs` are parallel lists of equal shapes on one device (`bufs` is
/// unused when `momentum` is 0).
pub(super) fn fused_sgd(
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    (weight_decay, momentum, lr): (f64, f64, f64),
    first: bool,
) -> Result<()> {
    let n = params.len();
    assert!(grads.len() == n && (momentum == 0.0 || bufs.len() == n));
    let ptrs = |ts: &[Tensor]| -> Vec<*mut c_void> {
        ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    };
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(bufs));
    let mut err = vec![0u8; 1024];
    // SAFETY: the three pointer arrays hold `n` live `at::Tensor*` handles (`b` none when
    // momentum is 0, which the shim then does not read) that outlive the call; the shim updates
    // the tensors' data in place and writes at most 1024 bytes, NUL-ended, into `err`.
    let rc = unsafe {
        brelu_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            n,
            weight_decay,
            momentum,
            lr,
            first as c_int,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        return Err(shim_error("SGD step", &err));
    }
    Ok(())
}
