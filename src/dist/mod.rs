//! Data-parallel runs on PyTorch's own distributed engine, c10d, inside the libtorch brelu links:
//! a TCPStore rendezvous and a Gloo (CPU) or NCCL (CUDA) process group, reached through a small
//! C++ shim ([`ffi`]). Nothing here is a home-made collective.
//!
//! - [`Launch::from_env`] reads the variables `torchrun` and Slurm set (RANK, WORLD_SIZE,
//!   LOCAL_RANK, MASTER_ADDR, MASTER_PORT; SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
//!   SLURM_JOB_NODELIST). Without them a run is a single process, exactly as before.
//!   Under torchrun every rank joins the agent's store, keys apart per restart attempt
//!   ([`AgentStore`] serves one the same way, for tests and other launchers).
//! - [`Group`] holds the process group: all-reduce (sum), broadcast, barrier; it joins within
//!   [`Timeouts::init`] and names a port in use or a master it cannot reach.
//! - [`Fingerprint`] and [`Group::agree`]: what the ranks must start with alike, checked before
//!   the first collective of a run.
//! - [`Ddp`] averages gradients over the ranks with PyTorch's own DDP Reducer: 25 MB buckets
//!   all-reduced while the backward pass still runs, optionally compressed to fp16 or bf16.
//! - [`shard`] splits an epoch's order as PyTorch's `DistributedSampler` does (padding by
//!   repeating from the start, no drop-last, rank r takes positions r, r + W, ...).
mod ffi;

use crate::error::{Error, Result};
use crate::ops::DeviceChoice;
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
    /// torchrun's agent already serves the store at MASTER_ADDR:PORT
    /// (TORCHELASTIC_USE_AGENT_STORE): every rank joins it as a client.
    pub agent_store: bool,
    /// torchrun's restart attempt (TORCHELASTIC_RESTART_COUNT): the store keys of each attempt
    /// are apart, so a restarted group never reads a previous attempt's.
    pub attempt: usize,
}

/// The port torch.distributed uses when MASTER_PORT is unset.
pub const DEFAULT_PORT: u16 = 29500;

/// How long a rank waits: for the others to join (rendezvous: connecting to rank 0's store,
/// every rank registering) and, after, for each collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub init: Duration,
    pub collective: Duration,
}

impl Timeouts {
    /// `BRELU_DIST_INIT_TIMEOUT` (seconds, default 300) and `BRELU_DIST_TIMEOUT` (seconds,
    /// default 1800, PyTorch's for Gloo). A rank that dies closes its connections, so the
    /// others normally fail at once, long before the collective timeout.
    pub fn from_env() -> Result<Timeouts> {
        Ok(Timeouts {
            init: seconds_from_env("BRELU_DIST_INIT_TIMEOUT", 300.0)?,
            collective: seconds_from_env("BRELU_DIST_TIMEOUT", 1800.0)?,
        })
    }
}

fn seconds_from_env(name: &str, default: f64) -> Result<Duration> {
    match std::env::var(name) {
        Err(_) => Ok(Duration::from_secs_f64(default)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            _ => Err(Error::Dist(format!(
                "{name}='{v}': expected a positive number of seconds"
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
    /// world of one is a single process (unless BRELU_DIST_SINGLE=1).
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
        // BRELU_DIST_SINGLE=1 keeps a world of one a process group (the data-parallel path,
        // Reducer and all, checked on one device).
        let single = get("BRELU_DIST_SINGLE").is_some_and(|v| v.trim() == "1");
        if world == 0 || (world == 1 && !single) {
            return Ok(None);
        }
        if rank >= world {
            return Err(Error::Dist(format!(
                "rank {rank} is not below the world size {world} ({source} variables)"
            )));
        }
        let agent_store = source == "torchrun"
            && get("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1");
        let attempt = var(get, "TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
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
            agent_store,
            attempt,
        }))
    }

    /// The prefix of this run's store keys (torchrun's own, per restart attempt).
    pub fn store_prefix(&self) -> String {
        format!("/worker/attempt_{}", self.attempt)
    }

    /// The device this rank computes on: `cuda` means `cuda:LOCAL_RANK`, or
    /// `cuda:(LOCAL_RANK mod devices)` when the launcher shows each task fewer GPUs than its
    /// local rank (Slurm's `--gpus-per-task=1` shows one).
    pub fn device(&self, device: DeviceChoice) -> Result<tch::Device> {
        device.resolve(Some(self.local_rank))
    }
}

/// The process group of a data-parallel run.
pub struct Group {
    handle: ffi::Handle,
    pub rank: usize,
    pub world: usize,
    /// Index on this node.
    pub local_rank: usize,
    /// NCCL (tensors on CUDA) rather than Gloo (tensors on the CPU).
    pub nccl: bool,
    /// Where this rank's collective tensors live (its GPU under NCCL, else the CPU).
    pub device: tch::Device,
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
    /// Joins the group described by `l` (rank 0, or torchrun's agent, serves the rendezvous
    /// at MASTER_ADDR:PORT); waits up to `t.init` for all ranks. A port in use and a master
    /// that cannot be reached are errors that say so.
    pub fn join(l: &Launch, device: tch::Device, t: Timeouts) -> Result<Group> {
        let nccl = device.is_cuda();
        let handle = ffi::Handle::new(l, t, nccl).map_err(|e| {
            let at = format!("{}:{}", l.master_addr, l.master_port);
            let low = e.to_ascii_lowercase();
            let why = if low.contains("address already in use") {
                format!(
                    "port {} on {} is in use by another process: set MASTER_PORT to a free port",
                    l.master_port, l.master_addr
                )
            } else if low.contains("timed out") || low.contains("timeout") {
                format!(
                    "the rendezvous at {at} did not complete within {:.0} s \
                     (BRELU_DIST_INIT_TIMEOUT): {}",
                    t.init.as_secs_f64(),
                    if l.rank == 0 && !l.agent_store {
                        format!("not all {} ranks joined", l.world)
                    } else {
                        "is rank 0 running, and MASTER_ADDR/MASTER_PORT reachable from here?"
                            .to_string()
                    }
                )
            } else {
                format!("could not join the rendezvous at {at}")
            };
            Error::Dist(format!("rank {} of {}: {why} ({e})", l.rank, l.world))
        })?;
        Ok(Group {
            handle,
            rank: l.rank,
            world: l.world,
            local_rank: l.local_rank,
            nccl,
            device,
        })
    }

    /// The device and, under a launcher, the process group (Gloo on the CPU, NCCL on CUDA,
    /// where `--device cuda` is this rank's GPU: [`Launch::device`]).
    pub fn from_env(device: DeviceChoice) -> Result<(tch::Device, Option<std::rc::Rc<Group>>)> {
        let Some(l) = Launch::from_env()? else {
            return Ok((device.resolve(None)?, None));
        };
        let device = l.device(device)?;
        let g = Group::join(&l, device, Timeouts::from_env()?)?;
        if g.is_leader() {
            eprintln!(
                "data-parallel: {} ranks ({}, {} variables, rendezvous {}:{}{})",
                l.world,
                if g.nccl { "nccl" } else { "gloo" },
                l.source,
                l.master_addr,
                l.master_port,
                if l.agent_store {
                    ", torchrun's store"
                } else {
                    ""
                }
            );
        }
        Ok((device, Some(std::rc::Rc::new(g))))
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

    /// Rank 0's text (`None` included) on every rank; what the others pass is ignored.
    pub fn share_text(&self, text: Option<&str>) -> Result<Option<String>> {
        let cpu = tch::Device::Cpu;
        let n = text
            .filter(|_| self.rank == 0)
            .map_or(-1, |t| t.len() as i64);
        let len = Tensor::from_slice(&[n]).to_device(self.device);
        self.broadcast(&len, 0)?;
        let n = len.to_device(cpu).int64_value(&[0]);
        if n < 0 {
            return Ok(None);
        }
        let buf = match text {
            Some(t) if self.rank == 0 => Tensor::from_slice(t.as_bytes()),
            _ => Tensor::zeros([n], (Kind::Uint8, cpu)),
        }
        .to_device(self.device);
        if n > 0 {
            self.broadcast(&buf, 0)?;
        }
        let bytes =
            Vec::<u8>::try_from(buf.to_device(cpu)).map_err(|e| self.context(e.to_string()))?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
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
            for b in buckets(sizes, BUCKET_MB << 20) {
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

/// Bucket capacity in MiB (DDP's default `bucket_cap_mb`).
pub const BUCKET_MB: usize = 25;

/// Consecutive index ranges whose byte sizes add up to at most `cap` bytes (a larger tensor
/// gets a bucket of its own).
pub fn buckets(bytes: impl Iterator<Item = usize>, cap: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut fill = 0;
    for (i, b) in bytes.enumerate() {
        if out.is_empty() || fill + b > cap {
            out.push(Vec::new());
            fill = 0;
        }
        out.last_mut().expect("a bucket").push(i);
        fill += b;
    }
    out
}

/// What travels in a gradient all-reduce (DDP's communication hooks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GradCompress {
    /// f32 gradients, summed and divided by the world size.
    #[default]
    None,
    /// Each bucket cast to fp16 (divided by the world size first), reduced, cast back.
    Fp16,
    /// As fp16, in bfloat16 (f32's range, fewer mantissa bits).
    Bf16,
}

/// DDP's gradient averaging: PyTorch's own `c10d::Reducer` over a fixed list of parameters.
/// Autograd hooks hand each parameter's gradient to a bucket as the backward pass produces it,
/// and a full bucket's all-reduce starts at once, so communication overlaps the rest of the
/// backward pass. After an armed backward pass ([`Ddp::arm`]) every gradient is the mean over
/// the ranks; a pass not armed accumulates locally (DDP's `no_sync`). Every parameter must get
/// a gradient in an armed pass.
pub struct Ddp {
    handle: ffi::DdpHandle,
    /// The Reducer reaches the process group through its own reference; this one keeps the
    /// group (and its error context) with it.
    group: std::rc::Rc<Group>,
}

impl Ddp {
    /// The Reducer over `params` (the same list, in the same order, on every rank) with
    /// buckets of `bucket_bytes` (the first at most 1 MiB, as DDP).
    pub fn new(
        group: std::rc::Rc<Group>,
        params: &[Tensor],
        bucket_bytes: usize,
        compress: GradCompress,
    ) -> Result<Ddp> {
        let handle = ffi::DdpHandle::new(&group.handle, params, bucket_bytes, compress)
            .map_err(|e| group.context(e))?;
        Ok(Ddp { handle, group })
    }

    /// Makes the next backward pass all-reduce the gradients (call it after the forward pass of
    /// the last micro-batch of an optimizer step, on every rank).
    pub fn arm(&self) -> Result<()> {
        self.handle.arm().map_err(|e| self.group.context(e))
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

/// A rendezvous store served by a process that is no rank, as torchrun's agent serves one on
/// 127.0.0.1:`port` (ranks join it with `TORCHELASTIC_USE_AGENT_STORE=True`); for tests and
/// home-grown launchers. It stops when dropped.
pub struct AgentStore {
    /// Held for its drop: the store serves while it lives.
    _store: ffi::Store,
}

impl AgentStore {
    pub fn serve(port: u16, timeout: Duration) -> Result<AgentStore> {
        ffi::Store::serve(port, timeout)
            .map(|s| AgentStore { _store: s })
            .map_err(|e| Error::Dist(format!("cannot serve a store on port {port}: {e}")))
    }
}

/// What every rank of a run must start with alike: named fields and their values (as text).
/// [`Group::agree`] compares them before the first collective of a run, so a rank launched
/// with another flag, spec, weights or data stops every rank at once, named, instead of
/// training on silently or hanging in mismatched collectives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(pub Vec<(String, String)>);

impl Fingerprint {
    /// The brelu version and the world size, before any other field.
    pub fn new(world: usize) -> Fingerprint {
        let mut f = Fingerprint::default();
        f.add("brelu version", env!("CARGO_PKG_VERSION"));
        f.add("world size", world.to_string());
        f
    }

    pub fn add(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// One field per top-level key of a configuration (serialised as it is used, overrides
    /// included), named `what` key.
    pub fn add_keys<T: serde::Serialize>(&mut self, what: &str, cfg: &T) {
        if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(cfg) {
            for (k, v) in m {
                self.add(format!("{what} `{k}`"), v.to_string());
            }
        }
    }

    /// The file's content hash, or `none` for no file.
    pub fn add_file(&mut self, name: &str, path: Option<&std::path::Path>) -> Result<()> {
        let v = match path {
            Some(p) => format!("content hash {}", crate::hash::file_hex(p)?),
            None => "none".into(),
        };
        self.add(name, v);
        Ok(())
    }

    /// Fixed slots of hashes: the field count, then one per field (name and value).
    fn slots(&self) -> Vec<i64> {
        let mut v = vec![0i64; FINGERPRINT_SLOTS];
        v[0] = self.0.len() as i64;
        for (i, (n, val)) in self.0.iter().take(FINGERPRINT_SLOTS - 1).enumerate() {
            let mut h = crate::hash::Fnv::default();
            h.write(n.as_bytes());
            h.write(&[0]);
            h.write(val.as_bytes());
            v[i + 1] = h.value() as i64;
        }
        v
    }
}

const FINGERPRINT_SLOTS: usize = 128;

impl Group {
    /// An error on every rank unless all ranks hold the same fingerprint as rank 0; the error
    /// names each disagreeing rank and its first differing field (and, on that rank, its own
    /// value). Two collectives of a few hundred bytes.
    pub fn agree(&self, f: &Fingerprint) -> Result<()> {
        let device = self.device;
        let mine = f.slots();
        let t = Tensor::from_slice(&mine).to_device(device);
        self.broadcast(&t, 0)?;
        let theirs = Vec::<i64>::try_from(t.to_device(tch::Device::Cpu))
            .map_err(|e| self.context(e.to_string()))?;
        // 0: agrees; k >= 1: field k - 1 differs (or the field count, past the last field).
        let first = (1..FINGERPRINT_SLOTS)
            .find(|&i| mine[i] != theirs[i])
            .or((mine[0] != theirs[0]).then_some(f.0.len().min(FINGERPRINT_SLOTS - 1) + 1))
            .unwrap_or(0);
        let mut flags = vec![0i64; self.world];
        flags[self.rank] = first as i64;
        let t = Tensor::from_slice(&flags).to_device(device);
        self.all_reduce_sum(&t)?;
        let flags = Vec::<i64>::try_from(t.to_device(tch::Device::Cpu))
            .map_err(|e| self.context(e.to_string()))?;
        let field = |k: i64| {
            f.0.get(k as usize - 1)
                .map_or("number of checked fields".to_string(), |(n, _)| n.clone())
        };
        let bad: Vec<String> = flags
            .iter()
            .enumerate()
            .filter(|(_, &k)| k > 0)
            .map(|(r, &k)| format!("rank {r} has another {} than rank 0", field(k)))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        let own = match f.0.get(first.wrapping_sub(1)) {
            Some((n, v)) if first > 0 => {
                let v: String = v.chars().take(300).collect();
                format!(" (this rank's {n}: {v})")
            }
            _ => String::new(),
        };
        Err(Error::Dist(format!(
            "rank {} of {}: the ranks did not start alike: {}{own}; every rank must run the \
             same command on the same files",
            self.rank,
            self.world,
            bad.join("; ")
        )))
    }
}
