//! The exact and SNR estimators: perturb one channel of a site per copy, run the network on
//! from the site and compare with the clean output.
use super::worker::{SiteCache, Worker};
use super::{Estimator, JobSite, Unit};
use crate::error::Result;
use crate::npy;
use crate::ops;
use crate::spec::PatchOption;
use std::path::Path;
use tch::{Kind, Tensor};

impl Worker<'_> {
    /// Computes and writes one (site, batch, chunk) unit with the exact or SNR estimator;
    /// returns the number of perturbed evaluations.
    pub(super) fn site_unit(&mut self, dir: &Path, si: usize, u: Unit) -> Result<u64> {
        let job = self.job;
        let site = &job.sites[si];
        let (lo, hi) = self.batch_range(u.batch);
        let n = hi - lo;
        let stop = match self.estimator {
            Estimator::Snr => self.model.block_output_op(site.index),
            _ => self.model.graph().ops.len() - 1,
        };
        self.fill_cache(site.index, u.batch, stop)?;
        let cache = self.cache.as_ref().expect("cache filled");
        let baseline = self.baseline(site.index, site.shape[0]);
        let c0 = u.chunk * site.chunk;
        let c1 = (c0 + site.chunk).min(site.shape[0]);
        let nopt = site.options.len();
        let mut sums = vec![0.0f64; (c1 - c0) * nopt];
        // Perturbations that can change anything: the baseline's own option gives D = 0.
        let pairs: Vec<(usize, usize)> = (c0..c1)
            .flat_map(|c| (0..nopt).map(move |k| (c, k)))
            .filter(|&(c, k)| site.options[k] != baseline[c])
            .collect();
        let all_relu = self.model.site_options(site.index).is_none();
        for group in pairs.chunks(self.job.stack) {
            self.add_group(cache, site, group, n, stop, c0, all_relu, &mut sums)?;
        }
        let path = &self.job.unit_files(dir, u)[0];
        npy::write_f64(path, &[c1 - c0, nopt], &sums)?;
        Ok((pairs.len() * n) as u64)
    }

    /// Runs the network up to the site for `batch` unless the cache holds it already.
    fn fill_cache(&mut self, index: usize, batch: usize, stop: usize) -> Result<()> {
        let (lo, hi) = self.batch_range(batch);
        let n = hi - lo;
        if self.cache.as_ref().map(|c| c.key) != Some((index, batch)) {
            self.cache = None; // free the old one first
            let x = self.samples.batch(lo, hi, self.device);
            let state = self.model.prefix(&x, index);
            let base = self.activate(index, &state.pre);
            let clean = self
                .model
                .forward_from_to(&state, &base, stop)
                .to_kind(Kind::Double)
                .reshape([n as i64, -1]);
            let power = if self.estimator == Estimator::Snr {
                Vec::<f64>::try_from(clean.square().mean_dim(1, false, Kind::Double))?
            } else {
                vec![1.0; n]
            };
            let err = self.relu_error(&x, &clean);
            self.cache = Some(SiteCache {
                key: (index, batch),
                state,
                base,
                clean,
                power,
                err,
            });
        }
        Ok(())
    }

    /// Adds the distortions of one stack of perturbations (`group`: (channel, option index)
    /// pairs of `site`) to `sums`, whose rows start at channel `c0`.
    fn add_group(
        &self,
        cache: &SiteCache,
        site: &JobSite,
        group: &[(usize, usize)],
        n: usize,
        stop: usize,
        c0: usize,
        all_relu: bool,
        sums: &mut [f64],
    ) -> Result<()> {
        let nopt = site.options.len();
        let perts: Vec<(usize, PatchOption)> =
            group.iter().map(|&(c, k)| (c, site.options[k])).collect();
        let j = group.len() as i64;
        let mut act = ops::f_simulate(&cache.state.pre, &perts)?;
        if !all_relu {
            // Copy j is the baseline except channel c_j.
            let sz = cache.base.size();
            let mut sel = vec![false; group.len() * sz[1] as usize];
            for (i, &(c, _)) in group.iter().enumerate() {
                sel[i * sz[1] as usize + c] = true;
            }
            let sel = Tensor::from_slice(&sel)
                .view([j, 1, sz[1], 1, 1])
                .to_device(self.device);
            let mut full = vec![j];
            full.extend_from_slice(&sz);
            act = act
                .view(full.as_slice())
                .where_self(&sel, &cache.base.unsqueeze(0))
                .view([j * sz[0], sz[1], sz[2], sz[3]]);
        }
        // Rows (copy i, sample x) in copy-major order; with `skip_unchanged`, only those
        // whose activation differs from the baseline: the others have D = 0 exactly.
        let rows: Vec<usize> = if self.job.skip_unchanged {
            let sz = cache.base.size();
            let actv = act.view([j, n as i64, sz[1], sz[2], sz[3]]);
            let mut changed = Vec::with_capacity(group.len());
            for (i, &(c, _)) in group.iter().enumerate() {
                let a = actv.get(i as i64).select(1, c as i64);
                let b = cache.base.select(1, c as i64);
                changed.push(a.ne_tensor(&b).flatten(1, -1).any_dim(1, false));
            }
            let changed = Vec::<bool>::try_from(Tensor::cat(&changed, 0))?;
            (0..changed.len()).filter(|&r| changed[r]).collect()
        } else {
            (0..group.len() * n).collect()
        };
        if rows.is_empty() {
            return Ok(());
        }
        let (out, clean, err) = if rows.len() == group.len() * n {
            let out = self.model.forward_rows(&cache.state, &act, None, stop);
            let clean = cache.clean.repeat([j, 1]);
            (out, clean, cache.err.as_ref().map(|e| e.repeat([j, 1])))
        } else {
            let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let idx = Tensor::from_slice(&idx).to_device(self.device);
            let sample: Vec<i64> = rows.iter().map(|&r| (r % n) as i64).collect();
            let sample = Tensor::from_slice(&sample).to_device(self.device);
            let out = self.model.forward_rows(
                &cache.state,
                &act.index_select(0, &idx),
                Some(&sample),
                stop,
            );
            let err = cache.err.as_ref().map(|e| e.index_select(0, &sample));
            (out, cache.clean.index_select(0, &sample), err)
        };
        let d = out.to_kind(Kind::Double).reshape([rows.len() as i64, -1]) - clean;
        // Against the all-ReLU network f: |d + e|^2 - |e|^2 = d (d + 2e), e = f_S - f.
        let d = match err {
            None => d.square(),
            Some(e) => &d * (&d + e * 2.0),
        }
        .mean_dim(1, false, Kind::Double);
        let d = Vec::<f64>::try_from(d)?;
        // Per pair, samples are added in sample order whatever was skipped.
        for (&r, x) in rows.iter().zip(&d) {
            let (c, k) = group[r / n];
            let p = cache.power[r % n];
            sums[(c - c0) * nopt + k] += if p > 0.0 { x / p } else { *x };
        }
        Ok(())
    }
}
