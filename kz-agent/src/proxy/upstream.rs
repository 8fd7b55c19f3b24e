//! Upstream connections: dial the address kz chose itself, verify TLS against the verified host
//! name, and speak h1 or h2 as negotiated.
//!
//! Every dial is checked first by the session's address guard ([`check_dial`]: the connection
//! rules' [`super::ConnectionRules::address_guard`]): the proxy runs outside the sandbox, so a
//! dial to loopback, link-local, metadata, multicast or broadcast addresses would reach this
//! machine's services (kz's own listeners included) or the cloud's credentials on the agent's
//! behalf. Such a dial is refused (`address_refused`, a 502) unless an allow `cidr` rule holds
//! the address.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::Shared;
use super::body::ProxyBody;
use super::session::{Session, SessionId};
use crate::tls::ALPN_H2;

#[derive(Debug, thiserror::Error, Clone)]
pub enum UpstreamError {
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error(
        "the upstream certificate for {host} failed verification ({reason}); kz does not fall back to an unverified connection"
    )]
    Certificate { host: String, reason: String },
    #[error("TLS with {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error("HTTP with the upstream failed: {0}")]
    Http(String),
    #[error("kz does not connect to {addr}: {reason}")]
    AddressRefused { addr: SocketAddr, reason: String },
}

impl UpstreamError {
    /// Stable name for audit records.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Resolve { .. } => "upstream_resolve_failed",
            Self::Connect { .. } => "upstream_connect_failed",
            Self::ConnectTimeout { .. } => "upstream_connect_timeout",
            Self::Certificate { .. } => "upstream_certificate_invalid",
            Self::Tls { .. } => "upstream_tls_failed",
            Self::Http(_) => "upstream_http_failed",
            Self::AddressRefused { .. } => "address_refused",
        }
    }
}

/// Where and how to reach one upstream.
#[derive(Debug, Clone)]
pub struct Target {
    /// The session the connection serves: upstream connections are pooled per session, so a
    /// connection one sandbox's credentials went over is never reused for another's.
    pub session: SessionId,
    /// The verified host name (or IP literal): TLS is verified against it.
    pub host: String,
    pub addr: SocketAddr,
    pub tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Both,
    H1,
    H2,
}

pub enum Sender {
    H1(H1),
    H2(http2::SendRequest<ProxyBody>),
}

/// An h1 upstream connection driven by the task using it, not by a task of its own: the
/// request's task polls the connection while it waits for the response head, and the response
/// body polls it while it is read (in the client connection's task). A request then crosses no
/// task boundary on its way out and back. Idle in the pool, nobody polls it; it is polled
/// before reuse, which notices a connection the server closed meanwhile (a read of EOF).
pub struct H1 {
    send: http1::SendRequest<ProxyBody>,
    /// None once the connection has ended (or was handed to a task after an upgrade).
    conn: Option<SyncConn>,
}

type ConnFuture = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// The connection future, made `Sync` for response bodies (which must be): it is only ever
/// reached through `&mut`, so the mutex is never locked.
struct SyncConn(Mutex<ConnFuture>);

impl SyncConn {
    fn get(&mut self) -> &mut ConnFuture {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

impl H1 {
    /// Polls the connection; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(c) = self.conn.as_mut()
            && let Poll::Ready(r) = c.get().as_mut().poll(cx)
        {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream h1 connection ended");
            }
            // Dropping the dispatcher fails what is still waiting on it.
            self.conn = None;
        }
        self.conn.is_some()
    }

    /// Whether an idle connection is still usable (the server may have closed it).
    fn alive(&mut self) -> bool {
        self.drive(&mut Context::from_waker(std::task::Waker::noop())) && !self.send.is_closed()
    }
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Self::H2(_))
    }
}

/// Resolves `host:port` with the configured override first, then the system resolver.
pub async fn resolve(sh: &Session, host: &str, port: u16) -> Result<SocketAddr, UpstreamError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Some(f) = &sh.resolve
        && let Some(a) = f(host, port).await
    {
        return Ok(a);
    }
    let mut addrs =
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| UpstreamError::Resolve {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
    addrs.next().ok_or_else(|| UpstreamError::Resolve {
        host: host.to_owned(),
        reason: "no address".into(),
    })
}

/// All addresses `host` resolves to (override first), for checking a plain-HTTP Host header;
/// addresses the session's guard refuses are left out (a Host claim cannot be verified by an
/// address kz would not dial).
pub async fn resolve_all(sh: &Session, host: &str, port: u16) -> Vec<SocketAddr> {
    let found = if let Some(f) = &sh.resolve
        && let Some(a) = f(host, port).await
    {
        vec![a]
    } else {
        match tokio::net::lookup_host((host, port)).await {
            Ok(it) => it.collect(),
            Err(_) => Vec::new(),
        }
    };
    let guard = sh.rules.address_guard();
    found
        .into_iter()
        .filter(|a| guard.check_addr(a.ip()).is_ok())
        .collect()
}

/// Whether the proxy may dial `addr` for `session`: its rules' address guard decides. A session
/// that closed meanwhile has no rules any more: only the guard's defaults apply, which open no
/// range.
pub fn check_dial(sh: &Shared, session: SessionId, addr: SocketAddr) -> Result<(), UpstreamError> {
    let guard = match sh.sessions.get(session) {
        Some(s) => s.rules.address_guard(),
        None => super::ConnectionRules::default().address_guard(),
    };
    guard
        .check_addr(addr.ip())
        .map_err(|e| UpstreamError::AddressRefused {
            addr,
            reason: e.to_string(),
        })
}

async fn tcp(sh: &Shared, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
    let s = tokio::time::timeout(sh.limits.upstream_connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr })?
        .map_err(|e| UpstreamError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Connects (TCP, TLS when `target.tls`, HTTP handshake) and returns a sender; refuses an
/// address the session's guard rejects ([`check_dial`]) before dialling.
pub async fn connect(sh: &Shared, target: &Target, offer: Offer) -> Result<Sender, UpstreamError> {
    check_dial(sh, target.session, target.addr)?;
    let tcp = tcp(sh, target.addr).await?;
    if !target.tls {
        return h1(TokioIo::new(tcp)).await;
    }
    let cfg = match offer {
        Offer::Both => sh.upstream_tls.both.clone(),
        Offer::H1 => sh.upstream_tls.h1.clone(),
        Offer::H2 => sh.upstream_tls.h2.clone(),
    };
    let name = ServerName::try_from(target.host.clone()).map_err(|e| UpstreamError::Tls {
        host: target.host.clone(),
        reason: e.to_string(),
    })?;
    let tls = tokio::time::timeout(
        sh.limits.upstream_connect_timeout,
        TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| UpstreamError::ConnectTimeout { addr: target.addr })?
    .map_err(|e| classify_tls(&target.host, e))?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    // Only an offer that included h2 says whether the server speaks it.
    if offer != Offer::H1 {
        sh.pool().learned(target, h2);
    }
    if h2 {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(Sender::H2(send))
    } else {
        h1(TokioIo::new(tls)).await
    }
}

async fn h1<T>(io: TokioIo<T>) -> Result<Sender, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::Builder::new()
        .writev(false) // one TLS record for head + small body (see server.rs)
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Http(e.to_string()))?;
    Ok(Sender::H1(H1 {
        send,
        conn: Some(SyncConn(Mutex::new(Box::pin(conn.with_upgrades())))),
    }))
}

fn classify_tls(host: &str, e: std::io::Error) -> UpstreamError {
    let reason = e.to_string();
    let is_cert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|re| {
            matches!(
                re,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    if is_cert {
        UpstreamError::Certificate {
            host: host.to_owned(),
            reason,
        }
    } else {
        UpstreamError::Tls {
            host: host.to_owned(),
            reason,
        }
    }
}

/// A request that failed on an established connection; `request` is the request back when it
/// was never written (so it can be sent elsewhere).
struct SendError {
    error: String,
    request: Option<Request<ProxyBody>>,
}

impl SendError {
    fn unsent(req: Request<ProxyBody>) -> Self {
        Self {
            error: "the connection closed before the request was sent".into(),
            request: Some(req),
        }
    }
}

impl From<hyper::client::conn::TrySendError<Request<ProxyBody>>> for SendError {
    fn from(mut e: hyper::client::conn::TrySendError<Request<ProxyBody>>) -> Self {
        let request = e.take_message();
        Self {
            error: e.into_error().to_string(),
            request,
        }
    }
}

impl From<SendError> for UpstreamError {
    fn from(e: SendError) -> Self {
        UpstreamError::Http(e.error)
    }
}

/// Idle upstream connections shared by all client connections, keyed by the address dialled
/// *and* the host name its certificate was verified for: a connection verified for one name is
/// never reused for another. h1 connections are checked out exclusively and come back when
/// their response body is done. An h2 connection is leased to a client connection for its
/// whole life, so concurrent h2 clients get one upstream connection each (as many as they
/// opened themselves, up to `max_idle_per_key`, then they share): one shared connection would
/// put every stream's TLS and framing on one task, i.e. one core.
pub struct Pool {
    inner: Mutex<PoolInner>,
    max_idle_per_key: usize,
    idle_timeout: Duration,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    session: SessionId,
    addr: SocketAddr,
    host: String,
    tls: bool,
}

#[derive(Default)]
struct PoolInner {
    h1: HashMap<Key, Vec<(H1, Instant)>>,
    h2: HashMap<Key, Vec<H2Conn>>,
    /// Protocol last negotiated with each upstream (true = h2): lets a new client connection be
    /// offered the right ALPN without dialling first.
    proto: HashMap<Key, bool>,
}

const MAX_KEYS: usize = 4096;

/// A pooled h2 connection; `users` is held by each client connection leasing it, so its strong
/// count minus one is the number of client connections on it.
struct H2Conn {
    send: http2::SendRequest<ProxyBody>,
    users: Arc<()>,
}

/// A client connection's hold on a pooled h2 connection.
struct H2Lease {
    send: http2::SendRequest<ProxyBody>,
    _users: Arc<()>,
}

impl H2Conn {
    fn users(&self) -> usize {
        Arc::strong_count(&self.users) - 1
    }

    fn lease(&self) -> H2Lease {
        H2Lease {
            send: self.send.clone(),
            _users: self.users.clone(),
        }
    }
}

impl Pool {
    pub fn new(max_idle_per_key: usize, idle_timeout: Duration) -> Self {
        Self {
            inner: Mutex::new(PoolInner::default()),
            max_idle_per_key,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(t: &Target) -> Key {
        Key {
            session: t.session,
            addr: t.addr,
            host: t.host.clone(),
            tls: t.tls,
        }
    }

    /// Whether `target` spoke h2 last time (None: never dialled or forgotten).
    pub fn known_h2(&self, t: &Target) -> Option<bool> {
        self.lock().proto.get(&Self::key(t)).copied()
    }

    fn learned(&self, t: &Target, h2: bool) {
        let mut g = self.lock();
        if g.proto.len() >= MAX_KEYS {
            g.proto.clear();
        }
        g.proto.insert(Self::key(t), h2);
    }

    /// An idle h1 connection to `t`.
    fn checkout_h1(&self, t: &Target) -> Option<H1> {
        let key = Self::key(t);
        let mut g = self.lock();
        let list = g.h1.get_mut(&key)?;
        while let Some((mut c, at)) = list.pop() {
            if at.elapsed() < self.idle_timeout && c.alive() {
                return Some(c);
            }
        }
        None
    }

    /// An h2 connection to `t` no client connection holds; or, once `max_idle_per_key` are
    /// open, the least shared one. None: dial a new one.
    fn lease_h2(&self, t: &Target) -> Option<H2Lease> {
        let key = Self::key(t);
        let mut g = self.lock();
        let list = g.h2.get_mut(&key)?;
        list.retain(|c| !c.send.is_closed());
        let least = list.iter().min_by_key(|c| c.users())?;
        (least.users() == 0 || list.len() >= self.max_idle_per_key).then(|| least.lease())
    }

    /// Adds a new h2 connection to `t` and leases it to the caller.
    fn add_h2(&self, t: &Target, send: http2::SendRequest<ProxyBody>) -> H2Lease {
        let conn = H2Conn {
            send,
            users: Arc::new(()),
        };
        let lease = conn.lease();
        let key = Self::key(t);
        let mut g = self.lock();
        if g.h2.contains_key(&key) || g.h2.len() < MAX_KEYS {
            g.h2.entry(key).or_default().push(conn);
        }
        lease
    }

    fn put_h1(&self, t: &Target, s: H1) {
        let key = Self::key(t);
        let mut g = self.lock();
        if !g.h1.contains_key(&key) && g.h1.len() >= MAX_KEYS {
            return;
        }
        let list = g.h1.entry(key).or_default();
        if list.len() >= self.max_idle_per_key {
            list.remove(0);
        }
        list.push((s, Instant::now()));
    }

    /// Drops closed and expired connections (called periodically).
    pub fn sweep(&self) {
        let timeout = self.idle_timeout;
        let mut g = self.lock();
        g.h1.retain(|_, list| {
            list.retain_mut(|(c, at)| at.elapsed() < timeout && c.alive());
            !list.is_empty()
        });
        let max = self.max_idle_per_key;
        g.h2.retain(|_, list| {
            list.retain(|c| !c.send.is_closed());
            // Unleased connections beyond the per-host bound (left by a burst of clients).
            let mut unleased = list.iter().filter(|c| c.users() == 0).count();
            list.retain(|c| {
                let drop = c.users() == 0 && unleased > max;
                unleased -= usize::from(drop);
                !drop
            });
            !list.is_empty()
        });
    }

    /// Idle connections held (for metrics): h1 ones in the pool, h2 ones no client holds.
    pub fn idle(&self) -> usize {
        let g = self.lock();
        g.h1.values().map(Vec::len).sum::<usize>()
            + g.h2.values().flatten().filter(|c| c.users() == 0).count()
    }
}

/// The upstream of one client connection: which host it was verified for and which protocol
/// the client side speaks. h1 connections come from the shared [`Pool`] or are dialled, and go
/// back to the pool when their response body ends ([`UpstreamBody`]), so no task or timer is
/// needed per request and idle client connections do not pin upstream ones. An h2 connection
/// is leased from the pool for the client connection's life.
pub struct Upstream {
    pub target: Target,
    offer: Offer,
    want_h2: bool,
    /// A connection dialled during the client handshake, for the first request.
    first: Mutex<Option<Sender>>,
    h2: Mutex<Option<H2Lease>>,
}

impl Upstream {
    pub fn new(target: Target, offer: Offer, first: Option<Sender>) -> Arc<Self> {
        let want_h2 = offer == Offer::H2;
        Arc::new(Self {
            target,
            offer,
            want_h2,
            first: Mutex::new(first),
            h2: Mutex::new(None),
        })
    }

    /// Sends `req` (absolute-form URI, Host header set). When a pooled keep-alive connection
    /// turns out to be closed before the request was written (the server closed it while it was
    /// idle), the request is sent once more on a fresh connection: hyper hands back a request
    /// it did not send, so even a request with a body can be retried without copying it.
    pub async fn send(
        &self,
        sh: &Shared,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (sender, reused) = self.take(sh).await?;
        match self.send_on(sh, sender, req).await {
            Err(SendError {
                request: Some(unsent),
                ..
            }) if reused => {
                let fresh = self.dial(sh).await?;
                self.send_on(sh, fresh, unsent).await.map_err(Into::into)
            }
            r => r.map_err(Into::into),
        }
    }

    /// The handshake's connection, else this client connection's h2 lease or a pooled
    /// connection, else a new one; and whether it was used before.
    async fn take(&self, sh: &Shared) -> Result<(Sender, bool), UpstreamError> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(s) = first {
            return Ok((self.adopt(sh, s), false));
        }
        if self.want_h2 {
            let mut held = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = held.as_ref().filter(|l| !l.send.is_closed()) {
                return Ok((Sender::H2(l.send.clone()), true));
            }
            *held = sh.pool().lease_h2(&self.target);
            if let Some(l) = held.as_ref() {
                return Ok((Sender::H2(l.send.clone()), true));
            }
        } else if let Some(s) = sh.pool().checkout_h1(&self.target) {
            return Ok((Sender::H1(s), true));
        }
        Ok((self.dial(sh).await?, false))
    }

    async fn dial(&self, sh: &Shared) -> Result<Sender, UpstreamError> {
        // Boxed: the handshake futures are kilobytes, and every request's future (which hyper
        // moves into a task per h2 stream) would otherwise carry them.
        let s = Box::pin(connect(sh, &self.target, self.offer)).await?;
        Ok(self.adopt(sh, s))
    }

    /// A new h2 connection joins the pool, leased to this client connection.
    fn adopt(&self, sh: &Shared, s: Sender) -> Sender {
        if let Sender::H2(send) = &s {
            let lease = sh.pool().add_h2(&self.target, send.clone());
            *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        }
        s
    }

    async fn send_on(
        &self,
        sh: &Shared,
        sender: Sender,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match sender {
            Sender::H2(mut s) => {
                adapt(&mut req, true);
                if s.ready().await.is_err() {
                    return Err(SendError::unsent(req));
                }
                let resp = s.try_send_request(req).await.map_err(SendError::from)?;
                Ok(resp.map(|inner| UpstreamBody { inner, h1: None }))
            }
            Sender::H1(mut c) => {
                adapt(&mut req, false);
                let ready = poll_fn(|cx| {
                    if !c.drive(cx) {
                        return Poll::Ready(false);
                    }
                    c.send.poll_ready(cx).map(|r| r.is_ok())
                })
                .await;
                if !ready {
                    return Err(SendError::unsent(req));
                }
                let mut sent = std::pin::pin!(c.send.try_send_request(req));
                let resp = poll_fn(|cx| {
                    c.drive(cx);
                    sent.as_mut().poll(cx)
                })
                .await
                .map_err(SendError::from)?;
                // An upgraded connection belongs to the tunnel: a task of its own drives it
                // through the hand-over. One the server is closing is not worth keeping.
                // Otherwise it is reusable once this body has been read.
                let upgraded = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                if upgraded && let Some(mut conn) = c.conn.take() {
                    tokio::spawn(async move {
                        if let Err(e) = conn.get().await {
                            tracing::debug!(error = %e, "upstream h1 connection ended");
                        }
                    });
                }
                let reusable = !upgraded
                    && resp.version() == http::Version::HTTP_11
                    && !resp
                        .headers()
                        .get_all(http::header::CONNECTION)
                        .iter()
                        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                let h1 = Some(BodyConn {
                    conn: c,
                    back: reusable.then(|| (sh.pool().clone(), self.target.clone())),
                });
                Ok(resp.map(|inner| UpstreamBody { inner, h1 }))
            }
        }
    }
}

/// An upstream response body. For h1 it drives its connection while it is read (see [`H1`]),
/// and gives the connection back to the pool once read to its end; a body dropped before its
/// end takes the connection down with it (its remaining bytes would poison the next response).
pub struct UpstreamBody {
    inner: Incoming,
    h1: Option<BodyConn>,
}

struct BodyConn {
    conn: H1,
    /// Where the connection goes once the body is done; None: it is not reusable.
    back: Option<(Arc<Pool>, Target)>,
}

impl UpstreamBody {
    fn finish(&mut self) {
        if let Some(BodyConn {
            conn,
            back: Some((pool, target)),
        }) = self.h1.take()
            && conn.conn.is_some()
        {
            pool.put_h1(&target, conn);
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(b) = self.h1.as_mut() {
            b.conn.drive(cx);
        }
        let r = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        match &r {
            None => self.finish(),
            Some(Err(_)) => self.h1 = None,
            Some(Ok(_)) => {}
        }
        std::task::Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, 304, Content-Length: 0) is never polled.
        if http_body::Body::is_end_stream(&self.inner) {
            self.finish();
        }
    }
}

/// Request line and headers for the upstream's protocol: h2 wants the absolute URI and no Host
/// header; h1 wants origin-form and Host.
fn adapt(req: &mut Request<ProxyBody>, h2: bool) {
    if h2 {
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(http::header::HOST);
    } else {
        *req.version_mut() = http::Version::HTTP_11;
        // Origin form from the parsed parts: no second parse of the URL.
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = req.uri().path_and_query().cloned();
        if let Ok(u) = http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}
