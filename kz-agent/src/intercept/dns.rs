//! The DNS resolver of a blind run: the only resolver a sandboxed agent can reach.
//!
//! The kernel programs send every UDP/53 datagram of the agent's cgroup here. (TCP is served too,
//! for clients that reach this address directly; the kernel does not redirect an agent's TCP/53
//! here yet, so under interception a truncated UDP answer cannot be retried over TCP.) For each
//! query:
//! - the name is checked with an injected allow predicate (the run's connection rules); a denied
//!   or malformed name gets REFUSED, is never forwarded upstream (so DNS cannot be used to leak
//!   data to a foreign authoritative server), and is audited;
//! - an allowed name is resolved by the upstream resolver (`[blind] resolver`, default the first
//!   `nameserver` of /etc/resolv.conf) with a fresh query of our own (random id, random source
//!   port, no client-supplied EDNS options), and every A/AAAA answer is handed to a callback that
//!   puts the addresses into the cgroup's allow map *before* the client sees the reply, so its
//!   `connect()` right after resolution cannot race the map update;
//! - an answer address the address guard refuses ([`DnsConfig::guard`], by default
//!   [`Classes::Local`]: loopback, link-local, cloud metadata, unspecified, multicast,
//!   broadcast, unless the run's `cidr` connection rules allow the range) is dropped from the
//!   reply *and* from what the callback sees, and audited (`dns_answer_dropped`, with the name
//!   and the address): an allowed wildcard name (`*.nip.io`) answered with `127.0.0.1` must not
//!   open this machine to the agent (DNS rebinding). The rest of the answer is kept; an answer
//!   left without addresses is an empty NOERROR, which clients report as "no address".
//!
//! Upstream UDP answers with TC set are retried over TCP; replies too big for the client's UDP
//! buffer are truncated (TC set) so the client retries over TCP, which we serve on the same port.
//! Upstream timeouts and garbage become SERVFAIL; client garbage becomes FORMERR (when it has an
//! id to answer to) or is dropped. Nothing here panics on input.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::audit::{AuditEvent, AuditSink};
use crate::egress::guard::{Classes, Guard, GuardError};

/// EDNS payload size we advertise upstream and accept from clients at most (the DNS flag day
/// 2020 value: avoids IP fragmentation).
const EDNS_PAYLOAD: u16 = 1232;
/// A DNS header is 12 bytes; anything shorter has no id we could answer to.
const HEADER_LEN: usize = 12;
/// Idle time after which a client TCP connection is closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Concurrent client TCP connections; more wait in the accept queue.
const MAX_TCP_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot bind the blind-mode DNS resolver on {addr}: {source}; pick a free address")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(
        "cannot read {path} to find the upstream DNS resolver: {source}; set `[blind] resolver = \"ADDR:PORT\"` in .keyzero.toml"
    )]
    ResolvConf { path: String, source: io::Error },
    #[error(
        "{path} names no usable `nameserver`; set `[blind] resolver = \"ADDR:PORT\"` in .keyzero.toml"
    )]
    NoNameserver { path: String },
}

/// Why the answer callback could not record the addresses (e.g. the allow map is full). The query
/// is then answered SERVFAIL: handing out addresses the kernel would refuse helps nobody.
pub type AnswerError = Box<dyn std::error::Error + Send + Sync>;

/// An address from an A/AAAA answer and how long it stays allowed (the record's TTL, raised to
/// the configured floor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedIp {
    pub ip: IpAddr,
    pub ttl: Duration,
}

/// Decides whether a name may be resolved. Receives the normalised name: lower case, no trailing
/// dot, labels of `[a-z0-9_-]` only.
pub type AllowName = Arc<dyn Fn(&str) -> bool + Send + Sync>;
/// Receives the normalised queried name and every A/AAAA address of its answer (CNAME targets
/// included). Called before the reply is sent to the client.
pub type OnAnswer = Arc<dyn Fn(&str, &[ResolvedIp]) -> Result<(), AnswerError> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where to listen (UDP and TCP on the same port). Port 0 picks a free one.
    pub listen: SocketAddr,
    /// The upstream resolver that answers allowed names.
    pub upstream: SocketAddr,
    /// How long to wait for the upstream per attempt (UDP, then TCP on truncation).
    pub upstream_timeout: Duration,
    /// Addresses stay allowed at least this long, whatever the record's TTL says, so a client
    /// that caches a little longer than the TTL does not get EPERM.
    pub ttl_floor: Duration,
    /// When false (native IPv6 not allowed by the run's policy) AAAA queries get an empty
    /// NOERROR answer, so clients go straight to IPv4 instead of hitting EPERM on IPv6 first.
    pub ipv6: bool,
    /// Concurrent upstream queries from UDP clients; datagrams beyond that are dropped (the
    /// client retries), which bounds memory and sockets under a flood.
    pub max_in_flight: usize,
    /// Which answer addresses are handed out; the others are dropped and audited. Default:
    /// [`Classes::Local`] with no explicit ranges (a sandbox passes its rules'
    /// [`crate::proxy::ConnectionRules::address_guard`]).
    pub guard: Guard,
}

impl DnsConfig {
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstream,
            upstream_timeout: Duration::from_secs(3),
            ttl_floor: Duration::from_secs(300),
            ipv6: false,
            max_in_flight: 256,
            guard: Guard::new(Vec::new(), Classes::Local),
        }
    }
}

/// What the resolver calls out to. Records say who tried through `audit` itself (e.g. an
/// [`crate::audit::WithContext`] adding the run id and program).
#[derive(Clone)]
pub struct DnsHooks {
    pub allow: AllowName,
    pub on_answer: OnAnswer,
    pub audit: Arc<dyn AuditSink>,
}

/// A running resolver. Dropping it (or [`DnsServer::shutdown`]) stops it.
pub struct DnsServer {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on the same address and starts serving on the current tokio runtime.
    pub async fn start(config: DnsConfig, hooks: DnsHooks) -> Result<DnsServer, DnsError> {
        let (udp, tcp) = bind_pair(config.listen).await?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared { config, hooks });
        let udp_task = tokio::spawn(serve_udp(Arc::new(udp), shared.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, shared));
        Ok(DnsServer {
            addr,
            tasks: vec![udp_task, tcp_task],
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(self) {
        // Drop aborts the tasks.
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The first usable `nameserver` of a resolv.conf file, port 53.
pub fn resolver_from_resolv_conf(path: &str) -> Result<SocketAddr, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
        path: path.to_owned(),
        source,
    })?;
    parse_resolv_conf(&text).ok_or_else(|| DnsError::NoNameserver {
        path: path.to_owned(),
    })
}

/// The system's upstream resolver: the first `nameserver` of /etc/resolv.conf.
pub fn system_resolver() -> Result<SocketAddr, DnsError> {
    resolver_from_resolv_conf("/etc/resolv.conf")
}

fn parse_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .map(|l| l.split(['#', ';']).next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        // Link-local addresses with a %scope cannot be used without the interface; skip them.
        .find_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

async fn bind_pair(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_err = |source| DnsError::Bind {
        addr: listen,
        source,
    };
    // With port 0 the kernel picks a free UDP port that may be taken for TCP: retry a few times.
    let attempts = if listen.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen).await.map_err(bind_err)?;
        let addr = udp.local_addr().map_err(bind_err)?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(bind_err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::AddrInUse, "no free port")
    })))
}

struct Shared {
    config: DnsConfig,
    hooks: DnsHooks,
}

/// Which transport a query came in on: decides whether a reply must fit a UDP buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let mut buf = vec![0u8; 65535];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                // ICMP errors from earlier replies surface here (ECONNREFUSED); keep serving.
                tracing::debug!(error = %e, "dns: udp receive error");
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if FLOOD_LOG.allow() {
                tracing::warn!(%peer, "dns: too many queries in flight, dropping one");
            }
            continue;
        };
        let packet = buf[..len].to_vec();
        let socket = socket.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = handle_query(&shared, &packet, peer, Transport::Udp).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                tracing::debug!(%peer, error = %e, "dns: cannot send udp reply");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "dns: tcp accept error");
                // Out of file descriptors and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp_connection(stream, peer, &shared).await {
                tracing::debug!(%peer, error = %e, "dns: tcp connection ended");
            }
        });
    }
}

async fn serve_tcp_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()), // idle
        }
        let len = usize::from(u16::from_be_bytes(len));
        let mut packet = vec![0u8; len];
        // A client that announces a length and then stalls is cut off, not waited for.
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "stalled mid-message"))??;
        let Some(reply) = handle_query(shared, &packet, peer, Transport::Tcp).await else {
            // Nothing sensible to answer (no header): close, the stream is out of sync anyway.
            return Ok(());
        };
        write_tcp_message(&mut stream, &reply).await?;
    }
}

async fn write_tcp_message(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "message over 64 KiB"))?;
    let mut out = Vec::with_capacity(message.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    stream.write_all(&out).await
}

/// Answers one client packet. `None` means: send nothing (no header to answer, or a response
/// packet sent to us).
async fn handle_query(
    shared: &Shared,
    packet: &[u8],
    peer: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    if packet.len() < HEADER_LEN {
        return None;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    // QR bit set: a response, never answer it (that is how reflection loops start).
    if packet[2] & 0x80 != 0 {
        return None;
    }
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "dns: malformed query");
            return encode(&Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            ));
        }
    };
    let reply = answer(shared, &request, peer, transport).await;
    encode_for(&reply, &request, transport)
}

/// The reply's bytes, truncated (TC set) when they exceed what the client's transport takes.
fn encode_for(reply: &Message, request: &Message, transport: Transport) -> Option<Vec<u8>> {
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => usize::from(request.max_payload().min(EDNS_PAYLOAD)),
    };
    let bytes = encode(reply)?;
    if bytes.len() > limit {
        return encode(&reply.truncate());
    }
    Some(bytes)
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "dns: cannot encode a reply");
            None
        }
    }
}

/// The reply message for a parsed query.
async fn answer(
    shared: &Shared,
    request: &Message,
    peer: SocketAddr,
    transport: Transport,
) -> Message {
    let meta = request.metadata;
    let mut reply = reply_to(request);
    if meta.message_type != MessageType::Query || meta.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return reply;
    }
    let [query] = request.queries.as_slice() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    let qtype = query.query_type();
    let Some(name) = normalize_name(query.name()) else {
        refuse(
            shared,
            "invalid name",
            &query.name().to_ascii(),
            qtype,
            peer,
            transport,
        );
        reply.metadata.response_code = ResponseCode::Refused;
        return reply;
    };
    if query.query_class() != DNSClass::IN || !(shared.hooks.allow)(&name) {
        refuse(shared, "name not allowed", &name, qtype, peer, transport);
        reply.metadata.response_code = ResponseCode::Refused;
        return reply;
    }
    if qtype == RecordType::AAAA && !shared.config.ipv6 {
        // NODATA: the name exists but has no address we would let the client use.
        return reply;
    }
    let upstream = match resolve_upstream(&shared.config, query).await {
        Ok(m) => m,
        Err(reason) => {
            tracing::warn!(name = %name, upstream = %shared.config.upstream, reason, "dns: upstream failed");
            reply.metadata.response_code = ResponseCode::ServFail;
            return reply;
        }
    };
    let (ips, dropped) = addresses(&upstream, &shared.config);
    for (ip, why) in &dropped {
        drop_answer(shared, &name, qtype, *ip, why, peer, transport);
    }
    if !ips.is_empty()
        && let Err(e) = (shared.hooks.on_answer)(&name, &ips)
    {
        if REFUSED_LOG.allow() {
            tracing::warn!(name = %name, error = %e, "dns: cannot allow the answer's addresses");
        }
        reply.metadata.response_code = ResponseCode::ServFail;
        return reply;
    }
    tracing::debug!(name = %name, count = ips.len(), dropped = dropped.len(), "dns: resolved");
    fill_reply(&mut reply, upstream, &dropped, shared.config.ipv6);
    reply
}

/// The reply's header, question and EDNS for `request`, before any answer.
fn reply_to(request: &Message) -> Message {
    let meta = request.metadata;
    let mut reply = Message::response(meta.id, meta.op_code);
    reply.metadata.recursion_desired = meta.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

/// Copies what the client may see of `upstream` into `reply`: its rcode, its answers but the
/// `dropped` addresses (and AAAA unless `ipv6`), its authorities but any address.
fn fill_reply(
    reply: &mut Message,
    upstream: Message,
    dropped: &[(IpAddr, GuardError)],
    ipv6: bool,
) {
    let refused = |r: &Record| record_ip(r).is_some_and(|ip| dropped.iter().any(|(d, _)| *d == ip));
    reply.metadata.response_code = upstream.metadata.response_code;
    reply.metadata.authentic_data = upstream.metadata.authentic_data && dropped.is_empty();
    reply.answers = upstream
        .answers
        .into_iter()
        .filter(|r| ipv6 || r.record_type() != RecordType::AAAA)
        .filter(|r| !refused(r))
        .collect();
    // Addresses have no business in the authority section (NS and SOA live there); whatever a
    // resolver put there would not be in the allow map, and must not reach the client either.
    reply.authorities = upstream
        .authorities
        .into_iter()
        .filter(|r| record_ip(r).is_none())
        .collect();
    // Additional records are dropped: resolvers put glue there that clients do not need, and
    // addresses there would not be in the allow map.
}

/// For the fuzz target (fuzz/fuzz_targets/dns.rs) only: one exchange without sockets, hooks or
/// audit. `query` is the client's packet, `upstream` the upstream's reply to the query kz sends
/// for it (its id is taken as ours, which the fuzzer cannot guess). Returns the bytes the client
/// gets (`None`: nothing is sent) and the addresses the allow map would get. Names are allowed
/// as long as they normalise.
#[doc(hidden)]
pub fn fuzz_exchange(
    query: &[u8],
    upstream: &[u8],
    config: &DnsConfig,
    udp: bool,
) -> Option<(Vec<u8>, Vec<ResolvedIp>)> {
    let transport = if udp { Transport::Udp } else { Transport::Tcp };
    if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
        return None;
    }
    let Ok(request) = Message::from_vec(query) else {
        let id = u16::from_be_bytes([query[0], query[1]]);
        let err = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
        return encode(&err).map(|b| (b, Vec::new()));
    };
    let mut reply = reply_to(&request);
    let meta = request.metadata;
    let q = match request.queries.as_slice() {
        [q] if meta.message_type == MessageType::Query
            && meta.op_code == OpCode::Query
            && q.query_class() == DNSClass::IN
            && normalize_name(q.name()).is_some() =>
        {
            q
        }
        _ => {
            reply.metadata.response_code = ResponseCode::Refused;
            return encode_for(&reply, &request, transport).map(|b| (b, Vec::new()));
        }
    };
    if q.query_type() == RecordType::AAAA && !config.ipv6 {
        return encode_for(&reply, &request, transport).map(|b| (b, Vec::new()));
    }
    let mut ours = upstream_query(q);
    if upstream.len() >= 2 {
        ours.metadata.id = u16::from_be_bytes([upstream[0], upstream[1]]);
    }
    let ips = match check_response(&ours, upstream) {
        Ok(response) => {
            let (ips, dropped) = addresses(&response, config);
            fill_reply(&mut reply, response, &dropped, config.ipv6);
            ips
        }
        Err(_) => {
            reply.metadata.response_code = ResponseCode::ServFail;
            Vec::new()
        }
    };
    encode_for(&reply, &request, transport).map(|b| (b, ips))
}

/// The address of an A or AAAA record.
fn record_ip(r: &Record) -> Option<IpAddr> {
    match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// The A/AAAA addresses of an upstream answer with their allow-map lifetimes, and the ones the
/// address guard refuses (with why).
fn addresses(
    upstream: &Message,
    config: &DnsConfig,
) -> (Vec<ResolvedIp>, Vec<(IpAddr, GuardError)>) {
    let mut allowed = Vec::new();
    let mut dropped: Vec<(IpAddr, GuardError)> = Vec::new();
    for r in &upstream.answers {
        let Some(ip) = record_ip(r) else { continue };
        if ip.is_ipv6() && !config.ipv6 {
            continue;
        }
        match config.guard.check_addr(ip) {
            Ok(()) => {
                let ttl = Duration::from_secs(u64::from(r.ttl)).max(config.ttl_floor);
                allowed.push(ResolvedIp { ip, ttl });
            }
            Err(e) if !dropped.iter().any(|(d, _)| *d == ip) => dropped.push((ip, e)),
            Err(_) => {}
        }
    }
    (allowed, dropped)
}

/// At most [`LogLimit::PER_MINUTE`] lines a minute from one call site. The agent decides how
/// often these happen, and kz's own log must not become its megaphone (or bury what matters);
/// the audit log keeps every event.
struct LogLimit {
    minute: AtomicU64,
    count: AtomicU32,
}

impl LogLimit {
    const PER_MINUTE: u32 = 20;

    const fn new() -> Self {
        Self {
            minute: AtomicU64::new(0),
            count: AtomicU32::new(0),
        }
    }

    fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 60);
        if self.minute.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if n == Self::PER_MINUTE {
            tracing::warn!(
                "dns: more of the same this minute; not logged (the audit log has them)"
            );
        }
        n < Self::PER_MINUTE
    }
}

static FLOOD_LOG: LogLimit = LogLimit::new();
static REFUSED_LOG: LogLimit = LogLimit::new();
static DROPPED_LOG: LogLimit = LogLimit::new();

fn drop_answer(
    shared: &Shared,
    name: &str,
    qtype: RecordType,
    ip: IpAddr,
    why: &GuardError,
    peer: SocketAddr,
    transport: Transport,
) {
    if DROPPED_LOG.allow() {
        tracing::warn!(name, %ip, %peer, reason = why.class(), "dns: answer address dropped");
    }
    let event = AuditEvent::new("dns_answer_dropped")
        .with("name", name)
        .with("address", ip.to_string())
        .with("qtype", qtype.to_string())
        .with("client", peer.to_string())
        .with("transport", transport.as_str())
        .with("reason", why.class());
    if let Err(e) = shared.hooks.audit.record(event) {
        tracing::error!(error = %e, "dns: cannot audit a dropped answer");
    }
}

fn refuse(
    shared: &Shared,
    reason: &str,
    name: &str,
    qtype: RecordType,
    peer: SocketAddr,
    transport: Transport,
) {
    tracing::info!(name, %qtype, %peer, reason, "dns: refused");
    let event = AuditEvent::new("dns_refused")
        .with("name", name)
        .with("qtype", qtype.to_string())
        .with("client", peer.to_string())
        .with("transport", transport.as_str())
        .with("reason", reason);
    if let Err(e) = shared.hooks.audit.record(event) {
        tracing::error!(error = %e, "dns: cannot audit a refused query");
    }
}

/// Lower-case dotted form of a query name, or `None` when a label holds anything but
/// `[A-Za-z0-9_-]` (a label containing a dot or a NUL would otherwise make a name look like a
/// different, allowed one once printed).
pub fn normalize_name(name: &Name) -> Option<String> {
    let mut out = String::new();
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    if out.is_empty() {
        return None; // the root: nothing an agent needs
    }
    Some(out)
}

/// Resolves one question upstream: UDP first, TCP when the UDP answer is truncated. The error is
/// a short reason for the log.
async fn resolve_upstream(config: &DnsConfig, query: &Query) -> Result<Message, &'static str> {
    let request = upstream_query(query);
    let bytes = request.to_vec().map_err(|_| "cannot encode the query")?;

    let udp = tokio::time::timeout(
        config.upstream_timeout,
        upstream_udp(config.upstream, &bytes),
    )
    .await
    .map_err(|_| "timed out (udp)")?
    .map_err(|_| "udp exchange failed")?;
    let response = check_response(&request, &udp)?;
    if !response.metadata.truncation {
        return Ok(response);
    }
    let tcp = tokio::time::timeout(
        config.upstream_timeout,
        upstream_tcp(config.upstream, &bytes),
    )
    .await
    .map_err(|_| "timed out (tcp)")?
    .map_err(|_| "tcp exchange failed")?;
    check_response(&request, &tcp)
}

/// The query kz sends upstream for a client's question: a fresh id, recursion, our EDNS.
fn upstream_query(query: &Query) -> Message {
    let mut request = Message::query();
    request.metadata.recursion_desired = true;
    request.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    request.set_edns(edns);
    request
}

/// Parses an upstream reply and checks it answers our question (id, type and name).
fn check_response(request: &Message, bytes: &[u8]) -> Result<Message, &'static str> {
    let response = Message::from_vec(bytes).map_err(|_| "malformed answer")?;
    if response.metadata.id != request.metadata.id
        || response.metadata.message_type != MessageType::Response
    {
        return Err("answer for another query");
    }
    // Names compare case-insensitively: resolvers may normalise or 0x20-randomise case.
    let same_question = match (request.queries.first(), response.queries.first()) {
        (Some(q), Some(r)) => {
            q.query_type() == r.query_type() && q.name().to_lowercase() == r.name().to_lowercase()
        }
        _ => false,
    };
    if !same_question || response.queries.len() != 1 {
        return Err("answer for another question");
    }
    Ok(response)
}

async fn upstream_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // A fresh socket per query: random source port, and connect() makes the kernel drop
    // datagrams from anyone but the upstream (spoofing needs the id *and* the port).
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let len = socket.recv(&mut buf).await?;
        // Ignore stray datagrams too short to be a reply; the timeout bounds the wait.
        if len >= HEADER_LEN && buf[..2] == query[..2] {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn upstream_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_tcp_message(&mut stream, query).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// The IPv4 addresses of `name` from `upstream`, blocking (for synchronous callers such as the
/// proxy's name lookup hook). Empty on any failure: callers treat that as "does not resolve".
pub fn lookup_blocking(upstream: SocketAddr, name: &str, timeout: Duration) -> Vec<IpAddr> {
    let Ok(qname) = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))) else {
        return Vec::new();
    };
    let mut request = Message::query();
    request.metadata.recursion_desired = true;
    request.add_query(Query::query(qname, RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    request.set_edns(edns);
    let Ok(bytes) = request.to_vec() else {
        return Vec::new();
    };
    let exchange = || -> io::Result<Vec<u8>> {
        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(local)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(upstream)?;
        socket.send(&bytes)?;
        let mut buf = vec![0u8; 65535];
        let len = socket.recv(&mut buf)?;
        buf.truncate(len);
        let truncated = buf.len() >= HEADER_LEN && buf[2] & 0x02 != 0;
        if !truncated {
            return Ok(buf);
        }
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect_timeout(&upstream, timeout)?;
        tcp.set_read_timeout(Some(timeout))?;
        let len = u16::try_from(bytes.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "query too long"))?;
        tcp.write_all(&len.to_be_bytes())?;
        tcp.write_all(&bytes)?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut buf)?;
        Ok(buf)
    };
    let Ok(reply) = exchange() else {
        return Vec::new();
    };
    let Ok(response) = check_response(&request, &reply) else {
        return Vec::new();
    };
    response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_first_usable_nameserver() {
        let text = "# comment\nsearch example\nnameserver fe80::1%eth0\nnameserver 10.0.0.2 # x\nnameserver 10.0.0.3\n";
        assert_eq!(
            parse_resolv_conf(text),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(parse_resolv_conf("search x\n"), None);
        assert_eq!(
            parse_resolv_conf("nameserver ::1\n"),
            Some("[::1]:53".parse().unwrap())
        );
    }

    #[test]
    fn names_are_normalised_and_odd_labels_rejected() {
        let n = Name::from_ascii("API.GitHub.com.").unwrap();
        assert_eq!(normalize_name(&n).as_deref(), Some("api.github.com"));
        let n = Name::from_ascii("_srv._tcp.x-y.test").unwrap();
        assert_eq!(normalize_name(&n).as_deref(), Some("_srv._tcp.x-y.test"));
        // One label holding a dot: printed it would read as "api.github.com".
        let n = Name::from_labels(vec![b"api.github".to_vec(), b"com".to_vec()]).unwrap();
        assert_eq!(normalize_name(&n), None);
        let n = Name::from_labels(vec![b"a\0b".to_vec(), b"com".to_vec()]).unwrap();
        assert_eq!(normalize_name(&n), None);
        assert_eq!(normalize_name(&Name::root()), None);
    }
}

#[cfg(test)]
mod log_limit_tests {
    #[test]
    fn a_flood_is_logged_a_few_times_a_minute() {
        let l = super::LogLimit::new();
        let allowed = (0..1000).filter(|_| l.allow()).count();
        // A minute boundary during the loop allows at most one more window.
        assert!(
            (super::LogLimit::PER_MINUTE as usize..=2 * super::LogLimit::PER_MINUTE as usize)
                .contains(&allowed),
            "{allowed}"
        );
    }
}
