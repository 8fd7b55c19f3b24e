//! An HTTPS upstream for the MCP `fetch` tests, served inside a network namespace.
//!
//! It plays an API that needs a credential and carelessly echoes it: `/echo` answers 200 only
//! when the request carries the expected credential (Bearer header, X-Api-Key or `api_key`
//! query) and puts what it received in its body and an `x-echo-auth` header. Other routes
//! exercise the response handling: `/big` (larger than the cap, with the credential at both
//! ends), `/binary` (non-UTF-8 bytes around the credential), `/redirect-in` (same host),
//! `/redirect-leak` (same host, the credential in the new URL), `/redirect-out` (another host), `/gzip` (a compressed body kz cannot scrub), `/slow`
//! (answers after 30s).
//! Every request path is recorded so a test can prove a refused fetch never arrived.

use super::netns::Netns;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use super::tls::TestCa;

/// Paths the upstream has been asked for, in order.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Serves HTTPS (h2 and http/1.1) on `bind` inside `ns` with a leaf for `names`.
pub fn spawn(ns: &Netns, bind: SocketAddr, ca: &TestCa, names: &[&str], secret: &str) -> Seen {
    let leaf = ca.server_cert(names, &[]);
    let (chain, key) = (
        leaf.chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der)),
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    let secret = secret.to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen2.clone();
                let secret = secret.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let seen = seen.clone();
                        let secret = secret.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(route(req, &secret, &seen).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
    });
    ready_rx.recv().unwrap();
    seen
}

async fn route(
    req: Request<hyper::body::Incoming>,
    secret: &str,
    seen: &Seen,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_owned();
    seen.lock().unwrap().push(path.clone());
    let header = |n: &str| {
        req.headers()
            .get(n)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let authorization = header("authorization");
    let api_key = header("x-api-key");
    let accept_encoding = header("accept-encoding");
    let x_trace = header("x-trace");
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let ok = authorization.as_deref() == Some(&format!("Bearer {secret}"))
        || api_key.as_deref() == Some(secret)
        || query.split('&').any(|kv| kv == format!("api_key={secret}"));
    let resp = Response::builder();
    match path.as_str() {
        "/echo" => {
            let echo = serde_json::json!({
                "ok": ok,
                "authorization": authorization,
                "x_api_key": api_key,
                "query": query,
                "method": method,
                "version": version,
                "body": String::from_utf8_lossy(&body),
                "accept_encoding": accept_encoding,
                "x_trace": x_trace,
            });
            resp.status(if ok { 200 } else { 401 })
                .header("content-type", "application/json")
                .header("x-echo-auth", authorization.unwrap_or_default())
                .header("set-cookie", "session=upstream-session-cookie")
                .header("x-custom", "hi")
                .body(Full::new(Bytes::from(echo.to_string())))
                .unwrap()
        }
        "/big" => {
            let mut b = secret.as_bytes().to_vec();
            b.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
            b.extend_from_slice(secret.as_bytes());
            resp.status(200).body(Full::new(Bytes::from(b))).unwrap()
        }
        "/binary" => {
            let mut b = vec![0xff, 0xfe, 0x00];
            b.extend_from_slice(secret.as_bytes());
            b.push(0x80);
            resp.status(200)
                .header("content-type", "application/octet-stream")
                .body(Full::new(Bytes::from(b)))
                .unwrap()
        }
        "/redirect-in" => resp
            .status(302)
            .header("location", "/echo?from=redirect")
            .body(Full::default())
            .unwrap(),
        "/redirect-leak" => resp
            .status(307)
            .header("location", format!("/echo?leak={secret}"))
            .body(Full::default())
            .unwrap(),
        "/redirect-out" => resp
            .status(302)
            .header("location", "https://other.test/echo")
            .body(Full::default())
            .unwrap(),
        "/slow" => {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            resp.status(200).body(Full::default()).unwrap()
        }
        "/gzip" => resp
            .status(200)
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00not really")))
            .unwrap(),
        _ => resp.status(404).body(Full::default()).unwrap(),
    }
}
