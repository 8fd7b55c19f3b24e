//! Kernel interception: kz's eBPF programs, the cgroups they guard, and their maps.
//!
//! The programs and their maps are loaded once per kz build and stay pinned in bpffs, shared by
//! every kz instance ([`shared`]); an [`Interceptor`] (one kz instance) opens them, which costs a
//! few syscalls instead of the verifier's tens of milliseconds, and serves many cgroups. Each
//! cgroup it creates gets its own [`Policy`] (keyed by cgroup id in the shared maps):
//!
//! - every TCP `connect()` (or only listed ports) is redirected to `127.0.0.1:<proxy_port>`
//!   (`[::1]` for native IPv6 when [`Ipv6Mode::Intercept`]); the proxy learns the original
//!   destination from [`OrigDstTable::lookup`] with the accepted socket's `peer_addr()`;
//! - UDP to port 53 goes to `127.0.0.1:<dns_port>` and replies appear to come from the resolver
//!   the client asked; other UDP is refused unless [`Policy::allow_udp`];
//! - destinations in [`Policy::deny`] fail with EPERM at once; with [`Policy::require_allow`] so
//!   does every destination not in [`Policy::allow`] nor in the allow map that kz's DNS resolver
//!   fills through [`AllowMap::open`] (a quota per cgroup, expired entries purged: [`allowed`]);
//! - every refusal is reported on [`BlockEvents`] (pid, tgid, comm, cgroup id, destination or
//!   unix path, operation, reason), through a ring buffer of the instance's own: an instance
//!   sees the events of its cgroups (and of cgroups nested below them) and no other instance's.
//!
//! - inbound: servers of the cgroup are reachable from this machine only ([`Policy::listen`]):
//!   TCP binds to the wildcard address are moved to loopback, other non-loopback TCP binds and
//!   fixed-port UDP binds outside loopback fail with EPERM, and a listener the kernel bound
//!   itself (listen() without bind()) is confined to the loopback device;
//! - unix sockets: connects and addressed sends are refused unless the address matches
//!   [`Policy::unix`] (exact paths, directories, abstract names; relative and `.`/`..` paths
//!   never match). Needs Linux >= 6.7 ([`Interceptor::unix_guard`] says whether it is enforced).
//!
//! Sockets kz registered with [`mark_as_kz`] ([`kz_common::KZ_SO_MARK`] plus an entry in the
//! `KZ_OWN_SOCKETS` socket storage; the mark alone opens nothing) are never touched; kz itself
//! runs outside the cgroups it guards, so its upstream connections are never redirected.
//! `getpeername()` on a redirected socket reports the original destination. Raw sockets are
//! refused at creation in guarded cgroups; a process in a child cgroup of a guarded one (which
//! has no policy of its own) is refused everything, unless the guarded one is an existing cgroup
//! ([`Interceptor::guard_existing_cgroup`], a Kubernetes pod's): then its policy, under its id, applies
//! to the whole subtree (the pod's containers).
//!
//! # Contract for callers
//! - The proxy listens on `127.0.0.1:<proxy_port>` in the agent's network namespace (and on
//!   `[::1]` too with [`Ipv6Mode::Intercept`]; a dual-stack `[::]` socket does both) and calls
//!   [`OrigDstTable::take`] with each accepted socket's `peer_addr()`. No record = not a
//!   redirected connection: refuse it.
//! - The DNS resolver listens on UDP `127.0.0.1:<dns_port>` (and `[::1]` for IPv6 resolvers).
//!   DNS over TCP is ordinary TCP: it goes to the proxy (port 53).
//! - Not covered: AF_PACKET sockets (need CAP_NET_RAW: do not give the agent that capability).
//!
//! # Fail closed
//! The program set is pinned under `/sys/fs/bpf/kz/shared-<build>/`; each instance's links under
//! `/sys/fs/bpf/kz/<instance>/links/` (instance = loader pid, start time and a per-process
//! sequence number; `kz` is the default [`Scope`]); cgroups live under `<cgroup2>/kz/<instance>/`.
//! If kz is killed, its links stay pinned, the programs stay attached, its policy entries stay in
//! the shared maps, and the cgroup stays cut off (its connections go to a proxy port nobody
//! serves). Dropping the [`Interceptor`] (or [`Interceptor::remove_cgroup`]) kills what is left in
//! its cgroups, detaches and unpins its links, removes its map entries and cgroups; the shared set
//! stays. [`Interceptor::load`] first cleans up what dead instances left behind
//! ([`cleanup_stale`]: their processes are killed before anything is detached, then their links,
//! map entries and cgroups go). [`shared::unload`] (`kz intercept unload`) removes the shared set
//! when no instance is running.
//!
//! # Use
//! ```no_run
//! # async fn f() -> Result<(), kz_agent::intercept::InterceptError> {
//! use kz_agent::intercept::{Interceptor, Policy};
//! let mut icpt = Interceptor::load()?;
//! let policy = Policy { proxy_port: 15001, dns_port: 15053, ..Policy::default() };
//! let cg = icpt.create_cgroup("run-1", &policy)?;
//! let cmd = std::process::Command::new("node");
//! let child = cg.spawn(&cmd, None); // born in the cgroup (clone3 CLONE_INTO_CGROUP)
//! // or: cg.place_child(&mut cmd) to enter it between fork and exec with std's spawn
//! let orig = icpt.orig_dst_table(); // give to the proxy
//! let mut events = icpt.block_events()?; // inside a Tokio runtime
//! # Ok(()) }
//! ```
//!
//! Submodules: [`cgroups`] (cgroup v2 files), [`pins`] (bpffs layout, stale cleanup),
//! [`shared`] (the pinned program set), [`rawbpf`] (loading what aya cannot), [`kbtf`] (kernel
//! struct layouts), [`maps`] (policy and table types), [`allowed`] (the allowed-IP table: quota,
//! expiry, purge), [`loader`] ([`Interceptor`]), [`events`],
//! [`spawn`] (a child born in a cgroup), [`doctor`] (`kz doctor`'s checks). The commands that
//! drive it (`kz doctor`, the hidden `kz intercept …` commands and the demo) live in `cmd`.

pub mod allowed;
pub mod cgroups;
pub mod dns;
pub mod doctor;
pub mod events;
pub mod kbtf;
pub mod loader;
pub mod logs;
pub mod maps;
pub mod pins;
pub mod rawbpf;
pub mod shared;
pub mod spawn;

pub use allowed::{AllowError, AllowMap};
pub use cgroups::Cgroup;
pub use events::{Block, BlockEvents, BlockReason};
pub use loader::{Interceptor, Swept};
pub use maps::{
    Cidr, Ipv6Mode, Listen, OrigDst, OrigDstTable, Policy, RUNTIME_SOCKETS, TcpRedirect, UnixRule,
    UnixSockets,
};
pub use pins::Scope;
pub use shared::UnixGuard;
pub use shared::cleanup_stale;

use std::path::PathBuf;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "no cgroup v2 hierarchy found at /sys/fs/cgroup/unified or /sys/fs/cgroup: mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error(
        "bpffs is not mounted at {0}: mount it with `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does)"
    )]
    NoBpffs(PathBuf),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse kz's eBPF object: {0}; rebuild kz (`cargo build`)")]
    Object(#[source] aya::EbpfError),
    #[error(
        "the kernel refused eBPF program {name}: {detail}; run `kz doctor` to see what this kernel supports"
    )]
    Program { name: &'static str, detail: String },
    #[error("eBPF map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("cannot pin {path} in bpffs: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error("kz's eBPF object has no {0}: kz-ebpf and kz-agent are out of sync; rebuild kz")]
    Missing(&'static str),
    #[error(
        "invalid cgroup name {0:?}: use 1-64 characters of A-Z a-z 0-9 _ . - not starting with '.'"
    )]
    BadName(String),
    #[error(
        "invalid CIDR {0:?}: expected an address with an optional prefix, e.g. 10.0.0.0/8, 192.0.2.7 or fd00::/8"
    )]
    BadCidr(String),
    #[error("invalid unix-socket rule {rule:?}: {why}")]
    BadUnixRule { rule: String, why: &'static str },
    #[error("cgroup id {0} is not one this interceptor created")]
    UnknownCgroup(u64),
    #[error("{0} is not a cgroup directory of the cgroup v2 hierarchy kz uses")]
    NotACgroup(PathBuf),
    #[error("cgroup {0} is guarded by this kz already; remove that sandbox first")]
    AlreadyGuarded(PathBuf),
    #[error("cgroup {0} already exists: pick another name or remove it")]
    CgroupExists(PathBuf),
    #[error(
        "cgroup {0} still has processes after cgroup.kill; its interception stays pinned (fail closed) — kill them and run kz again"
    )]
    CgroupBusy(PathBuf),
    #[error("block events need a Tokio runtime: call block_events() from inside one")]
    NoRuntime,
    #[error("block events were already taken: there is one consumer per interceptor")]
    EventsTaken,
    #[error(
        "kz instances {0:?} are running and use the shared eBPF programs: stop them, then run `kz intercept unload` again"
    )]
    InUse(Vec<String>),
    #[error(
        "all {0} block-event rings are in use by running kz instances: wait for some to finish"
    )]
    NoEventRing(u32),
    #[error("cannot adopt cgroup {path}: {detail}")]
    NotAdoptable {
        path: PathBuf,
        /// A stable code for audit records (`cgroup_gone`, `empty`, `links_missing`,
        /// `program_set_changed`, `duplicate`).
        reason: &'static str,
        detail: String,
    },
}

impl InterceptError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        InterceptError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Marks a socket as kz's own so the programs never redirect or refuse it: for a kz process
/// that itself runs inside an intercepted cgroup. Call before `connect()`. Sets
/// [`kz_common::KZ_SO_MARK`] (needs CAP_NET_ADMIN) *and* registers the socket in the
/// `KZ_OWN_SOCKETS` socket storage of this build's program sets in the default scope (needs
/// CAP_BPF and the pinned map): the programs exempt a socket only with both, so an agent that
/// sets the mark itself gains nothing. The registration lives as long as the socket. Where no
/// program set of this build exists yet, only the mark is set (nothing this build loads guards
/// anything yet; a set made later does not know the socket: it is intercepted, fail closed).
pub fn mark_as_kz(socket: &impl std::os::fd::AsFd) -> Result<(), InterceptError> {
    mark_as_kz_in(&Scope::detect()?, socket)
}

/// Sets [`kz_common::KZ_SO_MARK`] (half of marking a socket kz's own: the programs also want
/// it registered in `KZ_OWN_SOCKETS`).
pub(crate) fn set_kz_mark(socket: &impl std::os::fd::AsFd) -> Result<(), InterceptError> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::Mark,
        &kz_common::KZ_SO_MARK,
    )
    .map_err(|e| InterceptError::io("set SO_MARK on", "a kz socket", std::io::Error::from(e)))
}

/// [`mark_as_kz`] for the program sets of `scope`.
pub fn mark_as_kz_in(scope: &Scope, socket: &impl std::os::fd::AsFd) -> Result<(), InterceptError> {
    set_kz_mark(socket)?;
    let fd = socket.as_fd();
    for mut storage in shared::own_socket_maps(scope) {
        storage
            .insert(&fd, kz_common::OWN_SOCKET, 0)
            .map_err(shared::map_err(kz_common::map_names::OWN_SOCKETS))?;
    }
    Ok(())
}
