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

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::run::{self, MaskedSecret, RunError};
use crate::secret::Secret;

/// A caller's resolution may take this long (slow backends, the resolvers' own retries).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("project_dir must be an absolute path, got {0}")]
    Relative(PathBuf),
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
}

/// Loads `dir`'s config and resolves its secrets with the privileges of `uid`/`gid` (see the
/// module documentation).
pub async fn load(dir: &Path, uid: u32, gid: u32) -> Result<Project, SecretsError> {
    if !dir.is_absolute() {
        return Err(SecretsError::Relative(dir.to_owned()));
    }
    let resolved = if uid == 0 {
        let config = Config::load(Some(dir))?;
        let secrets = run::resolve_all(&config, None).await?;
        (config, secrets)
    } else {
        // The caller's process resolves first: it also proves the caller can read the config.
        let values = resolve_as(dir, uid, gid).await?;
        let config = Config::load(Some(dir))?;
        let secrets = values
            .into_iter()
            .filter_map(|(name, value)| run::resolved_secret(&config, name, value))
            .collect();
        (config, secrets)
    };
    let (config, secrets) = resolved;
    if secrets.is_empty() {
        return Err(SecretsError::NoSecrets(config.dir.clone()));
    }
    if config.blind.upstream_ca.is_some() {
        return Err(SecretsError::UpstreamCa(config.dir.join(config.file_name)));
    }
    Ok(Project {
        secrets: run::mask_all(secrets),
        config,
    })
}

/// `kz --dir DIR export --format json` as `uid`:`gid`; the secrets it printed.
async fn resolve_as(dir: &Path, uid: u32, gid: u32) -> Result<Vec<(String, Secret)>, SecretsError> {
    let exe = std::env::current_exe().map_err(|source| SecretsError::Spawn { uid, source })?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--dir")
        .arg(dir)
        .args(["export", "--format", "json"])
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

/// The `secrets` object of `kz export --format json`.
fn parse_export(stdout: &[u8]) -> Option<Vec<(String, Secret)>> {
    let doc: serde_json::Value = serde_json::from_slice(stdout).ok()?;
    let map = doc.get("secrets")?.as_object()?;
    map.iter()
        .map(|(k, v)| Some((k.clone(), Secret::new(v.as_str()?))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_json_is_parsed_and_anything_else_refused() {
        let got = parse_export(br#"{"environment":"dev","secrets":{"A":"x","B":"y"}}"#).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["A", "B"]);
        assert_eq!(got[1].1.expose(), "y");
        assert!(parse_export(b"export A='x'").is_none());
        assert!(parse_export(br#"{"secrets":{"A":1}}"#).is_none());
        assert!(parse_export(br#"{"secrets":[]}"#).is_none());
    }
}
