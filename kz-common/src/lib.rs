//! Types shared by the kz eBPF programs (`kz-ebpf`) and the user-space loader (`kz-agent`).
//!
//! Everything here is `#[repr(C)]` plain data: it crosses the kernel/user boundary as map keys
//! and values, so field order and padding are part of the ABI. Padding is always spelled out as
//! explicit `_pad` fields (zeroed) because hash-map keys are compared byte for byte.
//!
//! Addresses are stored as 16 bytes in network order; IPv4 addresses are stored v4-mapped
//! (`::ffff:a.b.c.d`) so one key type serves both families.
#![no_std]
// The only unsafe is the `aya::Pod` marker impls below (user feature).
#![deny(unsafe_code)]

/// Part of how kz's own sockets are told apart (loop avoidance for a kz process that lives inside
/// an intercepted cgroup): a socket is exempt only when it carries this `SO_MARK` *and* kz
/// registered it in the `OWN_SOCKETS` socket storage (see `kz_agent::intercept::mark_as_kz`).
/// The mark alone opens nothing: an agent with CAP_NET_ADMIN can set any mark.
pub const KZ_SO_MARK: u32 = 0x6b7a_0001;

/// Value kz stores in a socket's `OWN_SOCKETS` storage to register it as its own.
pub const OWN_SOCKET: u32 = 0x6b7a_6f77;

/// `AF_INET` / `AF_INET6` as stored in [`OrigDst::family`] and [`BlockEvent::family`].
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `AF_UNIX`, as stored in [`BlockEvent::family`] for unix-socket events.
pub const AF_UNIX: u16 = 1;

/// IP protocol numbers as stored in [`BlockEvent::proto`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Bits of [`CgroupPolicy::flags`].
pub mod flags {
    /// Redirect every TCP connect to the proxy; without it only ports in the `PORTS` map are
    /// redirected and other TCP ports connect directly (subject to the allow/deny checks).
    pub const ALL_TCP: u32 = 1 << 0;
    /// Native IPv6 destinations are redirected to `[::1]:proxy_port` like IPv4; without it every
    /// native IPv6 connect/sendmsg is refused (v4-mapped addresses always take the IPv4 path).
    pub const V6_INTERCEPT: u32 = 1 << 1;
    /// A destination must match the allow trie or have a live entry in the allowed-IP map (filled
    /// by kz's DNS resolver), otherwise the connect fails with EPERM.
    pub const REQUIRE_ALLOW: u32 = 1 << 2;
    /// UDP to ports other than 53 is let through (after the deny/allow checks) instead of refused.
    pub const ALLOW_UDP: u32 = 1 << 3;
    /// Loopback destinations (127.0.0.0/8, ::1) connect directly instead of being redirected.
    pub const LOOPBACK_DIRECT: u32 = 1 << 4;
    /// bind()/listen() on any address is let through. Without it TCP binds to the wildcard
    /// address are rewritten to loopback, TCP binds to other non-loopback addresses and UDP
    /// binds of a non-zero port outside loopback are refused, and a listener the kernel bound
    /// itself (listen() without bind()) is confined to the loopback device.
    pub const LISTEN_ANY: u32 = 1 << 5;
    /// Unix sockets are not checked. Without it a connect or addressed send to a unix socket is
    /// refused unless its address matches the cgroup's rules (`UNIX_PATHS`, `UNIX_ABSTRACT`).
    pub const UNIX_ANY: u32 = 1 << 6;
    /// The policy covers the cgroup's whole subtree: a descendant without a policy of its own
    /// is treated as this cgroup (its id keys the tries, the allowed-IP map, the port list and
    /// the proxy's record). Set on a Kubernetes pod's cgroup, whose containers are child cgroups
    /// made by the runtime after kz attached. Without it (kz's own sandboxes) a descendant
    /// without a policy is refused everything.
    pub const INHERIT: u32 = 1 << 7;
}

/// Why a connect/sendmsg was refused ([`BlockEvent::reason`]).
pub mod reason {
    /// The destination matched the cgroup's deny trie.
    pub const DENY_CIDR: u8 = 1;
    /// `REQUIRE_ALLOW` is set and the destination is in neither the allow trie nor the allow map.
    pub const NOT_ALLOWED: u8 = 2;
    /// Native IPv6 while the policy lacks `V6_INTERCEPT`.
    pub const V6_DENIED: u8 = 3;
    /// UDP to a port other than 53 while the policy lacks `ALLOW_UDP`.
    pub const UDP_DENIED: u8 = 4;
    /// The socket's cgroup has programs attached but no policy entry (e.g. a nested cgroup).
    pub const NO_POLICY: u8 = 5;
    /// A redirect was due but the policy has no proxy (or DNS) port.
    pub const NO_TARGET: u8 = 6;
    /// A raw socket (which would bypass the connect/sendmsg hooks) was refused at creation.
    pub const RAW_DENIED: u8 = 7;
    /// A bind() to a non-loopback address (TCP), or of a non-zero port outside loopback (UDP),
    /// while the policy lacks `LISTEN_ANY`.
    pub const BIND_DENIED: u8 = 8;
    /// A connect/send to a unix socket address no rule allows (or a relative or unplain path).
    pub const UNIX_DENIED: u8 = 9;
}

/// What a [`BlockEvent`] is about ([`BlockEvent::op`]).
pub mod op {
    /// connect() of an IP socket.
    pub const CONNECT: u8 = 0;
    /// sendmsg()/sendto() of an IP socket.
    pub const SENDMSG: u8 = 1;
    /// bind() of an IP socket.
    pub const BIND: u8 = 2;
    /// Creation of a socket (raw sockets).
    pub const CREATE: u8 = 3;
    /// connect() of a unix socket (any type).
    pub const UNIX_CONNECT: u8 = 4;
    /// sendmsg()/sendto() with an address on a unix datagram socket.
    pub const UNIX_SEND: u8 = 5;
}

/// Per-cgroup policy, value of the `POLICY` map keyed by cgroup id (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupPolicy {
    /// TCP is redirected to `127.0.0.1:proxy_port` (or `[::1]`); host byte order; 0 = none.
    pub proxy_port: u16,
    /// UDP/53 and TCP/53 are redirected to `127.0.0.1:dns_port` (kz's resolver listens on both);
    /// host byte order; 0 = none.
    pub dns_port: u16,
    /// [`flags`] bits.
    pub flags: u32,
    /// Index in the `EVENT_RINGS` array of the ring buffer of the kz instance guarding the
    /// cgroup: where its block events go.
    pub ring: u32,
    pub _pad: u32,
}

/// Key of the `PORTS` map (listed-ports mode): a TCP port redirected for one cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub cgroup_id: u64,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Data of an IPv4 LPM-trie key: the cgroup id (big-endian, always fully matched) followed by the
/// address; the trie's prefix length is `64 + cidr prefix`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lpm4 {
    pub cgroup_id: [u8; 8],
    pub addr: [u8; 4],
}

/// Data of an IPv6 LPM-trie key; see [`Lpm4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lpm6 {
    pub cgroup_id: [u8; 8],
    pub addr: [u8; 16],
}

/// Key of the `ALLOWED_IPS` map; its value is the expiry as `CLOCK_MONOTONIC` nanoseconds
/// (`u64::MAX` = never expires).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpKey {
    pub cgroup_id: u64,
    /// v4-mapped for IPv4.
    pub addr: [u8; 16],
}

/// The destination a process asked for before it was redirected. Value of `ORIG_BY_COOKIE`
/// (key: socket cookie) and then of `ORIG_BY_PEER` (key: [`PeerKey`], the client's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// v4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// [`AF_INET`] (also for v4-mapped destinations) or [`AF_INET6`].
    pub family: u16,
    /// Process id (thread-group id) that called connect().
    pub tgid: u32,
    pub cgroup_id: u64,
}

/// The client end of a redirected connection as the proxy sees it in `peer_addr()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    /// v4-mapped for IPv4 (also when the client socket was AF_INET6 with a v4-mapped address).
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// How many cgroups kz can guard at once, over all instances (size of the per-cgroup maps).
pub const MAX_CGROUPS: u32 = 4096;

/// Size of the `ALLOWED_IPS` map, shared by every cgroup of every kz instance on the machine.
/// Each sandbox may hold at most its own quota of it (`[blind] max_allowed_ips`, 4096 by
/// default), so 64 sandboxes at full quota fill it. The map is not preallocated: the cost of
/// the size is its bucket array (16 bytes per slot, 4 MiB), not the entries.
pub const MAX_ALLOWED_IPS: u32 = 262_144;

/// Size of the `EVENT_RINGS` array: how many kz instances can run at once with block events.
pub const MAX_EVENT_RINGS: u32 = 1024;

/// Size in bytes of each block-event ring buffer (a power of two, a multiple of the page size;
/// every ring has this size: the kernel requires the inner maps of one map-of-maps to match).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// A refused connect/sendmsg/bind, socket creation or unix-socket connect/send, sent through the ring buffer of the kz instance guarding the
/// cgroup (`EVENT_RINGS[policy.ring]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEvent {
    pub cgroup_id: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// Task name, NUL padded.
    pub comm: [u8; 16],
    /// Destination, v4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    pub family: u16,
    /// IP protocol number: [`PROTO_TCP`], [`PROTO_UDP`], 1 (ICMP ping sockets), 58 (ICMPv6).
    pub proto: u8,
    /// One of [`reason`].
    pub reason: u8,
    /// One of [`op`].
    pub op: u8,
    /// Bytes of `path` in use (unix sockets; 0 otherwise).
    pub path_len: u8,
    /// The guarded cgroup whose policy applies: `cgroup_id` itself, or its nearest ancestor
    /// with a policy (a process in a nested cgroup). Rings are reused by later instances, so a
    /// reader keeps only events of cgroups it guards.
    pub guard_id: u64,
    /// Unix sockets: the `sun_path` the process passed (a leading NUL: abstract).
    pub path: [u8; UNIX_PATH_MAX],
    pub _pad: [u8; 4],
}

impl Default for BlockEvent {
    fn default() -> BlockEvent {
        BlockEvent {
            cgroup_id: 0,
            pid: 0,
            tgid: 0,
            comm: [0; 16],
            addr: [0; 16],
            port: 0,
            family: 0,
            proto: 0,
            reason: 0,
            op: 0,
            path_len: 0,
            guard_id: 0,
            path: [0; UNIX_PATH_MAX],
            _pad: [0; 4],
        }
    }
}

/// Byte offsets of `uaddr` and `uaddrlen` in the kernel's `struct bpf_sock_addr_kern` (the
/// context of every sock_addr program: `{ sk, uaddr, tmp_reg, t_ctx, uaddrlen }` since Linux
/// 6.7, when the unix hooks came). The unix-socket programs read them at these offsets; user
/// space checks them against the kernel's BTF before attaching those programs.
pub const SOCK_ADDR_KERN_UADDR: u32 = 8;
pub const SOCK_ADDR_KERN_UADDRLEN: u32 = 32;

/// Size of `sun_path` in `struct sockaddr_un`.
pub const UNIX_PATH_MAX: usize = 108;

/// Bytes of path in a [`UnixPathKey`]: `sun_path` (108) padded with NULs, so the programs can
/// look a few bytes past any position while they check components.
pub const UNIX_KEY_PATH: usize = 128;

/// Data of a `UNIX_PATHS` LPM-trie key: the cgroup id (big-endian, always fully matched), then
/// the path, NUL padded. An exact rule's prefix covers the path and its terminating NUL
/// (`64 + 8 * (len + 1)`); a directory rule's ends with its `/` (`64 + 8 * len`). Value:
/// [`UNIX_ALLOW`] or [`UNIX_DENY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPathKey {
    pub cgroup_id: [u8; 8],
    pub path: [u8; UNIX_KEY_PATH],
}

impl Default for UnixPathKey {
    fn default() -> UnixPathKey {
        UnixPathKey {
            cgroup_id: [0; 8],
            path: [0; UNIX_KEY_PATH],
        }
    }
}

/// Values of `UNIX_PATHS`.
pub const UNIX_ALLOW: u8 = 1;
pub const UNIX_DENY: u8 = 2;

/// Key of the `UNIX_ABSTRACT` map: an allowed abstract socket name (without the leading NUL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixAbstractKey {
    pub cgroup_id: u64,
    pub len: u32,
    /// NUL padded (abstract names may contain NULs: `len` tells them apart).
    pub name: [u8; UNIX_PATH_MAX],
}

impl Default for UnixAbstractKey {
    fn default() -> UnixAbstractKey {
        UnixAbstractKey {
            cgroup_id: 0,
            len: 0,
            name: [0; UNIX_PATH_MAX],
        }
    }
}

/// Map names as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const POLICY: &str = "KZ_POLICY";
    pub const PORTS: &str = "KZ_PORTS";
    pub const ALLOW4: &str = "KZ_ALLOW4";
    pub const DENY4: &str = "KZ_DENY4";
    pub const ALLOW6: &str = "KZ_ALLOW6";
    pub const DENY6: &str = "KZ_DENY6";
    pub const ALLOWED_IPS: &str = "KZ_ALLOWED_IPS";
    pub const ORIG_BY_COOKIE: &str = "KZ_ORIG_COOKIE";
    pub const ORIG_BY_PEER: &str = "KZ_ORIG_PEER";
    pub const DNS_ORIG: &str = "KZ_DNS_ORIG";
    /// Array of maps: block-event ring buffers, one per running kz instance (reused).
    pub const EVENT_RINGS: &str = "KZ_EVENT_RINGS";
    /// Socket storage: kz's own sockets (see [`super::OWN_SOCKET`]).
    pub const OWN_SOCKETS: &str = "KZ_OWN_SOCKETS";
    pub const UNIX_PATHS: &str = "KZ_UNIX_PATHS";
    pub const UNIX_ABSTRACT: &str = "KZ_UNIX_ABSTRACT";
    pub const ALL: [&str; 14] = [
        POLICY,
        PORTS,
        ALLOW4,
        DENY4,
        ALLOW6,
        DENY6,
        ALLOWED_IPS,
        ORIG_BY_COOKIE,
        ORIG_BY_PEER,
        DNS_ORIG,
        EVENT_RINGS,
        OWN_SOCKETS,
        UNIX_PATHS,
        UNIX_ABSTRACT,
    ];
}

/// Program names (function names in kz-ebpf; distinct from their section names on purpose).
pub mod prog_names {
    pub const CONNECT4: &str = "kz_connect4";
    pub const CONNECT6: &str = "kz_connect6";
    pub const SENDMSG4: &str = "kz_sendmsg4";
    pub const SENDMSG6: &str = "kz_sendmsg6";
    pub const RECVMSG4: &str = "kz_recvmsg4";
    pub const RECVMSG6: &str = "kz_recvmsg6";
    pub const GETPEERNAME4: &str = "kz_getpeername4";
    pub const GETPEERNAME6: &str = "kz_getpeername6";
    pub const SOCK_OPS: &str = "kz_sock_ops";
    pub const SOCK_CREATE: &str = "kz_sock_create";
    pub const BIND4: &str = "kz_bind4";
    pub const BIND6: &str = "kz_bind6";
    /// cgroup/connect_unix (loaded by hand: aya 0.14 lacks the attach type).
    pub const UNIX_CONNECT: &str = "kz_unix_connect";
    /// cgroup/sendmsg_unix (likewise).
    pub const UNIX_SENDMSG: &str = "kz_unix_sendmsg";
}

#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($t:ty),*) => {$(
        // SAFETY: #[repr(C)] plain data of integers and byte arrays with all padding spelled out
        // as explicit fields, so every bit pattern is valid and there are no uninitialised bytes.
        #[allow(unsafe_code)]
        unsafe impl aya::Pod for $t {}
    )*};
}

#[cfg(feature = "user")]
impl_pod!(
    CgroupPolicy,
    PortKey,
    Lpm4,
    Lpm6,
    IpKey,
    OrigDst,
    PeerKey,
    BlockEvent,
    UnixPathKey,
    UnixAbstractKey
);

// Layout checks: the kernel and user space must agree on these sizes.
const _: () = assert!(core::mem::size_of::<CgroupPolicy>() == 16);
const _: () = assert!(core::mem::size_of::<PortKey>() == 16);
const _: () = assert!(core::mem::size_of::<Lpm4>() == 12);
const _: () = assert!(core::mem::size_of::<Lpm6>() == 24);
const _: () = assert!(core::mem::size_of::<IpKey>() == 24);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 24);
const _: () = assert!(core::mem::size_of::<BlockEvent>() == 176);
const _: () = assert!(core::mem::size_of::<UnixPathKey>() == 136);
const _: () = assert!(core::mem::size_of::<UnixAbstractKey>() == 120);
