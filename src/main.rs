//! The `brelu` binary: parse arguments, run, print errors with their causes.
use clap::Parser;

fn main() {
    brelu::ops::prefer_huge_pages();
    let cli = brelu::cli::Cli::parse();
    if let Err(e) = brelu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
