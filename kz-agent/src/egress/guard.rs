//! The address guard: which destinations kz will carry a real credential, or an agent's
//! connection, to.
//!
//! The check runs on the addresses a name resolved to, and the caller connects to exactly an
//! address that passed (never re-resolving), so a DNS answer that changes between check and
//! connect (rebinding) cannot move the request onto an internal host. Cloud metadata endpoints
//! (Azure's WireServer included) are refused even inside an allowed range, for every caller: no
//! upstream ever needs a credential there, and stealing instance credentials is the classic SSRF
//! payoff.
//!
//! Every caller judges addresses with this one [`Guard`]; what differs is a parameter, the
//! [`Classes`] it refuses (see there for why each caller has its own), plus the ranges its
//! operator opened or closed explicitly ([`AddrRule`], first match wins):
//! - MCP `fetch` ([`Classes::NonPublic`]);
//! - the PDP's exchange proxy ([`Classes::Internal`]);
//! - a blind run ([`Classes::Local`]): the DNS resolver drops such answers before the agent or
//!   the kernel's allow map sees them, and the swapping proxy refuses to dial them; the rules
//!   are the `{allow, cidr}` connection rules.

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

/// Cloud metadata endpoints (AWS/GCP/Azure/OpenStack, ECS task metadata, Alibaba, AWS IPv6,
/// Azure's WireServer).
const METADATA_ADDRS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error(
        "destination {addr} is refused: it is a {class} address; kz only sends credentials to \
         public addresses (an operator can allow a private range with --allow-private-cidr)"
    )]
    NonPublic { addr: IpAddr, class: &'static str },
    #[error(
        "destination {addr} is refused: it is a {class} address, which no name an agent uses \
         should point at (DNS rebinding); if the agent needs it, allow it explicitly with a \
         [blind] connection rule {{allow = true, cidr = \"{addr}\"}} (or its range)"
    )]
    Local { addr: IpAddr, class: &'static str },
    #[error("destination {addr} is refused: it is a cloud metadata endpoint")]
    Metadata { addr: IpAddr },
    #[error("destination {addr} is refused by the connection rule for {net}")]
    DeniedByRule { addr: IpAddr, net: IpNet },
    #[error("host '{host}' is refused: it names the local machine or a metadata service")]
    BlockedName { host: String },
    #[error("`{given}` is not a CIDR block like 10.0.0.0/8 or fd00::/8")]
    BadCidr { given: String },
}

impl GuardError {
    /// What kind of address was refused, for audit records (`loopback`, `cloud metadata`, …).
    pub fn class(&self) -> &'static str {
        match self {
            Self::NonPublic { class, .. } | Self::Local { class, .. } => class,
            Self::Metadata { .. } => "cloud metadata",
            Self::DeniedByRule { .. } => "denied by rule",
            Self::BlockedName { .. } => "blocked name",
            Self::BadCidr { .. } => "bad cidr",
        }
    }
}

/// Which addresses a caller refuses. The callers were written apart and refuse different sets;
/// each keeps its own so no caller's behaviour moved when they came together here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Classes {
    /// Everything but public unicast (MCP `fetch`): the IANA special-purpose ranges too
    /// (documentation, benchmarking, Teredo, discard, everything outside 2000::/3), and IPv4
    /// carried in IPv6 (mapped, compatible, NAT64 /96, 6to4) judged as the IPv4 address it
    /// reaches, allow list included. The agent picks the URL, so anything odd is refused.
    #[default]
    NonPublic,
    /// Internal networks only (the PDP's exchange proxy): private, loopback, link-local,
    /// CGNAT, this-network, IETF-assignment, multicast, reserved/broadcast; only mapped IPv6 is
    /// unwrapped, all of 64:ff9b::/32 counts as internal, and the allow list is matched against
    /// the address as resolved. The exchange's targets are named by an operator's bundle
    /// (`hosts`), not picked freely by the agent.
    Internal,
    /// What no name should ever lead an agent to (a blind run's DNS answers and the swapping
    /// proxy's dials): this machine (loopback, unspecified / this-network), the local link
    /// (169.254.0.0/16, fe80::/10, fec0::/10), multicast, broadcast and 240.0.0.0/4, and cloud
    /// metadata; IPv4 carried in IPv6 judged as the IPv4 address, as for [`Classes::NonPublic`].
    /// Private and CGNAT ranges pass: the agent's connection rules name internal services by
    /// name, and a blind run has always let it reach them.
    Local,
}

/// An operator's explicit word on a range, first match wins: `allow` opens it whatever its
/// class (cloud metadata stays refused), `!allow` refuses it even when it is public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRule {
    pub allow: bool,
    pub net: IpNet,
}

/// Destination policy: which address classes are refused, and the ranges an operator opened or
/// closed (none by default; operators and tests add the exact ranges their upstreams live in).
#[derive(Debug, Clone, Default)]
pub struct Guard {
    rules: Vec<AddrRule>,
    classes: Classes,
}

impl Guard {
    /// A guard whose only rules open `allow_private`.
    pub fn new(allow_private: Vec<IpNet>, classes: Classes) -> Self {
        let rules = allow_private
            .into_iter()
            .map(|net| AddrRule { allow: true, net })
            .collect();
        Self::with_rules(rules, classes)
    }

    /// A guard with ordered allow/deny ranges (first match wins).
    pub fn with_rules(rules: Vec<AddrRule>, classes: Classes) -> Self {
        Self { rules, classes }
    }

    /// Refuses names that exist to reach this machine or a metadata service.
    pub fn check_name(&self, host: &str) -> Result<(), GuardError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if BLOCKED_NAMES.contains(&host.as_str()) || host.ends_with(".localhost") {
            return Err(GuardError::BlockedName { host });
        }
        Ok(())
    }

    /// Accepts an address unless it is a metadata endpoint, a rule refuses it, or it is of a
    /// refused class and no rule opens it.
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), GuardError> {
        let (judged, rule_on) = match self.classes {
            Classes::NonPublic | Classes::Local => {
                let judged = canonical(addr);
                (judged, judged)
            }
            Classes::Internal => (unmapped(addr), addr),
        };
        if METADATA_ADDRS.contains(&judged) {
            return Err(GuardError::Metadata { addr: judged });
        }
        if let Some(rule) = self.rules.iter().find(|r| r.net.contains(&rule_on)) {
            return if rule.allow {
                Ok(())
            } else {
                Err(GuardError::DeniedByRule {
                    addr: judged,
                    net: rule.net,
                })
            };
        }
        match self.classes {
            Classes::NonPublic => classify(judged).map_or(Ok(()), |class| {
                Err(GuardError::NonPublic {
                    addr: judged,
                    class,
                })
            }),
            Classes::Internal => classify_internal(judged).map_or(Ok(()), |class| {
                Err(GuardError::NonPublic {
                    addr: judged,
                    class,
                })
            }),
            Classes::Local => classify_local(judged).map_or(Ok(()), |class| {
                Err(GuardError::Local {
                    addr: judged,
                    class,
                })
            }),
        }
    }
}

/// An allow-list entry as an operator writes it (`--allow-private`): `10.0.0.0/8`, `fd00::/8`,
/// or a bare address (that one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, GuardError> {
        let bad = || GuardError::BadCidr {
            given: s.to_owned(),
        };
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self(net));
        }
        // An empty prefix (`10.0.0.0/`) means the whole address, as a bare address does.
        let addr = s.strip_suffix('/').unwrap_or(s);
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        Ok(Self(IpNet::from(addr)))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }

    pub fn net(&self) -> IpNet {
        self.0
    }
}

/// Only IPv4-mapped IPv6 is unwrapped ([`Classes::Internal`]).
fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// IPv4 addresses carried inside IPv6 (mapped, compatible, NAT64, 6to4) are judged as the IPv4
/// address they reach ([`Classes::NonPublic`]).
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

fn in_v4_net(a: Ipv4Addr, net: [u8; 4], len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    (u32::from(a) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// The internal IPv4 classes both [`Classes`] refuse.
fn internal_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a.is_unspecified() || o[0] == 0 {
        Some("unspecified/this-network")
    } else if a.is_loopback() {
        Some("loopback")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if in_v4_net(a, [100, 64, 0, 0], 10) {
        Some("carrier-grade NAT (shared)")
    } else if in_v4_net(a, [192, 0, 0, 0], 24) {
        Some("IETF protocol assignment")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

fn classify_v4(a: Ipv4Addr) -> Option<&'static str> {
    internal_v4(a).or_else(|| {
        if in_v4_net(a, [192, 0, 2, 0], 24)
            || in_v4_net(a, [198, 51, 100, 0], 24)
            || in_v4_net(a, [203, 0, 113, 0], 24)
        {
            Some("documentation")
        } else if in_v4_net(a, [198, 18, 0, 0], 15) {
            Some("benchmarking")
        } else {
            None
        }
    })
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

/// [`Classes::Local`]: the address arrives with IPv4-in-IPv6 already unwrapped.
fn classify_local(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) => {
            if a.is_unspecified() || a.octets()[0] == 0 {
                Some("unspecified/this-network")
            } else if a.is_loopback() {
                Some("loopback")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else if a.is_broadcast() || a.octets()[0] >= 240 {
                Some("broadcast/reserved")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
                Some("link-local")
            } else if a.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// [`Classes::Internal`]: the address arrives with mapped IPv6 already unwrapped.
fn classify_internal(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("unique-local (private)")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                Some("NAT64")
            } else {
                None
            }
        }
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
        let g = Guard::new(
            vec![
                "169.254.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            Classes::NonPublic,
        );
        assert_eq!(g.check_addr(ip("169.254.1.1")), Ok(()));
        for a in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
        ] {
            assert!(
                matches!(g.check_addr(ip(a)), Err(GuardError::Metadata { .. })),
                "{a}"
            );
        }
    }

    /// A blind run's class: this machine, the link, multicast, broadcast and metadata are
    /// refused (IPv4 inside IPv6 too); private and public ranges pass.
    #[test]
    fn local_classes() {
        let g = Guard::new(Vec::new(), Classes::Local);
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.1.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "::ffff:169.254.1.1",
        ] {
            assert!(
                matches!(g.check_addr(ip(a)), Err(GuardError::Local { .. })),
                "{a} must be refused: {:?}",
                g.check_addr(ip(a))
            );
        }
        for a in [
            "169.254.169.254",
            "169.254.170.2",
            "168.63.129.16",
            "100.100.100.200",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(
                matches!(g.check_addr(ip(a)), Err(GuardError::Metadata { .. })),
                "{a}"
            );
        }
        for a in [
            "10.77.0.10",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "fd00::10",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(g.check_addr(ip(a)), Ok(()), "{a} must pass");
        }
        let e = g.check_addr(ip("127.0.0.1")).unwrap_err();
        assert_eq!(e.class(), "loopback");
        assert!(e.to_string().contains("cidr = \"127.0.0.1\""), "{e}");
    }

    #[test]
    fn rules_decide_in_order_and_never_open_metadata() {
        let rule = |allow, net: &str| AddrRule {
            allow,
            net: net.parse().unwrap(),
        };
        let g = Guard::with_rules(
            vec![
                rule(false, "127.0.0.9/32"),
                rule(true, "127.0.0.0/8"),
                rule(true, "169.254.0.0/16"),
                rule(false, "93.184.0.0/16"),
            ],
            Classes::Local,
        );
        assert_eq!(g.check_addr(ip("127.0.0.1")), Ok(()));
        assert_eq!(g.check_addr(ip("::ffff:127.0.0.1")), Ok(()));
        assert!(matches!(
            g.check_addr(ip("127.0.0.9")),
            Err(GuardError::DeniedByRule { .. })
        ));
        assert_eq!(g.check_addr(ip("169.254.1.1")), Ok(()));
        assert!(matches!(
            g.check_addr(ip("169.254.169.254")),
            Err(GuardError::Metadata { .. })
        ));
        // A deny rule closes a public range too.
        assert!(matches!(
            g.check_addr(ip("93.184.216.34")),
            Err(GuardError::DeniedByRule { .. })
        ));
        assert!(g.check_addr(ip("::1")).is_err());
    }

    #[test]
    fn allow_list_opens_only_its_range() {
        let g = Guard::new(vec!["10.77.0.0/24".parse().unwrap()], Classes::NonPublic);
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

    /// The PDP's classes (formerly `pdp::proxy::{is_private, is_metadata}`).
    #[test]
    fn internal_classes() {
        let g = Guard::new(Vec::new(), Classes::Internal);
        for a in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "192.168.0.1",
            "172.16.5.5",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::1.1.1.1",
        ] {
            assert!(
                matches!(g.check_addr(ip(a)), Err(GuardError::NonPublic { .. })),
                "{a}"
            );
        }
        // Special-purpose but not internal: the exchange proxy lets these through.
        for a in [
            "93.184.216.34",
            "2606:4700::1111",
            "8.8.4.4",
            "192.0.2.1",
            "198.18.0.1",
            "2001:db8::1",
        ] {
            assert_eq!(g.check_addr(ip(a)), Ok(()), "{a}");
        }
        for a in [
            "169.254.169.254",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "168.63.129.16",
        ] {
            assert!(
                matches!(g.check_addr(ip(a)), Err(GuardError::Metadata { .. })),
                "{a}"
            );
        }
        // The allow list is matched against the address as resolved.
        let g = Guard::new(
            vec![Cidr::parse("10.0.0.0/8").unwrap().net()],
            Classes::Internal,
        );
        assert_eq!(g.check_addr(ip("10.9.9.9")), Ok(()));
        assert!(g.check_addr(ip("::ffff:10.9.9.9")).is_err());
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.200.0.0/16").unwrap();
        assert!(c.contains(ip("10.200.3.4")));
        assert!(!c.contains(ip("10.201.0.1")));
        assert!(!c.contains(ip("::ffff:10.200.3.4")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("10.1.2.3").unwrap().contains(ip("10.1.2.3")));
        assert!(!Cidr::parse("10.1.2.3").unwrap().contains(ip("10.1.2.4")));
        assert!(Cidr::parse("10.1.2.3/").unwrap().contains(ip("10.1.2.3")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd00::1")));
        let e = Cidr::parse("10.0.0.0/33").unwrap_err().to_string();
        assert!(e.contains("is not a CIDR block like 10.0.0.0/8"), "{e}");
    }
}
