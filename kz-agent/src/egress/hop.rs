//! Hop-by-hop headers: the ones that describe one connection, not the message (RFC 9110
//! §7.6.1), plus the headers a `Connection` header names. A client kz relays for must not
//! steer kz's own upstream connection with them (or smuggle a second request through framing),
//! and an upstream's must not reach the agent.
//!
//! Callers add what is theirs to refuse on top (MCP: cookies, the credential header; PDP: the
//! kz token's `Authorization`), next to their reason.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Always connection-specific. `upgrade` is not in the list: a WebSocket handshake relays it,
/// so [`strip`] decides about it (and [`is_hop_by_hop`] counts it).
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether `name` (lower-case, as `HeaderName::as_str` gives it) is hop-by-hop, `upgrade`
/// included.
pub fn is_hop_by_hop(name: &str) -> bool {
    name == header::UPGRADE.as_str() || HOP_BY_HOP.iter().any(|h| h.as_str() == name)
}

/// The header names listed in `Connection` (lower-case, trimmed; tokens that are no header name
/// are skipped). They are hop-by-hop too.
pub fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Removes every hop-by-hop header and every header `Connection` names. With `keep_upgrade`
/// (a WebSocket handshake being relayed) `Upgrade` stays and `Connection: upgrade` is set
/// again; otherwise `Upgrade` goes too.
pub fn strip(h: &mut HeaderMap, keep_upgrade: bool) {
    for n in connection_named(h) {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_listed_and_named_headers() {
        let mut h = map(&[
            ("connection", "close, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip(&mut h, false);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn keeps_upgrade_for_a_relayed_handshake() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn classification() {
        for n in [
            "connection",
            "te",
            "upgrade",
            "proxy-authorization",
            "trailer",
        ] {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in ["host", "authorization", "set-cookie", "content-length"] {
            assert!(!is_hop_by_hop(n), "{n}");
        }
        let h = map(&[("connection", "a, B , bad name")]);
        let named: Vec<String> = connection_named(&h).iter().map(|n| n.to_string()).collect();
        assert_eq!(named, ["a", "b"]);
    }
}
