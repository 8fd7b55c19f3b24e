//! A sandbox's secrets, from the caller's project directory: its `.keyzero.toml` is loaded and
//! resolved as `kz run --blind` does it ([`crate::config::Config::load`],
//! [`crate::run::resolve_all`], [`crate::run::mask_all`]), with whose privileges depending on
//! who asks.
//!
//! - A root caller's secrets are resolved in the daemon (its environment, its files, its
//!   resolver logins), exactly as a root `kz run --blind` resolves them.
//! - Anyone else's are resolved by a `kz export --format json` the daemon starts as the
//!   caller's uid and gid (no supplementary groups, an environment of PATH, HOME, USER and
//!   LOGNAME only): the daemon never reads a file or a login for a user who could not read it
//!   themselves, so a sandbox cannot be used to carry root's secrets to a host the user picks.
//!   The values come back over a pipe and go straight into the token table.
//!
//! Before anything is resolved, the project's config passes `kz run --blind`'s approval gate
//! ([`crate::config::approval::gate`]) **with the caller's approvals**: the gate protects a user
//! from its own agent rewriting `.keyzero.toml` (scopes, `[blind]`, resolvers), and the user
//! approves with its own `kz allow`, which writes the user's store. So a user's gate runs in
//! the same `kz export` as the user (`--approval-gate`), against the store that user's
//! `kz allow` writes (`KZ_STATE_DIR` = the request's `state_dir`, else
//! `~/.local/state/kz/approved` of its passwd home); root's runs in the daemon against root's
//! (the request's `state_dir`, else the daemon's `KZ_STATE_DIR`, else `/var/lib/kz/approved`).
//! Root's approvals never count for a user's project, nor a user's for root's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::approval::{self, EXIT_NOT_APPROVED, Gate, Store};
use crate::config::{Config, ConfigError};
use crate::run::{self, MaskedSecret, RunError};
use crate::secret::Secret;

/// A caller's resolution may take this long (slow backends, the resolvers' own retries).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("project_dir must be an absolute path, got {0}")]
    Relative(PathBuf),
    #[error("state_dir must be an absolute path, got {0}")]
    RelativeStateDir(PathBuf),
    /// The approval gate refused (`reason` as [`approval::ApprovalError::reason`]); the
    /// message has the diff and the `kz allow` command.
    #[error("{message}")]
    Approval { reason: String, message: String },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Resolve(#[from] RunError),
    #[error(
        "the project's config has no secrets; add one to {0}/.keyzero.toml with `kz add` (a sandbox without secrets needs no kz)"
    )]
    NoSecrets(PathBuf),
    #[error(
        "[blind] upstream_ca is set per node on the daemon (`kz agent run --upstream-ca FILE`), not per project; remove it from {0}"
    )]
    UpstreamCa(PathBuf),
    #[error("cannot start the resolution as uid {uid}: {source}")]
    Spawn { uid: u32, source: std::io::Error },
    #[error("resolving the secrets as uid {uid} failed:\n{stderr}")]
    AsCaller { uid: u32, stderr: String },
    #[error("resolving the secrets as uid {uid} took longer than {secs} s; check the resolvers")]
    Timeout { uid: u32, secs: u64 },
    #[error("the resolution as uid {uid} answered something that is not kz export's JSON")]
    BadOutput { uid: u32 },
}

/// A project's config and its resolved secrets, each with a fresh masked token.
pub struct Project {
    pub config: Config,
    pub secrets: Vec<MaskedSecret>,
    /// Where the approval gate recorded a first use (`None`: approved before).
    pub first_use: Option<PathBuf>,
}

/// Loads `dir`'s config, passes it through the approval gate with the caller's approvals
/// (kept under `state_dir` when given) and resolves its secrets with the privileges of
/// `uid`/`gid` (see the module documentation).
pub async fn load(
    dir: &Path,
    uid: u32,
    gid: u32,
    state_dir: Option<&Path>,
) -> Result<Project, SecretsError> {
    if !dir.is_absolute() {
        return Err(SecretsError::Relative(dir.to_owned()));
    }
    if let Some(s) = state_dir.filter(|s| !s.is_absolute()) {
        return Err(SecretsError::RelativeStateDir(s.to_owned()));
    }
    let resolved = if uid == 0 {
        let config = Config::load(Some(dir))?;
        let first_use = gate_as_root(&config, state_dir)?;
        let secrets = run::resolve_all(&config, None).await?;
        (config, secrets, first_use)
    } else {
        // The caller's process gates and resolves first: it also proves the caller can read
        // the config.
        let (values, first_use) = resolve_as(dir, uid, gid, state_dir).await?;
        let config = Config::load(Some(dir))?;
        let secrets = values
            .into_iter()
            .filter_map(|(name, value)| run::resolved_secret(&config, name, value))
            .collect();
        (config, secrets, first_use)
    };
    let (config, secrets, first_use) = resolved;
    if secrets.is_empty() {
        return Err(SecretsError::NoSecrets(config.dir.clone()));
    }
    if config.blind.upstream_ca.is_some() {
        return Err(SecretsError::UpstreamCa(config.dir.join(config.file_name)));
    }
    Ok(Project {
        secrets: run::mask_all(secrets),
        config,
        first_use,
    })
}

/// The approval gate of a root caller's project, in the daemon, with root's approvals.
fn gate_as_root(
    config: &Config,
    state_dir: Option<&Path>,
) -> Result<Option<PathBuf>, SecretsError> {
    let env = crate::config::process_env;
    let store = match state_dir {
        Some(d) => Store::open_at(d.join("approved")),
        None => Store::open(&env),
    };
    // The agent is placed by root in the sandbox's cgroup: no other user's writes to weigh.
    match store.and_then(|store| approval::gate(config, &store, None, &env)) {
        Ok(Gate::Approved) => Ok(None),
        Ok(Gate::FirstUse { record }) => Ok(Some(record)),
        Err(e) => Err(SecretsError::Approval {
            reason: e.reason().to_owned(),
            message: e.to_string(),
        }),
    }
}

/// What the gate answered in `kz export --approval-gate`'s JSON.
type Resolved = (Vec<(String, Secret)>, Option<PathBuf>);

/// `kz --dir DIR export --format json --approval-gate` as `uid`:`gid`; the secrets it printed
/// and where it recorded a first use.
async fn resolve_as(
    dir: &Path,
    uid: u32,
    gid: u32,
    state_dir: Option<&Path>,
) -> Result<Resolved, SecretsError> {
    let exe = std::env::current_exe().map_err(|source| SecretsError::Spawn { uid, source })?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--dir")
        .arg(dir)
        .args(["export", "--format", "json", "--approval-gate"])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        // std drops the supplementary groups when root sets a uid (setgroups(0)).
        .uid(uid)
        .gid(gid);
    if let Some(u) = &user {
        cmd.env("HOME", &u.dir)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    if let Some(d) = state_dir {
        cmd.env(approval::STATE_DIR_VAR, d);
    }
    let child = cmd
        .spawn()
        .map_err(|source| SecretsError::Spawn { uid, source })?;
    let out = tokio::time::timeout(RESOLVE_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| SecretsError::Timeout {
            uid,
            secs: RESOLVE_TIMEOUT.as_secs(),
        })?
        .map_err(|source| SecretsError::Spawn { uid, source })?;
    // The output holds real values: zeroed when dropped, whatever happens below.
    let stdout = zeroize::Zeroizing::new(out.stdout);
    if out.status.code() == Some(i32::from(EXIT_NOT_APPROVED)) {
        return Err(parse_refusal(&stdout).ok_or(SecretsError::BadOutput { uid })?);
    }
    if !out.status.success() {
        // kz's own messages name secrets and references, never values.
        let stderr = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with("warning: writing secrets to a non-terminal"))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(SecretsError::AsCaller { uid, stderr });
    }
    parse_export(&stdout).ok_or(SecretsError::BadOutput { uid })
}

/// The `secrets` object of `kz export --format json --approval-gate`, and the first use's
/// record if the gate made one.
fn parse_export(stdout: &[u8]) -> Option<Resolved> {
    let doc: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let map = doc.get("secrets")?.as_object()?;
    let values = map
        .iter()
        .map(|(k, v)| Some((k.clone(), Secret::new(v.as_str()?))))
        .collect::<Option<Vec<_>>>()?;
    let first_use = match doc.get("approval")? {
        serde_json::Value::String(s) if s == "approved" => None,
        other => Some(PathBuf::from(other.get("first_use")?.as_str()?)),
    };
    Some((values, first_use))
}

/// The gate's refusal as `kz export --approval-gate` printed it.
fn parse_refusal(stdout: &[u8]) -> Option<SecretsError> {
    let doc: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let r = doc.get("refused")?;
    Some(SecretsError::Approval {
        reason: r.get("reason")?.as_str()?.to_owned(),
        message: r.get("message")?.as_str()?.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_json_is_parsed_and_anything_else_refused() {
        let (got, first) = parse_export(
            br#"{"environment":"dev","secrets":{"A":"x","B":"y"},"approval":"approved"}"#,
        )
        .unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["A", "B"]);
        assert_eq!(got[1].1.expose(), "y");
        assert_eq!(first, None);
        let (_, first) = parse_export(
            br#"{"secrets":{"A":"x"},"approval":{"first_use":"/home/u/.local/state/kz/approved/r"}}"#,
        )
        .unwrap();
        assert!(first.is_some());
        // Without the gate's answer the output is not the gated export's: refused.
        assert!(parse_export(br#"{"secrets":{"A":"x"}}"#).is_none());
        assert!(parse_export(b"export A='x'").is_none());
        assert!(parse_export(br#"{"secrets":{"A":1},"approval":"approved"}"#).is_none());
        assert!(parse_export(br#"{"secrets":[],"approval":"approved"}"#).is_none());
        let refused =
            parse_refusal(br#"{"refused":{"reason":"config_changed","message":"diff"}}"#).unwrap();
        assert!(
            matches!(refused, SecretsError::Approval { reason, .. } if reason == "config_changed")
        );
    }
}
