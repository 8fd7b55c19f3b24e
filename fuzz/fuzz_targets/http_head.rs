//! The proxy's request-head checks (`proxy::exchange`): an HTTP/1 head parsed as hyper parses
//! it (httparse), then the `Host`/authority check and the upstream request line.
//!
//! Property: a head that `misdirected` lets through for the verified host and port, and that
//! `target_uri` accepts, leaves with a request target whose authority is that host (and that
//! port, if it names one), as the `http` crate reads it (the upstream's parser), and a `Host`
//! header that says the same. The two parsers disagreeing is how a request aimed at another
//! virtual host would slip past the check.
//!
//! Input: byte 0 flags (bit 0 TLS, bit 1 a non-default port), then the head.

#![no_main]

use http::uri::Authority;
use kz_agent::proxy::fuzzing::{misdirected, split_authority, target_uri};
use libfuzzer_sys::fuzz_target;

const VERIFIED: &str = "api.example.com";

fn parts(head: &[u8]) -> Option<http::request::Parts> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let mut b = http::Request::builder().method(req.method?).uri(req.path?);
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    Some(b.body(()).ok()?.into_parts().0)
}

fn same_host(name: &str) -> bool {
    name.trim_end_matches('.')
        .eq_ignore_ascii_case(VERIFIED.trim_end_matches('.'))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let tls = flags & 1 != 0;
    let port = match (tls, flags & 2 != 0) {
        (true, false) => 443,
        (false, false) => 80,
        (true, true) => 8443,
        (false, true) => 8080,
    };
    let Some(mut p) = parts(head) else {
        return;
    };
    // split_authority must not panic on any claimed authority.
    for h in p.headers.get_all(http::header::HOST) {
        let _ = split_authority(&String::from_utf8_lossy(h.as_bytes()), port);
    }
    if misdirected(&p, VERIFIED, port).is_some() {
        return;
    }
    if target_uri(&mut p, VERIFIED, port, tls, None).is_err() {
        return;
    }
    // A claim without a port means the connection's port (`misdirected`'s documented rule; the
    // upstream is dialled at the verified address and port whatever the line says), so only an
    // explicit port must match.
    let auth = p.uri.authority().expect("target_uri gives an authority");
    assert!(
        same_host(auth.host()),
        "authority {auth} passed the check for {VERIFIED}"
    );
    if let Some(p) = auth.port_u16() {
        assert_eq!(p, port, "authority {auth}");
    }
    for h in p.headers.get_all(http::header::HOST) {
        if let Ok(a) = Authority::try_from(h.as_bytes()) {
            assert!(
                same_host(a.host()),
                "Host {a} passed the check for {VERIFIED}"
            );
            if let Some(p) = a.port_u16() {
                assert_eq!(p, port, "Host {a}");
            }
        }
    }
});
