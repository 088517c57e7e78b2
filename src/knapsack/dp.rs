//! Exact solver: dynamic programme over channels, best[b] = least distortion with total cost
//! at most b.
//!
//! Speed: channels are processed in order of their largest cost, so early rows only span the
//! costs reachable so far; each row is computed in cache-sized chunks in parallel (rayon), with
//! a branch-free inner loop over a contiguous slice per item (shifted min-plus) that the
//! compiler vectorises. Memory: the choice table (channels x budget) is never held whole when it
//! would not fit `max_memory`: rows are checkpointed every S channels and each segment's choices
//! are recomputed during the backtrack (about twice the arithmetic, a fraction of the memory).
//! Work: before the DP, reduced-cost fixing removes every item that the Lagrangian bound
//! proves cannot be in a solution better than the Lagrangian heuristic's (see [`reduce`]);
//! the DP then runs over the few items left, and its optimum is the optimum of the original
//! instance.
use super::problem::Problem;
use super::Solution;
use crate::error::{Error, Result};
use rayon::prelude::*;

const CHUNK: usize = 4096;
const NONE: u8 = u8::MAX;

/// Planned memory use and work of an exact solve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// Channels per checkpoint segment (all of them when the whole table fits).
    pub segment: usize,
    pub peak_bytes: u64,
    /// Item x budget-cell updates of one forward pass.
    pub cells: f64,
}

/// Processing order: channels sorted by their largest cost (stable).
fn order(p: &Problem) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.items.len()).collect();
    idx.sort_by_key(|&i| p.items[i].last().map(|it| it.cost).unwrap_or(0));
    idx
}

/// Row lengths: after channel i (in processing order) only costs up to the sum of the largest
/// costs so far (capped at the budget) can differ.
fn row_lens(p: &Problem, ord: &[usize], budget: usize) -> Vec<usize> {
    let mut acc = 0usize;
    ord.iter()
        .map(|&i| {
            acc = acc.saturating_add(
                p.items[i]
                    .iter()
                    .map(|it| it.cost as usize)
                    .max()
                    .unwrap_or(0),
            );
            acc.min(budget) + 1
        })
        .collect()
}

/// Chooses the segment length so the peak memory stays under `max_memory`.
pub fn plan(p: &Problem, budget: u64, max_memory: u64) -> Result<Plan> {
    let free = p
        .free_budget(budget)?
        .min(p.max_cost().saturating_sub(p.fixed_cost));
    let b1 = free + 1;
    let n = p.items.len().max(1) as u64;
    let ord = order(p);
    let lens = row_lens(p, &ord, free as usize);
    let cells: f64 = ord
        .iter()
        .zip(&lens)
        .map(|(&i, &l)| p.items[i].len() as f64 * l as f64)
        .sum();
    // Two working rows always; the whole choice table if it fits, else checkpoints.
    let rows = 2 * 8 * b1;
    let full = rows + n * b1;
    if full <= max_memory {
        return Ok(Plan {
            segment: n as usize,
            peak_bytes: full,
            cells,
        });
    }
    // checkpoints (n / s rows of 8 bytes) + one segment of choices (s bytes) per budget cell.
    let best = ((8.0 * n as f64).sqrt().ceil() as u64).clamp(1, n);
    let peak = |s: u64| rows + n.div_ceil(s) * 8 * b1 + s * b1;
    if peak(best) > max_memory {
        return Err(Error::InvalidArgument(format!(
            "the exact solver needs at least {:.2} GB for {} channels and budget {} (--max-memory is {:.2} GB); use --solver lagrange or raise --max-memory",
            peak(best) as f64 / 1e9,
            n,
            free,
            max_memory as f64 / 1e9
        )));
    }
    let s = best;
    Ok(Plan {
        segment: s as usize,
        peak_bytes: peak(s),
        cells,
    })
}

/// One DP step: `cur[b] = min_k prev[b - c_k] + d_k` for b < len, with optional choices.
/// `prev` must be valid up to `len` (extended with its last value beyond its own length).
fn step(
    items: &[super::problem::Item],
    prev: &[f64],
    cur: &mut [f64],
    choice: Option<&mut [u8]>,
    len: usize,
) {
    let cur = &mut cur[..len];
    let work = |start: usize, out: &mut [f64], ch: Option<&mut [u8]>| {
        let end = start + out.len();
        out.fill(f64::INFINITY);
        match ch {
            None => {
                for it in items {
                    let c = it.cost as usize;
                    if c >= end {
                        continue;
                    }
                    let lo = start.max(c);
                    let src = &prev[lo - c..end - c];
                    let dst = &mut out[lo - start..];
                    let d = it.dist;
                    for (o, &s) in dst.iter_mut().zip(src) {
                        let v = s + d;
                        *o = if v < *o { v } else { *o };
                    }
                }
            }
            Some(ch) => {
                ch.fill(NONE);
                for (k, it) in items.iter().enumerate() {
                    let c = it.cost as usize;
                    if c >= end {
                        continue;
                    }
                    let lo = start.max(c);
                    let src = &prev[lo - c..end - c];
                    let dst = &mut out[lo - start..];
                    let chd = &mut ch[lo - start..];
                    let d = it.dist;
                    let k = k as u8;
                    for ((o, cc), &s) in dst.iter_mut().zip(chd.iter_mut()).zip(src) {
                        let v = s + d;
                        let better = v < *o;
                        *o = if better { v } else { *o };
                        *cc = if better { k } else { *cc };
                    }
                }
            }
        }
    };
    match choice {
        None => cur
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(j, out)| work(j * CHUNK, out, None)),
        Some(ch) => cur
            .par_chunks_mut(CHUNK)
            .zip(ch[..len].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(j, (out, chc))| work(j * CHUNK, out, Some(chc))),
    }
}

/// Extends `row` (valid on `[0, from)`) with its last value up to `to`.
fn extend(row: &mut [f64], from: usize, to: usize) {
    if from < to {
        let last = row[from - 1];
        row[from..to].fill(last);
    }
}

/// An instance with the items that cannot be optimal removed.
pub struct Reduced {
    /// The same channels, each with its surviving items.
    pub problem: Problem,
    /// Per channel, the original index of each surviving item.
    pub kept: Vec<Vec<usize>>,
    /// The Lagrangian solution used for the reduction (a feasible incumbent).
    pub lagrange: Solution,
}

/// Reduced-cost fixing. For a multiplier l >= 0, L = sum_j min_k (d_jk + l c_jk) - l B is a
/// lower bound on every solution, and one that uses item k in channel j is at least L + r_jk
/// (r_jk: the item's reduced cost, d + l c minus the channel's minimum). An item with
/// L + r_jk above the objective U of a known feasible solution therefore is in no solution
/// better than U; dropping it keeps every optimum. l is the LP multiplier, U the Lagrangian
/// heuristic's objective; a small tolerance keeps borderline items (rounding).
pub fn reduce(p: &Problem, budget: u64) -> Result<Reduced> {
    let lg = super::lagrange::solve(p, budget)?;
    let l = lg.multiplier.unwrap_or(0.0);
    let free = p.free_budget(budget)? as f64;
    let mins: Vec<f64> = p
        .items
        .iter()
        .map(|it| {
            it.iter()
                .map(|i| i.dist + l * i.cost as f64)
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let lower = mins.iter().sum::<f64>() - l * free;
    let ub = lg.objective;
    let tol = 1e-9 * (ub.abs() + l * free + 1.0);
    let mut problem = p.clone();
    let mut kept = Vec::with_capacity(p.items.len());
    for (j, it) in p.items.iter().enumerate() {
        let keep: Vec<usize> = (0..it.len())
            .filter(|&k| lower + (it[k].dist + l * it[k].cost as f64 - mins[j]) <= ub + tol)
            .collect();
        problem.items[j] = keep.iter().map(|&k| it[k]).collect();
        kept.push(keep);
    }
    Ok(Reduced {
        problem,
        kept,
        lagrange: lg,
    })
}

/// Solves exactly within `max_memory` bytes.
pub fn solve(p: &Problem, budget: u64, max_memory: u64) -> Result<Solution> {
    let r = reduce(p, budget)?;
    let plan = plan(&r.problem, budget, max_memory)?;
    solve_reduced(p, &r, budget, plan)
}

/// Runs the DP on a reduced instance and maps the solution back to `p`'s items.
pub fn solve_reduced(p: &Problem, r: &Reduced, budget: u64, plan: Plan) -> Result<Solution> {
    let mut sol = solve_planned(&r.problem, budget, plan)?;
    for (c, k) in sol.choice.iter_mut().enumerate() {
        *k = r.kept[c][*k];
    }
    let (objective, cost) = p.evaluate(&sol.choice);
    sol.objective = objective;
    sol.bound = objective;
    sol.cost = cost;
    Ok(sol)
}

/// Solves with checkpoint segments of `segment` channels (`>= channels`: one full choice
/// table), with or without the reduction. `solve` picks the segment from the memory bound and
/// always reduces; this exists to test every path.
pub fn solve_segmented(
    p: &Problem,
    budget: u64,
    segment: usize,
    reduced: bool,
) -> Result<Solution> {
    if reduced {
        let r = reduce(p, budget)?;
        let mut pl = plan(&r.problem, budget, u64::MAX)?;
        pl.segment = segment;
        return solve_reduced(p, &r, budget, pl);
    }
    let mut pl = plan(p, budget, u64::MAX)?;
    pl.segment = segment;
    solve_planned(p, budget, pl)
}

fn solve_planned(p: &Problem, budget: u64, plan: Plan) -> Result<Solution> {
    let free = p.free_budget(budget)?.min(p.max_cost() - p.fixed_cost) as usize;
    let n = p.items.len();
    if n > 0 && p.items.iter().any(|it| it.len() > NONE as usize) {
        return Err(Error::InvalidArgument(
            "a channel has more than 254 distinct-cost options".into(),
        ));
    }
    let ord = order(p);
    let lens = row_lens(p, &ord, free);
    let b1 = free + 1;
    let mut prev = vec![0.0f64; b1];
    let mut cur = vec![0.0f64; b1];
    let seg = plan.segment.max(1);
    // Checkpoint k holds the row before channel k*seg (in processing order).
    let mut checkpoints: Vec<Vec<f64>> = Vec::new();
    let mut prev_len = 1usize;
    let full_table = seg >= n;
    let mut table: Vec<u8> = if full_table {
        vec![0u8; n * b1]
    } else {
        Vec::new()
    };
    for (pos, &ch) in ord.iter().enumerate() {
        if !full_table && pos % seg == 0 {
            checkpoints.push(prev[..prev_len].to_vec());
        }
        let len = lens[pos];
        extend(&mut prev, prev_len, len);
        let choice = full_table.then(|| &mut table[pos * b1..(pos + 1) * b1]);
        step(&p.items[ch], &prev, &mut cur, choice, len);
        std::mem::swap(&mut prev, &mut cur);
        prev_len = len;
    }
    let objective = if n == 0 {
        0.0
    } else {
        prev[free.min(prev_len - 1)]
    };
    if !objective.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "no assignment fits the budget {budget}"
        )));
    }
    // Backtrack from the last channel.
    let mut choice = vec![0usize; n];
    let mut b = free.min(prev_len.max(1) - 1);
    if full_table {
        for pos in (0..n).rev() {
            let b_here = b.min(lens[pos] - 1);
            let k = table[pos * b1 + b_here];
            debug_assert!(k != NONE);
            let it = p.items[ord[pos]][k as usize];
            choice[ord[pos]] = k as usize;
            b = b_here - it.cost as usize;
        }
    } else {
        let mut seg_choices = vec![0u8; seg * b1];
        let segments = n.div_ceil(seg);
        for s in (0..segments).rev() {
            let (first, last) = (s * seg, ((s + 1) * seg).min(n));
            let ck = &checkpoints[s];
            prev[..ck.len()].copy_from_slice(ck);
            let mut plen = ck.len();
            for pos in first..last {
                let len = lens[pos];
                extend(&mut prev, plen, len);
                let off = (pos - first) * b1;
                step(
                    &p.items[ord[pos]],
                    &prev,
                    &mut cur,
                    Some(&mut seg_choices[off..off + b1]),
                    len,
                );
                std::mem::swap(&mut prev, &mut cur);
                plen = len;
            }
            for pos in (first..last).rev() {
                let b_here = b.min(lens[pos] - 1);
                let k = seg_choices[(pos - first) * b1 + b_here];
                debug_assert!(k != NONE);
                let it = p.items[ord[pos]][k as usize];
                choice[ord[pos]] = k as usize;
                b = b_here - it.cost as usize;
            }
        }
    }
    let (obj, cost) = p.evaluate(&choice);
    Ok(Solution {
        choice,
        objective: obj,
        cost,
        bound: obj,
        dp_objective: Some(objective),
        peak_bytes: Some(plan.peak_bytes),
        multiplier: None,
    })
}
