//! The `brelu` binary: parse arguments, run, print errors with their causes.
use clap::Parser;

fn main() {
    let cli = brelu::cli::Cli::parse();
    if let Err(e) = brelu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
