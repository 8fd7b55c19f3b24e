//! cgroup v2 files: finding the hierarchy, creating and removing kz's cgroups, and placing
//! processes in them.
//!
//! kz's cgroups live at `<root>/kz/<instance>/<name>` where `<root>` is the cgroup v2 mount
//! (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2 hosts) and
//! `<instance>` names the loader that made them ([`super::pins::Instance`]).

use super::InterceptError;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Candidate mount points in order of preference.
const CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// The cgroup v2 mount point: the first of the candidates that `/proc/self/mountinfo` lists as
/// `cgroup2`, else any cgroup2 mount.
pub fn cgroup2_root() -> Result<PathBuf, InterceptError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| InterceptError::io("read", "/proc/self/mountinfo", e))?;
    let mounts = mounts_of_type(&info, "cgroup2");
    for c in CANDIDATES {
        if mounts.iter().any(|m| m == Path::new(c)) {
            return Ok(PathBuf::from(c));
        }
    }
    mounts.into_iter().next().ok_or(InterceptError::NoCgroup2)
}

/// Mount points of filesystems of type `fstype` in mountinfo text (fields after " - ").
pub fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == fstype).then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// A cgroup made by an [`super::Interceptor`]. Cheap to clone; removal is the interceptor's job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// The kernel's cgroup id (the directory's inode number), the key of the policy maps.
    pub id: u64,
    /// The cgroup's directory, e.g. `/sys/fs/cgroup/unified/kz/1234-5678/run-1`.
    pub path: PathBuf,
    pub name: String,
}

impl Cgroup {
    /// Starts `cmd` as a child that lives in this cgroup from its first instruction
    /// (clone3 with CLONE_INTO_CGROUP, Linux 5.7+): no migration, which is what makes it cheaper
    /// than [`Cgroup::place_child`] (see [`super::spawn`]). Program, arguments, environment
    /// changes and working directory of `cmd` are used; stdio is inherited. Returns
    /// [`std::io::ErrorKind::Unsupported`] where the kernel does not allow it: use
    /// `place_child` and std's spawn then.
    pub fn spawn(
        &self,
        cmd: &std::process::Command,
        contain: Option<&crate::contain::Prepared>,
    ) -> std::io::Result<super::spawn::CgroupChild> {
        super::spawn::spawn_into(&self.path, cmd, contain, None)
    }

    /// [`Cgroup::spawn`] with the child's stdio given instead of inherited.
    pub fn spawn_with_stdio(
        &self,
        cmd: &std::process::Command,
        contain: Option<&crate::contain::Prepared>,
        stdio: Option<&super::spawn::ChildStdio>,
    ) -> std::io::Result<super::spawn::CgroupChild> {
        super::spawn::spawn_into(&self.path, cmd, contain, stdio)
    }

    /// Makes `cmd`'s child enter this cgroup between fork and exec, so not one instruction of the
    /// program runs outside it. (std's Command has no CLONE_INTO_CGROUP; a pre_exec write of "0"
    /// to cgroup.procs, which moves the writing process, does the same, at the cost of a cgroup
    /// migration: an RCU grace period, ~10 ms. [`Cgroup::spawn`] avoids it.)
    pub fn place_child(&self, cmd: &mut std::process::Command) -> Result<(), InterceptError> {
        use std::os::unix::process::CommandExt;
        let procs = self.path.join("cgroup.procs");
        let c_path = CString::new(procs.as_os_str().as_bytes())
            .map_err(|_| InterceptError::BadName(procs.display().to_string()))?;
        let hook = move || -> std::io::Result<()> {
            // SAFETY: runs in the forked child before exec; open/write/close are
            // async-signal-safe and nothing here allocates (the path was built before fork).
            unsafe {
                let fd = libc::open(c_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            Ok(())
        };
        // SAFETY: the hook only makes async-signal-safe calls (see above).
        unsafe {
            cmd.pre_exec(hook);
        }
        Ok(())
    }

    /// Moves an existing process (all its threads) into this cgroup. Sockets it opened before
    /// keep their old cgroup: prefer [`Cgroup::place_child`].
    pub fn move_pid(&self, pid: u32) -> Result<(), InterceptError> {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|e| InterceptError::io("write", procs, e))
    }

    /// Process ids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, InterceptError> {
        pids(&self.path)
    }
}

pub(crate) fn pids(path: &Path) -> Result<Vec<u32>, InterceptError> {
    let procs = path.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(|e| InterceptError::io("read", procs, e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Checks a cgroup name: one path component, no surprises.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Creates `dir` (its parents too) and returns its cgroup id.
pub(crate) fn create(dir: &Path) -> Result<u64, InterceptError> {
    if dir.exists() {
        return Err(InterceptError::CgroupExists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(|e| InterceptError::io("create cgroup", dir, e))?;
    cgroup_id(dir)
}

pub(crate) fn cgroup_id(dir: &Path) -> Result<u64, InterceptError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| InterceptError::io("stat cgroup", dir, e))
}

/// Whether any process lives in `dir` or any cgroup below it (`populated` in cgroup.events).
pub fn populated(dir: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() == "1")
}

/// Kills every process in `dir` and below (cgroup.kill, Linux 5.14+; else SIGKILL to each
/// listed pid) and waits up to `timeout` for the subtree to empty. Returns whether it is empty.
/// Subtree-wide on purpose: a process that moved itself into a child cgroup must not survive
/// the detach that follows.
pub(crate) fn kill_all(dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut killed = false;
    loop {
        match populated(dir) {
            Some(false) => return true,
            None => return !dir.exists(),
            Some(true) => {}
        }
        if !killed {
            if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
                for cg in subtree(dir) {
                    for pid in pids(&cg).unwrap_or_default() {
                        if let Ok(pid) = i32::try_from(pid) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                }
            }
            killed = true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `dir` and every cgroup directory below it.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(subtree(&e.path()));
            }
        }
    }
    out
}

/// Removes an empty cgroup directory (children first). Retries briefly: a killed process leaves
/// the cgroup a moment after it is reaped.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), InterceptError> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(InterceptError::io("remove cgroup", dir, e));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_mountinfo() {
        let info = "30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            mounts_of_type(info, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert!(mounts_of_type(info, "bpf").is_empty());
    }

    #[test]
    fn cgroup_names_are_single_safe_components() {
        assert!(valid_name("run-1.a_b"));
        for bad in ["", ".", "..", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?} must be rejected");
        }
    }
}
