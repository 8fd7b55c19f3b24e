//! The `kz` command line. Each subcommand's arguments live in the module that does the job;
//! this file only names them and dispatches, so the whole CLI reads in one screen.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "kz", version, about = "Keep an AI agent's credentials out of its hands", long_about = None)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info`, `kz_agent::proxy=debug`. Logs go to stderr.
    #[arg(long, global = true, env = "KZ_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
}

/// Runs the parsed command and returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kz", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Server { command } => crate::pdp::cli::run_server(command),
        Command::Audit { command } => crate::pdp::cli::run_audit(command),
    }
}
