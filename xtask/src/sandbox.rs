//! What the demo and the benches need to build throwaway network namespaces: run a command and
//! fail with its stderr, run a program inside a namespace, and delete everything on drop.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::{Child, Command};

/// Deletes what a demo or bench created, whatever happens: children, namespaces, a directory.
pub struct Cleanup {
    pub netns: Vec<String>,
    pub children: Vec<Child>,
    pub dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` to completion; a failure carries the command and its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `program` inside network namespace `ns` (nsenter, which keeps cgroupfs visible).
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}
