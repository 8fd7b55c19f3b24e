//! Identity: verifies an agent's JWT against the bundle's issuers and maps its claims to the
//! normalised identity the policies see (issuer, org, service, env, action, branch, actor, groups,
//! claims).
//!
//! Every way a token can be wrong has its own [`TokenError`] variant and stable `reason` code, so
//! a 401 says exactly what failed. The algorithm is pinned per key: the header's `alg` must equal
//! the key's configured `alg` before any cryptography runs, which shuts out `none`, HS256 signed
//! with an RSA public key, and kid/alg mismatches alike.

mod jwks;

use crate::bundle::{Issuer, IssuerType, StaticKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cel_interpreter::Value as CelValue;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use jwks::JwksError;

/// Default clock skew allowed on exp/nbf/iat.
pub const DEFAULT_LEEWAY_SECONDS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token: send `Authorization: Bearer <jwt>`")]
    Missing,
    #[error("token is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("alg `none` is never accepted: tokens must be signed")]
    AlgNone,
    #[error("alg `{0}` is not supported")]
    UnsupportedAlg(String),
    #[error("token has no `iss` claim")]
    MissingIssuer,
    #[error("issuer `{0}` is not configured in the bundle")]
    UnknownIssuer(String),
    #[error("token has no `kid` and issuer `{0}` has several keys")]
    MissingKid(String),
    #[error("issuer `{issuer}` has no key with kid `{kid}`")]
    UnknownKid { issuer: String, kid: String },
    #[error("key `{kid}` is pinned to {expected}, token says {got}")]
    AlgMismatch {
        kid: String,
        expected: String,
        got: String,
    },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    #[error("token audience does not match `{0}`")]
    WrongAudience(String),
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("cannot fetch the issuer's JWKS: {0}")]
    JwksUnavailable(String),
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
}

impl TokenError {
    /// Stable machine-readable reason, returned in 401 bodies and counted in metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing_token",
            TokenError::TooLarge { .. } => "token_too_large",
            TokenError::Malformed(_) => "malformed_token",
            TokenError::AlgNone => "alg_none",
            TokenError::UnsupportedAlg(_) => "unsupported_alg",
            TokenError::MissingIssuer => "missing_issuer",
            TokenError::UnknownIssuer(_) => "unknown_issuer",
            TokenError::MissingKid(_) => "missing_kid",
            TokenError::UnknownKid { .. } => "unknown_kid",
            TokenError::AlgMismatch { .. } => "alg_mismatch",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::IssuedInFuture => "token_issued_in_future",
            TokenError::WrongAudience(_) => "wrong_audience",
            TokenError::MissingClaim(_) => "missing_claim",
            TokenError::JwksUnavailable(_) => "jwks_unavailable",
            TokenError::InvalidClaims(_) => "invalid_claims",
        }
    }
}

/// Problems building a verifier from the bundle (key material, mappings).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("issuer `{issuer}` key `{kid}`: {message}")]
    Key {
        issuer: String,
        kid: String,
        message: String,
    },
    #[error("issuer `{issuer}` map `{field}`: the CEL expression does not compile: {message}")]
    Mapping {
        issuer: String,
        field: String,
        message: String,
    },
}

/// The normalised identity of a verified token.
#[derive(Clone)]
pub struct Identity {
    pub issuer: String,
    pub org: String,
    pub service: String,
    pub env: String,
    pub action: String,
    pub branch: String,
    pub actor: String,
    pub groups: Vec<String>,
    pub claims: Map<String, Value>,
    cel_claims: CelValue,
    cel_groups: CelValue,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("issuer", &self.issuer)
            .field("org", &self.org)
            .field("service", &self.service)
            .field("env", &self.env)
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn new<'a>(
        issuer: &str,
        claims: Map<String, Value>,
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
        groups: Vec<String>,
    ) -> Self {
        let mut id = Identity {
            issuer: issuer.to_owned(),
            org: String::new(),
            service: String::new(),
            env: String::new(),
            action: String::new(),
            branch: String::new(),
            actor: String::new(),
            cel_groups: CelValue::List(Arc::new(
                groups.iter().map(|g| CelValue::from(g.as_str())).collect(),
            )),
            groups,
            cel_claims: crate::cel::from_json_object(&claims),
            claims,
        };
        for (field, value) in fields {
            let slot = match field {
                "org" => &mut id.org,
                "service" => &mut id.service,
                "env" => &mut id.env,
                "action" => &mut id.action,
                "branch" => &mut id.branch,
                "actor" => &mut id.actor,
                _ => continue,
            };
            *slot = value.to_owned();
        }
        id
    }

    pub fn claims_value(&self) -> CelValue {
        self.cel_claims.clone()
    }

    pub fn groups_value(&self) -> CelValue {
        self.cel_groups.clone()
    }

    /// `sub` claim if present (used as the subject of kz tokens and in audit records).
    pub fn subject(&self) -> &str {
        self.claims.get("sub").and_then(Value::as_str).unwrap_or("")
    }
}

/// KeyZero's built-in claim-mapping profiles.
fn profile(kind: IssuerType) -> &'static [(&'static str, &'static str)] {
    match kind {
        IssuerType::GithubActions => &[
            ("org", "repository_owner"),
            ("service", "repository"),
            ("env", "environment"),
            ("action", "workflow"),
            ("branch", "ref"),
            ("actor", "actor"),
        ],
        IssuerType::Kubernetes => &[("org", "namespace"), ("service", "serviceaccount")],
        IssuerType::Gcp => &[("org", "project_id"), ("service", "email")],
        IssuerType::Aws => &[("org", "account_id"), ("service", "arn")],
        IssuerType::Custom => &[],
    }
}

enum Mapper {
    Claim(String),
    Cel(cel_interpreter::Program),
}

impl Mapper {
    fn new(issuer: &str, field: &str, spec: &str) -> Result<Self, IdentityError> {
        let plain = !spec.is_empty()
            && spec
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if plain {
            return Ok(Mapper::Claim(spec.to_owned()));
        }
        // `claims.agent_name`, `claims['x'] + '-' + claims.y`, … are CEL over `claims`. A spec
        // that is not CEL (an Auth0-style URL claim name) is a claim name.
        match crate::cel::compile(spec) {
            Ok(p) => Ok(Mapper::Cel(p)),
            Err(_) if !spec.starts_with("claims") => Ok(Mapper::Claim(spec.to_owned())),
            Err(e) => Err(IdentityError::Mapping {
                issuer: issuer.to_owned(),
                field: field.to_owned(),
                message: e.to_string(),
            }),
        }
    }

    /// The mapped value; a missing claim maps to nothing (KeyZero: empty string).
    fn apply(&self, claims: &Map<String, Value>, cel_claims: &CelValue) -> Option<Value> {
        match self {
            Mapper::Claim(name) => claims.get(name).cloned(),
            Mapper::Cel(program) => {
                let mut ctx = cel_interpreter::Context::default();
                ctx.add_variable_from_value("claims", cel_claims.clone());
                match program.execute(&ctx) {
                    Ok(v) => cel_to_json(&v),
                    Err(_) => None,
                }
            }
        }
    }
}

fn cel_to_json(v: &CelValue) -> Option<Value> {
    Some(match v {
        CelValue::String(s) => Value::String(s.to_string()),
        CelValue::Int(i) => Value::from(*i),
        CelValue::UInt(u) => Value::from(*u),
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::List(items) => Value::Array(items.iter().filter_map(cel_to_json).collect()),
        _ => return None,
    })
}

fn value_to_field(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

pub(crate) struct Key {
    kid: String,
    alg: Algorithm,
    key: DecodingKey,
}

struct IssuerRt {
    name: String,
    url: String,
    audience: Option<String>,
    leeway: u64,
    keys: Vec<Key>,
    jwks: Option<jwks::Jwks>,
    mapping: Vec<(String, Mapper)>,
}

pub struct Verifier {
    by_url: HashMap<String, IssuerRt>,
    max_token_bytes: usize,
    /// Tokens that verified, by SHA-256 of the exact token bytes. An agent presents the same
    /// JWT for its whole lifetime, so the signature check (the dominant cost of a decision) runs
    /// once per token instead of once per request. Any change to the token is a different key;
    /// time claims are re-checked on every hit; a bundle reload starts a new cache; entries
    /// live at most [`CACHE_MAX_AGE`] so a key removed from a JWKS stops counting soon.
    cache: std::sync::RwLock<HashMap<[u8; 32], Cached>>,
}

/// Upper bound on how long one verification is reused.
pub const CACHE_MAX_AGE: Duration = Duration::from_secs(300);
const CACHE_MAX_ENTRIES: usize = 16_384;

struct Cached {
    identity: Identity,
    exp: u64,
    nbf: Option<u64>,
    leeway: u64,
    at: std::time::Instant,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.by_url.keys().collect::<Vec<_>>())
            .finish()
    }
}

pub fn parse_alg(s: &str) -> Option<Algorithm> {
    Some(match s {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        _ => return None,
    })
}

fn static_key(issuer: &str, k: &StaticKey) -> Result<Key, IdentityError> {
    let err = |message: String| IdentityError::Key {
        issuer: issuer.to_owned(),
        kid: k.kid.clone(),
        message,
    };
    let alg = parse_alg(&k.alg).ok_or_else(|| err(format!("unsupported alg `{}`", k.alg)))?;
    let pem = k.pem.as_deref().unwrap_or("").as_bytes();
    if pem_is_private(pem) {
        return Err(err(
            "`pem` holds a PRIVATE key; put only the public key in a bundle".into(),
        ));
    }
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let secret = match (&k.secret, &k.secret_env) {
                (Some(s), _) => s.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    err(format!(
                        "environment variable `{var}` (secret_env) is not set"
                    ))
                })?,
                (None, None) => return Err(err("HS* keys need `secret` or `secret_env`".into())),
            };
            if secret.len() < 32 {
                return Err(err("the HMAC secret must be at least 32 bytes long".into()));
            }
            DecodingKey::from_secret(secret.as_bytes())
        }
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem)
            .map_err(|e| err(format!("`pem` is not an EC public key: {e}")))?,
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem)
            .map_err(|e| err(format!("`pem` is not an Ed25519 public key: {e}")))?,
        _ => DecodingKey::from_rsa_pem(pem)
            .map_err(|e| err(format!("`pem` is not an RSA public key: {e}")))?,
    };
    Ok(Key {
        kid: k.kid.clone(),
        alg,
        key,
    })
}

fn pem_is_private(pem: &[u8]) -> bool {
    String::from_utf8_lossy(pem).contains("PRIVATE KEY")
}

impl Verifier {
    /// Builds the verifier; returns every key or mapping problem (index of the issuer + error).
    pub fn build(
        issuers: &[Issuer],
        max_token_bytes: usize,
    ) -> Result<Self, Vec<(usize, IdentityError)>> {
        let mut errors = Vec::new();
        let mut by_url = HashMap::new();
        for (i, iss) in issuers.iter().enumerate() {
            let mut keys = Vec::new();
            for k in &iss.static_keys {
                match static_key(&iss.name, k) {
                    Ok(key) => keys.push(key),
                    Err(e) => errors.push((i, e)),
                }
            }
            let mut merged: Vec<(String, String)> = profile(iss.issuer_type)
                .iter()
                .filter(|(f, _)| !iss.map.contains_key(*f))
                .map(|(f, c)| ((*f).to_owned(), (*c).to_owned()))
                .collect();
            merged.extend(iss.map.iter().map(|(f, c)| (f.clone(), c.clone())));
            let mut mapping = Vec::new();
            for (field, spec) in merged {
                match Mapper::new(&iss.name, &field, &spec) {
                    Ok(m) => mapping.push((field, m)),
                    Err(e) => errors.push((i, e)),
                }
            }
            let jwks = iss.jwks_url.as_ref().map(|url| {
                jwks::Jwks::new(
                    url.clone(),
                    Duration::from_secs(iss.jwks_cache_seconds.unwrap_or(3600)),
                    Duration::from_secs(iss.jwks_refresh_seconds.unwrap_or(30)),
                )
            });
            by_url.insert(
                iss.issuer_url.clone(),
                IssuerRt {
                    name: iss.name.clone(),
                    url: iss.issuer_url.clone(),
                    audience: iss.audience.clone(),
                    leeway: iss.leeway_seconds.unwrap_or(DEFAULT_LEEWAY_SECONDS),
                    keys,
                    jwks,
                    mapping,
                },
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            by_url,
            max_token_bytes,
            cache: std::sync::RwLock::new(HashMap::new()),
        })
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Result<Identity, TokenError>> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let c = cache.get(digest)?;
        if c.at.elapsed() > CACHE_MAX_AGE {
            return None;
        }
        let now = jsonwebtoken::get_current_timestamp();
        if now > c.exp + c.leeway {
            return Some(Err(TokenError::Expired));
        }
        if c.nbf.is_some_and(|nbf| nbf > now + c.leeway) {
            return Some(Err(TokenError::NotYetValid));
        }
        Some(Ok(c.identity.clone()))
    }

    fn remember(&self, digest: [u8; 32], identity: &Identity, leeway: u64) {
        let Some(exp) = identity.claims.get("exp").and_then(Value::as_u64) else {
            return;
        };
        let nbf = identity.claims.get("nbf").and_then(Value::as_u64);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX_ENTRIES {
            // Crude but bounded: a flood of distinct valid tokens only costs re-verification.
            cache.clear();
        }
        cache.insert(
            digest,
            Cached {
                identity: identity.clone(),
                exp,
                nbf,
                leeway,
                at: std::time::Instant::now(),
            },
        );
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge {
                size: token.len(),
                max: self.max_token_bytes,
            });
        }
        let digest: [u8; 32] = {
            use sha2::Digest as _;
            sha2::Sha256::digest(token.as_bytes()).into()
        };
        if let Some(hit) = self.cached(&digest) {
            return hit;
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("a JWT has three dot-separated parts"));
        };
        let header: Value = decode_segment(h, "header")?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(TokenError::Malformed("header has no `alg`"))?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone);
        }
        let Some(alg) = parse_alg(alg) else {
            return Err(TokenError::UnsupportedAlg(sanitize(alg)));
        };
        let kid = header.get("kid").and_then(Value::as_str);
        let payload: Value = decode_segment(p, "payload")?;
        let iss = payload
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(TokenError::MissingIssuer)?;
        let issuer = self
            .by_url
            .get(iss)
            .ok_or_else(|| TokenError::UnknownIssuer(sanitize(iss)))?;

        let claims = match self.find_key(issuer, kid).await? {
            KeyRef::Static(key) => check(issuer, key, alg, token)?,
            KeyRef::Jwks(key) => check(issuer, &key, alg, token)?,
        };
        let identity = map_identity(issuer, claims);
        self.remember(digest, &identity, issuer.leeway);
        Ok(identity)
    }

    async fn find_key<'a>(
        &self,
        issuer: &'a IssuerRt,
        kid: Option<&str>,
    ) -> Result<KeyRef<'a>, TokenError> {
        match kid {
            Some(kid) => {
                if let Some(k) = issuer.keys.iter().find(|k| k.kid == kid) {
                    return Ok(KeyRef::Static(k));
                }
                if let Some(j) = &issuer.jwks {
                    return match j.key(kid).await {
                        Ok(Some(k)) => Ok(KeyRef::Jwks(k)),
                        Ok(None) => Err(TokenError::UnknownKid {
                            issuer: issuer.name.clone(),
                            kid: sanitize(kid),
                        }),
                        Err(e) => Err(TokenError::JwksUnavailable(e.to_string())),
                    };
                }
                Err(TokenError::UnknownKid {
                    issuer: issuer.name.clone(),
                    kid: sanitize(kid),
                })
            }
            None => {
                if issuer.keys.len() == 1 && issuer.jwks.is_none() {
                    return Ok(KeyRef::Static(&issuer.keys[0]));
                }
                if issuer.keys.is_empty()
                    && let Some(j) = &issuer.jwks
                    && let Some(k) = j
                        .only_key()
                        .await
                        .map_err(|e| TokenError::JwksUnavailable(e.to_string()))?
                {
                    return Ok(KeyRef::Jwks(k));
                }
                Err(TokenError::MissingKid(issuer.name.clone()))
            }
        }
    }
}

enum KeyRef<'a> {
    Static(&'a Key),
    Jwks(Arc<Key>),
}

/// Attacker-controlled strings in error messages: short and printable only.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

fn decode_segment(seg: &str, what: &'static str) -> Result<Value, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(seg.as_bytes()).map_err(|_| {
        TokenError::Malformed(if what == "header" {
            "header is not base64url"
        } else {
            "payload is not base64url"
        })
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| {
        TokenError::Malformed(if what == "header" {
            "header is not a JSON object"
        } else {
            "payload is not a JSON object"
        })
    })?;
    if !v.is_object() {
        return Err(TokenError::Malformed(
            "header and payload must be JSON objects",
        ));
    }
    Ok(v)
}

fn check(
    issuer: &IssuerRt,
    key: &Key,
    alg: Algorithm,
    token: &str,
) -> Result<Map<String, Value>, TokenError> {
    // Pinning: the key decides the algorithm, never the token.
    if key.alg != alg {
        return Err(TokenError::AlgMismatch {
            kid: key.kid.clone(),
            expected: format!("{:?}", key.alg),
            got: format!("{alg:?}"),
        });
    }
    let mut v = Validation::new(key.alg);
    v.leeway = issuer.leeway;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_issuer(&[&issuer.url]);
    match &issuer.audience {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => TokenError::BadSignature,
            K::ExpiredSignature => TokenError::Expired,
            K::ImmatureSignature => TokenError::NotYetValid,
            K::InvalidIssuer => TokenError::UnknownIssuer(issuer.url.clone()),
            K::InvalidAudience => {
                TokenError::WrongAudience(issuer.audience.clone().unwrap_or_default())
            }
            K::MissingRequiredClaim(c) => TokenError::MissingClaim(sanitize(c)),
            K::InvalidAlgorithm => TokenError::AlgMismatch {
                kid: key.kid.clone(),
                expected: format!("{:?}", key.alg),
                got: format!("{alg:?}"),
            },
            K::Base64(_) => TokenError::Malformed("a segment is not base64url"),
            K::Json(_) | K::Utf8(_) => TokenError::InvalidClaims(
                "registered claims (exp, nbf, iat, aud) have the wrong type".into(),
            ),
            _ => TokenError::BadSignature,
        }
    })?;
    let claims = data.claims;
    if let Some(iat) = claims.get("iat") {
        let iat = iat
            .as_u64()
            .ok_or_else(|| TokenError::InvalidClaims("`iat` must be a number".into()))?;
        if iat > jsonwebtoken::get_current_timestamp() + issuer.leeway {
            return Err(TokenError::IssuedInFuture);
        }
    }
    Ok(claims)
}

fn map_identity(issuer: &IssuerRt, claims: Map<String, Value>) -> Identity {
    let cel_claims = crate::cel::from_json_object(&claims);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut groups = Vec::new();
    for (field, mapper) in &issuer.mapping {
        let Some(v) = mapper.apply(&claims, &cel_claims) else {
            continue;
        };
        if field == "groups" {
            groups = match v {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
                Value::String(s) => vec![s],
                _ => Vec::new(),
            };
        } else {
            fields.push((field.clone(), value_to_field(&v)));
        }
    }
    let mut id = Identity::new(
        &issuer.name,
        Map::new(),
        fields.iter().map(|(a, b)| (a.as_str(), b.as_str())),
        groups,
    );
    id.cel_claims = cel_claims;
    id.claims = claims;
    id
}

#[cfg(test)]
mod tests;
