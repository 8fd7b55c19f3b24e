//! `hashicorp_vault` (KeyZero: `hashicorp`): HashiCorp Vault and OpenBao KV secrets.
//!
//! Settings (KeyZero names kept): `address` (else VAULT_ADDR, else http://127.0.0.1:8200),
//! `token` (else VAULT_TOKEN), `namespace` (else VAULT_NAMESPACE), `auth_method` = `token` |
//! `approle`, AppRole's `role_id` (KeyZero bundles: `auth_role`; else VAULT_ROLE_ID) and
//! `secret_id` (else VAULT_SECRET_ID), `auth_mount` (default `approle`), `kv_version` = 1 | 2
//! (default: detected per mount), `ca_cert` (else VAULT_CACERT) a PEM CA for the server's TLS.
//!
//! References: the KV path, e.g. `secret/myapp` (kz inserts `/data/` for KV v2 mounts) or the
//! full API path `secret/data/myapp` as KeyZero users write it. `field` selects one key; without
//! it a one-key secret yields that value and a larger one its JSON (KeyZero's behaviour).

use super::http::{HttpClient, HttpResponse, checked_path, encode_path};
use super::settings::{self, Common};
use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub(super) const SETTINGS: &[&str] = &[
    "address",
    "token",
    "namespace",
    "auth",
    "auth_method",
    "auth_role",
    "role_id",
    "secret_id",
    "auth_mount",
    "kv_version",
    "ca_cert",
    // KeyZero's backend_to_config passes these through for every backend type.
    "path",
    "vault",
    "region",
];
const KIND: &str = "hashicorp_vault";
const DEFAULT_ADDR: &str = "http://127.0.0.1:8200";
const TOKEN_VAR: &str = "VAULT_TOKEN";
const ROLE_ID_VAR: &str = "VAULT_ROLE_ID";
const SECRET_ID_VAR: &str = "VAULT_SECRET_ID";

/// Environment variables holding a login to the server: the ones this resolver reads (the
/// token, AppRole's ids) and OpenBao's name for the token (BAO_TOKEN, what the `bao` CLI
/// reads), which logs in to the same server. Whatever `auth_method` says: the agent gets none.
pub(super) const LOGIN_VARS: &[&str] = &[TOKEN_VAR, "BAO_TOKEN", ROLE_ID_VAR, SECRET_ID_VAR];

#[derive(Debug)]
enum Auth {
    Token(Secret),
    AppRole {
        mount: String,
        role_id: Secret,
        secret_id: Option<Secret>,
        /// The login token and when to log in again.
        session: Mutex<Option<(Secret, Instant)>>,
    },
}

#[derive(Debug)]
pub struct VaultResolver {
    address: String,
    namespace: Option<String>,
    auth: Auth,
    kv_version: Option<u8>,
    http: HttpClient,
    /// Mount path (`secret/`) → KV version, learned from `sys/internal/ui/mounts`.
    mounts: Mutex<HashMap<String, u8>>,
}

impl VaultResolver {
    pub fn new(s: &Map<String, Value>, common: &Common) -> Result<Self, ResolveError> {
        let address = settings::string(KIND, s, "address")?
            .or_else(|| settings::env("VAULT_ADDR"))
            .unwrap_or_else(|| DEFAULT_ADDR.to_owned())
            .trim_end_matches('/')
            .to_owned();
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(settings::bad(
                KIND,
                "address",
                "must start with http:// or https://",
            ));
        }
        let namespace =
            settings::string(KIND, s, "namespace")?.or_else(|| settings::env("VAULT_NAMESPACE"));
        // A bundle's `auth: {method, role}` arrives nested; KeyZero flattens it to auth_method /
        // auth_role. Both are read.
        let nested = match s.get("auth") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(settings::bad(
                    KIND,
                    "auth",
                    "must be a table {method, role}",
                ));
            }
        };
        let method = settings::string(KIND, s, "auth_method")?
            .or(settings::string(KIND, &nested, "method")?)
            .unwrap_or_else(|| "token".into());
        let nested_role = settings::string(KIND, &nested, "role")?;
        let auth = match method.as_str() {
            "token" => {
                let token = settings::secret(KIND, s, "token")?
                    .or_else(|| settings::env(TOKEN_VAR).map(Secret::new))
                    .ok_or_else(|| {
                        ResolveError::MissingEnvironment(format!(
                            "{KIND}: no Vault token: set `token` in the resolver settings or the VAULT_TOKEN environment variable (or use auth_method = \"approle\")"
                        ))
                    })?;
                Auth::Token(token)
            }
            "approle" => {
                let role_id = settings::string(KIND, s, "role_id")?
                    .or(settings::string(KIND, s, "auth_role")?)
                    .or(nested_role)
                    .or_else(|| settings::env(ROLE_ID_VAR))
                    .ok_or_else(|| {
                        ResolveError::MissingEnvironment(format!(
                            "{KIND}: AppRole needs a role id: set `role_id` (or `auth_role`) or VAULT_ROLE_ID"
                        ))
                    })?;
                let secret_id = settings::secret(KIND, s, "secret_id")?
                    .or_else(|| settings::env(SECRET_ID_VAR).map(Secret::new));
                Auth::AppRole {
                    mount: settings::string(KIND, s, "auth_mount")?
                        .unwrap_or_else(|| "approle".into())
                        .trim_matches('/')
                        .to_owned(),
                    role_id: Secret::new(role_id),
                    secret_id,
                    session: Mutex::new(None),
                }
            }
            other => {
                return Err(settings::bad(
                    KIND,
                    "auth_method",
                    &format!(
                        "is '{other}'; supported: token, approle{}",
                        crate::suggest::hint(other, ["token", "approle"])
                    ),
                ));
            }
        };
        let kv_version = match settings::uint(KIND, s, "kv_version")? {
            None => None,
            Some(1) => Some(1),
            Some(2) => Some(2),
            Some(_) => return Err(settings::bad(KIND, "kv_version", "must be 1 or 2")),
        };
        let ca = settings::path(KIND, s, "ca_cert")?
            .or_else(|| settings::env("VAULT_CACERT").map(Into::into));
        let http = HttpClient::new(
            KIND,
            &address,
            ca.as_deref(),
            common.timeout,
            common.retries,
        )?;
        if address.starts_with("http://") && !is_loopback_url(&address) {
            tracing::warn!(
                address,
                "Vault address is plain http: tokens and secrets travel unencrypted"
            );
        }
        Ok(Self {
            address,
            namespace,
            auth,
            kv_version,
            http,
            mounts: Mutex::new(HashMap::new()),
        })
    }

    fn request(
        &self,
        method: Method,
        api_path: &str,
        token: Option<&Secret>,
        body: Option<&Value>,
    ) -> Result<Request<Full<Bytes>>, ResolveError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}/v1/{}", self.address, api_path));
        if let Some(token) = token {
            builder = builder.header("X-Vault-Token", token.expose());
        }
        if let Some(ns) = &self.namespace {
            builder = builder.header("X-Vault-Namespace", ns.as_str());
        }
        let body = match body {
            Some(v) => {
                builder = builder.header("Content-Type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        // The header value is the only place a token could surface in an error; say which
        // setting is malformed without quoting it.
        builder.body(body).map_err(|_| {
            ResolveError::Config(format!(
                "{KIND}: the Vault address, namespace or token contains characters not allowed in HTTP"
            ))
        })
    }

    /// The token to send: the static one, or a (cached) AppRole login.
    async fn token(&self, reference: &str, fresh: bool) -> Result<Secret, ResolveError> {
        match &self.auth {
            Auth::Token(t) => Ok(t.clone()),
            Auth::AppRole {
                mount,
                role_id,
                secret_id,
                session,
            } => {
                let mut session = session.lock().await;
                if !fresh
                    && let Some((token, until)) = session.as_ref()
                    && Instant::now() < *until
                {
                    return Ok(token.clone());
                }
                let mut body = serde_json::json!({ "role_id": role_id.expose() });
                if let Some(sid) = secret_id {
                    body["secret_id"] = Value::String(sid.expose().to_owned());
                }
                let path = format!("auth/{}/login", encode_path(mount));
                let resp = self
                    .http
                    .send(
                        reference,
                        || self.request(Method::POST, &path, None, Some(&body)),
                        |_| false,
                    )
                    .await?;
                drop(body);
                if !resp.status.is_success() {
                    return Err(ResolveError::Unauthorized {
                        backend: KIND.into(),
                        reference: reference.into(),
                        message: format!(
                            "AppRole login at auth/{mount} failed ({}){}",
                            resp.status,
                            vault_errors(&resp)
                        ),
                    });
                }
                let doc = resp.json().unwrap_or(Value::Null);
                let token = doc
                    .pointer("/auth/client_token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ResolveError::Backend {
                        backend: KIND.into(),
                        reference: reference.into(),
                        message: "AppRole login answered without auth.client_token".into(),
                    })?;
                let lease = doc
                    .pointer("/auth/lease_duration")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                // Log in again when 90% of the lease has passed (lease 0 = no expiry).
                let ttl = if lease == 0 {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_secs(lease).mul_f64(0.9)
                };
                let token = Secret::new(token);
                *session = Some((token.clone(), Instant::now() + ttl));
                Ok(token)
            }
        }
    }

    /// KV version of the mount holding `path`, from `kv_version`, an explicit `/data/`, or by
    /// asking Vault (`sys/internal/ui/mounts/PATH`, readable by any token, as the `vault kv`
    /// CLI does). Returns the version and the mount prefix (`secret/`).
    async fn kv_layout(
        &self,
        path: &str,
        token: &Secret,
        reference: &str,
    ) -> Result<(u8, Option<String>), ResolveError> {
        if let Some(v) = self.kv_version {
            return Ok((v, None));
        }
        // The lock is held across the lookup so that concurrent first reads of one mount ask
        // Vault once (`kz run` resolves all its secrets at the same time).
        let mut mounts = self.mounts.lock().await;
        if let Some((mount, v)) = mounts
            .iter()
            .filter(|(m, _)| path.starts_with(m.as_str()))
            .max_by_key(|(m, _)| m.len())
        {
            return Ok((*v, Some(mount.clone())));
        }
        let api = format!("sys/internal/ui/mounts/{}", encode_path(path));
        let resp = self
            .http
            .send(
                reference,
                || self.request(Method::GET, &api, Some(token), None),
                |_| false,
            )
            .await?;
        let doc = resp.json().filter(|_| resp.status.is_success());
        let mount = doc
            .as_ref()
            .and_then(|d| d.pointer("/data/path"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let version = doc
            .as_ref()
            .and_then(|d| d.pointer("/data/options/version"))
            .and_then(Value::as_str)
            .and_then(|v| v.parse::<u8>().ok())
            .unwrap_or(1);
        match mount {
            Some(mount) => {
                mounts.insert(mount.clone(), version);
                Ok((version, Some(mount)))
            }
            // Detection not allowed or not a KV mount: read the path as given (KV v1 / KeyZero).
            None => Ok((1, None)),
        }
    }

    async fn lookup(&self, request: &SecretRequest) -> Result<Secret, ResolveError> {
        let reference = request.reference.as_str();
        let path = checked_path(KIND, reference)?;
        let mut token = self.token(reference, false).await?;
        let mut relogged = false;
        loop {
            let explicit_v2 = path.split('/').nth(1) == Some("data");
            let (version, api_path) = if explicit_v2 && self.kv_version != Some(1) {
                (2, path.to_owned())
            } else {
                match self.kv_layout(path, &token, reference).await? {
                    (2, mount) => {
                        let mount = mount.unwrap_or_else(|| {
                            path.split('/').next().unwrap_or_default().to_owned() + "/"
                        });
                        let rest = path
                            .strip_prefix(mount.as_str())
                            .unwrap_or(path)
                            .trim_start_matches('/');
                        (2, format!("{}/data/{rest}", mount.trim_end_matches('/')))
                    }
                    (v, _) => (v, path.to_owned()),
                }
            };
            let api = encode_path(&api_path);
            let resp = self
                .http
                .send(
                    reference,
                    || self.request(Method::GET, &api, Some(&token), None),
                    |_| false,
                )
                .await?;
            match resp.status {
                s if s.is_success() => return extract(&resp, version, request),
                StatusCode::NOT_FOUND => {
                    return Err(ResolveError::NotFound {
                        backend: KIND.into(),
                        reference: reference.into(),
                    });
                }
                StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                    // An AppRole token may have been revoked or expired early: log in once more.
                    if matches!(self.auth, Auth::AppRole { .. }) && !relogged {
                        relogged = true;
                        token = self.token(reference, true).await?;
                        continue;
                    }
                    return Err(ResolveError::Unauthorized {
                        backend: KIND.into(),
                        reference: reference.into(),
                        message: format!("Vault answered {}{}", resp.status, vault_errors(&resp)),
                    });
                }
                status => {
                    return Err(ResolveError::Backend {
                        backend: KIND.into(),
                        reference: reference.into(),
                        message: format!("Vault answered {status}{}", vault_errors(&resp)),
                    });
                }
            }
        }
    }
}

/// Picks the value out of a KV read: v2 `data.data`, v1 `data`.
fn extract(
    resp: &HttpResponse,
    version: u8,
    request: &SecretRequest,
) -> Result<Secret, ResolveError> {
    let reference = request.reference.as_str();
    let doc = resp.json().ok_or_else(|| ResolveError::Backend {
        backend: KIND.into(),
        reference: reference.into(),
        message: "Vault answered with something that is not JSON".into(),
    })?;
    let data = if version == 2 {
        doc.pointer("/data/data")
    } else {
        doc.get("data")
    };
    let data = match data {
        // KV v2 answers a deleted or destroyed latest version with data = null.
        None | Some(Value::Null) => {
            return Err(ResolveError::NotFound {
                backend: KIND.into(),
                reference: reference.into(),
            });
        }
        Some(d) => d,
    };
    let value = match (&request.field, data) {
        (Some(field), Value::Object(map)) => match map.get(field) {
            Some(v) => super::file::json_scalar(v),
            None => {
                return Err(ResolveError::FieldMissing {
                    backend: KIND.into(),
                    reference: reference.into(),
                    field: field.clone(),
                });
            }
        },
        (Some(field), _) => {
            return Err(ResolveError::FieldMissing {
                backend: KIND.into(),
                reference: reference.into(),
                field: field.clone(),
            });
        }
        (None, Value::Object(map)) if map.len() == 1 => map
            .values()
            .next()
            .map(super::file::json_scalar)
            .unwrap_or_default(),
        (None, other) => super::file::json_scalar(other),
    };
    Ok(Secret::new(value))
}

/// `: msg1; msg2` from Vault's `{"errors": [..]}` (Vault's messages never carry secret data).
fn vault_errors(resp: &HttpResponse) -> String {
    let msgs: Vec<String> = resp
        .json()
        .and_then(|d| d.get("errors").cloned())
        .and_then(|e| e.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m.as_str().map(|s| s.trim().replace('\n', " ")))
        .filter(|m| !m.is_empty())
        .collect();
    if msgs.is_empty() {
        String::new()
    } else {
        format!(": {}", msgs.join("; "))
    }
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    rest.starts_with("127.") || rest.starts_with("localhost") || rest.starts_with("[::1]")
}

impl Resolver for VaultResolver {
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
