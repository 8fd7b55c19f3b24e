//! `cargo xtask demo`: builds kz and runs its demo. For now that is kernel interception
//! (`kz intercept demo`); later issues replace it with `kz run --blind`.

use crate::setup;
use anyhow::{Result, bail};
use std::path::PathBuf;
use std::process::Command;

pub fn run() -> Result<()> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = setup::path_with_tools();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "kz-agent", "--bin", "kz"])
        .env("PATH", &path)
        .current_dir(&workspace)
        .status()?;
    if !status.success() {
        bail!("building kz failed");
    }
    let kz = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("debug/kz");
    let status = Command::new(kz)
        .args(["intercept", "demo"])
        .env("PATH", &path)
        .status()?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}
