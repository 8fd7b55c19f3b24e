use clap::Parser;
use kz_agent::cli::Cli;
use std::process::ExitCode;

/// jemalloc: the proxy allocates and frees small buffers on every request from several
/// threads; it measured cheaper than glibc's malloc there (see `cargo xtask bench proxy`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    kz_agent::logging::init(&cli.log);
    kz_agent::cmd::protect(&cli.command);
    match kz_agent::cmd::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line; errors never carry secret values.
            eprintln!("kz: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
