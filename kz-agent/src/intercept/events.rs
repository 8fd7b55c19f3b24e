//! Block events: every connect/sendmsg the kernel refused in the instance's cgroups, from the
//! instance's ring buffer (its slot of `KZ_EVENT_RINGS`, see [`super::shared`]).

use super::InterceptError;
use aya::maps::{MapData, RingBuf};
use kz_common::{AF_INET6, AF_UNIX, PROTO_TCP, PROTO_UDP, UNIX_PATH_MAX, op, reason};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;

/// The cgroups an instance guards (ids are never reused, so this only grows). Shared between
/// the interceptor, which adds each cgroup before attaching it, and the event reader.
pub(crate) type Guards = Arc<Mutex<BTreeSet<u64>>>;

/// Why the kernel refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    DenyCidr,
    NotAllowed,
    Ipv6Denied,
    UdpDenied,
    NoPolicy,
    NoTarget,
    RawSocketDenied,
    BindDenied,
    UnixDenied,
    Unknown(u8),
}

impl BlockReason {
    fn from_raw(r: u8) -> BlockReason {
        match r {
            reason::DENY_CIDR => BlockReason::DenyCidr,
            reason::NOT_ALLOWED => BlockReason::NotAllowed,
            reason::V6_DENIED => BlockReason::Ipv6Denied,
            reason::UDP_DENIED => BlockReason::UdpDenied,
            reason::NO_POLICY => BlockReason::NoPolicy,
            reason::NO_TARGET => BlockReason::NoTarget,
            reason::RAW_DENIED => BlockReason::RawSocketDenied,
            reason::BIND_DENIED => BlockReason::BindDenied,
            reason::UNIX_DENIED => BlockReason::UnixDenied,
            other => BlockReason::Unknown(other),
        }
    }
}

/// One refused connect/sendmsg/bind, raw socket, or unix-socket connect/send.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Block {
    /// The calling task's cgroup.
    pub cgroup_id: u64,
    /// The guarded cgroup whose policy applied: `cgroup_id`, or the ancestor of a nested cgroup.
    pub guard_id: u64,
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    /// Task name (at most 15 bytes, as the kernel keeps it).
    pub comm: String,
    /// The destination (connect/sendmsg) or the local address (bind); `0.0.0.0:0` for unix
    /// sockets.
    pub dest: SocketAddr,
    /// "tcp", "udp", "icmp", "icmpv6", "unix" or "other".
    pub proto: &'static str,
    /// "connect", "sendmsg", "bind", "create" (raw sockets), "unix_connect" (stream/seqpacket)
    /// or "unix_send" (datagram).
    pub op: &'static str,
    pub reason: BlockReason,
    /// Unix sockets: the peer's address as its server bound it (`@name` for an abstract one).
    pub path: Option<String>,
}

impl Block {
    pub(crate) fn from_raw(e: &kz_common::BlockEvent) -> Block {
        let end = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
        let unix = e.family == AF_UNIX;
        let path = &e.path[..usize::from(e.path_len).min(UNIX_PATH_MAX)];
        let path = match path.split_first() {
            _ if !unix => None,
            None => Some(String::new()),
            // A leading NUL: an abstract name (written @name, as in `[blind] unix_sockets`).
            Some((0, name)) => Some(format!("@{}", String::from_utf8_lossy(name))),
            Some(_) => {
                let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
                Some(String::from_utf8_lossy(&path[..end]).into_owned())
            }
        };
        let v6 = Ipv6Addr::from(e.addr);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) if e.family != AF_INET6 => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        Block {
            cgroup_id: e.cgroup_id,
            guard_id: e.guard_id,
            tgid: e.tgid,
            pid: e.pid,
            comm: String::from_utf8_lossy(&e.comm[..end]).into_owned(),
            dest: SocketAddr::new(ip, e.port),
            proto: match e.proto {
                _ if unix => "unix",
                PROTO_TCP => "tcp",
                PROTO_UDP => "udp",
                1 => "icmp",
                58 => "icmpv6",
                255 => "raw",
                _ => "other",
            },
            op: match e.op {
                op::CONNECT => "connect",
                op::SENDMSG => "sendmsg",
                op::BIND => "bind",
                op::CREATE => "create",
                op::UNIX_CONNECT => "unix_connect",
                op::UNIX_SEND => "unix_send",
                _ => "other",
            },
            reason: BlockReason::from_raw(e.reason),
            path,
        }
    }
}

/// The stream of [`Block`]s of one instance's cgroups (and of cgroups nested below them).
/// Events are produced whether or not anyone reads; when the ring (256 KiB, ~3600 events) is full
/// the kernel drops new ones (the refusal itself still happens).
pub struct BlockEvents {
    ring: AsyncFd<RingBuf<MapData>>,
    guards: Guards,
    /// The claim on the ring's slot: no other instance reads it while this reader exists.
    _slot: Arc<nix::fcntl::Flock<std::fs::File>>,
}

impl BlockEvents {
    pub(crate) fn new(
        ring: RingBuf<MapData>,
        guards: Guards,
        slot: Arc<nix::fcntl::Flock<std::fs::File>>,
    ) -> Result<BlockEvents, InterceptError> {
        // SAFETY: the RingBuf owns its map fd for its whole life and `as_raw_fd` always returns
        // that same fd; the AsyncFd owns the RingBuf, so the fd outlives the registration.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| InterceptError::io("watch", "the block-event ring buffer", e.into()))?;
        Ok(BlockEvents {
            ring,
            guards,
            _slot: slot,
        })
    }

    /// An event already in the ring, without waiting.
    pub fn try_next(&mut self) -> Option<Block> {
        loop {
            let item = self.ring.get_mut().next()?;
            if let Some(b) = decode(&item).filter(|b| ours(&self.guards, b)) {
                return Some(b);
            }
        }
    }

    /// Waits for the next event.
    pub async fn next(&mut self) -> Result<Block, InterceptError> {
        loop {
            if let Some(b) = self.try_next() {
                return Ok(b);
            }
            let mut ready = self
                .ring
                .readable_mut()
                .await
                .map_err(|e| InterceptError::io("wait on", "the block-event ring buffer", e))?;
            let got = ready.get_inner_mut().next().map(|item| decode(&item));
            match got {
                Some(Some(b)) if ours(&self.guards, &b) => return Ok(b),
                Some(_) => {}
                None => ready.clear_ready(),
            }
        }
    }
}

/// Whether the event concerns a cgroup of this instance. A ring slot is reused by later
/// instances: a dead instance's cgroup that could not be cleaned up (still cut off, its policy
/// naming this slot) may still report here, and is not ours to report.
fn ours(guards: &Guards, b: &Block) -> bool {
    guards
        .lock()
        .map(|g| g.contains(&b.guard_id))
        .unwrap_or(false)
}

fn decode(bytes: &[u8]) -> Option<Block> {
    let size = std::mem::size_of::<kz_common::BlockEvent>();
    if bytes.len() < size {
        tracing::warn!(len = bytes.len(), "short block event ignored");
        return None;
    }
    let mut raw = kz_common::BlockEvent::default();
    // Field-by-field decoding keeps this safe code; the layout is fixed by kz_common.
    let u32_at =
        |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    raw.cgroup_id = u64::from_ne_bytes(bytes[0..8].try_into().ok()?);
    raw.pid = u32_at(8);
    raw.tgid = u32_at(12);
    raw.comm.copy_from_slice(&bytes[16..32]);
    raw.addr.copy_from_slice(&bytes[32..48]);
    raw.port = u16::from_ne_bytes([bytes[48], bytes[49]]);
    raw.family = u16::from_ne_bytes([bytes[50], bytes[51]]);
    raw.proto = bytes[52];
    raw.reason = bytes[53];
    raw.op = bytes[54];
    raw.path_len = bytes[55];
    raw.guard_id = u64::from_ne_bytes(bytes[56..64].try_into().ok()?);
    raw.path.copy_from_slice(&bytes[64..64 + UNIX_PATH_MAX]);
    Some(Block::from_raw(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_raw_event_and_rejects_short_ones() {
        let mut ev = kz_common::BlockEvent {
            cgroup_id: 0x1122_3344_5566_7788,
            pid: 7,
            tgid: 6,
            guard_id: 0x99,
            ..Default::default()
        };
        ev.comm[..4].copy_from_slice(b"curl");
        ev.addr = std::net::Ipv4Addr::new(10, 1, 2, 3)
            .to_ipv6_mapped()
            .octets();
        ev.port = 443;
        ev.family = kz_common::AF_INET;
        ev.proto = PROTO_TCP;
        ev.reason = reason::DENY_CIDR;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&ev.cgroup_id.to_ne_bytes());
        bytes.extend_from_slice(&ev.pid.to_ne_bytes());
        bytes.extend_from_slice(&ev.tgid.to_ne_bytes());
        bytes.extend_from_slice(&ev.comm);
        bytes.extend_from_slice(&ev.addr);
        bytes.extend_from_slice(&ev.port.to_ne_bytes());
        bytes.extend_from_slice(&ev.family.to_ne_bytes());
        bytes.extend_from_slice(&[ev.proto, ev.reason, 0, 0]);
        bytes.extend_from_slice(&ev.guard_id.to_ne_bytes());
        bytes.extend_from_slice(&ev.path);
        bytes.extend_from_slice(&[0; 4]);
        assert_eq!(bytes.len(), std::mem::size_of::<kz_common::BlockEvent>());
        let b = decode(&bytes).expect("decodes");
        assert_eq!(b, Block::from_raw(&ev));
        assert_eq!(b.comm, "curl");
        assert_eq!(b.dest, "10.1.2.3:443".parse().expect("sa"));
        assert_eq!(b.reason, BlockReason::DenyCidr);
        assert_eq!((b.tgid, b.pid, b.proto), (6, 7, "tcp"));
        assert_eq!(b.guard_id, 0x99);
        assert_eq!((b.op, b.path.as_deref()), ("connect", None));
        assert!(decode(&bytes[..20]).is_none());

        // A unix event: the path, or @name for an abstract socket (its leading NUL).
        let mut u = kz_common::BlockEvent {
            family: AF_UNIX,
            op: op::UNIX_CONNECT,
            reason: reason::UNIX_DENIED,
            ..Default::default()
        };
        let p = b"/run/docker.sock\0";
        u.path[..p.len()].copy_from_slice(p);
        u.path_len = p.len() as u8;
        let b = Block::from_raw(&u);
        assert_eq!((b.proto, b.op), ("unix", "unix_connect"));
        assert_eq!(b.path.as_deref(), Some("/run/docker.sock"));
        assert_eq!(b.reason, BlockReason::UnixDenied);
        u.path[..4].copy_from_slice(b"\0abc");
        u.path_len = 4;
        assert_eq!(Block::from_raw(&u).path.as_deref(), Some("@abc"));
    }
}
