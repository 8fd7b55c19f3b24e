//! SSRF guard for the `fetch` tool: which destinations kz will carry a credential to.
//!
//! The check runs on the addresses a name resolves to, and the caller connects to exactly the
//! address that passed (never re-resolving), so a DNS answer that changes between check and
//! connect (rebinding) cannot move the request onto an internal host.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Names refused before any lookup: they exist to reach the local host or a cloud metadata
/// service, whatever they resolve to on a given machine.
const BLOCKED_NAMES: &[&str] = &[
    "localhost",
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, ECS task metadata, Alibaba, AWS IPv6).
/// Refused even when an allow-listed private range contains them: no test upstream or internal
/// API ever needs to receive a credential there, and stealing instance credentials is the
/// classic SSRF payoff.
const METADATA_ADDRS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error(
        "destination {addr} is refused: it is a {class} address; kz only sends credentials to \
         public addresses (an operator can allow a private range with --allow-private-cidr)"
    )]
    NonPublic { addr: IpAddr, class: &'static str },
    #[error("destination {addr} is refused: it is a cloud metadata endpoint")]
    Metadata { addr: IpAddr },
    #[error("host '{host}' is refused: it names the local machine or a metadata service")]
    BlockedName { host: String },
    #[error("host '{host}' is outside the resource's scope; allowed hosts: {allowed}")]
    OutOfScope { host: String, allowed: String },
}

/// Destination policy. `allow_private` is off by default (empty); operators and tests add the
/// exact private ranges their internal upstreams live in.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow_private: Vec<IpNet>,
}

impl Guard {
    pub fn new(allow_private: Vec<IpNet>) -> Self {
        Self { allow_private }
    }

    /// Refuses names that exist to reach this machine or a metadata service.
    pub fn check_name(&self, host: &str) -> Result<(), GuardError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if BLOCKED_NAMES.contains(&host.as_str()) || host.ends_with(".localhost") {
            return Err(GuardError::BlockedName { host });
        }
        Ok(())
    }

    /// Accepts an address only if it is public, or non-public but inside an allow-listed range
    /// (metadata endpoints are never accepted).
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), GuardError> {
        let addr = canonical(addr);
        if METADATA_ADDRS.contains(&addr) {
            return Err(GuardError::Metadata { addr });
        }
        match classify(addr) {
            None => Ok(()),
            Some(_) if self.allow_private.iter().any(|net| net.contains(&addr)) => Ok(()),
            Some(class) => Err(GuardError::NonPublic { addr, class }),
        }
    }
}

/// Checks `host` against a resource's `hosts` list: exact names (case-insensitive) or
/// `*.example.com`, which matches any name below example.com but not example.com itself.
/// An empty list means the resource is not host-scoped.
pub fn check_scope(host: &str, allowed: &[String]) -> Result<(), GuardError> {
    if allowed.is_empty() || allowed.iter().any(|pattern| host_matches(pattern, host)) {
        return Ok(());
    }
    Err(GuardError::OutOfScope {
        host: host.to_owned(),
        allowed: allowed.join(", "),
    })
}

pub fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => pattern == host,
    }
}

/// IPv4 addresses carried inside IPv6 (mapped, compatible, NAT64, 6to4) are judged as the IPv4
/// address they reach.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // ::a.b.c.d (deprecated IPv4-compatible), but not :: and ::1 themselves.
    if s[..6].iter().all(|&x| x == 0) && u32::from(tail) > 1 {
        return Some(tail);
    }
    // 64:ff9b::/96 well-known NAT64 prefix.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0) {
        return Some(tail);
    }
    // 2002::/16 6to4: the IPv4 address sits in bits 16..48.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// `None` for a public unicast address, otherwise what kind of non-public address it is.
fn classify(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    let in_net = |net: [u8; 4], len: u8| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        (u32::from(a) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
    };
    if a.is_unspecified() || o[0] == 0 {
        Some("unspecified/this-network")
    } else if a.is_loopback() {
        Some("loopback")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if in_net([100, 64, 0, 0], 10) {
        Some("carrier-grade NAT (shared)")
    } else if in_net([192, 0, 0, 0], 24) {
        Some("IETF protocol assignment")
    } else if in_net([192, 0, 2, 0], 24)
        || in_net([198, 51, 100, 0], 24)
        || in_net([203, 0, 113, 0], 24)
    {
        Some("documentation")
    } else if in_net([198, 18, 0, 0], 15) {
        Some("benchmarking")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

fn classify_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_unspecified() {
        Some("unspecified")
    } else if a.is_loopback() {
        Some("loopback")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique-local (private)")
    } else if (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
        Some("link-local")
    } else if a.is_multicast() {
        Some("multicast")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some("Teredo tunnel")
    } else if s[0] == 0x0100 && s[1..4].iter().all(|&x| x == 0) {
        Some("discard-only")
    } else if (s[0] & 0xe000) != 0x2000 {
        // Only 2000::/3 is allocated global unicast.
        Some("reserved")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_every_non_public_class() {
        let g = Guard::default();
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.2",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
        ] {
            assert!(g.check_addr(ip(a)).is_err(), "{a} must be refused");
        }
    }

    #[test]
    fn accepts_public_addresses() {
        let g = Guard::default();
        for a in [
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert_eq!(g.check_addr(ip(a)), Ok(()), "{a} must be accepted");
        }
    }

    #[test]
    fn metadata_refused_even_when_allow_listed() {
        let g = Guard::new(vec![
            "169.254.0.0/16".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        assert_eq!(g.check_addr(ip("169.254.1.1")), Ok(()));
        for a in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
        ] {
            assert!(
                matches!(g.check_addr(ip(a)), Err(GuardError::Metadata { .. })),
                "{a}"
            );
        }
    }

    #[test]
    fn allow_list_opens_only_its_range() {
        let g = Guard::new(vec!["10.77.0.0/24".parse().unwrap()]);
        assert_eq!(g.check_addr(ip("10.77.0.2")), Ok(()));
        assert!(g.check_addr(ip("10.77.1.2")).is_err());
        assert!(g.check_addr(ip("127.0.0.1")).is_err());
    }

    #[test]
    fn blocked_names() {
        let g = Guard::default();
        for n in [
            "localhost",
            "LOCALHOST.",
            "foo.localhost",
            "metadata.google.internal",
        ] {
            assert!(g.check_name(n).is_err(), "{n}");
        }
        assert!(g.check_name("api.example.com").is_ok());
    }

    #[test]
    fn scope_patterns() {
        let hosts = vec!["api.example.com".to_owned(), "*.svc.example.net".to_owned()];
        assert!(check_scope("API.example.com", &hosts).is_ok());
        assert!(check_scope("a.svc.example.net", &hosts).is_ok());
        assert!(check_scope("a.b.svc.example.net", &hosts).is_ok());
        assert!(check_scope("svc.example.net", &hosts).is_err());
        assert!(check_scope("evilsvc.example.net", &hosts).is_err());
        assert!(check_scope("example.com", &hosts).is_err());
        assert!(check_scope("anything", &[]).is_ok());
    }
}
