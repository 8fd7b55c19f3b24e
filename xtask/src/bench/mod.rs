//! `cargo xtask bench <name>`: benchmarks that compare, in one run, the direct path, kz, and
//! peers doing the same job, and print ratios. Never timed unit tests.

mod agent;
pub mod connect;
mod load;
mod mcp;
mod pdp;
pub mod proxy;
pub mod run;
mod stage;
mod wrk;

use anyhow::{Result, bail};

/// `cargo xtask bench audit`: one proxy audit record through the hash-chained sink against a
/// plain JSON line append (the sink's own bench, kz-agent/examples/audit_bench.rs).
fn audit() -> Result<()> {
    let st = std::process::Command::new("cargo")
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "kz-agent",
            "--example",
            "audit_bench",
        ])
        .status()?;
    if !st.success() {
        bail!("the audit bench failed");
    }
    Ok(())
}

pub fn run(name: &str) -> Result<()> {
    match name {
        "agent" => agent::run_bench(),
        "audit" => audit(),
        "connect" => connect::run(),
        "pdp" => pdp::run(),
        "run" => run::run(),
        "proxy" => proxy::run_bench(),
        "mcp" => mcp::run_bench(),
        other => {
            bail!(
                "unknown benchmark {other:?}; available: agent, audit, connect, mcp, pdp, proxy, run"
            )
        }
    }
}
