//! Connection routing: what an intercepted stream is (TLS, plain HTTP, anything else) and
//! where it goes: TLS is terminated with a leaf for the verified name after the upstream's
//! protocol is learnt, plain HTTP is served, other TCP is spliced where a rule allows it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::Shared;
use super::io::{BoxIo, Prefixed, looks_like_http, sniff};
use super::listeners::{Kind, Stop, refuse};
use super::metrics::Metrics;
use super::rules::{Verdict, normalize};
use super::serving::{ConnCtx, Route, serve_http};
use super::session::Session;
use super::upstream::{self, Offer, Target, Upstream, UpstreamError};
use crate::audit::AuditEvent;
use crate::tls::{ALPN_H1, ALPN_H2};

/// Serves one intercepted stream. `fixed_host` is the host already verified (CONNECT target);
/// `None` in transparent mode, where it comes from SNI / Host.
#[allow(clippy::too_many_arguments)]
pub(super) async fn intercept(
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
    if let Err(e) = upstream::check_dial(sh, session.id, dst) {
        tracing::info!(%peer, error = %e, "splice refused");
        refuse(sh, &*session.audit, peer, Some(dst), "address_refused");
        return;
    }
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
