//! `cargo xtask test`: the whole suite, as CI runs it. Formatting and lints first (cheap,
//! and a failure there is the most common), then every test with nextest (a process per test:
//! tests that enter network namespaces or cgroups cannot disturb each other).

use crate::setup;
use anyhow::{Context, Result, bail};
use std::process::Command;

pub fn run(extra: &[String]) -> Result<()> {
    let path = setup::path_with_tools();
    cargo(&path, &["fmt", "--all", "--check"], &[])?;
    cargo(
        &path,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    let mut args = vec!["nextest", "run", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&path, &args, &[])?;
    Ok(())
}

fn cargo(path: &std::ffi::OsStr, args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .env("PATH", path)
        .envs(envs.iter().copied())
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
