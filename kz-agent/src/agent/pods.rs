//! Kubernetes pods as sandboxes: a node-side hook (NRI plugin, CNI plugin; see
//! docs/kubernetes.md) registers a pod with the pod's projected service-account token, and the
//! daemon guards the pod's own cgroup with the sandbox the config names for the pod's
//! namespace and service account.
//!
//! | method and path            | what                                                        |
//! |----------------------------|-------------------------------------------------------------|
//! | `POST /v1/pods`            | register the pod a token names: `{"token": "<jwt>"}` or `Authorization: Bearer` (201) |
//! | `GET /v1/pods`             | the registered pods, and the pod cgroups found on the node  |
//! | `GET /v1/pods/{uid}`       | one registered pod                                          |
//! | `DELETE /v1/pods/{uid}`    | give the pod's cgroup back (programs detached, policy gone) |
//!
//! Who may: an admin caller (uid 0 or group kz-admin, by SO_PEERCRED) *with* a token that
//! verifies. The caller check keeps the socket group's ordinary users from changing other
//! tenants' pods (registering cuts a pod's traffic over to kz; removing gives it back), the
//! token binds the request to one pod: which cgroup is guarded and which spec it gets follow
//! from the token's signed claims (`kubernetes.io.pod.uid`, namespace, service account), never
//! from a request field, so a confused or compromised hook cannot give pod A's secrets to
//! pod B. The token alone is not enough: every process in the pod, and anyone who can read the
//! kubelet's volumes, holds it.
//!
//! The sandbox is the daemon's (owner uid 0): its secrets come from the spec's project
//! directory, which the daemon's config (root's) names, resolved as root. Its cgroup is the
//! pod's, guarded in place ([`crate::sandbox::SandboxSpec::existing_cgroup`]): the policy covers the
//! pod's containers (child cgroups, also those made later), and removal leaves the cgroup and
//! its processes to the kubelet.
//!
//! A registered pod outlives a daemon killed with SIGKILL: its sandbox's state keeps the pod
//! ([`super::persist::PersistedPod`]), and the next daemon adopts it with the other sandboxes
//! ([`super::adopt`]): same masked tokens and CA, the spec's secrets resolved again, the policy
//! (with `INHERIT`) rewritten for the new proxy and resolver. In between the pod stays cut off
//! (its links stay attached; the dead proxy's port refuses), never open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::api::{Api, ApiError};
use super::auth::Caller;
use super::kubepods::{self, KubepodsError, PodCgroup};
use super::persist::PersistedPod;
use super::state::{CreateRequest, SandboxInfo};
use crate::audit::AuditEvent;
use crate::bundle::{Issuer, IssuerType};
use crate::identity::{Identity, TokenError, Verifier};

/// A projected service-account token is about 1 KiB; the body carries one.
const MAX_BODY: usize = 64 * 1024;
const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PodsConfigError {
    #[error("cannot read the pods config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pods config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "the pods config's issuer must be `type: kubernetes` (the cluster's service-account token issuer)"
    )]
    NotKubernetes,
    #[error(
        "the pods config's issuer needs an `audience` (e.g. `kz`, the audience of the pods' projected token volume): without one a token minted for any other audience (the API server's own) would register a pod"
    )]
    NoAudience,
    #[error("the pods config's issuer: {0}")]
    Issuer(String),
    #[error("pods entry {namespace}/{service_account}: project_dir must be an absolute path")]
    RelativeProject {
        namespace: String,
        service_account: String,
    },
    #[error("pods entry {namespace}/{service_account} appears twice; keep one")]
    Duplicate {
        namespace: String,
        service_account: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(
        "this daemon serves no pods: start it with `--pods FILE` (docs/kubernetes.md describes the file)"
    )]
    Disabled,
    #[error(
        "registering and removing pods needs root or group kz-admin (the node's hook runs as root)"
    )]
    Forbidden,
    #[error(
        "the body must be JSON {{\"token\": \"<projected service-account JWT>\"}} (or send Authorization: Bearer): {0}"
    )]
    BadBody(String),
    #[error("the service-account token is refused: {0}")]
    Token(#[from] TokenError),
    #[error(
        "the token verifies but names no pod (no `kubernetes.io.pod` claims, or they disagree with `sub`): send the pod's projected token, not a legacy or unbound one"
    )]
    NotAPodToken,
    #[error(transparent)]
    Cgroup(#[from] KubepodsError),
    #[error(
        "no sandbox spec for service account {service_account} in namespace {namespace}: add one to the daemon's pods config"
    )]
    NoSpec {
        namespace: String,
        service_account: String,
    },
    #[error("pod {0} is registered already (DELETE /v1/pods/{0} first)")]
    Registered(String),
    #[error(
        "pod {uid} runs in a network namespace of its own (process {pid}); kz serves pods in the node's network namespace only (hostNetwork: true): the kernel would send the pod's connections to a loopback proxy its namespace does not have, cutting it off (docs/kubernetes.md)"
    )]
    OwnNetns { uid: String, pid: u32 },
    #[error("pod {0} is not registered on this node")]
    NotRegistered(String),
}

impl PodError {
    /// The HTTP status and the stable error code of the JSON answer.
    pub(crate) fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            PodError::Disabled => (StatusCode::NOT_FOUND, "pods_disabled"),
            PodError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            PodError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            // The identity module's reasons: `bad_signature`, `token_expired`,
            // `wrong_audience`, `unknown_issuer`, `missing_token`, …
            PodError::Token(e) => (StatusCode::UNAUTHORIZED, e.reason()),
            PodError::NotAPodToken => (StatusCode::UNAUTHORIZED, "not_a_pod_token"),
            PodError::Cgroup(KubepodsError::BadUid(_)) => {
                (StatusCode::UNAUTHORIZED, "not_a_pod_token")
            }
            PodError::Cgroup(KubepodsError::NotOnNode { .. }) => {
                (StatusCode::NOT_FOUND, "pod_not_on_node")
            }
            PodError::Cgroup(KubepodsError::Ambiguous { .. }) => {
                (StatusCode::CONFLICT, "pod_cgroup_ambiguous")
            }
            PodError::NoSpec { .. } => (StatusCode::FORBIDDEN, "no_pod_spec"),
            PodError::Registered(_) => (StatusCode::CONFLICT, "pod_registered"),
            PodError::OwnNetns { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "pod_network_namespace")
            }
            PodError::NotRegistered(_) => (StatusCode::NOT_FOUND, "no_such_pod"),
        }
    }
}

/// The daemon's pods config (`--pods FILE`, YAML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodsConfig {
    /// The cluster's service-account token issuer, as a PDP bundle names one (`type:
    /// kubernetes`, `issuer_url`, `jwks_url` or `static_keys`, `audience`).
    pub issuer: Issuer,
    /// The kubelet's cgroup root, where its `kubepods` trees are (default: the cgroup v2
    /// mount).
    pub cgroup_root: Option<PathBuf>,
    /// Which pods get which sandbox.
    #[serde(default)]
    pub pods: Vec<PodRule>,
}

/// One sandbox spec, for the pods of one service account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodRule {
    pub namespace: String,
    pub service_account: String,
    /// The directory holding the `.keyzero.toml` (secrets, `[blind]`) of these pods' sandbox.
    pub project_dir: PathBuf,
}

/// What a verified token says about its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodClaims {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// A registered pod as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PodInfo {
    #[serde(flatten)]
    pub claims: PodClaims,
    pub driver: kubepods::Driver,
    pub qos: kubepods::Qos,
    pub cgroup: PathBuf,
    pub sandbox_id: u64,
    pub project_dir: PathBuf,
}

impl PodInfo {
    /// A pod as its sandbox's state keeps it ([`super::persist`]).
    pub fn of(pod: &PersistedPod, sandbox_id: u64, project_dir: PathBuf) -> PodInfo {
        PodInfo {
            claims: PodClaims {
                uid: pod.uid.clone(),
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            },
            driver: pod.driver,
            qos: pod.qos,
            cgroup: pod.cgroup.clone(),
            sandbox_id,
            project_dir,
        }
    }
}

/// The name of a pod's sandbox (its owner is root: its cgroup is named `u0-pod-<uid>` in kz's
/// records).
pub fn sandbox_name(uid: &str) -> String {
    format!("pod-{uid}")
}

/// The pods side of the daemon: the token verifier, the specs, the registered pods.
pub struct Pods {
    verifier: Verifier,
    root: PathBuf,
    rules: Vec<PodRule>,
    registered: Mutex<BTreeMap<String, PodInfo>>,
}

impl Pods {
    /// Reads and checks the config; `cgroup2` is the default kubelet root.
    pub fn load(path: &Path, cgroup2: &Path) -> Result<Pods, PodsConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| PodsConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: PodsConfig =
            serde_yaml::from_str(&text).map_err(|e| PodsConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        Pods::new(config, cgroup2)
    }

    pub fn new(config: PodsConfig, cgroup2: &Path) -> Result<Pods, PodsConfigError> {
        if config.issuer.issuer_type != IssuerType::Kubernetes {
            return Err(PodsConfigError::NotKubernetes);
        }
        if config.issuer.audience.as_deref().is_none_or(str::is_empty) {
            return Err(PodsConfigError::NoAudience);
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &config.pods {
            let key = (r.namespace.clone(), r.service_account.clone());
            if !r.project_dir.is_absolute() {
                return Err(PodsConfigError::RelativeProject {
                    namespace: key.0,
                    service_account: key.1,
                });
            }
            if !seen.insert(key.clone()) {
                return Err(PodsConfigError::Duplicate {
                    namespace: key.0,
                    service_account: key.1,
                });
            }
        }
        let verifier = Verifier::build(std::slice::from_ref(&config.issuer), MAX_TOKEN_BYTES)
            .map_err(|errors| {
                PodsConfigError::Issuer(
                    errors
                        .iter()
                        .map(|(_, e)| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
        Ok(Pods {
            verifier,
            root: config.cgroup_root.unwrap_or_else(|| cgroup2.to_owned()),
            rules: config.pods,
            registered: Mutex::new(BTreeMap::new()),
        })
    }

    /// The kubelet root pods are looked for under.
    pub fn cgroup_root(&self) -> &Path {
        &self.root
    }

    /// The spec for a pod's namespace and service account.
    fn rule(&self, pod: &PodClaims) -> Result<&PodRule, PodError> {
        self.rules
            .iter()
            .find(|r| r.namespace == pod.namespace && r.service_account == pod.service_account)
            .ok_or_else(|| PodError::NoSpec {
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            })
    }

    /// Whether the config still has a spec for the pod's namespace and service account (a
    /// restarted daemon adopts a pod sandbox only then, [`super::adopt`]).
    pub fn has_spec(&self, namespace: &str, service_account: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.namespace == namespace && r.service_account == service_account)
    }

    /// Lists a pod a killed daemon registered and this one adopted ([`super::adopt`]).
    pub fn restore(&self, info: PodInfo) {
        lock(&self.registered).insert(info.claims.uid.clone(), info);
    }

    /// The registered pods whose sandbox still stands (a sandbox removed with
    /// `DELETE /v1/sandboxes/{id}` takes its pod's registration with it).
    fn live(&self, api: &Api) -> BTreeMap<String, PodInfo> {
        let mut map = lock(&self.registered);
        map.retain(|_, p| api.registry.get(&ROOT, p.sandbox_id).is_ok());
        map.clone()
    }
}

/// The sandboxes of pods belong to the daemon (their secrets are root's config's).
const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: None,
    admin: true,
};

/// Reads the pod out of a verified token's claims: Kubernetes' bound-token claims
/// (`kubernetes.io: {namespace, pod: {name, uid}, serviceaccount: {name}}`), which must agree
/// with `sub` (`system:serviceaccount:<namespace>:<name>`).
pub fn pod_claims(identity: &Identity) -> Result<PodClaims, PodError> {
    let k = identity
        .claims
        .get("kubernetes.io")
        .ok_or(PodError::NotAPodToken)?;
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(PodError::NotAPodToken)
    };
    let pod = PodClaims {
        uid: text(k.pointer("/pod/uid"))?,
        name: text(k.pointer("/pod/name"))?,
        namespace: text(k.get("namespace"))?,
        service_account: text(k.pointer("/serviceaccount/name"))?,
    };
    let sub = format!(
        "system:serviceaccount:{}:{}",
        pod.namespace, pod.service_account
    );
    if identity.subject() != sub {
        return Err(PodError::NotAPodToken);
    }
    if !kubepods::valid_uid(&pod.uid) {
        return Err(PodError::NotAPodToken);
    }
    Ok(pod)
}

/// The `/v1/pods` endpoints.
pub async fn route(
    api: &Api,
    caller: &Caller,
    req: Request<Incoming>,
) -> Result<(StatusCode, Value), ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let pods = api.pods.as_ref().ok_or(PodError::Disabled)?;
    if !caller.admin {
        return Err(PodError::Forbidden.into());
    }
    match (segments.as_slice(), &method) {
        (["v1", "pods"], &Method::POST) => {
            let token = token_of(req).await?;
            let (pod, sandbox) = register(api, pods, caller, &token).await?;
            Ok((
                StatusCode::CREATED,
                json!({"pod": to_json(&pod), "sandbox": to_json(&sandbox)}),
            ))
        }
        (["v1", "pods"], &Method::GET) => {
            let registered: Vec<PodInfo> = pods.live(api).into_values().collect();
            Ok((
                StatusCode::OK,
                json!({
                    "registered": to_json(&registered),
                    "on_node": to_json(&kubepods::discover(&pods.root)),
                    "cgroup_root": pods.root,
                }),
            ))
        }
        (["v1", "pods", uid], &Method::GET) => {
            let pod = pods
                .live(api)
                .remove(*uid)
                .ok_or_else(|| PodError::NotRegistered(clean(uid)))?;
            let sandbox = api.registry.get(&ROOT, pod.sandbox_id)?;
            Ok((
                StatusCode::OK,
                json!({"pod": to_json(&pod), "sandbox": to_json(&sandbox)}),
            ))
        }
        (["v1", "pods", uid], &Method::DELETE) => {
            let (pod, sandbox) = unregister(api, pods, caller, uid).await?;
            Ok((
                StatusCode::OK,
                json!({"pod": to_json(&pod), "sandbox": to_json(&sandbox)}),
            ))
        }
        (["v1", "pods"] | ["v1", "pods", _], _) => Err(ApiError::Method(method, path)),
        _ => Err(ApiError::NotFound(method, path)),
    }
}

/// The token from `Authorization: Bearer`, else from the body's `token`.
async fn token_of(req: Request<Incoming>) -> Result<String, PodError> {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let body: Bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| PodError::BadBody(e.to_string()))?
        .to_bytes();
    if let Some(t) = header {
        return Ok(t);
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        token: String,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(TokenError::Missing.into());
    }
    let b: Body = serde_json::from_slice(&body).map_err(|e| PodError::BadBody(e.to_string()))?;
    Ok(b.token)
}

async fn register(
    api: &Api,
    pods: &Pods,
    caller: &Caller,
    token: &str,
) -> Result<(PodInfo, SandboxInfo), ApiError> {
    let identity = pods.verifier.verify(token).await.map_err(PodError::from)?;
    let pod = pod_claims(&identity)?;
    let rule = pods.rule(&pod)?.clone();
    if pods.live(api).contains_key(&pod.uid) {
        return Err(PodError::Registered(pod.uid).into());
    }
    let found: PodCgroup = kubepods::locate(&pods.root, &pod.uid).map_err(PodError::from)?;
    if let Some(pid) = own_netns(&found.path) {
        return Err(PodError::OwnNetns { uid: pod.uid, pid }.into());
    }
    let kept = PersistedPod {
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        driver: found.driver,
        qos: found.qos,
        cgroup: found.path,
    };
    let sandbox = api
        .registry
        .create_for_pod(
            &Caller {
                pid: caller.pid,
                ..ROOT
            },
            CreateRequest {
                name: Some(sandbox_name(&pod.uid)),
                project_dir: rule.project_dir.clone(),
                // Root's approvals: the spec is the daemon's config.
                state_dir: None,
            },
            kept.clone(),
        )
        .await?;
    let info = PodInfo::of(&kept, sandbox.id, sandbox.project_dir.clone());
    api.registry.record(
        AuditEvent::new("pod_registered")
            .with("pod_uid", info.claims.uid.clone())
            .with("pod", info.claims.name.clone())
            .with("namespace", info.claims.namespace.clone())
            .with("service_account", info.claims.service_account.clone())
            .with("sandbox_id", sandbox.id)
            .with("cgroup", info.cgroup.display().to_string())
            .with("project_dir", info.project_dir.display().to_string())
            .with("issuer", identity.issuer.clone())
            .with("uid", caller.uid)
            .with("caller_pid", caller.pid),
    );
    lock(&pods.registered).insert(info.claims.uid.clone(), info.clone());
    Ok((info, sandbox))
}

async fn unregister(
    api: &Api,
    pods: &Pods,
    caller: &Caller,
    uid: &str,
) -> Result<(PodInfo, SandboxInfo), ApiError> {
    let pod = pods
        .live(api)
        .remove(uid)
        .ok_or_else(|| PodError::NotRegistered(clean(uid)))?;
    // The registry detaches the programs and drops the policy; the cgroup and its processes
    // stay (the sandbox was admitted on an existing cgroup).
    let sandbox = api
        .registry
        .remove(
            &Caller {
                pid: caller.pid,
                ..ROOT
            },
            pod.sandbox_id,
        )
        .await?;
    lock(&pods.registered).remove(uid);
    api.registry.record(
        AuditEvent::new("pod_removed")
            .with("pod_uid", pod.claims.uid.clone())
            .with("pod", pod.claims.name.clone())
            .with("namespace", pod.claims.namespace.clone())
            .with("sandbox_id", pod.sandbox_id)
            .with("uid", caller.uid)
            .with("caller_pid", caller.pid),
    );
    Ok((pod, sandbox))
}

/// A process of the pod's cgroup tree whose network namespace is not the daemon's, if any.
/// The programs redirect a connect to the proxy's loopback address in the connecting
/// process's own namespace, so such a pod would be cut off rather than served. A pod without
/// processes yet cannot be judged (its sandbox container starts in its namespace later).
fn own_netns(cgroup: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ns = |pid: &str| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    let mine = ns("self")?;
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if ns(&pid.to_string()).is_some_and(|theirs| theirs != mine) {
                return Some(pid);
            }
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    None
}

/// A path segment in a message: short and printable.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(claims: Value) -> Identity {
        let Value::Object(map) = claims else {
            panic!("claims must be an object")
        };
        Identity::new("cluster", map, [], Vec::new())
    }

    fn bound(ns: &str, sa: &str, sub: &str) -> Value {
        json!({
            "sub": sub,
            "kubernetes.io": {
                "namespace": ns,
                "pod": {"name": "coder-7d9f", "uid": "5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6"},
                "serviceaccount": {"name": sa, "uid": "0d1e2f30-4152-6374-8596-a7b8c9d0e1f2"},
            },
        })
    }

    #[test]
    fn a_bound_token_names_its_pod() {
        let id = identity(bound(
            "agents",
            "coder",
            "system:serviceaccount:agents:coder",
        ));
        let pod = pod_claims(&id).unwrap();
        assert_eq!(
            pod,
            PodClaims {
                uid: "5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6".into(),
                name: "coder-7d9f".into(),
                namespace: "agents".into(),
                service_account: "coder".into(),
            }
        );
    }

    #[test]
    fn tokens_that_name_no_pod_are_refused() {
        let cases = [
            // `sub` says another service account than the claims.
            bound("agents", "coder", "system:serviceaccount:agents:admin"),
            // A legacy secret-based token: no `kubernetes.io` claims.
            json!({"sub": "system:serviceaccount:agents:coder",
                   "kubernetes.io/serviceaccount/namespace": "agents"}),
            // Bound to a secret, not a pod.
            json!({"sub": "system:serviceaccount:agents:coder",
                   "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "coder"}}}),
        ];
        for c in cases {
            let err = pod_claims(&identity(c.clone())).unwrap_err();
            assert_eq!(err.status_code().1, "not_a_pod_token", "{c}");
        }
        let mut traversal = bound("agents", "coder", "system:serviceaccount:agents:coder");
        traversal["kubernetes.io"]["pod"]["uid"] = json!("../../kz");
        assert!(pod_claims(&identity(traversal)).is_err());
    }

    fn config(yaml: &str) -> Result<Pods, PodsConfigError> {
        let c: PodsConfig = serde_yaml::from_str(yaml).unwrap();
        Pods::new(c, Path::new("/sys/fs/cgroup"))
    }

    #[test]
    fn the_config_insists_on_a_kubernetes_issuer_with_an_audience() {
        let base = "issuer:\n  name: cluster\n  type: kubernetes\n  issuer_url: https://kubernetes.default.svc\n  jwks_url: http://10.0.0.1/openid/v1/jwks\n";
        let pods = "pods:\n  - {namespace: agents, service_account: coder, project_dir: /etc/kz/pods/coder}\n";
        let ok = config(&format!("{base}  audience: kz\n{pods}")).unwrap();
        assert_eq!(ok.cgroup_root(), Path::new("/sys/fs/cgroup"));
        assert!(matches!(
            config(&format!("{base}{pods}")),
            Err(PodsConfigError::NoAudience)
        ));
        assert!(matches!(
            config(&format!(
                "{}  audience: kz\n{pods}",
                base.replace("kubernetes\n", "custom\n")
            )),
            Err(PodsConfigError::NotKubernetes)
        ));
        assert!(matches!(
            config(&format!("{base}  audience: kz\n{pods}{}", &pods[6..])),
            Err(PodsConfigError::Duplicate { .. })
        ));
        assert!(matches!(
            config(&format!(
                "{base}  audience: kz\n{}",
                pods.replace("/etc/kz", "etc/kz")
            )),
            Err(PodsConfigError::RelativeProject { .. })
        ));
        let rooted = config(&format!(
            "{base}  audience: kz\ncgroup_root: /sys/fs/cgroup/kubelet\n{pods}"
        ))
        .unwrap();
        assert_eq!(rooted.cgroup_root(), Path::new("/sys/fs/cgroup/kubelet"));
    }

    /// The config the DaemonSet ships (`deploy/kubernetes/pods-configmap.yaml`) loads.
    #[test]
    fn the_shipped_pods_configmap_loads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kubernetes/pods-configmap.yaml"
        );
        let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = cm["data"]["pods.yaml"].as_str().unwrap();
        let pods = Pods::new(
            serde_yaml::from_str(text).unwrap(),
            Path::new("/sys/fs/cgroup"),
        )
        .unwrap();
        assert_eq!(pods.rules.len(), 1);
        let project = cm["data"]["coder.keyzero.toml"].as_str().unwrap();
        assert!(project.parse::<toml::Table>().is_ok());
    }

    #[test]
    fn refusals_have_specific_codes() {
        assert_eq!(
            PodError::Token(TokenError::BadSignature).status_code(),
            (StatusCode::UNAUTHORIZED, "bad_signature")
        );
        assert_eq!(
            PodError::Token(TokenError::Expired).status_code().1,
            "token_expired"
        );
        assert_eq!(
            PodError::Token(TokenError::WrongAudience("kz".into()))
                .status_code()
                .1,
            "wrong_audience"
        );
        let away = PodError::Cgroup(KubepodsError::NotOnNode {
            uid: "u".into(),
            root: "/r".into(),
        });
        assert_eq!(
            away.status_code(),
            (StatusCode::NOT_FOUND, "pod_not_on_node")
        );
    }
}
