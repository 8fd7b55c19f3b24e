//! Shared test support for the end-to-end tests in this folder (linkerd2-proxy style: one place).
//!
//! Each test binary includes it with `mod support;`. Pieces:
//! - [`require_root`]: privileged tests fail loudly when they cannot run (never a silent pass).
//! - [`unique_name`]: parallel-safe names for cgroups, netns, veths and files.
//! - [`netns`]: network namespaces with veth links, the home of every upstream test host.
//! - [`servers`]: real backend servers (OpenBao dev server, moto) on loopback ports.
//! - [`tls`]: test CAs and server certificates (rcgen); [`upstream`]: an HTTPS echo upstream.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod blind_env;
pub mod dns;
pub mod intercept;
pub mod netns;
pub mod pdp;
pub mod servers;
pub mod tls;
pub mod upstream;

use std::sync::atomic::{AtomicU32, Ordering};

/// Fails the test with the reason when it cannot run as root with cgroup v2 and bpffs.
/// Outside CI a developer may set `KZ_TEST_ALLOW_SKIP=1` to turn that into a loud skip; the
/// skip is still printed so nobody mistakes it for a pass.
pub fn require_root() -> bool {
    let uid = unsafe_free_getuid();
    if uid == 0 {
        return true;
    }
    let reason = format!(
        "this test needs root (uid is {uid}): run the suite as root, e.g. `sudo cargo xtask test`"
    );
    if std::env::var("CI").as_deref() != Ok("true")
        && std::env::var("KZ_TEST_ALLOW_SKIP").as_deref() == Ok("1")
    {
        eprintln!("SKIPPED (KZ_TEST_ALLOW_SKIP=1): {reason}");
        return false;
    }
    panic!("{reason}");
}

fn unsafe_free_getuid() -> u32 {
    // /proc/self/status carries the real uid without an unsafe libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// A short name unique to this process and call: `<prefix><pid36><n>`, at most 15 bytes
/// (the kernel's interface-name limit) when `prefix` has at most 5 bytes.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}{}", radix36(std::process::id()), radix36(n));
    assert!(
        name.len() <= 15,
        "unique_name({prefix}) is too long for an interface name"
    );
    name
}

fn radix36(mut v: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

/// The unprivileged user sandboxed agents run as in the tests (`kz run --blind` started the way
/// `sudo` starts it: SUDO_UID/SUDO_GID name this user). Created once per machine, race-free
/// across parallel test processes (useradd under an flock).
#[derive(Debug, Clone, Copy)]
pub struct AgentUser {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
}

pub const AGENT_USER: &str = "kz-test-agent";

pub fn agent_user() -> AgentUser {
    static USER: std::sync::OnceLock<AgentUser> = std::sync::OnceLock::new();
    *USER.get_or_init(|| {
        use std::os::unix::process::CommandExt;
        let lookup = || nix::unistd::User::from_name(AGENT_USER).ok().flatten();
        if lookup().is_none() {
            // flock(1) serialises the creation between test processes.
            let status = std::process::Command::new("flock")
                .args(["/tmp/kz-test-agent-user.lock", "sh", "-c"])
                .arg(format!(
                    "id -u {AGENT_USER} >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /bin/sh {AGENT_USER}"
                ))
                .process_group(0)
                .status()
                .expect("run useradd");
            assert!(status.success(), "cannot create the test user {AGENT_USER}");
        }
        let user = lookup().expect("the test user exists");
        AgentUser {
            name: AGENT_USER,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    })
}

impl AgentUser {
    /// Environment that makes `kz` believe it was started by `sudo` from this user.
    pub fn sudo_env(&self, cmd: &mut std::process::Command) {
        cmd.env("SUDO_UID", self.uid.to_string())
            .env("SUDO_GID", self.gid.to_string())
            .env("SUDO_USER", self.name);
    }
}

/// A directory the agent user can enter and read (the tests' project directories): 0755, with
/// every ancestor searchable.
pub fn agent_readable_dir(prefix: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(unique_name(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}
