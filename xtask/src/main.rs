//! `cargo xtask <task>`: everything a newcomer or CI runs, in one place.
//!
//! - `setup`: idempotent install of what building, the demo and the tests need.
//! - `test`: setup, then the whole suite (what `.ci/run` runs).
//! - `demo`: setup, then the main job end to end.
//! - `bench <name>`: benchmarks that print ratios against the direct path and peers.

mod bench;
mod setup;
mod test;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything building and testing need (idempotent; a second run takes seconds).
    Setup,
    /// Set up, then build and run the whole test suite.
    Test {
        /// Extra arguments passed to the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run a benchmark: `cargo xtask bench pdp|mcp`.
    Bench {
        /// Which benchmark (pdp, mcp).
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => setup::run().and_then(|()| test::run(&args)),
        Task::Bench { name } => bench::run(&name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
