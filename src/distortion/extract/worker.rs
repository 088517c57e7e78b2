//! A worker: one model on one device computing units. The exact and SNR estimators are in
//! [`super::exact`], the first-order one in [`super::first_order`].
use super::{Estimator, Job, Samples, Unit};
use crate::error::Result;
use crate::models::Model;
use crate::ops;
use crate::spec::PatchOption;
use std::path::Path;
use tch::{Device, Tensor};

/// Cached values of the last (site, batch) a worker touched.
pub(super) struct SiteCache {
    pub(super) key: (usize, usize),
    pub(super) state: crate::models::SiteState,
    /// The site's baseline activation.
    pub(super) base: Tensor,
    /// The clean output (logits, or the block output for SNR) [n, ...].
    pub(super) clean: Tensor,
    /// SNR: per-sample mean squared clean block output.
    pub(super) power: Vec<f64>,
    /// Against the all-ReLU network: clean output minus its output, [n, K] float64.
    pub(super) err: Option<Tensor>,
}

pub(super) struct Worker<'a> {
    pub(super) job: &'a Job,
    pub(super) model: &'a Model,
    /// The all-ReLU network, when the job measures against it.
    pub(super) relu: Option<&'a Model>,
    pub(super) samples: &'a Samples,
    pub(super) device: Device,
    pub(super) estimator: Estimator,
    pub(super) cache: Option<SiteCache>,
}

impl<'a> Worker<'a> {
    pub(super) fn new(
        job: &'a Job,
        model: &'a Model,
        relu: Option<&'a Model>,
        samples: &'a Samples,
        device: Device,
    ) -> Result<Self> {
        Ok(Worker {
            job,
            model,
            relu,
            samples,
            device,
            estimator: job.estimator()?,
            cache: None,
        })
    }

    pub(super) fn batch_range(&self, b: usize) -> (usize, usize) {
        let lo = b * self.job.batch;
        (lo, (lo + self.job.batch).min(self.job.samples))
    }

    /// Computes and writes one unit; returns the number of perturbed evaluations.
    pub(super) fn unit(&mut self, dir: &Path, u: Unit) -> Result<u64> {
        match u.site {
            Some(si) => {
                let _guard = tch::no_grad_guard();
                self.site_unit(dir, si, u)
            }
            None => self.first_order_unit(dir, u),
        }
    }

    /// The baseline option of every channel of a site.
    pub(super) fn baseline(&self, index: usize, channels: usize) -> Vec<PatchOption> {
        self.model
            .site_options(index)
            .map(<[_]>::to_vec)
            .unwrap_or_else(|| vec![PatchOption::RELU; channels])
    }

    /// `clean` ([n, K] float64 outputs of the baseline network on `x`) minus the all-ReLU
    /// network's outputs, when the job measures against it.
    pub(super) fn relu_error(&self, x: &Tensor, clean: &Tensor) -> Option<Tensor> {
        let relu = self.relu?;
        let _guard = tch::no_grad_guard();
        let f = relu.forward_t(x, false).to_kind(tch::Kind::Double);
        Some(clean - f.reshape(clean.size().as_slice()))
    }

    pub(super) fn activate(&self, index: usize, z: &Tensor) -> Tensor {
        match self.model.site_options(index) {
            None => z.relu(),
            Some(o) => ops::block_relu(z, o),
        }
    }
}
