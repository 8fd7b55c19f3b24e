use clap::Parser;
use std::process::ExitCode;

/// jemalloc: the proxy allocates and frees small buffers on every request from several
/// threads; it measured cheaper than glibc's malloc there (see `cargo xtask bench proxy`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = kz_agent::cli::Cli::parse();
    kz_agent::logging::init(&cli.log);
    match kz_agent::cli::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line; errors never carry secret values.
            eprintln!("kz: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
