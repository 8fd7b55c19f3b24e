//! The agent's mount namespace: what it must not see is covered before it runs.
//!
//! The parent plans ([`MountPlan::new`]); the child, still root and alone in a fresh mount
//! namespace (propagation made private first, so nothing reaches the host), applies the plan
//! with raw system calls on memory the parent prepared ([`MountPlan::apply`]). Every mask is
//! read-only, nosuid, nodev and noexec, and the agent loses the capabilities and (seccomp) the
//! system calls that could undo one.
//!
//! Masked:
//! - bpffs mounts (the pinned programs, links and maps): an empty read-only directory;
//! - cgroup v2: a fresh cgroup2 mount, which inside the agent's cgroup namespace shows its own
//!   cgroup as the root (no `cgroup.procs` of any other cgroup is reachable); v1 hierarchies:
//!   empty;
//! - `/proc`: a fresh instance with `hidepid=2`, so the agent sees its own processes only;
//! - kz's run directory tree (`/run/kz`: other runs, the node daemon's socket): replaced by a
//!   read-only tmpfs holding only this run's CA bundle, at the path the agent was given;
//! - the audit log, its rotated files, the audit chain's key (`audit::default_key_path`) and
//!   every `[blind] hide` path: an empty file or directory over each.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {path}: {source}; the agent's mount namespace needs it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("path {0} contains a NUL byte")]
    Nul(PathBuf),
}

/// One step of the plan.
#[derive(Debug)]
enum Op {
    /// The empty file bound over `target`, then made read-only.
    EmptyFile(CString),
    /// An empty read-only tmpfs over `target`.
    EmptyDir(CString),
    /// A fresh cgroup2 mount over `target` (rooted at the agent's cgroup namespace).
    Cgroup2(CString),
    /// A fresh procfs over `target` with hidepid=2.
    Proc(CString),
    /// A tmpfs over `target` holding exactly `files` (parents created), then read-only.
    Tree {
        target: CString,
        dirs: Vec<CString>,
        files: Vec<(CString, Vec<u8>)>,
    },
}

/// Everything the child mounts, prepared so that applying it needs no allocation.
#[derive(Debug, Default)]
pub struct MountPlan {
    ops: Vec<Op>,
    /// What each op masks, for error messages (same index).
    labels: Vec<String>,
    /// The source of every file mask.
    empty_file: CString,
}

/// A directory tree replaced by a read-only one holding only `keep`: (path, content) pairs
/// below `root`.
#[derive(Debug, Default)]
pub struct RunTree {
    pub root: PathBuf,
    pub keep: Vec<(PathBuf, Vec<u8>)>,
}

/// What the plan is built from.
#[derive(Debug, Default)]
pub struct MountInputs {
    /// Files and directories to mask (absolute; ones that do not exist are skipped).
    pub hide: Vec<PathBuf>,
    /// An empty, root-owned, read-only file: the source of every file mask.
    pub empty_file: PathBuf,
    /// kz's run directory tree, replaced by one holding only the files it keeps.
    pub run_tree: Option<RunTree>,
    /// The agent is born in a cgroup of its own (and a cgroup namespace rooted there).
    pub own_cgroup: bool,
}

fn cpath(p: &Path) -> Result<CString, MountError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| MountError::Nul(p.to_owned()))
}

/// Mount points of this process's namespace with their filesystem type (from mountinfo).
fn mounts() -> Result<Vec<(PathBuf, String)>, MountError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|source| MountError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ');
            let point = fields.nth(4)?;
            // Optional fields end at "-"; the filesystem type follows it.
            let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
            Some((PathBuf::from(unescape(point)), fstype.to_owned()))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MountPlan {
    pub fn new(inputs: MountInputs) -> Result<MountPlan, MountError> {
        let mut plan = MountPlan {
            empty_file: cpath(&inputs.empty_file)?,
            ..MountPlan::default()
        };
        // File masks first: their source (the empty file) lives in kz's run directory, which
        // the run tree below covers.
        for path in inputs.hide {
            // mount(2) follows symlinks in the target: the file a link points at is masked.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let target = cpath(&path)?;
            let label = format!("hidden path {}", path.display());
            if meta.is_dir() {
                plan.push(Op::EmptyDir(target), label);
            } else {
                plan.push(Op::EmptyFile(target), label);
            }
        }
        for (point, fstype) in mounts()? {
            match fstype.as_str() {
                "bpf" => plan.push(
                    Op::EmptyDir(cpath(&point)?),
                    format!("bpffs at {}", point.display()),
                ),
                "cgroup2" if inputs.own_cgroup => plan.push(
                    Op::Cgroup2(cpath(&point)?),
                    format!("cgroup2 at {}", point.display()),
                ),
                "cgroup" | "cgroup2" => plan.push(
                    Op::EmptyDir(cpath(&point)?),
                    format!("cgroup hierarchy at {}", point.display()),
                ),
                _ => {}
            }
        }
        plan.push(
            Op::Proc(cpath(Path::new("/proc"))?),
            "/proc (hidepid=2)".into(),
        );
        if let Some(RunTree { root, keep }) = inputs.run_tree
            && root.is_dir()
        {
            let mut dirs: Vec<PathBuf> = Vec::new();
            let mut files = Vec::with_capacity(keep.len());
            for (path, content) in keep {
                for a in path.ancestors().skip(1) {
                    if a == root || !a.starts_with(&root) {
                        break;
                    }
                    if !dirs.contains(&a.to_owned()) {
                        dirs.push(a.to_owned());
                    }
                }
                files.push((cpath(&path)?, content));
            }
            // Parents before children.
            dirs.sort_by_key(|d| d.components().count());
            let dirs = dirs.iter().map(|d| cpath(d)).collect::<Result<_, _>>()?;
            plan.push(
                Op::Tree {
                    target: cpath(&root)?,
                    dirs,
                    files,
                },
                format!("kz's run directory {}", root.display()),
            );
        }
        Ok(plan)
    }

    fn push(&mut self, op: Op, label: String) {
        self.ops.push(op);
        self.labels.push(label);
    }

    /// What step `i` masks (for the error when it fails in the child).
    pub fn label(&self, i: usize) -> &str {
        self.labels.get(i).map_or("a mount", String::as_str)
    }

    /// The paths masked with an empty file or directory (for the run's notice and docs).
    pub fn masked(&self) -> impl Iterator<Item = &str> {
        self.labels.iter().map(String::as_str)
    }

    /// Applies the plan. Returns the index of the failed step and errno.
    ///
    /// # Safety
    /// Only in the single-threaded child between fork/clone and exec, as root, after
    /// `unshare(CLONE_NEWNS)`: it makes raw system calls only, on memory prepared by
    /// [`MountPlan::new`], and allocates nothing.
    pub unsafe fn apply(&self) -> Result<(), (usize, i32)> {
        const RO: libc::c_ulong =
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        const HARD: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let errno = || {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // Nothing mounted below propagates back to the host's namespace.
        if !mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None) {
            return Err((usize::MAX, errno()));
        }
        let empty_dir = |target: &CStr| {
            mount(
                Some(c"kz-hidden"),
                target,
                Some(c"tmpfs"),
                RO,
                Some(c"mode=0555,size=4k"),
            )
        };
        // Read-only is a flag of the mount, set by a bind remount.
        let read_only = |target: &CStr| {
            mount(
                None,
                target,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | RO,
                None,
            )
        };
        for (i, op) in self.ops.iter().enumerate() {
            let done = match op {
                Op::EmptyFile(target) => {
                    mount(Some(&self.empty_file), target, None, libc::MS_BIND, None)
                        && read_only(target)
                }
                Op::EmptyDir(target) => empty_dir(target),
                Op::Cgroup2(target) => {
                    // The one cgroup2 superblock is read-write (MS_RDONLY here is EBUSY), and
                    // the kernel refuses a superblock on a mount point that is already its
                    // root (EBUSY too): a tmpfs goes between.
                    empty_dir(target)
                        && mount(Some(c"cgroup2"), target, Some(c"cgroup2"), HARD, None)
                        && read_only(target)
                }
                Op::Proc(target) => mount(
                    Some(c"proc"),
                    target,
                    Some(c"proc"),
                    HARD,
                    Some(c"hidepid=2"),
                ),
                Op::Tree {
                    target,
                    dirs,
                    files,
                } => {
                    if !mount(
                        Some(c"kz-run"),
                        target,
                        Some(c"tmpfs"),
                        HARD,
                        Some(c"mode=0755"),
                    ) {
                        return Err((i, errno()));
                    }
                    for d in dirs {
                        // SAFETY: a NUL-terminated path owned by the plan.
                        if unsafe { libc::mkdir(d.as_ptr(), 0o755) } != 0 {
                            return Err((i, errno()));
                        }
                    }
                    for (path, content) in files {
                        // SAFETY: as above; the content is a live slice.
                        if let Err(e) = unsafe { write_new(path, content) } {
                            return Err((i, e));
                        }
                    }
                    read_only(target)
                }
            };
            if !done {
                return Err((i, errno()));
            }
        }
        Ok(())
    }
}

/// mount(2) with optional source, type and data.
fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> bool {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: NUL-terminated strings (or NULL where the call allows it) that outlive the call.
    unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        ) == 0
    }
}

/// Creates `path` (0644, must not exist) holding `content`. Returns errno on failure.
///
/// # Safety
/// Raw open/write/close only; allocates nothing (callable between fork and exec).
unsafe fn write_new(path: &CStr, content: &[u8]) -> Result<(), i32> {
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: raw system calls on a NUL-terminated path and a live slice.
    unsafe {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        let fd = libc::open(path.as_ptr(), flags, 0o644);
        if fd < 0 {
            return Err(errno());
        }
        let mut rest = content;
        while !rest.is_empty() {
            let n = libc::write(fd, rest.as_ptr().cast(), rest.len());
            if n <= 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                libc::close(fd);
                return Err(e);
            }
            rest = &rest[n.unsigned_abs()..];
        }
        libc::close(fd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn the_plan_masks_bpffs_cgroups_proc_and_existing_hidden_paths() {
        let dir = std::env::temp_dir().join(format!("kz-mountplan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("f"), "x").unwrap();
        let plan = MountPlan::new(MountInputs {
            hide: vec![dir.join("f"), dir.join("d"), dir.join("missing")],
            empty_file: dir.join("empty"),
            run_tree: None,
            own_cgroup: true,
        })
        .unwrap();
        let labels: Vec<&str> = plan.masked().collect();
        assert!(labels.iter().any(|l| l.starts_with("/proc")));
        assert!(labels.iter().any(|l| l.ends_with("/f")));
        assert!(labels.iter().any(|l| l.ends_with("/d")));
        assert!(!labels.iter().any(|l| l.ends_with("/missing")));
        let mounts = mounts().unwrap();
        if mounts.iter().any(|(_, t)| t == "bpf") {
            assert!(labels.iter().any(|l| l.starts_with("bpffs")));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
