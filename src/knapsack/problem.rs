//! The multiple-choice knapsack instance (docs/method.md section 6) built from distortion tables:
//! one group of items per channel, an item being (cost, distortion, option). The cost is the
//! option's DReLUs, or its bytes in brelu's secure engine ([`CostUnit::Bytes`]) for a budget
//! in bytes.
//!
//! Building it drops options with a non-finite distortion (with a warning), keeps per channel
//! and per distinct cost only the least-distortion option, and removes dominated items (an
//! item that costs more than another and is not better can never be needed), so every
//! channel's items have strictly increasing cost and strictly decreasing distortion.
use crate::distortion::DistortionTables;
use crate::error::{Error, Result};
use crate::spec::{CostModel, PatchOption, SiteInfo, Spec};
use indexmap::IndexMap;

/// One choice for a channel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Item {
    pub cost: u32,
    pub dist: f64,
    /// Index into the site's option list.
    pub option: u16,
}

/// A site as the knapsack sees it.
#[derive(Clone, Debug)]
pub struct SiteEntry {
    pub info: SiteInfo,
    pub options: Vec<PatchOption>,
    /// `Some(option index)` when the site has no table and keeps one fixed option.
    pub fixed: Option<u16>,
}

/// The instance: channels in model order (site by site), each with its items.
#[derive(Clone, Debug)]
pub struct Problem {
    pub model: String,
    pub input: [usize; 3],
    pub sites: Vec<SiteEntry>,
    /// (site index, channel) of every free channel.
    pub channels: Vec<(u32, u32)>,
    /// Items of every free channel, cost strictly increasing, distortion strictly decreasing.
    pub items: Vec<Vec<Item>>,
    /// Cost of sites kept at a fixed option (counted in the budget).
    pub fixed_cost: u64,
    /// What the costs count.
    pub unit: CostUnit,
    /// Things the user should know (dropped non-finite entries, ...).
    pub warnings: Vec<String>,
}

/// What an item's cost counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CostUnit {
    /// DReLUs (the published method's budget).
    #[default]
    Drelus,
    /// Bytes per image of the ReLU layers in brelu's engine (docs/method.md 8.6), counted in
    /// units of this many bytes, each channel's rounded up (so a solution never exceeds its
    /// budget in bytes).
    Bytes(u64),
}

impl CostUnit {
    /// The cost of `option` on a channel of an `h x w` map.
    pub fn cost(self, option: PatchOption, h: usize, w: usize) -> u64 {
        match self {
            CostUnit::Drelus => option.drelus(h, w) as u64,
            CostUnit::Bytes(unit) => CostModel::Engine
                .channel_bytes(option, h, w)
                .div_ceil(unit.max(1)),
        }
    }

    /// How a cost of `n` reads in messages.
    pub fn show(self, n: u64) -> String {
        match self {
            CostUnit::Drelus => format!("{n} DReLUs"),
            CostUnit::Bytes(unit) => format!("{} bytes", n * unit),
        }
    }
}

/// A budget of `bytes` per image on the wire for the ReLU layers of `sites` activation
/// layers, as the knapsack counts it: the cost unit (bytes rounded up per channel so the exact
/// solver's table stays near 2^20 cells) and the budget in those units, after setting aside
/// the engine's framing ([`crate::spec::engine_framing_bound`]), so that a solution's bytes on
/// the wire never exceed `bytes`.
pub fn byte_budget(bytes: u64, sites: usize) -> (CostUnit, u64) {
    let unit = bytes.div_ceil(1 << 20).max(1);
    let payload = bytes.saturating_sub(crate::spec::engine_framing_bound(sites, bytes));
    (CostUnit::Bytes(unit), payload / unit)
}

/// How to build the instance.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildOptions {
    /// What the budget counts.
    pub cost: CostUnit,
    /// Sites without a table keep the ordinary ReLU (counted in the budget) instead of failing.
    pub keep_relu_for_missing: bool,
    /// Skip equal-cost collapsing and dominance pruning (the published solver's view; for
    /// benchmarks).
    pub raw: bool,
}

impl Problem {
    /// Builds the instance for a model's `sites` from `tables`.
    pub fn build(
        tables: &DistortionTables,
        sites: &[SiteInfo],
        opts: BuildOptions,
    ) -> Result<Problem> {
        let mut p = Problem {
            model: tables.model.clone(),
            input: tables.input,
            sites: Vec::new(),
            channels: Vec::new(),
            items: Vec::new(),
            fixed_cost: 0,
            unit: opts.cost,
            warnings: Vec::new(),
        };
        if let Some(extra) = tables
            .sites
            .keys()
            .find(|k| !sites.iter().any(|s| &s.name == *k))
        {
            return Err(Error::InvalidArgument(format!(
                "the distortion tables have site '{extra}', which {} does not have",
                tables.model
            )));
        }
        for (si, site) in sites.iter().enumerate() {
            let Some(t) = tables.sites.get(&site.name) else {
                if !opts.keep_relu_for_missing {
                    return Err(Error::InvalidArgument(format!(
                        "site '{}' has no distortion table (use --keep-relu-for-missing to keep its ReLUs)",
                        site.name
                    )));
                }
                p.warnings
                    .push(format!("site '{}' has no table: kept as ReLU", site.name));
                p.fixed_cost += site.channels as u64
                    * opts.cost.cost(PatchOption::RELU, site.height, site.width);
                p.sites.push(SiteEntry {
                    info: site.clone(),
                    options: vec![PatchOption::RELU],
                    fixed: Some(0),
                });
                continue;
            };
            if t.shape != [site.channels, site.height, site.width] {
                return Err(Error::InvalidArgument(format!(
                    "site '{}': table shape {:?}, the model's site is [{}, {}, {}]",
                    site.name, t.shape, site.channels, site.height, site.width
                )));
            }
            if let Some(o) = t.options.iter().find(|o| !o.fits(site.height, site.width)) {
                return Err(Error::InvalidArgument(format!(
                    "site '{}': option {o} does not fit the {}x{} map",
                    site.name, site.height, site.width
                )));
            }
            if t.options.len() > u16::MAX as usize {
                return Err(Error::InvalidArgument(format!(
                    "site '{}': too many options",
                    site.name
                )));
            }
            let costs: Vec<u32> = t
                .options
                .iter()
                .map(|o| {
                    let c = opts.cost.cost(*o, site.height, site.width);
                    u32::try_from(c).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "site '{}': option {o} costs {} per channel, too many units",
                            site.name,
                            opts.cost.show(c)
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            let mut dropped = 0usize;
            for c in 0..site.channels {
                let mut items: Vec<Item> = (0..t.options.len())
                    .filter_map(|k| {
                        let d = t.get(c, k);
                        if d.is_finite() {
                            Some(Item {
                                cost: costs[k],
                                dist: d,
                                option: k as u16,
                            })
                        } else {
                            dropped += 1;
                            None
                        }
                    })
                    .collect();
                if items.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "site '{}' channel {c}: no option has a finite distortion",
                        site.name
                    )));
                }
                if !opts.raw {
                    items = prune(items);
                }
                p.channels.push((si as u32, c as u32));
                p.items.push(items);
            }
            if dropped > 0 {
                p.warnings.push(format!(
                    "site '{}': dropped {dropped} non-finite distortion entries",
                    site.name
                ));
            }
            p.sites.push(SiteEntry {
                info: site.clone(),
                options: t.options.clone(),
                fixed: None,
            });
        }
        Ok(p)
    }

    /// The cheapest possible total cost (every channel at its cheapest item).
    pub fn min_cost(&self) -> u64 {
        self.fixed_cost
            + self
                .items
                .iter()
                .map(|it| it.iter().map(|i| i.cost as u64).min().unwrap_or(0))
                .sum::<u64>()
    }

    /// The total cost with every channel at its most expensive item.
    pub fn max_cost(&self) -> u64 {
        self.fixed_cost
            + self
                .items
                .iter()
                .map(|it| it.iter().map(|i| i.cost as u64).max().unwrap_or(0))
                .sum::<u64>()
    }

    /// Original ReLU count of the model.
    pub fn relus(&self) -> u64 {
        self.sites.iter().map(|s| s.info.relus() as u64).sum()
    }

    /// Checks a budget and returns the part left for the free channels.
    pub fn free_budget(&self, budget: u64) -> Result<u64> {
        let min = self.min_cost();
        if budget < min {
            return Err(Error::InvalidArgument(format!(
                "budget {} is below the cheapest possible assignment ({})",
                self.unit.show(budget),
                self.unit.show(min)
            )));
        }
        Ok(budget - self.fixed_cost)
    }

    /// Total distortion and cost of a choice (item index per free channel).
    pub fn evaluate(&self, choice: &[usize]) -> (f64, u64) {
        let mut d = 0.0;
        let mut c = self.fixed_cost;
        for (items, &k) in self.items.iter().zip(choice) {
            d += items[k].dist;
            c += items[k].cost as u64;
        }
        (d, c)
    }

    /// The spec of a choice.
    pub fn to_spec(&self, choice: &[usize]) -> Spec {
        let mut sites: IndexMap<String, Vec<PatchOption>> = self
            .sites
            .iter()
            .map(|s| {
                let fill = s.options[s.fixed.unwrap_or(0) as usize];
                (s.info.name.clone(), vec![fill; s.info.channels])
            })
            .collect();
        for (&(si, c), (items, &k)) in self.channels.iter().zip(self.items.iter().zip(choice)) {
            let site = &self.sites[si as usize];
            sites[si as usize][c as usize] = site.options[items[k].option as usize];
        }
        Spec {
            model: self.model.clone(),
            input: self.input,
            sites,
            source: None,
        }
    }
}

/// Keeps, per distinct cost, the least-distortion item (lowest option index on ties), then
/// drops items that are not strictly better than every cheaper one.
fn prune(mut items: Vec<Item>) -> Vec<Item> {
    items.sort_by(|a, b| {
        a.cost
            .cmp(&b.cost)
            .then(a.dist.total_cmp(&b.dist))
            .then(a.option.cmp(&b.option))
    });
    let mut out: Vec<Item> = Vec::with_capacity(items.len());
    for it in items {
        match out.last() {
            Some(last) if it.dist >= last.dist => {}
            _ => out.push(it),
        }
    }
    out
}

/// Budget from a ratio of the original ReLU count (rounded down).
pub fn budget_from_ratio(relus: u64, ratio: f64) -> Result<u64> {
    if !(ratio.is_finite() && ratio >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "ratio {ratio} must be a non-negative number"
        )));
    }
    Ok((relus as f64 * ratio).floor() as u64)
}
