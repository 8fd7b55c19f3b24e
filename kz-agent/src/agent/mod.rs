//! `kz agent run`: the node daemon. One long-running root process holds one [`Node`] (the
//! shared eBPF program set, one swapping proxy, the block-event reader), the audit sink, and
//! many sandboxes, created, listed and destroyed over a local API on a unix socket.
//!
//! - [`auth`]: who is asking (SO_PEERCRED) and what they may see and manage.
//! - [`secrets`]: a sandbox's secrets from the caller's project directory, resolved with the
//!   caller's privileges.
//! - [`state`]: the sandboxes, their owners, tokens, counters and audit context.
//! - [`api`]: the HTTP/1.1 JSON endpoints; [`client`]: the CLI's side of them.
//! - [`events`]: a sandbox's audit records streamed live to its owner (bounded queues: a slow
//!   reader loses records, counted, and never holds up the proxy).
//! - [`pods`]: `/v1/pods`, Kubernetes pods registered by a node-side hook with their projected
//!   service-account token, their own cgroup (found in the kubelet's layouts, [`kubepods`])
//!   guarded with the sandbox the config names for their service account.
//! - [`runs`]: `POST /v1/runs`, a command started as the caller in a sandbox with the caller's
//!   stdio and working directory; [`run_client`]: `kz run --blind`'s side of it; [`wire`]:
//!   their protocol on the upgraded connection.
//! - [`persist`]: each sandbox's state on disk (no real value), and [`adopt`]: a daemon started
//!   after another was killed adopts the sandboxes it left, so they are served again without
//!   being restarted.
//!
//! Per sandbox: its own DNS resolver, cgroup and policy, proxy session (token table, rules) and
//! CA. The CA is per sandbox, not per node: a sandbox's agent trusts only the leaves minted for
//! its own session, and creating one costs a key pair (milliseconds). The daemon refuses to run
//! without kernel interception: an explicit proxy cannot tell two sandboxes apart.
//!
//! Not built yet (issue 15): pod discovery.

pub mod adopt;
pub mod api;
pub mod auth;
pub mod client;
pub mod events;
pub mod kubepods;
pub mod persist;
pub mod pods;
pub mod run_client;
pub mod runs;
pub mod secrets;
pub mod state;
pub mod wire;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use crate::audit::{AuditEvent, AuditSink};
use crate::sandbox::{Node, NodeOptions, SandboxError};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kz/agent.sock";
/// The group that may open the socket (mode 0660); without it the socket is root-only (0600).
pub const SOCKET_GROUP: &str = "kz";
/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The daemon's audit log unless told otherwise.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/kz/agent.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "kz agent needs kernel interception and it is not available: {0}; run `kz doctor` to see what to fix (the daemon has no explicit-proxy mode: it could not tell sandboxes apart)"
    )]
    KernelRequired(String),
    #[error("cannot open the audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Node(#[from] SandboxError),
    #[error("another kz agent is already serving {0}; stop it first (`kz agent status` shows it)")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; remove it or pick another --socket")]
    NotASocket(PathBuf),
    #[error("cannot set up the API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pods(#[from] pods::PodsConfigError),
    #[error("{0}")]
    State(#[from] persist::PersistError),
}

/// How the daemon is started (`kz agent run`'s flags as values).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub socket: PathBuf,
    /// The group given access to the socket when it exists.
    pub socket_group: String,
    pub audit_log: PathBuf,
    /// Extra PEM CA trusted for upstreams (per node: the proxy's upstream pools are shared).
    pub upstream_ca: Option<PathBuf>,
    /// The proxy listens on `[::1]` too, for sandboxes with `[blind] ipv6 = true`.
    pub ipv6: bool,
    /// The pods config (YAML, [`pods::PodsConfig`]): serve `/v1/pods`.
    pub pods: Option<PathBuf>,
    /// Where each sandbox's state is kept for a restarted daemon ([`persist`]; root's, 0700).
    pub state_dir: PathBuf,
}

/// Runs the daemon until `stop` resolves, then destroys every sandbox, stops the node and
/// removes the socket.
pub async fn run(opts: AgentOptions, stop: impl Future<Output = ()>) -> Result<(), AgentError> {
    crate::tls::preload_system_roots();
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::KernelRequired(
            "kz is not running as root (kernel interception needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)".into(),
        ));
    }
    // A second daemon on a live socket stops here, before it touches any state.
    refuse_live_socket(&opts.socket)?;
    let state = persist::StateDir::open(&opts.state_dir)?;
    let icpt = crate::intercept::Scope::detect()
        .and_then(|scope| crate::intercept::Interceptor::load_held(&scope, &state.held_name()))
        .map_err(|e| AgentError::KernelRequired(e.to_string()))?;
    let pods = match &opts.pods {
        Some(path) => Some(pods::Pods::load(path, icpt.cgroup_root())?),
        None => None,
    };
    let audit = crate::run::blind::open_audit(&opts.audit_log)?;
    let node = Node::start(NodeOptions {
        kernel: Some(icpt),
        ipv6: opts.ipv6,
        upstream_ca: opts.upstream_ca.clone(),
        limits: crate::proxy::Limits::default(),
        audit: audit.clone(),
        allowed_ip_purge: crate::sandbox::ALLOWED_IP_PURGE,
    })
    .await?;
    let listener = match bind(&opts.socket, &opts.socket_group) {
        Ok(l) => l,
        Err(e) => {
            node.shutdown().await;
            return Err(e);
        }
    };
    let api = Arc::new(api::Api {
        registry: state::Registry::new(node, audit.clone()).persisting(state),
        started: Instant::now(),
        socket: opts.socket.clone(),
        audit_log: opts.audit_log.clone(),
        runs: std::sync::Mutex::new(tokio::task::JoinSet::new()),
        pods,
    });
    record(
        &*audit,
        AuditEvent::new("agent_start")
            .with("pid", std::process::id())
            .with("socket", opts.socket.display().to_string()),
    );
    // The sandboxes a killed daemon left are served again before the first request is.
    for a in adopt::adopt_all(&api.registry, api.pods.as_ref()).await {
        if let (Some(pod), Some(pods)) = (a.pod, &api.pods) {
            pods.restore(pod);
        }
        if a.for_run {
            let watcher = adopt::watch_run(api.clone(), a.id, a.cgroup);
            api.runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .spawn(watcher);
        }
    }
    eprintln!("kz agent: serving {}", opts.socket.display());
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on the API socket failed");
                        continue;
                    }
                };
                let caller = match auth::Caller::of(&stream) {
                    Ok(c) => c,
                    Err(e) => {
                        record(&*audit, AuditEvent::new("api_refused").with("reason", "no_peer_credentials").with("error", e.to_string()));
                        continue;
                    }
                };
                let api = api.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| api::handle(api.clone(), caller, req));
                    // A local user holding connections open with half a request gets nothing
                    // but its connection closed.
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "API connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Orderly stop: no new API requests (those in flight are cut; a create half way is undone
    // by admission itself); the proxy drains, so the agents' requests in flight are answered
    // and audited; then every sandbox is destroyed and the node stops.
    let _ = std::fs::remove_file(&opts.socket);
    connections.shutdown().await;
    let left = api.registry.node().drain().await;
    record(
        &*audit,
        AuditEvent::new("agent_drained").with("connections_cut", left),
    );
    // Runs hold the API; their children die with their sandboxes just below.
    let mut runs = std::mem::take(&mut *api.runs.lock().unwrap_or_else(|p| p.into_inner()));
    runs.shutdown().await;
    match Arc::try_unwrap(api) {
        Ok(api) => api.registry.shutdown().await,
        Err(_) => {
            tracing::error!("API state still referenced at shutdown; sandboxes left to the kernel")
        }
    }
    record(
        &*audit,
        AuditEvent::new("agent_stop").with("pid", std::process::id()),
    );
    Ok(())
}

fn record(audit: &dyn AuditSink, event: AuditEvent) {
    if let Err(e) = audit.record(event) {
        eprintln!("kz agent: {e}");
    }
}

/// Refuses a `path` that is not a socket, or one a daemon answers on.
fn refuse_live_socket(path: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(AgentError::NotASocket(path.to_owned()));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::AlreadyRunning(path.to_owned()));
    }
    Ok(())
}

/// The API socket at `path`: its directory made (0755) if missing, a stale socket of a dead
/// daemon replaced, created 0600 and then opened to `group` (0660) when that group exists.
fn bind(path: &Path, group: &str) -> Result<UnixListener, AgentError> {
    let io = |source| AgentError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        refuse_live_socket(path)?;
        std::fs::remove_file(path).map_err(io)?;
    }
    // The socket is born 0600: no moment in which anyone else could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io)?;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => {
            nix::unistd::chown(path, None, Some(g.gid)).map_err(|e| io(e.into()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        }
        _ => {
            tracing::warn!(
                "group {group} does not exist: {} is root-only (create the group to let its members use kz agent)",
                path.display()
            );
        }
    }
    Ok(listener)
}
