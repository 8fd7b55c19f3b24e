//! Connection rules: KeyZero's `[blind].connections`, plus `*.suffix` wildcards.
//!
//! Ordered; the first rule whose pattern matches the (verified) destination host decides. An empty
//! list allows everything (KeyZero behaviour); a non-empty list with no matching rule denies.

use crate::egress::scope::{self, ScopePattern};
use regex::Regex;

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error(
        "a connection rule must have exactly one of `host` or `regex` (rule #{index}); fix the [blind].connections entry"
    )]
    HostOrRegex { index: usize },
    #[error("connection rule #{index} has an invalid regex: {source}")]
    Regex { index: usize, source: regex::Error },
    #[error(
        "connection rule #{index}: wildcard hosts must look like `*.example.com` (got `{host}`)"
    )]
    Wildcard { index: usize, host: String },
}

/// How a host is matched. `Exact` and `Suffix` are the host-scope patterns of
/// [`crate::egress::scope`] (one pattern language for rules and token scopes); `Regex` exists
/// only in connection rules (KeyZero's `regex = "..."`).
#[derive(Debug, Clone)]
pub enum HostPattern {
    /// Stored lower-case.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: any name ending in `.example.com` (not
    /// `example.com` itself).
    Suffix(String),
    Regex(Regex),
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

    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(e) => scope::exact_matches(e, host),
            Self::Suffix(s) => scope::suffix_matches(s, host),
            Self::Regex(r) => r.is_match(&normalize(host)),
        }
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

    /// KeyZero's `{allow, host | regex}` shape (`index` is only for error messages).
    pub fn from_keyzero(
        index: usize,
        allow: bool,
        host: Option<&str>,
        regex: Option<&str>,
    ) -> Result<Self, RuleError> {
        let pattern = match (host, regex) {
            (Some(h), None) => HostPattern::host(h).map_err(|e| match e {
                RuleError::Wildcard { host, .. } => RuleError::Wildcard { index, host },
                other => other,
            })?,
            (None, Some(r)) => HostPattern::Regex(
                Regex::new(r).map_err(|source| RuleError::Regex { index, source })?,
            ),
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
            if port_ok && r.pattern.matches(host) {
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
