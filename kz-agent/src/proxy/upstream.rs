//! Upstream connections: dial the address kz chose itself, verify TLS against the verified host
//! name, and speak h1 or h2 as negotiated.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::Shared;
use super::body::ProxyBody;
use super::tls::ALPN_H2;

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
        }
    }
}

/// Where and how to reach one upstream.
#[derive(Debug, Clone)]
pub struct Target {
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
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Self::H2(_))
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }
}

/// Resolves `host:port` with the configured override first, then the system resolver.
pub async fn resolve(sh: &Shared, host: &str, port: u16) -> Result<SocketAddr, UpstreamError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Some(f) = &sh.resolve
        && let Some(a) = f(host, port)
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

/// All addresses `host` resolves to (override first), for checking a plain-HTTP Host header.
pub async fn resolve_all(sh: &Shared, host: &str, port: u16) -> Vec<SocketAddr> {
    if let Some(f) = &sh.resolve
        && let Some(a) = f(host, port)
    {
        return vec![a];
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(it) => it.collect(),
        Err(_) => Vec::new(),
    }
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

/// Connects (TCP, TLS when `target.tls`, HTTP handshake) and returns a sender.
pub async fn connect(sh: &Shared, target: &Target, offer: Offer) -> Result<Sender, UpstreamError> {
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
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Http(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok(Sender::H1(send))
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

enum SendError {
    Upstream(UpstreamError),
    Hyper(hyper::Error),
}

impl SendError {
    /// The server closed an idle keep-alive connection just as we used it.
    fn is_stale_connection(&self) -> bool {
        match self {
            Self::Hyper(e) => e.is_canceled() || e.is_incomplete_message() || e.is_closed(),
            Self::Upstream(_) => false,
        }
    }
}

impl From<SendError> for UpstreamError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Upstream(u) => u,
            SendError::Hyper(h) => UpstreamError::Http(h.to_string()),
        }
    }
}

/// The upstream of one client connection: connected lazily, redialled when the server closed it.
pub struct Upstream {
    pub target: Target,
    offer: Offer,
    sender: tokio::sync::Mutex<Option<Sender>>,
}

impl Upstream {
    pub fn new(target: Target, offer: Offer, first: Option<Sender>) -> Arc<Self> {
        Arc::new(Self {
            target,
            offer,
            sender: tokio::sync::Mutex::new(first),
        })
    }

    /// Sends `req`. A bodiless request that fails because a reused keep-alive connection was
    /// closed by the server in the meantime is replayed once on a fresh connection.
    pub async fn send(
        &self,
        sh: &Shared,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let replay = http_body::Body::is_end_stream(req.body()).then(|| {
            let mut b = Request::builder()
                .method(req.method().clone())
                .uri(req.uri().clone())
                .version(req.version());
            if let Some(h) = b.headers_mut() {
                *h = req.headers().clone();
            }
            b
        });
        match self.send_once(sh, req).await {
            Err((e, true)) if e.is_stale_connection() => {
                match replay.and_then(|b| b.body(super::body::empty()).ok()) {
                    Some(again) => self.send_once(sh, again).await.map_err(|(e, _)| e.into()),
                    None => Err(e.into()),
                }
            }
            r => r.map_err(|(e, _)| e.into()),
        }
    }

    /// Returns the error and whether the connection had been used before.
    async fn send_once(
        &self,
        sh: &Shared,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, (SendError, bool)> {
        let mut guard = self.sender.lock().await;
        if guard.as_ref().is_some_and(Sender::is_closed) {
            *guard = None;
        }
        let reused = guard.is_some();
        if guard.is_none() {
            *guard = Some(
                connect(sh, &self.target, self.offer)
                    .await
                    .map_err(|e| (SendError::Upstream(e), false))?,
            );
        }
        let hyper_err = |e: hyper::Error| (SendError::Hyper(e), reused);
        match guard.as_mut() {
            Some(Sender::H2(s)) => {
                let mut s = s.clone();
                drop(guard);
                s.ready().await.map_err(hyper_err)?;
                s.send_request(req).await.map_err(hyper_err)
            }
            Some(Sender::H1(s)) => {
                s.ready().await.map_err(hyper_err)?;
                let fut = s.send_request(req);
                // Requests on one h1 client connection are sequential anyway; holding the lock
                // until the response head keeps them in order.
                let r = fut.await.map_err(hyper_err);
                drop(guard);
                r
            }
            None => Err((
                SendError::Upstream(UpstreamError::Http("no upstream connection".into())),
                false,
            )),
        }
    }

    /// Whether the (current) upstream connection speaks h2.
    pub async fn is_h2(&self) -> bool {
        self.sender.lock().await.as_ref().is_some_and(Sender::is_h2)
    }
}
