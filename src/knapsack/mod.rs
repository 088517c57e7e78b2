//! The multiple-choice knapsack of docs/method.md section 6: pick one option per channel to minimise
//! total distortion under a DReLU budget. [`dp`] is exact in bounded memory, [`lagrange`] is
//! near-instant with a certified gap; [`report`] summarises a solution; [`compare`] measures
//! what a cheap distortion estimator costs in knapsack terms; [`baselines`] are the uniform
//! specs it is compared with.
pub mod additivity;
pub mod baselines;
pub mod compare;
pub mod dp;
pub mod iterative;
pub mod lagrange;
pub mod local;
pub mod problem;
pub mod report;

pub use problem::{budget_from_ratio, byte_budget, BuildOptions, CostUnit, Item, Problem};

use crate::error::{Error, Result};
use std::str::FromStr;

/// A solution: the chosen item per free channel and what it achieves.
#[derive(Clone, Debug)]
pub struct Solution {
    /// Index into `Problem::items[c]` per free channel.
    pub choice: Vec<usize>,
    /// Total distortion (recomputed from the choice).
    pub objective: f64,
    /// Total DReLUs, fixed sites included.
    pub cost: u64,
    /// A lower bound on the optimum (the optimum itself for the exact solver).
    pub bound: f64,
    /// The exact solver's DP value (equals `objective` up to summation order).
    pub dp_objective: Option<f64>,
    /// Planned peak memory of the exact solver.
    pub peak_bytes: Option<u64>,
    /// The Lagrange multiplier (distortion per DReLU) where the LP relaxation stops.
    pub multiplier: Option<f64>,
}

impl Solution {
    /// objective - bound.
    pub fn gap(&self) -> f64 {
        (self.objective - self.bound).max(0.0)
    }
}

/// Which solver to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    Exact,
    Lagrange,
    /// Exact when its planned work and memory fit, else Lagrange.
    Auto,
}

impl FromStr for Solver {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(Solver::Exact),
            "lagrange" => Ok(Solver::Lagrange),
            "auto" => Ok(Solver::Auto),
            _ => Err(format!("expected exact, lagrange or auto, got '{s}'")),
        }
    }
}

/// Work (item x budget-cell updates) above which `auto` prefers Lagrange: about a minute of
/// the exact solver on two cores.
pub const AUTO_MAX_CELLS: f64 = 1.5e11;

/// Peak memory the exact solver may plan for unless told otherwise (`--max-memory 2G`).
pub const DEFAULT_MAX_MEMORY: u64 = 2 << 30;

/// Solves with the chosen solver; returns the solver actually used.
pub fn solve(
    p: &Problem,
    budget: u64,
    solver: Solver,
    max_memory: u64,
) -> Result<(Solver, Solution)> {
    p.free_budget(budget)?;
    match solver {
        Solver::Exact => Ok((Solver::Exact, dp::solve(p, budget, max_memory)?)),
        Solver::Lagrange => Ok((Solver::Lagrange, lagrange::solve(p, budget)?)),
        Solver::Auto => match dp::plan(p, budget, max_memory) {
            Ok(plan) if plan.cells <= AUTO_MAX_CELLS => {
                Ok((Solver::Exact, dp::solve(p, budget, max_memory)?))
            }
            Ok(_) | Err(Error::InvalidArgument(_)) => {
                Ok((Solver::Lagrange, lagrange::solve(p, budget)?))
            }
            Err(e) => Err(e),
        },
    }
}
