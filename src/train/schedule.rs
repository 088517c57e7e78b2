//! Learning-rate schedules, evaluated per epoch or, for iteration-based runs, per iteration:
//! linear warm-up from a fraction of the base rate, then step decay (x gamma at each
//! milestone), cosine decay to `min_lr`, or poly decay to `min_lr`.
use super::config::{ScheduleConfig, ScheduleKind};

/// The rate for `epoch` (0-based) of `epochs`, base rate `lr` (warm-up: `warmup_epochs`).
///
/// Warm-up (epochs `0..w`): `lr * (s + (1 - s) * epoch / w)` with `s = warmup_start`.
/// Step: `max(lr * gamma^k, min_lr)`, k = milestones `<= epoch`.
/// Cosine: `min_lr + (lr - min_lr) * (1 + cos(pi * (epoch - w) / (epochs - w))) / 2`.
/// Poly: `min_lr + (lr - min_lr) * (1 - epoch / epochs)^power`.
pub fn lr_at(s: &ScheduleConfig, lr: f64, epoch: usize, epochs: usize) -> f64 {
    rate(s, lr, epoch, epochs, s.warmup_epochs)
}

/// [`lr_at`] per iteration `it` of `iterations` (warm-up: `warmup_iterations`, milestones in
/// iterations).
pub fn lr_at_iteration(s: &ScheduleConfig, lr: f64, it: usize, iterations: usize) -> f64 {
    rate(s, lr, it, iterations, s.warmup_iterations)
}

fn rate(s: &ScheduleConfig, lr: f64, t: usize, total: usize, w: usize) -> f64 {
    if t < w {
        let f = s.warmup_start + (1.0 - s.warmup_start) * t as f64 / w as f64;
        return lr * f;
    }
    match s.kind {
        ScheduleKind::Step => {
            let k = s.milestones.iter().filter(|&&m| m <= t).count();
            (lr * s.gamma.powi(k as i32)).max(s.min_lr)
        }
        ScheduleKind::Cosine => {
            let span = total.saturating_sub(w).max(1) as f64;
            let p = ((t - w) as f64 / span).min(1.0);
            s.min_lr + (lr - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        // mmseg's PolyLR: the decay counts from step 0, warm-up only overrides its start.
        ScheduleKind::Poly => {
            let p = (t as f64 / total.max(1) as f64).min(1.0);
            s.min_lr + (lr - s.min_lr) * (1.0 - p).powf(s.power)
        }
    }
}
