//! Checks of `deploy/` that need no cluster and no booted systemd, run by `cargo xtask test`:
//! every Kubernetes manifest against the Kubernetes API schemas (`kubernetes-validate`, from
//! the venv, schemas bundled: works offline), every file a kustomization lists exists, and the
//! systemd unit through `systemd-analyze verify` and `security --offline` (its exposure score
//! is printed). A missing tool fails under CI=true (setup installs both) and is a warning
//! elsewhere.

use crate::setup;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn run() -> Result<()> {
    let root = crate::bench::run::workspace_root().join("deploy");
    kubernetes(&root.join("kubernetes"))?;
    systemd(&root.join("systemd"))?;
    Ok(())
}

fn kubernetes(dir: &Path) -> Result<()> {
    let manifests = kustomization_resources(dir)?;
    let validator = setup::venv_dir().join("bin/kubernetes-validate");
    if !validator.exists() {
        return missing(&format!(
            "{} (pip package kubernetes-validate)",
            validator.display()
        ));
    }
    let out = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .args(&manifests)
        .output()
        .with_context(|| format!("run {}", validator.display()))?;
    if !out.status.success() {
        bail!(
            "deploy/kubernetes does not validate against the Kubernetes API schemas:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "xtask: deploy/kubernetes: {} manifests valid (kubernetes-validate --strict)",
        manifests.len()
    );
    Ok(())
}

/// The `resources:` of `dir/kustomization.yaml`, each checked to exist, and every other YAML
/// file in `dir` checked to be listed (a manifest nobody applies is a mistake).
fn kustomization_resources(dir: &Path) -> Result<Vec<PathBuf>> {
    let file = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    let mut listed = Vec::new();
    let mut in_resources = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_resources = line.trim_end() == "resources:";
            continue;
        }
        if in_resources && let Some(item) = line.trim().strip_prefix("- ") {
            let path = dir.join(item.trim());
            if !path.is_file() {
                bail!("{} lists {item}, which does not exist", file.display());
            }
            listed.push(path);
        }
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && path != file && !listed.contains(&path) {
            bail!("{} is not listed in {}", path.display(), file.display());
        }
    }
    if listed.is_empty() {
        bail!("{} lists no resources", file.display());
    }
    Ok(listed)
}

fn systemd(dir: &Path) -> Result<()> {
    let Some(analyze) = which("systemd-analyze") else {
        return missing("systemd-analyze (Debian package systemd)");
    };
    let unit = dir.join("kz-agent.service");
    let text =
        std::fs::read_to_string(&unit).with_context(|| format!("read {}", unit.display()))?;
    // verify checks that ExecStart's program exists: the unit names the installed path, so a
    // copy naming an executable that is here (this one) is checked instead.
    let tmp = std::env::temp_dir().join(format!("kz-deploy-check-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let copy = tmp.join("kz-agent.service");
    let stand_in = std::env::current_exe().context("find xtask's own executable")?;
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/kz", &stand_in.to_string_lossy()),
    )
    .with_context(|| format!("write {}", copy.display()))?;
    let result = analyze_unit(&analyze, &copy);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn analyze_unit(analyze: &Path, unit: &Path) -> Result<()> {
    let verify = Command::new(analyze)
        .arg("verify")
        .arg(unit)
        .output()
        .context("run systemd-analyze verify")?;
    // verify also prints complaints about other units on this machine; only ours count.
    let stderr = String::from_utf8_lossy(&verify.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("kz-agent.service"))
        .collect();
    if !verify.status.success() || !ours.is_empty() {
        bail!(
            "systemd-analyze verify deploy/systemd/kz-agent.service failed ({}):\n{}",
            verify.status,
            stderr
        );
    }
    let security = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .context("run systemd-analyze security")?;
    let report = String::from_utf8_lossy(&security.stdout);
    let score = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| format!("no score ({})", security.status));
    eprintln!("xtask: deploy/systemd/kz-agent.service verified; {score}");
    Ok(())
}

fn missing(what: &str) -> Result<()> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{what} is missing; `cargo xtask setup` installs it");
    }
    eprintln!("xtask: note: {what} is missing, deploy/ not checked (`cargo xtask setup`)");
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = setup::path_with_tools();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
