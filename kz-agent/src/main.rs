use clap::Parser;
use kz_agent::cli::{Cli, Command};
use kz_agent::pdp::cli::ServerCommand;
use std::process::ExitCode;

/// jemalloc: the proxy allocates and frees small buffers on every request from several
/// threads; it measured cheaper than glibc's malloc there (see `cargo xtask bench proxy`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    kz_agent::logging::init(&cli.log);
    protect(&cli.command);
    match kz_agent::cli::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line; errors never carry secret values.
            eprintln!("kz: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Makes kz non-dumpable, and for the long-lived commands that hold real values while an agent
/// or clients are served, core files impossible: before any secret is resolved and before any
/// other thread exists (see [`kz_agent::harden`]).
///
/// Plain `kz run` is only made non-dumpable: its child (KeyZero's behaviour: real values in
/// its environment) would inherit a zero core limit it cannot raise back, whereas dumpability
/// is reset by `execve`. `kz export` and `kz status` resolve too and get both.
fn protect(command: &Command) {
    let no_core = match command {
        Command::Run(args) => args.blind,
        Command::Server {
            command: ServerCommand::Start(_),
        }
        | Command::Export(_)
        | Command::Status(_) => true,
        _ => return,
    };
    if let Err(e) = kz_agent::harden::set_not_dumpable() {
        tracing::warn!("{e}");
    }
    if no_core && let Err(e) = kz_agent::harden::set_no_core_dumps() {
        tracing::warn!("{e}");
    }
}
