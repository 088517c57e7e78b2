//! The `brelu` command line: argument definitions and one function per subcommand. Library
//! errors get context here; `main` prints the chain and sets the exit code.
mod additivity;
mod bench;
mod distortion;
mod interop;
mod iterate;
mod knapsack;
mod models;
mod pipeline;
mod refine;
mod secure;
mod spec;
mod table;
mod train;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

/// Block-ReLU networks for cheap secure inference.
///
/// Typical flow: `brelu sites` to see a model's ReLU layers, `brelu spec uniform` or the
/// knapsack to make a spec (one patch size per channel), `brelu spec stats` to see what it
/// costs in DReLUs and bytes.
#[derive(Parser, Debug)]
#[command(name = "brelu", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the architectures in the model zoo.
    Models(models::ModelsArgs),
    /// Table of a model's ReLU sites with their activation shapes and ReLU counts.
    Sites(models::SitesArgs),
    /// Make and inspect block-ReLU spec files.
    #[command(subcommand)]
    Spec(spec::SpecCommand),
    /// Distortion tables: extract from a trained network (exact, snr, first-order), collect
    /// shards, compare estimators, plot.
    #[command(subcommand)]
    Distortion(distortion::DistortionCommand),
    /// Pick a patch size per channel from distortion tables under a DReLU budget.
    Knapsack(knapsack::KnapsackArgs),
    /// Improve a spec by local search: moves between channels proposed by the distortion
    /// tables, kept only when the measured distortion of the whole spec goes down.
    Refine(refine::RefineArgs),
    /// The iterative knapsack: re-measure every channel's options on top of the chosen spec
    /// (against the all-ReLU network) and solve again, for a few rounds; a spec is kept only
    /// when its measured distortion goes down.
    Iterate(iterate::IterateArgs),
    /// Train a model from a configuration file (checkpoint every epoch, `--resume`).
    Train(train::TrainCmdArgs),
    /// Fine-tune trained weights with a block-ReLU spec at every site.
    Finetune(train::FinetuneArgs),
    /// Test-set top-1, top-5 and loss of weights (optionally under a spec) and its DReLUs.
    Eval(train::EvalArgs),
    /// Three-party secure inference (client, server, dealer) on secret shares.
    #[command(subcommand)]
    Secure(secure::SecureCommand),
    /// Bring your own network: import an ONNX file (then `--model onnx:PATH` everywhere).
    #[command(subcommand)]
    Import(interop::ImportCommand),
    /// Write a network, block ReLUs included, as ONNX for other runtimes.
    #[command(subcommand)]
    Export(interop::ExportCommand),
    /// The whole method in one resumable run: baseline, distortion, knapsack and uniform
    /// baselines per budget, fine-tune, evaluate, secure inference, report.md with plots.
    Pipeline(pipeline::PipelineArgs),
    /// Measure the scale-out machinery here: all-reduce over launched ranks, loader
    /// throughput, loader/compute overlap (JSON, see docs/cluster.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// A model and the input size it runs at.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture name (see `brelu models`).
    #[arg(long, short)]
    pub model: String,
    /// Input size as C,H,W (default: the architecture's own, e.g. 3,32,32 for CIFAR models).
    #[arg(long, value_parser = parse_input)]
    pub input: Option<[usize; 3]>,
}

/// Parses `3,32,32` or `3x32x32`.
pub fn parse_input(s: &str) -> std::result::Result<[usize; 3], String> {
    let d: Vec<usize> = s
        .split([',', 'x'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| format!("expected C,H,W (e.g. 3,32,32), got '{s}'"))?;
    match d.as_slice() {
        [c, h, w] if *c > 0 && *h > 0 && *w > 0 => Ok([*c, *h, *w]),
        _ => Err(format!("expected three positive numbers C,H,W, got '{s}'")),
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Models(a) => models::models(a),
        Command::Sites(a) => models::sites(a),
        Command::Spec(c) => spec::run(c),
        Command::Knapsack(a) => knapsack::run(a),
        Command::Refine(a) => refine::run(a),
        Command::Iterate(a) => iterate::run(a),
        Command::Distortion(c) => distortion::run(c),
        Command::Train(a) => train::train_cmd(a),
        Command::Finetune(a) => train::finetune_cmd(a),
        Command::Eval(a) => train::eval_cmd(a),
        Command::Secure(c) => secure::run(c),
        Command::Import(c) => interop::import(c),
        Command::Export(c) => interop::export(c),
        Command::Pipeline(a) => pipeline::run(a),
        Command::Bench(c) => bench::run(c),
    }
}

/// `dir/stem.<ext>` for an output `dir/stem.json` (`dir/stem.onnx`, ...): a companion file.
fn beside(output: &std::path::Path, ext: &str) -> std::path::PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    output.with_file_name(format!("{stem}.{ext}"))
}

/// Prints a value as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Resolves `--model`/`--input` into an architecture and its input size.
fn resolve_model(a: &ModelArgs) -> Result<(&'static dyn crate::models::Architecture, [usize; 3])> {
    let arch = crate::models::find(&a.model)?;
    let input = a.input.unwrap_or_else(|| arch.default_input());
    if input[1] == 0 || input[2] == 0 {
        bail!("input {input:?} must be positive");
    }
    Ok((arch, input))
}
