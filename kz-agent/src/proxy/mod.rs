//! The swapping proxy: the data plane between the agent and the hosts it may reach.
//!
//! One proxy serves every sandbox of a node: each is a [`Session`] (tokens, rules, CA, DNS
//! answers, audit sink), found per connection by the id the kernel's record carries
//! ([`session`]). Two kinds of listeners share one engine:
//! - transparent: connections redirected by the interception core. The original destination
//!   and the session come from an injected lookup ([`OrigDstLookup`], keyed by the client's
//!   address); the proxy
//!   peeks the first bytes (TLS ClientHello → SNI, plain HTTP → Host), checks the connection
//!   rules, and dials the original destination itself, verifying its TLS certificate against
//!   the name it checked: a forged SNI cannot carry a token to another server.
//! - explicit: `CONNECT host:port` (then the same interception path) and absolute-URI forwarding
//!   for plain HTTP (the fallback when eBPF is unavailable).
//!
//! Masked tokens are swapped for real values only when the verified host is in the token's
//! scope in the connection's session ([`TokenTable`]); real values are scrubbed back to masked
//! tokens in every response. Every request produces one `proxy_request` audit record, in its
//! session's sink.
//!
//! Entry point: [`start`] with a [`Config`]; the returned [`ProxyHandle`] has the bound
//! addresses, metrics, [`ProxyHandle::admit`] / [`ProxyHandle::close`] for sessions, and
//! graceful shutdown.

pub mod body;
mod exchange;
mod io;
mod listeners;
pub mod metrics;
pub mod record;
mod routing;
pub mod rules;
mod serving;
pub mod session;
pub mod tls;
pub mod tokens;
pub mod upstream;
pub mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub use rules::{ConnectionRule, ConnectionRules, HostPattern, RuleError, Verdict};
pub use session::{Redirected, Session, SessionError, SessionId, Sessions};
pub use tls::{CertAuthority, TlsError};
pub use tokens::{Scrubber, TokenError, TokenSpec, TokenTable, Unswapped};

use crate::audit::AuditSink;
use metrics::Metrics;

/// For the fuzz targets (fuzz/fuzz_targets/http_head.rs) only: the request-head checks the
/// proxy runs on every request, reachable without a connection.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::exchange::{misdirected, target_uri};

    /// `host[:port]`, `[v6]:port` → (normalised host, port), as the proxy splits an authority.
    pub fn split_authority(auth: &str, default_port: u16) -> (String, u16) {
        super::serving::split_authority(auth, default_port)
    }
}

/// Original destination and session of a redirected connection, looked up by the client's
/// address (the accepted socket's peer). Supplied by the interception core; the proxy never
/// depends on it.
pub type OrigDstLookup = Arc<dyn Fn(SocketAddr) -> Option<Redirected> + Send + Sync>;

/// Name resolution consulted before the system resolver (e.g. kz's own DNS answers, or a test's
/// fixed map): `(host, port) → address`, `None` to fall through. A future because a lookup may
/// wait on a DNS server: it runs on a proxy worker, where blocking would stall every connection
/// that worker serves. One that knows the answer returns `ready`.
pub type HostLookup =
    Arc<dyn Fn(&str, u16) -> BoxFuture<'static, Option<SocketAddr>> + Send + Sync>;

/// A [`HostLookup`] that answers at once from `f` (a fixed map of names).
pub fn known_hosts(
    f: impl Fn(&str, u16) -> Option<SocketAddr> + Send + Sync + 'static,
) -> HostLookup {
    Arc::new(move |host, port| Box::pin(std::future::ready(f(host, port))))
}

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
    #[error("cannot start the proxy's worker threads: {0}; check the process and thread limits")]
    Workers(std::io::Error),
    #[error(
        "explicit-proxy listeners need the id of the session they serve; set `explicit_session`"
    )]
    NoExplicitSession,
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Limits that keep bad or slow clients from holding resources.
///
/// What bounds a client connection's memory (issue 14, 4,096 hostile connections): the head by
/// `max_header_bytes` / `max_headers` / `header_read_timeout`; its body by `body_read_timeout`
/// and `body_min_rate`; a body read whole by `max_buffered_body` and, over all sessions,
/// `max_buffered_total`; a streamed body by a window (hyper's h1 read buffer, at most
/// `max_header_bytes`; h2 flow-control windows set in `serving`: 256 KiB per stream, 512 KiB
/// per connection, instead of hyper's 1 MiB each, and 128 KiB of unsent response data per
/// stream instead of 400 KiB; at most 256 streams). Connections by `max_connections`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Maximum size of a request head (h1 read buffer; h2 header list; hyper's defaults are
    /// ~400 KiB and 16 KiB). At least 8 KiB.
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
    /// Content-Length is exact; larger or chunked bodies stream. Toward a host some token may
    /// be swapped to, a larger body's Content-Length is then dropped (it is sent chunked / as
    /// h2 DATA frames); elsewhere nothing can change its length and it is kept.
    pub max_buffered_body: usize,
    /// Bytes held at once in bodies read whole (requests and responses, all sessions of the
    /// node). A request body that would take more is answered 503 with `Retry-After` and
    /// audited `buffered_bodies_full`; a response body that would is streamed instead. The bytes
    /// are taken as the body arrives, so a client that declares 1 MiB and trickles holds only
    /// what it sent. Why not stream the request instead: it would need an upstream connection
    /// per such request (doubling what each hostile connection costs, and holding a request
    /// with a swapped credential open at the upstream), and would change the request's framing
    /// (Content-Length dropped) depending on the load of the node.
    pub max_buffered_total: usize,
    /// Longest wait for the next piece of a request body (every plan), and the window of
    /// `body_min_rate`. On expiry: 408 (h1; an h2 stream the same) and audit `body_timeout`.
    /// Only time spent waiting for the client counts, not time the upstream takes to accept
    /// what was sent. 30 s: far above any pause of a client that has its body at hand (an
    /// agent's HTTP library writes it at once), short enough that a slow-body client ties a
    /// connection for at most a minute.
    pub body_read_timeout: Duration,
    /// Bytes per second a request body with a declared Content-Length must average over each
    /// `body_read_timeout` of waiting (0: only the gap rule). 1 KiB/s is a modem's speed; a
    /// client trickling a few bytes per second to hold a connection is cut after one window.
    /// Bodies of unknown length are exempt (long-lived streams such as gRPC pause).
    pub body_min_rate: u64,
    /// Bounded leaf-certificate cache size.
    pub leaf_cache: usize,
    /// Idle upstream connections kept per (address, verified host) and worker. It bounds the
    /// pool, not concurrency: with more client connections than this busy on one host, every
    /// returning upstream connection beyond it is closed and the next request dials (a full TLS
    /// handshake), so it must sit well above the concurrency agents use (at 32, 64 busy client
    /// connections cut throughput 18-fold). An idle upstream TLS connection costs ~20 KB.
    pub upstream_max_idle_per_host: usize,
    /// Idle upstream connections older than this are closed.
    pub upstream_idle_timeout: Duration,
    /// Threads serving connections, each with a single-threaded runtime of its own (0: half the
    /// available cores, at least 1 and at most 8: the proxy shares the machine with the agent
    /// it serves, whose requests cost CPU too; on the 2-core bench machine one worker carried
    /// more requests than two). A connection stays on the thread that accepted it, with the
    /// tasks hyper spawns for it: no work stealing, no cross-thread wake-ups per request.
    pub workers: usize,
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
            max_buffered_total: 64 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            body_min_rate: 1024,
            leaf_cache: 1024,
            upstream_max_idle_per_host: 256,
            upstream_idle_timeout: Duration::from_secs(60),
            workers: 0,
        }
    }
}

/// Everything `start` needs. `kz run --blind` builds one of these; sandboxes come and go as
/// [`Session`]s on the running proxy.
pub struct Config {
    /// Listeners for redirected (transparent) connections.
    pub transparent_listen: Vec<SocketAddr>,
    /// Listeners for explicit proxy clients (HTTP_PROXY / HTTPS_PROXY).
    pub explicit_listen: Vec<SocketAddr>,
    /// The session explicit-proxy connections belong to (they carry no kernel record).
    pub explicit_session: Option<SessionId>,
    /// Optional `GET /metrics` listener (Prometheus text).
    pub metrics_listen: Option<SocketAddr>,
    /// Sessions admitted before the listeners open.
    pub sessions: Vec<Session>,
    /// Extra PEM CA trusted for upstreams, in addition to the system roots.
    pub upstream_ca: Option<PathBuf>,
    pub limits: Limits,
    /// The node's sink: connections refused before their session is known.
    pub audit: Arc<dyn AuditSink>,
    /// Original-destination lookup for transparent listeners.
    pub orig_dst: Option<OrigDstLookup>,
}

impl Config {
    /// A config with defaults: no listeners and no sessions yet, default limits.
    pub fn new(audit: Arc<dyn AuditSink>) -> Self {
        Self {
            transparent_listen: Vec::new(),
            explicit_listen: Vec::new(),
            explicit_session: None,
            metrics_listen: None,
            sessions: Vec::new(),
            upstream_ca: None,
            limits: Limits::default(),
            audit,
            orig_dst: None,
        }
    }
}

/// State shared by every connection.
pub struct Shared {
    pub sessions: Sessions,
    pub explicit_session: Option<SessionId>,
    pub limits: Limits,
    /// The node's sink (see [`Config::audit`]).
    pub audit: Arc<dyn AuditSink>,
    pub orig_dst: Option<OrigDstLookup>,
    pub upstream_tls: tls::Upstream,
    /// The bytes bodies read whole may hold (`Limits::max_buffered_total`).
    pub buffers: body::BufferPool,
    /// Idle upstream connections, one pool per worker thread: a connection is reused by the
    /// thread that runs its task, so a request never wakes another thread.
    pools: Vec<Arc<upstream::Pool>>,
    /// The worker threads' runtimes and how many client connections each serves.
    workers: Vec<tokio::runtime::Handle>,
    load: Vec<std::sync::atomic::AtomicUsize>,
    pub metrics: Metrics,
    /// Our own listen addresses: a redirect that points back at us is refused, not looped.
    pub own_addrs: Vec<SocketAddr>,
}

thread_local! {
    /// Index of the worker thread this is (0 elsewhere).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Shared {
    /// The upstream pool of the current worker thread.
    pub fn pool(&self) -> &Arc<upstream::Pool> {
        let i = WORKER.with(std::cell::Cell::get);
        &self.pools[i % self.pools.len()]
    }

    /// Idle upstream connections over all workers.
    pub fn idle_upstream(&self) -> usize {
        self.pools.iter().map(|p| p.idle()).sum()
    }

    /// Prometheus text exposition of the proxy's metrics.
    pub fn render_metrics(&self) -> String {
        self.metrics
            .render(self.sessions.cached_leaves(), self.idle_upstream())
    }
}

/// A running proxy.
pub struct ProxyHandle {
    pub transparent_addrs: Vec<SocketAddr>,
    pub explicit_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: listeners::Stop,
    /// Tasks on the caller's runtime (metrics listener, pool sweeper).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl ProxyHandle {
    /// Starts serving a sandbox: connections the kernel records with `session.id` use it.
    pub fn admit(&self, session: Session) -> Result<Arc<Session>, SessionError> {
        self.shared.sessions.admit(session)
    }

    /// Stops serving a sandbox: its new connections are refused (see [`Sessions::close`]).
    pub fn close(&self, id: SessionId) -> Option<Arc<Session>> {
        self.shared.sessions.close(id)
    }

    pub fn sessions(&self) -> &Sessions {
        &self.shared.sessions
    }

    /// Prometheus text exposition of the proxy's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.render_metrics()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Stops accepting and lets in-flight requests finish (up to `limits.drain_timeout`);
    /// returns how many connections are still open. Serving ends with it: call it only on the
    /// way out ([`ProxyHandle::shutdown`] calls it too).
    pub async fn drain(&self) -> u64 {
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
        Metrics::get(&self.shared.metrics.connections_active)
    }

    /// Stops accepting, lets in-flight requests finish (up to `limits.drain_timeout`), then
    /// closes what is left.
    pub async fn shutdown(self) {
        self.drain().await;
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

impl Drop for ProxyHandle {
    /// Dropping the handle (after `shutdown`, or instead of it) ends every connection and stops
    /// the worker threads; their runtimes are dropped without waiting for blocking lookups.
    fn drop(&mut self) {
        self.stop.kill();
        for t in &self.tasks {
            t.abort();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Binds the listeners and starts serving. Must be called inside a tokio runtime.
pub async fn start(cfg: Config) -> Result<ProxyHandle, ProxyError> {
    if cfg.transparent_listen.is_empty() && cfg.explicit_listen.is_empty() {
        return Err(ProxyError::NoListener);
    }
    let sessions = Sessions::default();
    for s in cfg.sessions {
        sessions.admit(s)?;
    }
    if !cfg.explicit_listen.is_empty() && cfg.explicit_session.is_none() {
        return Err(ProxyError::NoExplicitSession);
    }
    let upstream_tls = tls::Upstream::new(cfg.upstream_ca.as_ref())?;
    let bind = |addr: SocketAddr| {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|source| ProxyError::Bind { addr, source })?;
        l.set_nonblocking(true)
            .map_err(|source| ProxyError::Bind { addr, source })?;
        Ok::<_, ProxyError>(l)
    };
    let mut transparent = Vec::new();
    for a in &cfg.transparent_listen {
        transparent.push(bind(*a)?);
    }
    let mut explicit = Vec::new();
    for a in &cfg.explicit_listen {
        explicit.push(bind(*a)?);
    }
    let metrics_l = cfg
        .metrics_listen
        .map(|addr| {
            tokio::net::TcpListener::from_std(bind(addr)?)
                .map_err(|source| ProxyError::Bind { addr, source })
        })
        .transpose()?;
    let addr_of = |l: &std::net::TcpListener| l.local_addr().ok();
    let transparent_addrs: Vec<_> = transparent.iter().filter_map(addr_of).collect();
    let explicit_addrs: Vec<_> = explicit.iter().filter_map(addr_of).collect();
    let metrics_addr = metrics_l.as_ref().and_then(|l| l.local_addr().ok());
    let n_workers = match cfg.limits.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 8)),
        n => n,
    };
    let mut runtimes = Vec::with_capacity(n_workers);
    for _ in 0..n_workers {
        runtimes.push(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ProxyError::Workers)?,
        );
    }
    let pools = (0..n_workers)
        .map(|_| {
            Arc::new(upstream::Pool::new(
                cfg.limits.upstream_max_idle_per_host,
                cfg.limits.upstream_idle_timeout,
            ))
        })
        .collect();
    let buffers = body::BufferPool::new(cfg.limits.max_buffered_total);
    let shared = Arc::new(Shared {
        sessions,
        explicit_session: cfg.explicit_session,
        limits: cfg.limits,
        audit: cfg.audit,
        orig_dst: cfg.orig_dst,
        pools,
        workers: runtimes.iter().map(|r| r.handle().clone()).collect(),
        load: (0..n_workers).map(|_| Default::default()).collect(),
        upstream_tls,
        buffers,
        metrics: Metrics::default(),
        own_addrs: transparent_addrs
            .iter()
            .chain(explicit_addrs.iter())
            .copied()
            .collect(),
    });
    let stop = listeners::Stop::new(shared.limits.max_connections);
    let listeners: Vec<_> = transparent
        .into_iter()
        .map(|l| (l, listeners::Kind::Transparent))
        .chain(explicit.into_iter().map(|l| (l, listeners::Kind::Explicit)))
        .collect();
    let workers = start_workers(&shared, &stop, runtimes, listeners)?;
    let mut tasks = Vec::new();
    if let Some(l) = metrics_l {
        tasks.push(tokio::spawn(listeners::metrics_loop(shared.clone(), l)));
    }
    let sweep = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            for p in &sweep.pools {
                p.sweep();
            }
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
        workers,
    })
}

/// Starts the worker threads. Each accepts from every listener (the kernel wakes one of the
/// threads waiting); a thread that already serves more connections than another hands the new
/// one over (see `listeners::accept_loop`), so a few long keep-alive connections spread evenly.
fn start_workers(
    shared: &Arc<Shared>,
    stop: &listeners::Stop,
    runtimes: Vec<tokio::runtime::Runtime>,
    listeners: Vec<(std::net::TcpListener, listeners::Kind)>,
) -> Result<Vec<std::thread::JoinHandle<()>>, ProxyError> {
    let mut threads = Vec::with_capacity(runtimes.len());
    for (i, rt) in runtimes.into_iter().enumerate() {
        let mut mine = Vec::with_capacity(listeners.len());
        for (l, kind) in &listeners {
            mine.push((l.try_clone().map_err(ProxyError::Workers)?, *kind));
        }
        let (sh, stop) = (shared.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name(format!("kz-proxy-{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(i));
                rt.block_on(async {
                    for (l, kind) in mine {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => {
                                let task =
                                    listeners::accept_loop(sh.clone(), stop.clone(), l, kind, i);
                                tokio::spawn(task);
                            }
                            Err(e) => tracing::error!(error = %e, "proxy worker cannot listen"),
                        }
                    }
                    stop.killed().await;
                });
                // Connections still open are dropped here; a DNS lookup in flight on the
                // blocking pool is not waited for.
                rt.shutdown_background();
            })
            .map_err(ProxyError::Workers)?;
        threads.push(t);
    }
    Ok(threads)
}
