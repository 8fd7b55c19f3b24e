//! The HTTP upstream of every end-to-end test: hyper (HTTP/1.1, and h2 by ALPN or prior
//! knowledge), plain or TLS (certificates from [`super::tls::TestCa`]), inside a test network
//! namespace or on loopback.
//!
//! Every request is recorded ([`Seen`]: method, URI, headers, body, and the connection, TLS and
//! SNI it came on) so a test can check that the *real* value arrived. What a server answers is
//! its route set ([`Routes`]), chosen per server:
//! - [`Routes::Echo`] (the proxy tests) echoes the request and exercises streaming:
//!   - `/echo…` (and any other path): body and `x-echo-auth` header repeat the Authorization
//!     header and the URI; the response has a Content-Length.
//!   - `/upload` streams the request body, counting bytes and occurrences of the needle.
//!   - `/download?n=N` streams N bytes (odd-sized chunks) with the needle repeated so that it
//!     straddles chunk boundaries.
//!   - `/sse` an event stream: one event with the needle at once, a second 2 s later.
//!   - `/ws` WebSocket: a greeting repeating the Authorization header, then echo.
//!   - `/ws-control` WebSocket: the Authorization header in a ping, a pong, a text frame
//!     (base64 at an unaligned offset) and the close reason, then the server closes.
//!   - Encoded echoes of the Authorization value `v` (the header without `Bearer `), one line
//!     per encoder, as an upstream's own libraries would write it (issue 14's scrubbing):
//!     `/echo-b64` (standard and URL-safe, padded and not, at offsets 0, 1 and 2 of a longer
//!     blob, and such a blob percent-encoded and PHP-JSON-escaped; also an `x-echo-b64`
//!     header), `/echo-json` (serde_json, PHP-style `\/` and
//!     `\uXXXX`, Go-style `\u003c`, upper-case hex), `/echo-pct` (every byte but letters and
//!     digits, RFC 3986 unreserved in lower-case hex, `encodeURIComponent`, form encoding),
//!     `/echo-location` (a 302 whose `Location` carries `v` percent-encoded and base64url).
//!   - `/gzip` a response claiming `Content-Encoding: gzip` whatever was asked.
//!   - `/hangup` like `/echo`, then the server closes the connection (as servers do with idle
//!     keep-alive connections), without saying so in the response.
//!   - `/slow` like `/echo`, 300 ms late (`?ms=N`: N ms), so clients are in flight at once.
//! - [`Routes::EchoAuth`] (blind runs): every path answers `authorization=…\nbody=…\n` and an
//!   `X-Echo-Auth` header, one request per HTTP/1.1 connection (`Connection: close`).
//! - [`Routes::EchoAuthQuery`] (the PDP's proxy): `upstream saw auth=[…] query=[…]`, the
//!   credential being the Authorization or else the X-Api-Key header.
//! - [`Routes::Api`] (MCP fetch): an API that needs a credential and carelessly echoes it:
//!   `/echo` answers 200 only when the request carries it (Bearer header, X-Api-Key or
//!   `api_key` query) and puts what it received in a JSON body and an `x-echo-auth` header.
//!   `/big` (2 MiB, the credential at both ends), `/binary` (non-UTF-8 bytes around it),
//!   `/redirect-in` (same host), `/redirect-leak` (same host, the credential in the new URL),
//!   `/redirect-out` (another host), `/gzip` (a compressed body kz cannot scrub), `/slow`
//!   (answers after 30 s); any other path is a 404.
//! - [`Routes::Fixed`] (JWKS endpoints and the like): the current (status, body) for every
//!   request; the test may change it ([`Upstream::set_reply`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
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

use super::netns::Netns;

type Body = BoxBody<Bytes, Infallible>;

/// How much of a request body [`Seen::body`] keeps; larger uploads are only counted.
pub const BODY_KEEP: usize = 1 << 20;

/// One request as the upstream saw it.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub method: String,
    /// The request target as hyper has it: `/p?q` over HTTP/1.1, the whole URL over h2.
    pub uri: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// The first [`BODY_KEEP`] bytes of the body.
    pub body: Vec<u8>,
    pub body_len: usize,
    /// Occurrences of the route set's needle (the real value) in the body, across chunks.
    pub needle_hits: usize,
    /// Which accepted connection (numbered from 1 per listener) carried the request.
    pub conn: u64,
    /// Whether that connection was TLS, and the server name its client asked for.
    pub tls: bool,
    pub sni: Option<String>,
}

impl Seen {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The credential [`Routes::EchoAuthQuery`] reports: the Authorization header, else
    /// X-Api-Key ("" when neither came).
    pub fn credential(&self) -> &str {
        self.header("authorization")
            .or_else(|| self.header("x-api-key"))
            .unwrap_or_default()
    }

    /// The query string ("" when there is none).
    pub fn query(&self) -> &str {
        self.uri.split_once('?').map_or("", |(_, q)| q)
    }
}

/// What a server answers (see the module documentation).
#[derive(Clone)]
pub enum Routes {
    /// Echo and streaming routes; `needle` is the real value the test expects to arrive.
    Echo {
        needle: String,
    },
    EchoAuth,
    EchoAuthQuery,
    /// The credential-checking API; `secret` is the credential it accepts.
    Api {
        secret: String,
    },
    Fixed(Arc<Mutex<(u16, String)>>),
}

impl Routes {
    pub fn echo(needle: &str) -> Routes {
        Routes::Echo {
            needle: needle.to_owned(),
        }
    }

    pub fn api(secret: &str) -> Routes {
        Routes::Api {
            secret: secret.to_owned(),
        }
    }

    pub fn fixed(status: u16, body: &str) -> Routes {
        Routes::Fixed(Arc::new(Mutex::new((status, body.to_owned()))))
    }

    /// What [`Seen::needle_hits`] counts.
    fn needle(&self) -> &str {
        match self {
            Routes::Echo { needle } => needle,
            Routes::Api { secret } => secret,
            _ => "",
        }
    }
}

/// A route set and the record of what its listeners received.
pub struct State {
    pub routes: Routes,
    seen: Mutex<Vec<Seen>>,
    /// The text messages `/ws` received, in order.
    ws: Mutex<Vec<String>>,
}

impl State {
    /// [`Routes::Echo`] expecting `needle`.
    pub fn new(needle: &str) -> Arc<State> {
        State::with(Routes::echo(needle))
    }

    pub fn with(routes: Routes) -> Arc<State> {
        Arc::new(State {
            routes,
            seen: Mutex::new(Vec::new()),
            ws: Mutex::new(Vec::new()),
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

/// A listening address, with the TLS configuration to serve it with (`None`: plain HTTP).
pub type Listen = (SocketAddr, Option<Arc<rustls::ServerConfig>>);

/// A running upstream: one [`State`] served on one or more listeners by a thread of its own.
/// It stops when dropped.
pub struct Upstream {
    /// The bound addresses, in the order they were asked for.
    pub addrs: Vec<SocketAddr>,
    pub state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Upstream {
    /// Serves `routes` on every listener, inside `ns` (or in the test process's own network
    /// namespace when `None`: loopback servers); returns once all are bound.
    pub fn start(ns: Option<&Netns>, listen: &[Listen], routes: Routes) -> Upstream {
        let state = State::with(routes);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listen = listen.to_vec();
        let served = state.clone();
        let addrs = super::netns::serve(ns, move |ready| async move {
            let mut addrs = Vec::new();
            for (addr, tls) in listen {
                let l = TcpListener::bind(addr)
                    .await
                    .unwrap_or_else(|e| panic!("the upstream cannot bind {addr}: {e}"));
                addrs.push(l.local_addr().unwrap());
                tokio::spawn(serve(l, tls, served.clone()));
            }
            ready.send(addrs).unwrap();
            // Dropping the sender ends the runtime, and with it every connection.
            let _ = stopped.await;
        });
        Upstream {
            addrs,
            state,
            _stop: stop,
        }
    }

    /// A host at `ip` inside `ns`: HTTPS on 443 with `tls`, plain HTTP on 80.
    pub fn host(
        ns: &Netns,
        ip: IpAddr,
        tls: Arc<rustls::ServerConfig>,
        routes: Routes,
    ) -> Upstream {
        Upstream::start(
            Some(ns),
            &[
                (SocketAddr::new(ip, 443), Some(tls)),
                (SocketAddr::new(ip, 80), None),
            ],
            routes,
        )
    }

    /// One listener on a free port of 127.0.0.1 in the test process's own namespace.
    pub fn loopback(tls: Option<Arc<rustls::ServerConfig>>, routes: Routes) -> Upstream {
        Upstream::start(None, &[("127.0.0.1:0".parse().unwrap(), tls)], routes)
    }

    /// The first bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen()
    }

    pub fn last(&self) -> Seen {
        self.state.last()
    }

    /// The text messages its `/ws` received, in order.
    pub fn ws_messages(&self) -> Vec<String> {
        self.state.ws.lock().unwrap().clone()
    }

    /// The paths asked for, in order.
    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path).collect()
    }

    /// What a [`Routes::Fixed`] server answers from now on.
    pub fn set_reply(&self, status: u16, body: &str) {
        let Routes::Fixed(reply) = &self.state.routes else {
            panic!("set_reply on an upstream without fixed routes");
        };
        *reply.lock().unwrap() = (status, body.to_owned());
    }
}

/// Serves HTTPS (`tls = Some`) or plain HTTP on `l` until the runtime stops.
pub async fn serve(l: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, state: Arc<State>) {
    let mut next_id = 0u64;
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(cfg) => {
                    let Ok(t) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                        return;
                    };
                    let sni = t.get_ref().1.server_name().map(str::to_owned);
                    connection(TokioIo::new(t), Conn::new(id, true, sni), state).await;
                }
                None => connection(TokioIo::new(s), Conn::new(id, false, None), state).await,
            }
        });
    }
}

/// One accepted connection: what the records say about it, and a way for a handler to have
/// the server close it.
struct Conn {
    id: u64,
    tls: bool,
    sni: Option<String>,
    hangup: tokio::sync::Notify,
}

impl Conn {
    fn new(id: u64, tls: bool, sni: Option<String>) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            tls,
            sni,
            hangup: tokio::sync::Notify::new(),
        })
    }
}

async fn connection<I>(io: I, conn: Arc<Conn>, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let c = conn.clone();
    let svc = service_fn(move |req| handle(state.clone(), c.clone(), req));
    let b = auto::Builder::new(TokioExecutor::new());
    // `/hangup`: let the response go out, then drop the connection.
    let hangup = async {
        conn.hangup.notified().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::select! {
        _ = b.serve_connection_with_upgrades(io, svc) => {}
        () = hangup => {}
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn handle(
    state: Arc<State>,
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut seen = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        path: req.uri().path().to_owned(),
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
        conn: conn.id,
        tls: conn.tls,
        sni: conn.sni.clone(),
        ..Seen::default()
    };
    if matches!(state.routes, Routes::Echo { .. }) && seen.path == "/ws" {
        return Ok(websocket(&state, seen, &mut req));
    }
    if matches!(state.routes, Routes::Echo { .. }) && seen.path == "/ws-control" {
        return Ok(encoded::websocket_control(&state, seen, &mut req));
    }
    read_body(&mut seen, req.into_body(), state.routes.needle()).await;
    state.seen.lock().unwrap().push(seen.clone());
    Ok(match &state.routes {
        Routes::Echo { needle } => echo(needle, &conn, &seen).await,
        Routes::EchoAuth => echo_auth(&seen),
        Routes::EchoAuthQuery => echo_auth_query(&seen),
        Routes::Api { secret } => api(secret, &seen).await,
        Routes::Fixed(reply) => {
            let (status, body) = reply.lock().unwrap().clone();
            Response::builder().status(status).body(full(body)).unwrap()
        }
    })
}

/// Streams the body into `seen`: its length, its first [`BODY_KEEP`] bytes, and the
/// occurrences of `needle` (keeping only a window across chunks).
async fn read_body(seen: &mut Seen, mut body: Incoming, needle: &str) {
    let needle = needle.as_bytes();
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        let Ok(d) = frame.into_data() else { continue };
        seen.body_len += d.len();
        let room = BODY_KEEP - seen.body.len();
        seen.body.extend_from_slice(&d[..d.len().min(room)]);
        if needle.is_empty() {
            continue;
        }
        let mut win = std::mem::take(&mut tail);
        let old = win.len();
        win.extend_from_slice(&d);
        // Count matches that end in the new data only.
        seen.needle_hits += win
            .windows(needle.len())
            .enumerate()
            .filter(|(i, w)| *w == needle && i + needle.len() > old)
            .count();
        let keep = (needle.len() - 1).min(win.len());
        tail = win[win.len() - keep..].to_vec();
    }
}

/// `/ws` of [`Routes::Echo`]: a greeting repeating what arrived (the real value), then echo.
fn websocket(state: &Arc<State>, seen: Seen, req: &mut Request<Incoming>) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let greeting = format!("auth={}", seen.header("authorization").unwrap_or(""));
    state.seen.lock().unwrap().push(seen);
    let on = hyper::upgrade::on(req);
    let state = state.clone();
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(up),
            Role::Server,
            None,
        )
        .await;
        let _ = ws
            .send(tokio_tungstenite::tungstenite::Message::text(greeting))
            .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if let Ok(text) = msg.to_text() {
                state.ws.lock().unwrap().push(text.to_owned());
            }
            if ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(""))
        .unwrap()
}

async fn echo(needle: &str, conn: &Conn, seen: &Seen) -> Response<Body> {
    if seen.path == "/hangup" {
        conn.hangup.notify_one();
    }
    if seen.path == "/slow" {
        // `?ms=N` (default 300).
        let ms = seen
            .query()
            .split('&')
            .find_map(|kv| kv.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let auth = seen.header("authorization").unwrap_or("");
    match seen.path.as_str() {
        "/upload" => Response::new(full(format!(
            "len={} hits={}\n",
            seen.body_len, seen.needle_hits
        ))),
        "/download" => {
            let n: usize = seen
                .uri
                .split("n=")
                .nth(1)
                .and_then(|v| v.split('&').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1024);
            let unit = format!("<{needle}>");
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
            let first = format!("data: first {needle}\n\n");
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
        "/echo-b64" | "/echo-json" | "/echo-pct" | "/echo-location" => {
            encoded::echo(&seen.path, auth.strip_prefix("Bearer ").unwrap_or(auth))
        }
        _ => {
            let head = &seen.body[..seen.body.len().min(200)];
            Response::builder()
                .header("x-echo-auth", auth)
                .header("content-type", "text/plain")
                .body(full(format!(
                    "auth={auth}\nuri={}\nbody_len={}\nbody_head={}\n",
                    seen.uri,
                    seen.body_len,
                    String::from_utf8_lossy(head)
                )))
                .unwrap()
        }
    }
}

fn echo_auth(seen: &Seen) -> Response<Body> {
    let auth = seen.header("authorization").unwrap_or_default();
    let body = format!(
        "authorization={auth}\nbody={}\n",
        String::from_utf8_lossy(&seen.body)
    );
    let mut resp = Response::builder()
        .header("content-type", "text/plain")
        .header("x-echo-auth", auth);
    if seen.version.starts_with("HTTP/1") {
        resp = resp.header("connection", "close");
    }
    resp.body(full(body)).unwrap()
}

fn echo_auth_query(seen: &Seen) -> Response<Body> {
    Response::new(full(format!(
        "upstream saw auth=[{}] query=[{}]",
        seen.credential(),
        seen.query()
    )))
}

async fn api(secret: &str, seen: &Seen) -> Response<Body> {
    let authorization = seen.header("authorization");
    let api_key = seen.header("x-api-key");
    let query = seen.query();
    let ok = authorization == Some(format!("Bearer {secret}").as_str())
        || api_key == Some(secret)
        || query.split('&').any(|kv| kv == format!("api_key={secret}"));
    let resp = Response::builder();
    match seen.path.as_str() {
        "/echo" => {
            let echo = serde_json::json!({
                "ok": ok,
                "authorization": authorization,
                "x_api_key": api_key,
                "query": query,
                "method": seen.method,
                "version": seen.version,
                "body": String::from_utf8_lossy(&seen.body),
                "accept_encoding": seen.header("accept-encoding"),
                "x_trace": seen.header("x-trace"),
            });
            resp.status(if ok { 200 } else { 401 })
                .header("content-type", "application/json")
                .header("x-echo-auth", authorization.unwrap_or_default())
                .header("set-cookie", "session=upstream-session-cookie")
                .header("x-custom", "hi")
                .body(full(echo.to_string()))
                .unwrap()
        }
        "/big" => {
            let mut b = secret.as_bytes().to_vec();
            b.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
            b.extend_from_slice(secret.as_bytes());
            resp.status(200).body(full(b)).unwrap()
        }
        "/binary" => {
            let mut b = vec![0xff, 0xfe, 0x00];
            b.extend_from_slice(secret.as_bytes());
            b.push(0x80);
            resp.status(200)
                .header("content-type", "application/octet-stream")
                .body(full(b))
                .unwrap()
        }
        "/redirect-in" => resp
            .status(302)
            .header("location", "/echo?from=redirect")
            .body(full(""))
            .unwrap(),
        "/redirect-leak" => resp
            .status(307)
            .header("location", format!("/echo?leak={secret}"))
            .body(full(""))
            .unwrap(),
        "/redirect-out" => resp
            .status(302)
            .header("location", "https://other.test/echo")
            .body(full(""))
            .unwrap(),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            resp.status(200).body(full("")).unwrap()
        }
        "/gzip" => resp
            .status(200)
            .header("content-encoding", "gzip")
            .body(full(&b"\x1f\x8b\x08\x00not really"[..]))
            .unwrap(),
        _ => resp.status(404).body(full("")).unwrap(),
    }
}

/// The encoded echoes of [`Routes::Echo`] (`/echo-b64`, `/echo-json`, `/echo-pct`,
/// `/echo-location`, `/ws-control`): encoders written here, independently of kz's.
mod encoded {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;

    /// `v` percent-encoded: bytes outside letters, digits and `keep` as `%XX`, `space` for a
    /// space (form encoding writes `+`).
    fn pct(v: &str, keep: &str, upper: bool, space: &str) -> String {
        let mut out = String::new();
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || keep.as_bytes().contains(&b) {
                out.push(char::from(b));
            } else if b == b' ' && !space.is_empty() {
                out.push_str(space);
            } else if upper {
                out.push_str(&format!("%{b:02X}"));
            } else {
                out.push_str(&format!("%{b:02x}"));
            }
        }
        out
    }

    /// `v` as the inside of a JSON string: `slash` writes `\/`, `ascii` writes non-ASCII as
    /// `\uXXXX` (surrogate pairs above U+FFFF), `html` writes `<`, `>`, `&` as `\u003c`…
    fn json(v: &str, slash: bool, ascii: bool, html: bool, upper: bool) -> String {
        let mut out = String::new();
        let u = |out: &mut String, c: u16| {
            if upper {
                out.push_str(&format!("\\u{c:04X}"));
            } else {
                out.push_str(&format!("\\u{c:04x}"));
            }
        };
        for ch in v.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' if slash => out.push_str("\\/"),
                '<' | '>' | '&' if html => u(&mut out, ch as u16),
                c if (c as u32) < 0x20 => u(&mut out, c as u16),
                c if !c.is_ascii() && ascii => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        u(&mut out, *unit);
                    }
                }
                c => out.push(c),
            }
        }
        out
    }

    pub(super) fn echo(path: &str, v: &str) -> Response<Body> {
        let b = v.as_bytes();
        let cat = |pre: &[u8], post: &[u8]| [pre, b, post].concat();
        let resp = Response::builder().header("content-type", "text/plain");
        let lines =
            match path {
                "/echo-b64" => {
                    return resp
                    .header("x-echo-b64", STANDARD.encode(b))
                    .body(full(format!(
                        "std={}\nurl={}\nurl_padded={}\nbasic={}\nblob0={}\nblob1={}\nblob2={}\n\
                         in_url={}\nin_php_json={}\n",
                        STANDARD.encode(b),
                        URL_SAFE_NO_PAD.encode(b),
                        URL_SAFE.encode(b),
                        STANDARD.encode(cat(b"user:", b"")),
                        STANDARD.encode(cat(b"abc", b"-tail-of-a-longer-blob")),
                        STANDARD.encode(cat(b"x", b"-tail-of-a-longer-blob")),
                        URL_SAFE_NO_PAD.encode(cat(b"xy", b"-tail-of-a-longer-blob")),
                        pct(&STANDARD.encode(cat(b"user:", b"")), "", false, ""),
                        STANDARD.encode(cat(b"{\"t\":\"", b"\"}")).replace('/', "\\/"),
                    )))
                    .unwrap();
                }
                "/echo-json" => vec![
                    format!("{{\"serde\":{}}}", serde_json::Value::from(v)),
                    format!("{{\"php\":\"{}\"}}", json(v, true, true, false, false)),
                    format!("{{\"python\":\"{}\"}}", json(v, false, true, false, false)),
                    format!("{{\"go\":\"{}\"}}", json(v, false, false, true, false)),
                    format!("{{\"upper\":\"{}\"}}", json(v, true, true, true, true)),
                ],
                "/echo-pct" => vec![
                    format!("alnum={}", pct(v, "", true, "")),
                    format!("unreserved_lower={}", pct(v, "-._~", false, "")),
                    format!("uri_component={}", pct(v, "-_.!~*'()", true, "")),
                    format!("form={}", pct(v, "-._*", true, "+")),
                    format!("python_quote={}", pct(v, "-._~/", true, "")),
                ],
                _ => {
                    return resp
                        .status(302)
                        .header(
                            "location",
                            format!(
                                "https://api.test/landing?t={}&l={}&b={}",
                                pct(v, "-._~", true, ""),
                                pct(v, "", false, ""),
                                URL_SAFE_NO_PAD.encode(cat(b"z", b""))
                            ),
                        )
                        .body(full(""))
                        .unwrap();
                }
            };
        resp.body(full(lines.join("\n") + "\n")).unwrap()
    }

    /// `/ws-control`: the Authorization header in every kind of frame a server can send
    /// unasked, then a close frame whose reason repeats it.
    pub(super) fn websocket_control(
        state: &State,
        seen: Seen,
        req: &mut Request<Incoming>,
    ) -> Response<Body> {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        let auth = seen.header("authorization").unwrap_or("").to_owned();
        state.seen.lock().unwrap().push(seen);
        let on = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                Role::Server,
                None,
            )
            .await;
            let blob = STANDARD.encode([b"x", auth.as_bytes(), b"-tail"].concat());
            for msg in [
                Message::Ping(Bytes::from(auth.clone())),
                Message::Pong(Bytes::from(auth.clone())),
                Message::text(format!("b64={blob}")),
                Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: auth.clone().into(),
                })),
            ] {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            // Until the client answers the close.
            while let Some(Ok(_)) = ws.next().await {}
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap()
    }
}
