//! Approval of the config a blind run trusts (direnv's `allow`, adapted so `.keyzero.toml`
//! needs no edits).
//!
//! The agent runs in its project directory and can often write `.keyzero.toml` and
//! `.keyzero.local.toml`: without this, the next `kz run --blind` would swap real values toward
//! whatever hosts the agent wrote there. So kz remembers, per project directory and environment,
//! the *security-relevant view* of the config it last ran with ([`View`]: per-secret resolver,
//! ref, field, request parameters and `hosts`; `[blind]` in full with the `upstream_ca` file's
//! SHA-256; every resolver's type and settings with the SHA-256 of a `ca_cert` file), in a
//! directory the agent cannot write ([`Store`]). A blind run whose view differs stops before any
//! secret is resolved, prints the difference and the `kz allow` command that approves it
//! ([`gate`]). The first run of a project is trusted on first use, except when a source of the
//! view is writable by the agent's user while kz runs the agent as another user: then only an
//! approval that matches lets it run ([`Writable`]).
//!
//! Not in the view: comments, formatting, key order, `description`, `allow_empty`, and secret
//! values (the config holds references; credential *settings* of resolvers, such as a Vault
//! `token`, appear only as an HMAC under a key kept in the store, so a change shows without the
//! value being written anywhere).
//!
//! Every field of [`SecretEntry`] and [`BlindConfig`] is destructured without `..` below: a new
//! config key does not compile until someone decides whether it belongs in the view.
//!
//! Where the store is: `$KZ_STATE_DIR/approved`, else (root) `/var/lib/kz/approved`, else
//! `$XDG_STATE_HOME/kz/approved` or `~/.local/state/kz/approved`. Whatever directory that
//! names must be owned by kz's effective user and writable by nobody else, and so must each
//! record: `KZ_STATE_DIR` comes from kz's own environment, which an agent (a descendant of kz)
//! cannot set for a run, and `sudo` drops it by default; if it were set anyway it could only
//! point kz at another directory the agent cannot write.

use super::{BlindConfig, Config, ConnectionRule, HostPattern, SecretEntry};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// kz's exit code when a blind run stops because its config is not approved (sysexits'
/// `EX_NOPERM`; kz's other errors exit 2, and a child's own code is passed through).
pub const EXIT_NOT_APPROVED: u8 = 77;
/// Overrides kz's state directory (approvals live in its `approved/` subdirectory).
pub const STATE_DIR_VAR: &str = "KZ_STATE_DIR";
/// Resolver settings that hold a credential, at any depth: only their HMAC enters the view.
const CREDENTIAL_SETTINGS: &[&str] = &[
    "token",
    "secret_id",
    "secret_access_key",
    "session_token",
    "password",
    "client_secret",
    "private_key",
];
/// Resolver settings naming a CA file whose content kz trusts.
const CA_FILE_SETTINGS: &[&str] = &["ca_cert"];
const RECORD_VERSION: u32 = 1;
const KEY_FILE: &str = ".credential-key";

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error(
        "{}: the security-relevant config changed since it was last approved (environment {environment}):\n{diff}\nkz stopped before resolving any secret or starting the command. If you made these changes, approve them with:\n  {hint}",
        project.display()
    )]
    Changed {
        project: PathBuf,
        environment: String,
        diff: String,
        hint: String,
    },
    #[error(
        "{}: the agent's user (uid {agent_uid}) can write what this config is read from, so kz does not trust it as the source of [blind] and secret scopes until you approve it:\n{files}\nCheck the config, then approve it with:\n  {hint}\n(or make these files and their directory owned by you and not writable by the agent)",
        project.display()
    )]
    AgentWritable {
        project: PathBuf,
        agent_uid: u32,
        files: String,
        hint: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the approvals store {} {why}; it must be a directory owned by uid {uid} that nobody else can write (remove it and let kz create it, or set {STATE_DIR_VAR} to such a directory)",
        path.display()
    )]
    UnsafeStore {
        path: PathBuf,
        why: String,
        uid: u32,
    },
    #[error(
        "approval record {} is unusable ({why}); remove it, then approve the config again with `kz allow`",
        path.display()
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "no place for kz's approvals: set {STATE_DIR_VAR}, XDG_STATE_HOME or HOME to a directory only you can write"
    )]
    NoStateDir,
}

impl ApprovalError {
    /// The `reason` of the audit record of a refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            ApprovalError::Changed { .. } => "config_changed",
            ApprovalError::AgentWritable { .. } => "config_agent_writable",
            ApprovalError::Read { .. } => "config_unreadable",
            ApprovalError::Write { .. } | ApprovalError::NoStateDir => "store_unwritable",
            ApprovalError::UnsafeStore { .. } => "store_unsafe",
            ApprovalError::Corrupt { .. } => "record_corrupt",
        }
    }
}

/// The security-relevant view of a config: key → values (JSON-encoded). Set-like settings
/// (`hosts`, `hide`, `unix_sockets`) are one key with several values, so their order does not
/// count; ordered ones (`connections`: first match wins) are keyed by position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View(BTreeMap<String, BTreeSet<String>>);

impl View {
    /// The view of `config`; `credential` turns a credential setting into its fingerprint.
    pub fn of(config: &Config, credential: &dyn Fn(&str) -> String) -> Result<View, ApprovalError> {
        let mut v = View::default();
        for (name, entry) in &config.secrets {
            v.secret(name, entry);
        }
        for (name, r) in &config.resolvers {
            let key = format!("resolvers.{name}");
            if let Some(kind) = &r.kind {
                v.put(&format!("{key}.type"), json(kind));
            }
            for (k, value) in &r.settings {
                v.setting(&format!("{key}.{k}"), k, value, credential)?;
            }
        }
        v.blind(&config.blind)?;
        Ok(v)
    }

    fn put(&mut self, key: &str, value: String) {
        self.0.entry(key.to_owned()).or_default().insert(value);
    }

    fn secret(&mut self, name: &str, entry: &SecretEntry) {
        let SecretEntry {
            resolver,
            reference,
            field,
            allow_empty: _,
            hosts,
            places,
            require,
            allow_plaintext,
            params,
            location: _,
        } = entry;
        let key = format!("secrets.{name}");
        self.put(&format!("{key}.resolver"), json(resolver));
        self.put(&format!("{key}.ref"), json(reference));
        if let Some(f) = field {
            self.put(&format!("{key}.field"), json(f));
        }
        for (k, p) in params {
            self.put(&format!("{key}.{k}"), json(p));
        }
        if hosts.is_empty() {
            // No `hosts` means "any host the connection rules allow": a scope of its own.
            self.put(&format!("{key}.hosts"), "(any allowed host)".to_owned());
        }
        for h in hosts {
            self.put(&format!("{key}.hosts"), json(h));
        }
        // Where the real value may be written, whether it must be there, whether cleartext may
        // carry it: widening any of them is widening the scope.
        for p in places.to_string().split(", ") {
            self.put(&format!("{key}.credential_location"), json(p));
        }
        self.put(&format!("{key}.require"), require.to_string());
        self.put(
            &format!("{key}.allow_plaintext"),
            allow_plaintext.to_string(),
        );
    }

    fn setting(
        &mut self,
        key: &str,
        name: &str,
        value: &Value,
        credential: &dyn Fn(&str) -> String,
    ) -> Result<(), ApprovalError> {
        match value {
            Value::Object(m) => {
                for (k, v) in m {
                    self.setting(&format!("{key}.{k}"), k, v, credential)?;
                }
            }
            Value::String(s) if CREDENTIAL_SETTINGS.contains(&name) => {
                self.put(key, format!("(credential, hmac {})", credential(s)));
            }
            Value::String(s) if CA_FILE_SETTINGS.contains(&name) && !s.is_empty() => {
                self.put(key, json(s));
                self.put(&format!("{key}.sha256"), json(&file_sha256(Path::new(s))?));
            }
            other => self.put(key, canonical(other)),
        }
        Ok(())
    }

    fn blind(&mut self, b: &BlindConfig) -> Result<(), ApprovalError> {
        let BlindConfig {
            connections,
            ipv6,
            udp,
            non_http_tcp,
            refuse_on_scope_violation,
            upstream_ca,
            resolver,
            hide,
            listen,
            unix_sockets,
            max_allowed_ips,
        } = b;
        for (i, ConnectionRule { allow, pattern }) in connections.iter().enumerate() {
            let (kind, text) = match pattern {
                HostPattern::Host(h) => ("host", h.clone()),
                HostPattern::Regex(re) => ("regex", re.as_str().to_owned()),
                HostPattern::Cidr(net) => ("cidr", net.to_string()),
            };
            self.put(
                &format!("blind.connections[{i}]"),
                format!("{{allow = {allow}, {kind} = {}}}", json(&text)),
            );
        }
        self.put("blind.ipv6", ipv6.to_string());
        self.put("blind.max_allowed_ips", format!("{max_allowed_ips:?}"));
        self.put("blind.udp", udp.to_string());
        self.put("blind.non_http_tcp", non_http_tcp.to_string());
        self.put(
            "blind.refuse_on_scope_violation",
            refuse_on_scope_violation.to_string(),
        );
        if let Some(ca) = upstream_ca {
            self.put("blind.upstream_ca", json(&ca.display().to_string()));
            self.put("blind.upstream_ca.sha256", json(&file_sha256(ca)?));
        }
        if let Some(r) = resolver {
            self.put("blind.resolver", json(&r.to_string()));
        }
        match hide {
            None => self.put("blind.hide", "(default list)".to_owned()),
            Some(paths) if paths.is_empty() => self.put("blind.hide", "(none)".to_owned()),
            Some(paths) => {
                for p in paths {
                    self.put("blind.hide", json(p));
                }
            }
        }
        let listen = match listen {
            crate::intercept::Listen::Loopback => "loopback",
            crate::intercept::Listen::Any => "any",
        };
        self.put("blind.listen", json(listen));
        match unix_sockets {
            None => self.put("blind.unix_sockets", "(default list)".to_owned()),
            Some(rules) if rules.is_empty() => {
                self.put("blind.unix_sockets", "(none)".to_owned());
            }
            Some(rules) => {
                for r in rules {
                    self.put("blind.unix_sockets", json(&r.to_string()));
                }
            }
        }
        Ok(())
    }

    /// SHA-256 (hex) of the view's canonical form: what a record approves.
    pub fn digest(&self) -> String {
        let text = serde_json::to_string(&self.0).unwrap_or_default();
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    /// Every `key: value` line, for the first approval of a project.
    pub fn lines(&self) -> Vec<Change> {
        View::default().diff(self)
    }

    /// What changed from `self` to `new`: one line per added or removed value; a key with one
    /// value on both sides is one "changed" line.
    pub fn diff(&self, new: &View) -> Vec<Change> {
        let empty = BTreeSet::new();
        let keys: BTreeSet<&String> = self.0.keys().chain(new.0.keys()).collect();
        let mut out = Vec::new();
        for key in keys {
            let old = self.0.get(key).unwrap_or(&empty);
            let cur = new.0.get(key).unwrap_or(&empty);
            if old == cur {
                continue;
            }
            if let ([o], [n]) = (
                old.iter().collect::<Vec<_>>().as_slice(),
                cur.iter().collect::<Vec<_>>().as_slice(),
            ) {
                out.push(Change::Changed(key.clone(), (*o).clone(), (*n).clone()));
                continue;
            }
            for o in old.difference(cur) {
                out.push(Change::Removed(key.clone(), o.clone()));
            }
            for n in cur.difference(old) {
                out.push(Change::Added(key.clone(), n.clone()));
            }
        }
        out
    }
}

/// One line of a diff between two views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(String, String),
    Removed(String, String),
    Changed(String, String, String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added(k, v) => write!(f, "+ {k}: {v}"),
            Change::Removed(k, v) => write!(f, "- {k}: {v}"),
            Change::Changed(k, o, n) => write!(f, "~ {k}: {o} -> {n}"),
        }
    }
}

/// The lines of a diff, indented, for messages.
pub fn render(changes: &[Change]) -> String {
    changes
        .iter()
        .map(|c| format!("  {c}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn json(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// JSON with object keys sorted at every depth (whatever map order serde_json was built with).
fn canonical(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

fn file_sha256(path: &Path) -> Result<String, ApprovalError> {
    let bytes = std::fs::read(path).map_err(|source| ApprovalError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// One approval: the digest and the view it was computed from (shown as a diff later).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Approved {
    digest: String,
    view: View,
    /// Seconds since the Unix epoch.
    approved_at: u64,
    /// `first use` or `kz allow`.
    how: String,
}

/// A project's record: its canonical directory and one approval per environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    version: u32,
    project: PathBuf,
    environments: BTreeMap<String, Approved>,
}

/// The approvals directory, checked: owned by kz's effective user, writable by nobody else.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    key: [u8; 32],
}

impl Store {
    /// The store [`Store::path`] names, created (0700) if missing.
    pub fn open(env: super::EnvLookup<'_>) -> Result<Store, ApprovalError> {
        Store::open_at(Store::path(env)?)
    }

    /// Where approvals live (see the module docs).
    pub fn path(env: super::EnvLookup<'_>) -> Result<PathBuf, ApprovalError> {
        let nonempty = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let state = if let Some(d) = nonempty(STATE_DIR_VAR) {
            d
        } else if nix::unistd::geteuid().is_root() {
            PathBuf::from("/var/lib/kz")
        } else if let Some(d) = nonempty("XDG_STATE_HOME") {
            d.join("kz")
        } else if let Some(h) = nonempty("HOME") {
            h.join(".local/state/kz")
        } else {
            return Err(ApprovalError::NoStateDir);
        };
        Ok(state.join("approved"))
    }

    pub fn open_at(dir: PathBuf) -> Result<Store, ApprovalError> {
        let write_err = |source| ApprovalError::Write {
            path: dir.clone(),
            source,
        };
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(write_err)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(write_err)?;
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(|source| ApprovalError::Read {
            path: dir.clone(),
            source,
        })?;
        let uid = nix::unistd::geteuid().as_raw();
        let why = if !meta.is_dir() {
            Some("is not a directory (or is a symbolic link)".to_owned())
        } else {
            unsafe_why(&meta, uid)
        };
        if let Some(why) = why {
            return Err(ApprovalError::UnsafeStore {
                path: dir,
                why,
                uid,
            });
        }
        let key = load_key(&dir.join(KEY_FILE))?;
        Ok(Store { dir, key })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The credential fingerprint: HMAC-SHA-256 under the store's key, 16 hex digits.
    fn fingerprint(&self, value: &str) -> String {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.key) {
            Ok(m) => m,
            // HMAC takes keys of any length; this arm is never taken.
            Err(_) => return "unavailable".to_owned(),
        };
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..8])
    }

    /// The view of `config` with this store's credential fingerprints.
    pub fn view(&self, config: &Config) -> Result<View, ApprovalError> {
        View::of(config, &|v| self.fingerprint(v))
    }

    /// The record file of a project (its canonical directory).
    pub fn record_path(&self, project: &Path) -> PathBuf {
        let h = Sha256::digest(project.as_os_str().as_encoded_bytes());
        self.dir.join(format!("{}.json", &hex::encode(h)[..32]))
    }

    fn load(&self, project: &Path) -> Result<Option<Record>, ApprovalError> {
        let path = self.record_path(project);
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ApprovalError::Read { path, source }),
        };
        let meta = file.metadata().map_err(|source| ApprovalError::Read {
            path: path.clone(),
            source,
        })?;
        if let Some(why) = unsafe_why(&meta, nix::unistd::geteuid().as_raw()) {
            return Err(ApprovalError::Corrupt { path, why });
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|source| ApprovalError::Read {
                path: path.clone(),
                source,
            })?;
        let record: Record = serde_json::from_str(&text).map_err(|e| ApprovalError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if record.version != RECORD_VERSION || record.project != project {
            return Err(ApprovalError::Corrupt {
                path,
                why: format!(
                    "version {} for {}, expected version {RECORD_VERSION} for {}",
                    record.version,
                    record.project.display(),
                    project.display()
                ),
            });
        }
        if let Some((env, _)) = record
            .environments
            .iter()
            .find(|(_, a)| a.digest != a.view.digest())
        {
            return Err(ApprovalError::Corrupt {
                path,
                why: format!("the digest of environment {env} does not match its view"),
            });
        }
        Ok(Some(record))
    }

    /// Writes the record whole (temporary file, then rename): a reader sees the old or the new.
    fn save(&self, record: &Record) -> Result<PathBuf, ApprovalError> {
        let path = self.record_path(&record.project);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let err = |source| ApprovalError::Write {
            path: path.clone(),
            source,
        };
        let text =
            serde_json::to_string_pretty(record).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err)?;
        let written = f
            .write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        Ok(path)
    }

    /// Forgets a project's approvals (every environment). False when there were none.
    pub fn forget(&self, project: &Path) -> Result<bool, ApprovalError> {
        let path = self.record_path(project);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ApprovalError::Write { path, source }),
        }
    }
}

/// Why a store directory or record is unsafe, if it is.
fn unsafe_why(meta: &std::fs::Metadata, uid: u32) -> Option<String> {
    if meta.uid() != uid {
        return Some(format!("is owned by uid {}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "is writable by its group or others (mode {:04o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// The store's HMAC key, made on first use (32 random bytes, 0600).
fn load_key(path: &Path) -> Result<[u8; 32], ApprovalError> {
    let read = || -> Result<Option<[u8; 32]>, ApprovalError> {
        let mut f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ApprovalError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let meta = f.metadata().map_err(|source| ApprovalError::Read {
            path: path.to_owned(),
            source,
        })?;
        if let Some(why) = unsafe_why(&meta, nix::unistd::geteuid().as_raw()) {
            return Err(ApprovalError::Corrupt {
                path: path.to_owned(),
                why,
            });
        }
        let mut key = [0u8; 32];
        f.read_exact(&mut key).map_err(|e| ApprovalError::Corrupt {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        Ok(Some(key))
    };
    if let Some(k) = read()? {
        return Ok(k);
    }
    let key: [u8; 32] = rand::random();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(|source| ApprovalError::Write {
                    path: path.to_owned(),
                    source,
                })?;
            Ok(key)
        }
        // Another kz made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read()?.ok_or_else(|| ApprovalError::Corrupt {
                path: path.to_owned(),
                why: "it vanished while kz read it".to_owned(),
            })
        }
        Err(source) => Err(ApprovalError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The agent's identity, when kz runs it as another user than itself.
#[derive(Debug, Clone)]
pub struct AgentIds {
    pub uid: u32,
    /// Its primary and supplementary groups.
    pub gids: Vec<u32>,
}

/// A source of the view the agent's user can write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    pub path: PathBuf,
    pub owner: u32,
    pub mode: u32,
    pub why: &'static str,
}

impl fmt::Display for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.owner))
            .ok()
            .flatten()
            .map(|u| format!(" ({})", u.name))
            .unwrap_or_default();
        write!(
            f,
            "  {}: owner uid {}{name}, mode {:04o}: {}",
            self.path.display(),
            self.owner,
            self.mode & 0o7777,
            self.why
        )
    }
}

/// Whether `agent` can write `meta`'s file (ACLs are not read).
fn writable_by(meta: &std::fs::Metadata, agent: &AgentIds) -> Option<&'static str> {
    if meta.uid() == agent.uid {
        Some("owned by the agent's user")
    } else if meta.mode() & 0o002 != 0 {
        Some("writable by every user")
    } else if meta.mode() & 0o020 != 0 && agent.gids.contains(&meta.gid()) {
        Some("writable by a group of the agent's user")
    } else {
        None
    }
}

/// The files the view comes from (the project's config files, the global config, CA files) and
/// the directories holding them: a writable directory lets the agent replace a file or create
/// `.keyzero.local.toml`.
pub fn sources(config: &Config, env: super::EnvLookup<'_>) -> Vec<PathBuf> {
    let mut files = vec![
        config.dir.join(super::LOCAL_CONFIG_FILENAME),
        config.dir.join(super::CONFIG_FILENAME),
    ];
    files.extend(super::global_config_path(env));
    files.extend(config.blind.upstream_ca.clone());
    for r in config.resolvers.values() {
        for key in CA_FILE_SETTINGS {
            if let Some(Value::String(p)) = r.settings.get(*key)
                && !p.is_empty()
            {
                files.push(PathBuf::from(p));
            }
        }
    }
    let mut out = BTreeSet::new();
    out.insert(canonical_path(&config.dir));
    for f in files.into_iter().filter(|f| f.exists()) {
        let f = canonical_path(&f);
        if let Some(parent) = f.parent() {
            out.insert(parent.to_owned());
        }
        out.insert(f);
    }
    out.into_iter().collect()
}

fn canonical_path(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

/// The sources `agent` can write.
pub fn agent_writable(paths: &[PathBuf], agent: &AgentIds) -> Vec<Writable> {
    paths
        .iter()
        .filter_map(|p| {
            let meta = std::fs::metadata(p).ok()?;
            writable_by(&meta, agent).map(|why| Writable {
                path: p.clone(),
                owner: meta.uid(),
                mode: meta.mode(),
                why,
            })
        })
        .collect()
}

/// What [`gate`] decided to let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The view matches the project's approval.
    Approved,
    /// The project had no record: trusted on first use and recorded here.
    FirstUse { record: PathBuf },
}

/// The project's state against the store: its canonical directory, the current view and the
/// approved one for this environment.
pub struct Status {
    pub project: PathBuf,
    pub environment: String,
    pub view: View,
    /// The approved view of this environment (None: never approved).
    pub approved: Option<View>,
    /// Whether the project has a record at all (any environment).
    pub known: bool,
    record: Option<Record>,
}

impl Status {
    pub fn of(config: &Config, store: &Store) -> Result<Status, ApprovalError> {
        let project = canonical_path(&config.dir);
        let record = store.load(&project)?;
        let approved = record
            .as_ref()
            .and_then(|r| r.environments.get(&config.environment))
            .map(|a| a.view.clone());
        Ok(Status {
            view: store.view(config)?,
            environment: config.environment.clone(),
            known: record.is_some(),
            approved,
            record,
            project,
        })
    }

    pub fn is_approved(&self) -> bool {
        self.approved.as_ref() == Some(&self.view)
    }

    /// The changes since the approval (every line of the view when never approved).
    pub fn changes(&self) -> Vec<Change> {
        match &self.approved {
            Some(old) => old.diff(&self.view),
            None => self.view.lines(),
        }
    }

    /// Records the current view as approved.
    pub fn approve(&self, store: &Store, how: &str) -> Result<PathBuf, ApprovalError> {
        let mut record = self.record.clone().unwrap_or_else(|| Record {
            version: RECORD_VERSION,
            project: self.project.clone(),
            environments: BTreeMap::new(),
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        record.environments.insert(
            self.environment.clone(),
            Approved {
                digest: self.view.digest(),
                view: self.view.clone(),
                approved_at: now,
                how: how.to_owned(),
            },
        );
        store.save(&record)
    }
}

/// The command that approves `project`'s config: `kz allow --dir PATH`, with `sudo` when kz
/// runs as root on behalf of a sudo user (the store is root's).
pub fn allow_command(project: &Path, env: super::EnvLookup<'_>) -> String {
    let dir = project.display().to_string();
    let dir = if dir
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+@%:,".contains(c))
    {
        dir
    } else {
        format!("'{}'", dir.replace('\'', "'\\''"))
    };
    let sudo = nix::unistd::geteuid().is_root() && env("SUDO_UID").is_some();
    format!("{}kz allow --dir {dir}", if sudo { "sudo " } else { "" })
}

/// The approval gate of a blind run, before any secret is resolved. `agent`: the agent's
/// identity when kz runs it as another user (then a source it can write is trusted only with
/// a matching approval, never on first use).
pub fn gate(
    config: &Config,
    store: &Store,
    agent: Option<&AgentIds>,
    env: super::EnvLookup<'_>,
) -> Result<Gate, ApprovalError> {
    let status = Status::of(config, store)?;
    if status.is_approved() {
        return Ok(Gate::Approved);
    }
    let hint = allow_command(&status.project, env);
    // A record of this project (any environment) means the first use is over.
    if status.known {
        return Err(ApprovalError::Changed {
            diff: render(&status.changes()),
            project: status.project,
            environment: status.environment,
            hint,
        });
    }
    if let Some(agent) = agent {
        let writable = agent_writable(&sources(config, env), agent);
        if !writable.is_empty() {
            return Err(ApprovalError::AgentWritable {
                project: status.project,
                agent_uid: agent.uid,
                files: writable
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                hint,
            });
        }
    }
    let record = status.approve(store, "first use")?;
    Ok(Gate::FirstUse { record })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let c = Config::load_with(dir.path(), &|_| None, false).unwrap();
        (dir, c)
    }

    fn view(text: &str) -> View {
        let (_d, c) = load(&[(".keyzero.toml", text)]);
        View::of(&c, &|v| format!("fp({})", v.len())).unwrap()
    }

    const BASE: &str = r#"
[resolvers.bao]
type = "hashicorp_vault"
address = "https://bao.example:8200"

[secrets.GITHUB_TOKEN]
resolver = "env"
ref = "GH"
hosts = ["api.github.com", "uploads.github.com"]

[secrets.DB]
resolver = "bao"
ref = "secret/db"
field = "password"

[blind]
connections = [{ allow = true, host = "api.github.com" }, { allow = false, regex = "^x$" }]
hide = ["a", "b"]
"#;

    #[test]
    fn order_comments_and_formatting_do_not_count() {
        let reordered = r#"
# a comment the agent may add
[blind]
hide = [ "b",
         "a" ]   # trailing comment
connections = [
  {host = "api.github.com", allow = true},
  {regex = "^x$", allow = false},
]

[secrets.DB]
field = "password"
ref = "secret/db"
resolver = "bao"
description = "descriptions are not policy"

[secrets.GITHUB_TOKEN]
hosts = ["UPLOADS.github.com", "api.github.com."]
ref = "GH"
resolver = "env"

[resolvers.bao]
address = "https://bao.example:8200"
type = "hashicorp_vault"
"#;
        let a = view(BASE);
        let b = view(reordered);
        assert_eq!(a, b, "{:?}", a.diff(&b));
        assert_eq!(a.digest(), b.digest());
        assert!(a.diff(&b).is_empty());
    }

    #[test]
    fn a_new_host_is_one_added_line() {
        let a = view(BASE);
        let b = view(&BASE.replace(
            r#"hosts = ["api.github.com", "uploads.github.com"]"#,
            r#"hosts = ["api.github.com", "uploads.github.com", "evil.example"]"#,
        ));
        assert_ne!(a.digest(), b.digest());
        let d = a.diff(&b);
        assert_eq!(
            d,
            vec![Change::Added(
                "secrets.GITHUB_TOKEN.hosts".into(),
                "\"evil.example\"".into()
            )]
        );
        assert_eq!(
            d[0].to_string(),
            r#"+ secrets.GITHUB_TOKEN.hosts: "evil.example""#
        );
    }

    #[test]
    fn changes_removals_and_reordered_rules_are_shown() {
        let a = view(BASE);
        let b = view(
            &BASE
                .replace("https://bao.example:8200", "https://evil.example:8200")
                .replace(
                    r#"connections = [{ allow = true, host = "api.github.com" }, { allow = false, regex = "^x$" }]"#,
                    r#"connections = [{ allow = false, regex = "^x$" }, { allow = true, host = "api.github.com" }]
refuse_on_scope_violation = true"#,
                )
                .replace(r#"hide = ["a", "b"]"#, r#"hide = ["a"]"#),
        );
        let lines: Vec<String> = a.diff(&b).iter().map(ToString::to_string).collect();
        for want in [
            r#"~ resolvers.bao.address: "https://bao.example:8200" -> "https://evil.example:8200""#,
            r#"~ blind.connections[0]: {allow = true, host = "api.github.com"} -> {allow = false, regex = "^x$"}"#,
            "~ blind.refuse_on_scope_violation: false -> true",
            r#"- blind.hide: "b""#,
        ] {
            assert!(lines.iter().any(|l| l == want), "{want} not in {lines:#?}");
        }
        // A secret that loses its hosts becomes "any allowed host": shown, not silent.
        let c = view(&BASE.replace(r#"hosts = ["api.github.com", "uploads.github.com"]"#, ""));
        let lines: Vec<String> = a.diff(&c).iter().map(ToString::to_string).collect();
        assert!(
            lines.contains(&"+ secrets.GITHUB_TOKEN.hosts: (any allowed host)".to_owned()),
            "{lines:#?}"
        );
    }

    #[test]
    fn credentials_are_fingerprinted_never_stored() {
        const TOKEN: &str = "hvs.CAESIJ-real-vault-token-9d1f";
        let text = BASE.replace(
            "address = \"https://bao.example:8200\"",
            &format!("address = \"https://bao.example:8200\"\ntoken = \"{TOKEN}\""),
        );
        let (dir, config) = load(&[(".keyzero.toml", &text)]);
        let store = Store::open_at(dir.path().join("state/approved")).unwrap();
        let status = Status::of(&config, &store).unwrap();
        let shown = render(&status.changes());
        assert!(
            shown.contains("resolvers.bao.token: (credential, hmac "),
            "{shown}"
        );
        assert!(!shown.contains(TOKEN));
        let record = status.approve(&store, "kz allow").unwrap();
        let mut stored = std::fs::read_to_string(&record).unwrap();
        for entry in std::fs::read_dir(store.dir()).unwrap() {
            stored.push_str(&String::from_utf8_lossy(
                &std::fs::read(entry.unwrap().path()).unwrap(),
            ));
        }
        assert!(!stored.contains(TOKEN), "{stored}");
        assert!(!stored.contains("CAESIJ"));
        // Changing the credential is still a change.
        let (_d2, other) = load(&[(".keyzero.toml", &text.replace(TOKEN, "hvs.another-token"))]);
        assert_ne!(store.view(&config).unwrap(), store.view(&other).unwrap());
    }

    #[test]
    fn first_use_then_approved_then_changed() {
        let (dir, config) = load(&[(".keyzero.toml", BASE)]);
        let store = Store::open_at(dir.path().join("state/approved")).unwrap();
        let env = |_: &str| None;
        assert!(matches!(
            gate(&config, &store, None, &env).unwrap(),
            Gate::FirstUse { .. }
        ));
        assert_eq!(gate(&config, &store, None, &env).unwrap(), Gate::Approved);
        std::fs::write(
            dir.path().join(".keyzero.local.toml"),
            BASE.replace(
                "\"api.github.com\", ",
                "\"api.github.com\", \"evil.example\", ",
            ),
        )
        .unwrap();
        let changed = Config::load_with(dir.path(), &|_| None, false).unwrap();
        let err = gate(&changed, &store, None, &env).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.reason(), "config_changed");
        assert!(
            msg.contains(r#"+ secrets.GITHUB_TOKEN.hosts: "evil.example""#),
            "{msg}"
        );
        assert!(msg.contains("kz allow --dir "), "{msg}");
        // The approval survives the refusal: the original config still passes.
        assert_eq!(gate(&config, &store, None, &env).unwrap(), Gate::Approved);
        // Another environment of a known project is not a first use.
        let mut prod = config.clone();
        prod.environment = "production".into();
        assert_eq!(
            gate(&prod, &store, None, &env).unwrap_err().reason(),
            "config_changed"
        );
        assert!(store.forget(&canonical_path(dir.path())).unwrap());
        assert!(matches!(
            gate(&prod, &store, None, &env).unwrap(),
            Gate::FirstUse { .. }
        ));
    }

    #[test]
    fn projects_are_keyed_by_canonical_path() {
        let (a, ca) = load(&[(".keyzero.toml", BASE)]);
        let (_b, cb) = load(&[(".keyzero.toml", &BASE.replace("GH", "GH2"))]);
        let store = Store::open_at(a.path().join("state/approved")).unwrap();
        let env = |_: &str| None;
        assert!(matches!(
            gate(&ca, &store, None, &env),
            Ok(Gate::FirstUse { .. })
        ));
        assert!(matches!(
            gate(&cb, &store, None, &env),
            Ok(Gate::FirstUse { .. })
        ));
        // The same project through a symlink is the same record.
        let link = a.path().join("link");
        std::os::unix::fs::symlink(a.path(), &link).unwrap();
        let via_link = Config::load_with(&link, &|_| None, false).unwrap();
        assert_eq!(gate(&via_link, &store, None, &env).unwrap(), Gate::Approved);
    }

    #[test]
    fn an_agent_writable_source_is_not_trusted_on_first_use() {
        let (dir, config) = load(&[(".keyzero.toml", BASE)]);
        let store = Store::open_at(dir.path().join("state/approved")).unwrap();
        let env = |_: &str| None;
        let me = nix::unistd::geteuid().as_raw();
        // The test's own user plays the agent: it owns the files.
        let agent = AgentIds {
            uid: me,
            gids: vec![],
        };
        let err = gate(&config, &store, Some(&agent), &env).unwrap_err();
        assert_eq!(err.reason(), "config_agent_writable");
        let msg = err.to_string();
        assert!(msg.contains(".keyzero.toml: owner uid"), "{msg}");
        assert!(msg.contains("owned by the agent's user"), "{msg}");
        assert!(msg.contains("kz allow"), "{msg}");
        // Explicit approval lets it through.
        Status::of(&config, &store)
            .unwrap()
            .approve(&store, "kz allow")
            .unwrap();
        assert_eq!(
            gate(&config, &store, Some(&agent), &env).unwrap(),
            Gate::Approved
        );
        // Another user, by mode: world- and group-writable files.
        let other = AgentIds {
            uid: me.wrapping_add(4242),
            gids: vec![nix::unistd::getegid().as_raw()],
        };
        let file = dir.path().join(".keyzero.toml");
        assert!(agent_writable(std::slice::from_ref(&file), &other).is_empty());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert_eq!(
            agent_writable(std::slice::from_ref(&file), &other)[0].why,
            "writable by a group of the agent's user"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o646)).unwrap();
        assert_eq!(
            agent_writable(&[file], &other)[0].why,
            "writable by every user"
        );
    }

    #[test]
    fn an_unsafe_store_or_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("approved");
        std::fs::create_dir(&store_dir).unwrap();
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Store::open_at(store_dir.clone()).unwrap_err();
        assert_eq!(err.reason(), "store_unsafe");
        assert!(err.to_string().contains("mode 0777"), "{err}");
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let store = Store::open_at(store_dir).unwrap();
        // A record someone else could have written is not believed.
        let project = dir.path().join("p");
        std::fs::write(store.record_path(&project), "{}").unwrap();
        std::fs::set_permissions(
            store.record_path(&project),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        assert_eq!(store.load(&project).unwrap_err().reason(), "record_corrupt");
        std::fs::set_permissions(
            store.record_path(&project),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert_eq!(store.load(&project).unwrap_err().reason(), "record_corrupt");
    }

    #[test]
    fn upstream_ca_content_is_part_of_the_view() {
        let text = format!("{BASE}upstream_ca = \"ca.pem\"\n");
        let (dir, config) = load(&[(".keyzero.toml", &text), ("ca.pem", "one")]);
        let a = View::of(&config, &|_| String::new()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "two").unwrap();
        let b = View::of(&config, &|_| String::new()).unwrap();
        let d = a.diff(&b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].to_string().starts_with("~ blind.upstream_ca.sha256: "));
    }

    #[test]
    fn the_sudo_hint_and_quoting() {
        let p = Path::new("/home/dev/my project");
        let cmd = allow_command(p, &|_| None);
        assert!(
            cmd.ends_with("kz allow --dir '/home/dev/my project'"),
            "{cmd}"
        );
    }
}
