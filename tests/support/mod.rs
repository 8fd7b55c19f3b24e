//! Shared test support for the end-to-end tests in this folder (linkerd2-proxy style: one place).
//!
//! Each test binary includes it with `mod support;`. Pieces:
//! - [`require_root`]: privileged tests fail loudly when they cannot run (never a silent pass).
//! - [`unique_name`]: parallel-safe names for cgroups, netns, veths and files.
//! - [`netns`]: network namespaces with veth links, the home of every upstream test host.
//! - [`servers`]: real backend servers (OpenBao dev server, moto) on loopback ports.
//! - [`tls`]: test CAs and server certificates (rcgen); [`upstream`]: an HTTPS echo upstream.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod blind_upstream;
pub mod dns;
pub mod intercept;
pub mod mcp_dns;
pub mod mcp_upstream;
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
