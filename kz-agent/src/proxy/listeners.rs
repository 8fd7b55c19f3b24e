//! Listeners: accepting (spread over the worker threads), the connection limit, drain and kill,
//! finding each connection's session, and the metrics endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::Shared;
use super::body;
use super::exchange::text;
use super::metrics::Metrics;
use super::routing::intercept;
use super::serving::{ConnCtx, Route, serve_http};
use super::session::Redirected;
use crate::audit::{AuditEvent, AuditSink};

/// Drain / kill signal shared by all connections, plus the connection limit.
#[derive(Clone)]
pub struct Stop {
    tx: Arc<watch::Sender<u8>>,
    slots: Arc<Semaphore>,
}

const RUN: u8 = 0;
pub(super) const DRAIN: u8 = 1;
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

    pub(super) async fn reached(&self, level: u8) {
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
    pub(super) fn name(self) -> &'static str {
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

pub(super) fn refuse(
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
