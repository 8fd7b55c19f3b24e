//! Benchmarks: `cargo xtask bench NAME`. Each prints kz against the direct path and its peers
//! in one run, as ratios, on the same machine and inputs.

mod load;
mod pdp;
mod wrk;

pub fn run(name: &str) -> anyhow::Result<()> {
    match name {
        "pdp" => pdp::run(),
        other => anyhow::bail!("unknown benchmark `{other}`; known: pdp"),
    }
}
