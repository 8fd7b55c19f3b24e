//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (issue 19).
//!
//! - `cargo xtask fuzz [TARGET] [--time 10m]`: fuzzes one target, or each in turn, for that long.
//!   New inputs go to `fuzz/target/corpus/<target>/` (not committed); the committed seeds in
//!   `fuzz/corpus/<target>/` are read, never written; crashes land in `fuzz/artifacts/<target>/`.
//! - `cargo xtask fuzz --check`: every target over its committed corpus once (libFuzzer
//!   `-runs=0`), the regression mode CI runs: a crash once found and added to the corpus stays
//!   fixed.
//!
//! cargo-fuzz needs nightly compiler flags (`-Z sanitizer`, `-C passes=sancov-module`); the
//! stable toolchain accepts them with `RUSTC_BOOTSTRAP=1`, so no nightly is needed here (the
//! eBPF build's nightly is not used for host code). AddressSanitizer is on by default;
//! `--sanitizer none` builds without it (libFuzzer's coverage guidance still works).

use crate::setup;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub struct Options {
    pub target: Option<String>,
    pub time: Duration,
    pub check: bool,
    pub sanitizer: String,
}

pub fn run(opts: &Options) -> Result<()> {
    let dir = crate::bench::run::workspace_root().join("fuzz");
    let targets = match &opts.target {
        Some(t) => vec![t.clone()],
        None => list(&dir)?,
    };
    // One build for all targets: `cargo fuzz run` rebuilds only what changed.
    fuzz_cmd(&dir, &["build"], opts, &[])?;
    let mut failed = Vec::new();
    for t in &targets {
        let seeds = dir.join("corpus").join(t);
        std::fs::create_dir_all(&seeds).with_context(|| format!("create {}", seeds.display()))?;
        let seeds_arg = seeds.to_string_lossy().into_owned();
        let result = if opts.check {
            eprintln!("xtask: fuzz {t}: the committed corpus, once");
            fuzz_cmd(&dir, &["run", t, &seeds_arg], opts, &["-runs=0"])
        } else {
            let work = dir.join("target/corpus").join(t);
            let artifacts = dir.join("artifacts").join(t);
            for d in [&work, &artifacts] {
                std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            }
            let work_arg = work.to_string_lossy().into_owned();
            let secs = opts.time.as_secs().max(1);
            eprintln!(
                "xtask: fuzz {t}: {secs}s; crashes go to {}",
                artifacts.display()
            );
            fuzz_cmd(
                &dir,
                &["run", t, &work_arg, &seeds_arg],
                opts,
                &[
                    &format!("-max_total_time={secs}"),
                    &format!("-artifact_prefix={}/", artifacts.display()),
                    "-print_final_stats=1",
                ],
            )
        };
        if let Err(e) = result {
            eprintln!("xtask: fuzz {t}: {e:#}");
            failed.push(t.as_str());
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (the input is in fuzz/artifacts/<target>/; reproduce with `cargo xtask fuzz TARGET --check` after copying it into fuzz/corpus/TARGET/)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `10m`, `90s`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 90s, 10m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`; use s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

fn list(dir: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .args(["fuzz", "list"])
        .current_dir(dir)
        .env("PATH", setup::path_with_tools())
        .output()
        .context("run cargo fuzz list (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `cargo fuzz <args> <build flags> [-- <libfuzzer args>]` in `fuzz/`.
fn fuzz_cmd(dir: &Path, args: &[&str], opts: &Options, libfuzzer: &[&str]) -> Result<()> {
    // Release with debug assertions: fast, and overflow or a failed debug_assert is a finding.
    let mut cmd = Command::new("cargo");
    cmd.arg("fuzz")
        .args(args)
        .args(["--release", "--debug-assertions", "--sanitizer"])
        .arg(&opts.sanitizer)
        .current_dir(dir)
        .env("PATH", setup::path_with_tools())
        .env("RUSTC_BOOTSTRAP", "1");
    if !libfuzzer.is_empty() {
        cmd.arg("--").args(libfuzzer);
    }
    eprintln!("xtask: cargo fuzz {}", args.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("run cargo fuzz {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo fuzz {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
