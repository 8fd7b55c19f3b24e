//! `kz allow` and `kz deny`: approvals of the config `kz run --blind` trusts
//! ([`crate::config::approval`]).

use crate::cli::AllowArgs;
use crate::config::approval::{EXIT_NOT_APPROVED, Status, Store, allow_command, render};
use crate::config::{Config, find_dir, print_warnings, process_env};
use std::path::Path;
use std::process::ExitCode;

/// Shows what changed since the project's last approval (everything, the first time), then
/// records the current view; `--show` records nothing and exits 77 when not approved.
pub(super) fn allow(dir: Option<&Path>, args: &AllowArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(dir)?;
    print_warnings(&config);
    let store = Store::open(&process_env)?;
    let status = Status::of(&config, &store)?;
    println!("Project: {}", status.project.display());
    println!("Environment: {}", status.environment);
    if status.is_approved() {
        println!("Approved: unchanged since the last approval.");
        return Ok(ExitCode::SUCCESS);
    }
    if status.approved.is_some() {
        println!("Changes since the last approval:");
    } else {
        println!("Not approved yet. What kz run --blind would trust:");
    }
    println!("{}", render(&status.changes()));
    if args.show {
        println!(
            "Not approved. Approve with: {}",
            allow_command(&status.project, &process_env)
        );
        return Ok(ExitCode::from(EXIT_NOT_APPROVED));
    }
    let record = status.approve(&store, "kz allow")?;
    println!("Approved ({}).", record.display());
    Ok(ExitCode::SUCCESS)
}

/// Forgets the project's approvals (every environment); the config need not parse.
pub(super) fn deny(dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let start = match dir {
        Some(d) => d.to_owned(),
        None => std::env::current_dir()?,
    };
    let Some(project) = find_dir(&start) else {
        anyhow::bail!(
            "no .keyzero.toml or .keyzero.local.toml in {} or its parents",
            start.display()
        );
    };
    let project = std::fs::canonicalize(&project)?;
    let store = Store::open(&process_env)?;
    if store.forget(&project)? {
        println!(
            "Forgot the approvals of {}; its next kz run --blind is a first use.",
            project.display()
        );
    } else {
        println!("{} had no approvals.", project.display());
    }
    Ok(ExitCode::SUCCESS)
}
