//! `kz doctor`'s checks: can interception work on this machine? One row per check with what to
//! do about failures, then one row per protection saying whether this kernel enforces it (the
//! unix-socket hooks need Linux >= 6.7; where they are missing the row says what remains).
//! The command (`cmd::doctor`) prints them and picks the exit code.

use super::shared::{UnixGuard, unix_unavailable};
use super::{Interceptor, Listen, Policy, UnixSockets, cgroups, pins};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Whether a failure stops interception (toolchain checks only matter for building kz).
    pub required: bool,
    pub detail: String,
}

fn check(name: &'static str, required: bool, r: Result<String, String>) -> Check {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Check {
        name,
        ok,
        required,
        detail,
    }
}

/// Parses "6.18.44-foo" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel() -> Result<String, String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("cannot read /proc/sys/kernel/osrelease: {e}"))?;
    let release = release.trim();
    match kernel_version(release) {
        Some(v) if v >= (5, 14) => Ok(format!(
            "{release} (>= 5.14: bpf_link, ring buffer, cgroup.kill)"
        )),
        Some(v) if v >= (5, 8) => Ok(format!(
            "{release}: works, but < 5.14 lacks cgroup.kill (cleanup falls back to kill(2))"
        )),
        _ => Err(format!(
            "{release}: kz needs Linux >= 5.8 (bpf_link pinning, BPF ring buffer); upgrade the kernel"
        )),
    }
}

fn cgroup2() -> Result<String, String> {
    cgroups::cgroup2_root()
        .map(|p| format!("cgroup2 at {}", p.display()))
        .map_err(|e| e.to_string())
}

fn bpffs() -> Result<String, String> {
    if pins::bpffs_mounted() {
        Ok(format!("mounted at {}", pins::BPFFS))
    } else {
        Err(format!(
            "not mounted at {}: `mount -t bpf bpf {}` (kz mounts it itself when run as root)",
            pins::BPFFS,
            pins::BPFFS
        ))
    }
}

fn capabilities() -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or("no CapEff in /proc/self/status")?;
    let needed = [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_BPF", 39),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, bit)| eff & (1u64 << bit) == 0)
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        Ok("CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN".into())
    } else {
        Err(format!("missing {}: run kz as root", missing.join(", ")))
    }
}

/// What the program check learnt about the protections beyond redirection.
struct Protections {
    unix: UnixGuard,
}

fn programs() -> Result<(String, Protections), String> {
    // The real thing: open (or load) the shared program set, create a cgroup with every
    // protection on, attach and pin, then clean up.
    let mut icpt = Interceptor::load().map_err(|e| e.to_string())?;
    let name = format!("doctor-{}", std::process::id());
    let policy = Policy {
        listen: Listen::Loopback,
        unix: UnixSockets::Only(Vec::new()),
        ..Policy::default()
    };
    let cg = icpt
        .create_cgroup(&name, &policy)
        .map_err(|e| e.to_string())?;
    icpt.remove_cgroup(cg.id).map_err(|e| e.to_string())?;
    let unix = icpt.unix_guard().clone();
    Ok((
        format!(
            "cgroup connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6, bind4/6, sock_ops, sock_create{}: load, attach, pin (program set {})",
            if unix == UnixGuard::Enforced {
                ", connect_unix, sendmsg_unix"
            } else {
                ""
            },
            icpt.shared_dir().display()
        ),
        Protections { unix },
    ))
}

/// One row per protection the kernel enforces for a guarded cgroup, from what the program
/// check found (or, when it could not run, from what this kernel offers).
fn protection_checks(found: Option<&Protections>) -> Vec<Check> {
    let loaded = found.is_some();
    let when_loaded = |ok: &str| -> Result<String, String> {
        if loaded {
            Ok(ok.to_owned())
        } else {
            Err("not in force: the eBPF programs could not be loaded (see above)".to_owned())
        }
    };
    let unix = match found.map(|p| &p.unix) {
        Some(UnixGuard::Enforced) => Ok(
            "cgroup/connect_unix + sendmsg_unix: connects and addressed sends to unix sockets outside [blind] unix_sockets are refused (matched on the path the agent passes; relative and ./.. paths refused)".to_owned(),
        ),
        Some(UnixGuard::Unavailable(why)) => Err(format!(
            "NOT enforced by the kernel: {why}; what remains is the agent's mount namespace, where kz hides the container-runtime and init sockets"
        )),
        None => Err(match unix_unavailable() {
            Some(why) => format!("NOT enforced: {why}; what remains is the agent's mount namespace"),
            None => "not in force: the eBPF programs could not be loaded (see above)".to_owned(),
        }),
    };
    vec![
        check(
            "redirect+allow",
            true,
            when_loaded(
                "every TCP connect to kz's proxy, DNS to kz's resolver, other destinations refused unless allowed; raw sockets refused",
            ),
        ),
        check(
            "mark ownership",
            true,
            when_loaded(
                "only sockets kz registered (SO_MARK plus socket storage) bypass interception; the mark alone opens nothing",
            ),
        ),
        check(
            "inbound (bind)",
            true,
            when_loaded(
                "cgroup/bind4/6 + sock_ops listen: servers reachable from this machine only ([blind] listen = \"loopback\"; wildcard binds moved to loopback)",
            ),
        ),
        // Not required: interception works without it, and the mount namespace still hides
        // the most dangerous sockets; the row says so loudly.
        check("unix sockets", false, unix),
    ]
}
fn toolchain() -> Result<String, String> {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let tools = std::env::var_os("KZ_TOOLS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(&home).join(".cache/kz/tools"));
    let linker = tools.join("bin/bpf-linker");
    let nightly = std::process::Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut missing = Vec::new();
    match &nightly {
        None => missing.push("nightly toolchain"),
        Some(s) if !s.join("lib/rustlib/src/rust/library/core").is_dir() => {
            missing.push("nightly rust-src")
        }
        Some(_) => {}
    }
    if !linker.is_file() {
        missing.push("bpf-linker");
    }
    if missing.is_empty() {
        Ok(format!("nightly + rust-src + {}", linker.display()))
    } else {
        Err(format!(
            "missing {} (only needed to build kz): run `cargo xtask setup`",
            missing.join(", ")
        ))
    }
}

/// Runs every check, in order; the program check only when the ones before it pass.
pub fn checks() -> Vec<Check> {
    let mut out = vec![
        check("kernel", true, kernel()),
        check("cgroup v2", true, cgroup2()),
        check("bpffs", true, bpffs()),
        check("capabilities", true, capabilities()),
    ];
    let prog = if out.iter().all(|c| c.ok) {
        programs()
    } else {
        Err("skipped: fix the checks above first".into())
    };
    let (prog, found) = match prog {
        Ok((detail, found)) => (Ok(detail), Some(found)),
        Err(e) => (Err(e), None),
    };
    out.push(check("eBPF programs", true, prog));
    out.extend(protection_checks(found.as_ref()));
    for (name, ok, detail) in crate::contain::doctor() {
        out.push(check(
            name,
            false,
            if ok { Ok(detail) } else { Err(detail) },
        ));
    }
    out.push(check("build toolchain", false, toolchain()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
    }
}
