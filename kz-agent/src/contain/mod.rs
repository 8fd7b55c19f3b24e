//! Containment of the agent process: the one place that turns a child kz is about to exec into
//! something weaker than kz.
//!
//! Every blind-mode child (born in its cgroup by [`crate::intercept::spawn`], or started by
//! std's `Command` where clone3 is refused or kz runs without root) goes through
//! [`Prepared::enter`] between fork and exec. In order:
//! 1. a mount namespace and, when it is in a cgroup of its own, a cgroup namespace rooted there
//!    (`unshare`), then the masks of [`mounts`] (bpffs, cgroupfs, `/proc` hidepid, kz's run
//!    directory, the audit log, `[blind] hide`);
//! 2. the bounding set emptied, securebits locked (`NOROOT`: a uid-0 exec gains nothing),
//!    supplementary groups, gid and uid of the agent's user (`setgroups`/`setresgid`/`setresuid`);
//!    a `--allow-root-agent` agent instead drops to the overflow user, creates its own user
//!    namespace and becomes uid 0 only there;
//! 3. every capability set cleared (effective, permitted, inheritable, ambient);
//! 4. the working directory entered as the agent (so its permissions apply);
//! 5. every inherited descriptor above stdio marked close-on-exec (`close_range`);
//! 6. `PR_SET_NO_NEW_PRIVS`, the Landlock scopes where the kernel has them (no abstract unix
//!    socket or signal outside the agent's own domain), and the seccomp filter of [`seccomp`].
//!
//! Everything the child does is prepared by [`Prepared::new`] in the parent: the child is a
//! copy of one thread of a multi-threaded process, so it may only make async-signal-safe calls.
//!
//! What the agent still sees, and why: the host's filesystem (minus the masks; its tools and the
//! project live there), its own processes in `/proc`, the host's network namespace (all its
//! traffic is redirected or refused by the cgroup programs; sharing it lets it reach kz's proxy
//! on loopback), and SysV IPC and abstract unix sockets of its own Landlock domain.

pub mod mounts;
pub mod seccomp;
pub mod user;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use mounts::{MountInputs, MountPlan, RunTree};
pub use user::{AgentUser, UserRequest};

/// Credential files of common tools, masked in a blind agent's mount namespace unless
/// `[blind] hide` says otherwise. `~` is the agent user's home; other relative paths are taken
/// from the project directory. Each one holds a credential that would let an agent act without
/// going through kz's proxy.
pub const DEFAULT_HIDDEN: &[&str] = &[
    "~/.aws/credentials",
    "~/.aws/sso/cache",
    "~/.config/gcloud",
    "~/.azure",
    "~/.kube/config",
    "~/.docker/config.json",
    "~/.netrc",
    "~/.git-credentials",
    "~/.config/gh/hosts.yml",
    "~/.npmrc",
    "~/.pypirc",
    "~/.cargo/credentials",
    "~/.cargo/credentials.toml",
    "~/.gem/credentials",
    "~/.terraform.d/credentials.tfrc.json",
    "~/.vault-token",
    "~/.ssh",
    "~/.gnupg",
    "~/.password-store",
    "~/.config/op",
    ".env",
    ".env.local",
    ".envrc",
];

/// Unix sockets of container runtimes and init, masked in the agent's mount namespace (each
/// hands out root on the host or control of its services). The kernel's unix-socket hooks
/// refuse them too where they are in force; the mask covers kernels without them.
pub const RUNTIME_SOCKETS: &[&str] = &[
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/run/systemd/private",
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/snapd.socket",
];

#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("a path or id for the agent contains a NUL byte")]
    Nul,
}

/// Which step of [`Prepared::enter`] failed (reported by the child before it exits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Step {
    Namespaces = 1,
    Mount = 2,
    Capabilities = 3,
    User = 4,
    UserNamespace = 5,
    WorkingDirectory = 6,
    Descriptors = 7,
    NoNewPrivs = 8,
    Landlock = 9,
    Seccomp = 10,
}

impl Step {
    fn from_u16(v: u16) -> Option<Step> {
        use Step::*;
        [
            Namespaces,
            Mount,
            Capabilities,
            User,
            UserNamespace,
            WorkingDirectory,
            Descriptors,
            NoNewPrivs,
            Landlock,
            Seccomp,
        ]
        .into_iter()
        .find(|s| *s as u16 == v)
    }
}

/// A failed step: what, which item of it (mount steps), errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub step: Step,
    pub index: u16,
    pub errno: i32,
}

impl Failure {
    /// Eight bytes for the child's error pipe.
    pub fn encode(self) -> [u8; 8] {
        let head = (u32::from(self.step as u16) << 16) | u32::from(self.index);
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&head.to_ne_bytes());
        out[4..].copy_from_slice(&self.errno.to_ne_bytes());
        out
    }

    pub fn decode(b: [u8; 8]) -> Option<Failure> {
        let head = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let errno = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        let step = Step::from_u16(u16::try_from(head >> 16).ok()?)?;
        Some(Failure {
            step,
            index: (head & 0xffff) as u16,
            errno,
        })
    }
}

/// What the caller decides; [`Prepared::new`] turns it into what the child executes.
#[derive(Debug)]
pub struct Spec {
    pub user: AgentUser,
    /// The agent's mount namespace (None: it shares kz's, e.g. kz is not root).
    pub mounts: Option<MountPlan>,
    /// The agent is in a cgroup of its own: give it a cgroup namespace rooted there.
    pub cgroup_ns: bool,
    /// The working directory, entered after the user switch.
    pub cwd: Option<PathBuf>,
}

/// `struct landlock_ruleset_attr` (ABI 6: filesystem, network, scopes).
#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
const LANDLOCK_SCOPE_SIGNAL: u64 = 2;

/// `struct __user_cap_header_struct` / `__user_cap_data_struct` (version 3: two data words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// SECBIT_NOROOT | _LOCKED, SECBIT_NO_SETUID_FIXUP_LOCKED, SECBIT_KEEP_CAPS_LOCKED,
/// SECBIT_NO_CAP_AMBIENT_RAISE | _LOCKED: executing a uid-0 or file-capability program gains
/// nothing, and none of it can be turned back.
const SECUREBITS: libc::c_ulong = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80;

/// Everything [`Prepared::enter`] needs, built in the parent.
pub struct Prepared {
    user: AgentUser,
    /// "0 <uid> 1\n" / "0 <gid> 1\n" for a root-in-namespace agent.
    uid_map: CString,
    gid_map: CString,
    cwd: Option<CString>,
    mounts: Option<MountPlan>,
    cgroup_ns: bool,
    last_cap: i32,
    filter: seccompiler::BpfProgram,
    landlock: Option<OwnedFd>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("user", &self.user)
            .field("mounts", &self.mounts.is_some())
            .field("cgroup_ns", &self.cgroup_ns)
            .field("landlock", &self.landlock.is_some())
            .finish_non_exhaustive()
    }
}

impl Prepared {
    pub fn new(spec: Spec) -> Result<Prepared, ContainError> {
        let cstr = |s: String| CString::new(s).map_err(|_| ContainError::Nul);
        let cwd = spec
            .cwd
            .map(|d| CString::new(d.as_os_str().as_bytes()).map_err(|_| ContainError::Nul))
            .transpose()?;
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        Ok(Prepared {
            uid_map: cstr(format!("0 {} 1\n", spec.user.uid))?,
            gid_map: cstr(format!("0 {} 1\n", spec.user.gid))?,
            user: spec.user,
            cwd,
            mounts: spec.mounts,
            cgroup_ns: spec.cgroup_ns,
            last_cap,
            filter: seccomp::agent_filter()?,
            landlock: landlock_scopes(),
        })
    }

    pub fn user(&self) -> &AgentUser {
        &self.user
    }

    /// Whether the kernel's Landlock scopes (abstract unix sockets, signals) are applied.
    pub fn landlock_scoped(&self) -> bool {
        self.landlock.is_some()
    }

    pub fn mounts(&self) -> Option<&MountPlan> {
        self.mounts.as_ref()
    }

    /// A readable sentence for a failure the child reported.
    pub fn describe(&self, f: Failure) -> String {
        let err = std::io::Error::from_raw_os_error(f.errno);
        match f.step {
            Step::Mount => {
                let what = self
                    .mounts
                    .as_ref()
                    .map_or("a mount", |m| m.label(usize::from(f.index)));
                format!("cannot mask {what} in the agent's mount namespace: {err}")
            }
            Step::WorkingDirectory => format!(
                "the agent's user (uid {}) cannot enter the working directory: {err}; run kz from a directory that user can read, or choose another --user",
                self.user.uid
            ),
            Step::UserNamespace => format!(
                "cannot give the root agent a user namespace of its own: {err} (user namespaces may be disabled: check /proc/sys/user/max_user_namespaces)"
            ),
            other => format!("cannot contain the agent ({other:?}): {err}"),
        }
    }

    /// Contains the calling process. Returns the failed step; the caller reports it and exits.
    ///
    /// # Safety
    /// Only in a single-threaded child between fork/clone and exec: it makes raw system calls
    /// on memory prepared by [`Prepared::new`] and allocates nothing. kz must be root for the
    /// namespace, mount and user steps (they are skipped when the agent is kz's own user and
    /// there is no mount plan).
    pub unsafe fn enter(&self) -> Result<(), Failure> {
        let fail = |step: Step, index: u16| Failure {
            step,
            index,
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        };
        // SAFETY (whole body): raw system calls on memory owned by `self`; see above.
        unsafe {
            if self.mounts.is_some() || self.cgroup_ns {
                let mut flags = 0;
                if self.mounts.is_some() {
                    flags |= libc::CLONE_NEWNS;
                }
                if self.cgroup_ns {
                    flags |= libc::CLONE_NEWCGROUP;
                }
                if libc::unshare(flags) != 0 {
                    return Err(fail(Step::Namespaces, 0));
                }
            }
            if let Some(m) = &self.mounts {
                m.apply().map_err(|(i, errno)| Failure {
                    step: Step::Mount,
                    index: u16::try_from(i).unwrap_or(u16::MAX),
                    errno,
                })?;
            }
            if !self.user.is_self() {
                self.drop_bounding_set()
                    .map_err(|()| fail(Step::Capabilities, 0))?;
                if self.user.root_in_userns {
                    self.become_namespace_root()?;
                } else {
                    if libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) != 0 {
                        return Err(fail(Step::Capabilities, 1));
                    }
                    self.switch_user().map_err(|()| fail(Step::User, 0))?;
                }
            }
            self.clear_capabilities()
                .map_err(|()| fail(Step::Capabilities, 2))?;
            if let Some(dir) = &self.cwd
                && libc::chdir(dir.as_ptr()) != 0
            {
                return Err(fail(Step::WorkingDirectory, 0));
            }
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return Err(fail(Step::Descriptors, 0));
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(fail(Step::NoNewPrivs, 0));
            }
            if let Some(ruleset) = &self.landlock
                && libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) != 0
            {
                return Err(fail(Step::Landlock, 0));
            }
            let prog = libc::sock_fprog {
                len: u16::try_from(self.filter.len()).unwrap_or(u16::MAX),
                filter: self.filter.as_ptr().cast_mut().cast(),
            };
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                std::ptr::addr_of!(prog),
            ) != 0
            {
                return Err(fail(Step::Seccomp, 0));
            }
        }
        Ok(())
    }

    /// Empties the bounding set: no later exec can gain a capability.
    unsafe fn drop_bounding_set(&self) -> Result<(), ()> {
        for cap in 0..=self.last_cap {
            // SAFETY: prctl with integer arguments.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            // EINVAL: a capability this kernel does not know.
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(());
            }
        }
        Ok(())
    }

    unsafe fn switch_user(&self) -> Result<(), ()> {
        let (uid, gid) = (self.user.uid, self.user.gid);
        // SAFETY: setgroups reads `groups.len()` ids from a live slice; the others take ids.
        unsafe {
            if set_groups(&self.user.groups) != 0 || set_gid(gid) != 0 || set_uid(uid) != 0 {
                return Err(());
            }
        }
        Ok(())
    }

    /// `--allow-root-agent`: become the overflow user, create a user namespace, map its uid 0
    /// to that user (the one mapping an unprivileged process may write for itself), become uid
    /// 0 there. The mount and cgroup namespaces stay owned by the initial user namespace, so
    /// root in the new one cannot change them.
    unsafe fn become_namespace_root(&self) -> Result<(), Failure> {
        let fail = |index: u16| Failure {
            step: Step::UserNamespace,
            index,
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        };
        // SAFETY: raw system calls with ids and NUL-terminated strings owned by `self`.
        unsafe {
            let (uid, gid) = (self.user.uid, self.user.gid);
            if set_groups(&[]) != 0 || set_gid(gid) != 0 || set_uid(uid) != 0 {
                return Err(fail(0));
            }
            // A uid change made the process non-dumpable, which makes /proc/self/* root's:
            // its own id maps could not be written.
            if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
                return Err(fail(1));
            }
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(fail(2));
            }
            let write = |path: &std::ffi::CStr, data: &[u8]| -> bool {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return false;
                }
                let n = libc::write(fd, data.as_ptr().cast(), data.len());
                libc::close(fd);
                n == data.len() as isize
            };
            if !write(c"/proc/self/setgroups", b"deny")
                || !write(c"/proc/self/gid_map", self.gid_map.as_bytes())
                || !write(c"/proc/self/uid_map", self.uid_map.as_bytes())
            {
                return Err(fail(3));
            }
            if set_gid(0) != 0 || set_uid(0) != 0 {
                return Err(fail(4));
            }
            // A new user namespace starts with a full bounding set: empty it again.
            if self.drop_bounding_set().is_err() {
                return Err(fail(5));
            }
            if libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) != 0 {
                return Err(fail(6));
            }
        }
        Ok(())
    }

    unsafe fn clear_capabilities(&self) -> Result<(), ()> {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        // SAFETY: capset reads a header and two data words from live memory; prctl takes
        // integers.
        unsafe {
            if libc::syscall(libc::SYS_capset, std::ptr::addr_of!(header), data.as_ptr()) != 0 {
                return Err(());
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
            {
                return Err(());
            }
        }
        Ok(())
    }
}

// The credential calls are raw system calls, never glibc's wrappers: in a multi-threaded
// process glibc's setresuid/setresgid/setgroups change every thread's credentials by signalling
// each thread and waiting for it, and a clone3 child inherits the thread list of a process whose
// other threads it does not have: the wrapper waits forever.

/// setgroups(2) on this thread (the child has no other).
unsafe fn set_groups(groups: &[libc::gid_t]) -> libc::c_long {
    // SAFETY: reads `groups.len()` ids from a live slice.
    unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }
}

/// setresgid(2) with all three ids.
unsafe fn set_gid(gid: libc::gid_t) -> libc::c_long {
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }
}

/// setresuid(2) with all three ids.
unsafe fn set_uid(uid: libc::uid_t) -> libc::c_long {
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }
}

/// What `kz doctor` says of containment on this machine: (name, in force, detail).
pub fn doctor() -> Vec<(&'static str, bool, String)> {
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let landlock_abi = landlock_abi();
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp:")));
    vec![
        (
            "agent seccomp",
            seccomp && seccomp::agent_filter().is_ok(),
            "bpf, ptrace, process_vm_*, mount, setns, io_uring, kexec/modules, packet/ICMP sockets refused with EPERM".into(),
        ),
        (
            "root agent",
            userns > 0,
            if userns > 0 {
                "--allow-root-agent runs it as root of its own user namespace (nobody outside)".into()
            } else {
                "user namespaces are disabled (/proc/sys/user/max_user_namespaces = 0): --allow-root-agent cannot work; run the agent as a user".into()
            },
        ),
        (
            "landlock scopes",
            landlock_abi >= 6,
            if landlock_abi >= 6 {
                format!("ABI {landlock_abi}: no abstract unix socket or signal outside the agent's domain")
            } else {
                format!("ABI {landlock_abi} (< 6, Linux 6.12): abstract unix sockets rely on the unix-socket hooks alone")
            },
        ),
    ]
}

/// Makes std's `Command` contain its child with `prepared` between fork and exec (where the
/// child cannot be born in a cgroup by clone3, or there is no cgroup).
pub fn on_exec(cmd: &mut std::process::Command, prepared: std::sync::Arc<Prepared>) {
    use std::os::unix::process::CommandExt;
    let hook = move || -> std::io::Result<()> {
        // SAFETY: std runs the hook in the forked child before exec; `enter` only makes raw
        // system calls on memory prepared in the parent.
        unsafe { prepared.enter() }.map_err(|f| std::io::Error::from_raw_os_error(f.errno))
    };
    // SAFETY: the hook is async-signal-safe (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The kernel's Landlock ABI version (negative where Landlock is missing or disabled).
fn landlock_abi() -> libc::c_long {
    // SAFETY: landlock_create_ruleset with a NULL attribute and the VERSION flag only returns
    // the ABI version.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<LandlockRulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    }
}

/// A Landlock ruleset that handles no file or network access but scopes abstract unix sockets
/// and signals to the agent's own domain (ABI 6, Linux 6.12). None where the kernel lacks it.
fn landlock_scopes() -> Option<OwnedFd> {
    let abi = landlock_abi();
    if abi < 6 {
        tracing::debug!(abi, "Landlock scopes need ABI 6 (Linux 6.12); not applied");
        return None;
    }
    let attr = LandlockRulesetAttr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL,
    };
    // SAFETY: the attribute is a live struct of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<LandlockRulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot create a Landlock ruleset");
        return None;
    }
    // SAFETY: a new descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).ok()?) })
}

/// Files kz's own resolvers read real values from (`env_file` and `file` resolvers' `path`):
/// masked for a blind agent as surely as the credential files of [`DEFAULT_HIDDEN`].
pub fn resolver_files(config: &crate::config::Config) -> Vec<PathBuf> {
    config
        .resolvers
        .values()
        .filter(|r| {
            matches!(
                r.kind.as_deref().and_then(crate::resolve::canonical_kind),
                Some("env_file" | "file")
            )
        })
        .filter_map(|r| r.settings.get("path").and_then(|v| v.as_str()))
        .map(|p| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_owned()
            } else {
                config.dir.join(p)
            }
        })
        .collect()
}

/// `[blind] hide` entries (or [`DEFAULT_HIDDEN`]) as absolute paths: `~/…` under the agent's
/// home, relative ones under the project directory; plus the runtime sockets.
pub fn hidden_paths(
    entries: Option<&[String]>,
    home: Option<&Path>,
    project: &Path,
) -> Vec<PathBuf> {
    let entries: Vec<&str> = match entries {
        Some(e) => e.iter().map(String::as_str).collect(),
        None => DEFAULT_HIDDEN.to_vec(),
    };
    let mut out: Vec<PathBuf> = entries
        .into_iter()
        .filter_map(|e| {
            if let Some(rest) = e.strip_prefix("~/") {
                home.map(|h| h.join(rest))
            } else if e == "~" {
                home.map(Path::to_owned)
            } else if Path::new(e).is_absolute() {
                Some(PathBuf::from(e))
            } else {
                Some(project.join(e))
            }
        })
        .collect();
    out.extend(RUNTIME_SOCKETS.iter().map(PathBuf::from));
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_round_trip_through_the_pipe_bytes() {
        let f = Failure {
            step: Step::Mount,
            index: 7,
            errno: libc::EACCES,
        };
        assert_eq!(Failure::decode(f.encode()), Some(f));
        assert_eq!(Failure::decode([0; 8]), None);
    }

    #[test]
    fn hidden_paths_expand_home_and_project() {
        let got = hidden_paths(
            Some(&["~/.aws/credentials".into(), ".env".into(), "/etc/x".into()]),
            Some(Path::new("/home/a")),
            Path::new("/p"),
        );
        assert!(got.contains(&PathBuf::from("/home/a/.aws/credentials")));
        assert!(got.contains(&PathBuf::from("/p/.env")));
        assert!(got.contains(&PathBuf::from("/etc/x")));
        assert!(got.contains(&PathBuf::from("/run/docker.sock")));
        // Without a home, `~` entries are dropped rather than guessed.
        let none = hidden_paths(Some(&["~/.netrc".into()]), None, Path::new("/p"));
        assert!(!none.iter().any(|p| p.ends_with(".netrc")));
        let defaults = hidden_paths(None, Some(Path::new("/h")), Path::new("/p"));
        assert!(defaults.contains(&PathBuf::from("/h/.ssh")));
    }
}
