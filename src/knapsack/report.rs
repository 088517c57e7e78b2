//! What a knapsack solution means: budget use, distortion and its certificate, where the
//! DReLUs went, which patch sizes were chosen, and the predicted secure-inference bytes.
use super::{Problem, Solution, Solver};
use crate::spec::{spec_cost, Spec};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Serialize)]
pub struct SiteAlloc {
    pub site: String,
    pub shape: [usize; 3],
    pub relus: usize,
    pub drelus: usize,
    /// The site's share of the budget: DReLUs / budget, or its bytes / budget for a budget
    /// in bytes.
    pub share_of_budget: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub input: [usize; 3],
    pub solver: Solver,
    /// The budget, in `budget_unit`.
    pub budget: u64,
    /// "drelus", or "bytes" (ReLU-layer bytes per image in brelu's engine).
    pub budget_unit: &'static str,
    pub relus: u64,
    pub drelus: u64,
    /// drelus / relus.
    pub ratio: f64,
    pub objective: f64,
    pub bound: f64,
    pub gap: f64,
    pub relative_gap: f64,
    pub seconds: f64,
    pub peak_bytes: Option<u64>,
    pub sites: Vec<SiteAlloc>,
    /// Channels per chosen option ("2x2", "identity", ...), over all sites.
    pub histogram: BTreeMap<String, usize>,
    /// Predicted bytes of the ReLU layers in brelu's engine, then in the published models.
    pub bytes_engine: u64,
    pub bytes_porthos: u64,
    pub bytes_securenn: u64,
    pub original_bytes_engine: u64,
    pub original_bytes_porthos: u64,
    pub original_bytes_securenn: u64,
    pub warnings: Vec<String>,
}

/// Builds the report of `sol` (and the spec it stands for).
pub fn build(
    p: &Problem,
    solver: Solver,
    budget: u64,
    sol: &Solution,
    seconds: f64,
) -> (Spec, Report) {
    let spec = p.to_spec(&sol.choice);
    let infos: Vec<_> = p.sites.iter().map(|s| s.info.clone()).collect();
    let cost = spec_cost(&spec, &infos);
    let mut histogram = BTreeMap::new();
    for opts in spec.sites.values() {
        for o in opts {
            *histogram.entry(o.to_string()).or_insert(0) += 1;
        }
    }
    let (budget, budget_unit) = match p.unit {
        super::CostUnit::Drelus => (budget, "drelus"),
        super::CostUnit::Bytes(unit) => (budget * unit, "bytes"),
    };
    let report = Report {
        model: p.model.clone(),
        input: p.input,
        solver,
        budget,
        budget_unit,
        relus: cost.relus as u64,
        drelus: cost.drelus as u64,
        ratio: cost.ratio,
        objective: sol.objective,
        bound: sol.bound,
        gap: sol.gap(),
        relative_gap: sol.gap() / sol.objective.abs().max(f64::MIN_POSITIVE),
        seconds,
        peak_bytes: sol.peak_bytes,
        sites: cost
            .sites
            .iter()
            .map(|s| SiteAlloc {
                site: s.site.clone(),
                shape: s.shape,
                relus: s.relus,
                drelus: s.drelus,
                share_of_budget: match p.unit {
                    super::CostUnit::Drelus => s.drelus as f64,
                    super::CostUnit::Bytes(_) => s.bytes_engine as f64,
                } / budget.max(1) as f64,
            })
            .collect(),
        histogram,
        bytes_engine: cost.bytes_engine,
        bytes_porthos: cost.bytes_porthos,
        bytes_securenn: cost.bytes_securenn,
        original_bytes_engine: cost.original_bytes_engine,
        original_bytes_porthos: cost.original_bytes_porthos,
        original_bytes_securenn: cost.original_bytes_securenn,
        warnings: p.warnings.clone(),
    };
    (spec, report)
}
