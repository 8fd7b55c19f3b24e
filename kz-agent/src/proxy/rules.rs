//! Connection rules: KeyZero's `[blind].connections`, plus `*.suffix` wildcards and address
//! ranges.
//!
//! Ordered; the first rule whose pattern matches the (verified) destination host decides. An empty
//! list allows everything (KeyZero behaviour); a non-empty list with no matching rule denies.
//!
//! Patterns:
//! - `host = "api.example.com"` (exact, case-insensitive) or `host = "*.example.com"` (any
//!   subdomain, not the apex): the [`crate::egress::scope`] patterns, one language for rules
//!   and token scopes.
//! - `regex = '…'`: matched case-insensitively against the normalised host name (lower case,
//!   no trailing dot, no IPv6 brackets). An **allow** rule's regex must match the *whole* name:
//!   it is compiled once, as `^(?:…)$` ([`HostRegex`]), so `github\.com` allows github.com and
//!   neither `github.com.evil.io` nor `evilgithub.com`. KeyZero (`kz-proxy` 0.3,
//!   `HostPattern::Regex`) searches the host with the regex as written and documents anchored
//!   examples (`^api\.example\.com$`); a rule written that way means the same in kz. Where the
//!   two readings differ kz takes the one that refuses: a **deny** rule's regex still matches
//!   anywhere in the name, as in KeyZero, so `{allow = false, regex = "pastebin"}` keeps denying
//!   pastebin.com (anchoring it would have quietly opened what a KeyZero user closed). Every
//!   host allowed under kz's reading is allowed under both uniform readings.
//! - `cidr = "127.0.0.0/8"` (kz's addition; a bare address means that address): matches a
//!   destination given as an address in the range, and is the explicit word the address guard
//!   ([`crate::egress::guard`], [`ConnectionRules::address_guard`]) needs before a blind run
//!   lets an agent reach loopback, link-local, multicast or broadcast addresses: the DNS
//!   resolver drops such answers for allowed names and the proxy refuses to dial them unless an
//!   allow rule's range holds them (first cidr rule that holds the address decides; a deny
//!   range refuses even public addresses). Cloud metadata endpoints stay refused inside any
//!   range.

use crate::egress::guard::{AddrRule, Cidr, Classes, Guard};
use crate::egress::scope::{self, ScopePattern};
use ipnet::IpNet;
use regex::{Regex, RegexBuilder};
use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error(
        "a connection rule must have exactly one of `host`, `regex` or `cidr` (rule #{index}); fix the [blind].connections entry"
    )]
    HostOrRegex { index: usize },
    #[error("connection rule #{index} has an invalid regex: {source}")]
    Regex { index: usize, source: regex::Error },
    #[error(
        "connection rule #{index}: wildcard hosts must look like `*.example.com` (got `{host}`)"
    )]
    Wildcard { index: usize, host: String },
    #[error(
        "connection rule #{index}: cidr `{given}` is not an address range like \"127.0.0.0/8\", \"fd00::/8\" or a single address"
    )]
    Cidr { index: usize, given: String },
}

/// A connection rule's regex, compiled once for every place that matches one (the proxy's
/// rules, `[blind]` in the config, bundle validation): case-insensitive, anchored for allow
/// rules and unanchored for deny rules (see the module docs for why).
#[derive(Debug, Clone)]
pub struct HostRegex {
    /// `^(?:…)$`.
    whole: Regex,
    /// As written.
    anywhere: Regex,
}

impl HostRegex {
    /// Compiles `pattern`. It is checked on its own first: wrapped unchecked, a pattern such as
    /// `a)|(.*` would balance its parentheses against the wrapper and match everything.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        let build = |p: &str| RegexBuilder::new(p).case_insensitive(true).build();
        let anywhere = build(pattern)?;
        let whole = build(&format!("^(?:{pattern})$"))?;
        Ok(Self { whole, anywhere })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.anywhere.as_str()
    }

    /// Whether the whole (normalised) host name matches: an allow rule's reading.
    pub fn matches_whole(&self, host: &str) -> bool {
        self.whole.is_match(&normalize(host))
    }

    /// Whether the pattern occurs anywhere in the (normalised) host name: a deny rule's reading.
    pub fn matches_anywhere(&self, host: &str) -> bool {
        self.anywhere.is_match(&normalize(host))
    }

    /// The reading for a rule that allows (`true`) or denies.
    pub fn matches_for(&self, allow: bool, host: &str) -> bool {
        if allow {
            self.matches_whole(host)
        } else {
            self.matches_anywhere(host)
        }
    }
}

/// Parses a `cidr = "…"` value: `10.0.0.0/8`, `fd00::/8` or a bare address. Host bits are
/// cleared (`127.0.0.1/8` is `127.0.0.0/8`).
pub fn parse_cidr(given: &str) -> Option<IpNet> {
    Cidr::parse(given.trim()).ok().map(|c| c.net().trunc())
}

/// How a host is matched. `Exact` and `Suffix` are the host-scope patterns of
/// [`crate::egress::scope`] (one pattern language for rules and token scopes); `Regex` and
/// `Cidr` exist only in connection rules.
#[derive(Debug, Clone)]
pub enum HostPattern {
    /// Stored lower-case.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any name ending in `.example.com` (not
    /// `example.com` itself).
    Suffix(String),
    Regex(HostRegex),
    /// An address range: matches destinations given as an address inside it.
    Cidr(IpNet),
}

impl HostPattern {
    /// `*.x.y` becomes a suffix pattern, anything else an exact host.
    pub fn host(host: &str) -> Result<Self, RuleError> {
        match ScopePattern::parse(host) {
            Ok(ScopePattern::Exact(e)) => Ok(Self::Exact(e)),
            Ok(ScopePattern::Suffix(s)) => Ok(Self::Suffix(s)),
            Err(_) => Err(RuleError::Wildcard {
                index: 0,
                host: host.to_owned(),
            }),
        }
    }

    pub fn regex(pattern: &str) -> Result<Self, RuleError> {
        HostRegex::new(pattern)
            .map(Self::Regex)
            .map_err(|source| RuleError::Regex { index: 0, source })
    }

    pub fn cidr(given: &str) -> Result<Self, RuleError> {
        parse_cidr(given)
            .map(Self::Cidr)
            .ok_or_else(|| RuleError::Cidr {
                index: 0,
                given: given.to_owned(),
            })
    }

    /// Whether this pattern matches `host` in a rule that allows (`true`) or denies: only a
    /// regex reads differently (see the module docs).
    pub fn matches_for(&self, allow: bool, host: &str) -> bool {
        match self {
            Self::Exact(e) => scope::exact_matches(e, host),
            Self::Suffix(s) => scope::suffix_matches(s, host),
            Self::Regex(r) => r.matches_for(allow, host),
            Self::Cidr(net) => cidr_matches(net, host),
        }
    }
}

/// Whether `host` is an address literal inside `net` (IPv4-mapped IPv6 counts as its IPv4).
pub fn cidr_matches(net: &IpNet, host: &str) -> bool {
    match normalize(host).parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => {
            let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            net.contains(&ip)
        }
        Ok(ip) => net.contains(&ip),
        Err(_) => false,
    }
}

/// Lower-case, no trailing dot, no brackets around IPv6 literals.
pub use crate::egress::scope::normalize;

#[derive(Debug, Clone)]
pub struct ConnectionRule {
    pub allow: bool,
    pub pattern: HostPattern,
    /// Ports this rule applies to; `None` = any port.
    pub ports: Option<Vec<u16>>,
    /// For allowed non-HTTP TCP (neither TLS nor HTTP in the first bytes): splice it through
    /// untouched (no swap) when true, refuse it when false.
    pub splice_non_http: bool,
}

impl ConnectionRule {
    pub fn allow(pattern: HostPattern) -> Self {
        Self {
            allow: true,
            pattern,
            ports: None,
            splice_non_http: false,
        }
    }

    pub fn deny(pattern: HostPattern) -> Self {
        Self {
            allow: false,
            ..Self::allow(pattern)
        }
    }

    /// Whether the rule's pattern matches `host` (ports aside).
    pub fn matches(&self, host: &str) -> bool {
        self.pattern.matches_for(self.allow, host)
    }

    /// KeyZero's `{allow, host | regex}` shape (`index` is only for error messages).
    pub fn from_keyzero(
        index: usize,
        allow: bool,
        host: Option<&str>,
        regex: Option<&str>,
    ) -> Result<Self, RuleError> {
        Self::from_table(index, allow, host, regex, None)
    }

    /// `{allow, host | regex | cidr}` (`index` is only for error messages).
    pub fn from_table(
        index: usize,
        allow: bool,
        host: Option<&str>,
        regex: Option<&str>,
        cidr: Option<&str>,
    ) -> Result<Self, RuleError> {
        let pattern = match (host, regex, cidr) {
            (Some(h), None, None) => HostPattern::host(h).map_err(|e| match e {
                RuleError::Wildcard { host, .. } => RuleError::Wildcard { index, host },
                other => other,
            })?,
            (None, Some(r), None) => HostPattern::Regex(
                HostRegex::new(r).map_err(|source| RuleError::Regex { index, source })?,
            ),
            (None, None, Some(c)) => HostPattern::cidr(c).map_err(|_| RuleError::Cidr {
                index,
                given: c.to_owned(),
            })?,
            _ => return Err(RuleError::HostOrRegex { index }),
        };
        Ok(Self {
            allow,
            ..Self::allow(pattern)
        })
    }
}

/// What the rules say about one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `splice_non_http` from the matching rule (false when no rule matched).
    Allow {
        splice_non_http: bool,
    },
    Deny,
}

#[derive(Debug, Clone, Default)]
pub struct ConnectionRules(pub Vec<ConnectionRule>);

impl ConnectionRules {
    pub fn check(&self, host: &str, port: u16) -> Verdict {
        if self.0.is_empty() {
            return Verdict::Allow {
                splice_non_http: false,
            };
        }
        for r in &self.0 {
            let port_ok = r.ports.as_ref().is_none_or(|p| p.contains(&port));
            if port_ok && r.matches(host) {
                return if r.allow {
                    Verdict::Allow {
                        splice_non_http: r.splice_non_http,
                    }
                } else {
                    Verdict::Deny
                };
            }
        }
        Verdict::Deny
    }

    /// The address guard of a blind run under these rules: [`Classes::Local`] with the
    /// `cidr` rules, in order, as its explicit ranges. The sandbox's DNS resolver drops answers
    /// it refuses and the proxy does not dial them.
    pub fn address_guard(&self) -> Guard {
        let rules = self
            .0
            .iter()
            .filter_map(|r| match r.pattern {
                HostPattern::Cidr(net) => Some(AddrRule {
                    allow: r.allow,
                    net,
                }),
                _ => None,
            })
            .collect();
        Guard::with_rules(rules, Classes::Local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: &[(bool, Option<&str>, Option<&str>)]) -> ConnectionRules {
        ConnectionRules(
            v.iter()
                .enumerate()
                .map(|(i, (a, h, r))| ConnectionRule::from_keyzero(i, *a, *h, *r).unwrap())
                .collect(),
        )
    }

    #[test]
    fn empty_allows_everything() {
        assert!(matches!(
            ConnectionRules::default().check("x.y", 443),
            Verdict::Allow { .. }
        ));
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let r = rules(&[
            (false, Some("bad.example.com"), None),
            (true, Some("*.example.com"), None),
            (true, None, Some(r"^api\.[a-z]+\.org$")),
        ]);
        assert_eq!(r.check("bad.example.com", 443), Verdict::Deny);
        assert!(matches!(
            r.check("API.Example.com.", 443),
            Verdict::Allow { .. }
        ));
        assert_eq!(r.check("example.com", 443), Verdict::Deny);
        assert!(matches!(r.check("api.foo.org", 443), Verdict::Allow { .. }));
        assert_eq!(r.check("evil.com", 443), Verdict::Deny);
        assert_eq!(r.check("notexample.com", 443), Verdict::Deny);
    }

    /// Issue 14: an allow rule's regex matches the whole name; a deny rule's anywhere in it.
    #[test]
    fn allow_regexes_are_anchored_and_deny_regexes_are_not() {
        let r = rules(&[(true, None, Some(r"github\.com"))]);
        assert!(matches!(r.check("github.com", 443), Verdict::Allow { .. }));
        assert!(matches!(r.check("GitHub.COM.", 443), Verdict::Allow { .. }));
        for evil in ["github.com.evil.io", "evilgithub.com", "api.github.com"] {
            assert_eq!(r.check(evil, 443), Verdict::Deny, "{evil}");
        }
        // Alternation stays inside the anchors.
        let r = rules(&[(true, None, Some(r"a\.test|b\.test"))]);
        assert!(matches!(r.check("b.test", 443), Verdict::Allow { .. }));
        assert_eq!(r.check("a.test.evil", 443), Verdict::Deny);
        assert_eq!(r.check("evil.b.test", 443), Verdict::Deny);
        // A KeyZero rule written with anchors means the same.
        let r = rules(&[(true, None, Some(r"^(.+\.)?example\.com$"))]);
        assert!(matches!(
            r.check("a.example.com", 443),
            Verdict::Allow { .. }
        ));
        assert_eq!(r.check("example.com.evil", 443), Verdict::Deny);
        // Deny: KeyZero's search reading, the stricter one for a deny rule.
        let r = rules(&[(false, None, Some("pastebin")), (true, None, Some(".*"))]);
        assert_eq!(r.check("pastebin.com", 443), Verdict::Deny);
        assert_eq!(r.check("PasteBin.com", 443), Verdict::Deny);
        assert!(matches!(r.check("api.test", 443), Verdict::Allow { .. }));
        // A pattern that would close the wrapper's group early is refused, not widened.
        assert!(matches!(
            ConnectionRule::from_keyzero(4, true, None, Some(r"a)|(.*")),
            Err(RuleError::Regex { index: 4, .. })
        ));
    }

    #[test]
    fn cidr_rules_match_address_literals_and_feed_the_address_guard() {
        let r = ConnectionRules(vec![
            ConnectionRule::from_table(0, false, None, None, Some("127.0.0.9")).unwrap(),
            ConnectionRule::from_table(1, true, None, None, Some("127.0.0.1/8")).unwrap(),
            ConnectionRule::allow(HostPattern::host("*.test").unwrap()),
        ]);
        assert!(matches!(r.check("127.0.0.5", 80), Verdict::Allow { .. }));
        assert!(matches!(
            r.check("[::ffff:127.0.0.5]", 80),
            Verdict::Allow { .. }
        ));
        assert_eq!(r.check("127.0.0.9", 80), Verdict::Deny);
        assert_eq!(r.check("10.0.0.1", 80), Verdict::Deny);
        assert_eq!(r.check("127.test.evil", 80), Verdict::Deny);
        let g = r.address_guard();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(g.check_addr(ip("127.0.0.1")), Ok(()));
        assert!(g.check_addr(ip("127.0.0.9")).is_err());
        assert!(g.check_addr(ip("::1")).is_err());
        assert!(g.check_addr(ip("169.254.169.254")).is_err());
        assert_eq!(g.check_addr(ip("10.77.0.2")), Ok(()));
        // No cidr rule: loopback is refused.
        let g = rules(&[(true, Some("*.test"), None)]).address_guard();
        assert!(g.check_addr(ip("127.0.0.1")).is_err());
        assert!(matches!(
            ConnectionRule::from_table(5, true, None, None, Some("127.0.0.0/33")),
            Err(RuleError::Cidr { index: 5, .. })
        ));
        let e = ConnectionRule::from_table(6, true, None, None, Some("localhost"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("#6") && e.contains("`localhost`"), "{e}");
        assert!(matches!(
            ConnectionRule::from_table(7, true, Some("a"), None, Some("10.0.0.0/8")),
            Err(RuleError::HostOrRegex { index: 7 })
        ));
    }

    #[test]
    fn bad_rules_are_specific_errors() {
        assert!(matches!(
            ConnectionRule::from_keyzero(3, true, Some("a"), Some("b")),
            Err(RuleError::HostOrRegex { index: 3 })
        ));
        assert!(matches!(
            ConnectionRule::from_keyzero(1, true, None, Some("(")),
            Err(RuleError::Regex { index: 1, .. })
        ));
        assert!(matches!(
            ConnectionRule::from_keyzero(2, true, Some("a.*.com"), None),
            Err(RuleError::Wildcard { index: 2, .. })
        ));
    }
}
