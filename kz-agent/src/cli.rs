//! The `kz` command line. Each subcommand's arguments live in the module that does the job;
//! this file only names them and dispatches, so the whole CLI reads in one screen.

use crate::config::commands::FormatArgs;
use crate::run::RunArgs;
use crate::run::commands::{ExportArgs, StatusArgs};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "kz", version, about = "Keep an AI agent's credentials out of its hands", long_about = None)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info`, `kz_agent::proxy=debug`. Logs go to stderr.
    #[arg(long, global = true, env = "KZ_LOG", default_value = "warn")]
    pub log: String,

    /// Where to look for .keyzero.toml (and its parents); defaults to the current directory
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve secrets and run a command with them injected as env vars
    Run(RunArgs),
    /// Resolve secrets and print `export KEY='VALUE'` lines
    Export(ExportArgs),
    /// Show resolution status for each secret
    Status(StatusArgs),
    /// Check the config file for errors without resolving secrets
    Validate(FormatArgs),
    /// Create a starter .keyzero.toml in the current directory
    Init,
    /// List configured secrets (without resolving)
    #[command(alias = "ls")]
    List(FormatArgs),
    /// Print a shell completion script, e.g. `kz completions bash > /etc/bash_completion.d/kz`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The policy decision point: `kz server start --bundle F`, `kz server check --bundle F`.
    Server {
        #[command(subcommand)]
        command: crate::pdp::cli::ServerCommand,
    },
    /// Audit log tools: `kz audit verify FILE`.
    Audit {
        #[command(subcommand)]
        command: crate::pdp::cli::AuditCommand,
    },
    /// Check whether kernel interception can work here and say what to fix.
    Doctor,
    /// Interception internals for tests and the demo (not a stable interface).
    #[command(hide = true, subcommand)]
    Intercept(crate::intercept::hold::InterceptCommand),
}

/// A single-threaded runtime: these commands wait on a few HTTP lookups and one child.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// Runs the parsed command and returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = cli.dir.as_deref();
    match cli.command {
        Command::Run(args) => Ok(block_on(crate::run::run(dir, args))??),
        Command::Export(args) => Ok(block_on(crate::run::commands::export(dir, &args))??),
        Command::Status(args) => Ok(block_on(crate::run::commands::status(dir, &args))??),
        Command::Validate(fmt) => crate::config::commands::validate(dir, &fmt),
        Command::Init => crate::config::commands::init(dir),
        Command::List(fmt) => crate::config::commands::list(dir, &fmt),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kz", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Server { command } => crate::pdp::cli::run_server(command),
        Command::Audit { command } => crate::pdp::cli::run_audit(command),
        Command::Doctor => Ok(crate::intercept::doctor::run()),
        Command::Intercept(cmd) => crate::intercept::hold::run(cmd),
    }
}
