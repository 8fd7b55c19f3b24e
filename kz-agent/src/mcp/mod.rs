//! MCP server: KeyZero-compatible `resolve` and `fetch` tools for agents that must never hold a
//! credential (`kz server start --bundle FILE --mcp`, over stdio or, with `--listen`, MCP
//! streamable HTTP at `http://ADDR/mcp`).
//!
//! Pieces: [`authority`] (what the tools ask the PDP), [`server`] (the rmcp handler),
//! [`fetch`] (kz's own HTTPS client for `fetch`), [`guard`] (SSRF destination policy),
//! [`dns`] (name resolution the guard checks), [`scrub`] (credential removal from responses).

pub mod authority;
pub mod dns;
pub mod fetch;
pub mod guard;
pub mod scrub;
pub mod server;

pub use authority::{Authority, Grant, Refusal};
pub use server::{KzMcp, SERVER_NAME};

use crate::audit::AuditSink;
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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
}

/// `fetch` settings of `kz server start` (flattened into its arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// Let `fetch` reach this private/loopback/link-local range (CIDR), e.g. an internal API.
    /// Repeatable. Off by default; cloud metadata addresses stay refused regardless.
    #[arg(
        long = "allow-private-cidr",
        value_name = "CIDR",
        env = "KZ_MCP_ALLOW_PRIVATE_CIDR",
        value_delimiter = ','
    )]
    pub allow_private_cidr: Vec<ipnet::IpNet>,
    /// Resolve `fetch` destinations with this DNS server (IP:PORT, UDP) instead of the system
    /// resolver.
    #[arg(long = "mcp-dns", value_name = "IP:PORT", env = "KZ_MCP_DNS")]
    pub dns: Option<SocketAddr>,
    /// Extra CA certificates (PEM) trusted for `fetch` upstreams, besides the system roots.
    #[arg(long = "upstream-ca", value_name = "FILE", env = "KZ_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// Largest `fetch` response body handed back, in bytes; longer bodies are cut and marked
    /// `truncated`.
    #[arg(long = "mcp-max-body", value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: usize,
}

impl FetchArgs {
    pub fn config(&self) -> Result<fetch::FetchConfig, McpError> {
        let dns = match self.dns {
            Some(addr) => dns::Dns::Server(addr),
            None => dns::Dns::System,
        };
        Ok(fetch::FetchConfig::new(
            guard::Guard::new(self.allow_private_cidr.clone()),
            dns,
            self.upstream_ca.as_deref(),
            self.max_body,
        )?)
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
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !local.ip().is_unspecified() && !local.ip().is_loopback() {
        hosts.push(local.ip().to_string());
    }
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_cancellation_token(shutdown.child_token());
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
