//! Name resolution for `fetch`: the system resolver, or one DNS server named by the operator.
//!
//! A configured server (`--mcp-dns`) lets a deployment pin which resolver decides where
//! credentials go (instead of whatever /etc/resolv.conf says) and lets tests answer names with
//! addresses they control. Either way the caller gets every address and checks all of them.

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::UdpSocket;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot resolve '{host}': {reason}")]
    Failed { host: String, reason: String },
    #[error("'{host}' has no A or AAAA records")]
    NoAddresses { host: String },
    #[error("resolving '{host}' timed out after {secs}s")]
    Timeout { host: String, secs: u64 },
}

#[derive(Debug, Clone, Default)]
pub enum Dns {
    /// getaddrinfo through tokio (honours /etc/hosts and /etc/resolv.conf).
    #[default]
    System,
    /// Plain DNS over UDP to this server, A and AAAA queries.
    Server(SocketAddr),
}

impl Dns {
    pub async fn lookup(&self, host: &str, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
        let work = async {
            match self {
                Dns::System => system(host).await,
                Dns::Server(server) => {
                    let mut addrs = query(*server, host, RecordType::A).await?;
                    addrs.extend(query(*server, host, RecordType::AAAA).await?);
                    Ok(addrs)
                }
            }
        };
        let addrs =
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| DnsError::Timeout {
                    host: host.to_owned(),
                    secs: timeout.as_secs(),
                })??;
        if addrs.is_empty() {
            return Err(DnsError::NoAddresses {
                host: host.to_owned(),
            });
        }
        Ok(addrs)
    }
}

async fn system(host: &str) -> Result<Vec<IpAddr>, DnsError> {
    let addrs = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| DnsError::Failed {
            host: host.to_owned(),
            reason: e.to_string(),
        })?;
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs {
        if !out.contains(&a.ip()) {
            out.push(a.ip());
        }
    }
    Ok(out)
}

async fn query(server: SocketAddr, host: &str, rtype: RecordType) -> Result<Vec<IpAddr>, DnsError> {
    let failed = |reason: String| DnsError::Failed {
        host: host.to_owned(),
        reason,
    };
    let name = Name::from_ascii(host).map_err(|e| failed(format!("not a valid DNS name: {e}")))?;
    let mut fqdn = name.clone();
    fqdn.set_fqdn(true);
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(fqdn.clone(), rtype));
    let bytes = msg
        .to_vec()
        .map_err(|e| failed(format!("encoding the query: {e}")))?;

    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| failed(format!("opening a UDP socket: {e}")))?;
    sock.connect(server)
        .await
        .map_err(|e| failed(format!("DNS server {server}: {e}")))?;
    sock.send(&bytes)
        .await
        .map_err(|e| failed(format!("DNS server {server}: {e}")))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| failed(format!("DNS server {server}: {e}")))?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue; // garbage datagram: keep waiting for the real answer (the caller times out)
        };
        // Only a response to our id and question counts (spoofed or stray datagrams are ignored).
        if reply.metadata.id != id
            || reply.metadata.message_type != MessageType::Response
            || reply.queries.first().map(|q| q.name()) != Some(&fqdn)
        {
            continue;
        }
        return match reply.metadata.response_code {
            ResponseCode::NoError => Ok(reply
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect()),
            ResponseCode::NXDomain => Err(failed("no such name (NXDOMAIN)".to_owned())),
            other => Err(failed(format!("DNS server {server} answered {other}"))),
        };
    }
}
