//! The first-order estimator: |J delta|^2 from probe-vector gradients at every site, one
//! backward pass per probe serving all sites.
use super::worker::Worker;
use super::{JobSite, Unit};
use crate::data::Rng;
use crate::error::Result;
use crate::npy;
use crate::ops;
use crate::spec::PatchOption;
use std::path::Path;
use tch::{Kind, Tensor};

impl Worker<'_> {
    /// Computes and writes one sample batch of every site with the first-order estimator;
    /// returns the number of perturbed evaluations.
    pub(super) fn first_order_unit(&mut self, dir: &Path, u: Unit) -> Result<u64> {
        let (lo, hi) = self.batch_range(u.batch);
        let n = hi - lo;
        let x = self
            .samples
            .batch(lo, hi, self.device)
            .set_requires_grad(true);
        let (out, sites) = self.model.forward_with_sites(&x);
        let out = out.reshape([n as i64, -1]);
        let k_out = out.size()[1] as usize;
        // Against the all-ReLU network: |J d + e|^2 - |e|^2 = |J d|^2 + 2 (J d).e, and
        // E_r[(r.Jd)(r.e)] = (Jd).e as E_r[(r.Jd)^2] = |Jd|^2.
        let err = self.relu_error(&x.detach(), &out.detach().to_kind(Kind::Double));
        let basis = self.job.probes >= k_out;
        let probes = if basis { k_out } else { self.job.probes };
        // E[(r.v)^2] = |v|^2 for Rademacher r; the basis sums instead. Then the mean over
        // output elements.
        let weight = if basis { 1.0 } else { 1.0 / probes as f64 } / k_out as f64;
        let chosen: Vec<(&JobSite, &(Tensor, Tensor))> = self
            .job
            .sites
            .values()
            .map(|s| (s, &sites[s.index]))
            .collect();
        let acts: Vec<Tensor> = chosen.iter().map(|(_, (_, a))| a.shallow_clone()).collect();
        let mut sums: Vec<Vec<f64>> = chosen
            .iter()
            .map(|(s, _)| vec![0.0; s.shape[0] * s.options.len()])
            .collect();
        for p in 0..probes {
            let r = if basis {
                Tensor::zeros([n as i64, k_out as i64], (Kind::Float, self.device)).index_fill(
                    1,
                    &Tensor::from_slice(&[p as i64]).to_device(self.device),
                    1.0,
                )
            } else {
                let mut rng = Rng::for_epoch(self.job.seed, u.batch, 1000 + p as u64);
                let v: Vec<f32> = (0..n * k_out)
                    .map(|_| if rng.next_u64() >> 63 == 0 { 1.0 } else { -1.0 })
                    .collect();
                Tensor::from_slice(&v)
                    .view([n as i64, k_out as i64])
                    .to_device(self.device)
            };
            let r_err = err.as_ref().map(|e| {
                (e * r.to_kind(Kind::Double)).sum_dim_intlist([1i64].as_slice(), true, Kind::Double)
            });
            let target = (&out * r).sum(Kind::Float);
            let grads = Tensor::run_backward(&[target], &acts, true, false);
            let _guard = tch::no_grad_guard();
            for ((site, (pre, act)), (g, sum)) in
                chosen.iter().zip(grads.iter().zip(sums.iter_mut()))
            {
                let c = site.shape[0];
                let nopt = site.options.len();
                let base = act.detach();
                let pre = pre.detach();
                for (k, o) in site.options.iter().enumerate() {
                    let delta = ops::f_block_relu(&pre, &vec![*o; c])? - &base;
                    let a = (g * delta).sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Double);
                    let s = match &r_err {
                        None => a.square(),
                        Some(b) => &a * (&a + b * 2.0),
                    }
                    .sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
                    let s = Vec::<f64>::try_from(s)?;
                    for ch in 0..c {
                        sum[ch * nopt + k] += weight * s[ch];
                    }
                }
            }
        }
        let baseline: Vec<Vec<PatchOption>> = chosen
            .iter()
            .map(|(s, _)| self.baseline(s.index, s.shape[0]))
            .collect();
        let mut evals = 0u64;
        for (((site, _), sum), (base, path)) in chosen
            .iter()
            .zip(sums.iter_mut())
            .zip(baseline.iter().zip(self.job.unit_files(dir, u)))
        {
            let nopt = site.options.len();
            for (c, b) in base.iter().enumerate() {
                for (k, o) in site.options.iter().enumerate() {
                    if o == b {
                        sum[c * nopt + k] = 0.0;
                    } else {
                        evals += n as u64;
                    }
                }
            }
            npy::write_f64(&path, &[site.shape[0], nopt], sum)?;
        }
        Ok(evals)
    }
}
