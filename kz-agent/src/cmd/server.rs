//! `kz server start|check`: the PDP over HTTP, the token-exchange proxy (alone with `--proxy`,
//! or beside the PDP with `--proxy-listen`), and the PDP's MCP tools (`--mcp`).
//!
//! Wiring only: the PDP ([`crate::pdp`]), its HTTP API ([`crate::pdp::http`]), the exchange proxy
//! ([`crate::pdp::proxy`]) and MCP ([`crate::mcp`]) take typed options built here from
//! [`StartArgs`]. Every server runs until SIGINT/SIGTERM ([`super::signals`]); the bundle reloads
//! on SIGHUP and when its file changes.

use super::signals;
use crate::bundle;
use crate::cli::{ServerCommand, StartArgs};
use crate::pdp::proxy::{Cidr, Proxy, ProxyOptions};
use crate::pdp::{Compiled, Pdp, PdpOptions, Signer, TokenVerifier};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where the PDP (or the proxy alone) listens without `--listen`.
const DEFAULT_PORT: u16 = 8080;

pub(super) fn run(cmd: ServerCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ServerCommand::Check { bundle } => Ok(check(&bundle)),
        ServerCommand::Start(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(start(*args))
        }
    }
}

fn listen_addr(args: &StartArgs) -> SocketAddr {
    args.listen
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))
}

/// `--allow-private` and `--upstream-ca` as the exchange proxy's options.
fn proxy_options(args: &StartArgs) -> anyhow::Result<ProxyOptions> {
    let allow_private = args
        .allow_private
        .iter()
        .map(|s| Cidr::parse(s).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ProxyOptions {
        allow_private,
        upstream_ca: args.upstream_ca.clone(),
    })
}

/// The `fetch` tool's options: the proxy's `--allow-private` and `--upstream-ca`, plus the
/// `--mcp-*` flags.
fn fetch_options(args: &StartArgs) -> crate::mcp::FetchOptions {
    crate::mcp::FetchOptions {
        allow_private: args.allow_private.clone(),
        dns: args.mcp.dns,
        upstream_ca: args.upstream_ca.clone(),
        max_body: args.mcp.max_body,
        timeout: Duration::from_secs(args.mcp.timeout_secs),
    }
}

fn check(path: &Path) -> ExitCode {
    match bundle::load(path).and_then(Compiled::build) {
        Ok(c) => {
            println!("{}", c.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    if args.proxy {
        return start_proxy(args).await;
    }
    let signer = match &args.signing_key {
        Some(p) => Some(Arc::new(Signer::from_pem_file(
            p,
            args.public_key.as_deref(),
        )?)),
        None => {
            let needs = bundle::load(&args.bundle)
                .map(|b| {
                    b.bundle
                        .resources
                        .iter()
                        .any(|r| r.mode == bundle::Mode::ShortLived)
                })
                .unwrap_or(false);
            if needs {
                tracing::warn!(
                    "no --signing-key: short-lived tokens are signed with an in-memory key; only a proxy in this process (--proxy-listen) can verify them"
                );
                Some(Arc::new(Signer::generate()?))
            } else {
                None
            }
        }
    };
    let proxy_listener = match args.proxy_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let proxy_url = args.proxy_url.clone().or_else(|| {
        proxy_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("http://{a}"))
    });
    let pdp = Arc::new(Pdp::from_file(
        &args.bundle,
        PdpOptions {
            signer: signer.clone(),
            proxy_url,
            audit: None,
        },
    )?);
    if args.mcp.mcp {
        spawn_reloaders(pdp.clone());
        return start_mcp(&args, pdp).await;
    }
    let addr = listen_addr(&args);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    eprintln!("kz: PDP listening on http://{addr}");
    if let (Some(l), Some(signer)) = (proxy_listener, signer) {
        let proxy = Arc::new(Proxy::new(
            pdp.clone(),
            signer.verifier(),
            proxy_options(&args)?,
        ));
        eprintln!("kz: proxy listening on http://{}", l.local_addr()?);
        tokio::spawn(crate::pdp::proxy::serve(l, proxy));
    }
    spawn_reloaders(pdp.clone());
    tokio::spawn(crate::pdp::http::serve(listener, pdp));
    signals::shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// `kz server start --proxy`: the proxy alone, verifying tokens with `--public-key`.
async fn start_proxy(args: StartArgs) -> anyhow::Result<ExitCode> {
    let verifier = match (&args.public_key, &args.signing_key) {
        (Some(p), _) => TokenVerifier::from_public_pem_file(p)?,
        (None, Some(k)) => Signer::from_pem_file(k, None)?.verifier(),
        (None, None) => anyhow::bail!(
            "--proxy needs the key that verifies kz tokens: --public-key FILE (or KEYZERO_PUBLIC_KEY_PATH)"
        ),
    };
    let pdp = Arc::new(Pdp::from_file(&args.bundle, PdpOptions::default())?);
    let proxy = Arc::new(Proxy::new(pdp.clone(), verifier, proxy_options(&args)?));
    let addr = listen_addr(&args);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!("kz: proxy listening on http://{}", listener.local_addr()?);
    spawn_reloaders(pdp);
    tokio::spawn(crate::pdp::proxy::serve(listener, proxy));
    signals::shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// `kz server start --mcp`: stdio, or streamable HTTP when `--listen` is given.
async fn start_mcp(args: &StartArgs, pdp: Arc<Pdp>) -> anyhow::Result<ExitCode> {
    let fetch = crate::mcp::fetch_config(&fetch_options(args))?;
    let shutdown = CancellationToken::new();
    // Only the HTTP transport stops on a signal; over stdio the client ends the session by
    // closing the stream, and a signal keeps its default action.
    if args.listen.is_some() {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            signals::shutdown().await;
            stop.cancel();
        });
    }
    crate::mcp::serve_pdp(pdp, args.listen, fetch, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Reload on SIGHUP and when the bundle file changes (polled: works across editors that
/// replace the file and across bind mounts / ConfigMaps where inotify is unreliable).
fn spawn_reloaders(pdp: Arc<Pdp>) {
    let on_hup = pdp.clone();
    signals::reload_on_hangup(move || report_reload(&on_hup, "SIGHUP"));
    tokio::spawn(async move {
        let Some(path) = pdp.bundle_path().map(Path::to_path_buf) else {
            return;
        };
        let mut last = fingerprint(&path);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = fingerprint(&path);
            if now != last && now.is_some() {
                last = now;
                report_reload(&pdp, "file change");
            }
        }
    });
}

fn fingerprint(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::hash::{Hash, Hasher};
    let meta = std::fs::metadata(path).ok()?;
    let text = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    Some((meta.modified().ok()?, meta.len(), h.finish()))
}

fn report_reload(pdp: &Pdp, why: &str) {
    match pdp.reload() {
        Ok(()) => eprintln!("kz: bundle reloaded ({why})"),
        Err(e) => {
            eprintln!("kz: bundle reload refused ({why}); the previous bundle keeps serving:\n{e}")
        }
    }
}
