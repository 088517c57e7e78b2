//! What a cheap estimator costs: per-site rank agreement of two sets of tables and the
//! distortion (measured by the second) of the knapsack solution picked with the first.
use super::{BuildOptions, Problem, Solver};
use crate::distortion::DistortionTables;
use crate::error::{Error, Result};
use crate::spec::{SiteInfo, Spec};
use serde::Serialize;

/// Ranks with ties sharing their mean rank (1-based).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (Pearson correlation of the ranks; NaN when either side is
/// constant or there are fewer than two values).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "paired samples");
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa * sbb).sqrt()
}

#[derive(Clone, Debug, Serialize)]
pub struct SiteComparison {
    pub site: String,
    /// Entries compared (both tables have the option; pairs that are 0 in both are left out,
    /// being zero by construction).
    pub entries: usize,
    pub spearman: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub sites: Vec<SiteComparison>,
    pub budget: u64,
    /// B's distortion of the solution chosen on A's tables.
    pub b_objective_of_a_solution: f64,
    /// B's distortion of the solution chosen on B's own tables (the best B knows).
    pub b_objective_of_b_solution: f64,
}

impl Comparison {
    /// How much worse (as a ratio, >= 1 when both solutions are optimal) picking with A is,
    /// as B measures it.
    pub fn ratio(&self) -> f64 {
        self.b_objective_of_a_solution / self.b_objective_of_b_solution
    }
}

/// Total distortion of `spec` according to `t` (a channel whose option `t` lacks is an error).
pub fn spec_distortion(t: &DistortionTables, spec: &Spec) -> Result<f64> {
    let mut total = 0.0;
    for (name, table) in &t.sites {
        let Some(opts) = spec.sites.get(name) else {
            continue;
        };
        for (c, o) in opts.iter().enumerate() {
            let k = table.options.iter().position(|x| x == o).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "site '{name}' channel {c}: option {o} is not in the table's options"
                ))
            })?;
            total += table.get(c, k);
        }
    }
    Ok(total)
}

/// Compares tables `a` (e.g. a fast estimator) with `b` (e.g. exact) of the same model.
pub fn compare(
    a: &DistortionTables,
    b: &DistortionTables,
    sites: &[SiteInfo],
    budget: u64,
    max_memory: u64,
) -> Result<Comparison> {
    if a.model != b.model || a.input != b.input {
        return Err(Error::InvalidArgument(format!(
            "the tables are of different models: {} at {:?} vs {} at {:?}",
            a.model, a.input, b.model, b.input
        )));
    }
    let mut out = Vec::new();
    for (name, ta) in &a.sites {
        let Some(tb) = b.sites.get(name) else {
            continue;
        };
        if ta.shape != tb.shape {
            return Err(Error::InvalidArgument(format!(
                "site '{name}': shapes {:?} vs {:?}",
                ta.shape, tb.shape
            )));
        }
        let (mut xa, mut xb) = (Vec::new(), Vec::new());
        for (ka, o) in ta.options.iter().enumerate() {
            let Some(kb) = tb.options.iter().position(|x| x == o) else {
                continue;
            };
            for c in 0..ta.channels() {
                let (va, vb) = (ta.get(c, ka), tb.get(c, kb));
                if va == 0.0 && vb == 0.0 {
                    continue;
                }
                xa.push(va);
                xb.push(vb);
            }
        }
        out.push(SiteComparison {
            site: name.clone(),
            entries: xa.len(),
            spearman: spearman(&xa, &xb),
        });
    }
    let opts = BuildOptions {
        keep_relu_for_missing: true,
        raw: false,
        ..Default::default()
    };
    let solve_spec = |t: &DistortionTables| -> Result<Spec> {
        let p = Problem::build(t, sites, opts)?;
        let (_, sol) = super::solve(&p, budget, Solver::Auto, max_memory)?;
        Ok(p.to_spec(&sol.choice))
    };
    Ok(Comparison {
        sites: out,
        budget,
        b_objective_of_a_solution: spec_distortion(b, &solve_spec(a)?)?,
        b_objective_of_b_solution: spec_distortion(b, &solve_spec(b)?)?,
    })
}
