//! bpffs layout and the cleanup of what dead loaders left behind.
//!
//! ```text
//! /sys/fs/bpf/kz/<instance>/maps/<MAP NAME>
//! /sys/fs/bpf/kz/<instance>/links/<cgroup id>-<program>
//! <cgroup2 root>/kz/<instance>/<cgroup name>
//! ```
//! `<instance>` is `<pid>-<start time in clock ticks>-<seq>` of the loader, so a later kz can tell a
//! live loader (leave it alone) from a dead one whose pid was reused (clean up).

use super::{InterceptError, cgroups};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The default [`Scope`] name.
pub const DEFAULT_SCOPE: &str = "kz";

/// A namespace for kz state: pins under `/sys/fs/bpf/<scope>/`, cgroups under
/// `<cgroup2 root>/<scope>/`. Loaders only ever clean up dead instances of their own scope, so
/// independent deployments (or tests that kill loaders on purpose) do not interfere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub cgroup_root: PathBuf,
    pub name: String,
}

impl Scope {
    /// `name` must be a plain directory name (see [`cgroups::valid_name`]).
    pub fn new(cgroup_root: &Path, name: &str) -> Result<Scope, InterceptError> {
        if !cgroups::valid_name(name) {
            return Err(InterceptError::BadName(name.to_owned()));
        }
        Ok(Scope {
            cgroup_root: cgroup_root.to_path_buf(),
            name: name.to_owned(),
        })
    }

    /// The default scope on the detected cgroup v2 hierarchy.
    pub fn detect() -> Result<Scope, InterceptError> {
        Scope::new(&cgroups::cgroup2_root()?, DEFAULT_SCOPE)
    }

    /// Directory holding every instance's pins.
    pub fn pin_root(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.name)
    }

    /// Directory holding every instance's cgroups.
    pub fn cgroup_parent(&self) -> PathBuf {
        self.cgroup_root.join(&self.name)
    }
}

/// A loader, identified across pid reuse; `seq` tells apart several interceptors of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub pid: u32,
    pub start: u64,
    pub seq: u32,
}

impl Instance {
    /// A new instance of this process (each call gets its own `seq`).
    pub fn current() -> Result<Instance, InterceptError> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let start = start_time(pid).ok_or_else(|| {
            InterceptError::io(
                "read",
                "/proc/self/stat",
                std::io::Error::other("no start time"),
            )
        })?;
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Instance { pid, start, seq })
    }

    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.pid, self.start, self.seq)
    }

    pub fn parse(name: &str) -> Option<Instance> {
        let mut parts = name.split('-');
        let inst = Instance {
            pid: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(inst)
    }

    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// Field 22 of /proc/<pid>/stat (start time since boot, in clock ticks).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether bpffs is mounted at [`BPFFS`].
pub fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            cgroups::mounts_of_type(&info, "bpf")
                .iter()
                .any(|m| m == Path::new(BPFFS))
        })
        .unwrap_or(false)
}

/// Mounts bpffs at [`BPFFS`] when it is missing (needs CAP_SYS_ADMIN).
pub fn ensure_bpffs() -> Result<(), InterceptError> {
    if bpffs_mounted() {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|_| InterceptError::NoBpffs(PathBuf::from(BPFFS)))
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StaleReport {
    /// Names of dead instances cleaned up.
    pub instances: Vec<String>,
    /// Processes killed in their cgroups.
    pub killed: usize,
}

/// Cleans up after loaders that died without an orderly exit: kills what is left in their
/// cgroups, then unpins their links and maps (which detaches the programs) and removes the
/// cgroups. Processes are killed *before* anything is detached, so an orphaned agent is never
/// let out uncut; if a cgroup cannot be emptied its pins stay and this returns an error.
pub fn cleanup_stale(scope: &Scope) -> Result<StaleReport, InterceptError> {
    let pins = scope.pin_root();
    let cgroups = scope.cgroup_parent();
    let mut names: Vec<String> = Vec::new();
    for dir in [&pins, &cgroups] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Some(n) = e.file_name().to_str()
                    && !names.iter().any(|x| x == n)
                {
                    names.push(n.to_owned());
                }
            }
        }
    }
    let mut report = StaleReport::default();
    for name in names {
        // Only directories named like an instance are ours to judge.
        let Some(inst) = Instance::parse(&name) else {
            continue;
        };
        if inst.alive() {
            continue;
        }
        let cg_dir = cgroups.join(&name);
        if cg_dir.is_dir() {
            report.killed += leaf_cgroups(&cg_dir)
                .iter()
                .map(|c| cgroups::pids(c).map(|p| p.len()).unwrap_or(0))
                .sum::<usize>();
            if !cgroups::kill_all(&cg_dir, Duration::from_secs(3)) {
                return Err(InterceptError::CgroupBusy(cg_dir));
            }
        }
        let pin_dir = pins.join(&name);
        if pin_dir.exists() {
            // Unlinking the last reference to a link detaches it; maps go with their programs.
            std::fs::remove_dir_all(&pin_dir)
                .map_err(|e| InterceptError::io("remove pins", &pin_dir, e))?;
        }
        cgroups::remove_tree(&cg_dir)?;
        tracing::info!(instance = %name, "cleaned up a dead kz instance's pins and cgroups");
        report.instances.push(name);
    }
    Ok(report)
}

/// Every cgroup directory below `dir`, deepest first, `dir` itself last.
fn leaf_cgroups(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(leaf_cgroups(&e.path()));
            }
        }
    }
    if dir.is_dir() {
        out.push(dir.to_path_buf());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_round_trip_and_current_is_alive() {
        let me = Instance::current().expect("own stat");
        assert_eq!(Instance::parse(&me.name()), Some(me.clone()));
        assert!(me.alive());
        let reused = Instance {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!reused.alive(), "same pid, other start time = dead");
        let second = Instance::current().expect("own stat");
        assert_ne!(
            second.name(),
            me.name(),
            "two interceptors of one process never share pins"
        );
        for bad in ["maps", "12-x-0", "12-34", "12-34-5-6", ""] {
            assert_eq!(Instance::parse(bad), None, "{bad:?}");
        }
    }
}
