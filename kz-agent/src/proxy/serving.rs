//! HTTP serving on a client connection: h1 or h2, idle and drain handling, and per request the
//! route the connection was set up with (explicit proxy, decrypted TLS, plain HTTP) down to
//! [`super::exchange::forward`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::header;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Shared;
use super::body::{self, ProxyBody};
use super::exchange::{Rejection, forward, text};
use super::io::{BoxIo, IdleIo, now_ms};
use super::listeners::{DRAIN, Kind, Stop, refuse};
use super::metrics::Metrics;
use super::record::{Fields, Record, path_without_query_values};
use super::routing::intercept;
use super::rules::{Verdict, normalize};
use super::session::Session;
use super::tokens::{Snapshot, SwapPlan};
use super::upstream::{self, Offer, Target, Upstream, UpstreamError};

pub(super) enum Route {
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

pub(super) struct ConnCtx {
    pub(super) sh: Arc<Shared>,
    pub(super) session: Arc<Session>,
    pub(super) stop: Stop,
    pub(super) peer: SocketAddr,
    pub(super) kind: Kind,
    pub(super) route: Route,
    pub(super) inflight: Arc<AtomicUsize>,
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
    plaintext: bool,
    version: u64,
    plan: Arc<SwapPlan>,
    guarded: bool,
}

impl ConnCtx {
    pub(super) fn new(
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

    /// The current snapshot, the swap plan for `host` (`plaintext`: over cleartext HTTP), and
    /// whether any token may go to `host`.
    pub(super) fn plan_for(
        &self,
        host: &str,
        plaintext: bool,
    ) -> (Arc<Snapshot>, Arc<SwapPlan>, bool) {
        let snap = self.session.tokens.snapshot();
        let mut g = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_ref()
            && c.host == host
            && c.plaintext == plaintext
            && c.version == snap.version()
        {
            return (snap, c.plan.clone(), c.guarded);
        }
        let plan = Arc::new(SwapPlan::new(snap.clone(), host, plaintext));
        let guarded = snap.any_in_scope(host);
        *g = Some(CachedPlan {
            host: host.to_owned(),
            plaintext,
            version: snap.version(),
            plan: plan.clone(),
            guarded,
        });
        (snap, plan, guarded)
    }
}

/// Serves HTTP on a client stream: h2 when ALPN chose it, else h1 (with upgrades). Only the
/// chosen protocol's connection state is allocated (boxed), which keeps idle connections small.
pub(super) async fn serve_http(ctx: Arc<ConnCtx>, io: BoxIo, h2: bool) {
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
            .max_local_error_reset_streams(1024)
            // What a client may make kz hold per connection before kz reads it (hyper: 1 MiB
            // per stream and per connection), and unsent response data per stream (hyper:
            // 400 KiB). The client is on this machine: small windows cost no throughput.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(512 * 1024)
            .max_send_buf_size(128 * 1024);
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

pub(super) fn split_authority(auth: &str, default_port: u16) -> (String, u16) {
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
            // An address the guard refuses is refused as such before any Host claim is
            // weighed (a claim could not make it dialable, and the answer should say why).
            if let Err(e) = upstream::check_dial(&ctx.sh, ctx.session.id, *dst) {
                let ip = dst.ip().to_string();
                return Ok(upstream_failed(&ctx, req, &ip, dst.port(), &e));
            }
            let host = match fixed_host {
                Some(h) => h.clone(),
                None => match verify_plain_host(&ctx, &req, *dst).await {
                    Ok(h) => h,
                    Err(denied_name) => return Ok(denied(&ctx, req, &denied_name, dst.port())),
                },
            };
            if ctx.session.rules.check(&host, dst.port()) == Verdict::Deny {
                return Ok(denied(&ctx, req, &host, dst.port()));
            }
            Ok(forward(ctx.clone(), req, host, dst.port(), upstream.clone(), false).await)
        }
    }
}

/// Plain HTTP has no certificate: the Host header counts only if it resolves to the address the
/// client actually connected to. Otherwise the host is the bare IP (and the request, which names
/// another host than the one checked, is answered 421 by the exchange). Checked once per
/// connection and claim. A claimed name the connection rules deny is refused (`Err(name)`)
/// before any lookup: asking the upstream resolver about it would carry the name, and whatever
/// the agent encoded in it, off the machine.
async fn verify_plain_host(
    ctx: &ConnCtx,
    req: &Request<Incoming>,
    dst: SocketAddr,
) -> Result<String, String> {
    let claimed = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let Some(claimed) = claimed else {
        return Ok(dst.ip().to_string());
    };
    let cache = || ctx.plain_host.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((c, verified)) = cache().as_ref()
        && c == claimed
    {
        return Ok(verified.clone());
    }
    let (name, _) = split_authority(claimed, dst.port());
    if name.parse::<std::net::IpAddr>().is_err()
        && ctx.session.rules.check(&name, dst.port()) == Verdict::Deny
    {
        return Err(name);
    }
    let holds = match name.parse::<std::net::IpAddr>() {
        Ok(addr) => addr == dst.ip(),
        Err(_) => upstream::resolve_all(&ctx.session, &name, dst.port())
            .await
            .iter()
            .any(|a| a.ip() == dst.ip()),
    };
    let verified = if holds { name } else { dst.ip().to_string() };
    *cache() = Some((claimed.to_owned(), verified.clone()));
    Ok(verified)
}

pub(super) fn fields(ctx: &ConnCtx, req: &Request<Incoming>, host: &str, port: u16) -> Fields {
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
    let rec = Record::new(
        ctx.sh.clone(),
        ctx.session.audit.clone(),
        fields(ctx, &req, host, port),
        None,
    );
    Rejection::Denied {
        host: host.to_owned(),
    }
    .respond(&rec)
}

fn upstream_failed(
    ctx: &ConnCtx,
    req: Request<Incoming>,
    host: &str,
    port: u16,
    e: &UpstreamError,
) -> Response<ProxyBody> {
    let rec = Record::new(
        ctx.sh.clone(),
        ctx.session.audit.clone(),
        fields(ctx, &req, host, port),
        None,
    );
    Rejection::Upstream(e.clone()).respond(&rec)
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
    // Refused at the CONNECT already (the dial would be refused anyway): loopback, metadata…
    if let Err(e) = upstream::check_dial(&ctx.sh, ctx.session.id, dst) {
        return upstream_failed(ctx, req, &host, port, &e);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.b:8443", 443), ("a.b".into(), 8443));
        assert_eq!(split_authority("A.b", 443), ("a.b".into(), 443));
        assert_eq!(split_authority("[::1]:80", 443), ("::1".into(), 80));
        assert_eq!(split_authority("::1", 443), ("::1".into(), 443));
    }
}
