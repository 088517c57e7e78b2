//! Learning-rate schedules: linear warm-up from a fraction of the base rate, then step decay
//! (x gamma at each milestone), cosine decay to `min_lr`, poly decay to `min_lr` or a
//! constant rate. Evaluated
//! once per epoch, before every batch when `per_iteration` is set (then warm-up and cosine
//! move smoothly with the fraction of the epoch done; step milestones stay whole epochs), or,
//! for iteration-based runs (`iterations`), per iteration with warm-up and milestones counted
//! in iterations.
use super::config::{ScheduleConfig, ScheduleKind};

/// The rate for batch `batch` of `batches` in `epoch` (0-based): [`lr_at_progress`] at
/// `epoch + batch / batches` with `per_iteration`, else [`lr_at`] of the epoch.
pub fn lr_for_batch(
    s: &ScheduleConfig,
    lr: f64,
    epoch: usize,
    batch: usize,
    batches: usize,
    epochs: usize,
) -> f64 {
    if s.per_iteration {
        lr_at_progress(
            s,
            lr,
            epoch as f64 + batch as f64 / batches.max(1) as f64,
            epochs,
        )
    } else {
        lr_at(s, lr, epoch, epochs)
    }
}

/// The rate for `epoch` (0-based) of `epochs`, base rate `lr` (warm-up: `warmup_epochs`).
///
/// Warm-up (epochs `0..w`): `lr * (s + (1 - s) * epoch / w)` with `s = warmup_start`.
/// Step: `max(lr * gamma^k, min_lr)`, k = milestones `<= epoch`.
/// Cosine: `min_lr + (lr - min_lr) * (1 + cos(pi * (epoch - w) / (epochs - w))) / 2`.
/// Poly: `min_lr + (lr - min_lr) * (1 - epoch / epochs)^power`.
/// Constant: `lr`.
pub fn lr_at(s: &ScheduleConfig, lr: f64, epoch: usize, epochs: usize) -> f64 {
    lr_at_progress(s, lr, epoch as f64, epochs)
}

/// [`lr_at`] at a fractional epoch `t` (epochs done so far): the same formulas with `t` for
/// `epoch`, except that step milestones count whole epochs (`floor(t)`).
pub fn lr_at_progress(s: &ScheduleConfig, lr: f64, t: f64, epochs: usize) -> f64 {
    rate(s, lr, t, epochs as f64, s.warmup_epochs as f64)
}

/// [`lr_at`] per iteration `it` of `iterations` (warm-up: `warmup_iterations`, milestones in
/// iterations).
pub fn lr_at_iteration(s: &ScheduleConfig, lr: f64, it: usize, iterations: usize) -> f64 {
    rate(
        s,
        lr,
        it as f64,
        iterations as f64,
        s.warmup_iterations as f64,
    )
}

fn rate(s: &ScheduleConfig, lr: f64, t: f64, total: f64, w: f64) -> f64 {
    if t < w {
        return lr * (s.warmup_start + (1.0 - s.warmup_start) * t / w);
    }
    match s.kind {
        ScheduleKind::Step => {
            let k = s
                .milestones
                .iter()
                .filter(|&&m| m as f64 <= t.floor())
                .count();
            (lr * s.gamma.powi(k as i32)).max(s.min_lr)
        }
        ScheduleKind::Cosine => {
            let span = (total - w).max(1.0);
            let f = ((t - w) / span).min(1.0);
            s.min_lr + (lr - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())
        }
        // mmseg's PolyLR: the decay counts from step 0, warm-up only overrides its start.
        ScheduleKind::Poly => {
            let p = (t / total.max(1.0)).min(1.0);
            s.min_lr + (lr - s.min_lr) * (1.0 - p).powf(s.power)
        }
        ScheduleKind::Constant => lr,
    }
}
