//! Learning-rate schedules, evaluated per epoch: linear warm-up from a fraction of the base
//! rate, then step decay (x gamma at each milestone) or cosine decay to `min_lr`.
use super::config::{ScheduleConfig, ScheduleKind};

/// The rate for `epoch` (0-based) of `epochs`, base rate `lr`.
///
/// Warm-up (epochs `0..w`): `lr * (s + (1 - s) * epoch / w)` with `s = warmup_start`.
/// Step: `max(lr * gamma^k, min_lr)`, k = milestones `<= epoch`.
/// Cosine: `min_lr + (lr - min_lr) * (1 + cos(pi * (epoch - w) / (epochs - w))) / 2`.
pub fn lr_at(s: &ScheduleConfig, lr: f64, epoch: usize, epochs: usize) -> f64 {
    let w = s.warmup_epochs;
    if epoch < w {
        let f = s.warmup_start + (1.0 - s.warmup_start) * epoch as f64 / w as f64;
        return lr * f;
    }
    match s.kind {
        ScheduleKind::Step => {
            let k = s.milestones.iter().filter(|&&m| m <= epoch).count();
            (lr * s.gamma.powi(k as i32)).max(s.min_lr)
        }
        ScheduleKind::Cosine => {
            let span = epochs.saturating_sub(w).max(1) as f64;
            let t = ((epoch - w) as f64 / span).min(1.0);
            s.min_lr + (lr - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}
