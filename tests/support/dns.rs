//! A small authoritative DNS server for test zones, served over UDP and TCP inside a netns.
//!
//! It answers from a fixed zone (A, AAAA, CNAME), honours the requester's UDP payload size
//! (sets TC when the answer does not fit, so resolvers must retry over TCP), and has two
//! misbehaving names for error paths: `slow.*` never answers and `garbage.*` answers with bytes
//! that are not DNS. A name may instead have answer sets served in turn, one per A query, to
//! play a rebinding attacker ([`Zone::sets`]). Every question it receives is logged, with the
//! address it came from, so tests can prove a name was never forwarded (or how it arrived).
//! One server for every test: an upstream resolver in the upstream namespace
//! ([`TestDns::start`]), or a resolver on loopback of the client namespace
//! ([`TestDns::loopback`], 127.0.0.1 and [::1] on one port, as kz's own resolver listens).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use super::netns::Netns;

#[derive(Default, Clone)]
pub struct Zone {
    addrs: HashMap<String, Vec<IpAddr>>,
    cnames: HashMap<String, String>,
    /// Answer sets served in turn (one per A query), and how many were served per name.
    sets: HashMap<String, Vec<Vec<IpAddr>>>,
    turns: Arc<Mutex<HashMap<String, usize>>>,
    /// Suffixes answered for any name below them, with how many addresses per name, and the
    /// block of addresses each name got (in the order they were first asked).
    wildcards: Vec<(String, u32)>,
    blocks: Arc<Mutex<HashMap<String, u32>>>,
    pub ttl: u32,
}

impl Zone {
    pub fn new(ttl: u32) -> Zone {
        Zone {
            ttl,
            ..Zone::default()
        }
    }

    /// Adds A/AAAA records for `name` (lower case, no trailing dot).
    pub fn host(mut self, name: &str, ips: &[&str]) -> Zone {
        self.addrs.insert(
            name.to_owned(),
            ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        );
        self
    }

    /// `name` answers A queries with `sets[0]`, then `sets[1]`, … (round robin): a rebinding
    /// attacker, or a name whose answer mixes good and bad addresses.
    pub fn sets(mut self, name: &str, sets: &[&[&str]]) -> Zone {
        self.sets.insert(
            name.to_owned(),
            sets.iter()
                .map(|s| s.iter().map(|ip| ip.parse().unwrap()).collect())
                .collect(),
        );
        self
    }

    /// Every name below `suffix` answers with `per_name` IPv4 addresses of 10.128.0.0/9 that no
    /// other name gets: an agent asking for `n1.suffix`, `n2.suffix`, … collects ever new ones.
    pub fn wildcard(mut self, suffix: &str, per_name: u32) -> Zone {
        self.wildcards.push((suffix.to_owned(), per_name));
        self
    }

    fn wildcard_answer(&self, name: &str) -> Option<Vec<IpAddr>> {
        let (_, per_name) = self
            .wildcards
            .iter()
            .find(|(suffix, _)| name.ends_with(&format!(".{suffix}")))?;
        let mut blocks = self.blocks.lock().unwrap();
        let next = blocks.len() as u32;
        let block = *blocks.entry(name.to_owned()).or_insert(next);
        let base = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + block * per_name;
        Some(
            (0..*per_name)
                .map(|i| IpAddr::V4((base + i).into()))
                .collect(),
        )
    }

    /// The addresses `name` answers now (advancing its turn for A queries with answer sets).
    fn answer(&self, name: &str, query: RecordType) -> Option<Vec<IpAddr>> {
        if let Some(ips) = self.wildcard_answer(name) {
            return Some(ips);
        }
        if let Some(sets) = self.sets.get(name) {
            let mut turns = self.turns.lock().unwrap();
            let turn = turns.entry(name.to_owned()).or_default();
            let set = sets[*turn % sets.len()].clone();
            if query == RecordType::A {
                *turn += 1;
            }
            return Some(set);
        }
        self.addrs.get(name).cloned()
    }

    pub fn cname(mut self, name: &str, target: &str) -> Zone {
        self.cnames.insert(name.to_owned(), target.to_owned());
        self
    }
}

pub struct TestDns {
    pub addr: SocketAddr,
    /// "name TYPE" of every question received, in order.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Where each question came from, in the same order.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl TestDns {
    /// Serves `zone` on `addr` (UDP and TCP, the same port; port 0 picks one) inside `ns`;
    /// returns once both sockets are bound.
    pub fn start(ns: &Netns, addr: SocketAddr, zone: Zone) -> TestDns {
        let dns = TestDns {
            addr,
            log: Arc::default(),
            peers: Arc::default(),
        };
        dns.serve(ns, addr, Arc::new(zone))
    }

    /// Serves `zone` on 127.0.0.1 and [::1] of `ns`, on one free port (UDP and TCP).
    pub fn loopback(ns: &Netns, zone: Zone) -> TestDns {
        let zone = Arc::new(zone);
        let v4 = TestDns {
            addr: "127.0.0.1:0".parse().unwrap(),
            log: Arc::default(),
            peers: Arc::default(),
        }
        .serve(ns, "127.0.0.1:0".parse().unwrap(), zone.clone());
        let v6 = SocketAddr::new("::1".parse().unwrap(), v4.addr.port());
        let twin = TestDns {
            addr: v6,
            log: v4.log.clone(),
            peers: v4.peers.clone(),
        }
        .serve(ns, v6, zone);
        // The twin's thread serves on; its handle adds nothing the first one has not.
        let _ = twin;
        v4
    }

    fn serve(self, ns: &Netns, addr: SocketAddr, zone: Arc<Zone>) -> TestDns {
        let server_log = self.log.clone();
        let server_peers = self.peers.clone();
        let addr = ns.serve(move |tx| async move {
            // Port 0: the UDP socket picks the port and TCP takes the same one.
            let (udp, tcp) = loop {
                let udp = UdpSocket::bind(addr).await.unwrap();
                let bound = udp.local_addr().unwrap();
                match TcpListener::bind(bound).await {
                    Ok(tcp) => break (Arc::new(udp), tcp),
                    Err(_) if addr.port() == 0 => continue,
                    Err(e) => panic!("test DNS server cannot bind TCP {bound}: {e}"),
                }
            };
            tx.send(udp.local_addr().unwrap()).unwrap();
            let (z, l, p) = (zone.clone(), server_log.clone(), server_peers.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, peer) = tcp.accept().await.unwrap();
                    let (z, l, p) = (z.clone(), l.clone(), p.clone());
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let mut len = [0u8; 2];
                        while stream.read_exact(&mut len).await.is_ok() {
                            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                            if stream.read_exact(&mut buf).await.is_err() {
                                return;
                            }
                            p.lock().unwrap().push(peer);
                            if let Some(reply) = respond(&z, &l, &buf, usize::MAX) {
                                let mut out = (reply.len() as u16).to_be_bytes().to_vec();
                                out.extend_from_slice(&reply);
                                if stream.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            let mut buf = vec![0u8; 65535];
            loop {
                let (len, peer) = udp.recv_from(&mut buf).await.unwrap();
                server_peers.lock().unwrap().push(peer);
                if let Some(reply) = respond(&zone, &server_log, &buf[..len], 0) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        });
        TestDns { addr, ..self }
    }

    pub fn questions(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The first question (and where it came from) once it has arrived, waiting up to `wait`.
    pub fn first_question(&self, wait: std::time::Duration) -> Option<(String, SocketAddr)> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let (Some(q), Some(p)) = (
                self.log.lock().unwrap().first().cloned(),
                self.peers.lock().unwrap().first().copied(),
            ) {
                return Some((q, p));
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// `udp_limit == 0` means: use the requester's advertised payload size (UDP).
fn respond(
    zone: &Zone,
    log: &Mutex<Vec<String>>,
    packet: &[u8],
    udp_limit: usize,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let query = request.queries.first()?.clone();
    let name = query.name().to_lowercase().to_ascii();
    let name = name.trim_end_matches('.').to_owned();
    log.lock()
        .unwrap()
        .push(format!("{name} {}", query.query_type()));
    if name.starts_with("slow.") {
        return None;
    }
    if name.starts_with("garbage.") {
        let mut junk = packet[..2].to_vec();
        junk.extend_from_slice(&[0x81, 0x80, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
        return Some(junk);
    }
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(query.clone());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
    }
    let mut target = name.clone();
    let mut found = false;
    for _ in 0..8 {
        if let Some(next) = zone.cnames.get(&target) {
            reply.add_answer(Record::from_rdata(
                Name::from_ascii(format!("{target}.")).unwrap(),
                zone.ttl,
                RData::CNAME(CNAME(Name::from_ascii(format!("{next}.")).unwrap())),
            ));
            target = next.clone();
            found = true;
            continue;
        }
        break;
    }
    if let Some(ips) = zone.answer(&target, query.query_type()) {
        found = true;
        let owner = Name::from_ascii(format!("{target}.")).unwrap();
        for ip in &ips {
            let data = match (ip, query.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(owner.clone(), zone.ttl, data));
        }
    }
    if !found {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    let bytes = reply.to_vec().unwrap();
    let limit = if udp_limit == 0 {
        request.max_payload() as usize
    } else {
        udp_limit
    };
    if bytes.len() > limit {
        return Some(reply.truncate().to_vec().unwrap());
    }
    Some(bytes)
}
