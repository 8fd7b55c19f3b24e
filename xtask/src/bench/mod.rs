//! `cargo xtask bench <name>`: benchmarks that print ratios against the direct path and peers,
//! all measured in one run on the same machine.

mod load;
mod pdp;
mod run;

use anyhow::{Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub fn run(name: &str) -> Result<()> {
    match name {
        "run" => run::run(),
        "pdp" => pdp::run(),
        other => bail!("unknown benchmark '{other}'; known: run, pdp"),
    }
}

/// Wall-clock statistics of repeated runs of one command.
pub struct Stats {
    pub label: String,
    pub samples: Vec<Duration>,
}

impl Stats {
    pub fn mean(&self) -> Duration {
        let total: Duration = self.samples.iter().sum();
        total / u32::try_from(self.samples.len().max(1)).unwrap_or(1)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        let idx = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(idx).copied().unwrap_or_default()
    }
}

/// Runs `make()` `warmup` + `n` times; only successful runs count.
pub fn measure(label: &str, warmup: usize, n: usize, make: impl Fn() -> Command) -> Result<Stats> {
    for _ in 0..warmup {
        let status = make().status()?;
        if !status.success() {
            bail!("{label}: warm-up run failed ({status})");
        }
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let status = make().status()?;
        samples.push(start.elapsed());
        if !status.success() {
            bail!("{label}: run failed ({status})");
        }
    }
    Ok(Stats {
        label: label.to_owned(),
        samples,
    })
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
