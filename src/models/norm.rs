//! Batch norm as the models run it: over the rank's own batch, or, in data-parallel training
//! with `--sync-bn`, over all ranks' batches (used by the graph runtime and the auxiliary head).
use tch::Tensor;

/// Batch norm with parameters [weight, bias, running mean, running variance] (momentum 0.1),
/// over all ranks' batches in data-parallel training with synchronised batch norm
/// (`--sync-bn`).
pub(super) fn batch_norm(x: &Tensor, p: [&Tensor; 4], train: bool, eps: f64) -> Tensor {
    match crate::dist::sync_batch_norm_group() {
        Some(g) if train => g
            .sync_batch_norm(x, p, 0.1, eps)
            .unwrap_or_else(|e| panic!("{e}")),
        _ => Tensor::batch_norm(
            x,
            Some(p[0]),
            Some(p[1]),
            Some(p[2]),
            Some(p[3]),
            train,
            0.1,
            eps,
            false,
        ),
    }
}
