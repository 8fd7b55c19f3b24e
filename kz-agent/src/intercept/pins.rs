//! bpffs layout and the cleanup of what dead instances left behind.
//!
//! ```text
//! /sys/fs/bpf/<scope>/shared-<build>/{progs,maps}/…     programs and maps, shared (super::shared)
//! /sys/fs/bpf/<scope>/shared-<build>/rings/<n>          flock'ed by the instance using ring n
//! /sys/fs/bpf/<scope>/<instance>/links/<cgroup id>-<program>
//! <cgroup2 root>/<scope>/<instance>/<cgroup name>
//! ```
//! `<scope>` is `kz` by default. `<instance>` is `<pid>-<start time in clock ticks>-<seq>` of the
//! loader, so a later kz can tell a live instance (leave it alone) from a dead one whose pid was
//! reused (clean up). An instance owns its links and cgroups, and the entries keyed by its cgroup
//! ids in the shared maps (policy, ports, allow/deny tries, allowed IPs); a dead
//! instance's links keep its cgroups cut off until [`cleanup_stale`] removes all of it.
//!
//! A *held* owner (the node daemon, [`super::Interceptor::load_held`]) uses `agent-<hex>` in place
//! of `<instance>`: not an instance's name, so cleanup never touches it, and the owner's next
//! process adopts or removes what it left. A running holder keeps an `flock` on its pin
//! directory ([`live_instances`] reports it).

use super::{InterceptError, cgroups};
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeSet;
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

    /// Directory holding the program sets and every instance's pins.
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

/// Names of the instance directories (pins or cgroups) in `scope`, dead and alive.
fn instance_names(scope: &Scope) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for dir in [scope.pin_root(), scope.cgroup_parent()] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Some(n) = e.file_name().to_str()
                && Instance::parse(n).is_some()
                && !names.iter().any(|x| x == n)
            {
                names.push(n.to_owned());
            }
        }
    }
    names
}

/// Instances of `scope` whose loader is still running, and held owners' directories
/// ([`super::Interceptor::load_held`]) whose owner is running.
pub fn live_instances(scope: &Scope) -> Vec<String> {
    let mut live: Vec<String> = instance_names(scope)
        .into_iter()
        .filter(|n| Instance::parse(n).is_some_and(|i| i.alive()))
        .collect();
    for e in std::fs::read_dir(scope.pin_root())
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let held = name.starts_with(HELD_PREFIX) && Instance::parse(&name).is_none();
        if held && held_is_locked(&e.path()) {
            live.push(name);
        }
    }
    live
}

/// Names of held owners' directories start with this (the node daemon's: `agent-<hex>`).
pub const HELD_PREFIX: &str = "agent-";

/// Takes the `flock` a held owner keeps on its pin directory for as long as it runs (the kernel
/// drops it when the process dies, however it dies).
pub(crate) fn lock_held(pin_dir: &Path) -> Result<Flock<std::fs::File>, InterceptError> {
    let dir = std::fs::File::open(pin_dir).map_err(|e| InterceptError::io("open", pin_dir, e))?;
    Flock::lock(dir, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        InterceptError::io(
            "lock (is another process using it?)",
            pin_dir,
            std::io::Error::from(errno),
        )
    })
}

fn held_is_locked(pin_dir: &Path) -> bool {
    let Ok(dir) = std::fs::File::open(pin_dir) else {
        return false;
    };
    matches!(
        Flock::lock(dir, FlockArg::LockSharedNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// Cleans up after instances that died without an orderly exit: kills what is left in their
/// cgroups, then unpins their links (which detaches the programs from those cgroups), removes
/// their entries from this build's shared maps and removes the cgroups. Processes are killed
/// *before* anything is detached, so an orphaned agent is never let out uncut; if a cgroup
/// cannot be emptied its links stay and this returns an error. `purge` removes a dead
/// instance's cgroup ids from the shared maps ([`super::shared::cleanup_stale`] opens them: the
/// pins know where things are pinned, not what the maps hold).
pub fn cleanup_dead(
    scope: &Scope,
    purge: &mut dyn FnMut(&BTreeSet<u64>),
) -> Result<StaleReport, InterceptError> {
    let dead: Vec<String> = instance_names(scope)
        .into_iter()
        .filter(|n| Instance::parse(n).is_some_and(|i| !i.alive()))
        .collect();
    let mut report = StaleReport::default();
    if dead.is_empty() {
        return Ok(report);
    }
    for name in dead {
        let cg_dir = scope.cgroup_parent().join(&name);
        let pin_dir = scope.pin_root().join(&name);
        // The dead instance's cgroup ids: its cgroup directories (inode = id; created before any
        // entry was written and removed after the entries) and its link pins (`<id>-<program>`).
        let mut ids: BTreeSet<u64> = leaf_cgroups(&cg_dir)
            .iter()
            .filter(|d| **d != cg_dir)
            .filter_map(|d| cgroups::cgroup_id(d).ok())
            .collect();
        for e in std::fs::read_dir(pin_dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|id| id.parse().ok())
            {
                ids.insert(id);
            }
        }
        if cg_dir.is_dir() {
            report.killed += leaf_cgroups(&cg_dir)
                .iter()
                .map(|c| cgroups::pids(c).map(|p| p.len()).unwrap_or(0))
                .sum::<usize>();
            if !cgroups::kill_all(&cg_dir, Duration::from_secs(3)) {
                return Err(InterceptError::CgroupBusy(cg_dir));
            }
        }
        // Unlinking the last reference to a link detaches it. Another instance may be cleaning
        // up the same one at the same moment: what is already gone is fine.
        match std::fs::remove_dir_all(&pin_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(InterceptError::io("remove pins", &pin_dir, e)),
        }
        purge(&ids);
        cgroups::remove_tree(&cg_dir)?;
        tracing::info!(instance = %name, cgroups = ids.len(), "cleaned up a dead kz instance's links, map entries and cgroups");
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
