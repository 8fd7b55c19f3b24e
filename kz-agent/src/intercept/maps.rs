//! Policy and table types, and their translation into kernel map entries (`kz_common`).

use super::InterceptError;
use aya::maps::{HashMap, MapData};
use kz_common::{AF_INET6, IpKey, Lpm4, Lpm6, PeerKey, flags};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Which TCP connections go to the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TcpRedirect {
    /// Every TCP connect (the `kz run --blind` setting).
    #[default]
    All,
    /// Only these destination ports; other ports connect directly (after the allow/deny checks).
    Ports(Vec<u16>),
}

/// What happens to native IPv6 destinations (v4-mapped ones always take the IPv4 path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// Redirected to `[::1]:<proxy_port>` (the proxy must listen there too).
    Intercept,
    /// Refused with EPERM.
    #[default]
    Deny,
}

/// One cgroup's policy. The default refuses everything: no proxy, no DNS port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// TCP redirect target `127.0.0.1:<proxy_port>`; 0 = none (redirected connects fail).
    pub proxy_port: u16,
    /// UDP/53 redirect target `127.0.0.1:<dns_port>`; 0 = none (DNS fails).
    pub dns_port: u16,
    pub tcp: TcpRedirect,
    pub ipv6: Ipv6Mode,
    /// Destinations must match [`Policy::allow`] or an [`AllowMap`] entry, else EPERM.
    pub require_allow: bool,
    /// UDP to ports other than 53 is let through (after the checks) instead of refused.
    pub allow_udp: bool,
    /// Loopback destinations connect directly instead of being redirected.
    pub loopback_direct: bool,
    pub allow: Vec<Cidr>,
    /// Always refused with EPERM, before anything else (except DNS, which always goes to kz).
    pub deny: Vec<Cidr>,
}

impl Policy {
    /// The kernel form; `ring` is the guarding instance's slot in `KZ_EVENT_RINGS`.
    pub(crate) fn kernel(&self, ring: u32) -> kz_common::CgroupPolicy {
        let mut f = 0;
        if self.tcp == TcpRedirect::All {
            f |= flags::ALL_TCP;
        }
        if self.ipv6 == Ipv6Mode::Intercept {
            f |= flags::V6_INTERCEPT;
        }
        if self.require_allow {
            f |= flags::REQUIRE_ALLOW;
        }
        if self.allow_udp {
            f |= flags::ALLOW_UDP;
        }
        if self.loopback_direct {
            f |= flags::LOOPBACK_DIRECT;
        }
        kz_common::CgroupPolicy {
            proxy_port: self.proxy_port,
            dns_port: self.dns_port,
            flags: f,
            ring,
            _pad: 0,
        }
    }

    pub(crate) fn ports(&self) -> &[u16] {
        match &self.tcp {
            TcpRedirect::All => &[],
            TcpRedirect::Ports(p) => p,
        }
    }
}

/// An IP network. Host bits are cleared; v4-mapped IPv6 networks become IPv4 ones (the kernel
/// checks v4-mapped destinations on the IPv4 path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, InterceptError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                prefix - 96,
            ),
            other => (other, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(InterceptError::BadCidr(format!("{addr}/{prefix}")));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr::new(addr, prefix).unwrap_or(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(ip, self.prefix)
            .map(|c| c.addr == self.addr)
            .unwrap_or(false)
    }
}

impl FromStr for Cidr {
    type Err = InterceptError;
    fn from_str(s: &str) -> Result<Cidr, InterceptError> {
        let bad = || InterceptError::BadCidr(s.to_owned());
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        match p {
            None => Ok(Cidr::host(addr)),
            Some(p) => {
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                Cidr::new(addr, prefix).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A kernel LPM-trie key for a cidr within a cgroup.
pub(crate) enum LpmKey {
    V4(u32, Lpm4),
    V6(u32, Lpm6),
}

pub(crate) fn lpm_key(cgroup_id: u64, cidr: &Cidr) -> LpmKey {
    let cg = cgroup_id.to_be_bytes();
    match cidr.addr {
        IpAddr::V4(a) => LpmKey::V4(
            64 + u32::from(cidr.prefix),
            Lpm4 {
                cgroup_id: cg,
                addr: a.octets(),
            },
        ),
        IpAddr::V6(a) => LpmKey::V6(
            64 + u32::from(cidr.prefix),
            Lpm6 {
                cgroup_id: cg,
                addr: a.octets(),
            },
        ),
    }
}

/// 16 bytes, v4-mapped for IPv4: the kernel's address form in every key.
pub(crate) fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn ip_from16(bytes: [u8; 16], family: u16) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) if family != AF_INET6 => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

/// The destination a process asked for before it was redirected to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 for v4 destinations, also when the client used a v4-mapped IPv6 address.
    pub dest: SocketAddr,
    /// Process id that called connect().
    pub tgid: u32,
    /// Its cgroup id.
    pub cgroup_id: u64,
}

impl From<kz_common::OrigDst> for OrigDst {
    fn from(o: kz_common::OrigDst) -> OrigDst {
        OrigDst {
            dest: SocketAddr::new(ip_from16(o.addr, o.family), o.port),
            tgid: o.tgid,
            cgroup_id: o.cgroup_id,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves a map handle that is still valid.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The proxy's view of redirected connections: original destination by client address.
/// Cheap to clone and share between tasks.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<Mutex<HashMap<MapData, PeerKey, kz_common::OrigDst>>>,
}

impl OrigDstTable {
    pub(crate) fn new(map: HashMap<MapData, PeerKey, kz_common::OrigDst>) -> OrigDstTable {
        OrigDstTable {
            map: Arc::new(Mutex::new(map)),
        }
    }

    fn key(peer: SocketAddr) -> PeerKey {
        PeerKey {
            addr: addr16(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        }
    }

    /// The original destination of the connection whose client end is `peer` (the accepted
    /// socket's `peer_addr()`), if it was redirected by kz.
    pub fn lookup(&self, peer: SocketAddr) -> Option<OrigDst> {
        lock(&self.map)
            .get(&Self::key(peer), 0)
            .ok()
            .map(OrigDst::from)
    }

    /// Like [`OrigDstTable::lookup`] and removes the entry (the client port may be reused).
    pub fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        let key = Self::key(peer);
        let mut map = lock(&self.map);
        let found = map.get(&key, 0).ok().map(OrigDst::from);
        if found.is_some() {
            let _ = map.remove(&key);
        }
        found
    }
}

/// IPs a cgroup may reach, with expiry; kz's DNS resolver fills it for names it allows.
/// Cheap to clone and share between tasks.
#[derive(Clone)]
pub struct AllowMap {
    map: Arc<Mutex<HashMap<MapData, IpKey, u64>>>,
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

impl AllowMap {
    pub(crate) fn new(map: HashMap<MapData, IpKey, u64>) -> AllowMap {
        AllowMap {
            map: Arc::new(Mutex::new(map)),
        }
    }

    /// Lets `cgroup_id` reach `ip` for `ttl` (None = until revoked or the cgroup is removed).
    /// Only matters under [`Policy::require_allow`].
    pub fn allow_ip(
        &self,
        cgroup_id: u64,
        ip: IpAddr,
        ttl: Option<Duration>,
    ) -> Result<(), InterceptError> {
        let expiry = match ttl {
            None => u64::MAX,
            Some(t) => {
                monotonic_ns().saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX))
            }
        };
        let key = IpKey {
            cgroup_id,
            addr: addr16(ip),
        };
        lock(&self.map)
            .insert(key, expiry, 0)
            .map_err(|e| InterceptError::Map {
                name: kz_common::map_names::ALLOWED_IPS,
                detail: format!(
                    "{e} (the map holds 65536 entries across all cgroups of all kz instances)"
                ),
            })
    }

    pub fn revoke_ip(&self, cgroup_id: u64, ip: IpAddr) {
        let key = IpKey {
            cgroup_id,
            addr: addr16(ip),
        };
        let _ = lock(&self.map).remove(&key);
    }

    /// Removes every entry of `cgroup_id`, and the expired entries of the cgroups in
    /// `expired_of`. Only ever cgroups of the caller: the map is shared with other kz instances,
    /// which may be renewing their own entries at this very moment.
    pub(crate) fn purge(&self, cgroup_id: u64, expired_of: &[u64]) {
        let now = monotonic_ns();
        let mut map = lock(&self.map);
        let doomed: Vec<IpKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, exp)| {
                k.cgroup_id == cgroup_id || (*exp <= now && expired_of.contains(&k.cgroup_id))
            })
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            let _ = map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_normalise_and_reject_garbage() {
        let c: Cidr = "10.1.2.3/8".parse().expect("cidr");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.200.0.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let h: Cidr = "192.0.2.7".parse().expect("host");
        assert_eq!(h.to_string(), "192.0.2.7/32");
        let m: Cidr = "::ffff:10.0.0.0/104".parse().expect("mapped");
        assert_eq!(m.to_string(), "10.0.0.0/8");
        let v6: Cidr = "fd00::1/8".parse().expect("v6");
        assert_eq!(v6.to_string(), "fd00::/8");
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains("1.2.3.4".parse().expect("ip")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/-1",
            "1.2.3.4/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn policy_flags_follow_the_fields() {
        let p = Policy {
            proxy_port: 1,
            dns_port: 2,
            tcp: TcpRedirect::Ports(vec![443]),
            ipv6: Ipv6Mode::Intercept,
            require_allow: true,
            ..Policy::default()
        };
        let k = p.kernel(7);
        assert_eq!((k.proxy_port, k.dns_port, k.ring), (1, 2, 7));
        assert_eq!(k.flags, flags::V6_INTERCEPT | flags::REQUIRE_ALLOW);
        assert_eq!(Policy::default().kernel(0).flags, flags::ALL_TCP);
    }

    #[test]
    fn orig_dst_maps_v4_mapped_back_to_v4() {
        let o = kz_common::OrigDst {
            addr: addr16("10.9.8.7".parse().expect("ip")),
            port: 443,
            family: kz_common::AF_INET,
            tgid: 5,
            cgroup_id: 6,
        };
        assert_eq!(OrigDst::from(o).dest, "10.9.8.7:443".parse().expect("sa"));
    }
}
