//! The one place where tch tensors become Rust slices (and so the one CPU-side `unsafe`).
//!
//! Every accessor checks what makes the slice valid before building it: the tensor is
//! defined, on the CPU, of the expected dtype, contiguous, and its element count matches.
//! Outputs are always freshly allocated here, so a `&mut` slice never aliases an input.
#![allow(unsafe_code)]

use super::cpu::Shape;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The NCHW sizes of `x`, or an error naming `op` when `x` is not 4-D.
pub(crate) fn shape4(op: &'static str, x: &Tensor) -> Result<Shape> {
    if !x.defined() {
        return Err(Error::UnsupportedTensor {
            op,
            reason: "undefined tensor".into(),
        });
    }
    let size = x.size();
    match size.as_slice() {
        &[n, c, h, w] => Ok(Shape::new(n as usize, c as usize, h as usize, w as usize)),
        _ => Err(Error::ShapeMismatch {
            op,
            what: "input",
            expected: vec![0, 0, 0, 0],
            got: size.iter().map(|&d| d as usize).collect(),
        }),
    }
}

/// Why `x` cannot be read as a CPU f32 slice, if it cannot.
pub(crate) fn cpu_f32_problem(x: &Tensor) -> Option<String> {
    if !x.defined() {
        Some("undefined tensor".into())
    } else if x.device() != Device::Cpu {
        Some(format!("on {:?}, not the CPU", x.device()))
    } else if x.kind() != Kind::Float {
        Some(format!("dtype {:?}, not f32", x.kind()))
    } else if !x.is_contiguous() {
        Some("not contiguous".into())
    } else {
        None
    }
}

/// Borrows the elements of a contiguous CPU f32 tensor.
///
/// Contract (crate-internal): nobody writes to `x`'s storage while the slice lives; ops
/// only hold it for the duration of one kernel call on tensors they were handed.
pub(crate) fn cpu_f32<'a>(op: &'static str, x: &'a Tensor) -> Result<&'a [f32]> {
    if let Some(reason) = cpu_f32_problem(x) {
        return Err(Error::UnsupportedTensor { op, reason });
    }
    borrow(x)
}

/// Borrows the elements of a contiguous CPU u8 tensor (a mask), same contract as
/// [`cpu_f32`].
pub(crate) fn cpu_u8<'a>(op: &'static str, x: &'a Tensor) -> Result<&'a [u8]> {
    if !x.defined() || x.device() != Device::Cpu || x.kind() != Kind::Uint8 || !x.is_contiguous() {
        return Err(Error::UnsupportedTensor {
            op,
            reason: "mask must be a contiguous CPU u8 tensor".into(),
        });
    }
    borrow(x)
}

/// The slice view of a tensor already checked to be defined, on the CPU, contiguous and
/// of a dtype whose elements are `T`.
fn borrow<T>(x: &Tensor) -> Result<&[T]> {
    let n = x.numel();
    if n == 0 {
        return Ok(&[]);
    }
    let ptr = x.data_ptr() as *const T;
    // SAFETY: the callers checked: defined, CPU, contiguous, dtype with elements of type T,
    // so `data_ptr` (which includes the storage offset) points at `numel` initialised,
    // aligned Ts owned by `x`, which outlives the returned borrow; n > 0 so it is not null.
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// Allocates a CPU tensor of `size` and `kind`, lets `fill` write every element through
/// a mutable slice, and returns it.
fn new_with<T, F>(op: &'static str, size: &[i64], kind: Kind, fill: F) -> Result<Tensor>
where
    F: FnOnce(&mut [T]) -> Result<()>,
{
    let t = Tensor::f_empty(size, (kind, Device::Cpu))?;
    let n = t.numel();
    if n == 0 {
        fill(&mut [])?;
        return Ok(t);
    }
    if !t.is_contiguous() || t.kind().elt_size_in_bytes() != std::mem::size_of::<T>() {
        return Err(Error::UnsupportedTensor {
            op,
            reason: "fresh tensor has an unexpected layout".into(),
        });
    }
    let ptr = t.data_ptr() as *mut T;
    // SAFETY: `t` was just allocated, contiguous, with `n` elements of size_of::<T>() bytes
    // (checked), and no other handle to its storage exists, so this is the only reference.
    // `empty` leaves the memory uninitialised but T is f32 or u8, for which every bit
    // pattern is valid; `fill` is required to overwrite it all.
    let slice = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
    fill(slice)?;
    Ok(t)
}

/// A new CPU f32 tensor of `size` written by `fill`.
pub(crate) fn new_cpu_f32<F>(op: &'static str, size: &[i64], fill: F) -> Result<Tensor>
where
    F: FnOnce(&mut [f32]) -> Result<()>,
{
    new_with(op, size, Kind::Float, fill)
}

/// A new CPU u8 tensor of `size` written by `fill`.
pub(crate) fn new_cpu_u8<F>(op: &'static str, size: &[i64], fill: F) -> Result<Tensor>
where
    F: FnOnce(&mut [u8]) -> Result<()>,
{
    new_with(op, size, Kind::Uint8, fill)
}
