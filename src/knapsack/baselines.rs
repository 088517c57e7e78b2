//! The two baselines the knapsack is compared with: one patch size for every channel of the
//! network, and one per site with the budget split in proportion to the sites' ReLUs.
use crate::distortion::DistortionTables;
use crate::error::Result;
use crate::spec::{spec_cost, Catalog, PatchOption, SiteInfo, Spec};

/// Patch options of a site's catalog (identity and zero left out), most DReLUs first.
fn patches(catalog: &Catalog, s: &SiteInfo) -> Vec<PatchOption> {
    let mut v: Vec<PatchOption> = catalog
        .options(s)
        .into_iter()
        .filter(|o| matches!(o, PatchOption::Patch { .. }))
        .collect();
    v.sort_by_key(|o| std::cmp::Reverse(o.drelus(s.height, s.width)));
    v
}

fn spec_for(
    tables: &DistortionTables,
    sites: &[SiteInfo],
    pick: impl Fn(&SiteInfo) -> PatchOption,
) -> Spec {
    Spec {
        model: tables.model.clone(),
        input: tables.input,
        sites: sites
            .iter()
            .map(|s| (s.name.clone(), vec![pick(s); s.channels]))
            .collect(),
        source: None,
    }
}

/// One patch size for every channel: the one with the most DReLUs within the budget (the
/// candidates are the square patches 1x1 .. of the largest map, clipped to each site); `None`
/// when even one DReLU per channel exceeds the budget.
pub fn uniform_spec(tables: &DistortionTables, sites: &[SiteInfo], budget: u64) -> Option<Spec> {
    let side = sites
        .iter()
        .map(|s| s.height.max(s.width))
        .max()
        .unwrap_or(1) as u32;
    (1..=side)
        .map(|k| Spec::uniform(&tables.model, tables.input, sites, PatchOption::patch(k, k)))
        .find(|spec| spec_cost(spec, sites).drelus as u64 <= budget)
}

/// The budget split across sites in proportion to their ReLUs; per site the catalog patch
/// with the most DReLUs that fits its share (identity when none does).
pub fn per_site_spec(
    tables: &DistortionTables,
    sites: &[SiteInfo],
    catalog: &Catalog,
    budget: u64,
) -> Result<Spec> {
    let relus: u64 = sites.iter().map(|s| s.relus() as u64).sum();
    Ok(spec_for(tables, sites, |s| {
        let share = budget as f64 * s.relus() as f64 / relus as f64;
        patches(catalog, s)
            .into_iter()
            .find(|o| (o.drelus(s.height, s.width) * s.channels) as f64 <= share)
            .unwrap_or(PatchOption::Identity)
    }))
}
