//! What a sandbox may resolve and reach by name, and the proxy's view of the sandbox's DNS.
//!
//! Names follow the connection rules ([`name_allowed`]); the addresses they lead to follow the
//! rules' address guard ([`ConnectionRules::address_guard`]): its resolver drops answers that
//! point an allowed name at loopback, link-local, metadata, multicast or broadcast addresses
//! (they never reach the agent nor the kernel's allow map), and the proxy's own lookups here
//! skip them too. Allow `cidr` rules are the one way to open such a range, and they open it in
//! the kernel from the start, as literal addresses do ([`literal_ips_allowed`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::egress::Guard;
use crate::intercept::Cidr;
use crate::intercept::dns;
use crate::proxy::{self, ConnectionRules, HostPattern};

/// May the agent resolve `name`? The first rule whose pattern matches decides; a deny rule
/// limited to some ports does not stop resolution (other ports may be allowed).
pub fn name_allowed(rules: &ConnectionRules, name: &str) -> bool {
    if rules.0.is_empty() {
        return true;
    }
    for r in &rules.0 {
        if r.matches(name) {
            if r.allow {
                return true;
            }
            if r.ports.is_none() {
                return false;
            }
        }
    }
    false
}

/// Addresses named literally by allow rules (`host = "10.0.0.5"`) and the ranges of allow
/// `cidr` rules: the agent reaches them without asking kz's DNS, so the kernel must know them
/// from the start. An address an earlier deny rule names (a range an earlier deny range holds
/// whole) is left out (first match wins); port limits and partly shadowed ranges are the
/// proxy's to enforce (it checks every connection's destination against the same rules).
/// Exact patterns are normalized (`[v6]` brackets already gone).
pub fn literal_ips_allowed(rules: &ConnectionRules) -> Vec<Cidr> {
    rules
        .0
        .iter()
        .enumerate()
        .filter(|(_, r)| r.allow)
        .filter_map(|(i, r)| match &r.pattern {
            HostPattern::Exact(h) if name_allowed(rules, h) => {
                h.parse::<IpAddr>().ok().map(Cidr::host)
            }
            HostPattern::Cidr(net) => {
                let shadowed = rules.0[..i].iter().any(|d| {
                    !d.allow
                        && d.ports.is_none()
                        && matches!(&d.pattern, HostPattern::Cidr(dn) if dn.contains(net))
                });
                (!shadowed)
                    .then(|| Cidr::new(net.addr(), net.prefix_len()).ok())
                    .flatten()
            }
            _ => None,
        })
        .collect()
}

/// The addresses a sandbox's DNS resolver answered, by name: the proxy dials what the agent
/// was told, and one sandbox's answers are never another's.
#[derive(Clone, Default)]
pub struct Answers(Arc<Mutex<HashMap<String, Vec<IpAddr>>>>);

impl Answers {
    pub fn remember(&self, name: &str, ips: Vec<IpAddr>) {
        if let Ok(mut a) = self.0.lock() {
            a.insert(name.to_owned(), ips);
        }
    }

    fn first(&self, name: &str) -> Option<IpAddr> {
        self.0
            .lock()
            .ok()
            .and_then(|a| a.get(name).and_then(|ips| ips.first().copied()))
    }
}

/// The proxy's name lookups for a sandbox (plain-HTTP Host checks, explicit-proxy targets) use
/// what the sandbox's resolver answered (already through `guard`), else ask the same upstream
/// resolver and keep the addresses `guard` accepts; never the system's.
pub fn host_lookup(answers: Answers, upstream: SocketAddr, guard: Guard) -> proxy::HostLookup {
    Arc::new(move |host: &str, port: u16| {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ip) = answers.first(&host) {
            return Box::pin(std::future::ready(Some(SocketAddr::new(ip, port))));
        }
        // A name the agent did not resolve through kz (a Host header, an SNI to a literal
        // address): ask the upstream server on the blocking pool. Asked inline, a silent server
        // stalled the proxy worker, and every connection on it, for the whole timeout.
        let guard = guard.clone();
        Box::pin(async move {
            let query = move || dns::lookup_blocking(upstream, &host, Duration::from_secs(3));
            let ips = tokio::task::spawn_blocking(query).await.unwrap_or_default();
            ips.into_iter()
                .find(|ip| guard.check_addr(*ip).is_ok())
                .map(|ip| SocketAddr::new(ip, port))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ConnectionRule;

    #[tokio::test(flavor = "current_thread")]
    async fn a_name_kz_did_not_resolve_is_looked_up_without_stalling_the_worker() {
        // A DNS server that never answers, and one name the agent resolved through kz.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let answers = Answers::default();
        let known: IpAddr = "10.1.2.3".parse().unwrap();
        answers.remember("api.test", vec![known]);
        let lookup = host_lookup(answers, silent.local_addr().unwrap(), Guard::default());

        assert_eq!(
            lookup("API.test.", 443).await,
            Some(SocketAddr::new(known, 443))
        );
        // The miss waits on the server; the proxy worker (this single-threaded runtime) keeps
        // running meanwhile. Asked inline, the call itself took the whole 3 s timeout.
        let started = std::time::Instant::now();
        let pending = lookup("unknown.test", 80);
        let tick = tokio::time::timeout(Duration::from_millis(100), pending).await;
        assert!(tick.is_err(), "a silent server cannot have answered");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the lookup held the runtime for {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_port_limited_deny_does_not_stop_resolution() {
        let mut deny = ConnectionRule::deny(HostPattern::host("api.example.com").unwrap());
        deny.ports = Some(vec![80]);
        let rules = ConnectionRules(vec![
            deny,
            ConnectionRule::allow(HostPattern::host("*.example.com").unwrap()),
        ]);
        assert!(name_allowed(&rules, "api.example.com"));
        assert!(!name_allowed(&rules, "example.org"));
    }

    #[test]
    fn literal_addresses_of_allow_rules_are_known_to_the_kernel_unless_denied_first() {
        let rules = ConnectionRules(vec![
            ConnectionRule::deny(HostPattern::host("10.0.0.9").unwrap()),
            ConnectionRule::allow(HostPattern::host("10.0.0.5").unwrap()),
            ConnectionRule::allow(HostPattern::host("10.0.0.9").unwrap()),
            ConnectionRule::allow(HostPattern::host("api.example.com").unwrap()),
        ]);
        let got = literal_ips_allowed(&rules);
        assert_eq!(got, vec![Cidr::host("10.0.0.5".parse().unwrap())]);
    }

    #[test]
    fn allow_cidr_ranges_are_known_to_the_kernel_unless_a_deny_range_holds_them() {
        let cidr =
            |allow, c: &str| ConnectionRule::from_table(0, allow, None, None, Some(c)).unwrap();
        let rules = ConnectionRules(vec![
            cidr(false, "10.0.0.0/8"),
            cidr(true, "10.1.0.0/16"),
            cidr(true, "127.0.0.1/8"),
            cidr(false, "192.168.0.0/16"),
        ]);
        let got = literal_ips_allowed(&rules);
        assert_eq!(
            got,
            vec![Cidr::new("127.0.0.0".parse().unwrap(), 8).unwrap()]
        );
        // A cidr rule names no name.
        assert!(!name_allowed(&rules, "localhost"));
    }
}
