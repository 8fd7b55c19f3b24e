//! Load generator for `cargo xtask bench proxy` (release build; tokio + hyper + rustls).
//!
//! `proxy_loadgen certs DIR IP NAME`: a test CA and a server certificate for nginx.
//! `proxy_loadgen load --url URL [--connect ADDR] [--bind IP] [--proxy ADDR] [--ca FILE] [--h2]
//!     [--conns N] [--streams S] [--secs T] [--new-conn] [--header 'K: V']... [--upload BYTES]
//!     [--download] [--hold N]`
//! prints one JSON line: requests, errors, rps, p50_us, p99_us, bytes, secs.
//! Explicit proxies are spoken to with CONNECT (https) or absolute-form requests (http).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type Body = BoxBody<Bytes, Infallible>;
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

#[derive(Clone)]
struct Cfg {
    uri: Uri,
    https: bool,
    host: String,
    port: u16,
    connect: SocketAddr,
    bind: Option<std::net::IpAddr>,
    proxy: Option<SocketAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    h2: bool,
    headers: Vec<(String, String)>,
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

fn args() -> Vec<String> {
    std::env::args().collect()
}

fn opt(name: &str) -> Option<String> {
    let a = args();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    args().iter().any(|x| x == name)
}

fn main() {
    let a = args();
    match a.get(1).map(String::as_str) {
        Some("certs") => certs(&a[2], &a[3], &a[4]),
        Some("load") => load(),
        _ => {
            eprintln!("usage: proxy_loadgen certs DIR IP NAME | load --url URL ...");
            std::process::exit(2);
        }
    }
}

fn certs(dir: &str, ip: &str, name: &str) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let dir = std::path::Path::new(dir);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kz bench CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress(ip.parse().unwrap()));
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem() + &ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

fn client_tls(ca: &str, h2: bool) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Arc::new(c)
}

async fn open(cfg: &Cfg) -> Result<Sender, String> {
    let dial = cfg.proxy.unwrap_or(cfg.connect);
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(b) = cfg.bind {
        sock.bind(SocketAddr::new(b, 0))
            .map_err(|e| e.to_string())?;
    }
    let mut tcp = sock.connect(dial).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).ok();
    if cfg.proxy.is_some() && cfg.https {
        let req = format!(
            "CONNECT {h}:{p} HTTP/1.1\r\nHost: {h}:{p}\r\n\r\n",
            h = cfg.host,
            p = cfg.port
        );
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            let n = tcp.read(&mut b).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("proxy closed during CONNECT".into());
            }
            buf.push(b[0]);
        }
        if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
            return Err(format!(
                "CONNECT refused: {}",
                String::from_utf8_lossy(&buf)
            ));
        }
    }
    let io: Box<dyn Io> = match &cfg.tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(cfg.host.clone()).unwrap();
            Box::new(
                tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        }
        None => Box::new(tcp),
    };
    if cfg.h2 {
        let (s, c) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        Ok(Sender::H2(s))
    } else {
        let (s, c) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        Ok(Sender::H1(s))
    }
}

fn request(cfg: &Cfg, body: Body, close: bool) -> Request<Body> {
    let uri: Uri = if cfg.h2 || (cfg.proxy.is_some() && !cfg.https) {
        cfg.uri.clone()
    } else {
        cfg.uri.path_and_query().unwrap().as_str().parse().unwrap()
    };
    let mut b = Request::builder().uri(uri);
    if !cfg.h2 {
        b = b.header("host", &cfg.host);
    }
    for (k, v) in &cfg.headers {
        b = b.header(k, v);
    }
    if close {
        b = b.header("connection", "close");
    }
    b.body(body).unwrap()
}

async fn send(s: &mut Sender, req: Request<Body>) -> Result<u64, String> {
    let resp = match s {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await
        }
        Sender::H2(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await
        }
    }
    .map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| e.to_string())?;
        if let Some(d) = f.data_ref() {
            n += d.len() as u64;
        }
    }
    if ok { Ok(n) } else { Err("status".into()) }
}

fn empty() -> Body {
    Empty::new().boxed()
}

fn load() {
    let url: Uri = opt("--url").expect("--url").parse().unwrap();
    let https = url.scheme_str() == Some("https");
    let host = url.host().unwrap().to_owned();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let connect: SocketAddr = opt("--connect")
        .unwrap_or_else(|| format!("{host}:{port}"))
        .parse()
        .expect("--connect IP:PORT (names are not resolved)");
    let h2 = flag("--h2");
    let tls = if https {
        Some(client_tls(&opt("--ca").expect("--ca"), h2))
    } else {
        None
    };
    let headers = {
        let a = args();
        a.iter()
            .enumerate()
            .filter(|(_, x)| *x == "--header")
            .filter_map(|(i, _)| a.get(i + 1))
            .filter_map(|h| h.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    };
    let cfg = Cfg {
        uri: url,
        https,
        host,
        port,
        connect,
        bind: opt("--bind").map(|b| b.parse().unwrap()),
        proxy: opt("--proxy").map(|p| p.parse().unwrap()),
        tls,
        h2,
        headers,
    };
    let conns: usize = opt("--conns").map_or(16, |v| v.parse().unwrap());
    let streams: usize = opt("--streams").map_or(1, |v| v.parse().unwrap());
    let secs: f64 = opt("--secs").map_or(5.0, |v| v.parse().unwrap());
    let threads: usize = opt("--threads").map_or(2, |v| v.parse().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        if let Some(n) = opt("--hold") {
            hold(&cfg, n.parse().unwrap()).await;
            return;
        }
        if let Some(n) = opt("--upload") {
            let n: usize = n.parse().unwrap();
            let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
            // The upstream may answer before it has read everything: the upload is over when
            // the last chunk has been taken by the connection *and* the response has arrived.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let count = n / chunk.len();
            let body = StreamBody::new(futures_util::stream::unfold(
                (0usize, Some(done_tx)),
                move |(i, mut tx)| {
                    let chunk = chunk.clone();
                    async move {
                        if i == count {
                            return None;
                        }
                        // With a Content-Length the connection may never poll past the last
                        // chunk, so taking the last chunk is the signal.
                        if i + 1 == count
                            && let Some(tx) = tx.take()
                        {
                            let _ = tx.send(());
                        }
                        Some((Ok::<_, Infallible>(Frame::data(chunk)), (i + 1, tx)))
                    }
                },
            ))
            .boxed();
            let mut s = open(&cfg).await.unwrap();
            let mut req = request(&cfg, body, false);
            *req.method_mut() = http::Method::PUT;
            req.headers_mut().insert(
                "content-length",
                (count * 64 * 1024).to_string().parse().unwrap(),
            );
            let t = Instant::now();
            let r = send(&mut s, req).await;
            let sent = done_rx.await.is_ok();
            let took = t.elapsed();
            report(
                1,
                u64::from(r.is_err() || !sent),
                took,
                vec![took],
                (count * 64 * 1024) as u64,
            );
            return;
        }
        if flag("--download") {
            let mut s = open(&cfg).await.unwrap();
            let t = Instant::now();
            let r = send(&mut s, request(&cfg, empty(), false)).await;
            let bytes = r.as_ref().copied().unwrap_or(0);
            report(
                1,
                u64::from(r.is_err()),
                t.elapsed(),
                vec![t.elapsed()],
                bytes,
            );
            return;
        }
        let new_conn = flag("--new-conn");
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let cfg = cfg.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                if new_conn {
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match open(&cfg).await {
                            Ok(mut s) => match send(&mut s, request(&cfg, empty(), true)).await {
                                Ok(_) => lat.push(t.elapsed()),
                                Err(_) => errors += 1,
                            },
                            Err(_) => errors += 1,
                        }
                    }
                    return (lat, errors);
                }
                let Ok(s) = open(&cfg).await else {
                    return (lat, 1);
                };
                match s {
                    Sender::H1(s) => {
                        let mut s = Sender::H1(s);
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            match send(&mut s, request(&cfg, empty(), false)).await {
                                Ok(_) => lat.push(t.elapsed()),
                                Err(_) => {
                                    errors += 1;
                                    match open(&cfg).await {
                                        Ok(n) => s = n,
                                        Err(_) => break,
                                    }
                                }
                            }
                        }
                    }
                    Sender::H2(s) => {
                        let mut sub = Vec::new();
                        for _ in 0..streams {
                            let mut s = Sender::H2(s.clone());
                            let cfg = cfg.clone();
                            sub.push(tokio::spawn(async move {
                                let mut lat = Vec::new();
                                let mut errors = 0u64;
                                while Instant::now() < deadline {
                                    let t = Instant::now();
                                    match send(&mut s, request(&cfg, empty(), false)).await {
                                        Ok(_) => lat.push(t.elapsed()),
                                        Err(_) => errors += 1,
                                    }
                                }
                                (lat, errors)
                            }));
                        }
                        for t in sub {
                            let (l, e) = t.await.unwrap();
                            lat.extend(l);
                            errors += e;
                        }
                    }
                }
                (lat, errors)
            }));
        }
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.unwrap();
            lat.extend(l);
            errors += e;
        }
        let n = lat.len() as u64;
        report(n, errors, start.elapsed(), lat, 0);
    });
}

fn report(n: u64, errors: u64, took: Duration, mut lat: Vec<Duration>, bytes: u64) {
    lat.sort();
    let pct = |p: f64| -> u128 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_micros()
    };
    println!(
        "{{\"requests\":{n},\"errors\":{errors},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"bytes\":{bytes},\"secs\":{:.3}}}",
        n as f64 / took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        took.as_secs_f64()
    );
}

/// Opens `n` connections, one request on each, keeps them open until stdin closes.
async fn hold(cfg: &Cfg, n: usize) {
    let mut held = Vec::new();
    let mut errors = 0;
    for _ in 0..n {
        match open(cfg).await {
            Ok(mut s) => match send(&mut s, request(cfg, empty(), false)).await {
                Ok(_) => held.push(s),
                Err(_) => errors += 1,
            },
            Err(_) => errors += 1,
        }
    }
    println!("HELD {} {errors}", held.len());
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            s.clear();
        }
    })
    .await
    .ok();
    drop(held);
}
