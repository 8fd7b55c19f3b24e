//! Restart without a gap: a daemon started after another one was killed adopts the sandboxes it
//! left, so their agents are served again without being restarted.
//!
//! While no daemon runs, a sandbox is cut off: its links stay pinned and its kernel policy
//! still sends its TCP to the dead proxy's port and its DNS to the dead resolver's (refused:
//! nothing listens there). The daemon's cgroup and pin directories are named after its state
//! directory ([`super::persist::StateDir::held_name`]), not after its process, so no other kz
//! takes them for a dead instance's and cleans them up in between.
//!
//! At start, for each state file ([`super::persist`]):
//! - its secrets are resolved again from its project, as its owner (the path `POST
//!   /v1/sandboxes` takes, [`super::secrets::load`]), and the token table maps the **same**
//!   masked tokens to the values resolved now. A secret that does not resolve (its resolver is
//!   down, the owner lost access, it left the config) is adopted *unswappable*: its token
//!   passes unswapped, the API marks it `unresolved` and `sandbox_adopted` names it. That
//!   fails safe (no value goes anywhere) and keeps the agent's work; its owner can remove the
//!   sandbox, or a later restart resolves it again. Secrets added to the config since are not
//!   added: the agent could not know their tokens.
//! - the sandbox gets a resolver and a proxy session of the new daemon's, and its CA back (the
//!   agent trusts it); its cgroup's policy is rewritten to name the new ports and its allowed
//!   IPs are dropped (the agent resolves again; see [`crate::intercept::Interceptor::adopt_cgroup`]).
//! - it is **dropped** instead (its processes killed, its cgroup, links, map entries and state
//!   file removed, `sandbox_dropped` with the reason) when its config no longer loads
//!   (`config_unusable`: there are no connection rules to serve it with), its cgroup is gone or
//!   empty (`cgroup_gone`, `empty`), its links are missing or run programs of another program
//!   set (`links_missing`, `program_set_changed`: `kz intercept unload` or another kz build ran
//!   in between), its file is unusable (`bad_state`), or admission fails (`admission_failed`).
//!
//! Then whatever is left in the daemon's directories without a state file (a create cut short
//! by the kill) is removed the same way (`no_state`).
//!
//! A sandbox made for one `POST /v1/runs` command is adopted with its processes, but the
//! command's client lost its connection with the old daemon: the new one destroys the sandbox
//! once its processes are gone.
//!
//! A Kubernetes pod's sandbox ([`super::pods`]) is adopted on the pod's own cgroup, the
//! kubelet's ([`crate::intercept::Interceptor::adopt_existing_cgroup`]: no process needed, policy
//! with `INHERIT` again) and listed again with the daemon's pods. It is dropped too when the
//! daemon serves no pods (`pods_disabled`) or its spec left the pods config (`no_pod_spec`), and
//! a dropped pod is only detached (the sweep unpins its links): its cgroup and processes are the
//! kubelet's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::auth::Caller;
use super::kubepods;
use super::persist::{Found, Persisted, PersistedPod};
use super::pods::{PodInfo, Pods};
use super::secrets::{self, Project, SecretsError};
use super::state::{LEAF_CACHE, Parts, Registry, StateError, valid_name};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::intercept::InterceptError;
use crate::proxy::CertAuthority;
use crate::sandbox::SandboxError;

/// How often an adopted run's sandbox is checked for processes.
const RUN_POLL: Duration = Duration::from_secs(1);

/// A sandbox that was adopted.
pub struct Adopted {
    pub id: u64,
    /// Made for one `POST /v1/runs` command: to be destroyed when empty ([`watch_run`]).
    pub for_run: bool,
    pub cgroup: std::path::PathBuf,
    /// The Kubernetes pod it guards, to be listed again ([`super::pods::Pods::restore`]).
    pub pod: Option<PodInfo>,
}

/// Why one was not.
struct Dropped {
    id: u64,
    name: Option<String>,
    owner_uid: Option<u32>,
    pod_uid: Option<String>,
    reason: &'static str,
    detail: String,
}

/// A state file's sandbox with its project loaded and its secrets resolved again.
struct Resolved {
    config: Config,
    secrets: Vec<crate::run::MaskedSecret>,
    unresolved: BTreeMap<String, String>,
    /// Why the secrets did not resolve, if they did not.
    failure: Option<String>,
}

/// Adopts what the state directory holds (see the module docs), audits each sandbox adopted or
/// dropped, and removes what nothing adopted. `pods`: the daemon's pods config, without which
/// no pod sandbox is adopted. Returns the adopted sandboxes.
pub async fn adopt_all(registry: &Registry, pods: Option<&Pods>) -> Vec<Adopted> {
    let Some(state) = registry.state_dir() else {
        return Vec::new();
    };
    let found = match state.load_all() {
        Ok(f) => f,
        Err(e) => {
            // Without the files nothing can be told apart: whatever is held stays cut off.
            registry.record(
                AuditEvent::new("sandbox_dropped")
                    .with("reason", "state_unreadable")
                    .with("error", e.to_string()),
            );
            return Vec::new();
        }
    };
    let mut adopted = Vec::new();
    let mut dropped = Vec::new();
    let mut good = Vec::new();
    for Found { path, id, state: s } in found {
        match s {
            Ok(p) => good.push((path, p)),
            Err(e) => {
                dropped.push(Dropped {
                    id,
                    name: None,
                    owner_uid: None,
                    pod_uid: None,
                    reason: "bad_state",
                    detail: e.to_string(),
                });
                discard(registry, &path);
            }
        }
    }
    // Resolutions run at once (each may wait on a resolver); admissions one by one.
    let resolutions =
        futures_util::future::join_all(good.iter().map(|(_, p)| resolve_again(p))).await;
    for ((path, p), resolved) in good.into_iter().zip(resolutions) {
        let drop_it = |reason, detail: String| Dropped {
            id: p.id,
            name: Some(p.name.clone()),
            owner_uid: Some(p.owner_uid),
            pod_uid: p.pod.as_ref().map(|pod| pod.uid.clone()),
            reason,
            detail,
        };
        if let Some(pod) = &p.pod
            && let Err((reason, detail)) = pod_still_served(pods, pod)
        {
            dropped.push(drop_it(reason, detail));
            discard(registry, &path);
            continue;
        }
        let resolved = match resolved {
            Ok(r) => r,
            Err(e) => {
                // A config changed during the gap and not approved since is refused as at
                // creation: its rules are not served.
                let reason = match e {
                    SecretsError::Approval { .. } => "not_approved",
                    _ => "config_unusable",
                };
                dropped.push(drop_it(reason, e.to_string()));
                discard(registry, &path);
                continue;
            }
        };
        match adopt_one(registry, &p, resolved).await {
            Ok(a) => adopted.push(a),
            Err((reason, detail)) => {
                dropped.push(drop_it(reason, detail));
                discard(registry, &path);
            }
        }
    }
    let swept = registry.node().sweep_held();
    let reported: Vec<u64> = dropped.iter().map(|d| d.id).collect();
    for d in dropped {
        let s = swept.iter().find(|s| s.id == d.id);
        let mut event = AuditEvent::new("sandbox_dropped")
            .with("sandbox_id", d.id)
            .with("reason", d.reason)
            .with("error", d.detail)
            .with("killed", s.map_or(0, |s| s.killed) as u64);
        if let Some(n) = d.name {
            event = event.with("name", n);
        }
        if let Some(u) = d.owner_uid {
            event = event.with("owner_uid", u);
        }
        if let Some(u) = d.pod_uid {
            event = event.with("pod_uid", u);
        }
        if let Some(err) = s.and_then(|s| s.error.clone()) {
            event = event.with("cleanup_error", err);
        }
        registry.record(event);
    }
    // Those with a state file were recorded just above.
    for s in swept.iter().filter(|s| !reported.contains(&s.id)) {
        if s.name.is_none() && s.error.is_none() {
            // Links of a cgroup that was gone already: nothing ran in it.
            tracing::info!(cgroup_id = s.id, "removed the links of a vanished cgroup");
            continue;
        }
        let mut event = AuditEvent::new("sandbox_dropped")
            .with("sandbox_id", s.id)
            .with("reason", "no_state")
            .with("killed", s.killed as u64);
        if let Some(n) = &s.name {
            event = event.with("sandbox", n.clone());
        }
        if let Some(err) = &s.error {
            event = event.with("cleanup_error", err.clone());
        }
        registry.record(event);
    }
    adopted
}

/// The project of `p` loaded and its secrets resolved as its owner; `Err` when the config does
/// not load (no rules to serve the sandbox with). A resolution that fails leaves every token
/// unswappable.
async fn resolve_again(p: &Persisted) -> Result<Resolved, SecretsError> {
    let (config, fresh, failure) = match secrets::load(
        &p.project_dir,
        p.owner_uid,
        p.owner_gid,
        p.approvals.as_deref(),
    )
    .await
    {
        Ok(Project {
            config, secrets, ..
        }) => (config, secrets, None),
        // The project is there, its values are not (or not all): adopted unswappable.
        Err(
            e @ (SecretsError::Resolve(_)
            | SecretsError::AsCaller { .. }
            | SecretsError::Timeout { .. }
            | SecretsError::Spawn { .. }
            | SecretsError::BadOutput { .. }
            | SecretsError::NoSecrets(_)),
        ) => {
            let config = crate::config::Config::load(Some(&p.project_dir))?;
            (config, Vec::new(), Some(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    let mut secrets = Vec::new();
    let mut unresolved = BTreeMap::new();
    let mut fresh: BTreeMap<String, crate::run::MaskedSecret> =
        fresh.into_iter().map(|s| (s.name.clone(), s)).collect();
    for (name, token) in &p.tokens {
        match fresh.remove(name) {
            Some(mut s) => {
                // The agent holds this token: it maps to the value resolved now.
                s.token = token.clone();
                secrets.push(s);
            }
            None => {
                unresolved.insert(name.clone(), token.clone());
            }
        }
    }
    Ok(Resolved {
        config,
        secrets,
        unresolved,
        failure,
    })
}

/// Admits one sandbox in its old cgroup; `Err((reason, detail))` when it is to be dropped.
async fn adopt_one(
    registry: &Registry,
    p: &Persisted,
    r: Resolved,
) -> Result<Adopted, (&'static str, String)> {
    if !valid_name(&p.name) {
        return Err(("bad_state", format!("bad sandbox name {:?}", p.name)));
    }
    if let Some(pod) = &p.pod
        && (p.name != super::pods::sandbox_name(&pod.uid) || p.owner_uid != 0)
    {
        return Err((
            "bad_state",
            format!("{} is not pod {}'s sandbox", p.name, pod.uid),
        ));
    }
    let what = format!("sandbox {}'s state", p.id);
    let ca = CertAuthority::from_pem(&p.ca_cert_pem, &p.ca_key_pem, &what, LEAF_CACHE)
        .map_err(|e| ("bad_state", e.to_string()))?;
    let unswappable: Vec<String> = r.unresolved.keys().cloned().collect();
    let parts = Parts {
        name: p.name.clone(),
        owner_uid: p.owner_uid,
        owner_gid: p.owner_gid,
        config: r.config,
        secrets: r.secrets,
        unresolved: r.unresolved,
        ca: Arc::new(ca),
        created: p.created.clone(),
        for_run: p.run,
        pod: p.pod.clone(),
        approvals: p.approvals.clone(),
    };
    let info = registry
        .adopt(parts, p.id)
        .await
        .map_err(|e| (drop_reason(&e), e.to_string()))?;
    let mut event = AuditEvent::new("sandbox_adopted")
        .with("sandbox_id", info.id)
        .with("sandbox", format!("u{}-{}", info.owner_uid, info.name))
        .with("name", info.name.clone())
        .with("owner_uid", info.owner_uid)
        .with("project_dir", info.project_dir.display().to_string())
        .with("secrets", info.secrets.keys().cloned().collect::<Vec<_>>())
        .with("unswappable", unswappable)
        .with("run", p.run);
    if let Some(why) = r.failure {
        event = event.with("resolution_error", why);
    }
    if let Some(pod) = &p.pod {
        event = event
            .with("pod_uid", pod.uid.clone())
            .with("pod", pod.name.clone())
            .with("namespace", pod.namespace.clone())
            .with("service_account", pod.service_account.clone());
    }
    registry.record(event);
    Ok(Adopted {
        id: info.id,
        for_run: p.run,
        pod: p
            .pod
            .as_ref()
            .map(|pod| PodInfo::of(pod, info.id, info.project_dir.clone())),
        cgroup: info.cgroup,
    })
}

/// Whether a pod sandbox's state is still one to adopt: the daemon serves pods, its config
/// still has a spec for the pod's service account (one removed since revokes it, as it would
/// refuse the registration), and the file's pod is consistent with its name.
/// `Err((reason, detail))` otherwise.
fn pod_still_served(pods: Option<&Pods>, pod: &PersistedPod) -> Result<(), (&'static str, String)> {
    let Some(pods) = pods else {
        return Err((
            "pods_disabled",
            "this daemon was started without --pods".into(),
        ));
    };
    if !kubepods::valid_uid(&pod.uid) {
        return Err(("bad_state", format!("bad pod uid {:?}", pod.uid)));
    }
    if !pods.has_spec(&pod.namespace, &pod.service_account) {
        return Err((
            "no_pod_spec",
            format!(
                "the pods config has no spec for service account {} in namespace {} any more",
                pod.service_account, pod.namespace
            ),
        ));
    }
    Ok(())
}

/// The audit reason for a sandbox whose admission failed.
fn drop_reason(e: &StateError) -> &'static str {
    match e {
        StateError::Sandbox(SandboxError::Intercept(InterceptError::NotAdoptable {
            reason,
            ..
        })) => reason,
        StateError::Blind(_) | StateError::Resolver(_) => "config_unusable",
        _ => "admission_failed",
    }
}

fn discard(registry: &Registry, path: &std::path::Path) {
    if let Some(state) = registry.state_dir()
        && let Err(e) = state.discard(path)
    {
        tracing::error!("{e}");
    }
}

/// Destroys an adopted run's sandbox once no process is left in it (its command's client went
/// with the old daemon, so nobody else would).
pub async fn watch_run(api: Arc<super::api::Api>, id: u64, cgroup: std::path::PathBuf) {
    let mut tick = tokio::time::interval(RUN_POLL);
    loop {
        tick.tick().await;
        if crate::intercept::cgroups::populated(&cgroup) == Some(true) {
            continue;
        }
        let daemon = Caller {
            uid: 0,
            gid: 0,
            pid: None,
            admin: true,
        };
        if let Err(e) = api.registry.remove(&daemon, id).await {
            tracing::debug!("adopted run sandbox {id}: {e}");
        }
        return;
    }
}
