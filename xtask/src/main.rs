//! `cargo xtask <task>`: everything a newcomer or CI runs, in one place.
//!
//! - `setup`: idempotent install of what building, the demo and the tests need.
//! - `test`: setup, then the whole suite (what `.ci/run` runs).
//! - `demo`: setup, then the main job end to end.
//! - `bench <name>`: benchmarks that print ratios against the direct path and peers.
//! - `fuzz [TARGET]`: the libFuzzer targets of `fuzz/`, for a time or once over their corpus.

mod bench;
mod demo;
mod deploy;
mod fuzz;
mod sandbox;
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
    /// Set up, then show the main job end to end: `kz run --blind` of a small agent.
    Demo,
    /// Check deploy/ (Kubernetes schemas, systemd-analyze); `test` runs this too.
    DeployCheck,
    /// Set up, then run a benchmark (`agent`, `connect`, `mcp`, `pdp`, `proxy`, `run`) and print ratios against the direct path.
    Bench { name: String },
    /// Set up, then fuzz one target (or each in turn) for `--time`, or run each over its
    /// committed corpus once (`--check`, what CI runs).
    Fuzz {
        /// One target of fuzz/ (`cargo fuzz list`); all when omitted.
        target: Option<String>,
        /// How long to fuzz each target: 90s, 10m, 1h.
        #[arg(long, default_value = "10m", value_parser = fuzz::parse_duration)]
        time: std::time::Duration,
        /// Run each target over fuzz/corpus/<target>/ once (regression mode) instead.
        #[arg(long)]
        check: bool,
        /// libFuzzer sanitizer: address (default) or none.
        #[arg(long, default_value = "address")]
        sanitizer: String,
    },
    /// Processes the benchmarks run inside network namespaces and cgroups.
    #[command(hide = true, subcommand)]
    BenchHelper(BenchHelper),
}

#[derive(Subcommand)]
enum BenchHelper {
    Serve,
    Connect { addr: String, n: usize },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => setup::run().and_then(|()| test::run(&args)),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::DeployCheck => deploy::run(),
        Task::Bench { name } => setup::run().and_then(|()| bench::run(&name)),
        Task::Fuzz {
            target,
            time,
            check,
            sanitizer,
        } => setup::run().and_then(|()| {
            fuzz::run(&fuzz::Options {
                target,
                time,
                check,
                sanitizer,
            })
        }),
        Task::BenchHelper(BenchHelper::Serve) => bench::connect::serve(),
        Task::BenchHelper(BenchHelper::Connect { addr, n }) => bench::connect::connect(&addr, n),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
