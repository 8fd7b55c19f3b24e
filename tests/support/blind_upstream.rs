//! Upstream "remote API" hosts for blind-mode tests: a test CA and an HTTP/1.1 server that
//! listens with TLS (443) and in clear (80) inside a network namespace, records every request it
//! receives, and echoes the request's Authorization header back in the body (so a test can check
//! the proxy scrubs real values out of responses).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::netns::Netns;

/// The test CA (one for every test: [`super::tls::TestCa`]); here it signs the upstream hosts'
/// certificates (the `upstream_ca` of a blind run).
pub use super::tls::TestCa;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub tls: bool,
    pub sni: Option<String>,
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

pub struct Upstream {
    pub ip: IpAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// Serves HTTPS on `ip:443` (certificate for `names`) and HTTP on `ip:80` inside `ns`.
    pub fn start(ns: &Netns, ip: IpAddr, ca: &TestCa, names: &[&str]) -> Upstream {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (chain, key) = ca.leaf(names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = std::sync::mpsc::channel();
        let log = seen.clone();
        ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tls = TcpListener::bind(SocketAddr::new(ip, 443)).await.unwrap();
                let plain = TcpListener::bind(SocketAddr::new(ip, 80)).await.unwrap();
                tx.send(()).unwrap();
                let plain_log = log.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((s, _)) = plain.accept().await else {
                            continue;
                        };
                        let log = plain_log.clone();
                        tokio::spawn(serve(s, false, None, log));
                    }
                });
                loop {
                    let Ok((s, _)) = tls.accept().await else {
                        continue;
                    };
                    let (acceptor, log) = (acceptor.clone(), log.clone());
                    tokio::spawn(async move {
                        if let Ok(s) = acceptor.accept(s).await {
                            let sni = s.get_ref().1.server_name().map(str::to_owned);
                            serve(s, true, sni, log).await;
                        }
                    });
                }
            });
        });
        rx.recv().expect("upstream failed to start");
        Upstream { ip, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// One request per connection (the response says `Connection: close`): enough for every client
/// under test and keeps the server obviously correct.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    tls: bool,
    sni: Option<String>,
    log: Arc<Mutex<Vec<Seen>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut seen = Seen {
        tls,
        sni,
        head,
        body: buf[head_end..].to_vec(),
    };
    let len: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while seen.body.len() < len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.body.extend_from_slice(&chunk[..n]),
        }
    }
    let auth = seen.header("authorization").unwrap_or_default();
    let body = format!(
        "authorization={auth}\nbody={}\n",
        String::from_utf8_lossy(&seen.body)
    );
    log.lock().unwrap().push(seen);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Echo-Auth: {auth}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}
