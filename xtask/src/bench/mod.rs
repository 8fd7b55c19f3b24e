//! Benchmarks: `cargo xtask bench NAME`. Each prints kz against the direct path and its peers
//! in one run, as ratios, on the same machine and inputs.

mod load;
mod mcp;
mod pdp;

pub fn run(name: &str) -> anyhow::Result<()> {
    match name {
        "pdp" => pdp::run(),
        "mcp" => mcp::run_bench(),
        other => anyhow::bail!("unknown benchmark `{other}`; known: pdp, mcp"),
    }
}
