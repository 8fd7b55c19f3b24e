//! The daemon's sandboxes: each admitted on the one [`Node`], with its owner, its masked
//! tokens (names and tokens only: masked tokens are not secrets), its counters and its audit
//! context, under the id the kernel gave its cgroup.
//!
//! A sandbox's audit records go to the daemon's sink with `sandbox`, `sandbox_id` and
//! `owner_uid` added, and are counted on the way ([`Counting`]): requests, requests in which a
//! token was swapped, and refusals (connections, blocked connects, refused names, tokens out of
//! scope that were refused).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

use super::auth::{Caller, may_manage};
use super::events::{Events, Publishing};
use super::persist::{PersistError, Persisted, PersistedPod, StateDir};
use super::secrets::{self, Project, SecretsError};
use crate::audit::{AuditError, AuditEvent, AuditSink, Fields, WithContext};
use crate::config::Config;
use crate::proxy::{CertAuthority, TlsError, TokenTable};
use crate::run::MaskedSecret;
use crate::run::blind::{self, BlindError};
use crate::sandbox::{Node, Sandbox, SandboxError, SandboxSpec};

/// The leaf certificates a sandbox's CA keeps (as `kz run --blind`).
pub(super) const LEAF_CACHE: usize = 1024;
/// Sandboxes one user (not root or kz-admin) may hold at once: each costs a resolver, a
/// cgroup and a session, and the socket is open to a whole group.
pub const MAX_PER_USER: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "bad sandbox name {0:?}: use 1-48 characters of A-Z a-z 0-9 _ - . (not starting with a dot)"
    )]
    BadName(String),
    #[error("you already have a sandbox named {0:?}; pick another name or remove it first")]
    NameTaken(String),
    #[error(
        "you already hold {MAX_PER_USER} sandboxes, the most a user may; remove some (`kz sandbox ls`, `kz sandbox rm ID`)"
    )]
    TooMany,
    #[error("no sandbox {0}; `kz sandbox ls` lists yours")]
    NotFound(u64),
    #[error(
        "sandbox {0} belongs to another user; only its owner, root or group kz-admin manage it"
    )]
    Forbidden(u64),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("{0}")]
    Blind(#[from] BlindError),
    #[error("cannot create the sandbox's CA: {0}")]
    Ca(#[from] TlsError),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("[blind] resolver: {0}")]
    Resolver(String),
    #[error("the node has no cgroup for the sandbox (kernel interception is off)")]
    NoCgroup,
    #[error("cannot keep the sandbox's state (a restarted daemon could not adopt it): {0}")]
    Persist(#[from] PersistError),
}

/// What a create request asks for.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The sandbox's name, unique per owner (default: `sandbox-<random>`).
    pub name: Option<String>,
    /// An absolute path: the directory whose `.keyzero.toml` (or one of its parents') holds
    /// the sandbox's secrets and `[blind]` settings.
    pub project_dir: PathBuf,
    /// The caller's kz state directory (its `KZ_STATE_DIR`): the approvals the project's
    /// config is checked against ([`secrets`]). Default: the caller's usual one.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// One secret of a sandbox as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SecretInfo {
    /// The masked token the sandbox's agent uses in place of the value.
    pub token: String,
    /// Where the token is swapped (empty: wherever the connection rules allow).
    pub hosts: Vec<String>,
    /// An adopted sandbox's secret that did not resolve again: its token is not swapped.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unresolved: bool,
}

/// Per-sandbox counters, from its audit records.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    swapped: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CounterValues {
    pub requests: u64,
    pub requests_swapped: u64,
    pub refused: u64,
}

impl Counters {
    pub fn values(&self) -> CounterValues {
        CounterValues {
            requests: self.requests.load(Ordering::Relaxed),
            requests_swapped: self.swapped.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn count(&self, event: &AuditEvent) {
        let inc = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
        match event.kind {
            "proxy_request" => {
                inc(&self.requests);
                let swapped = event
                    .fields
                    .get("swapped")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
                if swapped {
                    inc(&self.swapped);
                }
            }
            "connection_refused" | "connect_blocked" | "dns_refused" => {
                inc(&self.refused);
            }
            _ if event.fields.get("refused") == Some(&Value::Bool(true)) => {
                inc(&self.refused);
            }
            _ => {}
        }
    }
}

/// Counts a sandbox's records on their way to the daemon's sink.
pub struct Counting {
    pub inner: Arc<dyn AuditSink>,
    pub counters: Arc<Counters>,
}

impl AuditSink for Counting {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.counters.count(&event);
        self.inner.record(event)
    }
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    /// Its cgroup's id: the kernel's name for it, and the proxy's.
    pub id: u64,
    pub name: String,
    pub owner_uid: u32,
    pub cgroup: PathBuf,
    /// The address of its DNS resolver (the kernel sends its port-53 traffic there).
    pub dns: Option<String>,
    pub project_dir: PathBuf,
    pub secrets: BTreeMap<String, SecretInfo>,
    /// RFC 3339, UTC.
    pub created: String,
    /// The CA its agent must trust for HTTPS (a public certificate).
    pub ca_cert_pem: String,
    pub counters: CounterValues,
}

struct Entry {
    info: SandboxInfo,
    counters: Arc<Counters>,
    sandbox: Sandbox,
    /// What a run started in it needs ([`Registry::run_target`]).
    run: RunTarget,
    /// What its state file needs besides `info` ([`super::persist`]).
    kept: Kept,
}

struct Kept {
    owner_gid: u32,
    /// Made for one `POST /v1/runs` command.
    for_run: bool,
    ca: Arc<CertAuthority>,
    /// The approvals store the owner named at creation (`CreateRequest::state_dir`).
    approvals: Option<PathBuf>,
    /// The pod whose cgroup it guards.
    pod: Option<PersistedPod>,
}

/// What a sandbox is made of before it is admitted: a new one's, or one a killed daemon left
/// ([`super::adopt`]).
pub(super) struct Parts {
    pub name: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub config: Config,
    /// Its secrets with their masked tokens (fresh, or the adopted sandbox's own).
    pub secrets: Vec<MaskedSecret>,
    /// An adopted sandbox's secrets that did not resolve again (name → masked token): shown
    /// and kept, never swapped.
    pub unresolved: BTreeMap<String, String>,
    pub ca: Arc<CertAuthority>,
    pub created: String,
    pub for_run: bool,
    /// The owner's approvals store, if it named one ([`CreateRequest::state_dir`]).
    pub approvals: Option<PathBuf>,
    /// The Kubernetes pod whose cgroup (the kubelet's) it guards
    /// ([`SandboxSpec::existing_cgroup`]); none: a cgroup of kz's own.
    pub pod: Option<PersistedPod>,
}

/// What a process started in a sandbox needs from it: the masks of its mount namespace (from
/// the project's config), the names of the variables that hold credentials, and a matcher of
/// the real values (it says whether a string holds one, and hands none out) so a client's
/// environment can be scrubbed of them.
#[derive(Clone)]
pub struct RunTarget {
    pub blind: crate::config::blind::BlindConfig,
    pub hide_extra: Vec<PathBuf>,
    /// Resolver logins and `env` resolvers' source variables ([`crate::resolve::login_vars`]).
    pub credential_vars: std::collections::BTreeSet<String>,
    pub values: crate::proxy::Scrubber,
}

impl Entry {
    fn info(&self) -> SandboxInfo {
        let mut info = self.info.clone();
        info.counters = self.counters.values();
        info
    }
}

/// Every sandbox of the daemon.
pub struct Registry {
    node: Node,
    audit: Arc<dyn AuditSink>,
    sandboxes: Mutex<BTreeMap<u64, Entry>>,
    /// Where each sandbox's state is kept for a restarted daemon (none: not kept).
    state: Option<StateDir>,
    /// Names (owner uid, name) of sandboxes being created.
    reserved: Mutex<std::collections::BTreeSet<(u32, String)>>,
    /// The sandboxes' event feeds ([`super::events`]).
    events: Events,
}

/// A name held by a create in progress; given back when the create ends.
struct Reservation<'a> {
    registry: &'a Registry,
    key: (u32, String),
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.registry.reserved().remove(&self.key);
    }
}

impl Registry {
    pub fn new(node: Node, audit: Arc<dyn AuditSink>) -> Registry {
        Registry {
            node,
            audit,
            sandboxes: Mutex::new(BTreeMap::new()),
            state: None,
            reserved: Mutex::new(std::collections::BTreeSet::new()),
            events: Events::new(),
        }
    }

    /// Keeps each sandbox's state in `state` from now on ([`super::persist`]).
    pub fn persisting(mut self, state: StateDir) -> Registry {
        self.state = Some(state);
        self
    }

    pub(super) fn state_dir(&self) -> Option<&StateDir> {
        self.state.as_ref()
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Creates a sandbox for `caller` from its project directory.
    pub async fn create(
        &self,
        caller: &Caller,
        req: CreateRequest,
    ) -> Result<SandboxInfo, StateError> {
        self.create_as(caller, req, false, None).await
    }

    /// [`Registry::create`] on the cgroup of Kubernetes pod `pod` (the kubelet's, see
    /// [`super::pods`]) instead of a new one ([`SandboxSpec::existing_cgroup`]); the pod is kept
    /// with the sandbox's state, so a restarted daemon guards it again.
    pub async fn create_for_pod(
        &self,
        caller: &Caller,
        req: CreateRequest,
        pod: PersistedPod,
    ) -> Result<SandboxInfo, StateError> {
        self.create_as(caller, req, false, Some(pod)).await
    }

    /// [`Registry::create`] for one `POST /v1/runs` command: a daemon that adopts it after a
    /// restart destroys it once its processes are gone ([`super::adopt`]).
    pub async fn create_for_run(
        &self,
        caller: &Caller,
        req: CreateRequest,
    ) -> Result<SandboxInfo, StateError> {
        self.create_as(caller, req, true, None).await
    }

    async fn create_as(
        &self,
        caller: &Caller,
        req: CreateRequest,
        for_run: bool,
        pod: Option<PersistedPod>,
    ) -> Result<SandboxInfo, StateError> {
        let name = match req.name {
            Some(n) => n,
            None => format!("sandbox-{}", hex::encode(rand::random::<[u8; 4]>())),
        };
        if !valid_name(&name) {
            return Err(StateError::BadName(name));
        }
        // The name is held from this check until the sandbox is in the map (or the create
        // failed): two creates racing with one name get one sandbox and one `name_taken`,
        // not a clash of cgroups.
        let _held = {
            let map = self.lock();
            let mut reserved = self.reserved();
            let mine = map
                .values()
                .filter(|e| e.info.owner_uid == caller.uid)
                .count()
                + reserved
                    .iter()
                    .filter(|(uid, _)| *uid == caller.uid)
                    .count();
            let key = (caller.uid, name.clone());
            if reserved.contains(&key)
                || map
                    .values()
                    .any(|e| e.info.owner_uid == caller.uid && e.info.name == name)
            {
                return Err(StateError::NameTaken(name));
            }
            if !caller.admin && mine >= MAX_PER_USER {
                return Err(StateError::TooMany);
            }
            reserved.insert(key.clone());
            Reservation {
                registry: self,
                key,
            }
        };
        let Project {
            config,
            secrets,
            first_use,
        } = secrets::load(
            &req.project_dir,
            caller.uid,
            caller.gid,
            req.state_dir.as_deref(),
        )
        .await?;
        if let Some(record) = &first_use {
            self.record(
                AuditEvent::new("config_first_use")
                    .with("project", config.dir.display().to_string())
                    .with("environment", config.environment.clone())
                    .with("owner_uid", caller.uid)
                    .with("record", record.display().to_string()),
            );
        }
        let parts = Parts {
            name,
            owner_uid: caller.uid,
            owner_gid: caller.gid,
            config,
            secrets,
            unresolved: BTreeMap::new(),
            ca: Arc::new(CertAuthority::generate(LEAF_CACHE)?),
            created: crate::audit::rfc3339_now(),
            for_run,
            pod,
            approvals: req.state_dir.clone(),
        };
        let entry = self.admit(parts, None).await?;
        // A sandbox a restarted daemon could not find again is not made at all.
        if let Err(e) = self.persist(&entry) {
            self.node.close(entry.sandbox).await;
            return Err(e.into());
        }
        let info = entry.info();
        self.record(
            AuditEvent::new("sandbox_created")
                .with("sandbox_id", info.id)
                .with("sandbox", entry.sandbox.name().to_owned())
                .with("owner_uid", caller.uid)
                .with("caller_pid", caller.pid)
                .with("project_dir", info.project_dir.display().to_string())
                .with("secrets", info.secrets.keys().cloned().collect::<Vec<_>>()),
        );
        self.lock().insert(info.id, entry);
        Ok(info)
    }

    /// Admits a sandbox a killed daemon left in the cgroup with id `id`, with `parts` rebuilt
    /// from its state file and its project ([`super::adopt`]); its state file is rewritten (the
    /// secrets that did or did not resolve this time).
    pub(super) async fn adopt(&self, parts: Parts, id: u64) -> Result<SandboxInfo, StateError> {
        let entry = self.admit(parts, Some(id)).await?;
        if let Err(e) = self.persist(&entry) {
            self.node.close(entry.sandbox).await;
            return Err(e.into());
        }
        let info = entry.info();
        self.lock().insert(info.id, entry);
        Ok(info)
    }

    /// Admits `parts` on the node: in a new cgroup, or (`held`) in the one with that id that a
    /// killed daemon left.
    async fn admit(&self, parts: Parts, held: Option<u64>) -> Result<Entry, StateError> {
        let Parts {
            name,
            owner_uid,
            owner_gid,
            config,
            secrets,
            unresolved,
            ca,
            created,
            for_run,
            pod,
            approvals,
        } = parts;
        // Two users may both call theirs `agent`: the cgroup's name carries the owner.
        let cgroup_name = format!("u{owner_uid}-{name}");
        let rules = blind::connection_rules(&config.blind)?;
        let credential_vars = crate::resolve::login_vars(&config);
        let hide_extra = crate::contain::resolver_files(&config);
        let tokens = TokenTable::new();
        let mut shown = BTreeMap::new();
        for (secret, token) in unresolved {
            let info = SecretInfo {
                token,
                hosts: config
                    .secrets
                    .get(&secret)
                    .map(|e| e.hosts.clone())
                    .unwrap_or_default(),
                unresolved: true,
            };
            shown.insert(secret, info);
        }
        for s in secrets {
            shown.insert(
                s.name.clone(),
                SecretInfo {
                    token: s.token.clone(),
                    hosts: s.hosts.clone(),
                    unresolved: false,
                },
            );
            blind::add_token(&tokens, s)?;
        }
        let counters = Arc::new(Counters::default());
        let mut context = Fields::default();
        context.insert("sandbox", Value::from(cgroup_name.clone()));
        context.insert("owner_uid", Value::from(owner_uid));
        let feed = self.events.open(owner_uid);
        let audit: Arc<dyn AuditSink> = Arc::new(WithContext {
            inner: Arc::new(Counting {
                inner: Arc::new(Publishing {
                    inner: self.audit.clone(),
                    feed: feed.clone(),
                }),
                counters: counters.clone(),
            }),
            context,
        });
        let run = RunTarget {
            blind: config.blind.clone(),
            hide_extra,
            credential_vars,
            values: tokens.scrubber(),
        };
        let b = &config.blind;
        let spec = SandboxSpec {
            name: cgroup_name,
            ca: ca.clone(),
            tokens,
            rules,
            refuse_out_of_scope: b.refuse_on_scope_violation,
            dns_upstream: b.dns_upstream().map_err(StateError::Resolver)?,
            ipv6: b.ipv6,
            udp: b.udp,
            listen: b.listen,
            unix: crate::intercept::UnixSockets::Only(b.unix_rules()),
            audit,
            echo_blocks: false,
            max_allowed_ips: b
                .max_allowed_ips
                .unwrap_or(crate::intercept::allowed::DEFAULT_QUOTA),
            dns_ttl_floor: crate::sandbox::TTL_FLOOR,
            existing_cgroup: pod.as_ref().map(|p| p.cgroup.clone()),
        };
        let admitted = match held {
            None => self.node.admit(spec).await,
            Some(id) => self.node.adopt(spec, id).await,
        };
        let sandbox = match admitted {
            Ok(s) => s,
            Err(e) => {
                feed.discard();
                return Err(e.into());
            }
        };
        let Some(cgroup) = sandbox.cgroup().cloned() else {
            self.node.close(sandbox).await;
            feed.discard();
            return Err(StateError::NoCgroup);
        };
        let info = SandboxInfo {
            id: cgroup.id,
            name,
            owner_uid,
            cgroup: cgroup.path.clone(),
            dns: sandbox.dns_addr().map(|a| a.to_string()),
            project_dir: config.dir.clone(),
            secrets: shown,
            created,
            ca_cert_pem: ca.cert_pem().to_owned(),
            counters: counters.values(),
        };
        feed.bind(info.id);
        Ok(Entry {
            info,
            counters,
            sandbox,
            run,
            kept: Kept {
                owner_gid,
                for_run,
                ca,
                pod,
                approvals,
            },
        })
    }

    /// Writes a sandbox's state file (when the registry keeps state).
    fn persist(&self, entry: &Entry) -> Result<(), PersistError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let info = &entry.info;
        let mut kept = Persisted::new(
            info.id,
            info.name.clone(),
            (info.owner_uid, entry.kept.owner_gid),
            info.project_dir.clone(),
            info.created.clone(),
            entry.kept.for_run,
            info.secrets
                .iter()
                .map(|(name, s)| (name.clone(), s.token.clone()))
                .collect(),
            &entry.kept.ca,
        );
        kept.approvals = entry.kept.approvals.clone();
        kept.pod = entry.kept.pod.clone();
        state.save(&kept)
    }

    /// Removes a sandbox's state file; a failure is logged (the next start finds no cgroup for
    /// it and drops it).
    fn forget(&self, id: u64) {
        if let Some(state) = &self.state
            && let Err(e) = state.remove(id)
        {
            tracing::error!("{e}");
        }
    }

    /// The sandboxes `caller` may see, by id.
    pub fn list(&self, caller: &Caller) -> Vec<SandboxInfo> {
        self.lock()
            .values()
            .filter(|e| may_manage(caller, e.info.owner_uid))
            .map(Entry::info)
            .collect()
    }

    /// How many sandboxes the node runs (whoever owns them).
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    pub fn get(&self, caller: &Caller, id: u64) -> Result<SandboxInfo, StateError> {
        let map = self.lock();
        let entry = map.get(&id).ok_or(StateError::NotFound(id))?;
        if !may_manage(caller, entry.info.owner_uid) {
            return Err(StateError::Forbidden(id));
        }
        Ok(entry.info())
    }

    /// A sandbox `caller` may start a process in, and what that process needs. Only its owner
    /// may: the process runs as the caller with the owner's tokens, and an admin who wants to
    /// act in another user's sandbox does so as that user (the sandbox's secrets were resolved
    /// with the owner's privileges, not the admin's).
    pub fn run_target(
        &self,
        caller: &Caller,
        id: u64,
    ) -> Result<(SandboxInfo, RunTarget), StateError> {
        let map = self.lock();
        let entry = map.get(&id).ok_or(StateError::NotFound(id))?;
        if entry.info.owner_uid != caller.uid {
            return Err(StateError::Forbidden(id));
        }
        Ok((entry.info(), entry.run.clone()))
    }

    /// Starts `cmd` in sandbox `id`, contained ([`Sandbox::spawn`]); `None` when the sandbox is
    /// gone (removed since its target was looked up).
    pub fn spawn(
        &self,
        id: u64,
        cmd: std::process::Command,
        contained: Arc<crate::contain::Prepared>,
        stdio: crate::sandbox::ChildStdio,
    ) -> Option<std::io::Result<crate::sandbox::Child>> {
        // clone3 is synchronous and quick: the lock is not held across an await.
        let map = self.lock();
        let entry = map.get(&id)?;
        Some(entry.sandbox.spawn(cmd, contained, Some(stdio)))
    }

    /// Destroys a sandbox: whatever runs in its cgroup is killed, the cgroup, its session and
    /// resolver removed ([`Node::close`]).
    pub async fn remove(&self, caller: &Caller, id: u64) -> Result<SandboxInfo, StateError> {
        let entry = {
            let mut map = self.lock();
            let owner = map.get(&id).ok_or(StateError::NotFound(id))?.info.owner_uid;
            if !may_manage(caller, owner) {
                return Err(StateError::Forbidden(id));
            }
            map.remove(&id).ok_or(StateError::NotFound(id))?
        };
        // The records the close causes (refusals still in the kernel's ring) reach the stream
        // before its last line.
        let Entry {
            mut info,
            counters,
            sandbox,
            ..
        } = entry;
        self.node.close(sandbox).await;
        self.forget(id);
        info.counters = counters.values();
        let destroyed = AuditEvent::new("sandbox_destroyed")
            .with("sandbox_id", id)
            .with("owner_uid", info.owner_uid)
            .with("by_uid", caller.uid)
            .with("requests", info.counters.requests)
            .with("refused", info.counters.refused);
        self.events.close(id, &destroyed);
        self.record(destroyed);
        Ok(info)
    }

    /// Closes every sandbox and stops the node (the daemon's orderly stop).
    pub async fn shutdown(self) {
        let entries: Vec<Entry> = std::mem::take(&mut *self.lock()).into_values().collect();
        for e in entries {
            let id = e.info.id;
            self.node.close(e.sandbox).await;
            self.forget(id);
            let destroyed = AuditEvent::new("sandbox_destroyed")
                .with("sandbox_id", id)
                .with("reason", "daemon_stopping");
            self.events.close(id, &destroyed);
            self.record(destroyed);
        }
        self.events.end_all();
        self.node.shutdown().await;
    }

    /// Records one of the daemon's own records; one naming a sandbox (`sandbox_id`: runs
    /// started, ended, refused) goes to that sandbox's event stream too.
    pub fn record(&self, event: AuditEvent) {
        if let Some(id) = event.fields.get("sandbox_id").and_then(Value::as_u64) {
            self.events.publish_to(id, &event);
        }
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "audit record lost");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken after [`Registry::lock`] when both are held.
    fn reserved(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(u32, String)>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A sandbox name: a cgroup name ([`crate::intercept::cgroups::valid_name`]) short enough to
/// carry the `u<uid>-` prefix.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 48 && crate::intercept::cgroups::valid_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_the_records() {
        let c = Counters::default();
        c.count(&AuditEvent::new("proxy_request").with("swapped", vec!["API_KEY"]));
        c.count(&AuditEvent::new("proxy_request").with("swapped", Vec::<String>::new()));
        c.count(&AuditEvent::new("connect_blocked"));
        c.count(&AuditEvent::new("dns_refused"));
        c.count(&AuditEvent::new("token_out_of_scope").with("refused", true));
        c.count(&AuditEvent::new("token_out_of_scope").with("refused", false));
        let v = c.values();
        assert_eq!((v.requests, v.requests_swapped, v.refused), (2, 1, 3));
    }

    #[test]
    fn names_fit_a_cgroup_with_the_owner_prefix() {
        assert!(valid_name("agent-1.a_b"));
        assert!(!valid_name(""));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(49)));
        assert!(crate::intercept::cgroups::valid_name(&format!(
            "u4294967295-{}",
            "x".repeat(48)
        )));
    }
}
