//! `keyzero`: a remote kz or KeyZero PDP. `POST {endpoint}/v1/resolve` with
//! `Authorization: Bearer <token>` and `{"ref": REF}`; the answer's `results[REF]` carries
//! `allowed`, `value` (mode direct) or `token` (mode short_lived, returned as the secret), or a
//! `reason`/`error`. KeyZero 0.1's `{"allowed", "secrets": {name: {value}}}` answer is read too.
//!
//! Settings (KeyZero's names): `endpoint` (https, or http on loopback), `token`, or
//! `token_source` = `env:VAR` | `file:PATH`, `ca_cert`. The request param `secret_name` picks
//! one secret of a 0.1 answer.

use super::http::{HttpClient, HttpResponse};
use super::settings::{self, Common};
use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use serde_json::{Map, Value};
use std::path::PathBuf;

pub(super) const SETTINGS: &[&str] = &["endpoint", "token", "token_source", "audience", "ca_cert"];
const KIND: &str = "keyzero";

/// The variable `token_source = "env:NAME"` reads the bearer token from, if that is the setting.
pub(super) fn login_var(s: &Map<String, Value>) -> Option<String> {
    match s.get("token_source") {
        Some(Value::String(src)) => src
            .strip_prefix("env:")
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
        _ => None,
    }
}

#[derive(Debug)]
enum TokenSource {
    None,
    Static(Secret),
    Env(String),
    File(PathBuf),
}

#[derive(Debug)]
pub struct KeyzeroResolver {
    endpoint: String,
    token: TokenSource,
    http: HttpClient,
}

impl KeyzeroResolver {
    pub fn new(s: &Map<String, Value>, common: &Common) -> Result<Self, ResolveError> {
        let endpoint = settings::string(KIND, s, "endpoint")?
            .ok_or_else(|| {
                ResolveError::Config(format!(
                    "{KIND}: setting `endpoint` is required (the PDP's base URL, e.g. https://kz.internal:8443)"
                ))
            })?
            .trim_end_matches('/')
            .to_owned();
        let loopback = ["http://localhost", "http://127.", "http://[::1]"]
            .iter()
            .any(|p| endpoint.starts_with(p));
        if !endpoint.starts_with("https://") && !loopback {
            return Err(settings::bad(
                KIND,
                "endpoint",
                "must use https:// (plain http only on localhost/127.0.0.1)",
            ));
        }
        let token = match settings::string(KIND, s, "token_source")? {
            Some(src) => {
                if let Some(var) = src.strip_prefix("env:") {
                    if var.is_empty() {
                        return Err(settings::bad(
                            KIND,
                            "token_source",
                            "'env:' needs a variable name, e.g. env:KZ_TOKEN",
                        ));
                    }
                    TokenSource::Env(var.to_owned())
                } else if let Some(path) = src.strip_prefix("file:") {
                    if path.is_empty() {
                        return Err(settings::bad(
                            KIND,
                            "token_source",
                            "'file:' needs a path, e.g. file:/var/run/secrets/token",
                        ));
                    }
                    TokenSource::File(PathBuf::from(path))
                } else {
                    return Err(settings::bad(
                        KIND,
                        "token_source",
                        &format!("'{src}' is not supported by kz; use env:VAR or file:PATH"),
                    ));
                }
            }
            None => match settings::secret(KIND, s, "token")? {
                Some(t) => TokenSource::Static(t),
                None => TokenSource::None,
            },
        };
        let ca = settings::path(KIND, s, "ca_cert")?;
        let http = HttpClient::new(
            KIND,
            &endpoint,
            ca.as_deref(),
            common.timeout,
            common.retries,
        )?;
        Ok(Self {
            endpoint,
            token,
            http,
        })
    }

    fn bearer(&self, reference: &str) -> Result<Option<Secret>, ResolveError> {
        let fail = |message: String| ResolveError::Backend {
            backend: KIND.into(),
            reference: reference.into(),
            message,
        };
        Ok(match &self.token {
            TokenSource::None => None,
            TokenSource::Static(t) => Some(t.clone()),
            TokenSource::Env(var) => {
                Some(Secret::new(settings::env(var).ok_or_else(|| {
                    fail(format!("token_source variable {var} is not set"))
                })?))
            }
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| fail(format!("cannot read token file {}: {e}", path.display())))?;
                Some(Secret::new(text.trim()))
            }
        })
    }

    async fn lookup(&self, request: &SecretRequest) -> Result<Secret, ResolveError> {
        let reference = request.reference.as_str();
        let bearer = self.bearer(reference)?;
        let body = serde_json::json!({ "ref": reference }).to_string();
        let url = format!("{}/v1/resolve", self.endpoint);
        let make = || {
            let mut b = Request::builder()
                .method(Method::POST)
                .uri(url.as_str())
                .header("content-type", "application/json");
            if let Some(t) = &bearer {
                b = b.header("authorization", format!("Bearer {}", t.expose()));
            }
            b.body(Full::new(Bytes::from(body.clone()))).map_err(|_| {
                ResolveError::Config(format!(
                    "{KIND}: the endpoint or token contains characters not allowed in HTTP"
                ))
            })
        };
        let resp = self.http.send(reference, make, |_| false).await?;
        let doc = resp.json();
        match resp.status {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(ResolveError::Unauthorized {
                    backend: KIND.into(),
                    reference: reference.into(),
                    message: format!("the PDP answered {}{}", resp.status, reason(&resp)),
                });
            }
            status => {
                return Err(ResolveError::Backend {
                    backend: KIND.into(),
                    reference: reference.into(),
                    message: format!("the PDP answered {status}{}", reason(&resp)),
                });
            }
        }
        let doc = doc.ok_or_else(|| ResolveError::Backend {
            backend: KIND.into(),
            reference: reference.into(),
            message: "the PDP answered with something that is not JSON".into(),
        })?;
        let result = match doc.get("results") {
            Some(results) => {
                results
                    .get(reference)
                    .cloned()
                    .ok_or_else(|| ResolveError::Backend {
                        backend: KIND.into(),
                        reference: reference.into(),
                        message: "the PDP's answer has no result for this reference".into(),
                    })?
            }
            None => legacy_result(&doc, request.params.get("secret_name").map(String::as_str)),
        };
        if result.get("allowed").and_then(Value::as_bool) != Some(true) {
            let why = ["reason", "error", "policy"]
                .iter()
                .find_map(|k| result.get(*k).and_then(Value::as_str))
                .unwrap_or("no reason given");
            return Err(ResolveError::Denied {
                backend: KIND.into(),
                reference: reference.into(),
                reason: why.to_owned(),
            });
        }
        if let Some(err) = result.get("error").and_then(Value::as_str) {
            return Err(ResolveError::Backend {
                backend: KIND.into(),
                reference: reference.into(),
                message: format!("the PDP could not resolve it: {err}"),
            });
        }
        match result
            .get("value")
            .or_else(|| result.get("token"))
            .and_then(Value::as_str)
        {
            Some(v) => Ok(Secret::new(v)),
            None => Err(ResolveError::Backend {
                backend: KIND.into(),
                reference: reference.into(),
                message: "the PDP allowed it but sent neither value nor token".into(),
            }),
        }
    }
}

/// KeyZero 0.1: `{"allowed": bool, "secrets": {"name": {"value": ..}}}` → the 0.3 result shape.
fn legacy_result(doc: &Value, secret_name: Option<&str>) -> Value {
    let secrets = doc.get("secrets").and_then(Value::as_object);
    let entry = match (secrets, secret_name) {
        (Some(s), Some(name)) => s.get(name),
        (Some(s), None) => s.values().next(),
        (None, _) => None,
    };
    let mut out =
        serde_json::json!({ "allowed": doc.get("allowed").cloned().unwrap_or(Value::Bool(false)) });
    if let Some(v) = entry.and_then(|e| e.get("value")) {
        out["value"] = v.clone();
    }
    for k in ["reason", "error"] {
        if let Some(v) = doc.get(k) {
            out[k] = v.clone();
        }
    }
    out
}

/// `: reason` from a PDP error body (`{"error": "invalid_token", "reason": ".."}`).
fn reason(resp: &HttpResponse) -> String {
    let Some(doc) = resp.json() else {
        return String::new();
    };
    let parts: Vec<&str> = ["error", "reason", "message"]
        .iter()
        .filter_map(|k| doc.get(*k).and_then(Value::as_str))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(": "))
    }
}

impl Resolver for KeyzeroResolver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn resolve<'a>(
        &'a self,
        request: &'a SecretRequest,
    ) -> BoxFuture<'a, Result<Secret, ResolveError>> {
        Box::pin(self.lookup(request))
    }
}
