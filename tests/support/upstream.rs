//! A real HTTPS (and plain HTTP) upstream for proxy tests: hyper h1+h2, run inside a netns.
//!
//! It records what it received (so a test can check that the *real* value arrived) and echoes
//! it back (so a test can check that the client only ever sees the *masked* token). Endpoints:
//! - `/echo…`     records the request; body and `x-echo-auth` header repeat the Authorization
//!   header and the URI; the response has a Content-Length.
//! - `/upload`    streams the request body, counting bytes and occurrences of the needle.
//! - `/download?n=N` streams N bytes (chunked, odd-sized chunks) with the needle repeated so that
//!   it straddles chunk boundaries.
//! - `/sse`       an event stream: one event with the needle at once, a second 2 s later.
//! - `/ws`        WebSocket: a greeting repeating the Authorization header, then echo.
//! - `/gzip`      a response claiming `Content-Encoding: gzip` whatever was asked.
//! - `/hangup`    like `/echo`, then the server closes the connection (as servers do with idle
//!   keep-alive connections), without saying so in the response.
//!
//! Every request is recorded with the id of the connection it came on (`Seen::conn`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub needle_hits: usize,
    /// Which accepted connection (numbered from 1 per listener) carried the request.
    pub conn: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct State {
    /// The real secret value the upstream expects to receive.
    pub needle: String,
    pub seen: Mutex<Vec<Seen>>,
}

impl State {
    pub fn new(needle: &str) -> Arc<State> {
        Arc::new(State {
            needle: needle.to_owned(),
            seen: Mutex::new(Vec::new()),
        })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// One accepted connection: its id, and a way for a handler to have the server close it.
struct Conn {
    id: u64,
    hangup: tokio::sync::Notify,
}

async fn handle(
    state: Arc<State>,
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut seen = Seen {
        conn: conn.id,
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        ..Seen::default()
    };
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        let greeting = format!("auth={}", seen.header("authorization").unwrap_or(""));
        state.seen.lock().unwrap().push(seen);
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                Role::Server,
                None,
            )
            .await;
            // First a message repeating what arrived (the real value).
            let _ = ws
                .send(tokio_tungstenite::tungstenite::Message::text(greeting))
                .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap());
    }
    let needle = state.needle.as_bytes().to_vec();
    // Stream the body, keeping only a window for counting needles across chunks.
    let mut body = req.into_body();
    let mut len = 0usize;
    let mut hits = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut head: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(d) = frame.into_data() {
            len += d.len();
            if head.len() < 200 {
                head.extend_from_slice(&d[..d.len().min(200 - head.len())]);
            }
            let mut win = std::mem::take(&mut tail);
            let old = win.len();
            win.extend_from_slice(&d);
            // Count matches that end in the new data only.
            hits += win
                .windows(needle.len().max(1))
                .enumerate()
                .filter(|(i, w)| *w == needle.as_slice() && i + needle.len() > old)
                .count();
            let keep = needle.len().saturating_sub(1).min(win.len());
            tail = win[win.len() - keep..].to_vec();
        }
    }
    seen.body_len = len;
    seen.needle_hits = hits;
    let auth = seen.header("authorization").unwrap_or("").to_owned();
    let uri = seen.uri.clone();
    state.seen.lock().unwrap().push(seen);
    if path == "/hangup" {
        conn.hangup.notify_one();
    }
    if path == "/slow" {
        // Holds the exchange open so concurrent clients are all in flight at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let resp = match path.as_str() {
        "/upload" => Response::new(full(format!("len={len} hits={hits}\n"))),
        "/download" => {
            let n: usize = uri
                .split("n=")
                .nth(1)
                .and_then(|v| v.split('&').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1024);
            let unit = format!("<{}>", state.needle);
            let data: Vec<u8> = unit.bytes().cycle().take(n).collect();
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = data
                .chunks(8191)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        }
        "/sse" => {
            let first = format!("data: first {}\n\n", state.needle);
            let s = futures_util::stream::iter(vec![first, "data: second\n\n".to_owned()])
                .enumerate()
                .then(|(i, ev)| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Ok::<_, Infallible>(Frame::data(Bytes::from(ev)))
                });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(BodyExt::boxed(StreamBody::new(s)))
                .unwrap()
        }
        "/gzip" => Response::builder()
            .header("content-encoding", "gzip")
            .body(full(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0]))
            .unwrap(),
        _ => Response::builder()
            .header("x-echo-auth", auth.clone())
            .header("content-type", "text/plain")
            .body(full(format!(
                "auth={auth}\nuri={uri}\nbody_len={len}\nbody_head={}\n",
                String::from_utf8_lossy(&head)
            )))
            .unwrap(),
    };
    Ok(resp)
}

/// Serves HTTPS (`tls = Some`) or plain HTTP on `l` until the runtime stops.
pub async fn serve(l: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, state: Arc<State>) {
    let mut next_id = 0u64;
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        next_id += 1;
        let conn = Arc::new(Conn {
            id: next_id,
            hangup: tokio::sync::Notify::new(),
        });
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let c = conn.clone();
            let svc = service_fn(move |req| handle(state.clone(), c.clone(), req));
            let b = auto::Builder::new(TokioExecutor::new());
            // `/hangup`: let the response go out, then drop the connection.
            let hangup = async {
                conn.hangup.notified().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            match tls {
                Some(cfg) => {
                    let Ok(t) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                        return;
                    };
                    tokio::select! {
                        _ = b.serve_connection_with_upgrades(TokioIo::new(t), svc) => {}
                        () = hangup => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = b.serve_connection_with_upgrades(TokioIo::new(s), svc) => {}
                        () = hangup => {}
                    }
                }
            }
        });
    }
}
