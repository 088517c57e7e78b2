//! The training loop of one [`train_on`](super::train_on) call: epochs or iterations of
//! optimizer steps of `batch_size` images (over all ranks), each rank's share taken as
//! `accumulate` micro-batches whose gradients add up before the update (gradient
//! accumulation), then a checkpoint.
//!
//! Torch's generator (dropout) is reseeded from (seed, epoch) at every epoch of an epoch run
//! and from (seed, iteration) at every iteration of an iteration run, where a resumed run
//! starts.
//!
//! Epoch runs weight each micro-batch's mean loss by its share of the step's images, so a step
//! over micro-batches equals one step over their union (the epoch's last step takes the
//! micro-batches left, as a big batch would take the images left). Iteration runs take
//! `accumulate` micro-batches per iteration from the stream of epochs, each weighted
//! `1 / accumulate`.
use super::{
    data, distillation_loss, evaluate_sharded, lr_at, lr_at_iteration, lr_for_batch, precision,
    segment, sgd, write_atomic, Checkpoint, Config, EpochMetrics, TrainOptions, CHECKPOINT_JSON,
    CHECKPOINT_OPTIMIZER, CHECKPOINT_WEIGHTS,
};
use crate::data::{BatchIter, Dataset, Normalize};
use crate::error::{Error, Result};
use crate::models::Model;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Running sums of the training loss and accuracy since the last metrics line, as last read
/// from the device ([`Run::read_sums`]).
#[derive(Default, Clone, Copy)]
struct Window {
    loss: f64,
    correct: i64,
    /// Samples (segmentation: labelled pixels) counted for the accuracy.
    counted: i64,
    /// Images seen.
    images: usize,
    /// Batches, for the mean loss.
    batches: usize,
    /// Images replaced under `--bad-images substitute`.
    substituted: u64,
}

/// The window's loss, correct and counted sums [3] (f64) where the model runs: micro-batches
/// add to them without waiting for the device, and the host reads them once per optimizer step.
struct DeviceSums(Tensor);

impl DeviceSums {
    fn new(device: Device) -> DeviceSums {
        DeviceSums(Tensor::zeros([3], (Kind::Double, device)))
    }
}

thread_local! {
    static HOST_SYNCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times the training loop on this thread has waited for the device to read a value
/// back (a debug counter: one per optimizer step, plus the checkpoints' metrics).
pub fn host_syncs() -> u64 {
    HOST_SYNCS.with(|c| c.get())
}

/// `t` on the host as f64s: every read of the training loop goes through here, and is counted.
fn read_host(t: &Tensor) -> Vec<f64> {
    HOST_SYNCS.with(|c| c.set(c.get() + 1));
    Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double).view([-1]))
        .expect("f64 vector")
}

/// The state of one [`train_on`](super::train_on) call.
pub(super) struct Run<'a> {
    pub cfg: &'a Config,
    pub model: &'a mut Model,
    pub opt: sgd::Sgd,
    pub teacher: Option<Model>,
    pub train_set: &'a Dataset,
    pub test_set: &'a Dataset,
    pub opts: &'a TrainOptions,
    pub hash: String,
    pub metrics_path: PathBuf,
    pub norm: Normalize,
    pub out: Vec<EpochMetrics>,
    /// Single process, or rank 0: writes and shows progress.
    pub leader: bool,
    /// Images per micro-batch on this rank ([`super::micro_batch`]).
    pub micro_batch: usize,
    /// This rank's substitution count at the last checkpoint.
    pub substituted_mark: u64,
    /// [`host_syncs`] at the last checkpoint.
    pub syncs_mark: u64,
}

impl<'a> Run<'a> {
    /// The training batches of `epoch` (borrowing the data set, not the run, so they stream
    /// while the run steps).
    fn batches(&self, epoch: usize) -> BatchIter<'a> {
        let (rank, world) = self.rank_world();
        BatchIter::train(
            self.train_set,
            self.micro_batch,
            self.cfg.seed,
            epoch,
            self.cfg.dataset.augmentation(),
            self.norm.clone(),
            self.model.device(),
        )
        .shard(self.cfg.seed, epoch, rank, world)
    }

    fn rank_world(&self) -> (usize, usize) {
        self.opts
            .group
            .as_ref()
            .map_or((0, 1), |g| (g.rank, g.world))
    }

    /// Images substituted since the run started (this rank).
    fn substituted(&self) -> u64 {
        self.train_set
            .substituted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Data-parallel runs: `w` summed over the ranks, and a check that the ranks' weights
    /// are still identical.
    fn gather_window(&self, w: &Window) -> Result<Window> {
        let Some(g) = &self.opts.group else {
            return Ok(*w);
        };
        g.check_same(&self.opt.params(), "weights")?;
        let t = Tensor::from_slice(&[
            w.loss,
            w.correct as f64,
            w.counted as f64,
            w.images as f64,
            w.batches as f64,
            w.substituted as f64,
        ])
        .to_device(self.model.device());
        g.all_reduce_sum(&t)?;
        let v = read_host(&t);
        Ok(Window {
            loss: v[0],
            correct: v[1] as i64,
            counted: v[2] as i64,
            images: v[3] as usize,
            batches: v[4] as usize,
            substituted: v[5] as u64,
        })
    }

    /// The forward and backward pass of one micro-batch, its loss weighted by `scale`, adding
    /// to the gradients of the step under way (`last`: the step's last micro-batch, whose
    /// backward pass averages the gradients over the ranks) and to the window's sums.
    fn micro(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        scale: f64,
        last: bool,
        (w, sums): (&mut Window, &DeviceSums),
    ) -> Result<()> {
        if self.opts.channels_last {
            precision::channels_last(x)?;
        }
        let autocast = precision::Autocast::begin(x.device(), self.opts.precision);
        let (logits, aux) = match self.cfg.aux_loss_weight {
            Some(_) => self.model.forward_with_aux(x, true),
            None => (self.model.forward_t(x, true), None),
        };
        let seg = self.train_set.seg.is_some();
        let (ce, pred, counted) = if seg {
            let (ce, valid, up) = segment::seg_loss(&logits, y);
            let hit = up
                .argmax(1, false)
                .eq_tensor(y)
                .logical_and(&y.ne(data::seg::IGNORE as i64));
            let ce = match (aux, self.cfg.aux_loss_weight) {
                (Some(a), Some(weight)) => ce + segment::seg_loss(&a, y).0 * weight,
                _ => ce,
            };
            (ce, hit, valid)
        } else {
            let ce = logits.cross_entropy_for_logits(y);
            // Made where the sums live (no copy from the host).
            let n = Tensor::full([] as [i64; 0], y.size()[0], (Kind::Int64, y.device()));
            (ce, logits.argmax(1, false).eq_tensor(y), n)
        };
        let loss = match (&self.teacher, &self.cfg.distill) {
            (Some(t), Some(d)) => {
                let tl = tch::no_grad(|| t.forward_t(x, false));
                ce + distillation_loss(&logits, &tl, d.alpha, d.temperature)
            }
            _ => ce,
        };
        drop(autocast);
        if scale == 1.0 {
            self.opt.backward(&loss, last)?;
        } else {
            self.opt.backward(&(&loss * scale), last)?;
        }
        let b = x.size()[0] as usize;
        tch::no_grad(|| {
            let add = Tensor::stack(
                &[
                    loss.detach().to_kind(Kind::Double) * b as f64,
                    pred.sum(Kind::Double),
                    counted.to_kind(Kind::Double),
                ],
                0,
            );
            let mut t = sums.0.shallow_clone();
            t += add;
        });
        w.images += b;
        w.batches += 1;
        Ok(())
    }

    /// Reads the window's sums back (the one host synchronisation of an optimizer step) and
    /// stops a run whose loss is no longer finite.
    fn read_sums(&self, w: &mut Window, sums: &DeviceSums, when: &str) -> Result<()> {
        let v = read_host(&sums.0);
        if !v[0].is_finite() {
            return Err(Error::InvalidArgument(format!(
                "training diverged by {when} (loss {}); lower optimizer.lr",
                v[0]
            )));
        }
        (w.loss, w.correct, w.counted) = (v[0], v[1] as i64, v[2] as i64);
        Ok(())
    }

    /// The optimizer step at rate `lr` on the gradients accumulated (and, in a data-parallel
    /// run, averaged) since the last one.
    fn update(&mut self, lr: f64) -> Result<()> {
        self.opt.lr = lr;
        self.opt.step()
    }

    /// Evaluates, appends the metrics line and writes the checkpoint (all atomically but the
    /// append, which [`trim_metrics`] repairs on resume).
    fn checkpoint(
        &mut self,
        epoch: usize,
        iteration: Option<usize>,
        lr: f64,
        w: &Window,
        t0: Instant,
        train_secs: f64,
    ) -> Result<()> {
        let mut w = *w;
        let now = self.substituted();
        (w.substituted, self.substituted_mark) = (now - self.substituted_mark, now);
        let syncs = host_syncs() - self.syncs_mark;
        let w = &self.gather_window(&w)?;
        self.syncs_mark = host_syncs();
        // Every rank evaluates its share of the test split; rank 0 writes.
        let eval_bs = self.cfg.eval_batch_size.unwrap_or(self.cfg.batch_size);
        let group = self.opts.group.as_deref();
        let test = evaluate_sharded(self.model, self.test_set, &self.norm, eval_bs, group)?;
        if !self.leader {
            return group.map_or(Ok(()), |g| g.barrier());
        }
        let m = EpochMetrics {
            epoch,
            iteration,
            lr,
            train_loss: w.loss / w.images.max(1) as f64,
            train_top1: w.correct as f64 / w.counted.max(1) as f64,
            test,
            seconds: t0.elapsed().as_secs_f64(),
            images_per_s: w.images as f64 / train_secs.max(1e-9),
            substituted_images: w.substituted,
            host_syncs: syncs,
        };
        if w.substituted > 0 {
            eprintln!(
                "warning: {} undecodable training image(s) substituted since the last \
                 checkpoint (--bad-images substitute; see the warnings above)",
                w.substituted
            );
        }
        append_line(
            &self.metrics_path,
            &serde_json::to_string(&m).expect("metrics"),
        )?;
        let dir = &self.opts.run_dir;
        self.model.save_weights(&dir.join(CHECKPOINT_WEIGHTS))?;
        self.opt.save(&dir.join(CHECKPOINT_OPTIMIZER))?;
        let ck = Checkpoint {
            // Iteration runs: the epochs completed (the resume point comes from `iteration`).
            epoch: if iteration.is_some() {
                epoch.saturating_sub(1)
            } else {
                epoch
            },
            iteration,
            seed: self.cfg.seed,
            config_hash: self.hash.clone(),
            spec: self.opts.spec.clone(),
            momentum_saved: true,
            last: Some(m.clone()),
        };
        let text = serde_json::to_string_pretty(&ck).expect("checkpoint");
        write_atomic(&dir.join(CHECKPOINT_JSON), text.as_bytes())?;
        self.out.push(m);
        match &self.opts.group {
            Some(g) => g.barrier(),
            None => Ok(()),
        }
    }

    pub(super) fn by_epochs(&mut self, start: usize) -> Result<()> {
        let cfg = self.cfg;
        for epoch in start..cfg.epochs {
            let lr = lr_at(&cfg.schedule, cfg.optimizer.lr, epoch, cfg.epochs);
            let t0 = Instant::now();
            reseed(cfg.seed, epoch);
            let it = self.batches(epoch);
            let bar = crate::progress::bar(
                self.opts.progress && self.leader,
                it.batches() as u64,
                format!("epoch {}/{}", epoch + 1, cfg.epochs),
                "batches",
            );
            let (mut w, sums) = (Window::default(), DeviceSums::new(self.model.device()));
            let (n, bs) = (cfg.accumulate.max(1), self.micro_batch);
            let (batches, len) = (it.batches(), it.order().len());
            let steps = batches.div_ceil(n);
            let mut lr_s = lr;
            let when = format!("epoch {}", epoch + 1);
            for (i, b) in it.prefetch(self.opts.loader)?.enumerate() {
                let (x, y) = b?;
                let s = i / n;
                if i % n == 0 {
                    self.opt.zero_grad();
                    lr_s =
                        lr_for_batch(&cfg.schedule, cfg.optimizer.lr, epoch, s, steps, cfg.epochs);
                }
                // This step's images: n micro-batches, or what the epoch has left.
                let group = ((s + 1) * n * bs).min(len).saturating_sub(s * n * bs);
                let scale = x.size()[0] as f64 / group.max(1) as f64;
                let last = (i + 1) % n == 0 || i + 1 == batches;
                self.micro(&x, &y, scale, last, (&mut w, &sums))?;
                if last {
                    self.update(lr_s)?;
                    self.read_sums(&mut w, &sums, &when)?;
                    bar.set_message(window_message(&w, t0));
                }
                bar.inc(1);
            }
            bar.finish_and_clear();
            let train_secs = t0.elapsed().as_secs_f64();
            self.checkpoint(epoch + 1, None, lr, &w, t0, train_secs)?;
        }
        Ok(())
    }

    pub(super) fn by_iterations(&mut self, start: usize, total: usize) -> Result<()> {
        let cfg = self.cfg;
        let every = cfg.checkpoint_every.unwrap_or(1000).clamp(1, total);
        let per_epoch = self.batches(0).batches().max(1);
        let bar = crate::progress::bar(
            self.opts.progress && self.leader,
            total as u64,
            "training",
            "iterations",
        );
        bar.set_position(start as u64);
        let n = cfg.accumulate.max(1);
        let (mut it, mut m) = (start, start * n);
        let (mut w, mut t0) = (Window::default(), Instant::now());
        let mut sums = DeviceSums::new(self.model.device());
        while it < total {
            let epoch = m / per_epoch;
            let mut batches = self.batches(epoch);
            batches.skip_batches(m % per_epoch);
            for b in batches.prefetch(self.opts.loader)?.take(total * n - m) {
                let (x, y) = b?;
                if m.is_multiple_of(n) {
                    self.opt.zero_grad();
                    reseed(cfg.seed, it);
                }
                let last = (m + 1).is_multiple_of(n);
                self.micro(&x, &y, 1.0 / n as f64, last, (&mut w, &sums))?;
                m += 1;
                if !last {
                    continue;
                }
                let lr = lr_at_iteration(&cfg.schedule, cfg.optimizer.lr, it, total);
                self.update(lr)?;
                it += 1;
                self.read_sums(&mut w, &sums, &format!("iteration {it}"))?;
                bar.inc(1);
                bar.set_message(window_message(&w, t0));
                if it.is_multiple_of(every) || it == total {
                    let secs = t0.elapsed().as_secs_f64();
                    self.checkpoint(epoch + 1, Some(it), lr, &w, t0, secs)?;
                    (w, t0) = (Window::default(), Instant::now());
                    sums = DeviceSums::new(self.model.device());
                }
            }
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// Seeds torch's generator (dropout masks) from the run's seed and a point a run can resume
/// from (an epoch, or an iteration), so a resumed run draws what an uninterrupted one draws.
fn reseed(seed: u64, point: usize) {
    let mut h = crate::hash::Fnv::default();
    h.write(&seed.to_le_bytes());
    h.write(&(point as u64).to_le_bytes());
    tch::manual_seed((h.value() >> 1) as i64);
}

fn window_message(w: &Window, t0: Instant) -> String {
    format!(
        "loss {:.4} acc {:.2}% {:.0} img/s",
        w.loss / w.images.max(1) as f64,
        100.0 * w.correct as f64 / w.counted.max(1) as f64,
        w.images as f64 / t0.elapsed().as_secs_f64().max(1e-9)
    )
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}
