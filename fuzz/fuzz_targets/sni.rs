//! The transparent proxy's ClientHello peek (`proxy::routing::tls_intercept`): rustls's
//! `Acceptor` reads the hello, kz takes the SNI, normalises it, checks the connection rules and
//! mints a leaf certificate for it.
//!
//! Properties: nothing panics; every SNI rustls accepts normalises to a name whose rule verdict
//! matches its suffix (the rules here allow `*.example.com` only); and the CA can mint a leaf
//! for it (a name kz cannot mint for would fail the handshake of a permitted host).
//!
//! Input: the bytes the client sends first (TLS records).

#![no_main]

use std::sync::OnceLock;

use kz_agent::egress::scope::normalize;
use kz_agent::proxy::{CertAuthority, ConnectionRule, ConnectionRules, HostPattern, Verdict};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static CertAuthority {
    static CA: OnceLock<CertAuthority> = OnceLock::new();
    CA.get_or_init(|| CertAuthority::generate(64).expect("a CA"))
}

fn rules() -> &'static ConnectionRules {
    static RULES: OnceLock<ConnectionRules> = OnceLock::new();
    RULES.get_or_init(|| {
        let pattern = HostPattern::host("*.example.com").expect("a host pattern");
        ConnectionRules(vec![ConnectionRule::allow(pattern)])
    })
}

fuzz_target!(|data: &[u8]| {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = data;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let Ok(Some(accepted)) = acceptor.accept() else {
        return;
    };
    let hello = accepted.client_hello();
    let _alpn: Vec<Vec<u8>> = hello
        .alpn()
        .map(|it| it.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    let Some(sni) = hello.server_name().map(normalize) else {
        return;
    };
    let allowed = rules().check(&sni, 443) != Verdict::Deny;
    assert_eq!(
        allowed,
        sni.ends_with(".example.com") && sni.len() > ".example.com".len(),
        "verdict for {sni:?}"
    );
    if let Err(e) = ca().leaf(&sni) {
        panic!("no leaf for the accepted SNI {sni:?}: {e}");
    }
});
