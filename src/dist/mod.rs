//! Data-parallel runs on PyTorch's own distributed engine, c10d, inside the libtorch brelu links:
//! a TCPStore rendezvous and a Gloo (CPU) or NCCL (CUDA) process group, reached through a small
//! C++ shim ([`ffi`]). Nothing here is a home-made collective.
//!
//! - [`Launch::from_env`] reads the variables `torchrun` and Slurm set (RANK, WORLD_SIZE,
//!   LOCAL_RANK, MASTER_ADDR, MASTER_PORT; SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
//!   SLURM_JOB_NODELIST). Without them a run is a single process, exactly as before.
//! - [`Group`] holds the process group: all-reduce (sum), broadcast, barrier.
//! - [`GradReducer`] averages gradients over the ranks in ~25 MB buckets after the backward
//!   pass, as DDP's buckets do (DDP overlaps them with the backward pass through autograd
//!   hooks; here they run after it).
//! - [`shard`] splits an epoch's order as PyTorch's `DistributedSampler` does (padding by
//!   repeating from the start, no drop-last, rank r takes positions r, r + W, ...).
mod ffi;

use crate::error::{Error, Result};
use std::time::Duration;
use tch::{Kind, Tensor};

/// Where this process stands in a multi-process run, from the launcher's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Index on this node: `--device cuda` becomes `cuda:LOCAL_RANK`.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which launcher's variables were read ("torchrun" or "slurm").
    pub source: &'static str,
}

/// The port torch.distributed uses when MASTER_PORT is unset.
pub const DEFAULT_PORT: u16 = 29500;

/// How long a collective waits for the other ranks (PyTorch's default for Gloo: 30 minutes);
/// `BRELU_DIST_TIMEOUT` (seconds) overrides it. A rank that dies closes its connections, so the
/// others normally fail at once, long before this.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("BRELU_DIST_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(1800)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => Err(Error::Dist(format!(
                "BRELU_DIST_TIMEOUT='{v}': expected a positive number of seconds"
            ))),
        },
    }
}

fn var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    match get(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            Error::Dist(format!(
                "environment variable {name}='{v}': expected a non-negative integer"
            ))
        }),
    }
}

/// The first host of a Slurm node list: `node[03-05,9]` -> `node03`, `a1,b2` -> `a1`,
/// `gpu-[1-2]-ib` -> `gpu-1-ib`.
pub fn first_host(nodelist: &str) -> Option<String> {
    let s = nodelist.trim();
    // The first comma outside brackets ends the first group.
    let mut depth = 0;
    let end = s
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => return true,
                _ => {}
            }
            false
        })
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let group = &s[..end];
    let host = match (group.find('['), group.find(']')) {
        (Some(a), Some(b)) if a < b => {
            let first = group[a + 1..b].split([',', '-']).next()?;
            format!("{}{}{}", &group[..a], first, &group[b + 1..])
        }
        (None, None) => group.to_string(),
        _ => return None,
    };
    (!host.is_empty()).then_some(host)
}

impl Launch {
    /// From the process environment; `None` for a single process.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(&|k| std::env::var(k).ok())
    }

    /// From any variable source (tests pass a map). torchrun's variables win over Slurm's; a
    /// world of one is a single process.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let port = match get("MASTER_PORT") {
            None => DEFAULT_PORT,
            Some(p) => p.trim().parse().map_err(|_| {
                Error::Dist(format!(
                    "MASTER_PORT='{p}': expected a port number (1-65535)"
                ))
            })?,
        };
        let (rank, world, local, addr, source) = if let (Some(r), Some(w)) =
            (var(get, "RANK")?, var(get, "WORLD_SIZE")?)
        {
            let local = var(get, "LOCAL_RANK")?.unwrap_or(r);
            (r, w, local, get("MASTER_ADDR"), "torchrun")
        } else if let (Some(r), Some(w)) = (var(get, "SLURM_PROCID")?, var(get, "SLURM_NTASKS")?) {
            let local = var(get, "SLURM_LOCALID")?.unwrap_or(0);
            let addr = get("MASTER_ADDR")
                .or_else(|| get("SLURM_JOB_NODELIST").and_then(|n| first_host(&n)));
            (r, w, local, addr, "slurm")
        } else {
            return Ok(None);
        };
        if world <= 1 {
            return Ok(None);
        }
        if rank >= world {
            return Err(Error::Dist(format!(
                "rank {rank} is not below the world size {world} ({source} variables)"
            )));
        }
        let master_addr = addr.ok_or_else(|| {
            Error::Dist(format!(
                "rank {rank} of {world} ({source}): MASTER_ADDR is not set (the address of \
                 rank 0's host)"
            ))
        })?;
        Ok(Some(Launch {
            rank,
            world,
            local_rank: local,
            master_addr,
            master_port: port,
            source,
        }))
    }
}

/// The process group of a data-parallel run.
pub struct Group {
    handle: ffi::Handle,
    pub rank: usize,
    pub world: usize,
    /// NCCL (tensors on CUDA) rather than Gloo (tensors on the CPU).
    pub nccl: bool,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Group(rank {} of {}, {})",
            self.rank,
            self.world,
            if self.nccl { "nccl" } else { "gloo" }
        )
    }
}

impl Group {
    /// Joins the group described by `l` (rank 0 serves the rendezvous at MASTER_ADDR:PORT);
    /// waits up to `timeout` for all ranks.
    pub fn join(l: &Launch, nccl: bool, timeout: Duration) -> Result<Group> {
        let handle = ffi::Handle::new(
            &l.master_addr,
            l.master_port,
            l.rank,
            l.world,
            timeout,
            nccl,
        )
        .map_err(|e| {
            Error::Dist(format!(
                "rank {} of {} could not join at {}:{} (is rank 0 running and reachable?): {e}",
                l.rank, l.world, l.master_addr, l.master_port
            ))
        })?;
        Ok(Group {
            handle,
            rank: l.rank,
            world: l.world,
            nccl,
        })
    }

    /// Rank 0, which alone writes checkpoints, logs and progress.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    fn context(&self, e: String) -> Error {
        Error::Dist(format!(
            "rank {} of {}: {e} (another rank has probably failed or been stopped: see its log)",
            self.rank, self.world
        ))
    }

    /// `t` becomes its sum over the ranks (in place; contiguous, alike on every rank).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.handle.all_reduce_sum(t).map_err(|e| self.context(e))
    }

    /// Every rank's `t` becomes `root`'s (in place; contiguous, alike on every rank).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.handle.broadcast(t, root).map_err(|e| self.context(e))
    }

    pub fn barrier(&self) -> Result<()> {
        self.handle.barrier().map_err(|e| self.context(e))
    }

    /// Training-mode batch norm of `x` [N, C, H, W] with the statistics of all ranks' batches
    /// together; `params` are weight, bias, running mean and running variance (updated in
    /// place with `momentum`, the variance unbiased, as `torch.nn.SyncBatchNorm`). Its
    /// backward pass all-reduces too, so every rank must run it in the same order.
    pub fn sync_batch_norm(
        &self,
        x: &Tensor,
        params: [&Tensor; 4],
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        self.handle
            .sync_batch_norm(x, params, momentum, eps)
            .map_err(|e| self.context(e))
    }

    /// Copies rank 0's values of `vars` (parameters and buffers, in the same order on every
    /// rank) to all ranks.
    pub fn broadcast_vars(&self, vars: &[Tensor]) -> Result<()> {
        let _g = tch::no_grad_guard();
        // One flat tensor per dtype and bucket, written back after the broadcast.
        let mut kinds: Vec<Kind> = vars.iter().map(|t| t.kind()).collect();
        kinds.sort_by_key(|k| format!("{k:?}"));
        kinds.dedup();
        for kind in kinds {
            let idx: Vec<usize> = (0..vars.len())
                .filter(|&i| vars[i].kind() == kind)
                .collect();
            let sizes = idx
                .iter()
                .map(|&i| vars[i].numel() * kind.elt_size_in_bytes());
            for b in buckets(sizes) {
                let parts: Vec<Tensor> = b.iter().map(|&j| vars[idx[j]].reshape([-1])).collect();
                let flat = Tensor::cat(&parts, 0);
                self.broadcast(&flat, 0)?;
                let mut off = 0;
                for &j in &b {
                    let v = &vars[idx[j]];
                    let n = v.numel() as i64;
                    v.shallow_clone().copy_(&flat.narrow(0, off, n).view_as(v));
                    off += n;
                }
            }
        }
        Ok(())
    }

    /// An error unless every rank holds the same values of `vars` (compared by an f64 sum and
    /// sum of squares per tensor, which differ after any divergence in practice).
    pub fn check_same(&self, vars: &[Tensor], what: &str) -> Result<()> {
        let _g = tch::no_grad_guard();
        let mine: Vec<f64> = vars
            .iter()
            .flat_map(|t| {
                let d = t.to_kind(Kind::Double);
                [
                    d.sum(Kind::Double).double_value(&[]),
                    (&d * &d).sum(Kind::Double).double_value(&[]),
                ]
            })
            .collect();
        let t = Tensor::from_slice(&mine)
            .to_device(vars.first().map_or(tch::Device::Cpu, |v| v.device()));
        let theirs = t.copy();
        self.broadcast(&theirs, 0)?;
        let theirs = Vec::<f64>::try_from(theirs.to_device(tch::Device::Cpu)).unwrap_or_default();
        if let Some(i) = mine
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(Error::Dist(format!(
                "rank {} of {}: {what} differ from rank 0's (tensor {} of {})",
                self.rank,
                self.world,
                i / 2,
                vars.len()
            )));
        }
        Ok(())
    }
}

thread_local! {
    static SYNC_BN: std::cell::RefCell<Option<std::rc::Rc<Group>>> =
        const { std::cell::RefCell::new(None) };
}

/// While alive, batch norms in training mode on this thread synchronise over `group`
/// ([`Group::sync_batch_norm`]); the previous setting comes back on drop.
pub struct SyncBatchNormScope(Option<std::rc::Rc<Group>>);

impl SyncBatchNormScope {
    pub fn enter(group: std::rc::Rc<Group>) -> SyncBatchNormScope {
        SyncBatchNormScope(SYNC_BN.with(|s| s.replace(Some(group))))
    }
}

impl Drop for SyncBatchNormScope {
    fn drop(&mut self) {
        let prev = self.0.take();
        SYNC_BN.with(|s| *s.borrow_mut() = prev);
    }
}

/// The group training-mode batch norms synchronise over on this thread, if any.
pub fn sync_batch_norm_group() -> Option<std::rc::Rc<Group>> {
    SYNC_BN.with(|s| s.borrow().clone())
}

/// Bucket capacity in bytes (DDP's default `bucket_cap_mb` is 25).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Consecutive index ranges whose byte sizes add up to at most [`BUCKET_BYTES`] (a larger
/// tensor gets a bucket of its own).
pub fn buckets(bytes: impl Iterator<Item = usize>) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut fill = 0;
    for (i, b) in bytes.enumerate() {
        if out.is_empty() || fill + b > BUCKET_BYTES {
            out.push(Vec::new());
            fill = 0;
        }
        out.last_mut().expect("a bucket").push(i);
        fill += b;
    }
    out
}

/// Averages the gradients of a fixed list of parameters over the ranks, bucket by bucket: each
/// bucket is flattened into one tensor, summed with one all-reduce and divided by the world.
pub struct GradReducer {
    buckets: Vec<Vec<usize>>,
}

impl GradReducer {
    pub fn new(params: &[Tensor]) -> GradReducer {
        GradReducer {
            buckets: buckets(
                params
                    .iter()
                    .map(|p| p.numel() * p.kind().elt_size_in_bytes()),
            ),
        }
    }

    /// Replaces every parameter's gradient by its mean over the ranks. A parameter without a
    /// gradient contributes zeros (every rank runs the same graph, so the sets agree) and
    /// keeps none.
    pub fn reduce(&self, group: &Group, params: &[Tensor]) -> Result<()> {
        let _g = tch::no_grad_guard();
        let scale = 1.0 / group.world as f64;
        for b in &self.buckets {
            let grads: Vec<Tensor> = b
                .iter()
                .map(|&i| {
                    let g = params[i].grad();
                    if g.defined() {
                        g.reshape([-1])
                    } else {
                        params[i].zeros_like().reshape([-1])
                    }
                })
                .collect();
            let flat = Tensor::cat(&grads, 0);
            group.all_reduce_sum(&flat)?;
            let mut off = 0;
            for &i in b {
                let n = params[i].numel() as i64;
                let mut g = params[i].grad();
                if g.defined() {
                    g.copy_(&(flat.narrow(0, off, n) * scale).view_as(&g));
                }
                off += n;
            }
        }
        Ok(())
    }
}

/// This rank's part of an epoch's `order`, as `DistributedSampler(drop_last=False)` splits it:
/// the order is padded to a multiple of `world` by repeating it from the start, and rank `r`
/// takes positions r, r + world, r + 2 world, ... Every rank gets the same count.
pub fn shard(order: &[i64], rank: usize, world: usize) -> Vec<i64> {
    if world <= 1 || order.is_empty() {
        return order.to_vec();
    }
    let total = order.len().div_ceil(world) * world;
    (rank..total)
        .step_by(world)
        .map(|i| order[i % order.len()])
        .collect()
}
