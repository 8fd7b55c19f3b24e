//! The programs. Context fields are read and written with volatile accesses of exactly the
//! width the verifier expects (see shared/ebpf-toolchain.md: LLVM otherwise merges or widens
//! them into loads the verifier rejects).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, bpf_sock, bpf_sock_addr, bpf_sock_ops},
    btf_maps::{ArrayOfMaps, RingBuf},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use kz_common::{
    AF_INET, AF_INET6, BlockEvent, CgroupPolicy, EVENT_RING_BYTES, IpKey, KZ_SO_MARK, Lpm4, Lpm6,
    MAX_CGROUPS, MAX_EVENT_RINGS, OrigDst, PROTO_TCP, PROTO_UDP, PeerKey, PortKey, flags, reason,
};

// The hash maps only user space writes are not preallocated: the program set stays pinned for
// as long as kz is in use, and preallocation would hold their full size in kernel memory (and
// cost time at the one load) for tables that are almost always nearly empty.
#[map]
static KZ_POLICY: HashMap<u64, CgroupPolicy> =
    HashMap::with_max_entries(MAX_CGROUPS, BPF_F_NO_PREALLOC);
#[map]
static KZ_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
static KZ_ALLOW4: LpmTrie<Lpm4, u8> = LpmTrie::with_max_entries(65536, 0);
#[map]
static KZ_DENY4: LpmTrie<Lpm4, u8> = LpmTrie::with_max_entries(65536, 0);
#[map]
static KZ_ALLOW6: LpmTrie<Lpm6, u8> = LpmTrie::with_max_entries(65536, 0);
#[map]
static KZ_DENY6: LpmTrie<Lpm6, u8> = LpmTrie::with_max_entries(65536, 0);
/// Value: expiry in CLOCK_MONOTONIC ns.
#[map]
static KZ_ALLOWED_IPS: HashMap<IpKey, u64> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);
#[map]
static KZ_ORIG_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);
#[map]
static KZ_ORIG_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);
/// Socket cookie → the resolver a UDP/53 socket asked (for recvmsg source rewriting).
#[map]
static KZ_DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(16384, 0);
/// Block-event ring buffers, one per running kz instance: the programs and the other maps are
/// shared by every instance, but a ring has one reader, so each instance has its own and the
/// policy of each cgroup names its guard's ring (`CgroupPolicy::ring`). Filling a slot of a
/// map-of-maps makes the kernel wait for an RCU grace period, so rings stay in their slots and
/// are reused by later instances instead of being replaced per run.
type EventRing = RingBuf<BlockEvent, { EVENT_RING_BYTES as usize }>;
#[btf_map]
static KZ_EVENT_RINGS: ArrayOfMaps<EventRing, { MAX_EVENT_RINGS as usize }> = ArrayOfMaps::new();

/// Deepest cgroup level searched for a guarded ancestor (kz's cgroups sit at level 3 below the
/// cgroup2 root; an agent can nest a few more below).
const MAX_CGROUP_LEVEL: i32 = 16;

const SOCK_STREAM: u32 = 1;
const SOCK_RAW: u32 = 3;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;
/// 127.0.0.1 as the kernel stores it in `user_ip4` (network order in memory).
const LOCALHOST4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// cgroup sock_addr return codes.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    Sendmsg,
}

enum Verdict {
    Pass,
    Deny,
    /// Rewrite the destination to loopback:port.
    Redirect(u16),
}

#[inline(always)]
fn rd(p: *const u32) -> u32 {
    // SAFETY: `p` points into the program context, which the kernel guarantees is valid for the
    // program's run; the verifier checks the offset and width.
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn wr(p: *mut u32, v: u32) {
    // SAFETY: as in `rd`; user_ip4/user_ip6/user_port are writable in connect/sendmsg/recvmsg.
    unsafe { write_volatile(p, v) }
}

#[inline(always)]
fn mapped4(ip: u32) -> [u8; 16] {
    let b = ip.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn tail4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

#[inline(always)]
fn is_mapped(w: &[u32; 4]) -> bool {
    w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// kz's own sockets carry `KZ_SO_MARK` and are never touched.
#[inline(always)]
fn own_socket(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: `sk` is a PTR_TO_SOCKET the kernel fills for every sock_addr program run.
    let sk: *mut bpf_sock = unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: as above; `mark` is a readable 4-byte field of bpf_sock.
    rd(unsafe { addr_of!((*sk).mark) }) == KZ_SO_MARK
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_block<C: EbpfContext>(
    ctx: &C,
    cgroup_id: u64,
    guard_id: u64,
    ring: u32,
    addr: &[u8; 16],
    v4: bool,
    port: u16,
    proto: u8,
    why: u8,
) {
    // Diagnostics only (off unless kz runs with debug logging); the ring event is the record.
    debug!(
        ctx,
        "refused {:i} port {} proto {} reason {} cgroup {}", *addr, port, proto, why, cgroup_id
    );
    let Some(ring) = KZ_EVENT_RINGS.get(ring) else {
        return;
    };
    if let Some(mut entry) = ring.reserve(0) {
        let pid_tgid = bpf_get_current_pid_tgid();
        entry.write(BlockEvent {
            cgroup_id,
            pid: pid_tgid as u32,
            tgid: (pid_tgid >> 32) as u32,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            addr: *addr,
            port,
            family: if v4 { AF_INET } else { AF_INET6 },
            proto,
            reason: why,
            _pad: [0; 2],
            guard_id,
        });
        entry.submit(0);
    }
}

/// For a cgroup without a policy of its own (or any cgroup, for sock_create): reports to the
/// guard, the cgroup itself when it has a policy, else its nearest ancestor with one (a process
/// that moved itself into a child cgroup of a guarded one is refused everything, and its guard
/// must hear of it).
#[inline(always)]
fn emit_block_to_guard<C: EbpfContext>(
    ctx: &C,
    cgroup_id: u64,
    addr: &[u8; 16],
    v4: bool,
    port: u16,
    proto: u8,
    why: u8,
) {
    let guard = guard_of(cgroup_id);
    // SAFETY: the value is plain data copied out at once.
    if let Some(policy) = unsafe { KZ_POLICY.get(&guard) } {
        let ring = policy.ring;
        emit_block(ctx, cgroup_id, guard, ring, addr, v4, port, proto, why);
    }
}

/// `cg` when it has a policy, else its nearest ancestor that has one, else 0.
#[inline(never)]
fn guard_of(cg: u64) -> u64 {
    // SAFETY: map values are only tested for presence.
    if unsafe { KZ_POLICY.get(&cg) }.is_some() {
        return cg;
    }
    let mut level = MAX_CGROUP_LEVEL;
    while level >= 0 {
        // SAFETY: no preconditions; 0 when the task's cgroup is shallower than `level`.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 && unsafe { KZ_POLICY.get(&id) }.is_some() {
            return id;
        }
        level -= 1;
    }
    0
}

// Each map gets its own lookup call site: the verifier tracks one map per call site.
#[inline(always)]
fn in_trie(cg: u64, addr: &[u8; 16], v4: bool, allow: bool) -> bool {
    let cgb = cg.to_be_bytes();
    if v4 {
        let key = Key::new(
            64 + 32,
            Lpm4 {
                cgroup_id: cgb,
                addr: tail4(addr),
            },
        );
        if allow {
            KZ_ALLOW4.get(&key).is_some()
        } else {
            KZ_DENY4.get(&key).is_some()
        }
    } else {
        let key = Key::new(
            64 + 128,
            Lpm6 {
                cgroup_id: cgb,
                addr: *addr,
            },
        );
        if allow {
            KZ_ALLOW6.get(&key).is_some()
        } else {
            KZ_DENY6.get(&key).is_some()
        }
    }
}

#[inline(always)]
fn in_allow_map(cg: u64, addr: &[u8; 16]) -> bool {
    let key = IpKey {
        cgroup_id: cg,
        addr: *addr,
    };
    // SAFETY: the value is plain data copied out at once.
    match unsafe { KZ_ALLOWED_IPS.get(&key) } {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        Some(expiry) => *expiry > unsafe { bpf_ktime_get_ns() },
        None => false,
    }
}

#[inline(always)]
fn is_loopback(addr: &[u8; 16], v4: bool) -> bool {
    if v4 {
        addr[12] == 127
    } else {
        addr[..15].iter().all(|b| *b == 0) && addr[15] == 1
    }
}

/// The policy decision shared by connect and sendmsg, both families. Records the original
/// destination (TCP: by socket cookie for sock_ops; DNS: for recvmsg) when it redirects.
#[inline(always)]
fn decide(ctx: &SockAddrContext, addr: &[u8; 16], v4: bool, port: u16, hook: Hook) -> Verdict {
    let sa = ctx.sock_addr;
    if own_socket(sa) {
        return Verdict::Pass;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: protocol is a readable 4-byte context field.
    let protocol = rd(unsafe { addr_of!((*sa).protocol) });
    let sock_type = rd(unsafe { addr_of!((*sa).type_) });
    let tcp = protocol == IPPROTO_TCP || (protocol == 0 && sock_type == SOCK_STREAM);
    // The event names the real protocol (e.g. ICMP for ping sockets, which take the UDP rules).
    let proto = if tcp {
        PROTO_TCP
    } else if protocol == 0 || protocol > 255 {
        PROTO_UDP
    } else {
        protocol as u8
    };
    // SAFETY: the value is plain data copied out at once.
    let policy = match unsafe { KZ_POLICY.get(&cg) } {
        Some(p) => *p,
        None => {
            emit_block_to_guard(ctx, cg, addr, v4, port, proto, reason::NO_POLICY);
            return Verdict::Deny;
        }
    };
    let deny = |why: u8| {
        emit_block(ctx, cg, cg, policy.ring, addr, v4, port, proto, why);
        Verdict::Deny
    };
    if !v4 && policy.flags & flags::V6_INTERCEPT == 0 {
        return deny(reason::V6_DENIED);
    }
    let record = OrigDst {
        addr: *addr,
        port,
        family: if v4 { AF_INET } else { AF_INET6 },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        cgroup_id: cg,
    };
    // DNS goes to kz's resolver whatever resolver the client named: that is the point. Over
    // UDP, and over TCP too (stub resolvers retry there when an answer is truncated; `dig +tcp`
    // starts there); the resolver listens on the same port number for both.
    let dns_udp = !tcp && protocol == IPPROTO_UDP;
    let dns_tcp = tcp && hook == Hook::Connect;
    if port == DNS_PORT && (dns_udp || dns_tcp) {
        if policy.dns_port == 0 {
            return deny(reason::NO_TARGET);
        }
        // SAFETY: the context is a socket context, as bpf_get_socket_cookie requires. The
        // record serves recvmsg (UDP) and getpeername (both).
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if KZ_DNS_ORIG.insert(&cookie, &record, 0).is_err() {
            return deny(reason::NO_TARGET);
        }
        return Verdict::Redirect(policy.dns_port);
    }
    if in_trie(cg, addr, v4, false) {
        return deny(reason::DENY_CIDR);
    }
    let loopback = is_loopback(addr, v4);
    if loopback && policy.flags & flags::LOOPBACK_DIRECT != 0 {
        return Verdict::Pass;
    }
    if policy.flags & flags::REQUIRE_ALLOW != 0
        && !in_trie(cg, addr, v4, true)
        && !in_allow_map(cg, addr)
    {
        return deny(reason::NOT_ALLOWED);
    }
    if !tcp {
        return if policy.flags & flags::ALLOW_UDP != 0 {
            Verdict::Pass
        } else {
            deny(reason::UDP_DENIED)
        };
    }
    let listed = policy.flags & flags::ALL_TCP != 0
        || KZ_PORTS
            .get_ptr(&PortKey {
                cgroup_id: cg,
                port,
                _pad: [0; 6],
            })
            .is_some();
    if !listed {
        return Verdict::Pass;
    }
    if policy.proxy_port == 0 || hook != Hook::Connect {
        return deny(reason::NO_TARGET);
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if KZ_ORIG_COOKIE.insert(&cookie, &record, 0).is_err() {
        // Without a record the proxy could not serve the connection: refuse it now.
        return deny(reason::NO_TARGET);
    }
    Verdict::Redirect(policy.proxy_port)
}

#[inline(always)]
fn on_addr4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are 4-byte context fields of connect4/sendmsg4.
    let ip = rd(unsafe { addr_of!((*sa).user_ip4) });
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    match decide(ctx, &mapped4(ip), true, port, hook) {
        Verdict::Pass => ALLOW,
        Verdict::Deny => REJECT,
        Verdict::Redirect(to) => {
            wr(unsafe { addr_of_mut!((*sa).user_ip4) }, LOCALHOST4);
            wr(
                unsafe { addr_of_mut!((*sa).user_port) },
                u32::from(to.to_be()),
            );
            ALLOW
        }
    }
}

#[inline(always)]
fn on_addr6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip6[i]/user_port are 4-byte context fields of connect6/sendmsg6.
    let w = unsafe {
        [
            rd(addr_of!((*sa).user_ip6[0])),
            rd(addr_of!((*sa).user_ip6[1])),
            rd(addr_of!((*sa).user_ip6[2])),
            rd(addr_of!((*sa).user_ip6[3])),
        ]
    };
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    let v4 = is_mapped(&w);
    match decide(ctx, &words_to_bytes(w), v4, port, hook) {
        Verdict::Pass => ALLOW,
        Verdict::Deny => REJECT,
        Verdict::Redirect(to) => {
            // v4-mapped stays v4-mapped (::ffff:127.0.0.1); native IPv6 goes to ::1.
            let target = if v4 {
                [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), LOCALHOST4]
            } else {
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
            };
            // SAFETY: user_ip6[i] and user_port are writable in connect6/sendmsg6.
            unsafe {
                wr(addr_of_mut!((*sa).user_ip6[0]), target[0]);
                wr(addr_of_mut!((*sa).user_ip6[1]), target[1]);
                wr(addr_of_mut!((*sa).user_ip6[2]), target[2]);
                wr(addr_of_mut!((*sa).user_ip6[3]), target[3]);
                wr(addr_of_mut!((*sa).user_port), u32::from(to.to_be()));
            }
            ALLOW
        }
    }
}

/// The original resolver of a redirected DNS socket, when this datagram comes from kz's DNS port.
#[inline(always)]
fn dns_source(ctx: &SockAddrContext, from_loopback: bool, from_port: u16) -> Option<OrigDst> {
    if !from_loopback {
        return None;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions; map values are copied out.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let policy = unsafe { KZ_POLICY.get(&cg) }.copied()?;
    if policy.dns_port == 0 || policy.dns_port != from_port {
        return None;
    }
    // SAFETY: socket context, as bpf_get_socket_cookie requires; value copied out.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { KZ_DNS_ORIG.get(&cookie) }.copied()
}

#[cgroup_sock_addr(connect4)]
pub fn kz_connect4(ctx: SockAddrContext) -> i32 {
    on_addr4(&ctx, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn kz_connect6(ctx: SockAddrContext) -> i32 {
    on_addr6(&ctx, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn kz_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_addr4(&ctx, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn kz_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_addr6(&ctx, Hook::Sendmsg)
}

/// Replies from kz's DNS port appear to come from the resolver the client asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn kz_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are the datagram's source in recvmsg4.
    let ip = rd(unsafe { addr_of!((*sa).user_ip4) });
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    if let Some(orig) = dns_source(&ctx, ip == LOCALHOST4, port)
        && orig.family == AF_INET
    {
        let t = tail4(&orig.addr);
        wr(
            unsafe { addr_of_mut!((*sa).user_ip4) },
            u32::from_ne_bytes(t),
        );
        wr(
            unsafe { addr_of_mut!((*sa).user_port) },
            u32::from(orig.port.to_be()),
        );
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn kz_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip6[i]/user_port are the datagram's source in recvmsg6.
    let w = unsafe {
        [
            rd(addr_of!((*sa).user_ip6[0])),
            rd(addr_of!((*sa).user_ip6[1])),
            rd(addr_of!((*sa).user_ip6[2])),
            rd(addr_of!((*sa).user_ip6[3])),
        ]
    };
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    let from_loopback = (is_mapped(&w) && w[3] == LOCALHOST4)
        || (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == u32::from_ne_bytes([0, 0, 0, 1]));
    if let Some(orig) = dns_source(&ctx, from_loopback, port) {
        let b = orig.addr;
        // SAFETY: as above; writable in recvmsg6.
        unsafe {
            wr(
                addr_of_mut!((*sa).user_ip6[0]),
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            );
            wr(
                addr_of_mut!((*sa).user_ip6[1]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            );
            wr(
                addr_of_mut!((*sa).user_ip6[2]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            );
            wr(
                addr_of_mut!((*sa).user_ip6[3]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            );
            wr(addr_of_mut!((*sa).user_port), u32::from(orig.port.to_be()));
        }
    }
    ALLOW
}

/// Re-keys the original destination from the socket cookie to the client's (ip, port), which is
/// what the proxy sees as `peer_addr()`. Fires before the proxy's accept() returns.
#[sock_ops]
pub fn kz_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: all reads are 4-byte sock_ops context fields; read up front (see module docs).
    let (op, family, lip4, lip6, lport) = unsafe {
        (
            rd(addr_of!((*ops).op)),
            rd(addr_of!((*ops).family)),
            rd(addr_of!((*ops).local_ip4)),
            [
                rd(addr_of!((*ops).local_ip6[0])),
                rd(addr_of!((*ops).local_ip6[1])),
                rd(addr_of!((*ops).local_ip6[2])),
                rd(addr_of!((*ops).local_ip6[3])),
            ],
            rd(addr_of!((*ops).local_port)),
        )
    };
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: socket context, as bpf_get_socket_cookie requires; value copied out.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { KZ_ORIG_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let addr = if u32::from(AF_INET) == family {
        mapped4(lip4)
    } else {
        words_to_bytes(lip6)
    };
    let key = PeerKey {
        addr,
        port: lport as u16,
        _pad: [0; 6],
    };
    let _ = KZ_ORIG_PEER.insert(&key, &orig, 0);
    // The cookie entry stays (LRU) for getpeername.
    1
}

/// The original destination of a socket kz redirected (TCP to the proxy or UDP/53 to the DNS
/// port), by socket cookie.
#[inline(always)]
fn redirected_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: socket context, as bpf_get_socket_cookie requires; values copied out.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match unsafe { KZ_ORIG_COOKIE.get(&cookie) } {
        Some(o) => Some(*o),
        None => unsafe { KZ_DNS_ORIG.get(&cookie) }.copied(),
    }
}

/// getpeername() on a redirected socket names the destination the process asked for, not
/// kz's loopback port: the redirect stays invisible.
#[cgroup_sock_addr(getpeername4)]
pub fn kz_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected_peer(&ctx)
        && orig.family == AF_INET
    {
        let sa = ctx.sock_addr;
        // SAFETY: user_ip4/user_port are writable in getpeername4.
        wr(
            unsafe { addr_of_mut!((*sa).user_ip4) },
            u32::from_ne_bytes(tail4(&orig.addr)),
        );
        wr(
            unsafe { addr_of_mut!((*sa).user_port) },
            u32::from(orig.port.to_be()),
        );
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn kz_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected_peer(&ctx) {
        let sa = ctx.sock_addr;
        let b = orig.addr;
        // SAFETY: user_ip6[i]/user_port are writable in getpeername6.
        unsafe {
            wr(
                addr_of_mut!((*sa).user_ip6[0]),
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            );
            wr(
                addr_of_mut!((*sa).user_ip6[1]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            );
            wr(
                addr_of_mut!((*sa).user_ip6[2]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            );
            wr(
                addr_of_mut!((*sa).user_ip6[3]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            );
            wr(addr_of_mut!((*sa).user_port), u32::from(orig.port.to_be()));
        }
    }
    ALLOW
}

/// Raw sockets would bypass every hook above (they take no connect/sendmsg path): refused in
/// intercepted cgroups. (Creating one needs CAP_NET_RAW anyway; this closes it for root agents.)
#[cgroup_sock(sock_create)]
pub fn kz_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: type_/protocol/family are readable 4-byte fields of bpf_sock in sock_create.
    let (ty, protocol, family) = unsafe {
        (
            rd(addr_of!((*sk).type_)),
            rd(addr_of!((*sk).protocol)),
            rd(addr_of!((*sk).family)),
        )
    };
    if ty != SOCK_RAW {
        return ALLOW;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    emit_block_to_guard(
        &ctx,
        cg,
        &[0; 16],
        family == u32::from(AF_INET),
        0,
        if protocol > 255 { 0 } else { protocol as u8 },
        reason::RAW_DENIED,
    );
    REJECT
}
