//! Is distortion additive? The knapsack adds up per-channel distortions measured one channel at
//! a time (docs/method.md 6); a spec switches all its channels at once. This measures, for each
//! spec, the true distortion of the whole spec and of each site's part alone, next to the sum
//! the knapsack assumed (the published authors' additivity analysis, their Figure 8).
use super::compare::spec_distortion;
use crate::distortion::{DistortionTables, Samples};
use crate::error::Result;
use crate::models::Model;
use crate::spec::{PatchOption, Spec};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// One site of a spec: its channels switched alone.
#[derive(Clone, Debug, Serialize)]
pub struct SiteAdditivity {
    pub site: String,
    /// Sum of the table entries of the site's chosen options.
    pub assumed: f64,
    /// Distortion with only this site switched.
    pub measured: f64,
}

/// One spec: all its channels switched at once.
#[derive(Clone, Debug, Serialize)]
pub struct SpecAdditivity {
    pub name: String,
    pub drelus: usize,
    pub relus: usize,
    /// The knapsack's objective: the sum of the table entries of the chosen options.
    pub assumed: f64,
    /// The whole spec's distortion, measured as the tables are (docs/method.md 5).
    pub measured: f64,
    pub sites: Vec<SiteAdditivity>,
}

/// The model's outputs on `samples` in batches of `batch`, as float64 rows.
pub(super) fn outputs(model: &Model, samples: &Samples, batch: usize) -> Vec<Tensor> {
    let _g = tch::no_grad_guard();
    (0..samples.len())
        .step_by(batch.max(1))
        .map(|lo| {
            let hi = (lo + batch.max(1)).min(samples.len());
            let x = samples.batch(lo, hi, model.device());
            model
                .forward_t(&x, false)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu)
        })
        .collect()
}

/// Mean over samples and output elements of (f_spec(x) - f(x))^2, `reference` being f.
pub(super) fn distortion(
    model: &Model,
    samples: &Samples,
    batch: usize,
    reference: &[Tensor],
) -> Result<f64> {
    let mut sum = 0.0;
    let mut count = 0i64;
    for (y, y0) in outputs(model, samples, batch).iter().zip(reference) {
        sum += (y - y0).square().sum(Kind::Double).double_value(&[]);
        count += y0.numel() as i64;
    }
    Ok(sum / count.max(1) as f64)
}

/// Measures every spec of `specs` (name, spec) on `model` (whose own spec, if any, is the
/// reference, as the tables' baseline is) against `tables`; with `per_site`, each site's part
/// alone too.
pub fn measure(
    model: &mut Model,
    samples: &Samples,
    batch: usize,
    tables: &DistortionTables,
    specs: &[(String, Spec)],
    per_site: bool,
) -> Result<Vec<SpecAdditivity>> {
    let reference = outputs(model, samples, batch);
    let infos = model.sites().to_vec();
    let baseline: Vec<Option<Vec<PatchOption>>> = (0..infos.len())
        .map(|i| model.site_options(i).map(<[_]>::to_vec))
        .collect();
    let restore = |m: &mut Model| -> Result<()> {
        for (i, b) in baseline.iter().enumerate() {
            m.set_site_options(i, b.clone())?;
        }
        Ok(())
    };
    let mut out = Vec::new();
    for (name, spec) in specs {
        spec.validate(model.name(), model.config().input, &infos)?;
        model.apply_spec(spec)?;
        let measured = distortion(model, samples, batch, &reference)?;
        restore(model)?;
        let mut sites = Vec::new();
        if per_site {
            for (i, site) in infos.iter().enumerate() {
                let opts = &spec.sites[&site.name];
                let unchanged = match &baseline[i] {
                    Some(b) => b == opts,
                    None => opts.iter().all(|o| *o == PatchOption::RELU),
                };
                if unchanged {
                    continue;
                }
                let mut one = spec.clone();
                one.sites.retain(|k, _| k == &site.name);
                let assumed = spec_distortion(tables, &one)?;
                model.set_site_options(i, Some(opts.clone()))?;
                let measured = distortion(model, samples, batch, &reference)?;
                restore(model)?;
                sites.push(SiteAdditivity {
                    site: site.name.clone(),
                    assumed,
                    measured,
                });
            }
        }
        let cost = crate::spec::spec_cost(spec, &infos);
        out.push(SpecAdditivity {
            name: name.clone(),
            drelus: cost.drelus,
            relus: cost.relus,
            assumed: spec_distortion(tables, spec)?,
            measured,
            sites,
        });
    }
    Ok(out)
}
