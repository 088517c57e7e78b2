//! CUDA block-ReLU kernels (`kernels/*.cu`, compiled to PTX by build.rs) launched through
//! cudarc on the device memory of tch tensors. Built only with the `cuda` feature; the
//! stub in `cuda_stub.rs` has the same API otherwise.
//!
//! Contexts and ordering: kernels are loaded into the device's *primary* context (the one
//! the CUDA runtime, and so libtorch, uses), so the pointers tch hands out are valid here.
//! tch offers no way to read torch's current stream, and tch code never changes it, so it is
//! torch's default stream, the legacy NULL stream; every launch goes on that same NULL
//! stream. Launches are therefore ordered after the torch ops that produced the inputs and
//! before the ones that consume the outputs, with no host synchronisation. (Code that sets a
//! non-default current stream through C++ would have to synchronise around these calls.)
//!
//! Outputs and the option table are allocated by torch on the tensor's device; the table
//! goes up with a synchronous host-to-device copy and is freed to torch's caching allocator,
//! which only reuses it for later work on the same (NULL) stream, i.e. after the kernel.
#![allow(unsafe_code)]

use super::table::{ChannelOpt, SimEntry};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

const BLOCK_RELU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/block_relu.ptx"));
const SIMULATE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/simulate.ptx"));

/// Most threads per block: BR_THREADS in kernels/common.cuh.
const BLOCK_THREADS: u32 = 256;
/// Column sums per tile: BR_TILE_COLS in kernels/common.cuh.
const TILE_COLS: usize = 2048;

/// Launch shape for one-block-per-plane kernels: small planes get small blocks (a multiple of
/// a warp, at least one thread per pixel up to 256) and only the shared scratch they use
/// (`br_scratch_floats` in kernels/common.cuh), so that many of them share an SM instead of
/// leaving most threads idle.
fn plane_config(planes: usize, h: usize, w: usize) -> LaunchConfig {
    let hw = h * w;
    let threads = hw.div_ceil(32).clamp(1, BLOCK_THREADS as usize / 32) * 32;
    let scratch = hw.min(TILE_COLS);
    LaunchConfig {
        grid_dim: (planes as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: (2 * scratch * std::mem::size_of::<f32>()) as u32,
    }
}
/// Widest plane the kernels take: BR_TILE_COLS in kernels/common.cuh.
const MAX_W: usize = 2048;
/// Blocks for the elementwise backward (grid-stride loop beyond that).
const BACKWARD_BLOCKS: u32 = 4096;

/// The loaded kernels of one device.
struct DeviceKernels {
    stream: Arc<CudaStream>,
    fwd: CudaFunction,
    fwd_mask: CudaFunction,
    mask: CudaFunction,
    bwd: CudaFunction,
    simulate: CudaFunction,
}

/// Whether the CUDA kernels were compiled into this build.
pub fn is_compiled() -> bool {
    true
}

fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        op,
        message: format!("{e:?}"),
    }
}

/// The kernels of device `ordinal`, loaded once per process and cached.
fn kernels(op: &'static str, ordinal: usize) -> Result<Arc<DeviceKernels>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<DeviceKernels>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().map_err(|_| Error::Cuda {
        op,
        message: "kernel cache poisoned".into(),
    })?;
    if let Some(k) = cache.get(&ordinal) {
        return Ok(k.clone());
    }
    let err = driver_err(op);
    // `CudaContext::new` retains the primary context: the one libtorch's allocations live in.
    let ctx = CudaContext::new(ordinal).map_err(&err)?;
    let br = ctx
        .load_module(Ptx::from_src(BLOCK_RELU_PTX))
        .map_err(&err)?;
    let sim = ctx.load_module(Ptx::from_src(SIMULATE_PTX)).map_err(&err)?;
    let k = Arc::new(DeviceKernels {
        // The NULL stream: torch's default stream, see the module docs.
        stream: ctx.default_stream(),
        fwd: br.load_function("block_relu_fwd_f32").map_err(&err)?,
        fwd_mask: br.load_function("block_relu_fwd_mask_f32").map_err(&err)?,
        mask: br.load_function("block_relu_mask_f32").map_err(&err)?,
        bwd: br.load_function("block_relu_bwd_f32").map_err(&err)?,
        simulate: sim.load_function("block_relu_simulate_f32").map_err(&err)?,
    });
    cache.insert(ordinal, k.clone());
    Ok(k)
}

/// Checks that `x` is a contiguous CUDA f32 [N, C, H, W] tensor the kernels can take and
/// returns (device ordinal, N, C, H, W).
fn check_input(op: &'static str, x: &Tensor) -> Result<(usize, [usize; 4])> {
    let unsupported = |reason: String| Error::UnsupportedTensor { op, reason };
    if !x.defined() {
        return Err(unsupported("undefined tensor".into()));
    }
    let ordinal = match x.device() {
        Device::Cuda(i) => i,
        d => return Err(unsupported(format!("on {d:?}, not CUDA"))),
    };
    if x.kind() != Kind::Float {
        return Err(unsupported(format!("dtype {:?}, not f32", x.kind())));
    }
    if !x.is_contiguous() {
        return Err(unsupported("not contiguous".into()));
    }
    let size = x.size();
    let &[n, c, h, w] = size.as_slice() else {
        return Err(Error::ShapeMismatch {
            op,
            what: "input",
            expected: vec![0, 0, 0, 0],
            got: size.iter().map(|&d| d as usize).collect(),
        });
    };
    let (n, c, h, w) = (n as usize, c as usize, h as usize, w as usize);
    if w > MAX_W
        || h.saturating_mul(w) > i32::MAX as usize
        || n.saturating_mul(c) > i32::MAX as usize
    {
        return Err(unsupported(format!(
            "[{n}, {c}, {h}, {w}] exceeds the kernels' limits (W <= {MAX_W}, H*W and N*C < 2^31)"
        )));
    }
    Ok((ordinal, [n, c, h, w]))
}

/// The table in device memory (a torch tensor, so torch's allocator owns it). Tables are
/// cached by content: a site's options rarely change between calls, and a pageable
/// host-to-device copy would stall the host on every call. The key is a cheap 64-bit hash
/// (SipHash over a 32 KB table costs more than the kernel); a hit is confirmed by comparing
/// the host copy.
fn upload<T: bytemuck::Pod>(op: &'static str, rows: &[T], device: Device) -> Result<Tensor> {
    const MAX_CACHED: usize = 512;
    type Cache = Mutex<HashMap<(Device, usize, u64), (Vec<i32>, Tensor)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let words: &[i32] = bytemuck::cast_slice(rows);
    let hash = words.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &w| {
        (h ^ w as u32 as u64)
            .wrapping_mul(0x1000_0000_01b3)
            .rotate_left(29)
    });
    let key = (device, words.len(), hash);
    let mut cache = CACHE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| Error::Cuda {
            op,
            message: "table cache poisoned".into(),
        })?;
    if let Some((host, t)) = cache.get(&key) {
        if host.as_slice() == words {
            return Ok(t.shallow_clone());
        }
    }
    let t = Tensor::f_from_slice(words)
        .and_then(|t| t.f_to_device(device))
        .map_err(|e| Error::Cuda {
            op,
            message: format!("uploading the option table: {e}"),
        })?;
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(key, (words.to_vec(), t.shallow_clone()));
    Ok(t)
}

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

fn check_table(op: &'static str, table: &[ChannelOpt], c: usize) -> Result<()> {
    if table.len() != c {
        return Err(Error::ShapeMismatch {
            op,
            what: "option table",
            expected: vec![c],
            got: vec![table.len()],
        });
    }
    table
        .iter()
        .enumerate()
        .try_for_each(|(i, t)| t.validate(i, op))
}

/// Which site kernel to launch.
#[derive(Clone, Copy)]
enum SiteKernel {
    Forward,
    ForwardMask,
    Mask,
}

/// Launches one site kernel: one block per plane, outputs allocated by torch.
fn launch_site(
    op: &'static str,
    which: SiteKernel,
    x: &Tensor,
    table: &[ChannelOpt],
) -> Result<(Tensor, Tensor)> {
    let (ordinal, [n, c, h, w]) = check_input(op, x)?;
    check_table(op, table, c)?;
    let device = x.device();
    let y = Tensor::f_empty_like(x)?;
    let mask_kind = if matches!(which, SiteKernel::Mask) {
        Kind::Float
    } else {
        Kind::Uint8
    };
    let mask = match which {
        SiteKernel::Forward => Tensor::f_empty([0], (Kind::Uint8, device))?,
        _ => Tensor::f_empty(x.size(), (mask_kind, device))?,
    };
    if x.numel() == 0 {
        return Ok((y, mask));
    }
    let k = kernels(op, ordinal)?;
    let tab = upload(op, table, device)?;
    let (xp, yp, mp, tp) = (ptr(x), ptr(&y), ptr(&mask), ptr(&tab));
    let (ci, hi, wi) = (c as i32, h as i32, w as i32);
    let cfg = plane_config(n * c, h, w);
    let f = match which {
        SiteKernel::Forward => &k.fwd,
        SiteKernel::ForwardMask => &k.fwd_mask,
        SiteKernel::Mask => &k.mask,
    };
    let mut b = k.stream.launch_builder(f);
    b.arg(&xp);
    match which {
        SiteKernel::Forward => b.arg(&yp),
        SiteKernel::ForwardMask => b.arg(&yp).arg(&mp),
        SiteKernel::Mask => b.arg(&mp),
    };
    b.arg(&tp).arg(&ci).arg(&hi).arg(&wi);
    // SAFETY: arguments mirror the kernel signatures in kernels/block_relu.cu:
    //   fwd(const float* x, float* y, const ChannelOpt* table, int C, int H, int W)
    //   fwd_mask(const float* x, float* y, uint8_t* mask, const ChannelOpt* table, int C, int H, int W)
    //   mask(const float* x, float* mask, const ChannelOpt* table, int C, int H, int W)
    // x is a contiguous f32 CUDA tensor of N*C*H*W elements (checked); y (f32) and mask (u8,
    // or f32 for `mask`) were allocated with x's size on x's device; the table holds C
    // validated 16-byte entries. The grid has N*C blocks, one per plane, so every access
    // stays inside those buffers; W <= BR_TILE_COLS and the dynamic shared memory of
    // `plane_config` (2 * min(H*W, BR_TILE_COLS) floats) keep shared-memory indices in range.
    // All buffers are torch allocations that stay alive (held here or freed to torch's
    // stream-ordered cache) until the kernel has run on the NULL stream.
    unsafe { b.launch(cfg) }.map_err(driver_err(op))?;
    Ok((y, mask))
}

/// Inference forward: `y = block_relu(x)`.
pub fn forward(x: &Tensor, table: &[ChannelOpt]) -> Result<Tensor> {
    Ok(launch_site("cuda::forward", SiteKernel::Forward, x, table)?.0)
}

/// The f32 0/1 mask of `x`.
pub fn mask(x: &Tensor, table: &[ChannelOpt]) -> Result<Tensor> {
    Ok(launch_site("cuda::mask", SiteKernel::Mask, x, table)?.1)
}

/// `y` and the u8 mask in one pass.
pub fn forward_mask(x: &Tensor, table: &[ChannelOpt]) -> Result<(Tensor, Tensor)> {
    launch_site("cuda::forward_mask", SiteKernel::ForwardMask, x, table)
}

/// `grad_x = mask * grad_y` with a u8 mask of the same shape.
pub fn backward(grad_y: &Tensor, mask: &Tensor) -> Result<Tensor> {
    const OP: &str = "cuda::backward";
    let Device::Cuda(ordinal) = grad_y.device() else {
        return Err(Error::UnsupportedTensor {
            op: OP,
            reason: "grad is not on CUDA".into(),
        });
    };
    if grad_y.kind() != Kind::Float
        || !grad_y.is_contiguous()
        || mask.kind() != Kind::Uint8
        || !mask.is_contiguous()
        || mask.device() != grad_y.device()
        || mask.size() != grad_y.size()
    {
        return Err(Error::UnsupportedTensor {
            op: OP,
            reason:
                "grad must be contiguous f32 and mask contiguous u8 of the same shape and device"
                    .into(),
        });
    }
    let gx = Tensor::f_empty_like(grad_y)?;
    let numel = grad_y.numel() as i64;
    if numel == 0 {
        return Ok(gx);
    }
    let k = kernels(OP, ordinal)?;
    let (gp, mp, xp) = (ptr(grad_y), ptr(mask), ptr(&gx));
    let blocks = (numel as u64)
        .div_ceil(BLOCK_THREADS as u64)
        .min(BACKWARD_BLOCKS as u64) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = k.stream.launch_builder(&k.bwd);
    b.arg(&gp).arg(&mp).arg(&xp).arg(&numel);
    // SAFETY: mirrors bwd(const float* grad_y, const uint8_t* mask, float* grad_x, int64_t n);
    // all three are contiguous tensors of `numel` elements on this device (checked), the
    // grid-stride loop stops at n, and the tensors outlive the NULL-stream launch (see
    // launch_site).
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(gx)
}

/// Batched simulation, output `[J*N, C, H, W]` copy-major.
pub fn simulate(x: &Tensor, entries: &[SimEntry]) -> Result<Tensor> {
    const OP: &str = "cuda::simulate";
    let (ordinal, [n, c, h, w]) = check_input(OP, x)?;
    for (j, e) in entries.iter().enumerate() {
        if e.channel as usize >= c {
            return Err(Error::BadOption {
                op: OP,
                channel: e.channel as usize,
                reason: format!("perturbation {j}: channel out of range (C = {c})"),
            });
        }
        e.opt().validate(e.channel as usize, OP)?;
    }
    let planes = entries.len().saturating_mul(n).saturating_mul(c);
    if planes > i32::MAX as usize {
        return Err(Error::UnsupportedTensor {
            op: OP,
            reason: format!("{planes} output planes exceed 2^31"),
        });
    }
    let device = x.device();
    let out = Tensor::f_empty(
        [(entries.len() * n) as i64, c as i64, h as i64, w as i64],
        (Kind::Float, device),
    )?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let k = kernels(OP, ordinal)?;
    let tab = upload(OP, entries, device)?;
    let (xp, op, tp) = (ptr(x), ptr(&out), ptr(&tab));
    let (ni, ci, hi, wi) = (n as i32, c as i32, h as i32, w as i32);
    let cfg = plane_config(planes, h, w);
    let mut b = k.stream.launch_builder(&k.simulate);
    b.arg(&xp)
        .arg(&op)
        .arg(&tp)
        .arg(&ni)
        .arg(&ci)
        .arg(&hi)
        .arg(&wi);
    // SAFETY: mirrors simulate(const float* x, float* out, const SimEntry* entries, int N,
    // int C, int H, int W); x is contiguous f32 [N, C, H, W] on this device, out was
    // allocated as [J*N, C, H, W], the table has J validated entries, and the grid has
    // exactly J*N*C blocks (one per output plane); buffers outlive the launch as above.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(out)
}
