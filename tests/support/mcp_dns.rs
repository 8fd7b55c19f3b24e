//! A tiny authoritative DNS server for tests: answers A queries from a fixed table, NXDOMAIN
//! for anything else, empty NOERROR for other types. A name may have several answer sets,
//! served in turn (one per A query) — enough to play a rebinding attacker. Lets a test make a name resolve to any
//! address (e.g. a private one an SSRF guard must refuse) without touching /etc/hosts or any
//! outside resolver.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

/// Binds `127.0.0.1:0` on the calling thread's network namespace and serves forever on a
/// background thread. Returns the bound address.
pub fn serve(table: &[(&str, Ipv4Addr)]) -> SocketAddr {
    let sets: Vec<(&str, Vec<Vec<Ipv4Addr>>)> =
        table.iter().map(|(n, a)| (*n, vec![vec![*a]])).collect();
    serve_sets(&sets)
}

/// Like [`serve`], but each name has answer sets (each a list of A records) served in turn.
pub fn serve_sets(table: &[(&str, Vec<Vec<Ipv4Addr>>)]) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
    let addr = sock.local_addr().unwrap();
    let table: HashMap<String, Vec<Vec<Ipv4Addr>>> = table
        .iter()
        .map(|(n, a)| (n.trim_end_matches('.').to_ascii_lowercase(), a.clone()))
        .collect();
    let mut turn: HashMap<String, usize> = HashMap::new();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            reply.metadata.recursion_desired = query.metadata.recursion_desired;
            reply.metadata.authoritative = true;
            let Some(q) = query.queries.first().cloned() else {
                continue;
            };
            let name = q.name().to_ascii();
            let key = name.trim_end_matches('.').to_ascii_lowercase();
            reply.add_query(q.clone());
            match table.get(&key) {
                None => reply.metadata.response_code = ResponseCode::NXDomain,
                Some(sets) if q.query_type() == RecordType::A => {
                    let n = turn.entry(key.clone()).or_default();
                    for ip in &sets[*n % sets.len()] {
                        reply.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(*ip))));
                    }
                    *n += 1;
                }
                Some(_) => {}
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = sock.send_to(&bytes, peer);
            }
        }
    });
    addr
}
