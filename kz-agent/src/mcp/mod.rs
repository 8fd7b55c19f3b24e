//! MCP server: KeyZero-compatible `resolve` and `fetch` tools for agents that must never hold a
//! credential (`kz server start --bundle FILE --mcp`, over stdio or, with `--listen`, MCP
//! streamable HTTP at `http://ADDR/mcp`).
//!
//! Pieces: [`authority`] (what the tools ask the PDP), [`server`] (the rmcp handler),
//! [`fetch`] (kz's own HTTPS client for `fetch`), [`dns`] (name resolution the address guard
//! checks). The address guard, host scopes, scrubber, credential location and hop-by-hop
//! headers are [`crate::egress`]'s, shared with the proxy and the PDP's exchange proxy.

pub mod authority;
pub mod dns;
pub mod fetch;
mod glue;
pub mod server;

pub use authority::{Authority, Grant, Refusal};
pub use server::{KzMcp, SERVER_NAME};

use crate::audit::AuditSink;
use crate::pdp::Pdp;
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Default cap on a `fetch` response body handed to the agent (bytes of upstream body).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("MCP over stdio failed: {0}")]
    Stdio(String),
    #[error("cannot listen for MCP on {addr}: {source}; pick a free address with --listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MCP HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("fetch setup: {0}")]
    Fetch(#[from] fetch::FetchError),
    #[error("--allow-private: '{0}' is not a CIDR such as 10.0.0.0/8 or fd00::/8")]
    Cidr(String),
    #[error(
        "the bundle's audit section writes to stdout, which MCP over stdio uses; set audit.stdout: false (or use --listen)"
    )]
    StdoutTaken,
}

/// What `fetch` may reach and how (the `kz server start` flags `--allow-private`,
/// `--upstream-ca`, `--mcp-dns`, `--mcp-max-body`, `--mcp-timeout`, as plain values).
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Private networks (CIDR text, e.g. `10.0.0.0/8`) `fetch` may reach; off by default.
    pub allow_private: Vec<String>,
    /// A DNS server (UDP) for `fetch` destinations instead of the system resolver.
    pub dns: Option<SocketAddr>,
    /// Extra CA (PEM) trusted for upstream TLS, on top of the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// Largest response body handed back, in bytes.
    pub max_body: usize,
    /// Time limit for one `fetch`; at least one second.
    pub timeout: Duration,
}

/// Builds the `fetch` configuration.
pub fn fetch_config(options: &FetchOptions) -> Result<fetch::FetchConfig, McpError> {
    let mut allow = Vec::new();
    for cidr in &options.allow_private {
        allow.push(
            cidr.parse::<ipnet::IpNet>()
                .map_err(|_| McpError::Cidr(cidr.clone()))?,
        );
    }
    let dns = match options.dns {
        Some(addr) => dns::Dns::Server(addr),
        None => dns::Dns::System,
    };
    let mut config = fetch::FetchConfig::new(
        // Every non-public class: the agent chooses the URL.
        crate::egress::Guard::new(allow, crate::egress::Classes::NonPublic),
        dns,
        options.upstream_ca.as_deref(),
        options.max_body,
    )?;
    config.total_timeout = options.timeout.max(Duration::from_secs(1));
    config.connect_timeout = config.connect_timeout.min(config.total_timeout);
    Ok(config)
}

/// The PDP's MCP tools: over stdio when `listen` is `None` (until the client closes the
/// stream), else over streamable HTTP on `listen` until `shutdown` is cancelled.
pub async fn serve_pdp(
    pdp: Arc<Pdp>,
    listen: Option<SocketAddr>,
    fetch: fetch::FetchConfig,
    shutdown: CancellationToken,
) -> Result<(), McpError> {
    let audit = pdp.audit();
    match listen {
        None => {
            // stdout is the MCP channel: an audit sink writing there would corrupt it.
            let audit_to_stdout = pdp
                .current()
                .loaded
                .bundle
                .audit
                .as_ref()
                .is_some_and(|a| a.stdout);
            if audit_to_stdout {
                return Err(McpError::StdoutTaken);
            }
            serve_stdio(pdp, audit, fetch).await
        }
        Some(addr) => serve_http(addr, pdp, audit, fetch, shutdown).await,
    }
}

/// Serves MCP on stdin/stdout until the client closes the stream.
pub async fn serve_stdio(
    authority: Arc<dyn Authority>,
    audit: Arc<dyn AuditSink>,
    fetch: fetch::FetchConfig,
) -> Result<(), McpError> {
    let handler = KzMcp::new(authority, audit, fetch, "stdio");
    let service = handler
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Stdio(e.to_string()))?;
    service
        .waiting()
        .await
        .map_err(|e| McpError::Stdio(e.to_string()))?;
    Ok(())
}

/// Serves MCP streamable HTTP at `http://ADDR/mcp` until `shutdown` is cancelled. Prints the
/// bound address on stderr (useful with port 0).
pub async fn serve_http(
    addr: SocketAddr,
    authority: Arc<dyn Authority>,
    audit: Arc<dyn AuditSink>,
    fetch: fetch::FetchConfig,
    shutdown: CancellationToken,
) -> Result<(), McpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| McpError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(McpError::Http)?;
    let handler = KzMcp::new(authority, audit, fetch, "http");
    // rmcp checks the Host header against this list (DNS-rebinding defence for local servers);
    // when bound to a specific non-loopback address, that address is a legitimate Host too.
    // Bound to every interface, the names clients use are unknown, so the check is off: every
    // tool call still needs a valid JWT, which a rebinding web page does not have.
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !local.ip().is_unspecified() && !local.ip().is_loopback() {
        hosts.push(local.ip().to_string());
    }
    let mut config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_cancellation_token(shutdown.child_token());
    if local.ip().is_unspecified() {
        config = config.disable_allowed_hosts();
    }
    let service: StreamableHttpService<KzMcp, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    eprintln!("kz: MCP (streamable HTTP) listening on http://{local}/mcp");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled_owned().await })
        .await
        .map_err(McpError::Http)
}
