//! The blind-mode resolver's packet handling (`intercept::dns`): a client query and an upstream
//! answer in, the client's reply out, without sockets.
//!
//! Properties: nothing panics; every reply re-parses as a DNS response with the client's id;
//! no address the guard refuses (loopback, metadata, ...) is in the reply or handed to the allow
//! map; no address in the authority or additional sections; no AAAA when IPv6 is off.
//!
//! Input: byte 0 flags (bit 0 UDP, bit 1 IPv6 allowed), bytes 1..3 the query's length
//! (big-endian), the query, then the upstream's answer.

#![no_main]

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{RData, Record};
use kz_agent::intercept::dns::{DnsConfig, fuzz_exchange};
use libfuzzer_sys::fuzz_target;

fn ip(r: &Record) -> Option<IpAddr> {
    match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, hi, lo, rest @ ..] = data else {
        return;
    };
    let qlen = usize::from(u16::from_be_bytes([*hi, *lo]));
    if qlen > rest.len() {
        return;
    }
    let (query, upstream) = rest.split_at(qlen);
    let mut config = DnsConfig::new(([127, 0, 0, 1], 0).into(), ([127, 0, 0, 1], 53).into());
    config.ipv6 = flags & 2 != 0;
    let udp = flags & 1 != 0;
    let Some((reply, ips)) = fuzz_exchange(query, upstream, &config, udp) else {
        return;
    };
    let parsed = Message::from_vec(&reply).expect("kz's own reply must parse");
    assert_eq!(parsed.metadata.message_type, MessageType::Response);
    assert_eq!(
        &reply[..2],
        &query[..2],
        "reply id differs from the query's"
    );
    if udp {
        assert!(
            reply.len() <= 1232.max(512),
            "udp reply of {} bytes",
            reply.len()
        );
    }
    for r in &parsed.answers {
        if let Some(a) = ip(r) {
            assert!(
                config.guard.check_addr(a).is_ok(),
                "refused address {a} answered"
            );
            assert!(config.ipv6 || a.is_ipv4(), "AAAA answered with IPv6 off");
        }
    }
    assert!(
        parsed.authorities.iter().all(|r| ip(r).is_none()),
        "address in authorities"
    );
    assert!(
        parsed.additionals.iter().all(|r| ip(r).is_none()),
        "address in additionals"
    );
    for r in &ips {
        assert!(
            config.guard.check_addr(r.ip).is_ok(),
            "refused address {} allowed",
            r.ip
        );
        assert!(
            config.ipv6 || r.ip.is_ipv4(),
            "IPv6 address allowed with IPv6 off"
        );
        assert!(r.ttl >= config.ttl_floor);
    }
});
