//! `cargo xtask bench <name>`: benchmarks that compare, in one run, the direct path, kz, and
//! peers doing the same job, and print ratios. Never timed unit tests.

pub mod connect;
mod load;
mod mcp;
mod pdp;
pub mod proxy;
pub mod run;
mod wrk;

use anyhow::{Result, bail};

pub fn run(name: &str) -> Result<()> {
    match name {
        "connect" => connect::run(),
        "pdp" => pdp::run(),
        "run" => run::run(),
        "proxy" => proxy::run_bench(),
        "mcp" => mcp::run_bench(),
        other => bail!("unknown benchmark {other:?}; available: connect, mcp, pdp, proxy, run"),
    }
}
