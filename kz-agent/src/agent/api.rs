//! The local API: JSON over HTTP/1.1 on the daemon's unix socket.
//!
//! | method and path               | what                                              |
//! |-------------------------------|---------------------------------------------------|
//! | `GET /v1/status`              | the daemon: version, kernel, sandbox counts, you  |
//! | `POST /v1/sandboxes`          | create one from `{"name", "project_dir"}` (201)   |
//! | `GET /v1/sandboxes`           | the sandboxes you may see                         |
//! | `GET /v1/sandboxes/{id}`      | one of them                                       |
//! | `DELETE /v1/sandboxes/{id}`   | destroy it (its processes are killed)             |
//! | `GET /v1/sandboxes/{id}/events` | its audit records as JSON lines, live ([`super::events`]) |
//! | `GET /v1/events`              | the same for every sandbox you may see            |
//! | `POST /v1/runs`               | start a command as you in a sandbox ([`super::runs`]) |
//! | `/v1/pods…`                   | Kubernetes pods ([`super::pods`])                 |
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` with a matching status. Who asks is
//! the connection's SO_PEERCRED ([`super::auth`]); every refusal is audited (`api_refused`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::auth::Caller;
use super::events::{EventsError, Scope};
use super::state::{CreateRequest, Registry, SandboxInfo, StateError};
use crate::audit::AuditEvent;

/// A create request's body is a name and a path.
const MAX_BODY: usize = 64 * 1024;

/// An answer's body: JSON in one piece, or an event stream.
pub type ApiBody = http_body_util::Either<Full<Bytes>, super::events::Stream>;

/// What the handlers share.
pub struct Api {
    pub registry: Registry,
    pub started: Instant,
    pub socket: std::path::PathBuf,
    /// The daemon's audit log (masked in a run's mount namespace).
    pub audit_log: std::path::PathBuf,
    /// The runs in progress ([`super::runs`]), aborted at shutdown before the sandboxes go.
    pub runs: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Kubernetes pods (`--pods FILE`); none: `/v1/pods` is refused.
    pub pods: Option<super::pods::Pods>,
}

/// One request of `caller`, answered.
pub async fn handle(
    api: Arc<Api>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    use http_body_util::Either;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if method == Method::GET && path == "/metrics" {
        return Ok(Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Either::Left(Full::new(Bytes::from(metrics(&api, &caller)))))
            .unwrap_or_else(|_| Response::new(Either::Left(Full::new(Bytes::new())))));
    }
    let routed = if path.trim_end_matches('/') == "/v1/runs" && method == Method::POST {
        // An upgraded connection: its answer is `101` with no body, or an error below.
        match super::runs::start(api.clone(), caller, req).await {
            Ok(resp) => return Ok(resp.map(Either::Left)),
            Err(e) => Err(e),
        }
    } else if let Some(scope) = events_scope(&method, &path) {
        // A streaming answer: its body is the stream, or an error below.
        match scope.and_then(|scope| events(&api, &caller, scope, req.uri().query())) {
            Ok(resp) => return Ok(resp),
            Err(e) => Err(e),
        }
    } else {
        route(&api, &caller, req).await
    };
    let (status, body) = match routed {
        Ok((status, v)) => (status, v),
        Err(e) => {
            let (status, code) = e.status_code();
            api.registry.record(
                AuditEvent::new("api_refused")
                    .with("method", method.as_str().to_owned())
                    .with("path", path)
                    .with("uid", caller.uid)
                    .with("caller_pid", caller.pid)
                    .with("status", status.as_u16())
                    .with("reason", code),
            );
            (
                status,
                json!({"error": {"code": code, "message": e.to_string()}}),
            )
        }
    };
    let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
    text.push(b'\n');
    let resp = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from(text))))
        .unwrap_or_else(|_| Response::new(Either::Left(Full::new(Bytes::new()))));
    Ok(resp)
}

/// Whether `GET path` asks for an event stream, and of what.
fn events_scope(method: &Method, path: &str) -> Option<Result<Scope, ApiError>> {
    if method != Method::GET {
        return None;
    }
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "events"] => Some(Ok(Scope::All)),
        ["v1", "sandboxes", id, "events"] => Some(parse_id(id).map(Scope::Sandbox)),
        _ => None,
    }
}

/// An event stream's answer: `200`, `application/x-ndjson`, chunked, one record a line.
fn events(
    api: &Api,
    caller: &Caller,
    scope: Scope,
    query: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let (mut since, mut follow) = (0, true);
    for (k, v) in query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        if k == "since" {
            since = v.parse().map_err(|_| EventsError::BadSince(v.to_owned()))?;
        }
        if k == "follow" {
            follow = !matches!(v, "0" | "false" | "no");
        }
    }
    let stream = api
        .registry
        .events()
        .subscribe(caller, scope, since, follow)?;
    api.registry.record(
        AuditEvent::new("events_opened")
            .with("uid", caller.uid)
            .with("caller_pid", caller.pid)
            .with(
                "scope",
                match scope {
                    Scope::Sandbox(id) => Value::from(id),
                    Scope::All => Value::from("all"),
                },
            ),
    );
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-store")
        .body(http_body_util::Either::Right(stream))
        .map_err(|e| ApiError::BadBody(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no such endpoint {0} {1}; see docs/agent.md (GET /v1/status, /v1/sandboxes)")]
    NotFound(Method, String),
    #[error("{0} is not allowed on {1}")]
    Method(Method, String),
    #[error("sandbox ids are numbers (the cgroup id), got {0:?}")]
    BadId(String),
    #[error(
        "the body must be JSON {{\"name\": \"…\", \"project_dir\": \"/abs/path\"}} of at most 64 KiB: {0}"
    )]
    BadBody(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Exec(#[from] super::runs::ExecError),
    #[error(transparent)]
    Pod(#[from] super::pods::PodError),
    #[error(transparent)]
    Events(#[from] EventsError),
}

impl ApiError {
    /// The HTTP status and the stable error code of the JSON answer.
    pub(crate) fn status_code(&self) -> (StatusCode, &'static str) {
        use super::secrets::SecretsError as S;
        match self {
            ApiError::NotFound(..) => (StatusCode::NOT_FOUND, "no_such_endpoint"),
            ApiError::Method(..) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::BadId(_) => (StatusCode::BAD_REQUEST, "bad_id"),
            ApiError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            ApiError::Exec(e) => e.status_code(),
            ApiError::Pod(e) => e.status_code(),
            ApiError::Events(e) => match e {
                EventsError::NotFound(_) => (StatusCode::NOT_FOUND, "no_such_sandbox"),
                EventsError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                EventsError::TooMany => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"),
                EventsError::BadSince(_) => (StatusCode::BAD_REQUEST, "bad_since"),
            },
            ApiError::State(e) => match e {
                StateError::BadName(_) => (StatusCode::BAD_REQUEST, "bad_name"),
                StateError::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
                StateError::TooMany => (StatusCode::TOO_MANY_REQUESTS, "too_many_sandboxes"),
                StateError::NotFound(_) => (StatusCode::NOT_FOUND, "no_such_sandbox"),
                StateError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
                StateError::Secrets(
                    S::Relative(_) | S::RelativeStateDir(_) | S::UpstreamCa(_) | S::NoSecrets(_),
                ) => (StatusCode::BAD_REQUEST, "bad_project"),
                // The project's config changed since its owner last approved it.
                StateError::Secrets(S::Approval { reason, .. })
                    if reason == "config_changed" || reason == "config_agent_writable" =>
                {
                    (StatusCode::FORBIDDEN, "not_approved")
                }
                // The owner's approvals store cannot be used (unsafe, unwritable, corrupt).
                StateError::Secrets(S::Approval { .. }) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "approvals_unusable")
                }
                StateError::Secrets(S::Config(_)) => (StatusCode::BAD_REQUEST, "bad_config"),
                StateError::Secrets(_) => (StatusCode::UNPROCESSABLE_ENTITY, "resolution_failed"),
                StateError::Blind(_) | StateError::Resolver(_) => {
                    (StatusCode::BAD_REQUEST, "bad_config")
                }
                StateError::Ca(_)
                | StateError::Sandbox(_)
                | StateError::NoCgroup
                | StateError::Persist(_) => (StatusCode::INTERNAL_SERVER_ERROR, "admission_failed"),
            },
        }
    }
}

async fn route(
    api: &Api,
    caller: &Caller,
    req: Request<Incoming>,
) -> Result<(StatusCode, Value), ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let ok = |v: Value| Ok((StatusCode::OK, v));
    match (segments.as_slice(), &method) {
        (["v1", "status"], &Method::GET) => ok(status(api, caller)),
        (["v1", "sandboxes"], &Method::GET) => ok(to_json(&api.registry.list(caller))),
        (["v1", "sandboxes"], &Method::POST) => {
            let body = Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ApiError::BadBody(e.to_string()))?
                .to_bytes();
            let create: CreateRequest =
                serde_json::from_slice(&body).map_err(|e| ApiError::BadBody(e.to_string()))?;
            let info = api.registry.create(caller, create).await?;
            Ok((StatusCode::CREATED, to_json(&info)))
        }
        (["v1", "sandboxes", id], &Method::GET) => {
            ok(to_json(&api.registry.get(caller, parse_id(id)?)?))
        }
        (["v1", "sandboxes", id], &Method::DELETE) => {
            ok(to_json(&api.registry.remove(caller, parse_id(id)?).await?))
        }
        (["v1", "pods", ..], _) => super::pods::route(api, caller, req).await,
        (
            ["v1", "status"]
            | ["v1", "sandboxes"]
            | ["v1", "sandboxes", _]
            | ["v1", "runs"]
            | ["v1", "events"]
            | ["v1", "sandboxes", _, "events"],
            _,
        ) => Err(ApiError::Method(method, path)),
        _ => Err(ApiError::NotFound(method, path)),
    }
}

fn parse_id(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| ApiError::BadId(s.to_owned()))
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn status(api: &Api, caller: &Caller) -> Value {
    let node = api.registry.node();
    let mut v = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "kernel": node.kernel(),
        "socket": api.socket,
        "uptime_secs": api.started.elapsed().as_secs(),
        "sandboxes": api.registry.list(caller).len(),
        "caller": {"uid": caller.uid, "gid": caller.gid, "admin": caller.admin},
    });
    // How many sandboxes others run, and where, is the admins' business.
    if caller.admin {
        v["sandboxes_total"] = json!(api.registry.count());
        v["cgroup_dir"] = json!(node.cgroup_dir());
    }
    v
}

/// A counter series: its name, help text and how to read it off a sandbox.
type Series = (&'static str, &'static str, fn(&SandboxInfo) -> u64);

/// `GET /metrics`: Prometheus text, one series per sandbox the caller may see (labelled with
/// its id, name and owner), plus the node's sandbox count for admins. Scraped over the socket
/// (`curl --unix-socket /run/kz/agent.sock http://kz/metrics`) or by a sidecar that forwards it.
fn metrics(api: &Api, caller: &Caller) -> String {
    use std::fmt::Write as _;
    let sandboxes = api.registry.list(caller);
    let mut out = String::new();
    let series: [Series; 3] = [
        (
            "kz_sandbox_requests_total",
            "Requests the proxy served for the sandbox.",
            |s| s.counters.requests,
        ),
        (
            "kz_sandbox_requests_swapped_total",
            "Requests in which a masked token was swapped for its value.",
            |s| s.counters.requests_swapped,
        ),
        (
            "kz_sandbox_refused_total",
            "Connections, names and requests of the sandbox that kz refused.",
            |s| s.counters.refused,
        ),
    ];
    for (name, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for s in &sandboxes {
            let _ = writeln!(
                out,
                "{name}{{sandbox=\"{}\",name=\"{}\",owner_uid=\"{}\"}} {}",
                s.id,
                label(&s.name),
                s.owner_uid,
                value(s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP kz_sandboxes Sandboxes the caller may see.\n# TYPE kz_sandboxes gauge\nkz_sandboxes {}",
        sandboxes.len()
    );
    if caller.admin {
        let _ = writeln!(
            out,
            "# HELP kz_node_sandboxes Sandboxes on the node.\n# TYPE kz_node_sandboxes gauge\nkz_node_sandboxes {}",
            api.registry.count()
        );
    }
    out
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_have_specific_codes() {
        let forbidden = ApiError::State(StateError::Forbidden(7));
        assert_eq!(
            forbidden.status_code(),
            (StatusCode::FORBIDDEN, "forbidden")
        );
        assert!(forbidden.to_string().contains("another user"));
        let missing = ApiError::State(StateError::NotFound(7));
        assert_eq!(missing.status_code().0, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::BadId("x".into()).status_code().1, "bad_id");
    }
}
