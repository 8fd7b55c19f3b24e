//! Starting a child directly inside a cgroup: `clone3(CLONE_INTO_CGROUP)` (Linux 5.7+).
//!
//! Moving a process into a cgroup by writing `cgroup.procs` (what [`super::Cgroup::place_child`]
//! does between fork and exec) takes the cgroup core's thread-group lock for writing, which waits
//! for an RCU grace period: 7-16 ms per run where measured, the largest cost left in
//! `kz run --blind` once the programs are shared. A child created inside the cgroup skips the
//! migration and costs well under a millisecond. std's `Command` cannot do that, so this module
//! does the one fork+exec blind mode needs by hand, in the smallest amount of `unsafe` that
//! can: everything the child runs is prepared before the clone, and the child makes only
//! async-signal-safe calls (it is a copy of one thread of a multi-threaded process).
//!
//! The caller falls back to `place_child` when this returns [`std::io::ErrorKind::Unsupported`]
//! (no clone3, no CLONE_INTO_CGROUP, or a seccomp filter that refuses clone3).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// `struct clone_args` of linux/sched.h up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Where a program is looked up when the environment has no PATH (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// The standard descriptors of a child that does not inherit kz's (the node daemon's runs:
/// the client's own stdin, stdout and stderr, received over SCM_RIGHTS). They become the
/// child's 0, 1 and 2 before it is contained; the originals are closed at exec.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A child started by [`spawn_into`]. Wait for it with [`CgroupChild::wait`]; one that is
/// dropped unwaited stays a zombie until kz exits.
pub struct CgroupChild {
    pid: nix::unistd::Pid,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

impl CgroupChild {
    pub fn id(&self) -> u32 {
        u32::try_from(self.pid.as_raw()).unwrap_or(0)
    }

    /// Waits (asynchronously, on the pidfd) for the child to exit and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        if let Some(pidfd) = self.pidfd.take() {
            // A pidfd becomes readable when the process exits.
            // SAFETY: the AsyncFd owns the OwnedFd, whose raw fd stays the same and open for as
            // long as the registration exists.
            let fd = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    pidfd,
                    tokio::io::Interest::READABLE,
                )
            }?;
            let _ready = fd.readable().await?;
        }
        let status = reap(self.pid)?;
        self.status = Some(status);
        Ok(status)
    }
}

/// waitpid() the child (blocking), as an ExitStatus.
fn reap(pid: nix::unistd::Pid) -> io::Result<ExitStatus> {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw((code & 0xff) << 8)),
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                return Ok(ExitStatus::from_raw(
                    sig as i32 | if core { 0x80 } else { 0 },
                ));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The final environment of `cmd`: kz's own with the command's changes applied (std's rules;
/// `env_clear` cannot be observed on a `Command` and is not supported).
fn child_env(cmd: &std::process::Command) -> Vec<(OsString, OsString)> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_owned(), v.to_owned()),
            None => env.remove(k),
        };
    }
    env.into_iter().collect()
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a program, argument or variable contains a NUL byte",
        )
    })
}

/// Paths to try for `program`, like execvp: as given when it contains a '/', else each PATH
/// entry (an empty entry is the current directory).
fn candidates(program: &OsStr, path: Option<&OsStr>) -> io::Result<Vec<CString>> {
    if program.as_bytes().contains(&b'/') {
        return Ok(vec![cstring(program)?]);
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut out = Vec::new();
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(program.as_bytes());
        out.push(cstring(&OsString::from_vec(full))?);
    }
    Ok(out)
}

/// Starts `cmd` (its program, arguments, environment changes and working directory; stdio is
/// inherited unless `stdio` is given) as a child that is in `cgroup_dir` from its first instruction. Errors are those
/// of `Command::spawn` (e.g. `NotFound` when there is no such program), or `Unsupported` when
/// this kernel (or a seccomp filter) does not allow clone3 into a cgroup.
///
/// `contain` (the agent's user, namespaces, masks, seccomp: [`crate::contain`]) is applied in
/// the child before exec; a step that fails there comes back as an error naming it.
pub fn spawn_into(
    cgroup_dir: &Path,
    cmd: &std::process::Command,
    contain: Option<&crate::contain::Prepared>,
    stdio: Option<&ChildStdio>,
) -> io::Result<CgroupChild> {
    // Everything the child needs, built before the clone: it must not allocate.
    let env = child_env(cmd);
    let path = env
        .iter()
        .find(|(k, _)| k.as_bytes() == b"PATH")
        .map(|(_, v)| v.as_os_str());
    let candidates = candidates(cmd.get_program(), path)?;
    let mut argv_c = vec![cstring(cmd.get_program())?];
    for a in cmd.get_args() {
        argv_c.push(cstring(a)?);
    }
    let mut envp_c = Vec::with_capacity(env.len());
    for (k, v) in &env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp_c.push(cstring(&OsString::from_vec(kv))?);
    }
    let argv: Vec<*const libc::c_char> = argv_c
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = envp_c
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let cwd = cmd
        .get_current_dir()
        .map(|d| cstring(d.as_os_str()))
        .transpose()?;
    let stdio_fds = stdio.map(|s| {
        [
            s.stdin.as_raw_fd(),
            s.stdout.as_raw_fd(),
            s.stderr.as_raw_fd(),
        ]
    });
    let cgroup = std::fs::File::open(cgroup_dir)?;
    // Exec failures come back through this pipe; a successful exec closes it (CLOEXEC).
    let (err_rx, err_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;

    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: u64::try_from(cgroup.as_raw_fd()).unwrap_or(u64::MAX),
        ..CloneArgs::default()
    };
    // SAFETY: clone3 with fork semantics (no CLONE_VM, no stack): the child gets a copy of this
    // thread's memory. `args` is a valid clone_args of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        // SAFETY: in the child. Only async-signal-safe calls on data prepared above; it ends in
        // execve or _exit.
        unsafe {
            exec_child(
                &candidates,
                &argv,
                &envp,
                cwd.as_ref(),
                contain,
                stdio_fds,
                err_tx.as_raw_fd(),
            )
        }
    }
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP) => io::Error::new(
                io::ErrorKind::Unsupported,
                format!("clone3 into a cgroup: {e}"),
            ),
            _ => e,
        });
    }
    drop(err_tx);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(ret).unwrap_or(i32::MAX));
    // SAFETY: with CLONE_PIDFD the kernel stored a new file descriptor that nothing else owns.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    let mut buf = [0u8; 8];
    let n = loop {
        match nix::unistd::read(&err_rx, &mut buf) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    match n {
        Ok(8) => {
            // The child could not contain itself or exec, and has exited: reap it, say why.
            let _ = reap(pid);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            match (crate::contain::Failure::decode(buf), contain) {
                (Some(f), Some(c)) => Err(io::Error::new(
                    io::Error::from_raw_os_error(f.errno).kind(),
                    c.describe(f),
                )),
                _ => Err(io::Error::from_raw_os_error(errno)),
            }
        }
        _ => Ok(CgroupChild {
            pid,
            pidfd,
            status: None,
        }),
    }
}

/// The child's side: default signal state (as std's Command leaves it), working directory,
/// containment, then execve of each candidate path in turn like execvp. Reports the failure
/// (8 bytes: a [`crate::contain::Failure`], or step 0 and the exec errno) and exits 127.
///
/// # Safety
/// Only to be called in the child of clone3 with the pointers of NUL-terminated arrays of valid
/// C strings.
unsafe fn exec_child(
    candidates: &[CString],
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    cwd: Option<&CString>,
    contain: Option<&crate::contain::Prepared>,
    stdio: Option<[libc::c_int; 3]>,
    err_fd: libc::c_int,
) -> ! {
    // SAFETY (whole body): raw syscalls and libc wrappers that are async-signal-safe, on memory
    // the parent prepared; nothing allocates or takes a lock.
    unsafe {
        let report = |bytes: [u8; 8]| -> ! {
            libc::write(err_fd, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        let fail = |errno: i32| -> ! {
            let mut bytes = [0u8; 8];
            bytes[4..].copy_from_slice(&errno.to_ne_bytes());
            report(bytes)
        };
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Rust ignores SIGPIPE in kz; the agent gets the default, as std's Command gives it.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if let Some(fds) = stdio {
            for (target, fd) in fds.into_iter().enumerate() {
                let target = target as libc::c_int;
                // dup2 onto itself keeps close-on-exec: clear it instead.
                let ok = if fd == target {
                    libc::fcntl(fd, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(fd, target) == target
                };
                if !ok {
                    fail(*libc::__errno_location());
                }
            }
        }
        if let Some(dir) = cwd
            && libc::chdir(dir.as_ptr()) != 0
        {
            fail(*libc::__errno_location());
        }
        if let Some(c) = contain
            && let Err(f) = c.enter()
        {
            report(f.encode());
        }
        let mut err = libc::ENOENT;
        let mut denied = false;
        for path in candidates {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            err = *libc::__errno_location();
            match err {
                // Keep looking, like execvp; remember that something was there but not
                // executable.
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => fail(err),
            }
        }
        fail(if denied { libc::EACCES } else { err })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_looked_up_like_execvp() {
        let c = candidates(OsStr::new("true"), Some(OsStr::new("/a::/b"))).expect("ok");
        let c: Vec<&str> = c.iter().map(|c| c.to_str().expect("utf8")).collect();
        assert_eq!(c, ["/a/true", "./true", "/b/true"]);
        let c = candidates(OsStr::new("./x/y"), Some(OsStr::new("/a"))).expect("ok");
        assert_eq!(c[0].to_str().expect("utf8"), "./x/y");
        assert_eq!(candidates(OsStr::new("sh"), None).expect("ok").len(), 2);
        assert!(candidates(OsStr::new("a\0b"), None).is_err());
    }

    #[test]
    fn the_child_environment_applies_the_commands_changes() {
        let mut cmd = std::process::Command::new("x");
        cmd.env("KZ_SPAWN_TEST_SET", "1").env_remove("PATH");
        let env = child_env(&cmd);
        assert!(
            env.iter()
                .any(|(k, v)| k == "KZ_SPAWN_TEST_SET" && v == "1")
        );
        assert!(!env.iter().any(|(k, _)| k == "PATH"));
    }
}
