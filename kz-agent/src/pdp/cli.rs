//! `kz server start|check` and `kz audit verify`.

use super::{Pdp, PdpOptions, Signer};
use crate::audit;
use crate::bundle;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Serve the PDP over HTTP (or, with --proxy, the token-exchange proxy).
    Start(Box<StartArgs>),
    /// Validate a bundle: YAML, schema, every CEL rule, glob, backend and key; print counts.
    Check {
        /// The bundle YAML file.
        #[arg(long)]
        bundle: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The bundle YAML file (reloaded on SIGHUP and when the file changes).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Address to listen on (default 127.0.0.1:8080); port 0 picks a free port (the chosen
    /// address is printed). With --mcp it selects MCP over streamable HTTP instead of stdio.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Run the token-exchange proxy instead of the PDP API: it verifies kz tokens and injects the
    /// real credential at the resource's credential_location.
    #[arg(long)]
    pub proxy: bool,
    /// Also serve the token-exchange proxy on this address, in the same process as the PDP
    /// (shares the signing key, so an ephemeral key works).
    #[arg(long, conflicts_with = "proxy")]
    pub proxy_listen: Option<SocketAddr>,
    /// Private key (PEM) that signs short-lived kz tokens: PKCS#8 P-256 → ES256, RSA → RS256.
    #[arg(long, env = "KEYZERO_SIGNING_KEY_PATH")]
    pub signing_key: Option<PathBuf>,
    /// Public key (PEM) the proxy verifies kz tokens with.
    #[arg(long, env = "KEYZERO_PUBLIC_KEY_PATH")]
    pub public_key: Option<PathBuf>,
    /// URL returned to clients with each kz token (`proxy` field).
    #[arg(long, env = "KEYZERO_PROXY_URL")]
    pub proxy_url: Option<String>,
    /// Let the proxy reach these private networks (CIDR), e.g. a test upstream. Metadata
    /// addresses (169.254.169.254, fd00:ec2::254, …) stay refused whatever this says.
    #[arg(long = "allow-private", value_name = "CIDR")]
    pub allow_private: Vec<String>,
    /// Extra CA (PEM) trusted for upstream TLS, on top of the system roots.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    #[command(flatten)]
    pub mcp: crate::mcp::McpArgs,
}

impl StartArgs {
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))
    }
}

const DEFAULT_PORT: u16 = 8080;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a hash-chained audit log (and its rotated predecessors FILE.1, FILE.2, …).
    Verify {
        /// The audit log file.
        file: PathBuf,
    },
}

pub fn run_server(cmd: ServerCommand) -> anyhow::Result<ExitCode> {
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

pub fn run_audit(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { file } => match audit::verify_path(&file) {
            Ok(report) => {
                println!(
                    "audit log OK: {} records in {} file(s), chain head {}",
                    report.records,
                    report.files.len(),
                    report.last_hash
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("kz: audit verify FAILED: {e}");
                Ok(ExitCode::from(1))
            }
        },
    }
}

fn check(path: &Path) -> ExitCode {
    match bundle::load(path).and_then(super::Compiled::build) {
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
        return super::proxy::start_standalone(args).await;
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
        return crate::mcp::run(&args, pdp).await;
    }
    let listener = tokio::net::TcpListener::bind(args.listen_addr())
        .await
        .with_context(|| format!("cannot listen on {}", args.listen_addr()))?;
    let addr = listener.local_addr()?;
    eprintln!("kz: PDP listening on http://{addr}");
    if let (Some(l), Some(signer)) = (proxy_listener, signer) {
        let proxy = Arc::new(super::proxy::Proxy::new(
            pdp.clone(),
            signer.verifier(),
            super::proxy::ProxyOptions::from_args(&args)?,
        ));
        eprintln!("kz: proxy listening on http://{}", l.local_addr()?);
        tokio::spawn(super::proxy::serve(l, proxy));
    }
    spawn_reloaders(pdp.clone());
    tokio::spawn(super::http::serve(listener, pdp));
    wait_for_shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Reload on SIGHUP and when the bundle file changes (polled: works across editors that
/// replace the file and across bind mounts / ConfigMaps where inotify is unreliable).
pub(crate) fn spawn_reloaders(pdp: Arc<Pdp>) {
    let on_hup = pdp.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; reload by file change only");
            return;
        };
        while hup.recv().await.is_some() {
            report_reload(&on_hup, "SIGHUP");
        }
    });
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
