//! `kz run`: resolve the configured secrets and run a command with them.
//!
//! Without `--blind` this is KeyZero's `kz run`: real values in the child's environment. The
//! pieces blind mode builds on live here too: [`resolve_all`] (concurrent, progress after a
//! second, every failure listed, never a value), [`TokenMinter`] (masked tokens),
//! [`child_env`] (`--clean-env`/`--keep-env`) and [`spawn_and_wait`] (signal forwarding, exit
//! code passthrough).
//!
//! [`run`] takes [`RunOptions`], not command-line arguments: the flags, and `kz export` and
//! `kz status` over [`resolve_all`] and [`resolve_each`], are wired in `cmd::run`.

pub mod blind;
pub mod trust;

use crate::config::{Config, ConfigError, SecretEntry};
use crate::resolve::Resolver;
use crate::sandbox::Child;
use crate::secret::Secret;
use futures_util::future::join_all;
use rand::RngCore;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Variables `--clean-env` keeps (KeyZero's list).
pub const ESSENTIAL_VARS: &[&str] = &[
    "PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "LC_ALL", "TMPDIR", "TZ",
];
pub const MASKED_PREFIX: &str = "kz_masked_";
/// Resolution slower than this gets a progress line on stderr.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// What `kz run` is asked to do (its command-line flags, parsed by `cli`, as plain values).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Only these secrets (`None`: every configured secret).
    pub only: Option<Vec<String>>,
    /// Start the child from [`ESSENTIAL_VARS`] and `keep_env` instead of kz's environment
    /// (plain mode only: the CLI refuses it with `blind`).
    pub clean_env: bool,
    /// Inherited variables `clean_env` keeps besides the essential ones.
    pub keep_env: Vec<String>,
    /// Blind mode: the child gets masked tokens, real values are swapped in on the wire.
    pub blind: bool,
    /// Blind mode: fail instead of falling back to explicit-proxy mode.
    pub require_kernel: bool,
    /// Blind mode: the agent's `USER[:GROUP]` (default: the user who ran sudo/pkexec, else
    /// kz's own).
    pub user: Option<String>,
    /// Blind mode: let the agent be root (inside a user namespace of its own).
    pub allow_root_agent: bool,
    /// Blind mode: the audit log (default: [`blind::audit_path`]'s).
    pub audit_log: Option<std::path::PathBuf>,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Every failed secret, one per line; the messages name secrets and references only.
    #[error("failed to resolve {} secret(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Resolve(Vec<String>),
    #[error(transparent)]
    Blind(#[from] blind::BlindError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("no command given: kz run [OPTIONS] -- COMMAND [ARGS...]")]
    NoCommand,
    #[error("waiting for the command failed: {0}")]
    Wait(std::io::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::run_client::RunClientError),
}

/// One resolved secret: the env var name, its value and where it may be used.
#[derive(Debug, Clone)]
pub struct ResolvedSecret {
    pub name: String,
    pub value: Secret,
    /// The secret's `hosts` scope (empty = the blind connection rules).
    pub hosts: Vec<String>,
    /// Where in a request, whether required, whether over cleartext (see
    /// [`crate::config::SecretEntry`]).
    pub swap: SwapRules,
    /// The resolver name from the config, for audit records.
    pub resolver: String,
}

/// A secret's swap settings besides its hosts: `credential_location`, `require`,
/// `allow_plaintext`.
#[derive(Debug, Clone, Default)]
pub struct SwapRules {
    pub places: crate::egress::location::Places,
    pub require: bool,
    pub allow_plaintext: bool,
}

/// Resolves each selected secret concurrently and reports each outcome, sorted by name; the
/// error strings are safe to print (no values). Used by `status`; [`resolve_all`] builds on it.
pub async fn resolve_each(
    config: &Config,
    only: Option<&[String]>,
) -> Result<Vec<(String, Result<Secret, String>)>, RunError> {
    let selected = config.select(only)?;
    // Resolvers are built once per name; a resolver that cannot be built fails its secrets.
    let mut resolvers: BTreeMap<&str, Result<Arc<dyn Resolver>, String>> = BTreeMap::new();
    for (_, entry) in &selected {
        resolvers.entry(entry.resolver.as_str()).or_insert_with(|| {
            config
                .build_resolvers([*entry])
                .map_err(|e| e.to_string())
                .and_then(|mut m| {
                    m.remove(&entry.resolver)
                        .ok_or_else(|| "no resolver".into())
                })
        });
    }
    let pending: Arc<Mutex<BTreeSet<String>>> = Arc::new(Mutex::new(
        selected.iter().map(|(n, _)| (*n).to_owned()).collect(),
    ));
    let lookups = selected.iter().map(|(name, entry)| {
        let resolver = resolvers.get(entry.resolver.as_str()).cloned();
        let pending = pending.clone();
        async move {
            let outcome = resolve_one(resolver, entry).await;
            if let Ok(mut p) = pending.lock() {
                p.remove(*name);
            }
            ((*name).to_owned(), outcome)
        }
    });
    let all = join_all(lookups);
    tokio::pin!(all);
    let total = selected.len();
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_AFTER, PROGRESS_AFTER);
    let mut results = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = ticks.tick() => {
                let waiting: Vec<String> = pending.lock().map(|p| p.iter().cloned().collect()).unwrap_or_default();
                eprintln!(
                    "kz: resolving secrets: {}/{total} done, waiting for {}",
                    total - waiting.len(),
                    waiting.join(", ")
                );
            }
        }
    };
    results.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(results)
}

async fn resolve_one(
    resolver: Option<Result<Arc<dyn Resolver>, String>>,
    entry: &SecretEntry,
) -> Result<Secret, String> {
    let resolver = match resolver {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(e),
        None => return Err(format!("unknown resolver '{}'", entry.resolver)),
    };
    let value = resolver
        .resolve(&entry.request())
        .await
        .map_err(|e| format!("resolution failed: {e}"))?;
    if value.is_empty() && !entry.allow_empty {
        return Err("resolved to empty value (set allow_empty = true if that is intended)".into());
    }
    Ok(value)
}

/// Resolves every selected secret, or fails listing every secret that failed.
pub async fn resolve_all(
    config: &Config,
    only: Option<&[String]>,
) -> Result<Vec<ResolvedSecret>, RunError> {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (name, outcome) in resolve_each(config, only).await? {
        match outcome {
            Ok(value) => ok.extend(resolved_secret(config, name, value)),
            Err(e) => failed.push(format!("secret '{name}': {e}")),
        }
    }
    if failed.is_empty() {
        Ok(ok)
    } else {
        Err(RunError::Resolve(failed))
    }
}

/// Secret `name` of `config` with its resolved `value`: the row [`resolve_all`] returns (also
/// for values resolved elsewhere, e.g. by the node daemon in a process of the caller's). `None`
/// for a name the config does not declare: a value without its `hosts` must not become an
/// unscoped token.
pub fn resolved_secret(config: &Config, name: String, value: Secret) -> Option<ResolvedSecret> {
    let entry = config.secrets.get(&name)?;
    Some(ResolvedSecret {
        hosts: entry.hosts.clone(),
        swap: SwapRules {
            places: entry.places.clone(),
            require: entry.require,
            allow_plaintext: entry.allow_plaintext,
        },
        resolver: entry.resolver.clone(),
        name,
        value,
    })
}

/// Mints masked tokens: `kz_masked_` + 32 lowercase hex digits from 128 random bits, never the
/// same twice within one minter (one per run).
#[derive(Debug, Default)]
pub struct TokenMinter {
    issued: HashSet<String>,
}

impl TokenMinter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn mint(&mut self) -> String {
        loop {
            let token = mint_masked_token();
            if self.issued.insert(token.clone()) {
                return token;
            }
        }
    }
}

/// One masked token from the thread-local CSPRNG (ChaCha, seeded from the OS).
pub fn mint_masked_token() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    format!("{MASKED_PREFIX}{}", hex::encode(bytes))
}

/// A resolved secret paired with its masked token: one row of blind mode's token table.
#[derive(Debug, Clone)]
pub struct MaskedSecret {
    pub name: String,
    /// `kz_masked_…`: what the child sees in its environment.
    pub token: String,
    pub value: Secret,
    /// Where the token may be swapped for the value (empty = the blind connection rules; see
    /// [`crate::config::in_scope`]).
    pub hosts: Vec<String>,
    pub swap: SwapRules,
    pub resolver: String,
}

/// Mints one fresh masked token per secret (unique within this run).
pub fn mask_all(secrets: Vec<ResolvedSecret>) -> Vec<MaskedSecret> {
    let mut minter = TokenMinter::new();
    secrets
        .into_iter()
        .map(|s| MaskedSecret {
            token: minter.mint(),
            name: s.name,
            value: s.value,
            hosts: s.hosts,
            swap: s.swap,
            resolver: s.resolver,
        })
        .collect()
}

/// True for strings of the exact masked-token shape.
pub fn is_masked_token(s: &str) -> bool {
    s.strip_prefix(MASKED_PREFIX).is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The child's environment: the inherited one, or with `clean_env` only [`ESSENTIAL_VARS`] and
/// `keep_env`; then `vars` (secrets or masked tokens) on top, winning on collision.
pub fn child_env(
    clean_env: bool,
    keep_env: &[String],
    vars: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = if clean_env {
        std::env::vars_os()
            .filter(|(k, _)| {
                k.to_str().is_some_and(|k| {
                    ESSENTIAL_VARS.contains(&k) || keep_env.iter().any(|keep| keep == k)
                })
            })
            .collect()
    } else {
        std::env::vars_os().collect()
    };
    for (k, v) in vars {
        env.insert(k.into(), v.into());
    }
    env
}

/// Spawns `cmd`, forwards signals to it and returns its exit status as kz's: the child's code,
/// or 128 + signal number when a signal killed it. 127/126 when it cannot be started.
pub async fn spawn_and_wait(
    mut cmd: tokio::process::Command,
    program: &Path,
) -> Result<ExitCode, RunError> {
    wait_forwarding(move || cmd.spawn().map(Child::Tokio), program).await
}

/// [`spawn_and_wait`] with the spawning left to `spawn` (called once the signal handlers are
/// in place).
pub(crate) async fn wait_forwarding(
    spawn: impl FnOnce() -> std::io::Result<Child>,
    program: &Path,
) -> Result<ExitCode, RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    const FORWARDED: &[(i32, nix::sys::signal::Signal)] = &[
        (libc_sig::SIGINT, nix::sys::signal::Signal::SIGINT),
        (libc_sig::SIGTERM, nix::sys::signal::Signal::SIGTERM),
        (libc_sig::SIGHUP, nix::sys::signal::Signal::SIGHUP),
        (libc_sig::SIGQUIT, nix::sys::signal::Signal::SIGQUIT),
        (libc_sig::SIGUSR1, nix::sys::signal::Signal::SIGUSR1),
        (libc_sig::SIGUSR2, nix::sys::signal::Signal::SIGUSR2),
        (libc_sig::SIGWINCH, nix::sys::signal::Signal::SIGWINCH),
    ];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut listeners = Vec::new();
    for (raw, sig) in FORWARDED {
        match signal(SignalKind::from_raw(*raw)) {
            Ok(mut stream) => {
                let tx = tx.clone();
                let sig = *sig;
                listeners.push(tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if tx.send(sig).is_err() {
                            break;
                        }
                    }
                }));
            }
            Err(e) => tracing::warn!(signal = ?sig, error = %e, "cannot forward this signal"),
        }
    }
    drop(tx);
    // Handlers are installed before the child exists: a signal that arrives as soon as the
    // child runs must be forwarded, not kill kz with the default action.
    let mut child = match spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            eprintln!("kz: error: cannot run '{}': {e}", program.display());
            return Ok(ExitCode::from(code));
        }
    };
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return Err(RunError::Wait(std::io::Error::other(
            "the child has no pid",
        )));
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(RunError::Wait)?,
            Some(sig) = rx.recv() => {
                // Ctrl-C at a terminal reaches the whole foreground process group, the child
                // included; forwarding it again would deliver it twice.
                if sig == nix::sys::signal::Signal::SIGINT && in_terminal_foreground() {
                    continue;
                }
                if let Err(e) = nix::sys::signal::kill(pid, sig) {
                    tracing::debug!(signal = ?sig, error = %e, "forwarding failed (child gone?)");
                }
            }
        }
    };
    for l in listeners {
        l.abort();
    }
    Ok(exit_code(&status))
}

/// The child's exit status as kz's exit code (128 + signal for a killed child, like shells).
pub fn exit_code(status: &std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1));
    }
    match status.signal() {
        Some(sig) => ExitCode::from(u8::try_from(128 + (sig & 0x7f)).unwrap_or(255)),
        None => ExitCode::from(1),
    }
}

/// Signal numbers for tokio's `SignalKind::from_raw` (Linux values).
mod libc_sig {
    pub const SIGHUP: i32 = 1;
    pub const SIGINT: i32 = 2;
    pub const SIGQUIT: i32 = 3;
    pub const SIGUSR1: i32 = 10;
    pub const SIGUSR2: i32 = 12;
    pub const SIGTERM: i32 = 15;
    pub const SIGWINCH: i32 = 28;
}

fn in_terminal_foreground() -> bool {
    match nix::unistd::tcgetpgrp(std::io::stdin()) {
        Ok(fg) => fg == nix::unistd::getpgrp(),
        Err(_) => false,
    }
}

/// `kz run`: resolve, then run the command plainly (real values in its environment) or, with
/// `blind`, as an agent that sees only masked tokens ([`blind::run`]).
pub async fn run(dir: Option<&Path>, opts: RunOptions) -> Result<ExitCode, RunError> {
    let Some((program, rest)) = opts.command.split_first() else {
        return Err(RunError::NoCommand);
    };
    // Blind mode: before anything is resolved, a run whose agent would be root stops here.
    let agent = if opts.blind {
        let request = crate::contain::UserRequest {
            spec: opts.user.clone(),
            allow_root: opts.allow_root_agent,
        };
        let agent = crate::contain::user::resolve(&request, |k| std::env::var(k).ok())
            .map_err(|e| blind::BlindError::Contain(e.into()))?;
        Some(agent)
    } else {
        None
    };
    // Blind mode as an ordinary user with a node daemon listening: the daemon makes the
    // sandbox and starts the agent in it (a user cannot clone into a cgroup it does not own).
    // With its socket present there is no fallback to the explicit proxy.
    let daemon = if opts.blind && !trust::is_root() {
        crate::agent::run_client::socket()
    } else {
        None
    };
    // Blind mode: load the eBPF programs while the config is read and secrets are resolved.
    let preload = (opts.blind && daemon.is_none()).then(blind::Preload::start);
    let config = Config::load(dir)?;
    crate::config::print_warnings(&config);
    // Blind mode: only the config approved for this project (or its first use) goes on.
    if let Some(agent) = &agent {
        blind::approve_config(&config, agent, opts.audit_log.as_deref())?;
    }
    if let Some(socket) = daemon {
        if opts.only.is_some() {
            return Err(crate::agent::run_client::RunClientError::Only.into());
        }
        if opts.audit_log.is_some() {
            eprintln!("kz: --audit-log is ignored: the kz agent writes its own audit log");
        }
        return Ok(crate::agent::run_client::run(&socket, &config, &opts.command).await?);
    }
    let secrets = resolve_all(&config, opts.only.as_deref()).await?;
    // Resolution is over. The variables that held a real value or a resolver's login (derived
    // from the resolvers' settings) leave kz's own environment and the block
    // /proc/<pid>/environ shows, in either mode: a process beside kz reads nothing there.
    let credential_vars = {
        let real: Vec<&str> = secrets.iter().map(|s| s.value.expose()).collect();
        crate::harden::env_vars_to_scrub(&crate::resolve::login_vars(&config), &real)
    };
    let scrub_own_environ = |secrets: &[ResolvedSecret], loud: bool| {
        let real: Vec<&str> = secrets.iter().map(|s| s.value.expose()).collect();
        match crate::harden::scrub_own_environ(&credential_vars, &real) {
            Ok(done) => tracing::debug!(
                removed = ?done.removed,
                overwritten = done.overwritten,
                "kz's own environment scrubbed"
            ),
            Err(e) if loud => tracing::warn!("{e}"),
            Err(e) => tracing::debug!("{e}"),
        }
    };
    if let Some(agent) = agent {
        scrub_own_environ(&secrets, true);
        let audit_path = blind::audit_path(opts.audit_log.as_deref());
        let audit = blind::open_audit(&audit_path)?;
        // KeyZero's rule: --clean-env does not combine with --blind (the CLI enforces it).
        let mut cmd = std::process::Command::new(program);
        cmd.args(rest);
        let request = blind::BlindRequest {
            secrets: mask_all(secrets),
            config: config.blind.clone(),
            command: cmd,
            require_kernel: opts.require_kernel,
            agent,
            audit_path: Some(audit_path),
            hide_extra: crate::contain::resolver_files(&config),
            audit,
            preload,
            credential_vars,
        };
        return Ok(blind::run(request).await?);
    }
    // Without --blind the child gets KeyZero's environment (inherited variables included),
    // copied before kz scrubs its own.
    let env = child_env(
        opts.clean_env,
        &opts.keep_env,
        secrets
            .iter()
            .map(|s| (s.name.clone(), s.value.expose().to_owned())),
    );
    scrub_own_environ(&secrets, false);
    drop(secrets);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest).env_clear().envs(&env);
    spawn_and_wait(cmd, Path::new(program)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_tokens_have_the_documented_shape_and_are_unique() {
        let mut minter = TokenMinter::new();
        let tokens: HashSet<String> = (0..1000).map(|_| minter.mint()).collect();
        assert_eq!(tokens.len(), 1000);
        for t in &tokens {
            assert!(is_masked_token(t), "{t}");
            assert_eq!(t.len(), MASKED_PREFIX.len() + 32);
        }
        assert!(!is_masked_token(
            "kz_masked_ABCDEF0123456789abcdef0123456789"
        ));
        assert!(!is_masked_token("kz_masked_abc"));
    }

    #[test]
    fn mask_all_pairs_each_secret_with_its_own_token() {
        let secrets: Vec<ResolvedSecret> = (0..3)
            .map(|i| ResolvedSecret {
                name: format!("S{i}"),
                value: Secret::new(format!("value-{i}")),
                hosts: vec![format!("h{i}.example.com")],
                swap: SwapRules::default(),
                resolver: "env".into(),
            })
            .collect();
        let masked = mask_all(secrets);
        let tokens: HashSet<&str> = masked.iter().map(|m| m.token.as_str()).collect();
        assert_eq!(tokens.len(), 3);
        for (i, m) in masked.iter().enumerate() {
            assert!(is_masked_token(&m.token));
            assert_eq!(m.value.expose(), format!("value-{i}"));
            assert_eq!(m.hosts, vec![format!("h{i}.example.com")]);
        }
        // The child env built from the masked rows carries tokens, never values.
        let env = child_env(
            false,
            &[],
            masked.iter().map(|m| (m.name.clone(), m.token.clone())),
        );
        let dump = format!("{env:?}");
        assert!(!dump.contains("value-0") && dump.contains(&masked[0].token));
    }

    #[test]
    fn clean_env_keeps_only_essentials_and_secrets_win() {
        // Two inherited non-essential variables (test runners always set several).
        let others: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| !ESSENTIAL_VARS.contains(&k.as_str()))
            .take(2)
            .collect();
        assert_eq!(others.len(), 2, "test needs two inherited variables");
        let env = child_env(
            true,
            &[others[0].clone()],
            [
                ("PATH".to_owned(), "override".to_owned()),
                ("S".to_owned(), "v".to_owned()),
            ],
        );
        assert_eq!(
            env.get(&OsString::from("PATH")),
            Some(&OsString::from("override"))
        );
        assert_eq!(env.get(&OsString::from("S")), Some(&OsString::from("v")));
        assert!(env.contains_key(&OsString::from(&others[0])));
        assert!(!env.contains_key(&OsString::from(&others[1])));
        let full = child_env(false, &[], []);
        assert!(full.contains_key(&OsString::from(&others[1])));
    }
}
