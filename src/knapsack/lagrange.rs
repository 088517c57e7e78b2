//! Lagrangian solver with a certificate: the LP relaxation of the multiple-choice knapsack is
//! solved exactly by a sorted sweep over the upgrades along each channel's lower convex hull
//! (the multiplier lambda is the efficiency where the sweep stops); the integer solution takes
//! whole upgrades while they fit and then fills the leftover budget greedily. The LP optimum
//! is a lower bound on the integer optimum, so `objective - bound` bounds the distance to it.
use super::problem::{Item, Problem};
use super::Solution;
use crate::error::Result;

/// Indices of the lower convex hull of items sorted by strictly increasing cost and strictly
/// decreasing distortion.
pub fn lower_hull(items: &[Item]) -> Vec<usize> {
    let mut h: Vec<usize> = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        while h.len() >= 2 {
            let (a, b) = (&items[h[h.len() - 2]], &items[h[h.len() - 1]]);
            // Drop b if it lies on or above the segment a -> it.
            let lhs = (b.dist - a.dist) * (it.cost as f64 - a.cost as f64);
            let rhs = (it.dist - a.dist) * (b.cost as f64 - a.cost as f64);
            if lhs >= rhs {
                h.pop();
            } else {
                break;
            }
        }
        h.push(i);
    }
    h
}

struct Upgrade {
    channel: u32,
    step: u32,
    dcost: u32,
    gain: f64,
}

/// Solves the relaxation and rounds it.
pub fn solve(p: &Problem, budget: u64) -> Result<Solution> {
    let free = p.free_budget(budget)?;
    let hulls: Vec<Vec<usize>> = p.items.iter().map(|it| lower_hull(it)).collect();
    let mut choice: Vec<usize> = hulls.iter().map(|h| h[0]).collect();
    let mut left = free
        - hulls
            .iter()
            .zip(&p.items)
            .map(|(h, it)| it[h[0]].cost as u64)
            .sum::<u64>();
    let mut ups: Vec<Upgrade> = Vec::new();
    for (c, (h, it)) in hulls.iter().zip(&p.items).enumerate() {
        for s in 1..h.len() {
            let (a, b) = (&it[h[s - 1]], &it[h[s]]);
            ups.push(Upgrade {
                channel: c as u32,
                step: s as u32,
                dcost: b.cost - a.cost,
                gain: a.dist - b.dist,
            });
        }
    }
    // Most distortion removed per DReLU first; hull steps of one channel stay in order because
    // their efficiencies decrease (ties broken by step).
    ups.sort_by(|x, y| {
        let ex = x.gain * y.dcost as f64;
        let ey = y.gain * x.dcost as f64;
        ey.total_cmp(&ex)
            .then(x.channel.cmp(&y.channel))
            .then(x.step.cmp(&y.step))
    });
    let (base, _) = p.evaluate(&choice);
    let mut lp = base;
    let mut lp_left = left as f64;
    let mut lp_done = false;
    let mut multiplier = 0.0;
    let mut blocked = vec![false; p.items.len()];
    let mut level = vec![0u32; p.items.len()];
    for u in &ups {
        let c = u.channel as usize;
        if !lp_done {
            if (u.dcost as f64) <= lp_left {
                lp -= u.gain;
                lp_left -= u.dcost as f64;
            } else {
                lp -= u.gain * lp_left / u.dcost as f64;
                multiplier = u.gain / u.dcost as f64;
                lp_done = true;
            }
        }
        if blocked[c] || level[c] + 1 != u.step {
            blocked[c] = true;
            continue;
        }
        if u.dcost as u64 <= left {
            left -= u.dcost as u64;
            level[c] = u.step;
            choice[c] = hulls[c][u.step as usize];
        } else {
            blocked[c] = true;
        }
    }
    fill(p, &mut choice, &mut left);
    let (objective, cost) = p.evaluate(&choice);
    Ok(Solution {
        choice,
        objective,
        cost,
        bound: lp.min(objective),
        dp_objective: None,
        peak_bytes: None,
        multiplier: Some(multiplier),
    })
}

/// Spends the leftover budget: repeatedly applies the single-channel move (any item, hull or
/// not) that removes the most distortion within what is left.
fn fill(p: &Problem, choice: &mut [usize], left: &mut u64) {
    for _ in 0..p.items.len().min(1000) {
        let mut best: Option<(usize, usize, f64)> = None;
        for (c, it) in p.items.iter().enumerate() {
            let cur = &it[choice[c]];
            for (k, cand) in it.iter().enumerate().skip(choice[c] + 1) {
                let extra = (cand.cost - cur.cost) as u64;
                if extra > *left {
                    break;
                }
                let gain = cur.dist - cand.dist;
                if gain > best.map_or(0.0, |b| b.2) {
                    best = Some((c, k, gain));
                }
            }
        }
        let Some((c, k, _)) = best else { break };
        *left -= (p.items[c][k].cost - p.items[c][choice[c]].cost) as u64;
        choice[c] = k;
    }
}
