//! Composition roots: the wiring of every `kz` subcommand, at the top of the crate.
//!
//! A command here takes the parsed [`crate::cli`] arguments, turns them into the library's typed
//! options, builds the pieces (config, resolvers, PDP, proxy, interceptor), runs them on the
//! runtime the command needs, prints what the user reads and picks the exit code. Everything
//! below imports only downwards and never sees clap, so the node daemon can compose the same
//! pieces differently.
//!
//! One file per command group: `run` (`run`, `export`, `status`), `config` (`validate`,
//! `init`, `list`), `allow` (`allow`, `deny`: approvals of blind runs' configs), `server`
//! (`server start|check`, MCP included), `agent` (`agent run|status`, `sandbox ls|show|rm`),
//! `audit` (`audit verify`), `doctor`, `intercept` (the hidden `intercept …` commands, with
//! the `demo`); `signals` is the one place that waits for SIGINT/SIGTERM and SIGHUP.

mod agent;
mod allow;
mod audit;
mod config;
mod demo;
mod doctor;
mod intercept;
mod run;
mod server;
mod signals;

use crate::cli::{AgentCommand, Cli, Command, ServerCommand};
use std::process::ExitCode;

/// A single-threaded runtime: these commands wait on a few HTTP lookups and one child.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// A multi-threaded runtime for commands that serve traffic while they wait.
fn block_on_multi<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// Runs the parsed command and returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = cli.dir.as_deref();
    match cli.command {
        // Blind mode serves the agent's traffic (proxy, DNS) from this process: use both cores.
        Command::Run(args) if args.blind => Ok(block_on_multi(run::run(dir, args))??),
        Command::Run(args) => Ok(block_on(run::run(dir, args))??),
        Command::Export(args) => Ok(block_on(run::export(dir, &args))??),
        Command::Status(args) => Ok(block_on(run::status(dir, &args))??),
        Command::Validate(fmt) => config::validate(dir, &fmt),
        Command::Init => config::init(dir),
        Command::List(fmt) => config::list(dir, &fmt),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kz", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Allow(args) => allow::allow(dir, &args),
        Command::Deny => allow::deny(dir),
        Command::Doctor => Ok(doctor::run()),
        Command::Intercept(cmd) => intercept::run(cmd),
        Command::Server { command } => server::run(command),
        Command::Audit { command } => audit::run(command),
        Command::Agent { command } => agent::agent(command),
        Command::Sandbox { command } => agent::sandbox(command),
    }
}

/// Makes kz non-dumpable, and for the long-lived commands that hold real values while an agent
/// or clients are served, core files impossible: before any secret is resolved and before any
/// other thread exists (see [`crate::harden`]).
///
/// Plain `kz run` is only made non-dumpable: its child (KeyZero's behaviour: real values in
/// its environment) would inherit a zero core limit it cannot raise back, whereas dumpability
/// is reset by `execve`. `kz export` and `kz status` resolve too and get both.
pub fn protect(command: &Command) {
    let no_core = match command {
        Command::Run(args) => args.blind,
        Command::Server {
            command: ServerCommand::Start(_),
        }
        | Command::Agent {
            command: AgentCommand::Run(_),
        }
        | Command::Export(_)
        | Command::Status(_) => true,
        _ => return,
    };
    if let Err(e) = crate::harden::set_not_dumpable() {
        tracing::warn!("{e}");
    }
    if no_core && let Err(e) = crate::harden::set_no_core_dumps() {
        tracing::warn!("{e}");
    }
}
