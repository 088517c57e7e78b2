//! The one place where brelu calls its c10d shim (src/dist/shim.cpp, built by build.rs): a
//! process-group handle and three collectives on tch tensors. Every call passes a buffer for
//! the C++ exception text, which a non-zero return hands back as the error.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_long, c_void, CString};
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn brelu_pg_new(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        init_timeout_ms: c_long,
        timeout_ms: c_long,
        nccl: c_int,
        agent_store: c_int,
        prefix: *const c_char,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn brelu_pg_free(g: *mut c_void);
    fn brelu_store_serve(
        port: c_int,
        timeout_ms: c_long,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn brelu_store_free(s: *mut c_void);
    fn brelu_pg_allreduce_sum(
        g: *mut c_void,
        t: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn brelu_pg_broadcast(
        g: *mut c_void,
        t: *mut c_void,
        root: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn brelu_pg_barrier(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn brelu_ddp_new(
        g: *mut c_void,
        params: *const *mut c_void,
        n: usize,
        bucket_bytes: c_long,
        compress: c_int,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
    fn brelu_ddp_free(d: *mut c_void);
    fn brelu_ddp_prepare(d: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn brelu_sync_batch_norm(
        g: *mut c_void,
        x: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        err: *mut c_char,
        len: usize,
    ) -> *mut c_void;
}

const ERR_LEN: usize = 2048;

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

/// An owned c10d process group (store + backend), freed on drop.
pub(super) struct Handle(*mut c_void);

impl Handle {
    pub(super) fn new(l: &super::Launch, t: super::Timeouts, nccl: bool) -> Result<Handle, String> {
        let addr = &l.master_addr;
        let host = CString::new(addr.as_str())
            .map_err(|_| format!("MASTER_ADDR '{addr}' contains a NUL byte"))?;
        let prefix = CString::new(l.store_prefix())
            .map_err(|_| "the store prefix contains a NUL byte".to_string())?;
        let ms = |d: Duration| d.as_millis().min(c_long::MAX as u128) as c_long;
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `host` and `prefix` are NUL-terminated strings alive for the call; `err` is
        // a writable buffer of ERR_LEN bytes that the shim NUL-terminates; the shim returns
        // null on error.
        let g = unsafe {
            brelu_pg_new(
                host.as_ptr(),
                l.master_port as c_int,
                l.rank as c_int,
                l.world as c_int,
                ms(t.init),
                ms(t.collective),
                nccl as c_int,
                l.agent_store as c_int,
                prefix.as_ptr(),
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if g.is_null() {
            return Err(message(&err));
        }
        Ok(Handle(g))
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut c_char) -> c_int) -> Result<(), String> {
        let mut err = vec![0u8; ERR_LEN];
        if f(err.as_mut_ptr().cast()) != 0 {
            return Err(format!("{what}: {}", message(&err)));
        }
        Ok(())
    }

    /// In place: `t` becomes its elementwise sum over the ranks. It must be contiguous and
    /// alike (shape, dtype, device) on every rank.
    pub(super) fn all_reduce_sum(&self, t: &Tensor) -> Result<(), String> {
        let p = t.as_ptr() as *mut c_void;
        self.call("all-reduce", |err| {
            // SAFETY: `self.0` is a live group; `p` is a valid `at::Tensor*` borrowed for the
            // call (the shim copies the handle, sharing storage, and waits for the collective
            // before returning); `err` holds ERR_LEN bytes.
            unsafe { brelu_pg_allreduce_sum(self.0, p, err, ERR_LEN) }
        })
    }

    /// In place: every rank's `t` becomes `root`'s.
    pub(super) fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), String> {
        let p = t.as_ptr() as *mut c_void;
        self.call("broadcast", |err| {
            // SAFETY: as in `all_reduce_sum`.
            unsafe { brelu_pg_broadcast(self.0, p, root as c_int, err, ERR_LEN) }
        })
    }

    /// Training-mode batch norm of `x` over all ranks' batches (the shim's SyncBatchNorm
    /// autograd function), updating the running statistics in place.
    pub(super) fn sync_batch_norm(
        &self,
        x: &Tensor,
        params: [&Tensor; 4],
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor, String> {
        let p = |t: &Tensor| t.as_ptr() as *mut c_void;
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `self.0` is a live group; the five tensor pointers are valid `at::Tensor*`
        // borrowed for the call; `err` holds ERR_LEN bytes; on success the shim returns a new
        // `at::Tensor*` allocated with `new`, which `Tensor::from_ptr` takes over (and frees
        // with `delete`, as for every tch tensor).
        unsafe {
            let y = brelu_sync_batch_norm(
                self.0,
                p(x),
                p(params[0]),
                p(params[1]),
                p(params[2]),
                p(params[3]),
                momentum,
                eps,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            );
            if y.is_null() {
                return Err(format!("synchronised batch norm: {}", message(&err)));
            }
            Ok(Tensor::from_ptr(y.cast()))
        }
    }

    pub(super) fn barrier(&self) -> Result<(), String> {
        self.call("barrier", |err| {
            // SAFETY: `self.0` is a live group; `err` holds ERR_LEN bytes.
            unsafe { brelu_pg_barrier(self.0, err, ERR_LEN) }
        })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `brelu_pg_new` and is freed exactly once, here.
        unsafe { brelu_pg_free(self.0) }
    }
}

/// An owned c10d::Reducer (the shim's `Ddp`), freed on drop.
pub(super) struct DdpHandle(*mut c_void);

impl DdpHandle {
    pub(super) fn new(
        g: &Handle,
        params: &[Tensor],
        bucket_bytes: usize,
        compress: super::GradCompress,
    ) -> Result<DdpHandle, String> {
        let ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let compress = match compress {
            super::GradCompress::None => 0,
            super::GradCompress::Fp16 => 1,
            super::GradCompress::Bf16 => 2,
        };
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `g.0` is a live group; `ptrs` holds `params.len()` valid `at::Tensor*` for
        // the call (the Reducer copies the handles, sharing the parameters' storage); `err`
        // holds ERR_LEN bytes; the shim returns null on error.
        let d = unsafe {
            brelu_ddp_new(
                g.0,
                ptrs.as_ptr(),
                ptrs.len(),
                bucket_bytes.min(c_long::MAX as usize) as c_long,
                compress,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if d.is_null() {
            return Err(format!("DDP reducer: {}", message(&err)));
        }
        Ok(DdpHandle(d))
    }

    pub(super) fn arm(&self) -> Result<(), String> {
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: `self.0` is a live Reducer; `err` holds ERR_LEN bytes.
        if unsafe { brelu_ddp_prepare(self.0, err.as_mut_ptr().cast(), ERR_LEN) } != 0 {
            return Err(format!("DDP reducer: {}", message(&err)));
        }
        Ok(())
    }
}

impl Drop for DdpHandle {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `brelu_ddp_new` and is freed exactly once, here.
        unsafe { brelu_ddp_free(self.0) }
    }
}

/// A c10d TCPStore served by this process for ranks elsewhere (what torchrun's agent does),
/// freed on drop.
pub(super) struct Store(*mut c_void);

impl Store {
    pub(super) fn serve(port: u16, timeout: Duration) -> Result<Store, String> {
        let mut err = vec![0u8; ERR_LEN];
        let ms = timeout.as_millis().min(c_long::MAX as u128) as c_long;
        // SAFETY: `err` is a writable buffer of ERR_LEN bytes that the shim NUL-terminates; the
        // shim returns null on error.
        let s = unsafe { brelu_store_serve(port as c_int, ms, err.as_mut_ptr().cast(), ERR_LEN) };
        if s.is_null() {
            return Err(message(&err));
        }
        Ok(Store(s))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `brelu_store_serve` and is freed exactly once, here.
        unsafe { brelu_store_free(self.0) }
    }
}
