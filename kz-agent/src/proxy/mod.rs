//! The swapping proxy: the data plane between the agent and the hosts it may reach.
//!
//! Two kinds of listeners share one engine:
//! - transparent: connections redirected by the interception core. The original destination
//!   comes from an injected lookup ([`OrigDstLookup`], keyed by the client's address); the proxy
//!   peeks the first bytes (TLS ClientHello → SNI, plain HTTP → Host), checks the connection
//!   rules, and dials the original destination itself, verifying its TLS certificate against
//!   the name it checked: a forged SNI cannot carry a token to another server.
//! - explicit: `CONNECT host:port` (then the same interception path) and absolute-URI forwarding
//!   for plain HTTP (the fallback when eBPF is unavailable).
//!
//! Masked tokens are swapped for real values only when the verified host is in the token's
//! scope ([`TokenTable`]); real values are scrubbed back to masked tokens in every response.
//! Every request produces one `proxy_request` audit record.
//!
//! Entry point: [`start`] with a [`Config`]; the returned [`ProxyHandle`] has the bound
//! addresses, metrics and graceful shutdown.

pub mod body;
pub mod metrics;
pub mod record;
pub mod rewrite;
pub mod rules;
pub mod server;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use rules::{ConnectionRule, ConnectionRules, HostPattern, RuleError, Verdict};
pub use tls::{CertAuthority, TlsError};
pub use tokens::{Scrubber, TokenError, TokenTable};

use crate::audit::AuditSink;
use metrics::Metrics;

/// Original destination of a redirected connection, looked up by the client's address (the
/// accepted socket's peer). Supplied by the interception core; the proxy never depends on it.
pub type OrigDstLookup = Arc<dyn Fn(SocketAddr) -> Option<SocketAddr> + Send + Sync>;

/// Name resolution consulted before the system resolver (e.g. kz's own DNS answers, or a test's
/// fixed map): `(host, port) → address`.
pub type HostLookup = Arc<dyn Fn(&str, u16) -> Option<SocketAddr> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}; pick a free address or stop what holds it")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream TLS setup failed: {0}")]
    Tls(#[from] TlsError),
    #[error(
        "the proxy has no listener; configure at least one transparent or explicit listen address"
    )]
    NoListener,
}

/// Limits that keep bad or slow clients from holding resources.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Maximum size of a request head (h1 read buffer; h2 header list). At least 8 KiB.
    pub max_header_bytes: usize,
    /// Maximum number of request headers (h1).
    pub max_headers: usize,
    /// Time allowed for the first bytes and the client TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to receive a complete request head (h1, slowloris).
    pub header_read_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Client connections served at once; more are closed at accept.
    pub max_connections: usize,
    pub upstream_connect_timeout: Duration,
    /// Time given to in-flight requests on shutdown.
    pub drain_timeout: Duration,
    /// Bodies with a Content-Length up to this size are rewritten in one piece so the new
    /// Content-Length is exact; larger or chunked bodies stream (Content-Length is then dropped
    /// and the body is sent chunked / as h2 DATA frames).
    pub max_buffered_body: usize,
    /// Bounded leaf-certificate cache size.
    pub leaf_cache: usize,
    /// Idle upstream connections kept per (address, verified host).
    pub upstream_max_idle_per_host: usize,
    /// Idle upstream connections older than this are closed.
    pub upstream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 4096,
            upstream_connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            max_buffered_body: 1024 * 1024,
            leaf_cache: 1024,
            upstream_max_idle_per_host: 32,
            upstream_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything `start` needs. `kz run --blind` builds one of these.
pub struct Config {
    /// Listeners for redirected (transparent) connections.
    pub transparent_listen: Vec<SocketAddr>,
    /// Listeners for explicit proxy clients (HTTP_PROXY / HTTPS_PROXY).
    pub explicit_listen: Vec<SocketAddr>,
    /// Optional `GET /metrics` listener (Prometheus text).
    pub metrics_listen: Option<SocketAddr>,
    pub ca: Arc<CertAuthority>,
    pub tokens: TokenTable,
    pub rules: ConnectionRules,
    /// Extra PEM CA trusted for upstreams, in addition to the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Refuse (403) a request carrying a token outside its scope instead of forwarding it masked.
    pub refuse_out_of_scope: bool,
    pub limits: Limits,
    pub audit: Arc<dyn AuditSink>,
    /// Original-destination lookup for transparent listeners.
    pub orig_dst: Option<OrigDstLookup>,
    /// Resolver override consulted before system DNS.
    pub resolve: Option<HostLookup>,
}

impl Config {
    /// A config with defaults: no listeners yet, empty rules (allow all), default limits.
    pub fn new(ca: Arc<CertAuthority>, tokens: TokenTable, audit: Arc<dyn AuditSink>) -> Self {
        Self {
            transparent_listen: Vec::new(),
            explicit_listen: Vec::new(),
            metrics_listen: None,
            ca,
            tokens,
            rules: ConnectionRules::default(),
            upstream_ca: None,
            refuse_out_of_scope: false,
            limits: Limits::default(),
            audit,
            orig_dst: None,
            resolve: None,
        }
    }
}

/// State shared by every connection.
pub struct Shared {
    pub ca: Arc<CertAuthority>,
    pub tokens: TokenTable,
    pub rules: ConnectionRules,
    pub refuse_out_of_scope: bool,
    pub limits: Limits,
    pub audit: Arc<dyn AuditSink>,
    pub orig_dst: Option<OrigDstLookup>,
    pub resolve: Option<HostLookup>,
    pub upstream_tls: tls::Upstream,
    /// Idle upstream connections shared across client connections.
    pub pool: Arc<upstream::Pool>,
    pub metrics: Metrics,
    /// Our own listen addresses: a redirect that points back at us is refused, not looped.
    pub own_addrs: Vec<SocketAddr>,
}

/// A running proxy.
pub struct ProxyHandle {
    pub transparent_addrs: Vec<SocketAddr>,
    pub explicit_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: server::Stop,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ProxyHandle {
    /// The kz CA certificate (PEM) for the agent's trust bundle.
    pub fn ca_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    /// Prometheus text exposition of the proxy's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared
            .metrics
            .render(self.shared.ca.cached(), self.shared.pool.idle())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Stops accepting, lets in-flight requests finish (up to `limits.drain_timeout`), then
    /// closes what is left.
    pub async fn shutdown(self) {
        self.stop.drain();
        for t in &self.tasks {
            t.abort();
        }
        let deadline = tokio::time::Instant::now() + self.shared.limits.drain_timeout;
        while Metrics::get(&self.shared.metrics.connections_active) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.kill();
        // Give killed connections a moment to observe the signal and drop their sockets.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while Metrics::get(&self.shared.metrics.connections_active) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Binds the listeners and starts serving. Must be called inside a tokio runtime.
pub async fn start(cfg: Config) -> Result<ProxyHandle, ProxyError> {
    if cfg.transparent_listen.is_empty() && cfg.explicit_listen.is_empty() {
        return Err(ProxyError::NoListener);
    }
    let upstream_tls = tls::Upstream::new(cfg.upstream_ca.as_ref())?;
    let bind = |addr: SocketAddr| {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|source| ProxyError::Bind { addr, source })?;
        l.set_nonblocking(true)
            .map_err(|source| ProxyError::Bind { addr, source })?;
        tokio::net::TcpListener::from_std(l).map_err(|source| ProxyError::Bind { addr, source })
    };
    let mut transparent = Vec::new();
    for a in &cfg.transparent_listen {
        transparent.push(bind(*a)?);
    }
    let mut explicit = Vec::new();
    for a in &cfg.explicit_listen {
        explicit.push(bind(*a)?);
    }
    let metrics_l = cfg.metrics_listen.map(bind).transpose()?;
    let addr_of = |l: &tokio::net::TcpListener| l.local_addr().ok();
    let transparent_addrs: Vec<_> = transparent.iter().filter_map(addr_of).collect();
    let explicit_addrs: Vec<_> = explicit.iter().filter_map(addr_of).collect();
    let metrics_addr = metrics_l.as_ref().and_then(addr_of);
    let pool = Arc::new(upstream::Pool::new(
        cfg.limits.upstream_max_idle_per_host,
        cfg.limits.upstream_idle_timeout,
    ));
    let shared = Arc::new(Shared {
        ca: cfg.ca,
        tokens: cfg.tokens,
        rules: cfg.rules,
        refuse_out_of_scope: cfg.refuse_out_of_scope,
        limits: cfg.limits,
        audit: cfg.audit,
        orig_dst: cfg.orig_dst,
        resolve: cfg.resolve,
        pool,
        upstream_tls,
        metrics: Metrics::default(),
        own_addrs: transparent_addrs
            .iter()
            .chain(explicit_addrs.iter())
            .copied()
            .collect(),
    });
    let stop = server::Stop::new(shared.limits.max_connections);
    let mut tasks = Vec::new();
    for l in transparent {
        tasks.push(tokio::spawn(server::accept_loop(
            shared.clone(),
            stop.clone(),
            l,
            server::Kind::Transparent,
        )));
    }
    for l in explicit {
        tasks.push(tokio::spawn(server::accept_loop(
            shared.clone(),
            stop.clone(),
            l,
            server::Kind::Explicit,
        )));
    }
    if let Some(l) = metrics_l {
        tasks.push(tokio::spawn(server::metrics_loop(shared.clone(), l)));
    }
    let pool = shared.pool.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            pool.sweep();
        }
    }));
    tracing::info!(?transparent_addrs, ?explicit_addrs, "proxy listening");
    Ok(ProxyHandle {
        transparent_addrs,
        explicit_addrs,
        metrics_addr,
        shared,
        stop,
        tasks,
    })
}
