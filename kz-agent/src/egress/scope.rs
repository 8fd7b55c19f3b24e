//! Host scopes: the hosts a credential may be sent to (a secret's `hosts = [..]`, a resource's
//! `hosts:`), as one pattern language for the proxy's token table, `[blind]` secret scopes, MCP
//! `fetch` and the PDP's exchange proxy.
//!
//! An entry is an exact name (case-insensitive) or `*.example.com`, which matches any name below
//! example.com but never example.com itself, nor `evilexample.com`. Names are compared
//! lower-case, without a trailing dot and without brackets around an IPv6 literal, on both sides:
//! those spellings name the same host, so a scope must not depend on them.

/// Why a scope entry was refused. Only [`ScopePattern::parse`] refuses entries: the lenient
/// [`in_scope`] treats a malformed entry as an exact name, which matches no real host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "scope host `{0}` is invalid: use an exact name, `*.example.com` (one leading wildcard \
         label) or an IP address"
    )]
    Wildcard(String),
}

/// One compiled scope entry. Stored lower-case, so matching never allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopePattern {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

impl ScopePattern {
    /// `*.x.y` becomes a suffix pattern, anything else an exact host; a `*` anywhere else (or a
    /// bare `*.`) is refused.
    pub fn parse(pattern: &str) -> Result<Self, ScopeError> {
        let p = normalize(pattern);
        if let Some(rest) = p.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(ScopeError::Wildcard(pattern.to_owned()));
            }
            return Ok(Self::Suffix(format!(".{rest}")));
        }
        if p.contains('*') {
            return Err(ScopeError::Wildcard(pattern.to_owned()));
        }
        Ok(Self::Exact(p))
    }

    /// Whether `host` (any case, trailing dot and IPv6 brackets allowed) is in this scope.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(e) => exact_matches(e, host),
            Self::Suffix(s) => suffix_matches(s, host),
        }
    }
}

/// [`ScopePattern::Exact`] matching, for callers that store the name themselves (the proxy's
/// connection rules). Called per request: compares without allocating.
pub fn exact_matches(exact: &str, host: &str) -> bool {
    exact.eq_ignore_ascii_case(trim(host))
}

/// [`ScopePattern::Suffix`] matching; `suffix` is `.example.com` (with its leading dot).
pub fn suffix_matches(suffix: &str, host: &str) -> bool {
    let h = trim(host);
    h.len() > suffix.len()
        && h.is_char_boundary(h.len() - suffix.len())
        && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// Matches one uncompiled entry (bundle `hosts:` lists, which `bundle` already checked): like
/// [`ScopePattern::matches`], without refusing anything.
pub fn matches(pattern: &str, host: &str) -> bool {
    let p = trim(pattern);
    match p.strip_prefix('*') {
        // `.example.com`: the leading dot is what keeps `evilexample.com` out.
        Some(suffix) if suffix.len() > 1 && suffix.starts_with('.') => suffix_matches(suffix, host),
        _ => exact_matches(p, host),
    }
}

/// Whether `host` matches any of `patterns`. An empty list is no scope: callers decide what
/// that means (MCP: the requested host only; `[blind]`: the connection rules; PDP: any host).
pub fn in_scope(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|p| matches(p, host))
}

/// Lower-case, no trailing dot, no brackets around IPv6 literals.
pub fn normalize(host: &str) -> String {
    trim(host).to_ascii_lowercase()
}

fn trim(host: &str) -> &str {
    host.trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_suffix() {
        let hosts = vec!["api.example.com".to_owned(), "*.svc.example.net".to_owned()];
        assert!(in_scope(&hosts, "API.example.com"));
        assert!(in_scope(&hosts, "api.example.com."));
        assert!(in_scope(&hosts, "a.svc.example.net"));
        assert!(in_scope(&hosts, "a.b.svc.example.net"));
        assert!(!in_scope(&hosts, "svc.example.net"));
        assert!(!in_scope(&hosts, "evilsvc.example.net"));
        assert!(!in_scope(&hosts, ".svc.example.net"));
        assert!(!in_scope(&hosts, "example.com"));
        assert!(!in_scope(&hosts, "api.example.com.evil.io"));
        assert!(!in_scope(&[], "anything"));
        // Pattern spelling does not matter either.
        assert!(matches("*.Example.COM.", "a.example.com"));
        assert!(matches("[::1]", "::1"));
        // Multi-byte host names never panic on a char boundary.
        assert!(!matches("*.b.c", "ééé.c"));
    }

    #[test]
    fn compiled_patterns() {
        let p = ScopePattern::parse("*.Example.com").unwrap();
        assert_eq!(p, ScopePattern::Suffix(".example.com".into()));
        assert!(p.matches("a.EXAMPLE.com."));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("notexample.com"));
        let e = ScopePattern::parse("[::1]").unwrap();
        assert!(e.matches("::1") && e.matches("[::1]"));
        for bad in ["a.*.com", "*.", "*", "*.*.com"] {
            assert!(ScopePattern::parse(bad).is_err(), "{bad}");
        }
        // The compiled and the lenient matcher agree on valid patterns.
        for (pat, host) in [
            ("*.x.org", "a.x.org"),
            ("*.x.org", "x.org"),
            ("*.x.org", "ax.org"),
            ("x.org", "X.ORG."),
            ("x.org", "y.org"),
        ] {
            assert_eq!(
                ScopePattern::parse(pat).unwrap().matches(host),
                matches(pat, host),
                "{pat} {host}"
            );
        }
    }
}
