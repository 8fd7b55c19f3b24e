//! `cargo xtask test`: the whole suite, as CI runs it. Formatting and lints first (cheap,
//! and a failure there is the most common), then every test with nextest (a process per test:
//! tests that enter network namespaces or cgroups cannot disturb each other). Between the two,
//! `deploy/` is checked ([`crate::deploy`]).

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
    // Cheap and cluster-free: the deployment files against their schemas and systemd.
    crate::deploy::run()?;
    let mut args = vec!["nextest", "run", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    let result = cargo(&path, &args, &[]);
    unload_programs();
    result
}

/// The suite leaves this build's eBPF program set pinned in kz's default scope, as any kz run
/// does (tests with scopes of their own unload them). Unloading it here means a test run holds
/// no kernel memory afterwards. Best effort: it is refused while other kz instances run, which is
/// not a test failure.
fn unload_programs() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::bench::run::workspace_root().join("target"));
    let kz = target.join("debug/kz");
    if !kz.is_file() {
        return;
    }
    match Command::new(&kz).args(["intercept", "unload"]).output() {
        Ok(out) if out.status.success() => eprintln!(
            "xtask: eBPF program sets unloaded: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        Ok(out) => eprintln!(
            "xtask: note: eBPF program set left loaded: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("xtask: note: cannot run {}: {e}", kz.display()),
    }
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
