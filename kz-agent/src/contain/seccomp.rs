//! The agent's seccomp filter: system calls a contained agent never needs, refused with EPERM.
//!
//! Built with `seccompiler` (rust-vmm's maintained compiler) in the parent; the child only
//! installs the finished program. What is refused, and why:
//! - `bpf`, `perf_event_open`: loading or detaching programs, reading kernel memory;
//! - `ptrace`, `process_vm_readv/writev`, `pidfd_getfd`, `kcmp`: reading or steering other
//!   processes (kz above all);
//! - `kexec_*`, `init_module`/`finit_module`/`delete_module`: the kernel itself;
//! - `mount`, `umount2`, `pivot_root`, the new mount API (`open_tree`, `move_mount`, `fsopen`,
//!   `fsconfig`, `fsmount`, `fspick`, `mount_setattr`): undoing the masks of the mount namespace;
//! - `setns`: joining another namespace (the host's mount or cgroup namespace);
//! - `io_uring_*`: io_uring creates sockets and opens files without the system calls this filter
//!   and the socket-family rules see;
//! - `socket` with a family other than AF_INET, AF_INET6, AF_UNIX and AF_NETLINK, AF_NETLINK
//!   other than NETLINK_ROUTE, and ICMP datagram ("ping") sockets, which no cgroup hook sees.
//!
//! On x86_64 the x32 ABI shares the architecture value with x86_64 but numbers its system calls
//! with bit 30 set, which a number-keyed filter would not match: three instructions in front of
//! seccompiler's program refuse every x32 call.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: this architecture ({0}) has no filter; kz supports x86_64 and aarch64")]
    Arch(&'static str),
    #[error("seccomp: cannot build the agent's filter: {0} (a bug in kz; please report it)")]
    Build(String),
}

/// System calls refused outright.
const REFUSED: &[i64] = &[
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_setns,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

const NETLINK_ROUTE: u64 = 0;
const IPPROTO_ICMP: u64 = 1;
const IPPROTO_ICMPV6: u64 = 58;
/// `type` of socket(2) carries SOCK_NONBLOCK/SOCK_CLOEXEC above the type bits.
const SOCK_TYPE_MASK: u64 = 0xf;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(|e| SeccompError::Build(e.to_string()))
}

/// socket(2) rules: any one matching means EPERM.
fn socket_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let family = |op, v: i32| cond(0, op, u64::try_from(v).unwrap_or(u64::MAX));
    Ok(vec![
        // A family outside the four.
        rule(vec![
            family(Ne, libc::AF_INET)?,
            family(Ne, libc::AF_INET6)?,
            family(Ne, libc::AF_UNIX)?,
            family(Ne, libc::AF_NETLINK)?,
        ])?,
        // Netlink other than routing (audit, netfilter, sock_diag, uevents, …).
        rule(vec![
            family(Eq, libc::AF_NETLINK)?,
            cond(2, Ne, NETLINK_ROUTE)?,
        ])?,
        // ICMP ping sockets: datagram sockets of protocol ICMP / ICMPv6.
        rule(vec![
            family(Eq, libc::AF_INET)?,
            cond(1, MaskedEq(SOCK_TYPE_MASK), libc::SOCK_DGRAM as u64)?,
            cond(2, Eq, IPPROTO_ICMP)?,
        ])?,
        rule(vec![
            family(Eq, libc::AF_INET6)?,
            cond(1, MaskedEq(SOCK_TYPE_MASK), libc::SOCK_DGRAM as u64)?,
            cond(2, Eq, IPPROTO_ICMPV6)?,
        ])?,
    ])
}

/// The agent's filter as a classic BPF program, ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn agent_filter() -> Result<BpfProgram, SeccompError> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(libc::SYS_socket, socket_rules()?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))?;
    if cfg!(target_arch = "x86_64") {
        // ld [nr]; jset X32_BIT ? next : skip; ret ERRNO(EPERM)
        let mut prefixed = vec![
            sock_filter {
                code: 0x20, // BPF_LD | BPF_W | BPF_ABS
                jt: 0,
                jf: 0,
                k: 0, // offsetof(struct seccomp_data, nr)
            },
            sock_filter {
                code: 0x45, // BPF_JMP | BPF_JSET | BPF_K
                jt: 0,
                jf: 1,
                k: X32_SYSCALL_BIT,
            },
            sock_filter {
                code: 0x06, // BPF_RET | BPF_K
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            },
        ];
        prefixed.extend(program);
        return Ok(prefixed);
    }
    Ok(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_and_fits_the_kernels_limit() {
        let p = agent_filter().expect("filter");
        // BPF_MAXINSNS for classic seccomp programs.
        assert!(!p.is_empty() && p.len() < 4096, "{} instructions", p.len());
    }
}
