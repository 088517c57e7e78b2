//! Batch-norm recalibration (issue 31): a spec changes what every layer after a block-ReLU site
//! sees, so the running statistics learned under ReLU no longer match and the errors of many
//! channels add up through them. Re-estimating them on training batches, in train mode with the
//! weights untouched, removes that part of the distortion before any fine-tuning.
use crate::data::{BatchIter, Dataset, Normalize};
use crate::error::{Error, Result};
use crate::models::Model;
use tch::Tensor;

/// The momentum every batch norm of brelu's models uses (`models::norm`).
const MOMENTUM: f64 = 0.1;

/// Every batch norm's running mean and variance (sharing storage with the model).
pub fn running_stats(model: &Model) -> Vec<Tensor> {
    model
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with("running_mean") || n.ends_with("running_var"))
        .map(|(_, t)| t)
        .collect()
}

/// Replaces every batch norm's running mean and variance by their averages over the first
/// `batches` shuffled training batches (`seed`, no augmentation), as PyTorch's cumulative
/// average (`momentum=None`) computes them; parameters do not change. Returns the batches
/// used (fewer when the split is shorter).
pub fn recalibrate_bn(
    model: &Model,
    data: &Dataset,
    norm: &Normalize,
    batch: usize,
    batches: usize,
    seed: u64,
) -> Result<usize> {
    if batch == 0 {
        return Err(Error::InvalidArgument(
            "batch-norm recalibration: the batch size must be at least 1".into(),
        ));
    }
    let stats = running_stats(model);
    if stats.is_empty() || batches == 0 {
        return Ok(0);
    }
    // Restored if a batch fails: the caller's network is never left half-recalibrated.
    let backup: Vec<Tensor> = stats.iter().map(Tensor::copy).collect();
    let mut sums: Vec<Tensor> = stats.iter().map(Tensor::zeros_like).collect();
    let it = BatchIter::train(data, batch, seed, 0, None, norm.clone(), model.device());
    let mut used = 0usize;
    let run = tch::no_grad(|| -> Result<()> {
        for b in it.take(batches) {
            let (x, _) = b?;
            // From zero, one update leaves momentum x the batch's statistic.
            for t in &stats {
                let _ = t.shallow_clone().zero_();
            }
            let _ = model.forward_t(&x, true);
            for (s, t) in sums.iter_mut().zip(&stats) {
                *s += t / MOMENTUM;
            }
            used += 1;
        }
        Ok(())
    });
    tch::no_grad(|| {
        for ((s, b), t) in sums.iter().zip(&backup).zip(&stats) {
            match (&run, used) {
                (Ok(()), 1..) => t.shallow_clone().copy_(&(s / used as f64)),
                _ => t.shallow_clone().copy_(b),
            };
        }
    });
    run.map(|()| used)
}
