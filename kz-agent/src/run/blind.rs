//! `kz run --blind -- CMD`: the agent runs with masked tokens only, and the kernel makes sure it
//! can reach nothing but kz.
//!
//! The steps, in order (each failure stops the run before the child starts):
//! 1. the caller resolves the secrets; here each gets a `kz_masked_<32 hex>` token and goes into
//!    the proxy's token table with its scope (`hosts`, else whatever the connection rules allow);
//! 2. a [`Node`] starts inside this process (the interception core and the swapping proxy; kz
//!    runs outside the cgroup it guards, so its own connections are never redirected);
//! 3. the run is admitted on it as its one sandbox ([`crate::sandbox`]): its DNS resolver, and a
//!    cgroup with the policy "all TCP to the proxy, UDP/53 to kz's resolver, nothing to an
//!    address the resolver did not hand out"; the child is born in it (clone3
//!    CLONE_INTO_CGROUP; where that is refused it enters it between fork and exec);
//! 4. the child's environment carries the masked values and a CA bundle (system roots + this
//!    run's CA) in every variable common runtimes read; no proxy variables;
//! 5. signals are forwarded; when the child exits whatever is left in its cgroup is killed, the
//!    programs detached, the cgroup, pins and temporary files removed, and kz exits with the
//!    child's code (128+signal when it was killed).
//!
//! Without root, cgroup v2 or BPF the run falls back to explicit-proxy mode (HTTP(S)_PROXY for
//! the child, NO_PROXY empty) with a warning naming what is missing; `--require-kernel` makes that
//! an error. Every refused name, blocked connect, swap and scope violation is audited.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::audit::{AuditEvent, AuditSink, ChainSink, Fields, Fsync, SinkTarget, WithContext};
use crate::config::Config;
use crate::config::approval::{self, AgentIds, Gate, Store};
use crate::config::blind::{BlindConfig, HostPattern as ConfigPattern};
use crate::contain::{self, AgentUser, ContainError, Prepared};
use crate::intercept::Interceptor;
use crate::proxy::{self, CertAuthority, ConnectionRule, ConnectionRules, HostPattern, TokenTable};
use crate::run::trust::{self, RunDir};
use crate::run::{MaskedSecret, wait_forwarding};
use crate::sandbox::{Node, NodeOptions, SandboxError, SandboxSpec};

#[derive(Debug, thiserror::Error)]
pub enum BlindError {
    #[error(
        "kernel interception is not available: {0}; --require-kernel forbids the explicit-proxy fallback (run as root on a kernel with cgroup v2 and BPF, see `kz doctor`)"
    )]
    KernelRequired(String),
    #[error("blind mode needs at least one secret; add one to .keyzero.toml with `kz add`")]
    NoSecrets,
    #[error("[blind] connections: {0}")]
    Rule(#[from] proxy::RuleError),
    #[error("secret {name}: {source}")]
    Token {
        name: String,
        source: proxy::TokenError,
    },
    #[error("cannot create the run's CA: {0}")]
    Ca(#[from] proxy::TlsError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("[blind] resolver: {0}")]
    Resolver(String),
    #[error("kernel interception: {0}")]
    Intercept(#[from] crate::intercept::InterceptError),
    #[error("{0}")]
    Trust(#[from] trust::TrustError),
    #[error("{0}")]
    Child(Box<super::RunError>),
    #[error(transparent)]
    Contain(#[from] ContainError),
    #[error(transparent)]
    Approval(#[from] approval::ApprovalError),
}

pub struct BlindRequest {
    /// Resolved secrets with their masked tokens ([`super::mask_all`]) and scopes (`hosts`;
    /// empty = any host the connection rules allow).
    pub secrets: Vec<MaskedSecret>,
    pub config: BlindConfig,
    /// Program, arguments, working directory and base environment. The masked values and CA
    /// variables are added here, proxy variables removed (or set, in the fallback). Stdio is
    /// inherited and `env_clear` is not supported: with kernel interception the child is started
    /// by [`Cgroup::spawn`], which can only see program, arguments, environment changes and
    /// working directory.
    pub command: std::process::Command,
    pub require_kernel: bool,
    /// Who the agent runs as ([`crate::contain::user::resolve`], done before secrets are).
    pub agent: AgentUser,
    /// The audit log's file, masked in the agent's mount namespace (None: stdout or memory).
    pub audit_path: Option<PathBuf>,
    /// More paths to mask in the agent's mount namespace (the files kz's resolvers read).
    pub hide_extra: Vec<PathBuf>,
    pub audit: Arc<dyn AuditSink>,
    /// The eBPF loader started early ([`Preload::start`]), so loading overlaps config parsing and
    /// secret resolution. `None`: loaded when needed.
    pub preload: Option<Preload>,
    /// Variables of kz's environment that hold a resolver's login or a real value
    /// ([`crate::resolve::login_vars`], [`crate::harden::env_vars_to_scrub`]): the agent gets
    /// none of them (names only; kz has usually removed them from its own environment already).
    pub credential_vars: Vec<String>,
}

/// Opening the shared eBPF program set is about a millisecond, but the first run of a kz build
/// loads and verifies the programs (tens of milliseconds); starting on its own thread before the
/// secrets are resolved hides either behind slow resolvers. Dropping a `Preload` waits for the
/// loader and then drops the interceptor (no half-made pins left behind).
pub struct Preload(Option<std::thread::JoinHandle<Result<Interceptor, String>>>);

impl Preload {
    /// Starts loading when kz runs as root (otherwise there is nothing to load), and the
    /// proxy's system roots in any case.
    pub fn start() -> Preload {
        crate::tls::preload_system_roots();
        if !trust::is_root() {
            return Preload(None);
        }
        let handle = std::thread::Builder::new()
            .name("kz-ebpf-load".into())
            .spawn(kernel)
            .ok();
        Preload(handle)
    }

    fn take(mut self) -> Result<Interceptor, String> {
        match self.0.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err("the eBPF loader thread panicked".to_owned())),
            None => kernel(),
        }
    }
}

impl Drop for Preload {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            // The loaded interceptor (if any) is dropped here, which unloads it.
            let _ = h.join();
        }
    }
}

/// In-flight requests get this long when the child has exited.
const PROXY_DRAIN: Duration = Duration::from_secs(1);
/// The audit sink of a blind run, appending to `path` ([`audit_path`]), keyed with kz's
/// user's audit key, rotated at 64 MiB with the default caps on rotated files.
pub fn open_audit(path: &Path) -> Result<Arc<dyn AuditSink>, crate::audit::AuditError> {
    let sink = ChainSink::open(SinkTarget::File {
        path: path.to_owned(),
        fsync: Fsync::Interval,
        rotation: crate::audit::Rotation::size(Some(64 * 1024 * 1024)),
    })?;
    Ok(Arc::new(sink))
}

/// The audit log of a blind run: `path`, else [`crate::audit::default_log_path`]
/// (`/var/lib/kz/audit.jsonl` as root, through sudo too).
pub fn audit_path(path: Option<&Path>) -> PathBuf {
    match path {
        Some(p) => p.to_owned(),
        None => crate::audit::default_log_path(),
    }
}

/// The approval gate ([`approval::gate`]) of a blind run, once the config is loaded and before
/// any secret is resolved: a first use is said on stderr and audited; a refusal is audited
/// (`config_refused`, with the error's reason) and returned.
pub fn approve_config(
    config: &Config,
    agent: &AgentUser,
    audit_log: Option<&Path>,
) -> Result<(), BlindError> {
    let env = crate::config::process_env;
    // The agent's user matters only when it is not kz's own (then it may own the files).
    let other = (!agent.is_self()).then(|| AgentIds {
        uid: agent.uid,
        gids: agent.groups.iter().copied().chain([agent.gid]).collect(),
    });
    let outcome =
        Store::open(&env).and_then(|store| approval::gate(config, &store, other.as_ref(), &env));
    let event = match &outcome {
        Ok(Gate::Approved) => return Ok(()),
        Ok(Gate::FirstUse { record }) => {
            eprintln!(
                "kz: first blind run in {} (environment {}): trusting its config as it is and remembering it ({}); a later change to secret scopes, [blind] or resolvers stops `kz run --blind` until you approve it with `kz allow`",
                config.dir.display(),
                config.environment,
                record.display()
            );
            AuditEvent::new("config_first_use")
        }
        Err(e) => AuditEvent::new("config_refused")
            .with("reason", e.reason())
            .with("error", e.to_string()),
    };
    let event = event
        .with("project", config.dir.display().to_string())
        .with("environment", config.environment.clone());
    match open_audit(&audit_path(audit_log)) {
        Ok(sink) => audit(&*sink, event),
        Err(e) => eprintln!("kz: {e}"),
    }
    outcome.map(|_| ()).map_err(BlindError::from)
}

/// Runs the command blind and returns its exit code.
pub async fn run(req: BlindRequest) -> Result<ExitCode, BlindError> {
    if req.secrets.is_empty() {
        return Err(BlindError::NoSecrets);
    }
    let rules = connection_rules(&req.config)?;
    if req.config.is_open() {
        let unscoped: Vec<&str> = req
            .secrets
            .iter()
            .filter(|s| s.hosts.is_empty())
            .map(|s| s.name.as_str())
            .collect();
        if !unscoped.is_empty() {
            eprintln!(
                "kz: WARNING: [blind] connections is empty and {} has no `hosts`: the agent may send the real value to ANY host. Add `hosts = [\"api.example.com\"]` to each secret or connection rules to [blind].",
                unscoped.join(", ")
            );
        }
    }
    run_async(req, rules).await
}

/// `[blind] connections` as the proxy's rules (`non_http_tcp` lets allowed hosts carry non-HTTP
/// TCP, spliced through unchanged).
pub fn connection_rules(config: &BlindConfig) -> Result<ConnectionRules, BlindError> {
    let mut rules = Vec::with_capacity(config.connections.len());
    for rule in &config.connections {
        let pattern = match &rule.pattern {
            ConfigPattern::Host(h) => HostPattern::host(h)?,
            ConfigPattern::Regex(re) => HostPattern::Regex(re.clone()),
            ConfigPattern::Cidr(net) => HostPattern::Cidr(*net),
        };
        let mut r = if rule.allow {
            ConnectionRule::allow(pattern)
        } else {
            ConnectionRule::deny(pattern)
        };
        r.splice_non_http = rule.allow && config.non_http_tcp;
        rules.push(r);
    }
    Ok(ConnectionRules(rules))
}

/// Puts one masked secret in a sandbox's token table with its scope and swap settings.
pub fn add_token(tokens: &TokenTable, s: MaskedSecret) -> Result<(), BlindError> {
    let spec = proxy::TokenSpec {
        places: s.swap.places,
        require: s.swap.require,
        allow_plaintext: s.swap.allow_plaintext,
        ..proxy::TokenSpec::new(&s.name, &s.token, s.value, s.hosts)
    };
    tokens.add(spec).map_err(|source| BlindError::Token {
        name: s.name.clone(),
        source,
    })
}

/// Why kernel interception cannot work here, or the loaded interceptor.
pub(crate) fn kernel() -> Result<Interceptor, String> {
    if !trust::is_root() {
        return Err(
            "kz is not running as root (kernel interception needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
                .to_owned(),
        );
    }
    Interceptor::load().map_err(|e| e.to_string())
}

fn run_id() -> String {
    let r: [u8; 3] = rand::random();
    format!("run-{}-{}", std::process::id(), hex::encode(r))
}

/// Logs how long the run took to get to `phase` (debug level: `KZ_LOG=kz_agent::run=debug`).
fn phase(start: std::time::Instant, phase: &str) {
    tracing::debug!(
        elapsed_ms = start.elapsed().as_secs_f64() * 1000.0,
        phase,
        "blind run"
    );
}

async fn run_async(mut req: BlindRequest, rules: ConnectionRules) -> Result<ExitCode, BlindError> {
    let t0 = std::time::Instant::now();
    let loaded = match req.preload.take() {
        Some(p) => p.take(),
        None => kernel(),
    };
    let icpt = match loaded {
        Ok(i) => Some(i),
        Err(reason) if req.require_kernel => return Err(BlindError::KernelRequired(reason)),
        Err(reason) => {
            eprintln!(
                "kz: WARNING: kernel interception is not available: {reason}. Falling back to explicit-proxy mode: enforcement is now cooperative (HTTP_PROXY/HTTPS_PROXY), a program that ignores them connects directly and is not blocked{}. Use --require-kernel to make this an error; `kz doctor` shows what is missing.",
                if trust::is_root() {
                    ""
                } else {
                    ", and the agent runs as your own user: kz keeps itself undumpable and the agent's seccomp filter refuses ptrace, but nothing else stands between the agent and your files"
                }
            );
            None
        }
    };
    phase(t0, "interceptor loaded");
    let id = run_id();
    let program = req.command.get_program().to_string_lossy().into_owned();
    let mut context = Fields::default();
    context.insert("run", Value::from(id.clone()));
    context.insert("program", Value::from(program.clone()));
    context.insert(
        "run_mode",
        Value::from(if icpt.is_some() {
            "kernel"
        } else {
            "explicit_proxy"
        }),
    );

    // Every record of this run (the proxy's included) says which run and program it was.
    req.audit = Arc::new(WithContext {
        inner: req.audit.clone(),
        context,
    });
    let names: Vec<&str> = req.secrets.iter().map(|s| s.name.as_str()).collect();
    audit(
        &*req.audit,
        AuditEvent::new("run_start")
            .with("secrets", names)
            .with("open_rules", req.config.is_open()),
    );

    // The agent inherits kz's environment minus anything holding a real credential: an `env`
    // resolver's source variable (it holds the real value) or a resolver's own login.
    let removed = scrub_env(&mut req.command, &req.secrets, &req.credential_vars);
    if !removed.is_empty() {
        eprintln!(
            "kz: not passing {} to the agent: they hold real credentials",
            removed.join(", ")
        );
    }

    // 1-2: masked tokens and their scopes.
    let tokens = TokenTable::new();
    for s in std::mem::take(&mut req.secrets) {
        req.command.env(&s.name, &s.token);
        add_token(&tokens, s)?;
    }

    let dir = RunDir::create(&id)?;
    let ca = Arc::new(CertAuthority::generate(1024)?);
    let (bundle, bundle_pem) = dir.write_ca_bundle(ca.cert_pem())?;
    for var in trust::CA_ENV_VARS {
        req.command.env(var, &bundle);
    }
    for var in trust::PROXY_ENV_VARS {
        req.command.env_remove(var);
    }
    let agent = req.agent.clone();
    let masks = Masks {
        config: &req.config,
        hide_extra: &req.hide_extra,
        audit_path: req.audit_path.as_deref(),
    };
    let contained = Arc::new(contain_agent(
        &mut req.command,
        &masks,
        agent,
        &dir,
        (&bundle, bundle_pem),
        icpt.is_some(),
    )?);
    audit(
        &*req.audit,
        AuditEvent::new("agent_contained")
            .with("uid", contained.user().uid)
            .with("gid", contained.user().gid)
            .with("root_in_userns", contained.user().root_in_userns)
            .with("mount_namespace", contained.mounts().is_some())
            .with("landlock_scopes", contained.landlock_scoped()),
    );

    phase(t0, "tokens, CA and run dir ready");
    let dns_upstream = req.config.dns_upstream().map_err(BlindError::Resolver)?;
    let mut limits = proxy::Limits {
        drain_timeout: PROXY_DRAIN,
        ..proxy::Limits::default()
    };
    // Proxy worker threads (default: half the cores); for agents that make many parallel
    // requests on a machine with cores to spare.
    if let Some(n) = std::env::var("KZ_PROXY_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        limits.workers = n;
    }
    // 2-3: a node with this run as its one sandbox.
    let node = Node::start(NodeOptions {
        kernel: icpt,
        ipv6: req.config.ipv6,
        upstream_ca: req.config.upstream_ca.clone(),
        limits,
        audit: req.audit.clone(),
        allowed_ip_purge: crate::sandbox::ALLOWED_IP_PURGE,
    })
    .await?;
    let sandbox = node
        .admit(SandboxSpec {
            name: id,
            ca,
            tokens,
            rules,
            refuse_out_of_scope: req.config.refuse_on_scope_violation,
            dns_upstream,
            ipv6: req.config.ipv6,
            udp: req.config.udp,
            listen: req.config.listen,
            unix: crate::intercept::UnixSockets::Only(req.config.unix_rules()),
            audit: req.audit.clone(),
            echo_blocks: true,
            max_allowed_ips: req
                .config
                .max_allowed_ips
                .unwrap_or(crate::intercept::allowed::DEFAULT_QUOTA),
            dns_ttl_floor: crate::sandbox::TTL_FLOOR,
            existing_cgroup: None,
        })
        .await?;
    phase(t0, "proxy, DNS and cgroup ready");
    for (var, value) in sandbox.proxy_env() {
        req.command.env(var, value);
    }

    // 4-5: the child is born in the cgroup (or enters it before exec where clone3 cannot).
    phase(t0, "spawning the child");
    let command = req.command;
    let code = wait_forwarding(
        || sandbox.spawn(command, contained, None),
        Path::new(&program),
    )
    .await;
    phase(t0, "child exited");
    // Blocks the child caused just before it exited are still audited.
    node.close(sandbox).await;
    phase(t0, "sandbox closed");
    // In-flight requests finish (and are audited) as the proxy stops: the run's end comes
    // after them.
    node.shutdown().await;
    phase(t0, "node stopped");
    audit_end(&*req.audit, &code);
    drop(dir);
    code.map_err(|e| BlindError::Child(Box::new(e)))
}

/// What the agent's mount namespace masks besides kz's own state: `[blind] hide` (or the
/// defaults), the resolvers' files, the audit log.
pub(crate) struct Masks<'a> {
    pub config: &'a BlindConfig,
    pub hide_extra: &'a [PathBuf],
    pub audit_path: Option<&'a Path>,
}

/// The agent's identity in its environment, and the containment of its process: its user,
/// and (when kz is root) a mount namespace masking bpffs, cgroupfs, other processes, kz's run
/// directory, the audit log and its key, and the credential files of `[blind] hide`. The
/// working directory is `command`'s, else kz's. Shared with the node daemon's runs
/// ([`crate::agent::runs`]), whose agents are contained the same way.
pub(crate) fn contain_agent(
    command: &mut std::process::Command,
    masks: &Masks<'_>,
    agent: AgentUser,
    dir: &RunDir,
    (bundle, bundle_pem): (&Path, String),
    own_cgroup: bool,
) -> Result<Prepared, BlindError> {
    let cwd = match command.get_current_dir() {
        Some(d) => Some(d.to_owned()),
        None => std::env::current_dir().ok(),
    };
    if !agent.is_self() {
        if let Some(home) = &agent.home {
            command.env("HOME", home);
        }
        if let (Some(name), false) = (&agent.name, agent.root_in_userns) {
            command.env("USER", name).env("LOGNAME", name);
        }
        for var in [
            "SUDO_UID",
            "SUDO_GID",
            "SUDO_USER",
            "SUDO_COMMAND",
            "PKEXEC_UID",
        ] {
            command.env_remove(var);
        }
    }
    let mounts = if trust::is_root() {
        let project = cwd.clone().unwrap_or_else(|| PathBuf::from("/"));
        let mut hide = contain::hidden_paths(
            masks.config.hide.as_deref(),
            agent.home.as_deref(),
            &project,
        );
        hide.extend(masks.hide_extra.iter().cloned());
        if let Some(log) = masks.audit_path {
            hide.push(log.to_owned());
            hide.extend(crate::audit::rotated_files(log));
        }
        // The chain's key (root's, 0700 directory, 0600 file): masked too, in case its
        // directory's mode is ever loosened.
        hide.push(crate::audit::default_key_path());
        let empty = dir.write("empty", b"", 0o444)?;
        // The run directory's tree (every run's, and the node daemon's socket) is replaced by
        // one that holds only this run's CA bundle, at the path the agent was given.
        let run_tree = RunDir::base().parent().map(|root| contain::RunTree {
            root: root.to_owned(),
            keep: vec![(bundle.to_owned(), bundle_pem.into_bytes())],
        });
        Some(
            contain::MountPlan::new(contain::MountInputs {
                hide,
                empty_file: empty,
                run_tree,
                own_cgroup,
            })
            .map_err(ContainError::from)?,
        )
    } else {
        None
    };
    Ok(Prepared::new(contain::Spec {
        user: agent,
        mounts,
        cgroup_ns: own_cgroup,
        cwd,
    })?)
}

/// Removes from `cmd`'s environment every variable of `credentials` (resolver logins and
/// variables that held a real value, derived from the config by the caller) and every inherited
/// variable that still holds a secret's real value (values shorter than
/// [`crate::harden::MIN_VALUE_MATCH`] are not matched: they would match everything). Returns
/// the names removed, sorted.
fn scrub_env(
    cmd: &mut std::process::Command,
    secrets: &[MaskedSecret],
    credentials: &[String],
) -> Vec<String> {
    use std::os::unix::ffi::OsStringExt;
    let real: Vec<&str> = secrets.iter().map(|s| s.value.expose()).collect();
    let mut removed: Vec<String> = credentials.to_vec();
    for (key, value) in std::env::vars_os() {
        // The copy may hold a real value: zeroed, not left in freed memory.
        let value = zeroize::Zeroizing::new(value.into_vec());
        if crate::harden::holds_value(&value, &real) {
            removed.push(key.to_string_lossy().into_owned());
            cmd.env_remove(&key);
        }
    }
    for name in credentials {
        cmd.env_remove(name);
    }
    removed.sort();
    removed.dedup();
    removed
}

fn audit(sink: &dyn AuditSink, event: AuditEvent) {
    if let Err(e) = sink.record(event) {
        eprintln!("kz: {e}");
    }
}

fn audit_end(sink: &dyn AuditSink, code: &Result<ExitCode, super::RunError>) {
    let event = AuditEvent::new("run_end");
    let event = match code {
        // ExitCode is opaque; its Debug form carries the number (`ExitCode(unix_exit_status(7))`).
        Ok(c) => {
            let digits: String = format!("{c:?}")
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            event.with("exit_code", digits.parse::<u64>().ok())
        }
        Err(e) => event.with("error", e.to_string()),
    };
    audit(sink, event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::blind::ConnectionRule as CfgRule;
    use crate::sandbox::name_allowed;

    fn cfg(rules: Vec<(bool, ConfigPattern)>) -> BlindConfig {
        BlindConfig {
            connections: rules
                .into_iter()
                .map(|(allow, pattern)| CfgRule { allow, pattern })
                .collect(),
            ..BlindConfig::default()
        }
    }

    #[test]
    fn dns_follows_the_connection_rules() {
        let c = cfg(vec![
            (false, ConfigPattern::Host("evil.example.com".into())),
            (
                true,
                ConfigPattern::Regex(
                    crate::proxy::rules::HostRegex::new(r"(.+\.)?example\.com").unwrap(),
                ),
            ),
            (true, ConfigPattern::Host("API.GitHub.com".into())),
        ]);
        let rules = connection_rules(&c).unwrap();
        assert!(name_allowed(&rules, "api.example.com"));
        assert!(!name_allowed(&rules, "evil.example.com"));
        assert!(name_allowed(&rules, "api.github.com"));
        assert!(!name_allowed(&rules, "pastebin.com"));
        assert!(name_allowed(&ConnectionRules::default(), "anything.test"));
    }

    #[test]
    fn context_sink_adds_but_never_overrides() {
        let mem = Arc::new(crate::audit::MemorySink::new());
        let mut context = Fields::default();
        context.insert("run", "run-1".into());
        context.insert("mode", "kernel".into());
        let sink = WithContext {
            inner: mem.clone(),
            context,
        };
        sink.record(AuditEvent::new("x").with("mode", "transparent"))
            .unwrap();
        let got = mem.events()[0].clone();
        assert_eq!(got.fields["run"], "run-1");
        assert_eq!(got.fields["mode"], "transparent");
    }

    #[test]
    fn run_ids_are_valid_cgroup_names_and_unique() {
        let a = run_id();
        let b = run_id();
        assert_ne!(a, b);
        assert!(crate::intercept::cgroups::valid_name(&a));
    }
}
