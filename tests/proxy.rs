//! End-to-end tests of the swapping proxy with real clients (curl, Python, Node, a Rust
//! WebSocket client) and real HTTPS upstreams in their own network namespace.
//!
//! Layout of every test: a client netns (the proxy and the clients run there) joined by a veth
//! to an upstream netns holding two addresses:
//! - 10.77.0.2 "api.test": HTTPS on 443 with a certificate from a test CA (names api.test and
//!   other.test), plain HTTP on 80.
//! - 10.77.0.3 "evil": HTTPS on 443 with a self-signed api.test certificate, plain HTTP on 80.
//!
//! Transparent mode without eBPF: the client connects to the proxy's transparent listener and the
//! test's original-destination lookup says where it meant to go — exactly the answer the
//! interception core will give. These tests prove what the proxy does with that answer (SNI/Host
//! checks, dialing, swapping, scrubbing); they do not prove the redirect itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use kz_agent::audit::{AuditEvent, MemorySink};
use kz_agent::egress::location::Places;
use kz_agent::proxy::{self, CertAuthority, ConnectionRule, ConnectionRules, HostPattern};
use kz_agent::secret::Secret;
use support::netns::{Netns, Pair};
use support::upstream::{Routes, Upstream};

const GOOD: &str = "10.77.0.2";
const EVIL: &str = "10.77.0.3";
const REAL: &str = "sk-live-REAL-0123456789abcdef";
/// A second secret (`Opts::special`) whose percent-encoded and JSON-escaped forms differ from
/// its raw bytes: `/`, `+`, `"`, `\`, `<&>`, a non-ASCII letter.
const SPECIAL: &str = "sk/live+\"q\"\\<&>\u{e9}-9876543210zyx";
/// The one session of these tests (any id works; a node uses the sandbox's cgroup id).
const SESSION: proxy::SessionId = 42;

/// Waits up to 10 s for `n` events of `kind` (records are written when a stream ends).
fn wait(audit: &MemorySink, kind: &str, n: usize) -> Vec<AuditEvent> {
    audit.wait(kind, n, Duration::from_secs(10))
}

#[derive(Default)]
struct Opts {
    refuse_out_of_scope: bool,
    rules: ConnectionRules,
    limits: Option<proxy::Limits>,
    /// The secret's `credential_location`; `None`: everywhere kz can swap (any header, Basic,
    /// path, body, and the `key` and `t` query parameters these tests use), so the tests of
    /// the swap machinery see every place. The tests of the defaults say `Some(default)`.
    places: Option<Places>,
    /// The secret's `allow_plaintext`; `None`: allowed (these tests use plain HTTP upstreams).
    allow_plaintext: Option<bool>,
    /// The secret's `require`.
    require: bool,
    /// Also put [`SPECIAL`] in the table as `SPECIAL_KEY` (scoped like `API_KEY`).
    special: bool,
}

impl Opts {
    /// One worker thread: upstream pools are per worker, so tests about connection reuse pin
    /// every client connection to the same pool.
    fn one_worker() -> Self {
        Opts {
            limits: Some(proxy::Limits {
                workers: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

struct Env {
    client: Netns,
    _up: Netns,
    good: Upstream,
    evil: Upstream,
    audit: Arc<MemorySink>,
    transparent: SocketAddr,
    explicit: SocketAddr,
    metrics: SocketAddr,
    kz_ca: PathBuf,
    dst: Arc<Mutex<SocketAddr>>,
    masked: String,
    /// `SPECIAL_KEY`'s masked token (in the table only with `Opts::special`).
    special_masked: String,
    stop: Option<mpsc::Sender<()>>,
    proxy_thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Env {
    fn new(opts: Opts) -> Env {
        let pair = Pair::new("pc", "pu");
        pair.add_upstream_addr(&format!("{EVIL}/24"));
        let Pair {
            client,
            upstream: up,
            ..
        } = pair;
        let dir = std::env::temp_dir().join(support::unique_name("kzpx"));
        std::fs::create_dir_all(&dir).unwrap();

        // Upstreams.
        let test_ca = support::tls::TestCa::new("kz test public CA");
        let test_ca_path = test_ca.write_pem(&dir, "test-ca.pem");
        let good_cert = test_ca.server_cert(&["api.test", "other.test"], &[GOOD.parse().unwrap()]);
        let evil_cert = support::tls::self_signed(&["api.test"]);
        let host = |ip: &str, cert: &support::tls::ServerCert| {
            let tls = support::tls::server_config(cert);
            Upstream::host(&up, ip.parse().unwrap(), tls, Routes::echo(REAL))
        };
        let good = host(GOOD, &good_cert);
        let evil = host(EVIL, &evil_cert);

        // The proxy, inside the client namespace.
        let masked = proxy::TokenTable::generate_masked();
        let tokens = proxy::TokenTable::new();
        tokens
            .add(proxy::TokenSpec {
                places: opts
                    .places
                    .clone()
                    .unwrap_or_else(|| Places::everywhere().with_query("key").with_query("t")),
                allow_plaintext: opts.allow_plaintext.unwrap_or(true),
                require: opts.require,
                ..proxy::TokenSpec::new(
                    "API_KEY",
                    &masked,
                    Secret::new(REAL),
                    vec!["api.test".into(), GOOD.into()],
                )
            })
            .unwrap();
        let special_masked = proxy::TokenTable::generate_masked();
        if opts.special {
            tokens
                .insert_named(
                    "SPECIAL_KEY",
                    &special_masked,
                    Secret::new(SPECIAL),
                    vec!["api.test".into(), GOOD.into()],
                )
                .unwrap();
        }
        let audit = Arc::new(MemorySink::new());
        let dst = Arc::new(Mutex::new(SocketAddr::from(([10, 77, 0, 2], 443))));
        let (info_tx, info_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let proxy_thread = {
            let audit = audit.clone();
            let dst = dst.clone();
            client.spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let ca = Arc::new(CertAuthority::generate(64).unwrap());
                    let ca_pem = ca.cert_pem().to_owned();
                    let mut session = proxy::Session::new(SESSION, ca, tokens, audit.clone());
                    session.refuse_out_of_scope = opts.refuse_out_of_scope;
                    session.rules = opts.rules;
                    session.resolve = Some(proxy::known_hosts(|host, port| match host {
                        "api.test" | "other.test" => {
                            Some(SocketAddr::new(GOOD.parse().unwrap(), port))
                        }
                        "evil.test" => Some(SocketAddr::new(EVIL.parse().unwrap(), port)),
                        // Names an unanchored regex rule for api.test would match.
                        "api.test.evil" | "evilapi.test" => {
                            Some(SocketAddr::new(EVIL.parse().unwrap(), port))
                        }
                        // An allowed name answered with loopback (DNS rebinding).
                        "loopback.test" => Some(SocketAddr::from(([127, 0, 0, 1], port))),
                        _ => None,
                    }));
                    let mut cfg = proxy::Config::new(audit);
                    cfg.sessions = vec![session];
                    cfg.explicit_session = Some(SESSION);
                    cfg.transparent_listen = vec!["127.0.0.1:0".parse().unwrap()];
                    cfg.explicit_listen = vec!["127.0.0.1:0".parse().unwrap()];
                    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
                    cfg.upstream_ca = Some(test_ca_path);
                    if let Some(l) = opts.limits {
                        cfg.limits = l;
                    }
                    let d = dst.clone();
                    cfg.orig_dst = Some(Arc::new(move |_peer| {
                        Some(proxy::Redirected {
                            dest: *d.lock().unwrap(),
                            session: SESSION,
                        })
                    }));
                    let h = proxy::start(cfg).await.unwrap();
                    info_tx
                        .send((
                            h.transparent_addrs[0],
                            h.explicit_addrs[0],
                            h.metrics_addr.unwrap(),
                            ca_pem,
                        ))
                        .unwrap();
                    tokio::task::spawn_blocking(move || stop_rx.recv())
                        .await
                        .ok();
                    h.shutdown().await;
                });
            })
        };
        let (transparent, explicit, metrics, ca_pem) =
            info_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let kz_ca = dir.join("kz-ca.pem");
        std::fs::write(&kz_ca, ca_pem).unwrap();
        Env {
            client,
            _up: up,
            good,
            evil,
            audit,
            transparent,
            explicit,
            metrics,
            kz_ca,
            dst,
            masked,
            special_masked,
            stop: Some(stop_tx),
            proxy_thread: Some(proxy_thread),
            dir,
        }
    }

    fn set_dst(&self, ip: &str, port: u16) {
        *self.dst.lock().unwrap() = SocketAddr::new(ip.parse().unwrap(), port);
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self.client.command(program).args(args).output().unwrap();
        // Whatever a client printed, the real value must never be in it.
        for s in [&out.stdout, &out.stderr] {
            assert!(
                !String::from_utf8_lossy(s).contains(REAL),
                "{program} saw the real value:\n{}",
                String::from_utf8_lossy(s)
            );
        }
        out
    }

    /// curl in transparent mode: it connects to the proxy, SNI/Host stay `host`.
    fn curl_t(&self, host: &str, port: u16, path_and_args: &[&str]) -> Output {
        let connect_to = format!("{host}:{port}:127.0.0.1:{}", self.transparent.port());
        let mut args = vec![
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            self.kz_ca.to_str().unwrap(),
            "--connect-to",
            &connect_to,
        ];
        args.extend_from_slice(path_and_args);
        self.run("curl", &args)
    }

    fn curl_x(&self, args: &[&str]) -> Output {
        let proxy = format!("http://127.0.0.1:{}", self.explicit.port());
        let mut a = vec![
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            self.kz_ca.to_str().unwrap(),
            "-x",
            &proxy,
        ];
        a.extend_from_slice(args);
        self.run("curl", &a)
    }

    fn metrics_text(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics.port());
        String::from_utf8(self.run("curl", &["-sS", &url]).stdout).unwrap()
    }

    fn python(&self, script: &str) -> Output {
        let py = format!(
            "{}/.cache/kz/venv/bin/python",
            std::env::var("HOME").unwrap()
        );
        self.run(&py, &["-c", script])
    }

    /// Checks the audit log never holds the real value.
    fn audit_clean(&self) {
        let all = self.audit.events();
        for e in all.iter() {
            let s = serde_json::to_string(&e.fields).unwrap();
            assert!(!s.contains(REAL), "audit record holds the real value: {s}");
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.proxy_thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        stdout(o)
    );
    stdout(o)
}

// -------------------------------------------------------------------------------------------

#[test]
fn curl_transparent_h1_h2_swaps_header_and_query_and_scrubs_response() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2.0")] {
        let url = format!("https://api.test/echo?key={m}&x=1");
        let auth = format!("Authorization: Bearer {m}");
        let out = ok(&env.curl_t("api.test", 443, &[flag, "-i", "-H", &auth, &url]));
        let seen = env.good.last();
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {REAL}").as_str())
        );
        assert!(seen.uri.contains(&format!("key={REAL}")), "{}", seen.uri);
        assert_eq!(seen.version, version);
        // The upstream echoed the real value in a header and the body: the client sees masked.
        assert!(out.contains(&format!("x-echo-auth: Bearer {m}")), "{out}");
        assert!(out.contains(&format!("auth=Bearer {m}")), "{out}");
        assert_eq!(seen.header("accept-encoding"), Some("identity"));
    }
    let recs = wait(&env.audit, "proxy_request", 2);
    assert_eq!(recs.len(), 2);
    let f = &recs[0].fields;
    assert_eq!(f["host"], "api.test");
    assert_eq!(f["path"], "/echo?key=&x=");
    assert_eq!(f["status"], 200);
    assert_eq!(f["mode"], "transparent");
    assert_eq!(f["swapped"], serde_json::json!(["API_KEY"]));
    assert_eq!(f["scrubbed"], serde_json::json!(["API_KEY"]));
    assert_eq!(recs[1].fields["protocol"], "h2");
    env.audit_clean();
    let metrics = env.metrics_text();
    assert!(metrics.contains("kz_proxy_requests_total 2"), "{metrics}");
    assert!(
        metrics.contains("kz_proxy_tokens_swapped_total 4"),
        "{metrics}"
    );
}

#[test]
fn upstream_connections_are_pooled_and_a_closed_one_is_replaced() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::one_worker());
    let m = env.masked.clone();
    let auth = format!("Authorization: Bearer {m}");
    let h1 = |urls: &[&str], extra: &[&str]| {
        let mut a = vec!["--http1.1", "-H", &auth];
        a.extend_from_slice(extra);
        a.extend_from_slice(urls);
        ok(&env.curl_t("api.test", 443, &a))
    };
    // Two requests on one client connection, then a second client connection: kz keeps its
    // upstream connection and reuses it for both.
    h1(
        &["https://api.test/echo?n=1", "https://api.test/echo?n=2"],
        &[],
    );
    h1(&["https://api.test/echo?n=3"], &[]);
    let conns: Vec<u64> = env.good.seen().iter().map(|s| s.conn).collect();
    assert_eq!(conns.len(), 3);
    assert!(conns.iter().all(|c| *c == conns[0]), "{conns:?}");

    // The upstream drops its connection after answering (as servers drop idle keep-alive
    // connections); the next request, one with a body to swap, goes out on a new connection.
    for i in 0..3 {
        h1(&["https://api.test/hangup"], &[]);
        let closed = env.good.last().conn;
        std::thread::sleep(Duration::from_millis(300));
        let body = format!("token={m}&i={i}");
        let out = h1(&["https://api.test/echo"], &["--data-binary", &body]);
        assert!(out.contains(&format!("body_head=token={m}&i={i}")), "{out}");
        let seen = env.good.last();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.needle_hits, 1);
        assert_ne!(
            seen.conn, closed,
            "a closed upstream connection was used again"
        );
    }
    let recs = wait(&env.audit, "proxy_request", 9);
    assert!(recs.iter().all(|r| r.fields["status"] == 200), "{recs:?}");
    env.audit_clean();
}

/// `clients` h1 connections over TLS to the transparent listener; `rounds` times, each sends one
/// slow request and all wait for every answer. Returns the statuses.
async fn concurrent_rounds(
    addr: SocketAddr,
    ca_pem: String,
    masked: String,
    clients: usize,
    rounds: usize,
) -> Vec<u16> {
    use http_body_util::{BodyExt, Empty};
    let mut senders = Vec::new();
    for _ in 0..clients {
        let tls = tls_to_api(addr, &ca_pem, b"http/1.1").await;
        let (send, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        senders.push(send);
    }
    let mut statuses = Vec::new();
    for round in 0..rounds {
        let calls = senders.iter_mut().map(|s| {
            let req = http::Request::get(format!("/slow?round={round}"))
                .header("host", "api.test")
                .header("authorization", format!("Bearer {masked}"))
                .body(Empty::new())
                .unwrap();
            async move {
                let resp = s.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                resp.into_body().collect().await.unwrap();
                status
            }
        });
        statuses.extend(futures_util::future::join_all(calls).await);
    }
    statuses
}

#[test]
fn many_busy_client_connections_keep_their_upstream_connections() {
    if !support::require_root() {
        return;
    }
    // 48 client connections (more than the idle pool once kept per host) send a slow request
    // at the same time, three rounds: 48 upstream connections are in flight at once. Between
    // rounds they all wait in the pool, and the later rounds reuse them. A pool bounded below
    // the concurrency closed the surplus and dialled again every round (a TLS handshake per
    // request), which cut throughput 18-fold at 64 connections in `cargo xtask bench proxy`.
    let env = Env::new(Opts::one_worker());
    let (ca_pem, masked) = (
        std::fs::read_to_string(&env.kz_ca).unwrap(),
        env.masked.clone(),
    );
    let statuses = raw_async(&env, move |a| concurrent_rounds(a, ca_pem, masked, 48, 3));
    assert_eq!(statuses.len(), 144);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let conns: std::collections::BTreeSet<u64> = env
        .good
        .seen()
        .iter()
        .filter(|s| s.uri.starts_with("/slow"))
        .map(|s| s.conn)
        .collect();
    assert!(
        (2..=48).contains(&conns.len()),
        "144 requests on 48 busy client connections used {} upstream connections",
        conns.len()
    );
    env.audit_clean();
}

#[test]
fn concurrent_h2_clients_get_their_own_upstream_connection_and_later_ones_reuse_it() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::one_worker());
    let auth = format!("Authorization: Bearer {}", env.masked);
    let h2 = |url: &str| ok(&env.curl_t("api.test", 443, &["--http2", "-H", &auth, url]));
    // Two h2 clients at once (each SSE response lasts 2 s): one upstream connection each, so
    // neither client's streams queue behind the other's on one connection.
    std::thread::scope(|s| {
        let a = s.spawn(|| h2("https://api.test/sse?c=a"));
        let b = s.spawn(|| h2("https://api.test/sse?c=b"));
        for out in [a.join().unwrap(), b.join().unwrap()] {
            assert!(out.contains("data: second"), "{out}");
        }
    });
    let sse: Vec<u64> = env
        .good
        .seen()
        .iter()
        .filter(|s| s.uri.contains("/sse"))
        .map(|s| s.conn)
        .collect();
    assert_eq!(sse.len(), 2);
    assert_ne!(
        sse[0], sse[1],
        "two concurrent h2 clients shared one upstream connection"
    );
    // Both clients are gone: the next ones reuse those connections instead of dialling.
    for _ in 0..2 {
        h2("https://api.test/echo");
        let conn = env.good.last().conn;
        assert!(
            sse.contains(&conn),
            "a new upstream connection was dialled: {conn} not in {sse:?}"
        );
    }
    env.audit_clean();
}

#[test]
fn curl_explicit_connect_and_plain_forward() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let auth = format!("Authorization: Bearer {m}");
    for flag in ["--http1.1", "--http2"] {
        let out = ok(&env.curl_x(&[flag, "-H", &auth, "https://api.test/echo"]));
        assert!(out.contains(&format!("auth=Bearer {m}")), "{out}");
        assert_eq!(
            env.good.last().header("authorization"),
            Some(format!("Bearer {REAL}").as_str())
        );
    }
    // Absolute-URI forward for plain HTTP.
    let out = ok(&env.curl_x(&["-H", &auth, "http://api.test/echo?k=1"]));
    assert!(out.contains(&format!("auth=Bearer {m}")), "{out}");
    let seen = env.good.last();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {REAL}").as_str())
    );
    assert_eq!(seen.uri, "/echo?k=1");
    let recs = wait(&env.audit, "proxy_request", 3);
    assert!(recs.iter().all(|r| r.fields["mode"] == "explicit"));
    // An unresolvable CONNECT target is refused on the CONNECT itself (no fallback address).
    // (This netns has no route out, so the failed lookup cannot leave the machine.)
    let out = env.curl_x(&["-w", "%{http_connect}", "https://nowhere.invalid/"]);
    assert!(stdout(&out).ends_with("502"), "{}", stdout(&out));
    // CONNECT to the proxy's own listener is refused.
    let own = format!("https://127.0.0.1:{}/", env.explicit.port());
    let out = env.curl_x(&["-w", "%{http_connect}", &own]);
    assert!(stdout(&out).ends_with("403"), "{}", stdout(&out));
    env.audit_clean();
}

#[test]
fn python_h1_transparent_and_h2_explicit_swap_bodies() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    // h1, transparent: http.client over a socket to the proxy, SNI api.test.
    let script = format!(
        r#"
import http.client, socket, ssl, json
ctx = ssl.create_default_context(cafile="{ca}")
raw = socket.create_connection(("127.0.0.1", {port}))
conn = http.client.HTTPSConnection("api.test", context=ctx)
conn.sock = ctx.wrap_socket(raw, server_hostname="api.test")
body = json.dumps({{"key": "{m}", "pad": "x" * 100}})
conn.request("POST", "/echo", body=body, headers={{"Content-Type": "application/json"}})
r = conn.getresponse()
print(r.status, r.read().decode())
"#,
        ca = env.kz_ca.display(),
        port = env.transparent.port()
    );
    let out = ok(&env.python(&script));
    assert!(out.starts_with("200"), "{out}");
    let seen = env.good.last();
    assert_eq!(seen.needle_hits, 1);
    let want_len = format!("{{\"key\": \"{REAL}\", \"pad\": \"{}\"}}", "x".repeat(100)).len();
    assert_eq!(seen.body_len, want_len, "Content-Length follows the swap");
    assert_eq!(
        seen.header("content-length"),
        Some(want_len.to_string().as_str())
    );
    assert!(
        out.contains(&m),
        "the echoed body is scrubbed back to the token: {out}"
    );

    // h2 through the explicit proxy (httpx + h2): CONNECT, then h2 inside.
    let script = format!(
        r#"
import httpx
with httpx.Client(http2=True, http1=False, verify="{ca}", proxy="http://127.0.0.1:{port}") as c:
    r = c.post("https://api.test/echo", content=b"token={m}&more=1", headers={{"authorization": "Bearer {m}"}})
    print(r.status_code, r.http_version, r.text)
"#,
        ca = env.kz_ca.display(),
        port = env.explicit.port()
    );
    let out = ok(&env.python(&script));
    assert!(out.starts_with("200 HTTP/2"), "{out}");
    let seen = env.good.last();
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.needle_hits, 1);
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {REAL}").as_str())
    );
    env.audit_clean();
}

#[test]
fn node_h1_and_h2_transparent() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let script = format!(
        r#"
const fs = require('fs'), tls = require('tls'), https = require('https'), http2 = require('http2');
const ca = fs.readFileSync('{ca}');
const port = {port};
function h1() {{
  return new Promise((res, rej) => {{
    const req = https.request({{ host: '127.0.0.1', port, servername: 'api.test', ca, method: 'POST', path: '/echo',
      headers: {{ host: 'api.test', authorization: 'Bearer {m}', 'content-type': 'text/plain' }} }}, r => {{
      let d = ''; r.on('data', c => d += c); r.on('end', () => res(r.statusCode + ' ' + d));
    }});
    req.on('error', rej); req.end('body {m} end');
  }});
}}
function h2() {{
  return new Promise((res, rej) => {{
    const s = http2.connect('https://api.test', {{ createConnection: () =>
      tls.connect({{ host: '127.0.0.1', port, servername: 'api.test', ca, ALPNProtocols: ['h2'] }}) }});
    s.on('error', rej);
    const r = s.request({{ ':method': 'POST', ':path': '/echo?t={m}', authorization: 'Bearer {m}' }});
    let d = '', st = 0;
    r.on('response', h => st = h[':status']);
    r.on('data', c => d += c);
    r.on('end', () => {{ s.close(); res(st + ' ' + d); }});
    r.end('h2 body {m}');
  }});
}}
(async () => {{ console.log('H1 ' + await h1()); console.log('H2 ' + await h2()); }})().catch(e => {{ console.error(e); process.exit(1); }});
"#,
        ca = env.kz_ca.display(),
        port = env.transparent.port()
    );
    let out = ok(&env.run("node", &["-e", &script]));
    assert!(out.contains("H1 200"), "{out}");
    assert!(out.contains("H2 200"), "{out}");
    assert!(out.contains(&format!("auth=Bearer {m}")), "{out}");
    let seen = env.good.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert_eq!(seen[0].needle_hits, 1);
    assert_eq!(seen[1].version, "HTTP/2.0");
    assert_eq!(seen[1].needle_hits, 1);
    assert!(seen[1].uri.contains(&format!("t={REAL}")));
    env.audit_clean();
}

#[test]
fn large_streamed_and_chunked_bodies() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    // 10 MiB upload with 1000 tokens spread through it (streamed: larger than the buffer limit).
    let mut data = Vec::with_capacity(10 << 20);
    let filler = vec![b'.'; (10 << 20) / 1000 - m.len()];
    for _ in 0..1000 {
        data.extend_from_slice(&filler);
        data.extend_from_slice(m.as_bytes());
    }
    let file = env.dir.join("upload.bin");
    std::fs::write(&file, &data).unwrap();
    let at = format!("@{}", file.display());
    for extra in [&[][..], &["-H", "Transfer-Encoding: chunked"][..]] {
        let mut args = vec!["--http1.1", "--data-binary", &at];
        args.extend_from_slice(extra);
        args.push("https://api.test/upload");
        let out = ok(&env.curl_t("api.test", 443, &args));
        let want = data.len() + 1000 * REAL.len() - 1000 * m.len();
        assert_eq!(out.trim(), format!("len={want} hits=1000"));
        // The swap changed the length: no stale Content-Length goes with the body.
        assert_eq!(env.good.last().header("content-length"), None);
    }
    // Toward a host no token may go to nothing is swapped, so the length cannot change: the
    // large body streams with its Content-Length kept (object stores refuse chunked uploads),
    // and the tokens in it leave masked.
    for flag in ["--http1.1", "--http2"] {
        let out = ok(&env.curl_t(
            "other.test",
            443,
            &[flag, "--data-binary", &at, "https://other.test/upload"],
        ));
        assert_eq!(out.trim(), format!("len={} hits=0", data.len()));
        let seen = env.good.last();
        let len = data.len().to_string();
        assert_eq!(seen.header("content-length"), Some(len.as_str()), "{flag}");
        assert_eq!(seen.header("transfer-encoding"), None, "{flag}");
    }

    // Small chunked body (no Content-Length at all).
    let out = ok(&env.curl_t(
        "api.test",
        443,
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("a={m}"),
            "https://api.test/upload",
        ],
    ));
    assert_eq!(out.trim(), format!("len={} hits=1", 2 + REAL.len()));

    // 10 MiB download, scrubbed on the fly (the needle straddles the upstream's chunk borders).
    let n = 10 << 20;
    let dl = env.dir.join("download.bin");
    let url = format!("https://api.test/download?n={n}");
    for flag in ["--http1.1", "--http2"] {
        ok(&env.curl_t("api.test", 443, &[flag, "-o", dl.to_str().unwrap(), &url]));
        let got = std::fs::read(&dl).unwrap();
        let unit = format!("<{REAL}>");
        let full_units = n / unit.len();
        let text = String::from_utf8(got).unwrap();
        assert!(!text.contains(REAL));
        assert_eq!(text.matches(&m).count(), full_units);
    }
    env.audit_clean();
}

#[test]
fn out_of_scope_token_goes_out_masked_and_is_audited() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let auth = format!("Authorization: Bearer {m}");
    // other.test is served by the same upstream, but the token is scoped to api.test.
    ok(&env.curl_t("other.test", 443, &["-H", &auth, "https://other.test/echo"]));
    let seen = env.good.last();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {m}").as_str())
    );
    let v = wait(&env.audit, "token_out_of_scope", 1);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].fields["host"], "other.test");
    assert_eq!(v[0].fields["secrets"], serde_json::json!(["API_KEY"]));
    assert_eq!(v[0].fields["refused"], false);

    // A forged Host on plain HTTP: the client claims api.test but connects to the evil address.
    // The claim does not hold (api.test does not resolve there), so the request names another
    // host than the one checked: 421, and nothing reaches evil.
    env.set_dst(EVIL, 80);
    let out = env.curl_t(
        "api.test",
        80,
        &["-w", "%{http_code}", "-H", &auth, "http://api.test/echo"],
    );
    assert!(stdout(&out).ends_with("421"), "{}", stdout(&out));
    let v = wait(&env.audit, "proxy_request", 2);
    assert!(
        v.iter()
            .any(|e| e.fields["error"] == "host_mismatch" && e.fields["status"] == 421),
        "{v:?}"
    );
    // And the honest plain-HTTP path swaps.
    env.set_dst(GOOD, 80);
    ok(&env.curl_t("api.test", 80, &["-H", &auth, "http://api.test/echo"]));
    assert_eq!(
        env.good.last().header("authorization"),
        Some(format!("Bearer {REAL}").as_str())
    );
    // A forged SNI: api.test on the evil address, whose certificate nobody vouches for.
    env.set_dst(EVIL, 443);
    let out = env.curl_t(
        "api.test",
        443,
        &["-w", "%{http_code}", "-H", &auth, "https://api.test/echo"],
    );
    let body = stdout(&out);
    assert!(body.ends_with("502"), "{body}");
    assert!(body.contains("failed verification"), "{body}");
    assert_eq!(env.evil.seen().len(), 0, "nothing reached evil");
    env.audit_clean();
}

#[test]
fn refuse_mode_and_connection_rules() {
    if !support::require_root() {
        return;
    }
    let rules = ConnectionRules(vec![
        ConnectionRule::deny(HostPattern::host("other.test").unwrap()),
        ConnectionRule::allow(HostPattern::host("*.test").unwrap()),
    ]);
    let env = Env::new(Opts {
        refuse_out_of_scope: true,
        rules,
        ..Opts::default()
    });
    let m = env.masked.clone();
    let auth = format!("Authorization: Bearer {m}");
    // Denied host.
    let out = env.curl_t(
        "other.test",
        443,
        &["-w", "%{http_code}", "https://other.test/echo"],
    );
    assert!(stdout(&out).ends_with("403"), "{}", stdout(&out));
    assert!(env.good.seen().is_empty());
    // Explicit CONNECT to a denied host.
    let out = env.curl_x(&["-w", "%{http_code}", "https://other.test/echo"]);
    assert!(!out.status.success() || stdout(&out).ends_with("403"));
    // No rule matches the IP literal: denied.
    env.set_dst(GOOD, 443);
    let out = env.curl_t(GOOD, 443, &["-w", "%{http_code}", "https://10.77.0.2/echo"]);
    assert!(stdout(&out).ends_with("403"), "{}", stdout(&out));
    // Allowed host, token out of scope → refused before anything is sent.
    env.set_dst(EVIL, 80);
    let out = env.curl_t(
        "evil.test",
        80,
        &["-w", "%{http_code}", "-H", &auth, "http://evil.test/echo"],
    );
    assert!(stdout(&out).ends_with("403"), "{}", stdout(&out));
    assert!(env.evil.seen().is_empty());
    let v = wait(&env.audit, "token_out_of_scope", 1);
    assert_eq!(v[0].fields["refused"], true);
    // In scope still works.
    env.set_dst(GOOD, 443);
    ok(&env.curl_t("api.test", 443, &["-H", &auth, "https://api.test/echo"]));
    assert_eq!(
        env.good.last().header("authorization"),
        Some(format!("Bearer {REAL}").as_str())
    );
    env.audit_clean();
}

#[test]
fn bad_upstream_certificate_is_a_502_with_audit() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    env.set_dst(EVIL, 443);
    for flag in ["--http1.1", "--http2"] {
        let out = env.curl_t(
            "api.test",
            443,
            &[flag, "-w", "\n%{http_code}", "https://api.test/echo"],
        );
        let body = stdout(&out);
        assert!(body.ends_with("502"), "{body}");
        assert!(
            body.contains("upstream certificate for api.test failed verification"),
            "{body}"
        );
    }
    assert!(env.evil.seen().is_empty());
    let recs = wait(&env.audit, "proxy_request", 2);
    assert_eq!(recs[0].fields["status"], 502);
    assert_eq!(recs[0].fields["error"], "upstream_certificate_invalid");
}

#[test]
fn sse_is_streamed_and_scrubbed() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let script = format!(
        r#"
import http.client, socket, ssl, time
ctx = ssl.create_default_context(cafile="{ca}")
raw = socket.create_connection(("127.0.0.1", {port}))
conn = http.client.HTTPSConnection("api.test", context=ctx)
conn.sock = ctx.wrap_socket(raw, server_hostname="api.test")
t0 = time.time()
conn.request("GET", "/sse")
r = conn.getresponse()
first = r.readline().decode()
t1 = time.time() - t0
r.readline()
second = r.readline().decode()
t2 = time.time() - t0
print(round(t1, 2))
print(round(t2, 2))
print(first.strip())
print(second.strip())
"#,
        ca = env.kz_ca.display(),
        port = env.transparent.port()
    );
    let out = ok(&env.python(&script));
    let lines: Vec<&str> = out.lines().collect();
    let t1: f64 = lines[0].parse().unwrap();
    let t2: f64 = lines[1].parse().unwrap();
    assert!(out.contains(&format!("data: first {m}")), "{out}");
    assert!(out.contains("data: second"), "{out}");
    assert!(
        t1 < 1.5,
        "first event arrived before the stream ended: {out}"
    );
    assert!(t2 >= 1.8, "second event is 2 s later: {out}");
}

#[test]
fn websocket_echo_with_swapped_handshake() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let m2 = m.clone();
    let kz_ca = std::fs::read_to_string(&env.kz_ca).unwrap();
    let port = env.transparent.port();
    let got = env
        .client
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use futures_util::{SinkExt, StreamExt};
                use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let cfg = support::tls::client_config(&kz_ca, &[b"http/1.1"]);
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect("api.test".try_into().unwrap(), tcp)
                    .await
                    .unwrap();
                let mut req = "wss://api.test/ws".into_client_request().unwrap();
                req.headers_mut()
                    .insert("authorization", format!("Bearer {m}").parse().unwrap());
                let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
                assert_eq!(resp.status(), 101);
                let mut echoed = Vec::new();
                // The upstream's greeting repeats the real value: it arrives scrubbed.
                let greeting = ws.next().await.unwrap().unwrap().into_text().unwrap();
                echoed.push(greeting.to_string());
                for msg in ["hello", "world"] {
                    ws.send(Message::text(msg)).await.unwrap();
                    let r = ws.next().await.unwrap().unwrap();
                    echoed.push(r.into_text().unwrap().to_string());
                }
                ws.close(None).await.ok();
                echoed
            })
        })
        .join()
        .unwrap();
    assert_eq!(got[0], format!("auth=Bearer {m2}"));
    assert_eq!(&got[1..], ["hello", "world"]);
    let seen = env.good.last();
    assert_eq!(seen.uri, "/ws");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {REAL}").as_str())
    );
}

#[test]
fn compressed_response_is_refused_for_guarded_hosts() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let out = env.curl_t(
        "api.test",
        443,
        &["-w", "\n%{http_code}", "https://api.test/gzip"],
    );
    let body = stdout(&out);
    assert!(body.ends_with("502"), "{body}");
    assert!(body.contains("compressed"), "{body}");
}

/// Raw TCP from inside the client namespace.
fn raw<F: FnOnce(SocketAddr) -> R + Send + 'static, R: Send + 'static>(env: &Env, f: F) -> R {
    let addr = env.transparent;
    env.client.spawn(move || f(addr)).join().unwrap()
}

/// Like [`raw`] for an async client: runs it on a runtime of its own in the client namespace.
fn raw_async<F, Fut, R>(env: &Env, f: F) -> R
where
    F: FnOnce(SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R>,
    R: Send + 'static,
{
    raw(env, move |a| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f(a))
    })
}

/// A TLS connection to the transparent listener for `api.test`, offering `alpn`.
async fn tls_to_api(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = support::tls::client_config(ca_pem, &[alpn]);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads until EOF or error; returns what arrived and how long it took.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (out, t.elapsed())
}

/// An h2 client that opens streams and resets them at once (CVE-2023-44487, "rapid reset"),
/// over TLS to the transparent listener. Returns how many streams it opened and how the
/// connection ended.
async fn rapid_reset(addr: SocketAddr, ca_pem: String, streams: usize) -> (usize, String) {
    let tls = tls_to_api(addr, &ca_pem, b"h2").await;
    let (mut client, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..streams {
        let Ok(c) = client.clone().ready().await else {
            break;
        };
        client = c;
        let req = http::Request::get("https://api.test/echo")
            .body(())
            .unwrap();
        match client.send_request(req, false) {
            Ok((_resp, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
    }
    let end = match tokio::time::timeout(Duration::from_secs(10), conn).await {
        Ok(Ok(Ok(()))) => "closed cleanly".to_owned(),
        Ok(Ok(Err(e))) => format!("{e}"),
        Ok(Err(e)) => format!("task: {e}"),
        Err(_) => "still open after 10 s".to_owned(),
    };
    (opened, end)
}

#[test]
fn h2_rapid_reset_flood_is_cut_off_and_the_proxy_keeps_serving() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let ca_pem = std::fs::read_to_string(&env.kz_ca).unwrap();
    let (opened, end) = raw_async(&env, move |a| rapid_reset(a, ca_pem, 5000));
    // kz ends the connection (GOAWAY ENHANCE_YOUR_CALM: too many streams reset before they were
    // served, or refused beyond the stream limit) instead of serving the flood; without the two
    // limits the connection stays open. Streams accepted before their reset arrived do reach
    // the upstream (0 on a quiet machine, 128 under a loaded CI run), but not the flood.
    assert!(
        opened > 100,
        "the client could not even start: {opened} streams, {end}"
    );
    assert_ne!(end, "still open after 10 s", "the flood was not cut off");
    let upstream = env.good.seen().len();
    assert!(
        upstream < opened / 10,
        "{upstream} of {opened} reset streams reached the upstream"
    );
    // Other clients are still served.
    let auth = format!("Authorization: Bearer {}", env.masked);
    let out = ok(&env.curl_t(
        "api.test",
        443,
        &["--http2", "-H", &auth, "https://api.test/echo"],
    ));
    assert!(out.contains("auth=Bearer"), "{out}");
    env.audit_clean();
}

#[test]
fn slowloris_garbage_tls_and_oversized_headers() {
    if !support::require_root() {
        return;
    }
    let limits = proxy::Limits {
        handshake_timeout: Duration::from_secs(1),
        header_read_timeout: Duration::from_secs(1),
        max_header_bytes: 16 * 1024,
        ..proxy::Limits::default()
    };
    let env = Env::new(Opts {
        limits: Some(limits),
        ..Opts::default()
    });
    // Garbage after a TLS record byte: closed promptly, nothing sent back but an alert at most.
    let (_, took) = raw(&env, |a| {
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(b"\x16\x03\x01\x00\x10garbagegarbage!!")
            .unwrap();
        read_to_close(&mut s, Duration::from_secs(5))
    });
    assert!(
        took < Duration::from_secs(3),
        "garbage TLS closed in {took:?}"
    );
    // Slow TLS hello: one byte, then silence → closed after the handshake timeout.
    let (_, took) = raw(&env, |a| {
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(b"\x16").unwrap();
        read_to_close(&mut s, Duration::from_secs(8))
    });
    assert!(
        took < Duration::from_secs(4),
        "slow hello closed in {took:?}"
    );
    // Slow HTTP headers (plain, transparent): a header line every 300 ms never completes.
    env.set_dst(GOOD, 80);
    let (resp, took) = raw(&env, |a| {
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: api.test\r\n")
            .unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(6) {
            if s.write_all(b"X-Slow: 1\r\n").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let (r, _) = read_to_close(&mut s, Duration::from_secs(1));
        (r, t.elapsed())
    });
    assert!(
        took < Duration::from_secs(5),
        "slowloris cut after {took:?}"
    );
    let resp = String::from_utf8_lossy(&resp).into_owned();
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 408"),
        "{resp}"
    );
    // Invalid chunked encoding and a truncated request: an error status or a close, quickly.
    for bad in [
        &b"POST /upload HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nxx\r\n"[..],
        &b"POST /upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\nshort"[..],
    ] {
        let bad = bad.to_vec();
        let (resp, took) = raw(&env, move |a| {
            let mut s = TcpStream::connect(a).unwrap();
            s.write_all(&bad).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let t = Instant::now();
            let (r, _) = read_to_close(&mut s, Duration::from_secs(8));
            (r, t.elapsed())
        });
        let resp = String::from_utf8_lossy(&resp).into_owned();
        assert!(took < Duration::from_secs(5), "bad request handled in {took:?}");
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 4") || resp.starts_with("HTTP/1.1 5"),
            "{resp}"
        );
        assert!(!resp.contains(REAL));
    }
    // Oversized headers: 431 (or a close), and the proxy keeps serving.
    env.set_dst(GOOD, 443);
    let big = format!("X-Big: {}", "a".repeat(40_000));
    let out = env.curl_t(
        "api.test",
        443,
        &[
            "--http1.1",
            "-w",
            "%{http_code}",
            "-H",
            &big,
            "https://api.test/echo",
        ],
    );
    let code = stdout(&out);
    assert!(code.ends_with("431") || !out.status.success(), "{code}");
    let out = env.curl_t(
        "api.test",
        443,
        &[
            "--http2",
            "-w",
            "%{http_code}",
            "-H",
            &big,
            "https://api.test/echo",
        ],
    );
    assert!(stdout(&out).ends_with("431") || !out.status.success());
    ok(&env.curl_t("api.test", 443, &["https://api.test/echo"]));
    assert!(
        env.good.seen().len() == 1,
        "only the last request reached the upstream"
    );
    let metrics = env.metrics_text();
    assert!(
        metrics.contains("kz_proxy_handshake_failures_total 2"),
        "{metrics}"
    );
}

#[test]
fn a_thousand_concurrent_connections() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let kz_ca = std::fs::read_to_string(&env.kz_ca).unwrap();
    let port = env.transparent.port();
    let statuses = env
        .client
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let cfg = support::tls::client_config(&kz_ca, &[b"http/1.1"]);
                let barrier = Arc::new(tokio::sync::Barrier::new(1000));
                let mut tasks = Vec::new();
                for _ in 0..1000 {
                    let cfg = cfg.clone();
                    let barrier = barrier.clone();
                    let m = m.clone();
                    tasks.push(tokio::spawn(async move {
                        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                        let mut tls = tokio_rustls::TlsConnector::from(cfg)
                            .connect("api.test".try_into().unwrap(), tcp)
                            .await
                            .unwrap();
                        // All 1000 connections are open (handshaken) at the same time.
                        barrier.wait().await;
                        let req = format!(
                            "GET /echo HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {m}\r\nConnection: close\r\n\r\n"
                        );
                        tls.write_all(req.as_bytes()).await.unwrap();
                        let mut out = Vec::new();
                        tls.read_to_end(&mut out).await.ok();
                        let s = String::from_utf8_lossy(&out).into_owned();
                        assert!(!s.contains(REAL));
                        s.starts_with("HTTP/1.1 200") && s.contains(&m)
                    }));
                }
                let mut okc = 0;
                for t in tasks {
                    if t.await.unwrap() {
                        okc += 1;
                    }
                }
                okc
            })
        })
        .join()
        .unwrap();
    assert_eq!(statuses, 1000);
    let seen = env.good.seen();
    assert_eq!(seen.len(), 1000);
    assert!(
        seen.iter()
            .all(|s| s.header("authorization") == Some(&format!("Bearer {REAL}")))
    );
    wait(&env.audit, "proxy_request", 1000);
    env.audit_clean();
}

#[test]
fn graceful_drain_finishes_in_flight_streams() {
    if !support::require_root() {
        return;
    }
    let mut env = Env::new(Opts::default());
    let script = format!(
        r#"
import http.client, socket, ssl
ctx = ssl.create_default_context(cafile="{ca}")
raw = socket.create_connection(("127.0.0.1", {port}))
conn = http.client.HTTPSConnection("api.test", context=ctx)
conn.sock = ctx.wrap_socket(raw, server_hostname="api.test")
conn.request("GET", "/sse")
r = conn.getresponse()
print(r.read().decode())
"#,
        ca = env.kz_ca.display(),
        port = env.transparent.port()
    );
    let py = format!(
        "{}/.cache/kz/venv/bin/python",
        std::env::var("HOME").unwrap()
    );
    let child = env
        .client
        .command(&py)
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Shut down once the event stream is in flight (the upstream has the request).
    let t = Instant::now();
    while !env.good.seen().iter().any(|s| s.uri == "/sse") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the SSE request never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.stop.take().unwrap().send(()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("data: first"), "{text}");
    assert!(
        text.contains("data: second"),
        "in-flight stream completed: {text}"
    );
    env.proxy_thread.take().unwrap().join().unwrap();
    // The listener is gone: new connections are refused.
    let port = env.transparent.port();
    let refused = env
        .client
        .spawn(move || TcpStream::connect(("127.0.0.1", port)).is_err())
        .join()
        .unwrap();
    assert!(refused);
}

#[test]
fn connections_over_the_limit_are_closed_at_accept() {
    if !support::require_root() {
        return;
    }
    let limits = proxy::Limits {
        max_connections: 2,
        ..proxy::Limits::default()
    };
    let env = Env::new(Opts {
        limits: Some(limits),
        ..Opts::default()
    });
    let (third, took) = raw(&env, |a| {
        let _one = TcpStream::connect(a).unwrap();
        let _two = TcpStream::connect(a).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut three = TcpStream::connect(a).unwrap();
        let _ = three.write_all(b"\x16\x03\x01");
        read_to_close(&mut three, Duration::from_secs(5))
    });
    assert!(third.is_empty());
    assert!(
        took < Duration::from_secs(2),
        "closed at once, took {took:?}"
    );
    let metrics = env.metrics_text();
    assert!(
        metrics.contains("kz_proxy_connections_rejected_total 1"),
        "{metrics}"
    );
}

#[test]
fn non_http_is_spliced_or_refused_by_rule() {
    if !support::require_root() {
        return;
    }
    let mut splice = ConnectionRule::allow(HostPattern::host(GOOD).unwrap());
    splice.splice_non_http = true;
    let rules = ConnectionRules(vec![
        splice,
        ConnectionRule::allow(HostPattern::host("*.test").unwrap()),
    ]);
    let env = Env::new(Opts {
        rules,
        ..Opts::default()
    });
    let talk = |env: &Env| {
        raw(env, |a| {
            let mut s = TcpStream::connect(a).unwrap();
            s.write_all(b"\x01\x02 not http\r\n\r\n").unwrap();
            read_to_close(&mut s, Duration::from_secs(5)).0
        })
    };
    // Spliced: the bytes reach the upstream untouched, which answers them (HTTP 400).
    env.set_dst(GOOD, 80);
    let got = String::from_utf8_lossy(&talk(&env)).into_owned();
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    assert_eq!(wait(&env.audit, "tcp_splice", 1).len(), 1);
    // No splice rule for the other address: refused, nothing comes back.
    env.set_dst(EVIL, 80);
    assert!(talk(&env).is_empty());
    let refused = wait(&env.audit, "connection_refused", 1);
    assert_eq!(refused[0].fields["reason"], "non_http_not_allowed");
}

#[test]
fn upstream_connect_timeout_is_a_504() {
    if !support::require_root() {
        return;
    }
    let limits = proxy::Limits {
        upstream_connect_timeout: Duration::from_millis(800),
        ..proxy::Limits::default()
    };
    let env = Env::new(Opts {
        limits: Some(limits),
        ..Opts::default()
    });
    // Nobody answers ARP for 10.77.0.9: the connect hangs until kz gives up.
    env.set_dst("10.77.0.9", 443);
    let t = Instant::now();
    let out = env.curl_t(
        "api.test",
        443,
        &["-w", "\n%{http_code}", "https://api.test/echo"],
    );
    let body = stdout(&out);
    assert!(body.ends_with("504"), "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    let recs = wait(&env.audit, "proxy_request", 1);
    assert_eq!(recs[0].fields["error"], "upstream_connect_timeout");
}

/// Sends one HTTP/1.1 request over TLS to the transparent listener (as `sni`) and returns the
/// whole answer (the request should say `Connection: close`).
fn tls_exchange(env: &Env, sni: &'static str, request: String) -> String {
    let kz_ca = std::fs::read_to_string(&env.kz_ca).unwrap();
    raw_async(env, move |addr| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let cfg = support::tls::client_config(&kz_ca, &[b"http/1.1"]);
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(sni.try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn a_token_in_a_request_trailer_follows_the_header_rules() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts {
        refuse_out_of_scope: true,
        places: Some(Places::parse(&["header:Authorization:Bearer"]).unwrap()),
        ..Opts::default()
    });
    let m = env.masked.clone();
    let chunked = |host: &str, trailer: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nTrailer: {}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n{trailer}\r\n\r\n",
            trailer.split(':').next().unwrap()
        )
    };
    // Toward a host outside the token's scope, the token only in a trailer.
    env.set_dst(GOOD, 443);
    let out = tls_exchange(
        &env,
        "other.test",
        chunked("other.test", &format!("authorization: Bearer {m}")),
    );
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(!out.contains(REAL));
    // Toward its host, in a trailer its credential_location does not name.
    let out = tls_exchange(
        &env,
        "api.test",
        chunked("api.test", &format!("x-leak: {m}")),
    );
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("credential_location"), "{out}");
    let v = wait(&env.audit, "proxy_request", 2);
    let errors: Vec<_> = v.iter().map(|e| e.fields["error"].clone()).collect();
    assert_eq!(
        errors,
        vec![
            serde_json::json!("token_out_of_scope"),
            serde_json::json!("token_misplaced")
        ]
    );
    env.audit_clean();
}

#[test]
fn credential_locations_path_basic_and_body_through_the_proxy() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts {
        places: Some(Places::parse(&["basic", "path", "body", "query:key"]).unwrap()),
        ..Opts::default()
    });
    let m = env.masked.clone();
    env.set_dst(GOOD, 443);
    let user = format!("bot:{m}");
    ok(&env.curl_t(
        "api.test",
        443,
        &[
            "-u",
            &user,
            &format!("https://api.test/bot{m}/send?key={m}"),
        ],
    ));
    let seen = env.good.last();
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bot:{REAL}"));
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(seen.path, format!("/bot{REAL}/send"));
    assert_eq!(seen.query(), format!("key={REAL}"));
    let body = format!("{{\"token\":\"{m}\"}}");
    ok(&env.curl_t(
        "api.test",
        443,
        &["--data-binary", &body, "https://api.test/upload"],
    ));
    assert_eq!(env.good.last().needle_hits, 1, "the body was swapped");
    // A bearer header is not a listed place: left masked.
    let auth = format!("Authorization: Bearer {m}");
    ok(&env.curl_t("api.test", 443, &["-H", &auth, "https://api.test/echo"]));
    assert_eq!(
        env.good.last().header("authorization"),
        Some(format!("Bearer {m}").as_str())
    );
    env.audit_clean();
}

// ---- Issue 14: encoded forms of a real value are scrubbed too ------------------------------

/// How a client could get `secret` back out of `out`: as it is, after percent-decoding,
/// JSON-unescaping or both, or by base64-decoding (either alphabet, from any of a run's first
/// four characters) any run of base64 characters in one of those texts. `None`: in no way
/// tried. Decoders written here, independently of kz's encoders.
fn recoverable(out: &[u8], secret: &str) -> Option<String> {
    let s = secret.as_bytes();
    let pct = percent_decode(out);
    let texts = [
        ("raw", out.to_vec()),
        ("percent-decoded", pct.clone()),
        ("json-unescaped", json_unescape(out)),
        ("percent-decoded, json-unescaped", json_unescape(&pct)),
    ];
    for (how, text) in texts {
        if contains(&text, s) {
            return Some(how.to_owned());
        }
        if let Some(run) = base64_runs(&text).into_iter().find(|run| {
            (0..4).any(|k| contains(&base64_decode_lenient(&run[k.min(run.len())..]), s))
        }) {
            return Some(format!(
                "base64 in the {how} text: {}",
                String::from_utf8_lossy(&run)
            ));
        }
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn percent_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = v
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (v[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn json_unescape(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    let unit = |at: usize| {
        v.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    while i < v.len() {
        if v[i] != b'\\' || i + 1 >= v.len() {
            out.push(v[i]);
            i += 1;
            continue;
        }
        let simple = match v[i + 1] {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'b' => Some(8),
            b'f' => Some(12),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            i += 2;
        } else if v[i + 1] == b'u'
            && let Some(hi) = unit(i + 2)
        {
            let (c, used) = match (hi, v.get(i + 6..i + 8), unit(i + 8)) {
                (0xd800..=0xdbff, Some(b"\\u"), Some(lo)) => {
                    (char::decode_utf16([hi, lo]).next(), 12)
                }
                _ => (char::decode_utf16([hi]).next(), 6),
            };
            let c = c.and_then(Result::ok).unwrap_or('\u{fffd}');
            out.extend_from_slice(c.to_string().as_bytes());
            i += used;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

/// Maximal runs of base64 characters (both alphabets) of at least 8 characters.
fn base64_runs(v: &[u8]) -> Vec<Vec<u8>> {
    v.split(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_')))
        .filter(|r| r.len() >= 8)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Decodes base64 of either alphabet, ignoring padding and trailing bits.
fn base64_decode_lenient(run: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in run {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The value of line `key=` in a route's text answer.
fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= line in {out}"))
}

#[test]
fn encoded_echoes_of_a_real_value_never_reach_the_client() {
    if !support::require_root() {
        return;
    }
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    let env = Env::new(Opts {
        special: true,
        ..Opts::default()
    });
    let secrets = [
        ("API_KEY", REAL, env.masked.clone()),
        ("SPECIAL_KEY", SPECIAL, env.special_masked.clone()),
    ];
    let mut leaks = Vec::new();
    let mut requests = 0;
    for (name, real, m) in &secrets {
        let auth = format!("Authorization: Bearer {m}");
        for flag in ["--http1.1", "--http2"] {
            for path in ["/echo-b64", "/echo-json", "/echo-pct", "/echo-location"] {
                let url = format!("https://api.test{path}");
                let out = ok(&env.curl_t("api.test", 443, &[flag, "-i", "-H", &auth, &url]));
                requests += 1;
                assert_eq!(
                    env.good.last().header("authorization"),
                    Some(format!("Bearer {real}").as_str()),
                    "the upstream got the real value"
                );
                if let Some(how) = recoverable(out.as_bytes(), real) {
                    leaks.push(format!("{name} {flag} {path}: {how}\n{out}"));
                    continue;
                }
                // Where the encoding is exact, the client gets its masked token in that form.
                let m = m.as_bytes();
                match path {
                    "/echo-b64" => {
                        assert_eq!(STANDARD.decode(line(&out, "std")).unwrap(), m, "{out}");
                        assert_eq!(URL_SAFE.decode(line(&out, "url_padded")).unwrap(), m);
                        // Unpadded, the end of the value's encoding cannot be told from a blob
                        // going on: the value's bytes come back as zeros (egress::scrub docs).
                        let url = URL_SAFE_NO_PAD.decode(line(&out, "url")).unwrap();
                        assert_eq!(url, vec![0; real.len()]);
                        // Inside a longer blob the value is replaced in place: the rest of
                        // the blob still decodes to what the upstream wrote.
                        let blob = STANDARD.decode(line(&out, "blob1")).unwrap();
                        assert!(blob.ends_with(b"-tail-of-a-longer-blob"), "{blob:?}");
                    }
                    "/echo-pct" => {
                        assert_eq!(percent_decode(line(&out, "alnum").as_bytes()), m);
                        assert_eq!(percent_decode(line(&out, "unreserved_lower").as_bytes()), m);
                    }
                    "/echo-json" => {
                        let serde: serde_json::Value = serde_json::from_str(
                            out.lines().find(|l| l.contains("serde")).unwrap(),
                        )
                        .unwrap();
                        assert_eq!(serde["serde"].as_str().unwrap().as_bytes(), m);
                    }
                    _ => {
                        let loc = out
                            .lines()
                            .find(|l| l.to_ascii_lowercase().starts_with("location:"))
                            .unwrap_or_else(|| panic!("no Location in {out}"));
                        assert!(loc.contains(&format!("t={}", env_str(m))), "{loc}");
                    }
                }
            }
            // kz's own percent-encoding of a value it put in a URL, echoed back by `/echo`.
            let url = format!("https://api.test/echo?key={m}");
            let out = ok(&env.curl_t("api.test", 443, &[flag, &url]));
            requests += 1;
            if let Some(how) = recoverable(out.as_bytes(), real) {
                leaks.push(format!("{name} {flag} kz's own URL encoding: {how}\n{out}"));
            } else {
                // (`uri=` is the whole URL over h2.)
                assert!(out.contains(&format!("/echo?key={m}\n")), "{out}");
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "the client could recover a real value:\n{}",
        leaks.join("\n")
    );
    // The records name the secret and the form it was found in; never a value.
    let recs = wait(&env.audit, "proxy_request", requests);
    let forms: std::collections::BTreeSet<(String, String)> = recs
        .iter()
        .flat_map(|r| {
            r.fields["scrubbed_forms"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|f| {
            (
                f["secret"].as_str().unwrap().to_owned(),
                f["form"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        // REAL's base64 has no `+` or `/`: its URL-safe spellings are the standard ones.
        ("API_KEY", "base64"),
        ("API_KEY", "percent"),
        ("SPECIAL_KEY", "base64"),
        ("SPECIAL_KEY", "base64url"),
        ("SPECIAL_KEY", "json"),
        ("SPECIAL_KEY", "percent"),
    ] {
        assert!(
            forms.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} not in {forms:?}"
        );
    }
    for e in env.audit.events() {
        let s = serde_json::to_string(&e.fields).unwrap();
        assert!(recoverable(s.as_bytes(), REAL).is_none(), "{s}");
        assert!(recoverable(s.as_bytes(), SPECIAL).is_none(), "{s}");
    }
}

/// A masked token as text (they are ASCII).
fn env_str(m: &[u8]) -> String {
    String::from_utf8(m.to_vec()).unwrap()
}

#[test]
fn websocket_control_frames_and_close_reason_are_scrubbed() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let m = env.masked.clone();
    let kz_ca = std::fs::read_to_string(&env.kz_ca).unwrap();
    let port = env.transparent.port();
    let frames = env
        .client
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use futures_util::StreamExt;
                use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let cfg = support::tls::client_config(&kz_ca, &[b"http/1.1"]);
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect("api.test".try_into().unwrap(), tcp)
                    .await
                    .unwrap();
                let mut req = "wss://api.test/ws-control".into_client_request().unwrap();
                req.headers_mut()
                    .insert("authorization", format!("Bearer {m}").parse().unwrap());
                let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
                assert_eq!(resp.status(), 101);
                let mut frames = Vec::new();
                let read = async {
                    while let Some(Ok(msg)) = ws.next().await {
                        let (kind, payload) = match msg {
                            Message::Ping(p) => ("ping", p.to_vec()),
                            Message::Pong(p) => ("pong", p.to_vec()),
                            Message::Text(t) => ("text", t.as_bytes().to_vec()),
                            Message::Binary(b) => ("binary", b.to_vec()),
                            Message::Close(c) => (
                                "close",
                                c.map(|c| c.reason.as_bytes().to_vec()).unwrap_or_default(),
                            ),
                            Message::Frame(_) => continue,
                        };
                        let last = kind == "close";
                        frames.push((kind, payload));
                        if last {
                            break;
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), read)
                    .await
                    .ok();
                frames
            })
        })
        .join()
        .unwrap();
    let m = env.masked.clone();
    let shown: Vec<(&str, String)> = frames
        .iter()
        .map(|(k, p)| (*k, String::from_utf8_lossy(p).into_owned()))
        .collect();
    let kinds: Vec<&str> = shown.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, ["ping", "pong", "text", "close"], "{shown:?}");
    for (kind, payload) in &frames {
        assert_eq!(
            recoverable(payload, REAL),
            None,
            "the {kind} frame hands the real value back: {shown:?}"
        );
    }
    let bearer = format!("Bearer {m}");
    assert_eq!(shown[0].1, bearer, "ping payload");
    assert_eq!(shown[1].1, bearer, "pong payload");
    assert_eq!(shown[3].1, bearer, "close reason");
    let recs = wait(&env.audit, "proxy_request", 1);
    assert_eq!(recs[0].fields["scrubbed"], serde_json::json!(["API_KEY"]));
}

#[test]
fn identity_is_forced_toward_guarded_hosts_and_compressed_answers_are_refused() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    // A client asking for compression (curl --compressed sends gzip, deflate, br, zstd) still
    // gets `identity` asked upstream, with or without a token in the request, h1, h2, plain.
    for (port, flag, url) in [
        (443, "--http1.1", "https://api.test/echo"),
        (443, "--http2", "https://api.test/echo"),
        (80, "--http1.1", "http://api.test/echo"),
    ] {
        env.set_dst(GOOD, port);
        ok(&env.curl_t("api.test", port, &[flag, "--compressed", url]));
        assert_eq!(
            env.good.last().header("accept-encoding"),
            Some("identity"),
            "{url} {flag}"
        );
    }
    env.set_dst(GOOD, 443);
    // A compressed answer anyway: a 502 that says why, and a record with the error code.
    for flag in ["--http1.1", "--http2"] {
        let out = env.curl_t(
            "api.test",
            443,
            &[
                flag,
                "--compressed",
                "-w",
                "\n%{http_code}",
                "https://api.test/gzip",
            ],
        );
        let body = stdout(&out);
        assert!(body.ends_with("502"), "{body}");
        assert!(body.contains("compressed"), "{body}");
    }
    let recs = wait(&env.audit, "proxy_request", 5);
    let gz: Vec<_> = recs
        .iter()
        .filter(|r| r.fields["path"] == "/gzip")
        .collect();
    assert_eq!(gz.len(), 2);
    for r in gz {
        assert_eq!(r.fields["status"], 502);
        assert_eq!(r.fields["error"], "upstream_compressed_response");
    }
}

// ------------------------------------------------------------------------------------------
// Issue 14 (dns): anchored regex rules and the proxy's dial guard.

/// A regex rule matches the whole host name: `api\.test` allows api.test, not a name that
/// merely contains it. Plain HTTP to the evil upstream with a Host the resolver maps to it (so
/// the Host check holds): refused 403 and audited, nothing reaches the upstream.
#[test]
fn regex_rules_match_the_whole_host_name() {
    if !support::require_root() {
        return;
    }
    let rules = ConnectionRules(vec![
        ConnectionRule::from_keyzero(0, true, None, Some(r"api\.test")).unwrap(),
    ]);
    let env = Env::new(Opts {
        rules,
        ..Opts::default()
    });
    env.set_dst(EVIL, 80);
    for host in ["api.test.evil", "evilapi.test"] {
        let url = format!("http://{host}/echo");
        let out = env.curl_t(host, 80, &["-w", "\n%{http_code}", &url]);
        assert!(stdout(&out).ends_with("403"), "{host}: {}", stdout(&out));
    }
    // Explicit proxy, plain forward and CONNECT.
    let out = env.curl_x(&["-w", "\n%{http_code}", "http://api.test.evil/echo"]);
    assert!(stdout(&out).ends_with("403"), "{}", stdout(&out));
    let out = env.curl_x(&["-w", "\n%{http_code}", "https://evilapi.test/echo"]);
    assert!(!out.status.success() || stdout(&out).ends_with("403"));
    assert!(env.evil.seen().is_empty(), "{:?}", env.evil.seen());
    let recs = wait(&env.audit, "proxy_request", 3);
    let hosts: Vec<&str> = recs
        .iter()
        .map(|r| {
            assert_eq!(r.fields["status"], 403, "{r:?}");
            assert_eq!(r.fields["error"], "connection_denied", "{r:?}");
            r.fields["host"].as_str().unwrap()
        })
        .collect();
    assert!(hosts.contains(&"api.test.evil") && hosts.contains(&"evilapi.test"));
    // The name itself still works.
    env.set_dst(GOOD, 443);
    ok(&env.curl_t("api.test", 443, &["https://api.test/echo"]));
}

/// The proxy never dials loopback for an agent: a name that resolves to 127.0.0.1 (and a
/// transparent connection whose original destination is loopback) would otherwise reach kz's
/// own metrics endpoint, or any service of the host, from inside the sandbox. 502 and an audit
/// record `address_refused`.
#[test]
fn the_proxy_refuses_to_dial_loopback() {
    if !support::require_root() {
        return;
    }
    let env = Env::new(Opts::default());
    let port = env.metrics.port();
    // Explicit plain forward to a name the resolver maps to loopback.
    let url = format!("http://loopback.test:{port}/metrics");
    let out = env.curl_x(&["-w", "\n%{http_code}", &url]);
    let body = stdout(&out);
    assert!(!body.contains("kz_proxy_requests_total"), "{body}");
    assert!(body.ends_with("502"), "{body}");
    // Transparent: the agent connected to 127.0.0.1 itself.
    env.set_dst("127.0.0.1", port);
    let url = format!("http://loopback.test:{port}/metrics");
    let out = env.curl_t("loopback.test", port, &["-w", "\n%{http_code}", &url]);
    let body = stdout(&out);
    assert!(!body.contains("kz_proxy_requests_total"), "{body}");
    assert!(body.ends_with("502"), "{body}");
    let recs = wait(&env.audit, "proxy_request", 2);
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        assert_eq!(r.fields["status"], 502, "{r:?}");
        assert_eq!(r.fields["error"], "address_refused", "{r:?}");
    }
}

/// An allow `cidr` rule is the explicit word that opens a range to the proxy's dials; a deny
/// `cidr` rule closes a range even to a name the rules allow.
#[test]
fn an_allow_cidr_rule_opens_loopback_to_the_proxy() {
    if !support::require_root() {
        return;
    }
    let cidr = |allow, c: &str| ConnectionRule::from_table(0, allow, None, None, Some(c)).unwrap();
    let rules = ConnectionRules(vec![
        cidr(true, "127.0.0.0/8"),
        cidr(false, EVIL),
        ConnectionRule::allow(HostPattern::host("*.test").unwrap()),
    ]);
    let env = Env::new(Opts {
        rules,
        ..Opts::default()
    });
    let port = env.metrics.port();
    let url = format!("http://loopback.test:{port}/metrics");
    let out = ok(&env.curl_x(&[&url]));
    assert!(out.contains("kz_proxy_requests_total"), "{out}");
    // evil.test is allowed by name, but its address is in a deny range.
    env.set_dst(EVIL, 443);
    let out = env.curl_t(
        "evil.test",
        443,
        &["-w", "\n%{http_code}", "https://evil.test/echo"],
    );
    assert!(stdout(&out).ends_with("502"), "{}", stdout(&out));
    assert!(env.evil.seen().is_empty());
    let recs = wait(&env.audit, "proxy_request", 2);
    assert!(
        recs.iter().any(|r| r.fields["error"] == "address_refused"),
        "{recs:?}"
    );
}

// -------------------------------------------------------------------------------------------
// Memory under hostile clients: the proxy runs in a process of its own (this test binary
// re-executed, see `proxy_child_process`) so that its RSS is the proxy's alone, not the
// attacking clients' and the upstream's, which run in this process.

/// Set in the environment of the re-executed test binary: the directory holding the upstream's
/// CA (`test-ca.pem`); the child writes its own CA (`kz-ca.pem`) and audit (`audit.jsonl`).
const PROXY_CHILD: &str = "KZ_TEST_PROXY_CHILD";

/// An audit sink that appends one JSON line per record (the parent reads them back).
struct JsonLines(Mutex<std::fs::File>);

impl kz_agent::audit::AuditSink for JsonLines {
    fn record(&self, e: AuditEvent) -> Result<(), kz_agent::audit::AuditError> {
        let line = serde_json::json!({ "kind": e.kind, "fields": e.fields }).to_string() + "\n";
        self.0.lock().unwrap().write_all(line.as_bytes()).unwrap();
        Ok(())
    }
}

/// The limits of the child proxy under attack.
fn attack_limits() -> proxy::Limits {
    proxy::Limits {
        // 4,096 attackers and the one normal client; kz's default is 4,096.
        max_connections: 8192,
        drain_timeout: Duration::from_secs(1),
        // Two bytes a second are far below 256 B/s: cut after one 4 s window past the first
        // (which the burst fills).
        body_read_timeout: Duration::from_secs(4),
        body_min_rate: 256,
        ..proxy::Limits::default()
    }
}

/// Not a test by itself: the proxy of `hostile_slow_bodies_…` when this binary is re-executed
/// with [`PROXY_CHILD`] set (a no-op otherwise). Transparent listener on 127.0.0.1 in the
/// client namespace (the parent starts it there with nsenter), every connection redirected to
/// api.test (10.77.0.2:443); prints `READY <addr> <masked token>` and serves until stdin closes.
#[test]
fn proxy_child_process() {
    let Ok(dir) = std::env::var(PROXY_CHILD) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ca = Arc::new(CertAuthority::generate(64).unwrap());
        std::fs::write(dir.join("kz-ca.pem"), ca.cert_pem()).unwrap();
        let masked = proxy::TokenTable::generate_masked();
        let tokens = proxy::TokenTable::new();
        tokens
            .insert_named(
                "API_KEY",
                &masked,
                Secret::new(REAL),
                vec!["api.test".into()],
            )
            .unwrap();
        let file = std::fs::File::create(dir.join("audit.jsonl")).unwrap();
        let audit = Arc::new(JsonLines(Mutex::new(file)));
        let mut session = proxy::Session::new(SESSION, ca, tokens, audit.clone());
        session.resolve = Some(proxy::known_hosts(|host, port| {
            (host == "api.test").then(|| SocketAddr::new(GOOD.parse().unwrap(), port))
        }));
        let mut cfg = proxy::Config::new(audit);
        cfg.sessions = vec![session];
        cfg.transparent_listen = vec!["127.0.0.1:0".parse().unwrap()];
        cfg.upstream_ca = Some(dir.join("test-ca.pem"));
        cfg.limits = attack_limits();
        cfg.orig_dst = Some(Arc::new(|_peer| {
            Some(proxy::Redirected {
                dest: SocketAddr::new(GOOD.parse().unwrap(), 443),
                session: SESSION,
            })
        }));
        let h = proxy::start(cfg).await.unwrap();
        println!("READY {} {masked}", h.transparent_addrs[0]);
        std::io::stdout().flush().unwrap();
        let _ = tokio::task::spawn_blocking(|| {
            std::io::copy(&mut std::io::stdin(), &mut std::io::sink())
        })
        .await;
        h.shutdown().await;
    });
}

/// The proxy child: its process, listen address and masked token.
struct ProxyChild {
    child: std::process::Child,
    addr: SocketAddr,
    masked: String,
}

impl ProxyChild {
    fn start(env: &Env) -> ProxyChild {
        use std::io::BufRead;
        let dir = env.dir.join("kz-child");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(env.dir.join("test-ca.pem"), dir.join("test-ca.pem")).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut cmd = env.client.command(exe.to_str().unwrap());
        let mut child = cmd
            .args([
                "proxy_child_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROXY_CHILD, &dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // libtest's "test proxy_child_process ... " may precede it on the line.
                if let Some(at) = line.find("READY ") {
                    let _ = tx.send(line[at + 6..].to_owned());
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let (addr, masked) = ready.split_once(' ').unwrap();
        ProxyChild {
            child,
            addr: addr.parse().unwrap(),
            masked: masked.to_owned(),
        }
    }

    /// A line of /proc/<pid>/status in kB (nsenter execs the test binary: same pid).
    fn status_kb(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    fn audit(&self, env: &Env) -> Vec<serde_json::Value> {
        std::fs::read_to_string(env.dir.join("kz-child/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The attackers' certificate check: none (an attacker does not care whom it talks to, and
/// 4,096 chain verifications in a debug build would make the test slow).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn attacker_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// How one slow-body connection ended.
#[derive(Debug, PartialEq, Eq)]
enum SlowEnd {
    /// kz answered (the status line) or closed, this long after the body began.
    Cut(String, Duration),
    /// Connect or handshake failed.
    Refused(String),
    /// Still open at the deadline.
    Held,
}

/// One hostile client: `POST` with `Content-Length: 1048576`, `burst` bytes of the body at
/// once, then three bytes every `every` until kz answers or closes, or for `hold` after its
/// head went out.
#[allow(clippy::too_many_arguments)]
async fn slow_body(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    masked: Arc<String>,
    burst: usize,
    every: Duration,
    gate: Arc<tokio::sync::Semaphore>,
    started: Arc<std::sync::atomic::AtomicUsize>,
    hold: Duration,
) -> SlowEnd {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Connect and send the burst a few connections at a time (the listen backlog is finite).
    let permit = gate.acquire_owned().await.unwrap();
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return SlowEnd::Refused(format!("connect: {e}")),
    };
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let tls = match tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return SlowEnd::Refused(format!("tls: {e}")),
    };
    let (mut rd, mut wr) = tokio::io::split(tls);
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {masked}\r\n\
         Content-Length: 1048576\r\n\r\n"
    );
    let began = Instant::now();
    let deadline = tokio::time::Instant::now() + hold;
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'a', burst));
    if let Err(e) = wr.write_all(&body).await {
        return SlowEnd::Cut(format!("write: {e}"), began.elapsed());
    }
    drop(body);
    drop(permit);
    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut sent = burst;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let got = match r {
                    Ok(0) => "closed".to_owned(),
                    Ok(n) => String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_owned(),
                    Err(e) => format!("read: {e}"),
                };
                return SlowEnd::Cut(got, began.elapsed());
            }
            _ = tokio::time::sleep(every) => {
                if tokio::time::Instant::now() >= deadline {
                    return SlowEnd::Held;
                }
                if sent < (1 << 20) - 3 && wr.write_all(b"aaa").await.is_err() {
                    return SlowEnd::Cut("write failed".into(), began.elapsed());
                }
                sent += 3;
            }
        }
    }
}

/// Raises this process's open-file limit (the attack holds ~8,200 sockets here: the clients
/// and the upstream's side of kz's connections); the proxy child inherits it.
fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max.max(want));
            r.rlim_max = r.rlim_max.max(want);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Issue 14, memory under hostile clients: 4,096 TLS connections each declare a 1 MiB body
/// (toward a host a token may go to: kz reads it whole to rewrite it), send 32 KiB of it at
/// once and then trickle two bytes a second (three every 1.5 s). kz's RSS must stay under 300 MB, another client
/// must still get its answer within a few seconds, and every attacker must be cut off: by the
/// body read timeout (408, audited `body_timeout`), or, once the buffered bodies hold
/// `max_buffered_total` (64 MiB), at once (503, audited `buffered_bodies_full`).
/// Before the fix: no body timeout (every attacker still held at the deadline) and each
/// trickled byte pinned one of hyper's 8 KiB read buffers (RSS past 450 MB).
#[test]
fn hostile_slow_bodies_are_bounded_in_memory_and_cut_off() {
    if !support::require_root() {
        return;
    }
    let attackers: usize = 4096;
    // 4,096 × 32 KiB is twice `max_buffered_total`: about half the attackers find it held.
    let burst: usize = 32 * 1024;
    raise_nofile(65536);
    let env = Env::new(Opts::default());
    let kz = ProxyChild::start(&env);
    let kz_ca = env.dir.join("kz-child/kz-ca.pem");
    let rss_idle = kz.status_kb("VmRSS:");

    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attack = {
        let (addr, masked, started) = (kz.addr, Arc::new(kz.masked.clone()), started.clone());
        env.client.spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let cfg = attacker_tls();
                    let gate = Arc::new(tokio::sync::Semaphore::new(64));
                    let tasks: Vec<_> = (0..attackers)
                        .map(|_| {
                            tokio::spawn(slow_body(
                                addr,
                                cfg.clone(),
                                masked.clone(),
                                burst,
                                Duration::from_millis(1500),
                                gate.clone(),
                                started.clone(),
                                // Cut-off is due ~8 s after the head (two 4 s windows); the
                                // rest is room for a loaded machine.
                                Duration::from_secs(40),
                            ))
                        })
                        .collect();
                    let mut ends = Vec::with_capacity(tasks.len());
                    for t in tasks {
                        ends.push(t.await.unwrap());
                    }
                    ends
                })
        })
    };

    // While the attack runs: sample kz's RSS, and once every attacker has sent its burst, ask
    // for something as a normal client would.
    let t0 = Instant::now();
    let mut peak_rss = 0;
    let mut normal: Option<(String, Duration)> = None;
    let mut all_started_at = None;
    while !attack.is_finished() {
        peak_rss = peak_rss.max(kz.status_kb("VmRSS:"));
        let n = started.load(std::sync::atomic::Ordering::Relaxed);
        if n == attackers && all_started_at.is_none() {
            all_started_at = Some(t0.elapsed());
        }
        // Once every attacker holds its connection (or, if they never all get there, late).
        if normal.is_none() && (n == attackers || t0.elapsed() > Duration::from_secs(60)) {
            let connect_to = format!("api.test:443:127.0.0.1:{}", kz.addr.port());
            let auth = format!("Authorization: Bearer {}", kz.masked);
            let t = Instant::now();
            let out = env.run(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "10",
                    "--cacert",
                    kz_ca.to_str().unwrap(),
                    "--connect-to",
                    &connect_to,
                    "-H",
                    &auth,
                    "-w",
                    "\n%{http_code}",
                    "https://api.test/echo",
                ],
            );
            normal = Some((stdout(&out), t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ends = attack.join().unwrap();
    let peak_hwm = kz.status_kb("VmHWM:");
    let cpu = |pid: String| {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<&str> = st
            .rsplit_once(')')
            .map_or("", |x| x.1)
            .split_whitespace()
            .collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        (t(11) + t(12)) as f64 / 100.0
    };
    eprintln!(
        "CPU seconds: kz {:.1}, test process {:.1}",
        cpu(kz.child.id().to_string()),
        cpu("self".into())
    );
    let audit = kz.audit(&env);
    let timeouts = audit
        .iter()
        .filter(|r| r["fields"]["error"] == "body_timeout")
        .count();
    let mut cut_408 = 0;
    let mut cut_503 = 0;
    let mut cut_other = Vec::new();
    let mut refused = Vec::new();
    let mut held = 0;
    let mut slowest = Duration::ZERO;
    for e in &ends {
        match e {
            SlowEnd::Cut(s, took) => {
                slowest = slowest.max(*took);
                if s.starts_with("HTTP/1.1 408") {
                    cut_408 += 1;
                } else if s.starts_with("HTTP/1.1 503") {
                    cut_503 += 1;
                } else {
                    cut_other.push(s.clone());
                }
            }
            SlowEnd::Refused(e) => refused.push(e.clone()),
            SlowEnd::Held => held += 1,
        }
    }
    let full = audit
        .iter()
        .filter(|r| r["fields"]["error"] == "buffered_bodies_full")
        .count();
    cut_other.sort();
    cut_other.dedup();
    refused.sort();
    refused.dedup();
    eprintln!(
        "kz RSS: idle {} MB, peak sampled {} MB, VmHWM {} MB; all {attackers} bursts sent after {:?}; \
         normal client: {:?}; slow bodies: {cut_408} answered 408, {cut_503} 503, {} cut otherwise {:?}, \
         {} refused {:?}, {held} still held at the deadline; slowest cut after {slowest:?}; \
         audit: {timeouts} body_timeout, {full} buffered_bodies_full; attack took {:?}",
        rss_idle / 1024,
        peak_rss / 1024,
        peak_hwm / 1024,
        all_started_at,
        normal,
        cut_other.len(),
        &cut_other[..cut_other.len().min(5)],
        ends.iter()
            .filter(|e| matches!(e, SlowEnd::Refused(_)))
            .count(),
        &refused[..refused.len().min(5)],
        t0.elapsed(),
    );
    let (body, took) = normal.expect("the normal client never ran");
    assert!(
        body.ends_with("200") && took < Duration::from_secs(5),
        "a normal client during the attack got {body:?} after {took:?}"
    );
    assert!(
        peak_hwm < 300 * 1024,
        "kz's peak RSS under the attack was {} MB",
        peak_hwm / 1024
    );
    assert_eq!(held, 0, "{held} slow bodies were never cut off");
    assert!(refused.is_empty(), "attackers refused: {refused:?}");
    assert!(
        cut_other.is_empty(),
        "attackers cut off otherwise: {cut_other:?}"
    );
    // How many find the buffer cap held depends on how many are in flight at once (on a
    // loaded machine the first are cut before the last arrive); every one is cut either way.
    assert_eq!(cut_408 + cut_503, attackers);
    assert_eq!((timeouts, full), (cut_408, cut_503), "audit records");
}

/// One WebSocket session to api.test/ws through the transparent listener: sends `messages`,
/// returns the greeting and each echo, or the error that ended it.
fn ws_session(env: &Env, messages: Vec<String>) -> Result<Vec<String>, String> {
    let m = env.masked.clone();
    let kz_ca = std::fs::read_to_string(&env.kz_ca).unwrap();
    raw_async(env, move |addr| async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let cfg = support::tls::client_config(&kz_ca, &[b"http/1.1"]);
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect("api.test".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut req = "wss://api.test/ws".into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {m}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
            .await
            .map_err(|e| e.to_string())?;
        let mut got = vec![
            ws.next()
                .await
                .unwrap()
                .unwrap()
                .into_text()
                .unwrap()
                .to_string(),
        ];
        for msg in messages {
            ws.send(Message::text(msg))
                .await
                .map_err(|e| e.to_string())?;
            match ws.next().await {
                Some(Ok(r)) if r.is_text() => got.push(r.into_text().unwrap().to_string()),
                other => return Err(format!("{other:?}")),
            }
        }
        ws.close(None).await.ok();
        Ok(got)
    })
}

#[test]
fn websocket_messages_from_the_agent_follow_the_body_rules() {
    if !support::require_root() {
        return;
    }
    // `body` listed: a token in a message is swapped (and its echo scrubbed back).
    let env = Env::new(Opts::default());
    env.set_dst(GOOD, 443);
    let m = env.masked.clone();
    let got = ws_session(&env, vec![format!("auth {m}"), "plain".into()]).unwrap();
    assert_eq!(got[1], format!("auth {m}"), "the echo comes back scrubbed");
    assert_eq!(
        env.good.ws_messages(),
        vec![format!("auth {REAL}"), "plain".into()]
    );

    // Headers only (the default), refusing: the message carrying the token never leaves, the
    // relay is closed, and the refusal is audited.
    let env = Env::new(Opts {
        refuse_out_of_scope: true,
        places: Some(Places::default()),
        ..Opts::default()
    });
    env.set_dst(GOOD, 443);
    let m = env.masked.clone();
    let r = ws_session(&env, vec!["hello".into(), format!("auth {m}")]);
    assert!(r.is_err(), "{r:?}");
    assert_eq!(env.good.ws_messages(), vec!["hello".to_string()]);
    let v = wait(&env.audit, "token_misplaced", 1);
    assert_eq!(v[0].fields["refused"], true);
    env.audit_clean();
}
