//! The `[blind]` table: what a `kz run --blind` agent may reach.
//!
//! KeyZero's `connections = [{allow = true, host = "api.github.com"}, {allow = false, regex =
//! "..."}]` (ordered, first match wins; a non-empty list denies what matches nothing), with
//! kz's `{allow = true, cidr = "127.0.0.0/8"}` address ranges; an allow rule's regex must match
//! the whole host name, a deny rule's anywhere in it, and a blind run reaches loopback,
//! link-local, multicast and broadcast addresses only through an allow `cidr` rule (the rule
//! language, and the compatibility decision on regexes, are in [`crate::proxy::rules`]). Plus
//! kz's kernel-enforcement options, all off by default:
//! `ipv6` (let the agent use IPv6 natively), `udp` (UDP other than DNS), `non_http_tcp` (TCP
//! connections that are not HTTP/TLS to allowed hosts), `refuse_on_scope_violation` (alias
//! `refuse_out_of_scope`: refuse a request carrying a masked token kz did not swap, outside its
//! host scope, its `credential_location` or over cleartext HTTP, instead of sending it masked),
//! `upstream_ca = "FILE"` (extra CA for upstream TLS), `resolver = "ADDR:PORT"` (upstream DNS;
//! default: the first nameserver of /etc/resolv.conf), `max_allowed_ips = N` (addresses the
//! agent's DNS answers may hold open at once in the machine's shared allowed-IP map; default
//! 4096, at most 262144; an answer beyond it gets SERVFAIL and is audited).
//!
//! Containment of the agent itself: `listen = "loopback"` (default: its servers are reachable
//! from this machine only; a bind to the wildcard address is moved to loopback) or `"any"`, and
//! `unix_sockets = ["/run/app.sock", "/run/app/", "@name"]`, the unix sockets it may reach
//! besides its own (exact socket paths, directories, abstract names). Without `unix_sockets`
//! only [`DEFAULT_UNIX_SOCKETS`] (the system log) is allowed: container runtimes, init, the
//! D-Bus buses, SSH and GPG agents, name-service caches and everything else are refused.

use crate::intercept::{Listen, UnixRule};
use crate::proxy::rules::{HostRegex, cidr_matches};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum HostPattern {
    /// Exact host name, compared case-insensitively.
    Host(String),
    /// `regex = '…'`, compiled once ([`HostRegex`]).
    Regex(HostRegex),
    /// `cidr = "127.0.0.0/8"`.
    Cidr(IpNet),
}

impl HostPattern {
    /// Whether the pattern matches `host` in a rule that allows (`true`) or denies (a regex
    /// reads differently for each, see [`crate::proxy::rules`]).
    pub fn matches_for(&self, allow: bool, host: &str) -> bool {
        match self {
            HostPattern::Host(h) => h.eq_ignore_ascii_case(host.trim_end_matches('.')),
            HostPattern::Regex(re) => re.matches_for(allow, host),
            HostPattern::Cidr(net) => cidr_matches(net, host),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConnectionRule {
    pub allow: bool,
    pub pattern: HostPattern,
}

#[derive(Debug, Clone, Default)]
pub struct BlindConfig {
    pub connections: Vec<ConnectionRule>,
    pub ipv6: bool,
    pub udp: bool,
    pub non_http_tcp: bool,
    pub refuse_on_scope_violation: bool,
    /// Absolute path (relative paths are taken from the config file's directory).
    pub upstream_ca: Option<PathBuf>,
    pub resolver: Option<SocketAddr>,
    /// `hide = [...]`: files and directories masked in the agent's mount namespace (absolute,
    /// `~/…` for the agent user's home, or relative to the project directory). `None`: the
    /// default list of common credential files ([`crate::contain::DEFAULT_HIDDEN`]).
    pub hide: Option<Vec<String>>,
    /// `listen = "loopback" | "any"`.
    pub listen: Listen,
    /// `unix_sockets = [...]`; `None`: [`DEFAULT_UNIX_SOCKETS`].
    pub unix_sockets: Option<Vec<UnixRule>>,
    /// `max_allowed_ips = N` (1..=[`crate::intercept::allowed::CAPACITY`]); `None`:
    /// [`crate::intercept::allowed::DEFAULT_QUOTA`].
    pub max_allowed_ips: Option<usize>,
}

/// The unix sockets an agent may reach when `[blind] unix_sockets` is not set: the system log
/// only (syslog(3) and journald clients; writing log lines exposes nothing). An allow list, not
/// a deny list of known-dangerous sockets: a secret-safety sandbox cannot know every socket that
/// hands out credentials (ssh-agent, gpg-agent, the session bus's Secret Service, a cloud
/// metadata proxy…), and the agent's own sockets are always allowed, so its tools keep working.
pub const DEFAULT_UNIX_SOCKETS: &[&str] = &["/run/systemd/journal/", "/dev/log"];

/// Parses `listen`.
pub fn parse_listen(v: &str) -> Result<Listen, String> {
    match v {
        "loopback" => Ok(Listen::Loopback),
        "any" => Ok(Listen::Any),
        other => Err(format!(
            "[blind] listen: `{other}` is not \"loopback\" (servers reachable from this machine only, the default) or \"any\""
        )),
    }
}

/// Parses one entry of `unix_sockets`.
pub fn parse_unix_socket(v: &str) -> Result<UnixRule, String> {
    v.parse::<UnixRule>()
        .map_err(|e| format!("[blind] unix_sockets: {e}"))
}

/// Keys of `[blind]`, for "did you mean" hints.
pub const KEYS: &[&str] = &[
    "connections",
    "ipv6",
    "udp",
    "non_http_tcp",
    "refuse_on_scope_violation",
    "refuse_out_of_scope",
    "upstream_ca",
    "resolver",
    "hide",
    "listen",
    "unix_sockets",
    "max_allowed_ips",
];

impl BlindConfig {
    /// The connection policy for `host`: the first matching rule decides; with rules and no
    /// match the answer is deny. With no rules at all everything is allowed (KeyZero's default;
    /// callers warn loudly, see [`BlindConfig::is_open`]).
    pub fn connection_allowed(&self, host: &str) -> bool {
        if self.connections.is_empty() {
            return true;
        }
        self.connections
            .iter()
            .find(|r| r.pattern.matches_for(r.allow, host))
            .is_some_and(|r| r.allow)
    }

    /// The unix-socket rules in force: `unix_sockets`, or [`DEFAULT_UNIX_SOCKETS`].
    pub fn unix_rules(&self) -> Vec<UnixRule> {
        match &self.unix_sockets {
            Some(rules) => rules.clone(),
            None => DEFAULT_UNIX_SOCKETS
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        }
    }

    /// True when no connection rule restricts where the agent (and its tokens) may go.
    pub fn is_open(&self) -> bool {
        self.connections.is_empty()
    }

    /// The upstream DNS server: `resolver`, else the first `nameserver` of /etc/resolv.conf.
    pub fn dns_upstream(&self) -> Result<SocketAddr, String> {
        if let Some(r) = self.resolver {
            return Ok(r);
        }
        let path = Path::new("/etc/resolv.conf");
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read {}: {e}; set [blind] resolver = \"ADDR:PORT\"",
                path.display()
            )
        })?;
        nameserver_from(&text).ok_or_else(|| {
            format!(
                "{} lists no nameserver; set [blind] resolver = \"ADDR:PORT\"",
                path.display()
            )
        })
    }
}

/// Whether a secret scoped to `hosts` (its `hosts = [..]`) may be swapped in on a connection to
/// `host`. A secret without `hosts` follows the connection rules ([`BlindConfig::connection_allowed`]).
/// Scope entries are [`crate::egress::scope`] patterns: exact names (case-insensitive) or
/// `*.example.com` (any subdomain, not the apex).
pub fn in_scope(blind: &BlindConfig, hosts: &[String], host: &str) -> bool {
    if hosts.is_empty() {
        return blind.connection_allowed(host);
    }
    crate::egress::scope::in_scope(hosts, host)
}

/// The first `nameserver` line of resolv.conf text, port 53.
pub fn nameserver_from(text: &str) -> Option<SocketAddr> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|rest| {
            // Link-local IPv6 servers may carry a zone (`fe80::1%eth0`); std cannot parse those.
            rest.split_whitespace().next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// Parses `resolver = "ADDR:PORT"` (a bare address means port 53).
pub fn parse_resolver(v: &str) -> Option<SocketAddr> {
    v.parse::<SocketAddr>()
        .ok()
        .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(allow: bool, pattern: HostPattern) -> ConnectionRule {
        ConnectionRule { allow, pattern }
    }

    #[test]
    fn first_match_wins_and_unmatched_is_denied() {
        let cfg = BlindConfig {
            connections: vec![
                rule(false, HostPattern::Host("evil.example.com".into())),
                rule(
                    true,
                    HostPattern::Regex(HostRegex::new(r"(.+\.)?example\.com").unwrap()),
                ),
                rule(true, HostPattern::Host("API.GitHub.com".into())),
            ],
            ..Default::default()
        };
        assert!(cfg.connection_allowed("api.example.com"));
        assert!(!cfg.connection_allowed("evil.example.com"));
        assert!(cfg.connection_allowed("api.github.com."));
        assert!(!cfg.connection_allowed("pastebin.com"));
        assert!(BlindConfig::default().connection_allowed("anything"));
        assert!(BlindConfig::default().is_open());
    }

    #[test]
    fn secret_scopes() {
        let open = BlindConfig::default();
        let hosts = vec!["api.github.com".to_owned(), "*.example.com".to_owned()];
        assert!(in_scope(&open, &hosts, "API.github.com"));
        assert!(in_scope(&open, &hosts, "a.b.example.com"));
        assert!(!in_scope(&open, &hosts, "example.com"));
        assert!(!in_scope(&open, &hosts, "evilexample.com"));
        assert!(!in_scope(&open, &hosts, "github.com"));
        // Unscoped: the connection rules decide.
        assert!(in_scope(&open, &[], "anything.org"));
        let rules = BlindConfig {
            connections: vec![rule(true, HostPattern::Host("api.github.com".into()))],
            ..Default::default()
        };
        assert!(in_scope(&rules, &[], "api.github.com"));
        assert!(!in_scope(&rules, &[], "anything.org"));
    }

    #[test]
    fn listen_and_unix_socket_values() {
        assert_eq!(parse_listen("loopback"), Ok(Listen::Loopback));
        assert_eq!(parse_listen("any"), Ok(Listen::Any));
        let e = parse_listen("0.0.0.0").unwrap_err();
        assert!(e.contains("`0.0.0.0`") && e.contains("\"any\""), "{e}");
        assert_eq!(
            parse_unix_socket("/run/app/"),
            Ok(UnixRule::Dir("/run/app".into()))
        );
        let e = parse_unix_socket("../docker.sock").unwrap_err();
        assert!(
            e.starts_with("[blind] unix_sockets:") && e.contains("absolute"),
            "{e}"
        );
        // The defaults parse, and an explicit empty list allows nothing.
        let defaults = BlindConfig::default().unix_rules();
        assert_eq!(defaults.len(), DEFAULT_UNIX_SOCKETS.len());
        let none = BlindConfig {
            unix_sockets: Some(Vec::new()),
            ..Default::default()
        };
        assert!(none.unix_rules().is_empty());
    }

    #[test]
    fn resolv_conf_and_resolver_setting() {
        let text = "# comment\nsearch lan\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\nnameserver 1.1.1.1\n";
        assert_eq!(nameserver_from(text), "10.0.0.2:53".parse().ok());
        assert_eq!(nameserver_from("search x\n"), None);
        assert_eq!(
            parse_resolver("127.0.0.1:5353"),
            "127.0.0.1:5353".parse().ok()
        );
        assert_eq!(parse_resolver("::1"), "[::1]:53".parse().ok());
        assert_eq!(parse_resolver("dns.google"), None);
    }
}
