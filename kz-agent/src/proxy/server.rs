//! Listeners, connection handling and the per-request swap/scrub path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::LazyConfigAcceptor;

use super::Shared;
use super::body::{self, CountBody, Direction, ProxyBody, RewriteBody};
use super::metrics::Metrics;
use super::record::{Fields, Record, path_without_query_values};
use super::rules::{Verdict, normalize};
use super::session::{Redirected, Session};
use super::tokens::{Scrubber, Snapshot, SwapPlan};
use super::upstream::{self, Offer, Target, Upstream, UpstreamBody, UpstreamError};
use crate::audit::{AuditEvent, AuditSink};
use crate::egress::hop;
use crate::egress::location::{Keep, percent_encode};
use crate::egress::rewrite::{Decide, StreamRewriter};
use crate::tls::{ALPN_H1, ALPN_H2};

// ---------------------------------------------------------------------------------------------
// Shutdown and connection accounting

/// Drain / kill signal shared by all connections, plus the connection limit.
#[derive(Clone)]
pub struct Stop {
    tx: Arc<watch::Sender<u8>>,
    slots: Arc<Semaphore>,
}

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const KILL: u8 = 2;

impl Stop {
    pub fn new(max_connections: usize) -> Self {
        let (tx, _) = watch::channel(RUN);
        Self {
            tx: Arc::new(tx),
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }

    pub fn drain(&self) {
        self.tx.send_replace(DRAIN);
    }

    pub fn kill(&self) {
        self.tx.send_replace(KILL);
    }

    async fn reached(&self, level: u8) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v >= level).await;
    }

    /// Resolves once every connection has been told to close.
    pub async fn killed(&self) {
        self.reached(KILL).await;
    }
}

/// One client connection served by worker `.1`: counted in the metrics and the worker's load.
struct ActiveGuard(Arc<Shared>, usize);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        Metrics::dec(&self.0.metrics.connections_active);
        self.0.load[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Transparent,
    Explicit,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Transparent => "transparent",
            Self::Explicit => "explicit",
        }
    }
}

/// Accepts until the proxy drains, on worker `me`. A connection is served here unless another
/// worker has fewer connections; then it moves there (a thread that was busy when the kernel
/// woke it would otherwise keep what it accepted, and long keep-alive connections would stay
/// unevenly spread for their whole life).
pub async fn accept_loop(sh: Arc<Shared>, stop: Stop, l: TcpListener, kind: Kind, me: usize) {
    loop {
        let accepted = tokio::select! {
            r = l.accept() => r,
            _ = stop.reached(DRAIN) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = stop.slots.clone().try_acquire_owned() else {
            Metrics::inc(&sh.metrics.connections_rejected_total);
            tracing::warn!(%peer, "max_connections reached; closing the new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        Metrics::inc(&sh.metrics.connections_total);
        Metrics::inc(&sh.metrics.connections_active);
        let to = least_loaded(&sh, me);
        sh.load[to].fetch_add(1, Ordering::Relaxed);
        let active = ActiveGuard(sh.clone(), to);
        let there = (to != me).then(|| sh.workers[to].clone());
        let (sh, stop) = (sh.clone(), stop.clone());
        let serve = async move |stream: TcpStream| {
            let _permit = permit;
            let _active = active;
            let killed = stop.clone();
            tokio::select! {
                _ = serve_conn(sh, stop, stream, peer, kind) => {}
                _ = killed.reached(KILL) => {}
            }
        };
        let Some(there) = there else {
            tokio::spawn(serve(stream));
            continue;
        };
        // The socket is registered with this thread's reactor: re-register it over there.
        let moved = stream.into_std();
        there.spawn(async move {
            match moved.and_then(TcpStream::from_std) {
                Ok(s) => serve(s).await,
                Err(e) => tracing::warn!(error = %e, "cannot move a connection to another worker"),
            }
        });
    }
}

/// The worker with the fewest connections, `me` on a tie.
fn least_loaded(sh: &Shared, me: usize) -> usize {
    let mut best = me;
    let mut min = sh.load[me].load(Ordering::Relaxed);
    for (i, l) in sh.load.iter().enumerate() {
        let n = l.load(Ordering::Relaxed);
        if n < min {
            (best, min) = (i, n);
        }
    }
    best
}

async fn serve_conn(sh: Arc<Shared>, stop: Stop, stream: TcpStream, peer: SocketAddr, kind: Kind) {
    match kind {
        Kind::Explicit => {
            let Some(session) = sh.explicit_session.and_then(|id| sh.sessions.get(id)) else {
                refuse(&sh, &*sh.audit, peer, None, "session_closed");
                return;
            };
            let ctx = ConnCtx::new(sh, session, stop, peer, kind, Route::Explicit);
            serve_http(ctx, Box::new(stream), false).await;
        }
        Kind::Transparent => {
            let found = sh.orig_dst.as_ref().and_then(|f| f(peer));
            let Some(Redirected { dest: dst, session }) = found else {
                refuse(&sh, &*sh.audit, peer, None, "no_original_destination");
                return;
            };
            // The kernel recorded the connect for a sandbox this proxy does not (or no longer)
            // serve: nothing of any other sandbox applies to it.
            let Some(session) = sh.sessions.get(session) else {
                refuse(&sh, &*sh.audit, peer, Some(dst), "no_session");
                return;
            };
            if sh.own_addrs.contains(&dst) || dst.ip().is_unspecified() {
                refuse(
                    &sh,
                    &*session.audit,
                    peer,
                    Some(dst),
                    "destination_is_the_proxy",
                );
                return;
            }
            intercept(sh, session, stop, Box::new(stream), peer, kind, dst, None).await;
        }
    }
}

fn refuse(
    sh: &Shared,
    audit: &dyn AuditSink,
    peer: SocketAddr,
    dst: Option<SocketAddr>,
    reason: &'static str,
) {
    Metrics::inc(&sh.metrics.connections_denied_total);
    tracing::warn!(%peer, ?dst, reason, "connection refused");
    let mut ev = AuditEvent::new("connection_refused")
        .with("peer", peer.to_string())
        .with("reason", reason);
    if let Some(d) = dst {
        ev = ev.with("destination", d.to_string());
    }
    if let Err(e) = audit.record(ev) {
        Metrics::inc(&sh.metrics.audit_errors_total);
        tracing::error!(error = %e, "audit record lost");
    }
}

// ---------------------------------------------------------------------------------------------
// IO helpers

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
type BoxIo = Box<dyn Io>;

/// Replays bytes already read (the sniffed prefix) before reading from the stream.
struct Prefixed {
    prefix: Bytes,
    inner: BoxIo,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            if self.prefix.is_empty() {
                // Release the sniff buffer: idle connections should not keep it alive.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Records the time of the last byte in either direction (idle timeout).
struct IdleIo {
    inner: BoxIo,
    last: Arc<AtomicU64>,
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads the first bytes (at least one) within the handshake timeout.
async fn sniff(sh: &Shared, io: &mut BoxIo) -> Option<Bytes> {
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(sh.limits.handshake_timeout, io.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.truncate(n);
            Some(Bytes::from(buf))
        }
        _ => None,
    }
}

fn looks_like_http(first: &[u8]) -> bool {
    // Every HTTP/1 method (and the h2c preface "PRI") starts with an upper-case token.
    let tok: Vec<u8> = first
        .iter()
        .copied()
        .take_while(|b| b.is_ascii_uppercase())
        .collect();
    !tok.is_empty()
        && (first.len() > tok.len() && first[tok.len()] == b' ' || tok.len() == first.len())
}

// ---------------------------------------------------------------------------------------------
// Interception: TLS, plain HTTP, or splice

/// Serves one intercepted stream. `fixed_host` is the host already verified (CONNECT target);
/// `None` in transparent mode, where it comes from SNI / Host.
#[allow(clippy::too_many_arguments)]
async fn intercept(
    sh: Arc<Shared>,
    session: Arc<Session>,
    stop: Stop,
    mut io: BoxIo,
    peer: SocketAddr,
    kind: Kind,
    dst: SocketAddr,
    fixed_host: Option<String>,
) {
    let Some(first) = sniff(&sh, &mut io).await else {
        // Nothing arrived in time. A server-speaks-first protocol may be spliced by rule.
        let host = fixed_host.clone().unwrap_or_else(|| dst.ip().to_string());
        if let Verdict::Allow {
            splice_non_http: true,
        } = session.rules.check(&host, dst.port())
        {
            splice(&sh, &session, io, peer, &host, dst).await;
        } else {
            Metrics::inc(&sh.metrics.handshake_failures_total);
            tracing::debug!(%peer, "no data within the handshake timeout; closing");
        }
        return;
    };
    let io: BoxIo = Box::new(Prefixed {
        prefix: first.clone(),
        inner: io,
    });
    if first[0] == 0x16 {
        tls_intercept(sh, session, stop, io, peer, kind, dst, fixed_host).await;
    } else if looks_like_http(&first) {
        let upstream = Upstream::new(
            Target {
                session: session.id,
                host: fixed_host.clone().unwrap_or_else(|| dst.ip().to_string()),
                addr: dst,
                tls: false,
            },
            Offer::H1,
            None,
        );
        let route = Route::Plain {
            dst,
            fixed_host,
            upstream,
        };
        let ctx = ConnCtx::new(sh, session, stop, peer, kind, route);
        serve_http(ctx, io, false).await;
    } else {
        let host = fixed_host.unwrap_or_else(|| dst.ip().to_string());
        match session.rules.check(&host, dst.port()) {
            Verdict::Allow {
                splice_non_http: true,
            } => splice(&sh, &session, io, peer, &host, dst).await,
            _ => refuse(
                &sh,
                &*session.audit,
                peer,
                Some(dst),
                "non_http_not_allowed",
            ),
        }
    }
}

async fn splice(
    sh: &Shared,
    session: &Session,
    mut io: BoxIo,
    peer: SocketAddr,
    host: &str,
    dst: SocketAddr,
) {
    let up =
        tokio::time::timeout(sh.limits.upstream_connect_timeout, TcpStream::connect(dst)).await;
    let Ok(Ok(mut up)) = up else {
        refuse(
            sh,
            &*session.audit,
            peer,
            Some(dst),
            "splice_connect_failed",
        );
        return;
    };
    Metrics::inc(&sh.metrics.connections_spliced_total);
    let res = tokio::io::copy_bidirectional(&mut io, &mut up).await;
    let (a, b) = res.unwrap_or((0, 0));
    let ev = AuditEvent::new("tcp_splice")
        .with("peer", peer.to_string())
        .with("host", host)
        .with("destination", dst.to_string())
        .with("bytes_up", a)
        .with("bytes_down", b);
    if let Err(e) = session.audit.record(ev) {
        Metrics::inc(&sh.metrics.audit_errors_total);
        tracing::error!(error = %e, "audit record lost");
    }
}

#[allow(clippy::too_many_arguments)]
async fn tls_intercept(
    sh: Arc<Shared>,
    session: Arc<Session>,
    stop: Stop,
    io: BoxIo,
    peer: SocketAddr,
    kind: Kind,
    dst: SocketAddr,
    fixed_host: Option<String>,
) {
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(sh.limits.handshake_timeout, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            Metrics::inc(&sh.metrics.handshake_failures_total);
            tracing::info!(%peer, error = %e, "client TLS hello rejected");
            return;
        }
        Err(_) => {
            Metrics::inc(&sh.metrics.handshake_failures_total);
            tracing::info!(%peer, "client TLS hello timed out");
            return;
        }
    };
    let hello = start.client_hello();
    let sni = hello.server_name().map(normalize);
    let alpn: Vec<Vec<u8>> = hello
        .alpn()
        .map(|it| it.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    let host = fixed_host
        .clone()
        .or_else(|| sni.clone())
        .unwrap_or_else(|| dst.ip().to_string());
    let cert_host = sni.unwrap_or_else(|| host.clone());
    let offers_h2 = alpn.iter().any(|p| p == ALPN_H2);
    let offers_h1 = alpn.is_empty() || alpn.iter().any(|p| p == ALPN_H1);
    let offer = match (offers_h2, offers_h1) {
        (true, true) => Offer::Both,
        (true, false) => Offer::H2,
        _ => Offer::H1,
    };
    let denied = session.rules.check(&host, dst.port()) == Verdict::Deny;
    let target = Target {
        session: session.id,
        host: host.clone(),
        addr: dst,
        tls: true,
    };
    // Learn the upstream's protocol (and whether it is reachable and genuine) before answering
    // the client's hello, unless a previous connection already told us.
    // An h1-only client needs no protocol knowledge; otherwise use what an offer that
    // included h2 taught us.
    let known = if denied {
        None
    } else if !offers_h2 {
        Some(false)
    } else {
        sh.pool().known_h2(&target)
    };
    let upstream: Result<Option<upstream::Sender>, UpstreamError> = if denied {
        Err(UpstreamError::Http("denied".into()))
    } else if known.is_some() {
        Ok(None)
    } else {
        upstream::connect(&sh, &target, offer).await.map(Some)
    };
    let up_h2 = match &upstream {
        Ok(Some(s)) => s.is_h2(),
        Ok(None) => known.unwrap_or(false),
        Err(_) => false,
    };
    let client_alpn: Option<&[u8]> = match &upstream {
        _ if alpn.is_empty() => None,
        Ok(_) if up_h2 && offers_h2 => Some(ALPN_H2),
        Ok(_) if offers_h1 => Some(ALPN_H1),
        Ok(_) => None,
        Err(_) if offers_h1 => Some(ALPN_H1),
        Err(_) => Some(ALPN_H2),
    };
    let leaf = match session.ca.leaf(&cert_host) {
        Ok(l) => l,
        Err(e) => {
            Metrics::inc(&sh.metrics.handshake_failures_total);
            tracing::warn!(%peer, host = %cert_host, error = %e, "cannot mint a leaf certificate");
            return;
        }
    };
    let tls = match tokio::time::timeout(
        sh.limits.handshake_timeout,
        start.into_stream(leaf.config(client_alpn)),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            Metrics::inc(&sh.metrics.handshake_failures_total);
            tracing::info!(%peer, host = %host, error = %e, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            Metrics::inc(&sh.metrics.handshake_failures_total);
            tracing::info!(%peer, "client TLS handshake timed out");
            return;
        }
    };
    if denied {
        Metrics::inc(&sh.metrics.connections_denied_total);
    }
    let h2_client = client_alpn == Some(ALPN_H2);
    let up_offer = if h2_client { Offer::H2 } else { Offer::H1 };
    let route = Route::Tls {
        host,
        port: dst.port(),
        denied,
        upstream: upstream.map(|s| Upstream::new(target, up_offer, s)),
    };
    let ctx = ConnCtx::new(sh, session, stop, peer, kind, route);
    serve_http(ctx, Box::new(tls), h2_client).await;
}

// ---------------------------------------------------------------------------------------------
// HTTP serving

enum Route {
    /// Explicit proxy listener: CONNECT or absolute-form requests.
    Explicit,
    /// Decrypted TLS; the host was verified when the connection was set up.
    Tls {
        host: String,
        port: u16,
        denied: bool,
        upstream: Result<Arc<Upstream>, UpstreamError>,
    },
    /// Plain HTTP to a fixed destination. Without `fixed_host` the Host header is verified per
    /// request against the destination address.
    Plain {
        dst: SocketAddr,
        fixed_host: Option<String>,
        upstream: Arc<Upstream>,
    },
}

struct ConnCtx {
    sh: Arc<Shared>,
    session: Arc<Session>,
    stop: Stop,
    peer: SocketAddr,
    kind: Kind,
    route: Route,
    inflight: Arc<AtomicUsize>,
    /// Explicit listener: upstream of the last absolute-form request (keep-alive reuse).
    forward: tokio::sync::Mutex<Option<(String, u16, Arc<Upstream>)>>,
    /// Swap decisions for the last host and token-table version (a connection's host rarely
    /// changes, so requests reuse them).
    plan: std::sync::Mutex<Option<CachedPlan>>,
    /// Plain HTTP: the last Host claim and the host it was verified as. Like a TLS
    /// connection's certificate, the check holds for the connection (it may cost a DNS query).
    plain_host: std::sync::Mutex<Option<(String, String)>>,
}

struct CachedPlan {
    host: String,
    version: u64,
    plan: Arc<SwapPlan>,
    guarded: bool,
}

impl ConnCtx {
    fn new(
        sh: Arc<Shared>,
        session: Arc<Session>,
        stop: Stop,
        peer: SocketAddr,
        kind: Kind,
        route: Route,
    ) -> Arc<Self> {
        Arc::new(Self {
            sh,
            session,
            stop,
            peer,
            kind,
            route,
            inflight: Arc::new(AtomicUsize::new(0)),
            forward: tokio::sync::Mutex::new(None),
            plan: std::sync::Mutex::new(None),
            plain_host: std::sync::Mutex::new(None),
        })
    }

    /// The current snapshot, the swap plan for `host`, and whether any token may go to `host`.
    fn plan_for(&self, host: &str) -> (Arc<Snapshot>, Arc<SwapPlan>, bool) {
        let snap = self.session.tokens.snapshot();
        let mut g = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_ref()
            && c.host == host
            && c.version == snap.version()
        {
            return (snap, c.plan.clone(), c.guarded);
        }
        let plan = Arc::new(SwapPlan::new(snap.clone(), host));
        let guarded = snap.any_in_scope(host);
        *g = Some(CachedPlan {
            host: host.to_owned(),
            version: snap.version(),
            plan: plan.clone(),
            guarded,
        });
        (snap, plan, guarded)
    }
}

/// Serves HTTP on a client stream: h2 when ALPN chose it, else h1 (with upgrades). Only the
/// chosen protocol's connection state is allocated (boxed), which keeps idle connections small.
async fn serve_http(ctx: Arc<ConnCtx>, io: BoxIo, h2: bool) {
    let sh = ctx.sh.clone();
    let last = Arc::new(AtomicU64::new(now_ms()));
    let io = TokioIo::new(IdleIo {
        inner: io,
        last: last.clone(),
    });
    let svc_ctx = ctx.clone();
    let svc = service_fn(move |req| handle(svc_ctx.clone(), req));
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(sh.limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            // Rapid reset (CVE-2023-44487): a client that resets streams faster than they are
            // served, or keeps opening streams past the limit, gets GOAWAY instead of a stream
            // of cancelled upstream requests (tests/proxy.rs, h2_rapid_reset_…).
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(1024);
        let conn = Box::pin(b.serve_connection(io, svc));
        drive(&ctx, &last, conn, |c| c.graceful_shutdown()).await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        // Flattened writes: head and a small body leave in one TLS record and one syscall
        // (vectored writes make rustls seal one record per buffer).
        b.writev(false)
            .timer(TokioTimer::new())
            .header_read_timeout(sh.limits.header_read_timeout)
            .max_buf_size(sh.limits.max_header_bytes.max(8192))
            .max_headers(sh.limits.max_headers);
        let conn = Box::pin(b.serve_connection(io, svc).with_upgrades());
        drive(&ctx, &last, conn, |c| c.graceful_shutdown()).await;
    }
}

/// Runs a connection until it ends; drains it gracefully on shutdown or when idle.
async fn drive<C>(
    ctx: &ConnCtx,
    last: &AtomicU64,
    mut conn: Pin<Box<C>>,
    graceful: impl Fn(Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    let limits = &ctx.sh.limits;
    // The idle check ticks at least twice per header-read timeout. Why: hyper arms a timer
    // for every request head; when that timer is the runtime's earliest, arming it wakes the
    // runtime's driver through its eventfd (a write and an extra epoll round per request).
    // With this tick pending, a head timer is never the earliest.
    let tick = (limits.idle_timeout / 4)
        .min(limits.header_read_timeout / 2)
        .max(Duration::from_millis(50));
    let idle = idle_watch(last, &ctx.inflight, limits.idle_timeout, tick);
    tokio::pin!(idle);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %ctx.peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = ctx.stop.reached(DRAIN), if !draining => {
                draining = true;
                graceful(conn.as_mut());
            }
            _ = &mut idle, if !draining => {
                tracing::debug!(peer = %ctx.peer, "idle timeout; closing");
                draining = true;
                graceful(conn.as_mut());
            }
        }
    }
}

async fn idle_watch(last: &AtomicU64, inflight: &AtomicUsize, timeout: Duration, tick: Duration) {
    loop {
        tokio::time::sleep(tick).await;
        let idle_for = now_ms().saturating_sub(last.load(Ordering::Relaxed));
        if inflight.load(Ordering::Relaxed) == 0 && idle_for >= timeout.as_millis() as u64 {
            return;
        }
    }
}

fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(msg + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn split_authority(auth: &str, default_port: u16) -> (String, u16) {
    // `[v6]:port`, `host:port` or `host`.
    if let Some(rest) = auth.strip_prefix('[')
        && let Some((h, p)) = rest.split_once(']')
    {
        let port = p
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default_port);
        return (normalize(h), port);
    }
    match auth.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (normalize(h), p.parse().unwrap_or(default_port)),
        _ => (normalize(auth), default_port),
    }
}

async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    match &ctx.route {
        Route::Explicit => {
            if req.method() == Method::CONNECT {
                return Ok(connect_checked(&ctx, req).await);
            }
            let uri = req.uri().clone();
            let (Some(auth), Some("http")) = (uri.authority(), uri.scheme_str()) else {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "kz proxy: send CONNECT for https or an absolute http:// URI".into(),
                ));
            };
            let (host, port) = split_authority(auth.as_str(), 80);
            if ctx.session.rules.check(&host, port) == Verdict::Deny {
                return Ok(denied(&ctx, req, &host, port));
            }
            let up = {
                let mut g = ctx.forward.lock().await;
                match g.as_ref() {
                    Some((h, p, u)) if *h == host && *p == port => u.clone(),
                    _ => match upstream::resolve(&ctx.session, &host, port).await {
                        Ok(addr) => {
                            let u = Upstream::new(
                                Target {
                                    session: ctx.session.id,
                                    host: host.clone(),
                                    addr,
                                    tls: false,
                                },
                                Offer::H1,
                                None,
                            );
                            *g = Some((host.clone(), port, u.clone()));
                            u
                        }
                        Err(e) => return Ok(upstream_failed(&ctx, req, &host, port, &e)),
                    },
                }
            };
            Ok(forward(ctx.clone(), req, host, port, up, false).await)
        }
        Route::Tls {
            host,
            port,
            denied: is_denied,
            upstream,
        } => {
            if *is_denied {
                return Ok(denied(&ctx, req, host, *port));
            }
            match upstream {
                Ok(u) => Ok(forward(ctx.clone(), req, host.clone(), *port, u.clone(), true).await),
                Err(e) => Ok(upstream_failed(&ctx, req, host, *port, e)),
            }
        }
        Route::Plain {
            dst,
            fixed_host,
            upstream,
        } => {
            let host = match fixed_host {
                Some(h) => h.clone(),
                None => verify_plain_host(&ctx, &req, *dst).await,
            };
            if ctx.session.rules.check(&host, dst.port()) == Verdict::Deny {
                return Ok(denied(&ctx, req, &host, dst.port()));
            }
            Ok(forward(ctx.clone(), req, host, dst.port(), upstream.clone(), false).await)
        }
    }
}

/// Plain HTTP has no certificate: the Host header counts only if it resolves to the address the
/// client actually connected to. Otherwise the host is the bare IP (and tokens scoped to names
/// are not swapped). Checked once per connection and claim.
async fn verify_plain_host(ctx: &ConnCtx, req: &Request<Incoming>, dst: SocketAddr) -> String {
    let claimed = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let Some(claimed) = claimed else {
        return dst.ip().to_string();
    };
    let cache = || ctx.plain_host.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((c, verified)) = cache().as_ref()
        && c == claimed
    {
        return verified.clone();
    }
    let (name, _) = split_authority(claimed, dst.port());
    let holds = match name.parse::<std::net::IpAddr>() {
        Ok(addr) => addr == dst.ip(),
        Err(_) => upstream::resolve_all(&ctx.session, &name, dst.port())
            .await
            .iter()
            .any(|a| a.ip() == dst.ip()),
    };
    let verified = if holds { name } else { dst.ip().to_string() };
    *cache() = Some((claimed.to_owned(), verified.clone()));
    verified
}

fn fields(ctx: &ConnCtx, req: &Request<Incoming>, host: &str, port: u16) -> Fields {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Fields {
        host: host.to_owned(),
        port,
        method: req.method().as_str().to_owned(),
        path: path_without_query_values(pq),
        mode: ctx.kind.name(),
        protocol: match req.version() {
            Version::HTTP_2 => "h2",
            Version::HTTP_10 => "http/1.0",
            _ => "http/1.1",
        },
        ..Fields::default()
    }
}

fn denied(ctx: &ConnCtx, req: Request<Incoming>, host: &str, port: u16) -> Response<ProxyBody> {
    let mut f = fields(ctx, &req, host, port);
    f.status = 403;
    f.error = Some("connection_denied".into());
    drop(Record::new(
        ctx.sh.clone(),
        ctx.session.audit.clone(),
        f,
        None,
    ));
    text(
        StatusCode::FORBIDDEN,
        format!("kz: connections to {host} are not allowed by the connection rules"),
    )
}

fn upstream_failed(
    ctx: &ConnCtx,
    req: Request<Incoming>,
    host: &str,
    port: u16,
    e: &UpstreamError,
) -> Response<ProxyBody> {
    Metrics::inc(&ctx.sh.metrics.upstream_errors_total);
    let status = match e {
        UpstreamError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let mut f = fields(ctx, &req, host, port);
    f.status = status.as_u16();
    f.error = Some(e.kind().into());
    drop(Record::new(
        ctx.sh.clone(),
        ctx.session.audit.clone(),
        f,
        None,
    ));
    text(status, format!("kz: {e}"))
}

/// CONNECT: check the rules, resolve (an unresolvable target is a 502 here, never a dial to
/// some fallback address), then intercept the tunnel.
async fn connect_checked(ctx: &Arc<ConnCtx>, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(auth) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "kz proxy: CONNECT needs host:port".into(),
        );
    };
    let (host, port) = split_authority(&auth, 443);
    if ctx.session.rules.check(&host, port) == Verdict::Deny {
        Metrics::inc(&ctx.sh.metrics.connections_denied_total);
        return denied(ctx, req, &host, port);
    }
    let dst = match upstream::resolve(&ctx.session, &host, port).await {
        Ok(a) => a,
        Err(e) => return upstream_failed(ctx, req, &host, port, &e),
    };
    if ctx.sh.own_addrs.contains(&dst) || dst.ip().is_unspecified() {
        refuse(
            &ctx.sh,
            &*ctx.session.audit,
            ctx.peer,
            Some(dst),
            "destination_is_the_proxy",
        );
        return text(
            StatusCode::FORBIDDEN,
            format!("kz: {host}:{port} is the proxy itself"),
        );
    }
    tunnel(ctx, req, host, dst)
}

/// Not async on purpose: the tunnel serves HTTP again, and an async fn here would make the
/// request handler's future type contain itself.
fn tunnel(
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
    host: String,
    dst: SocketAddr,
) -> Response<ProxyBody> {
    let sh = ctx.sh.clone();
    let session = ctx.session.clone();
    let stop = ctx.stop.clone();
    let peer = ctx.peer;
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        intercept(
            sh,
            session,
            stop,
            Box::new(TokioIo::new(upgraded)),
            peer,
            Kind::Explicit,
            dst,
            Some(host),
        )
        .await;
    });
    Response::new(body::empty())
}

/// Real values placed into a URL, percent-encoded ([`Keep::Unreserved`]).
struct UrlEncoded(Vec<Option<Vec<u8>>>);

impl Decide for UrlEncoded {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        self.0.get(id).and_then(|v| v.as_deref())
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn forward(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
    host: String,
    port: u16,
    up: Arc<Upstream>,
    tls: bool,
) -> Response<ProxyBody> {
    let sh = ctx.sh.clone();
    Metrics::inc(&sh.metrics.requests_total);
    ctx.inflight.fetch_add(1, Ordering::Relaxed);
    let guard = InflightGuard(ctx.inflight.clone());
    let rec = Record::new(
        sh.clone(),
        ctx.session.audit.clone(),
        fields(&ctx, &req, &host, port),
        Some(Box::new(guard)),
    );
    let (snap, plan, guarded) = ctx.plan_for(&host);
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    let mut violation = false;

    // URL path and query: `swapped_pq` only when a token was found in them.
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut swapped_pq: Option<String> = None;
    if !snap.is_empty() {
        let mut hit = false;
        plan.patterns()
            .for_each_match(pq.as_str().as_bytes(), |_| hit = true);
        if hit {
            let enc = UrlEncoded(
                (0..snap.len())
                    .map(|i| {
                        plan.replacement(i)
                            .map(|v| percent_encode(v, Keep::Unreserved).into_bytes())
                    })
                    .collect(),
            );
            let mut seen = |id: usize, replaced: bool| {
                violation |= !replaced;
                rec.token(snap.name(id), replaced);
            };
            if let Some(v) = plan
                .patterns()
                .rewrite_all(pq.as_str().as_bytes(), &enc, &mut seen)
            {
                swapped_pq = Some(String::from_utf8_lossy(&v).into_owned());
            }
        }
        // Header values.
        for (_, value) in parts.headers.iter_mut() {
            let mut seen = |id: usize, replaced: bool| {
                violation |= !replaced;
                rec.token(snap.name(id), replaced);
            };
            if let Some(v) = plan
                .patterns()
                .rewrite_all(value.as_bytes(), plan.as_ref(), &mut seen)
            {
                match HeaderValue::from_bytes(&v) {
                    Ok(hv) => *value = hv,
                    Err(_) => {
                        return bad_request(
                            &rec,
                            "swapped_header_invalid",
                            "kz: a swapped header value is not a valid header".into(),
                        );
                    }
                }
            }
        }
    }
    if violation && ctx.session.refuse_out_of_scope {
        return refused(&rec, &host);
    }

    hop::strip(&mut parts.headers, upgrade);
    if upgrade && !snap.is_empty() {
        // No permessage-deflate: compressed frames could hide a real value from the scrubber.
        parts.headers.remove("sec-websocket-extensions");
    }
    // Whenever a secret may go to this host, ask for an identity-encoded response so every
    // byte coming back can be scrubbed.
    if guarded {
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }

    // Request body.
    let up_body = if incoming.is_end_stream() {
        body::empty()
    } else if snap.is_empty() {
        CountBody::new(incoming, rec.clone(), Direction::Up).boxed()
    } else {
        let cl = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match cl {
            Some(n) if n <= sh.limits.max_buffered_body as u64 => {
                let data = match incoming.collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        return bad_request(
                            &rec,
                            "request_body_read_failed",
                            format!("kz: reading the request body failed: {e}"),
                        );
                    }
                };
                let mut seen = |id: usize, replaced: bool| {
                    violation |= !replaced;
                    rec.token(snap.name(id), replaced);
                };
                let out = plan
                    .patterns()
                    .rewrite_all(&data, plan.as_ref(), &mut seen)
                    .map_or(data, Bytes::from);
                if violation && ctx.session.refuse_out_of_scope {
                    return refused(&rec, &host);
                }
                rec.bytes_up.fetch_add(out.len() as u64, Ordering::Relaxed);
                Metrics::add(&sh.metrics.bytes_upstream_total, out.len() as u64);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
                body::full(out)
            }
            _ => {
                // Only a swap changes a body's length, and none can happen toward a host no
                // token may go to: there the length stays exact (object stores refuse chunked
                // uploads). Elsewhere it is known only at the end: chunked / h2 DATA frames.
                if guarded {
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                let rw = StreamRewriter::new(plan.patterns().clone(), plan.clone());
                RewriteBody::new(
                    incoming,
                    rw,
                    snap.clone(),
                    rec.clone(),
                    Direction::Up,
                    ctx.session.refuse_out_of_scope,
                )
                .boxed()
            }
        }
    };

    // Request line for the upstream's protocol, built from parsed parts (the URL is parsed
    // again only when a token was swapped into it). Absolute form here; the upstream side turns
    // it into what its protocol needs.
    let authority = match parts.uri.authority().cloned() {
        Some(a) => Some(a),
        None => match parts.headers.get(header::HOST) {
            Some(h) => Authority::try_from(h.as_bytes()).ok(),
            None if (tls && port == 443) || (!tls && port == 80) => {
                Authority::try_from(host.as_str()).ok()
            }
            None => Authority::try_from(format!("{host}:{port}")).ok(),
        },
    };
    if authority.is_none() {
        return bad_request(
            &rec,
            "host_invalid",
            "kz: the request's Host is not a valid host[:port]".into(),
        );
    }
    let path_and_query = match swapped_pq {
        None => Some(pq),
        Some(s) => PathAndQuery::try_from(s).ok(),
    };
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    uri_parts.authority = authority;
    uri_parts.path_and_query = path_and_query;
    let uri = match Uri::from_parts(uri_parts) {
        Ok(u) if u.authority().is_some() && u.path_and_query().is_some() => u,
        _ => {
            return bad_request(
                &rec,
                "swapped_url_invalid",
                "kz: the request URL is not valid after swapping".into(),
            );
        }
    };
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.uri = uri;
    let method = parts.method.clone();
    let resp = match up.send(&sh, Request::from_parts(parts, up_body)).await {
        Ok(r) => r,
        Err(e) => {
            let refused_body = rec.with(|f| f.refused);
            if refused_body {
                return refused(&rec, &host);
            }
            Metrics::inc(&sh.metrics.upstream_errors_total);
            let status = match e {
                UpstreamError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            rec.with(|f| {
                f.status = status.as_u16();
                f.error = Some(e.kind().into());
            });
            return text(status, format!("kz: {e}"));
        }
    };
    respond(ctx, rec, snap, guarded, method, resp, client_upgrade).await
}

/// A 400 for a request kz could not forward, noted in its audit record as `error`.
fn bad_request(rec: &Record, error: &str, msg: String) -> Response<ProxyBody> {
    rec.with(|f| {
        f.status = 400;
        f.error = Some(error.to_owned());
    });
    text(StatusCode::BAD_REQUEST, msg)
}

fn refused(rec: &Arc<Record>, host: &str) -> Response<ProxyBody> {
    rec.with(|f| {
        f.status = 403;
        f.refused = true;
        f.error = Some("token_out_of_scope".into());
    });
    text(
        StatusCode::FORBIDDEN,
        format!(
            "kz: this request carries a masked token that is not allowed to go to {host}; it was not sent"
        ),
    )
}

async fn respond(
    ctx: Arc<ConnCtx>,
    rec: Arc<Record>,
    snap: Arc<Snapshot>,
    guarded: bool,
    method: Method,
    mut resp: Response<UpstreamBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    let sh = ctx.sh.clone();
    let status = resp.status();
    rec.with(|f| f.status = status.as_u16());
    let scrub = Scrubber::for_snapshot(snap.clone());
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let server = hyper::upgrade::on(&mut resp);
        let rec2 = rec.clone();
        let snap2 = snap.clone();
        let rw = scrub.stream();
        let is_ws = resp
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        tokio::spawn(async move {
            let (Ok(c), Ok(s)) = (client.await, server.await) else {
                return;
            };
            let (mut cr, cw) = tokio::io::split(TokioIo::new(c));
            let (sr, mut sw) = tokio::io::split(TokioIo::new(s));
            // Up: the handshake was swapped; client frames are masked by the client and pass.
            let up = async {
                let n = tokio::io::copy(&mut cr, &mut sw).await.unwrap_or(0);
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
                n
            };
            // Down: WebSocket data frames are scrubbed; other upgraded protocols are refused
            // for hosts holding secrets (their bytes cannot be scrubbed).
            let down = async {
                if !is_ws && !snap2.is_empty() {
                    return 0;
                }
                let mut seen = |id: usize, _| rec2.scrubbed(snap2.scrubbed_name(id));
                match super::ws::relay_down(sr, cw, rw, &mut seen).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::info!(error = %e, "WebSocket relay closed");
                        0
                    }
                }
            };
            let (a, b) = tokio::join!(up, down);
            rec2.bytes_up.fetch_add(a, Ordering::Relaxed);
            rec2.bytes_down.fetch_add(b, Ordering::Relaxed);
        });
    }
    let (mut parts, incoming) = resp.into_parts();
    // Header values: real → masked.
    if !snap.is_empty() {
        for (_, value) in parts.headers.iter_mut() {
            let mut seen = |name: &str| rec.scrubbed(name);
            if let Some(v) = scrub.rewrite_value(value.as_bytes(), &mut seen)
                && let Ok(hv) = HeaderValue::from_bytes(&v)
            {
                *value = hv;
            }
        }
    }
    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS;
    hop::strip(&mut parts.headers, upgraded);
    if upgraded {
        return Response::from_parts(parts, body::empty());
    }
    let no_body = method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    if no_body {
        return Response::from_parts(parts, body::empty());
    }
    if snap.is_empty() {
        return Response::from_parts(
            parts,
            CountBody::new(incoming, rec, Direction::Down).boxed(),
        );
    }
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    if encoded && guarded {
        // We asked for identity; a compressed body could hide a real value from the scrubber.
        Metrics::inc(&sh.metrics.upstream_errors_total);
        rec.with(|f| {
            f.status = 502;
            f.error = Some("upstream_compressed_response".into());
        });
        return text(
            StatusCode::BAD_GATEWAY,
            "kz: the upstream sent a compressed response although kz asked for identity encoding; kz cannot scrub it, so it was not forwarded".into(),
        );
    }
    let cl = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match cl {
        Some(n) if n <= sh.limits.max_buffered_body as u64 => {
            let data = match incoming.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    Metrics::inc(&sh.metrics.upstream_errors_total);
                    rec.with(|f| {
                        f.status = 502;
                        f.error = Some("upstream_body_failed".into());
                    });
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("kz: reading the upstream response failed: {e}"),
                    );
                }
            };
            let mut seen = |name: &str| rec.scrubbed(name);
            let out = scrub
                .rewrite_value(&data, &mut seen)
                .map_or(data, Bytes::from);
            rec.bytes_down
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            Metrics::add(&sh.metrics.bytes_downstream_total, out.len() as u64);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            Response::from_parts(parts, body::full(out))
        }
        _ => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let rw = scrub.stream();
            let b = RewriteBody::new(incoming, rw, snap, rec, Direction::Down, false);
            Response::from_parts(parts, b.boxed())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics endpoint

pub async fn metrics_loop(sh: Arc<Shared>, l: TcpListener) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let sh = sh.clone();
                async move {
                    let r = if req.uri().path() == "/metrics" {
                        let mut r = Response::new(body::full(sh.render_metrics()));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    } else {
                        text(StatusCode::NOT_FOUND, "try /metrics".into())
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"POST"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b"hello"));
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.b:8443", 443), ("a.b".into(), 8443));
        assert_eq!(split_authority("A.b", 443), ("a.b".into(), 443));
        assert_eq!(split_authority("[::1]:80", 443), ("::1".into(), 80));
        assert_eq!(split_authority("::1", 443), ("::1".into(), 443));
    }
}
