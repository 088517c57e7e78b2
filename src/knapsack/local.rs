//! Local search on measured distortion: the knapsack adds up per-channel distortions, but a
//! spec's true distortion is far from additive (see [`super::additivity`]). Starting from a
//! spec (the knapsack's), each step moves DReLUs between two channels: one channel takes a
//! random option its table says distorts less than its current one (any of them, not only the
//! least: the smallest patch is always the table's best, so intermediate patch sizes would
//! never be tried), and, when the budget has no room for that, the cheapest-in-table
//! downgrade among a few random channels pays for it. The move is kept only when the *measured* distortion of the whole spec on the sample
//! batch goes down, so the result is never worse than the start on that batch and never over
//! budget.
use super::additivity::{distortion, outputs};
use crate::distortion::{DistortionTables, Samples};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::spec::{PatchOption, SiteInfo, Spec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

/// How long and how widely to search.
#[derive(Clone, Copy, Debug)]
pub struct SearchOptions {
    /// Proposed moves (each costs one forward pass over the samples).
    pub steps: usize,
    /// Channels considered to pay for an upgrade.
    pub candidates: usize,
    pub seed: u64,
    /// Samples per forward pass.
    pub batch: usize,
}

/// What a search did.
#[derive(Clone, Debug, Serialize)]
pub struct SearchReport {
    pub budget: u64,
    pub drelus_start: u64,
    pub drelus: u64,
    /// Measured distortion of the starting spec and of the result on the samples.
    pub start: f64,
    pub result: f64,
    pub steps: usize,
    pub accepted: usize,
    /// (step, measured distortion) after every accepted move.
    pub trace: Vec<(usize, f64)>,
}

/// One channel the search may move: its site, channel, table row and current option.
struct Free {
    site: usize,
    channel: usize,
    /// (option, DReLUs, table distortion), the options the table has for this channel.
    options: Vec<(PatchOption, u64, f64)>,
    current: usize,
}

impl Free {
    fn cost(&self) -> u64 {
        self.options[self.current].1
    }

    fn table(&self) -> f64 {
        self.options[self.current].2
    }
}

/// The channels of `spec` whose option is one of their table's; the others stay as they are.
fn free_channels(spec: &Spec, sites: &[SiteInfo], tables: &DistortionTables) -> Vec<Free> {
    let mut free = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let Some(t) = tables.sites.get(&s.name) else {
            continue;
        };
        for (c, o) in spec.sites[&s.name].iter().enumerate() {
            let options: Vec<_> = t
                .options
                .iter()
                .enumerate()
                .map(|(k, opt)| (*opt, opt.drelus(s.height, s.width) as u64, t.get(c, k)))
                .collect();
            if let Some(current) = options.iter().position(|x| x.0 == *o) {
                free.push(Free {
                    site: i,
                    channel: c,
                    options,
                    current,
                });
            }
        }
    }
    free
}

/// Improves `start` (within `budget` DReLUs) by greedy moves judged on `samples`: the
/// distortion of the model's outputs against its own outputs with its current options (as
/// the tables' baseline).
pub fn search(
    model: &mut Model,
    samples: &Samples,
    tables: &DistortionTables,
    start: &Spec,
    budget: u64,
    o: &SearchOptions,
) -> Result<(Spec, SearchReport)> {
    let infos = model.sites().to_vec();
    start.validate(model.name(), model.config().input, &infos)?;
    let total = |s: &Spec| crate::spec::spec_cost(s, &infos).drelus as u64;
    let mut cost = total(start);
    if cost > budget {
        return Err(Error::InvalidArgument(format!(
            "the starting spec costs {cost} DReLUs, over the budget of {budget}"
        )));
    }
    let reference = outputs(model, samples, o.batch);
    let saved: Vec<Option<Vec<PatchOption>>> = (0..infos.len())
        .map(|i| model.site_options(i).map(<[_]>::to_vec))
        .collect();
    let mut spec = start.clone();
    model.apply_spec(&spec)?;
    let d0 = distortion(model, samples, o.batch, &reference)?;
    let mut free = free_channels(&spec, &infos, tables);
    let mut rng = ChaCha20Rng::seed_from_u64(o.seed);
    let mut report = SearchReport {
        budget,
        drelus_start: cost,
        drelus: cost,
        start: d0,
        result: d0,
        steps: o.steps,
        accepted: 0,
        trace: Vec::new(),
    };
    for step in 0..o.steps {
        if free.len() < 2 {
            break;
        }
        let Some(mv) = propose(&free, cost, budget, o.candidates, &mut rng) else {
            continue;
        };
        let sites: Vec<usize> = mv.iter().map(|&(f, _)| free[f].site).collect();
        let mut trial = spec.clone();
        for &(f, k) in &mv {
            let ch = &free[f];
            let name = &infos[ch.site].name;
            trial.sites.get_mut(name).expect("validated")[ch.channel] = ch.options[k].0;
        }
        for &i in &sites {
            model.set_site_options(i, Some(trial.sites[&infos[i].name].clone()))?;
        }
        let d = distortion(model, samples, o.batch, &reference)?;
        if d < report.result {
            for &(f, k) in &mv {
                cost = cost - free[f].cost() + free[f].options[k].1;
                free[f].current = k;
            }
            spec = trial;
            report.result = d;
            report.accepted += 1;
            report.trace.push((step, d));
        } else {
            for &i in &sites {
                model.set_site_options(i, Some(spec.sites[&infos[i].name].clone()))?;
            }
        }
    }
    for (i, s) in saved.into_iter().enumerate() {
        model.set_site_options(i, s)?;
    }
    report.drelus = cost;
    Ok((spec, report))
}

/// A move as (free channel, new option index) pairs: an upgrade of a random channel to a random
/// option that its table says distorts less, paid for, when the budget's slack does not cover
/// it, by the downgrade with the smallest table increase among `candidates` random channels.
fn propose(
    free: &[Free],
    cost: u64,
    budget: u64,
    candidates: usize,
    rng: &mut ChaCha20Rng,
) -> Option<Vec<(usize, usize)>> {
    let a = rng.gen_range(0..free.len());
    let fa = &free[a];
    let better: Vec<(usize, &(PatchOption, u64, f64))> = fa
        .options
        .iter()
        .enumerate()
        .filter(|(k, x)| *k != fa.current && x.2 < fa.table())
        .collect();
    if better.is_empty() {
        return None;
    }
    let (ka, up) = better[rng.gen_range(0..better.len())];
    let slack = budget - cost;
    let need = (up.1 + cost).saturating_sub(fa.cost() + budget);
    if up.1 <= fa.cost() + slack {
        return Some(vec![(a, ka)]);
    }
    let mut best: Option<(f64, usize, usize)> = None;
    for _ in 0..candidates {
        let b = rng.gen_range(0..free.len());
        if b == a {
            continue;
        }
        let fb = &free[b];
        // The cheapest-in-table option of b that frees at least `need` DReLUs.
        let pick = fb
            .options
            .iter()
            .enumerate()
            .filter(|(_, x)| x.1 + need <= fb.cost())
            .min_by(|x, y| x.1 .2.total_cmp(&y.1 .2));
        if let Some((kb, down)) = pick {
            let increase = down.2 - fb.table();
            if best.is_none_or(|(bi, _, _)| increase < bi) {
                best = Some((increase, b, kb));
            }
        }
    }
    best.map(|(_, b, kb)| vec![(a, ka), (b, kb)])
}
