//! One proxy, many sandboxes: a connection is served by the session its kernel record names,
//! and by no other. No root needed: the "kernel record" is the test's own lookup, keyed by the
//! client's source port, exactly as the interception core's table is keyed by the client's
//! address; the upstream is a real HTTPS server on loopback.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kz_agent::audit::MemorySink;
use kz_agent::proxy::{self, CertAuthority, Redirected, Session, SessionId, TokenTable};
use kz_agent::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use support::tls::{TestCa, client_config, server_config};
use support::upstream::{State, serve};

const A: SessionId = 1001;
const B: SessionId = 1002;
const REAL_A: &str = "sk-real-of-sandbox-a-0123456789";
const REAL_B: &str = "sk-real-of-sandbox-b-9876543210";

/// Source port → what the kernel would have recorded for that connect.
type Records = Arc<Mutex<HashMap<u16, Redirected>>>;

struct Node {
    proxy: proxy::ProxyHandle,
    records: Records,
    upstream: SocketAddr,
    seen: Arc<State>,
    node_audit: Arc<MemorySink>,
    /// (masked token, CA PEM, audit) per session.
    sessions: HashMap<SessionId, (String, String, Arc<MemorySink>)>,
    _dir: support::pdp::TempDir,
}

fn session(id: SessionId, real: &str) -> (Session, String, String, Arc<MemorySink>) {
    let masked = TokenTable::generate_masked();
    let tokens = TokenTable::new();
    // The same secret name in both sandboxes, scoped to the same host.
    tokens
        .insert_named(
            "API_KEY",
            &masked,
            Secret::new(real),
            vec!["api.test".into()],
        )
        .unwrap();
    let ca = Arc::new(CertAuthority::generate(16).unwrap());
    let pem = ca.cert_pem().to_owned();
    let audit = Arc::new(MemorySink::new());
    let mut session = Session::new(id, ca, tokens, audit.clone());
    // The upstream is on loopback: the proxy dials it only because a rule opens that address.
    session.rules = proxy::ConnectionRules(vec![
        proxy::ConnectionRule::allow(proxy::HostPattern::cidr("127.0.0.1").unwrap()),
        proxy::ConnectionRule::allow(proxy::HostPattern::host("api.test").unwrap()),
    ]);
    (session, masked, pem, audit)
}

async fn node() -> Node {
    let dir = support::pdp::TempDir::new("sessions");
    let ca = TestCa::new("kz sessions test CA");
    let cert = ca.server_cert(&["api.test"], &[]);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    let seen = State::new(REAL_A);
    tokio::spawn(serve(l, Some(server_config(&cert)), seen.clone()));

    let node_audit = Arc::new(MemorySink::new());
    let mut cfg = proxy::Config::new(node_audit.clone());
    cfg.transparent_listen = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.upstream_ca = Some(ca.write_pem(&dir.0, "upstream-ca.pem"));
    let records = Records::default();
    let r = records.clone();
    cfg.orig_dst = Some(Arc::new(move |peer: SocketAddr| {
        r.lock().unwrap().get(&peer.port()).copied()
    }));
    let proxy = proxy::start(cfg).await.unwrap();
    let mut sessions = HashMap::new();
    for (id, real) in [(A, REAL_A), (B, REAL_B)] {
        let (s, masked, pem, audit) = session(id, real);
        proxy.admit(s).unwrap();
        sessions.insert(id, (masked, pem, audit));
    }
    Node {
        proxy,
        records,
        upstream,
        seen,
        node_audit,
        sessions,
        _dir: dir,
    }
}

impl Node {
    /// A request from a process of sandbox `from` (as the kernel records it: `recorded`),
    /// trusting the CA `trust` was given, carrying `token`. The response text, or the error.
    async fn get(
        &self,
        recorded: SessionId,
        trust: SessionId,
        token: &str,
    ) -> std::io::Result<String> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse().unwrap())?;
        let port = socket.local_addr()?.port();
        self.records.lock().unwrap().insert(
            port,
            Redirected {
                dest: self.upstream,
                session: recorded,
            },
        );
        let tcp = socket.connect(self.proxy.transparent_addrs[0]).await?;
        let pem = &self.sessions[&trust].1;
        let tls = TlsConnector::from(client_config(pem, &[b"http/1.1"]));
        let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
        let mut s = tokio::time::timeout(Duration::from_secs(10), tls.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
        let req = format!(
            "GET /echo HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .map_err(|_| std::io::Error::other("response timed out"))??;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn token(&self, id: SessionId) -> &str {
        &self.sessions[&id].0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_gets_its_own_real_value_and_never_another_sandboxs() {
    let n = node().await;
    for (id, real) in [(A, REAL_A), (B, REAL_B)] {
        let reply = n.get(id, id, n.token(id)).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            !reply.contains(real),
            "the agent saw its real value: {reply}"
        );
        assert_eq!(
            n.seen.last().header("authorization"),
            Some(format!("Bearer {real}").as_str()),
            "sandbox {id}'s upstream must receive sandbox {id}'s value"
        );
    }
    // B's agent holds A's masked token (same secret name, read from a shared file, say): B's
    // session does not know it, so it goes out as it came, masked.
    let reply = n.get(B, B, n.token(A)).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let got = n.seen.last();
    let auth = got.header("authorization").unwrap_or_default();
    assert_eq!(auth, format!("Bearer {}", n.token(A)));
    assert!(!auth.contains(REAL_A) && !auth.contains(REAL_B));
    // Each session's records are in its own sink only.
    let requests = |sink: &MemorySink| {
        sink.events()
            .into_iter()
            .filter(|e| e.kind == "proxy_request")
            .count()
    };
    assert_eq!(requests(&n.sessions[&A].2), 1);
    assert_eq!(requests(&n.sessions[&B].2), 2);
    assert_eq!(requests(&n.node_audit), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_of_no_admitted_sandbox_is_refused_and_audited_by_the_node() {
    let n = node().await;
    // A record naming a cgroup this node does not serve: no session's tokens or CA apply.
    let err = n.get(999, A, n.token(A)).await;
    assert!(err.is_err(), "served a connection of no session: {err:?}");
    let refused: Vec<_> = n
        .node_audit
        .events()
        .into_iter()
        .filter(|e| e.kind == "connection_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].fields["reason"], "no_session");
    assert!(n.seen.seen().is_empty(), "the upstream was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sandbox_is_served_no_more_and_the_others_are_untouched() {
    let n = node().await;
    assert!(
        n.get(A, A, n.token(A))
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    assert!(n.proxy.close(A).is_some());
    assert!(n.get(A, A, n.token(A)).await.is_err());
    let reply = n.get(B, B, n.token(B)).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(n.proxy.sessions().len(), 1);
    assert_eq!(n.seen.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_trusts_only_its_own_ca() {
    let n = node().await;
    // Sandbox B's connection is served with B's CA: a client trusting only A's CA refuses it.
    let err = n.get(B, A, n.token(B)).await;
    assert!(err.is_err(), "B's leaf verified against A's CA: {err:?}");
}
