//! `brelu knapsack`: distortion tables + DReLU budget -> spec and report.
use super::print_json;
use super::table::{human_bytes, thousands, Table};
use crate::distortion::DistortionTables;
use crate::knapsack::{self, report, BuildOptions, CostUnit, Problem, Solver};
use crate::models::sites as model_sites;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct KnapsackArgs {
    /// Architecture name (see `brelu models`).
    #[arg(long, short)]
    pub model: String,
    /// Distortion directory (manifest.json + one <site>.npy per site).
    #[arg(long, short)]
    pub distortion: PathBuf,
    /// Budget as a fraction of the original ReLU count (e.g. 0.06 for 6%).
    #[arg(long, conflicts_with_all = ["budget", "sweep"])]
    pub ratio: Option<f64>,
    /// Budget as an absolute DReLU count.
    #[arg(long, conflicts_with = "sweep")]
    pub budget: Option<u64>,
    /// Budget in bytes per image instead of DReLUs, e.g. 40M: what the ReLU layers may send
    /// in brelu's secure engine (the byte model of `brelu spec stats`; linear layers cost the
    /// same whatever the spec). Each option then costs its bytes, so the knapsack weighs a
    /// patch's DReLU against its pixel-level multiply.
    #[arg(long, value_parser = parse_bytes, conflicts_with_all = ["ratio", "budget", "sweep"])]
    pub bytes: Option<u64>,
    /// Solve several ratios (comma-separated, e.g. 0.03,0.06,0.09); -o is then a directory
    /// that receives spec-<ratio>.json per budget, sweep.json and sweep.png.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Option<Vec<f64>>,
    /// exact (optimal), lagrange (near-instant, reports its gap) or auto.
    #[arg(long, default_value = "auto")]
    pub solver: Solver,
    /// Peak memory the exact solver may use, e.g. 2G, 500M.
    #[arg(long, default_value = "2G", value_parser = parse_bytes)]
    pub max_memory: u64,
    /// Keep the ordinary ReLU (counted in the budget) at sites without a table.
    #[arg(long)]
    pub keep_relu_for_missing: bool,
    /// Where to write the spec (or the sweep directory).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `2G`, `512M`, `100000` (bytes; K/M/G are powers of 1000).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mul) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('G') => (&t[..t.len() - 1], 1e9),
        _ => (t.as_str(), 1.0),
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| (v * mul) as u64)
        .ok_or_else(|| format!("expected a size like 2G, 500M or 1000000, got '{s}'"))
}

pub fn run(a: KnapsackArgs) -> Result<()> {
    let arch = crate::models::find(&a.model)?;
    let tables = DistortionTables::read(&a.distortion)?;
    if tables.model != arch.name() {
        bail!(
            "{}: the tables are for model '{}', not '{}'",
            a.distortion.display(),
            tables.model,
            arch.name()
        );
    }
    let sites = model_sites(arch, tables.input).with_context(|| {
        format!(
            "model {} at the tables' input {:?}",
            arch.name(),
            tables.input
        )
    })?;
    let bytes = a.bytes.map(|b| knapsack::byte_budget(b, sites.len()));
    let cost = bytes.map_or(CostUnit::Drelus, |(c, _)| c);
    let problem = Problem::build(
        &tables,
        &sites,
        BuildOptions {
            cost,
            keep_relu_for_missing: a.keep_relu_for_missing,
            raw: false,
        },
    )
    .with_context(|| format!("reading {}", a.distortion.display()))?;
    for w in &problem.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(ratios) = &a.sweep {
        return sweep(&a, &problem, ratios);
    }
    let budget = match (a.ratio, a.budget, bytes) {
        (Some(r), None, None) => knapsack::budget_from_ratio(problem.relus(), r)?,
        (None, Some(b), None) => b,
        (None, None, Some((_, units))) => units,
        _ => bail!(
            "give the budget as --ratio R, --budget N (DReLUs) or --bytes SIZE (or --sweep \
             R1,R2,...)"
        ),
    };
    let t0 = Instant::now();
    let (used, sol) = knapsack::solve(&problem, budget, a.solver, a.max_memory)?;
    let (spec, rep) = report::build(&problem, used, budget, &sol, t0.elapsed().as_secs_f64());
    spec.validate(arch.name(), tables.input, &sites)?;
    spec.write(&a.output)?;
    if a.json {
        return print_json(&rep);
    }
    print_report(&rep);
    println!("wrote {}", a.output.display());
    Ok(())
}

fn print_report(r: &report::Report) {
    let mut t = Table::new(&[
        "site",
        "shape",
        "ReLUs",
        "DReLUs",
        "kept",
        "share of budget",
    ]);
    for s in &r.sites {
        t.row(vec![
            s.site.clone(),
            format!("{}x{}x{}", s.shape[0], s.shape[1], s.shape[2]),
            thousands(s.relus as u64),
            thousands(s.drelus as u64),
            format!("{:.2}%", 100.0 * s.drelus as f64 / s.relus.max(1) as f64),
            format!("{:.1}%", 100.0 * s.share_of_budget),
        ]);
    }
    println!("{}", t.render());
    let mut h: Vec<(&String, &usize)> = r.histogram.iter().collect();
    h.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let top: Vec<String> = h
        .iter()
        .take(12)
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    println!("chosen options (channels): {}", top.join(", "));
    let used = match r.budget_unit {
        "bytes" => format!(
            "{} of a {} budget in brelu's engine ({} DReLUs, ",
            human_bytes(r.bytes_engine),
            human_bytes(r.budget),
            thousands(r.drelus)
        ),
        _ => format!(
            "{} of {} DReLUs (",
            thousands(r.drelus),
            thousands(r.budget)
        ),
    };
    println!(
        "{:?} solver, {:.2} s: {used}{:.3}% of {} ReLUs)",
        r.solver,
        r.seconds,
        100.0 * r.ratio,
        thousands(r.relus)
    );
    println!(
        "total distortion {:.6e}, lower bound {:.6e}, gap {:.3e} ({:.2e} relative)",
        r.objective, r.bound, r.gap, r.relative_gap
    );
    println!(
        "predicted ReLU-layer bytes per image: {} in brelu's engine ({} with all ReLUs); \
         published models: {} Porthos-style, {} SecureNN-style",
        human_bytes(r.bytes_engine),
        human_bytes(r.original_bytes_engine),
        human_bytes(r.bytes_porthos),
        human_bytes(r.bytes_securenn)
    );
}

fn sweep(a: &KnapsackArgs, problem: &Problem, ratios: &[f64]) -> Result<()> {
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let mut reports = Vec::new();
    for &r in ratios {
        let budget = knapsack::budget_from_ratio(problem.relus(), r)?;
        let t0 = Instant::now();
        let (used, sol) = knapsack::solve(problem, budget, a.solver, a.max_memory)
            .with_context(|| format!("ratio {r}"))?;
        let (spec, rep) = report::build(problem, used, budget, &sol, t0.elapsed().as_secs_f64());
        let path = a.output.join(format!("spec-{r}.json"));
        spec.write(&path)?;
        if !a.json {
            println!(
                "ratio {r}: budget {} -> {} DReLUs, distortion {:.6e} (gap {:.2e}), {:?}, {:.2} s -> {}",
                thousands(budget),
                thousands(rep.drelus),
                rep.objective,
                rep.gap,
                rep.solver,
                rep.seconds,
                path.display()
            );
        }
        reports.push(rep);
    }
    let json = serde_json::to_string_pretty(&reports)?;
    crate::fs::write_atomic(&a.output.join("sweep.json"), json.as_bytes())?;
    let points: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (r.drelus as f64, r.objective))
        .collect();
    // The specs and numbers are the result; a missing font must not lose them.
    if let Err(e) = crate::plot::line_plot(
        &a.output.join("sweep.png"),
        &format!("{}: knapsack objective against DReLU budget", problem.model),
        "DReLUs",
        "total distortion",
        &[("knapsack", points)],
    ) {
        eprintln!("warning: {e}");
    }
    if a.json {
        return print_json(&reports);
    }
    println!("wrote {}/sweep.json and sweep.png", a.output.display());
    Ok(())
}
