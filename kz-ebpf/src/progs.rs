//! The programs. Context fields are read and written with volatile accesses of exactly the
//! width the verifier expects (see shared/ebpf-toolchain.md: LLVM otherwise merges or widens
//! them into loads the verifier rejects).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, bpf_sock, bpf_sock_addr, bpf_sock_ops},
    btf_maps::{ArrayOfMaps, RingBuf, SkStorage},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use kz_common::{
    AF_INET, AF_INET6, AF_UNIX, BlockEvent, CgroupPolicy, EVENT_RING_BYTES, IpKey, KZ_SO_MARK,
    Lpm4, Lpm6, MAX_ALLOWED_IPS, MAX_CGROUPS, MAX_EVENT_RINGS, OWN_SOCKET, OrigDst, PROTO_TCP,
    PROTO_UDP, PeerKey, PortKey, SOCK_ADDR_KERN_UADDR, SOCK_ADDR_KERN_UADDRLEN, UNIX_ALLOW,
    UNIX_KEY_PATH, UNIX_PATH_MAX, UnixAbstractKey, UnixPathKey, flags, op, reason,
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
/// Value: expiry in CLOCK_MONOTONIC ns. User space keeps each cgroup under its quota and
/// deletes expired entries; the check here makes an expired entry useless at once.
#[map]
static KZ_ALLOWED_IPS: HashMap<IpKey, u64> =
    HashMap::with_max_entries(MAX_ALLOWED_IPS, BPF_F_NO_PREALLOC);
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

/// kz's own sockets: `mark_as_kz` stores [`OWN_SOCKET`] here, keyed by the socket itself.
/// Socket storage rather than a table of socket cookies: an entry lives and dies with its
/// socket (no ageing, no stale entry a later socket could inherit, no table to fill), only a
/// holder of the pinned map (root with CAP_BPF, who could detach the programs anyway) can write
/// it, and the registration sticks to the socket, not to a process or cgroup: kz's own cgroup
/// could not tell its sockets apart, since a kz inside a guarded cgroup shares it with the agent.
#[btf_map]
static KZ_OWN_SOCKETS: SkStorage<u32> = SkStorage::new();

/// Unix-socket rules of each cgroup: socket paths (exact: the prefix covers the terminating
/// NUL) and directories (the prefix ends with the `/`), keyed by cgroup id + path bytes. The
/// longest match decides: [`UNIX_ALLOW`], or `UNIX_DENY` for a runtime socket below an allowed
/// directory.
#[map]
static KZ_UNIX_PATHS: LpmTrie<UnixPathKey, u8> = LpmTrie::with_max_entries(16384, 0);
/// Allowed abstract socket names of each cgroup.
#[map]
static KZ_UNIX_ABSTRACT: HashMap<UnixAbstractKey, u8> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);
/// Scratch space for the keys above: too large for the 512-byte stack next to the rest.
#[map]
static KZ_PATH_SCRATCH: PerCpuArray<Key<UnixPathKey>> = PerCpuArray::with_max_entries(1, 0);
#[map]
static KZ_ABSTRACT_SCRATCH: PerCpuArray<UnixAbstractKey> = PerCpuArray::with_max_entries(1, 0);

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
const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const SOL_SOCKET: i32 = 1;
const SO_BINDTOIFINDEX: i32 = 62;
/// The loopback device's index: 1 in every network namespace.
const LOOPBACK_IFINDEX: i32 = 1;
/// cgroup sock_addr return codes.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    Sendmsg,
    Bind,
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

/// `user_ip6` of a connect6/sendmsg6/bind6/recvmsg6 context, as four words.
#[inline(always)]
fn user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: user_ip6[i] are readable 4-byte context fields of these programs.
    unsafe {
        [
            rd(addr_of!((*sa).user_ip6[0])),
            rd(addr_of!((*sa).user_ip6[1])),
            rd(addr_of!((*sa).user_ip6[2])),
            rd(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

/// Rewrites `user_ip6` to loopback: v4-mapped stays v4-mapped (::ffff:127.0.0.1), native IPv6
/// goes to ::1.
#[inline(always)]
fn set_loopback6(sa: *mut bpf_sock_addr, v4: bool) {
    let target = if v4 {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), LOCALHOST4]
    } else {
        [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    };
    // SAFETY: user_ip6[i] are writable in connect6/sendmsg6/bind6.
    unsafe {
        wr(addr_of_mut!((*sa).user_ip6[0]), target[0]);
        wr(addr_of_mut!((*sa).user_ip6[1]), target[1]);
        wr(addr_of_mut!((*sa).user_ip6[2]), target[2]);
        wr(addr_of_mut!((*sa).user_ip6[3]), target[3]);
    }
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

/// kz's own sockets carry `KZ_SO_MARK` *and* are registered in [`KZ_OWN_SOCKETS`]; they are
/// never touched. The mark is only a cheap first test (no helper call for the agent's sockets):
/// alone it opens nothing, since an agent with CAP_NET_ADMIN can set any mark.
#[inline(always)]
fn own_socket(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: `sk` is a PTR_TO_SOCKET the kernel fills for every sock_addr program run.
    let sk: *mut bpf_sock = unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: as above; `mark` is a readable 4-byte field of bpf_sock.
    if rd(unsafe { addr_of!((*sk).mark) }) != KZ_SO_MARK {
        return false;
    }
    // SAFETY: the context's socket is what bpf_sk_storage_get expects; no entry is created.
    let own = unsafe { KZ_OWN_SOCKETS.get_ptr_mut(ctx) };
    // SAFETY: a non-null result points at the socket's 4-byte storage.
    !own.is_null() && unsafe { read_volatile(own) } == OWN_SOCKET
}

/// One block event's fixed part.
struct Ev {
    cgroup_id: u64,
    guard_id: u64,
    ring: u32,
    addr: [u8; 16],
    port: u16,
    family: u16,
    proto: u8,
    why: u8,
    op: u8,
}

/// Writes an event into ring `ev.ring`, with `path_len` bytes of a unix peer's `sun_path` read
/// from kernel memory at `path` (0: none). Written field by field into the reservation: the
/// event is too large to build on the stack first.
#[inline(always)]
fn submit(ev: &Ev, path: u64, path_len: u32) {
    let Some(ring) = KZ_EVENT_RINGS.get(ev.ring) else {
        return;
    };
    let Some(mut entry) = ring.reserve(0) else {
        return;
    };
    let e: *mut BlockEvent = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `e` points at a reserved, writable record of BlockEvent's size.
    unsafe {
        write_volatile(addr_of_mut!((*e).cgroup_id), ev.cgroup_id);
        write_volatile(addr_of_mut!((*e).pid), pid_tgid as u32);
        write_volatile(addr_of_mut!((*e).tgid), (pid_tgid >> 32) as u32);
        write_volatile(
            addr_of_mut!((*e).comm),
            bpf_get_current_comm().unwrap_or([0; 16]),
        );
        write_volatile(addr_of_mut!((*e).addr), ev.addr);
        write_volatile(addr_of_mut!((*e).port), ev.port);
        write_volatile(addr_of_mut!((*e).family), ev.family);
        write_volatile(addr_of_mut!((*e).proto), ev.proto);
        write_volatile(addr_of_mut!((*e).reason), ev.why);
        write_volatile(addr_of_mut!((*e).op), ev.op);
        write_volatile(addr_of_mut!((*e).guard_id), ev.guard_id);
        let mut n = 0u32;
        if path != 0 && path_len > 0 && path_len <= UNIX_PATH_MAX as u32 {
            let dst = addr_of_mut!((*e).path) as *mut c_void;
            if generated::bpf_probe_read_kernel(dst, path_len, path as *const c_void) == 0 {
                n = path_len;
            }
        }
        write_volatile(addr_of_mut!((*e).path_len), n as u8);
    }
    entry.submit(0);
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
    what: u8,
) {
    // Diagnostics only (off unless kz runs with debug logging); the ring event is the record.
    debug!(
        ctx,
        "refused {:i} port {} proto {} reason {} cgroup {}", *addr, port, proto, why, cgroup_id
    );
    submit(
        &Ev {
            cgroup_id,
            guard_id,
            ring,
            addr: *addr,
            port,
            family: if v4 { AF_INET } else { AF_INET6 },
            proto,
            why,
            op: what,
        },
        0,
        0,
    );
}

/// For a cgroup without a policy of its own (or any cgroup, for sock_create): reports to the
/// guard, the cgroup itself when it has a policy, else its nearest ancestor with one (a process
/// that moved itself into a child cgroup of a guarded one is refused everything, and its guard
/// must hear of it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_block_to_guard<C: EbpfContext>(
    ctx: &C,
    cgroup_id: u64,
    addr: &[u8; 16],
    v4: bool,
    port: u16,
    proto: u8,
    why: u8,
    what: u8,
) {
    let guard = guard_of(cgroup_id);
    // SAFETY: the value is plain data copied out at once.
    if let Some(policy) = unsafe { KZ_POLICY.get(&guard) } {
        let ring = policy.ring;
        emit_block(
            ctx, cgroup_id, guard, ring, addr, v4, port, proto, why, what,
        );
    }
}

/// `cg` when it has a policy, else its nearest ancestor that has one, else 0. Walks from the
/// root down and stops below the task's own level, so a task outside kz's cgroups (the LSM
/// programs run for every task) costs one lookup per level it actually has.
#[inline(never)]
fn guard_of(cg: u64) -> u64 {
    // SAFETY: map values are only tested for presence.
    if unsafe { KZ_POLICY.get(&cg) }.is_some() {
        return cg;
    }
    let mut found = 0;
    let mut level = 0;
    while level <= MAX_CGROUP_LEVEL {
        // SAFETY: no preconditions; 0 when the task's cgroup is shallower than `level`.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if unsafe { KZ_POLICY.get(&id) }.is_some() {
            found = id;
        }
        level += 1;
    }
    found
}

/// The cgroup whose policy governs the current task, and that policy: `cg` itself when it has
/// one; else its nearest guarded ancestor when that ancestor's policy covers its subtree
/// ([`flags::INHERIT`]: a Kubernetes pod's cgroup, whose containers are child cgroups the
/// runtime makes, also after kz attached); else none (a cgroup an agent nested below one of
/// kz's own sandboxes is refused everything). Every per-cgroup table (tries, ports, allowed IPs,
/// unix rules) and the proxy's record use the returned id, so a container is the pod.
#[inline(always)]
fn policy_for(cg: u64) -> Option<(u64, CgroupPolicy)> {
    // SAFETY: the value is plain data copied out at once.
    if let Some(p) = unsafe { KZ_POLICY.get(&cg) } {
        return Some((cg, *p));
    }
    let guard = guard_of(cg);
    if guard == 0 {
        return None;
    }
    // SAFETY: as above.
    match unsafe { KZ_POLICY.get(&guard) } {
        Some(p) if p.flags & flags::INHERIT != 0 => Some((guard, *p)),
        _ => None,
    }
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

/// (TCP?, the socket's protocol number, the protocol as events name it).
#[inline(always)]
fn sock_proto(sa: *mut bpf_sock_addr) -> (bool, u32, u8) {
    // SAFETY: protocol and type are readable 4-byte context fields.
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
    (tcp, protocol, proto)
}

/// The policy decision shared by connect and sendmsg, both families. Records the original
/// destination (TCP: by socket cookie for sock_ops; DNS: for recvmsg) when it redirects.
#[inline(always)]
fn decide(ctx: &SockAddrContext, addr: &[u8; 16], v4: bool, port: u16, hook: Hook) -> Verdict {
    let sa = ctx.sock_addr;
    let what = match hook {
        Hook::Connect => op::CONNECT,
        Hook::Sendmsg => op::SENDMSG,
        Hook::Bind => op::BIND,
    };
    if own_socket(ctx) {
        return Verdict::Pass;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let (tcp, protocol, proto) = sock_proto(sa);
    // `guard`: the cgroup whose policy applies (`cg`, or the pod `cg` is a container of).
    let Some((guard, policy)) = policy_for(cg) else {
        emit_block_to_guard(ctx, cg, addr, v4, port, proto, reason::NO_POLICY, what);
        return Verdict::Deny;
    };
    let deny = |why: u8| {
        emit_block(
            ctx,
            cg,
            guard,
            policy.ring,
            addr,
            v4,
            port,
            proto,
            why,
            what,
        );
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
        // The proxy finds the session by this id: the sandbox's, not a container's.
        cgroup_id: guard,
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
    if in_trie(guard, addr, v4, false) {
        return deny(reason::DENY_CIDR);
    }
    let loopback = is_loopback(addr, v4);
    if loopback && policy.flags & flags::LOOPBACK_DIRECT != 0 {
        return Verdict::Pass;
    }
    if policy.flags & flags::REQUIRE_ALLOW != 0
        && !in_trie(guard, addr, v4, true)
        && !in_allow_map(guard, addr)
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
                cgroup_id: guard,
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
    let w = user_ip6(sa);
    // SAFETY: user_port is a 4-byte context field of connect6/sendmsg6.
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    let v4 = is_mapped(&w);
    match decide(ctx, &words_to_bytes(w), v4, port, hook) {
        Verdict::Pass => ALLOW,
        Verdict::Deny => REJECT,
        Verdict::Redirect(to) => {
            set_loopback6(sa, v4);
            // SAFETY: user_port is writable in connect6/sendmsg6.
            wr(
                unsafe { addr_of_mut!((*sa).user_port) },
                u32::from(to.to_be()),
            );
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
    let (_, policy) = policy_for(cg)?;
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

enum BindVerdict {
    Pass,
    Deny,
    /// Rewrite the wildcard address to loopback (the port stays).
    Loopback,
}

/// Inbound: in a guarded cgroup (without `LISTEN_ANY`) servers are reachable from this machine
/// only. TCP on the wildcard address is moved to loopback, so dev servers keep working on
/// localhost; TCP on any other non-loopback address is refused. Datagram sockets bind to pick
/// a source address or port too: port 0 (the kernel picks a client port) is fine anywhere, a
/// fixed port outside loopback is a server and refused (rewriting it to loopback would leave a
/// client unable to send from it).
#[inline(always)]
fn decide_bind(ctx: &SockAddrContext, addr: &[u8; 16], v4: bool, port: u16) -> BindVerdict {
    let sa = ctx.sock_addr;
    if own_socket(ctx) {
        return BindVerdict::Pass;
    }
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let (tcp, _, proto) = sock_proto(sa);
    let Some((guard, policy)) = policy_for(cg) else {
        emit_block_to_guard(ctx, cg, addr, v4, port, proto, reason::NO_POLICY, op::BIND);
        return BindVerdict::Deny;
    };
    if policy.flags & flags::LISTEN_ANY != 0 || is_loopback(addr, v4) {
        return BindVerdict::Pass;
    }
    let wildcard = if v4 {
        tail4(addr) == [0; 4]
    } else {
        addr.iter().all(|b| *b == 0)
    };
    if tcp && wildcard {
        return BindVerdict::Loopback;
    }
    if !tcp && port == 0 {
        return BindVerdict::Pass;
    }
    emit_block(
        ctx,
        cg,
        guard,
        policy.ring,
        addr,
        v4,
        port,
        proto,
        reason::BIND_DENIED,
        op::BIND,
    );
    BindVerdict::Deny
}

#[cgroup_sock_addr(bind4)]
pub fn kz_bind4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are 4-byte context fields of bind4.
    let ip = rd(unsafe { addr_of!((*sa).user_ip4) });
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    match decide_bind(&ctx, &mapped4(ip), true, port) {
        BindVerdict::Pass => ALLOW,
        BindVerdict::Deny => REJECT,
        BindVerdict::Loopback => {
            // SAFETY: user_ip4 is writable in bind4.
            wr(unsafe { addr_of_mut!((*sa).user_ip4) }, LOCALHOST4);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(bind6)]
pub fn kz_bind6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let w = user_ip6(sa);
    // SAFETY: user_port is a 4-byte context field of bind6.
    let port = u16::from_be(rd(unsafe { addr_of!((*sa).user_port) }) as u16);
    // v4-mapped addresses take the v4 rules (::ffff:0.0.0.0 is the v4 wildcard).
    let v4 = is_mapped(&w);
    match decide_bind(&ctx, &words_to_bytes(w), v4, port) {
        BindVerdict::Pass => ALLOW,
        BindVerdict::Deny => REJECT,
        BindVerdict::Loopback => {
            set_loopback6(sa, v4);
            ALLOW
        }
    }
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
    // user_ip6/user_port are the datagram's source in recvmsg6.
    let w = user_ip6(sa);
    // SAFETY: user_port is a 4-byte context field of recvmsg6.
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

/// listen() on a socket that was never bound makes the kernel bind it to the wildcard address
/// itself, and no bind hook runs for that. Such a listener (and any other one outside loopback
/// that got past the bind hooks) is bound to the loopback device instead: it then accepts only
/// connections arriving over loopback, i.e. from this machine, like a rewritten bind. The
/// listen() cannot be refused from here, only confined.
#[inline(always)]
fn confine_listener(ctx: &SockOpsContext, family: u32, lip4: u32, lip6: [u32; 4]) {
    // SAFETY: bpf_get_current_cgroup_id has no preconditions (listen() runs in the agent).
    let cg = unsafe { bpf_get_current_cgroup_id() };
    let guard = guard_of(cg);
    // SAFETY: the value is plain data copied out at once.
    let Some(policy) = (unsafe { KZ_POLICY.get(&guard) }).copied() else {
        return;
    };
    if policy.flags & flags::LISTEN_ANY != 0 {
        return;
    }
    let addr = if u32::from(AF_INET) == family {
        mapped4(lip4)
    } else {
        words_to_bytes(lip6)
    };
    let v4 = u32::from(AF_INET) == family || is_mapped(&lip6);
    if is_loopback(&addr, v4) {
        return;
    }
    let mut ifindex: i32 = LOOPBACK_IFINDEX;
    // SAFETY: the sock_ops context of a locked listener, as bpf_setsockopt requires; optval
    // points at an int on the stack.
    unsafe {
        generated::bpf_setsockopt(
            ctx.ops as *mut c_void,
            SOL_SOCKET,
            SO_BINDTOIFINDEX,
            addr_of_mut!(ifindex) as *mut c_void,
            4,
        );
    }
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
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        confine_listener(&ctx, family, lip4, lip6);
        return 1;
    }
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
        op::CREATE,
    );
    REJECT
}

// Unix sockets (cgroup/connect_unix and cgroup/sendmsg_unix, Linux >= 6.7). These hooks run
// before the kernel resolves the path, so they see the `sun_path` the agent passed, nothing
// more: rules are matched on that string, which is sound only with the restrictions below
// (see docs/architecture.md): relative paths and paths with `.`, `..` or empty components are
// refused outright (they could name any socket), and an allowed path or directory must be one
// the agent cannot write (it could plant a symlink there). Abstract names have no aliases.
//
// aya 0.14 knows neither attach type: these two carry placeholder sections (connect4 and
// sendmsg4) and user space loads them by hand with the unix attach types; they read nothing of
// the context but the kernel's own `struct bpf_sock_addr_kern` (the sockaddr, already copied
// into the kernel), through bpf_probe_read_kernel.

/// A kernel value at `addr` (0 when unreadable).
#[inline(always)]
fn kread_u64(addr: u64) -> u64 {
    // SAFETY: bpf_probe_read_kernel copes with any address (an unreadable one is an error).
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn kread_u32(addr: u64) -> u32 {
    // SAFETY: as in `kread_u64`.
    unsafe { bpf_probe_read_kernel(addr as *const u32) }.unwrap_or(0)
}

/// Whether a pathname (NUL padded; the kernel reads it up to its first NUL) is absolute and
/// plain: no `.`, `..` or empty components. Every byte is loaded afresh (volatile): the
/// verifier then sees the same state at each turn of the loop, whichever way the comparisons
/// went, instead of one per combination of byte values it has narrowed.
#[inline(always)]
fn plain_absolute(p: &[u8; UNIX_KEY_PATH]) -> bool {
    let at = |i: usize| {
        // SAFETY: `i` is below UNIX_KEY_PATH (checked by the callers below).
        unsafe { read_volatile(p.as_ptr().add(i)) }
    };
    if at(0) != b'/' {
        return false;
    }
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        let here = at(i);
        if here == 0 {
            return true;
        }
        if here == b'/' {
            // i + 3 < UNIX_PATH_MAX + 3 <= UNIX_KEY_PATH: past sun_path the buffer is NULs.
            let a = at(i + 1);
            if a == b'/' {
                return false;
            }
            if a == b'.' {
                let b = at(i + 2);
                if b == b'/' || b == 0 {
                    return false;
                }
                if b == b'.' {
                    let c = at(i + 3);
                    if c == b'/' || c == 0 {
                        return false;
                    }
                }
            }
        }
        i += 1;
    }
    true
}

/// The verdict for a connect (stream, seqpacket, datagram) or an addressed send (datagram) to
/// a unix socket.
#[inline(always)]
fn unix_check(ctx: &SockAddrContext, what: u8) -> i32 {
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // The kernel's context structure: the address the agent passed, already in kernel memory.
    let kctx = ctx.sock_addr as u64;
    let uaddr = kread_u64(kctx + u64::from(SOCK_ADDR_KERN_UADDR));
    let len = kread_u32(kctx + u64::from(SOCK_ADDR_KERN_UADDRLEN));
    // sun_path bytes: the address minus its 2-byte family. Only these: what lies beyond them in
    // the kernel's buffer is not part of the address (the kernel ends the path there).
    let n = if len > 2 { len - 2 } else { 0 };
    let n = if n > UNIX_PATH_MAX as u32 {
        UNIX_PATH_MAX as u32
    } else {
        n
    };
    let Some(key) = KZ_PATH_SCRATCH.get_ptr_mut(0) else {
        return REJECT;
    };
    // SAFETY: this CPU's scratch slot, used by one program run at a time.
    let key = unsafe { &mut *key };
    key.data.path = [0; UNIX_KEY_PATH];
    if uaddr == 0
        || n == 0
        // SAFETY: reads `n` (1 to 108) bytes into the 128-byte path.
        || unsafe {
            generated::bpf_probe_read_kernel(
                key.data.path.as_mut_ptr() as *mut c_void,
                n & 0x7f,
                (uaddr + 2) as *const c_void,
            )
        } != 0
    {
        return REJECT;
    }
    let Some((guard, policy)) = policy_for(cg) else {
        // A process that moved itself into a child cgroup is refused everything.
        let guard = guard_of(cg);
        // SAFETY: as above.
        if let Some(p) = unsafe { KZ_POLICY.get(&guard) } {
            unix_event(cg, guard, p.ring, reason::NO_POLICY, what, uaddr, n);
        }
        return REJECT;
    };
    if policy.flags & flags::UNIX_ANY != 0 {
        return ALLOW;
    }
    // Bytes after an embedded NUL need no trimming: no rule has a NUL but at its very end (an
    // exact path's terminator), so a rule matches these bytes exactly when it matches the
    // path the kernel will read.
    let allowed = if key.data.path[0] == 0 {
        unix_abstract_allowed(guard, uaddr, n)
    } else if plain_absolute(&key.data.path) {
        key.prefix_len = 64 + 8 * UNIX_KEY_PATH as u32;
        key.data.cgroup_id = guard.to_be_bytes();
        // SAFETY: the value is plain data read at once.
        matches!(unsafe { KZ_UNIX_PATHS.get(key) }, Some(v) if *v == UNIX_ALLOW)
    } else {
        false
    };
    if allowed {
        return ALLOW;
    }
    unix_event(cg, guard, policy.ring, reason::UNIX_DENIED, what, uaddr, n);
    REJECT
}

/// Whether the abstract name in the sockaddr at `uaddr` (`n` bytes of sun_path, the first a
/// NUL) is allowed for `cg`.
#[inline(always)]
fn unix_abstract_allowed(cg: u64, uaddr: u64, n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let name_len = n - 1;
    let Some(key) = KZ_ABSTRACT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot, used by one program run at a time.
    let key = unsafe { &mut *key };
    key.cgroup_id = cg;
    key.len = name_len;
    key.name = [0; UNIX_PATH_MAX];
    // Through the stack, so the bounds checked right here are the ones the verifier sees on
    // the size register (LLVM otherwise folds them into a signed range it rejects).
    // SAFETY: a local.
    let size = unsafe { read_volatile(&name_len) };
    if size == 0 || size > (UNIX_PATH_MAX - 1) as u32 {
        return false;
    }
    // SAFETY: reads `size` (1 to 107) bytes into the 108-byte name.
    let read = unsafe {
        generated::bpf_probe_read_kernel(
            key.name.as_mut_ptr() as *mut c_void,
            size,
            (uaddr + 3) as *const c_void,
        )
    };
    // SAFETY: presence test only.
    read == 0 && unsafe { KZ_UNIX_ABSTRACT.get(key) }.is_some()
}

/// A refused unix connect/send, with the `sun_path` as the agent passed it.
#[inline(always)]
fn unix_event(cg: u64, guard: u64, ring: u32, why: u8, what: u8, uaddr: u64, path_len: u32) {
    submit(
        &Ev {
            cgroup_id: cg,
            guard_id: guard,
            ring,
            addr: [0; 16],
            port: 0,
            family: AF_UNIX,
            proto: 0,
            why,
            op: what,
        },
        if uaddr == 0 { 0 } else { uaddr + 2 },
        path_len,
    );
}

/// cgroup/connect_unix (placeholder section, see above): connect() of every unix socket type.
#[cgroup_sock_addr(connect4)]
pub fn kz_unix_connect(ctx: SockAddrContext) -> i32 {
    unix_check(&ctx, op::UNIX_CONNECT)
}

/// cgroup/sendmsg_unix (placeholder section, see above): a datagram sent with an address.
#[cgroup_sock_addr(sendmsg4)]
pub fn kz_unix_sendmsg(ctx: SockAddrContext) -> i32 {
    unix_check(&ctx, op::UNIX_SEND)
}
