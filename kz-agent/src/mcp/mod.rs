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
mod glue;
pub mod guard;
pub mod scrub;
pub mod server;

pub use authority::{Authority, Grant, Refusal};
pub use server::{KzMcp, SERVER_NAME};

use crate::audit::AuditSink;
use crate::pdp::Pdp;
use crate::pdp::cli::StartArgs;
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use std::net::SocketAddr;
use std::process::ExitCode;
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

/// MCP settings of `kz server start` (flattened into its arguments). `fetch` also uses the
/// command's `--allow-private CIDR` (off by default) and `--upstream-ca FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct McpArgs {
    /// Serve the MCP tools `resolve` and `fetch` (server name `keyzero`) instead of the HTTP
    /// API: over stdio, or over MCP streamable HTTP at http://ADDR/mcp when --listen is given.
    #[arg(long, conflicts_with_all = ["proxy", "proxy_listen"])]
    pub mcp: bool,
    /// Resolve `fetch` destinations with this DNS server (IP:PORT, UDP) instead of the system
    /// resolver.
    #[arg(long = "mcp-dns", value_name = "IP:PORT", env = "KZ_MCP_DNS")]
    pub dns: Option<SocketAddr>,
    /// Largest `fetch` response body handed back, in bytes; longer bodies are cut and marked
    /// `truncated`.
    #[arg(long = "mcp-max-body", value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: usize,
    /// Time limit for one `fetch` (lookup, connect, TLS, redirects and body), in seconds.
    #[arg(long = "mcp-timeout", value_name = "SECS", default_value_t = 30)]
    pub timeout_secs: u64,
}

/// Builds the `fetch` configuration from `kz server start`'s arguments.
pub fn fetch_config(args: &StartArgs) -> Result<fetch::FetchConfig, McpError> {
    let mut allow = Vec::new();
    for cidr in &args.allow_private {
        allow.push(
            cidr.parse::<ipnet::IpNet>()
                .map_err(|_| McpError::Cidr(cidr.clone()))?,
        );
    }
    let dns = match args.mcp.dns {
        Some(addr) => dns::Dns::Server(addr),
        None => dns::Dns::System,
    };
    let mut config = fetch::FetchConfig::new(
        guard::Guard::new(allow),
        dns,
        args.upstream_ca.as_deref(),
        args.mcp.max_body,
    )?;
    config.total_timeout = Duration::from_secs(args.mcp.timeout_secs.max(1));
    config.connect_timeout = config.connect_timeout.min(config.total_timeout);
    Ok(config)
}

/// `kz server start --mcp`: stdio, or streamable HTTP when `--listen` is given.
pub async fn run(args: &StartArgs, pdp: Arc<Pdp>) -> anyhow::Result<ExitCode> {
    let fetch = fetch_config(args)?;
    let audit = pdp.audit();
    match args.listen {
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
                return Err(McpError::StdoutTaken.into());
            }
            serve_stdio(pdp, audit, fetch).await?;
        }
        Some(addr) => {
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                crate::pdp::cli::wait_for_shutdown().await;
                stop.cancel();
            });
            serve_http(addr, pdp, audit, fetch, shutdown).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
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
