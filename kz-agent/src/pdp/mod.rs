//! The policy decision point: bundle → JWT → CEL → resolver → response + audit.
//!
//! [`Pdp`] is what the HTTP API, the MCP server and the token-exchange proxy call in-process.
//! The compiled bundle sits behind a lock-protected `Arc` so a reload swaps it atomically: an
//! invalid new bundle is refused and the old one keeps serving.

pub mod http;
pub mod metrics;
pub mod proxy;

pub mod token;

use crate::audit::{
    AuditError, AuditEvent, AuditKey, AuditSink, ChainSink, MultiSink, NullSink, SinkTarget,
};
use crate::bundle::{
    self, AuditConfig, BundleError, CredentialLocation, LoadedBundle, Mode, Resource,
};
use crate::cel;
use crate::identity::{Identity, TokenError, Verifier};
use crate::policy::glob::Glob;
use crate::policy::{self, PolicyEngine};
use crate::resolve::{self, Resolver, SecretRequest};
use crate::secret::Secret;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub use metrics::Metrics;
pub use token::{ProxyClaims, Signer, TokenVerifier};

/// Default lifetime of a short-lived kz token when the resource sets no `ttl`.
pub const DEFAULT_TTL: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum PdpError {
    #[error("invalid_token: {0}")]
    InvalidToken(#[from] TokenError),
    #[error("invalid_ref `{reference}`: {reason}")]
    InvalidRef {
        reference: String,
        reason: &'static str,
    },
    #[error("the request names no ref: send `ref` or `refs`")]
    NoRefs,
    #[error("the request names {count} refs; the limit is {max}")]
    TooManyRefs { count: usize, max: usize },
    #[error("`context` must be a JSON object")]
    BadContext,
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// One ref's outcome. `value` is a [`Secret`]: Debug stays redacted; only serialising the
/// response (the HTTP body, the MCP tool result) exposes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefResult {
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_secret"
    )]
    pub value: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn serialize_secret<S: serde::Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(secret) => s.serialize_str(secret.expose()),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ResolveResponse {
    pub results: BTreeMap<String, RefResult>,
}

/// A resource with its compiled pattern and parsed credential location.
pub struct ResourceRt {
    pub glob: Glob,
    pub spec: Resource,
    pub location: CredentialLocation,
}

/// Everything derived from one bundle; swapped as a whole on reload.
pub struct Compiled {
    pub loaded: LoadedBundle,
    pub verifier: Verifier,
    pub engine: PolicyEngine,
    pub resources: Vec<ResourceRt>,
    pub resolvers: HashMap<String, Arc<dyn Resolver>>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("path", &self.loaded.path)
            .finish_non_exhaustive()
    }
}

impl Compiled {
    /// Compiles every part of a loaded bundle, reporting every problem with its position.
    pub fn build(loaded: LoadedBundle) -> Result<Self, BundleError> {
        let b = &loaded.bundle;
        let mut problems = Vec::new();

        let verifier = match Verifier::build(&b.issuers, b.limits.max_token_bytes) {
            Ok(v) => Some(v),
            Err(errors) => {
                for (i, e) in errors {
                    let idx = i.to_string();
                    let at: Vec<String> = match &e {
                        crate::identity::IdentityError::Key { kid, .. } => {
                            let j = b.issuers[i]
                                .static_keys
                                .iter()
                                .position(|k| &k.kid == kid)
                                .map(|j| j.to_string())
                                .unwrap_or_default();
                            vec!["issuers".into(), idx, "static_keys".into(), j]
                        }
                        crate::identity::IdentityError::Mapping { field, .. } => {
                            vec!["issuers".into(), idx, "map".into(), field.clone()]
                        }
                    };
                    problems.push(loaded.problem(&at, e.to_string()));
                }
                None
            }
        };

        let engine = match PolicyEngine::compile(&b.policies) {
            Ok(e) => Some(e),
            Err(errors) => {
                for e in errors {
                    let idx = b
                        .policies
                        .iter()
                        .position(|p| p.name == e.policy_name())
                        .unwrap_or(0)
                        .to_string();
                    problems.push(loaded.problem(&["policies", &idx, "rule"], e.to_string()));
                }
                None
            }
        };

        let mut resolvers: HashMap<String, Arc<dyn Resolver>> = HashMap::new();
        for (name, backend) in &b.backends {
            match resolve::build(&backend.kind, &backend.settings) {
                Ok(r) => {
                    resolvers.insert(name.clone(), r);
                }
                Err(e) => problems
                    .push(loaded.problem(&["backends", name], format!("backend `{name}`: {e}"))),
            }
        }
        for builtin in bundle::BUILTIN_BACKENDS {
            if !resolvers.contains_key(*builtin)
                && !b.backends.contains_key(*builtin)
                && let Ok(r) = resolve::build(builtin, &serde_json::Map::new())
            {
                resolvers.insert((*builtin).to_owned(), r);
            }
        }

        let mut resources = Vec::new();
        for r in &b.resources {
            // Both were checked by bundle::parse; a failure here means a bundle bypassed it.
            let (Ok(glob), Ok(location)) = (
                Glob::compile(&r.ref_pattern),
                CredentialLocation::parse(
                    r.credential_location
                        .as_deref()
                        .unwrap_or(CredentialLocation::DEFAULT),
                ),
            ) else {
                continue;
            };
            resources.push(ResourceRt {
                glob,
                spec: r.clone(),
                location,
            });
        }

        match (verifier, engine) {
            (Some(verifier), Some(engine)) if problems.is_empty() => Ok(Self {
                loaded,
                verifier,
                engine,
                resources,
                resolvers,
            }),
            _ => Err(loaded.invalid(problems)),
        }
    }

    /// KeyZero's resource choice: an exact ref wins; else the glob with the longest literal
    /// prefix; ties go to the first defined.
    pub fn match_resource(&self, reference: &str) -> Option<&ResourceRt> {
        if let Some(r) = self
            .resources
            .iter()
            .find(|r| r.glob.is_literal() && r.glob.as_str() == reference)
        {
            return Some(r);
        }
        let mut best: Option<&ResourceRt> = None;
        for r in self.resources.iter().filter(|r| !r.glob.is_literal()) {
            if r.glob.matches(reference)
                && best.is_none_or(|b| r.glob.literal_prefix_len() > b.glob.literal_prefix_len())
            {
                best = Some(r);
            }
        }
        best
    }

    /// Counts as `kz server check` prints them: exactly KeyZero 0.3's lines.
    pub fn summary(&self) -> String {
        let b = &self.loaded.bundle;
        format!(
            "  {} policies compiled successfully\n  {} resources validated ({} backends)\nbundle OK",
            b.policies.len(),
            b.resources.len(),
            b.backends.len()
        )
    }
}

/// Refs are paths: no empty ref, no `..` segment, no NUL, no percent-encoding tricks.
pub fn validate_ref(r: &str) -> Result<(), PdpError> {
    let bad = |reason| PdpError::InvalidRef {
        reference: r.chars().filter(|c| !c.is_control()).take(120).collect(),
        reason,
    };
    if r.is_empty() {
        return Err(bad("empty ref"));
    }
    if r.len() > 1024 {
        return Err(bad("ref longer than 1024 bytes"));
    }
    if r.contains('\0') {
        return Err(bad("NUL byte in ref"));
    }
    if r.contains('%') {
        return Err(bad("percent-encoded characters are not allowed"));
    }
    if r.split('/').any(|s| s == ".." || s == ".") {
        return Err(bad("`.` and `..` segments are not allowed"));
    }
    if r.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    Ok(())
}

/// Builds the audit sink a bundle's `audit:` section asks for (a null sink without one).
pub fn audit_sink(config: Option<&AuditConfig>) -> Result<Arc<dyn AuditSink>, AuditError> {
    let Some(cfg) = config else {
        return Ok(Arc::new(NullSink));
    };
    let key = Arc::new(match &cfg.key {
        Some(path) => AuditKey::load_or_create(path)?,
        None => AuditKey::load_or_create(&crate::audit::default_key_path())?,
    });
    let mut sinks: Vec<Arc<dyn AuditSink>> = Vec::new();
    if let Some(path) = &cfg.path {
        sinks.push(Arc::new(ChainSink::open_with_key(
            SinkTarget::File {
                path: path.clone(),
                fsync: cfg.fsync,
                rotation: cfg.rotation(),
            },
            key.clone(),
        )?));
    }
    if cfg.stdout {
        sinks.push(Arc::new(ChainSink::open_with_key(SinkTarget::Stdout, key)?));
    }
    Ok(match sinks.len() {
        1 => sinks.remove(0),
        _ => Arc::new(MultiSink(sinks)),
    })
}

#[derive(Default)]
pub struct PdpOptions {
    /// Signs short-lived kz tokens; without one, `short_lived` resources answer with an error.
    pub signer: Option<Arc<Signer>>,
    /// Told to clients with each kz token (`proxy` in the result).
    pub proxy_url: Option<String>,
    /// Overrides the bundle's `audit:` section (tests, embedding).
    pub audit: Option<Arc<dyn AuditSink>>,
}

pub struct Pdp {
    current: RwLock<Arc<Compiled>>,
    path: Option<PathBuf>,
    audit: Arc<dyn AuditSink>,
    signer: Option<Arc<Signer>>,
    proxy_url: Option<String>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Pdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdp")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Pdp {
    /// Loads, compiles and starts auditing a bundle file.
    pub fn from_file(path: &Path, options: PdpOptions) -> Result<Self, PdpError> {
        let compiled = Compiled::build(bundle::load(path)?)?;
        let mut pdp = Self::new(compiled, options)?;
        pdp.path = Some(path.to_path_buf());
        Ok(pdp)
    }

    pub fn new(compiled: Compiled, options: PdpOptions) -> Result<Self, PdpError> {
        let audit = match options.audit {
            Some(a) => a,
            None => audit_sink(compiled.loaded.bundle.audit.as_ref())?,
        };
        Ok(Self {
            current: RwLock::new(Arc::new(compiled)),
            path: None,
            audit,
            signer: options.signer,
            proxy_url: options.proxy_url,
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// The compiled bundle now serving.
    pub fn current(&self) -> Arc<Compiled> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn audit(&self) -> Arc<dyn AuditSink> {
        self.audit.clone()
    }

    pub fn bundle_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn signer(&self) -> Option<Arc<Signer>> {
        self.signer.clone()
    }

    /// Re-reads the bundle file. On any problem the old bundle keeps serving and the error is
    /// returned (and counted); the audit sink is kept (it is opened once per process).
    pub fn reload(&self) -> Result<(), BundleError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let result = bundle::load(path).and_then(Compiled::build);
        match result {
            Ok(compiled) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(compiled);
                self.metrics.reload(true);
                let _ = self.audit.record(
                    AuditEvent::new("bundle_reload")
                        .with("outcome", "loaded")
                        .with("bundle", path.display().to_string()),
                );
                Ok(())
            }
            Err(e) => {
                self.metrics.reload(false);
                let _ = self.audit.record(
                    AuditEvent::new("bundle_reload")
                        .with("outcome", "refused")
                        .with("bundle", path.display().to_string())
                        .with("problems", e.problems().len()),
                );
                Err(e)
            }
        }
    }

    /// Verifies `jwt`, decides and resolves each ref. Token and ref errors fail the whole
    /// request; per-ref denials and resolver errors are per-ref results.
    pub async fn resolve(
        &self,
        jwt: &str,
        refs: &[String],
        context: serde_json::Value,
    ) -> Result<ResolveResponse, PdpError> {
        let compiled = self.current();
        let limits = &compiled.loaded.bundle.limits;
        if refs.is_empty() {
            return Err(PdpError::NoRefs);
        }
        if refs.len() > limits.max_refs {
            return Err(PdpError::TooManyRefs {
                count: refs.len(),
                max: limits.max_refs,
            });
        }
        for r in refs {
            validate_ref(r)?;
        }
        let context = match &context {
            serde_json::Value::Null => cel::from_json(&serde_json::json!({})),
            serde_json::Value::Object(_) => cel::from_json(&context),
            _ => return Err(PdpError::BadContext),
        };
        let rid = request_id();
        let identity = match compiled.verifier.verify(jwt).await {
            Ok(id) => id,
            Err(e) => {
                self.metrics.token_rejected(e.reason());
                let _ = self.audit.record(
                    AuditEvent::new("token_rejected")
                        .with("request_id", rid.as_str())
                        .with("reason", e.reason())
                        .with("refs", refs.to_vec()),
                );
                return Err(e.into());
            }
        };
        let mut response = ResolveResponse::default();
        for r in refs {
            let result = self
                .resolve_one(&compiled, &identity, r, &context, &rid)
                .await;
            response.results.insert(r.clone(), result);
        }
        Ok(response)
    }

    async fn resolve_one(
        &self,
        compiled: &Compiled,
        identity: &Identity,
        reference: &str,
        context: &cel_interpreter::Value,
        rid: &str,
    ) -> RefResult {
        let started = Instant::now();
        let mut event = AuditEvent::new("decision")
            .with("request_id", rid)
            .with("issuer", identity.issuer.as_str())
            .with("org", identity.org.as_str())
            .with("service", identity.service.as_str())
            .with("env", identity.env.as_str())
            .with("actor", identity.actor.as_str())
            .with("sub", identity.subject())
            .with("ref", reference);

        let decision = compiled.engine.evaluate(&policy::Input {
            identity,
            reference,
            context,
        });
        event = event
            .with("policy", decision.policy.as_str())
            .with("effect", if decision.allowed { "allow" } else { "deny" });
        self.metrics.decision(decision.allowed, &decision.policy);

        let mut result = RefResult {
            allowed: decision.allowed,
            policy: Some(decision.policy.clone()),
            ..RefResult::default()
        };
        if !decision.allowed {
            result.reason = decision.reason.clone();
            event = event
                .with("outcome", "denied")
                .with("reason", decision.reason.unwrap_or_default());
            return self.finish(result, event, started);
        }

        let Some(resource) = compiled.match_resource(reference) else {
            // Allowed by policy but nothing to resolve: nothing is released (KeyZero: allowed
            // false with this error); the deciding policy is kept for the audit trail.
            let msg = "no resource matches ref".to_owned();
            result.allowed = false;
            result.error = Some(msg.clone());
            event = event.with("outcome", "error").with("error", msg);
            return self.finish(result, event, started);
        };
        let spec = &resource.spec;
        event = event
            .with("mode", spec.mode.as_str())
            .with("resolver", spec.resolver.as_str())
            .with("resource", spec.ref_pattern.as_str());
        result.mode = Some(spec.mode.as_str().to_owned());

        match spec.mode {
            Mode::Direct => {
                let Some(resolver) = compiled.resolvers.get(&spec.resolver) else {
                    let msg = format!("backend `{}` is not available", spec.resolver);
                    result.error = Some(msg.clone());
                    event = event.with("outcome", "error").with("error", msg);
                    return self.finish(result, event, started);
                };
                let request = secret_request(reference, spec, resolver.kind());
                let t = Instant::now();
                let outcome = resolver.resolve(&request).await;
                self.metrics
                    .resolver_latency(&spec.resolver, t.elapsed(), outcome.is_ok());
                match outcome {
                    Ok(secret) => {
                        result.value = Some(secret);
                        event = event.with("outcome", "resolved");
                    }
                    Err(e) => {
                        // Resolver errors name the backend and the ref, never a value.
                        let msg = e.to_string();
                        result.error = Some(msg.clone());
                        event = event.with("outcome", "error").with("error", msg);
                    }
                }
            }
            Mode::ShortLived => {
                let ttl = spec.ttl.unwrap_or(DEFAULT_TTL);
                match &self.signer {
                    Some(signer) => match signer.sign(reference, &spec.resolver, identity, ttl) {
                        Ok((token, jti)) => {
                            result.token = Some(token);
                            result.ttl = Some(ttl);
                            result.proxy = self.proxy_url.clone();
                            event = event
                                .with("outcome", "issued")
                                .with("ttl", ttl)
                                .with("jti", jti);
                        }
                        Err(e) => {
                            let msg = format!("signing the kz token failed: {e}");
                            result.error = Some(msg.clone());
                            event = event.with("outcome", "error").with("error", msg);
                        }
                    },
                    None => {
                        let msg = "short_lived mode needs a signing key: start the server with --signing-key FILE (or KEYZERO_SIGNING_KEY_PATH)".to_owned();
                        result.error = Some(msg.clone());
                        event = event.with("outcome", "error").with("error", msg);
                    }
                }
            }
        }
        self.finish(result, event, started)
    }

    /// Writes the audit record; if it cannot be written, no value or token leaves (fail closed).
    fn finish(&self, mut result: RefResult, event: AuditEvent, started: Instant) -> RefResult {
        let event = event.with("latency_us", started.elapsed().as_micros() as u64);
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "audit write failed; withholding the result");
            self.metrics.error("audit_write");
            result.value = None;
            result.token = None;
            result.error = Some("the audit log cannot be written; nothing was released".into());
        }
        result
    }
}

/// The resolver request for a ref. KeyZero passes the ref itself as the locator plus the
/// resource's extra parameters; for the `env` resolver a resource's `path` names the variable
/// (refs are paths such as `payments/stripe`, variable names cannot be).
pub fn secret_request(reference: &str, spec: &Resource, kind: &str) -> SecretRequest {
    let locator = match (kind, &spec.path) {
        ("env", Some(var)) => var.clone(),
        _ => reference.to_owned(),
    };
    let mut req = SecretRequest::new(locator).with_field(spec.field.clone());
    for (k, v) in [
        ("path", &spec.path),
        ("role_arn", &spec.role_arn),
        ("secret_id", &spec.secret_id),
    ] {
        if let Some(v) = v {
            req.params.insert(k.to_owned(), v.clone());
        }
    }
    if let Some(d) = spec.duration_seconds {
        req.params.insert("duration_seconds".into(), d.to_string());
    }
    req.params.insert("ref".into(), reference.to_owned());
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::audit::MemorySink;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../tests/fixtures/keys/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn bundle() -> Compiled {
        let pem: String = fixture("agent-es256.pub")
            .lines()
            .map(|l| format!("          {l}\n"))
            .collect();
        let text = format!(
            r#"version: "1"
issuers:
  - name: agents
    issuer_url: https://id.example
    static_keys:
      - kid: k
        alg: ES256
        pem: |
{pem}    map:
      service: claims.agent_name
policies:
  - name: bot
    rule: service == 'bot' && ref.matches('app/**')
    effect: allow
resources:
  - ref: app/path
    resolver: env
    path: PATH
  - ref: app/token
    resolver: env
    mode: short_lived
    ttl: 60
  - ref: app/missing
    resolver: env
    path: KZ_SURELY_UNSET_VARIABLE
"#
        );
        Compiled::build(bundle::parse("inline.yaml", &text).unwrap()).unwrap()
    }

    fn token(agent: &str) -> String {
        let enc =
            jsonwebtoken::EncodingKey::from_ec_pem(fixture("agent-es256.key").as_bytes()).unwrap();
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k".into());
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({"iss": "https://id.example", "exp": jsonwebtoken::get_current_timestamp() + 60, "agent_name": agent}),
            &enc,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn in_process_resolve_with_audit() {
        let sink = Arc::new(MemorySink::new());
        let signer = Arc::new(Signer::generate().unwrap());
        let pdp = Pdp::new(
            bundle(),
            PdpOptions {
                signer: Some(signer.clone()),
                proxy_url: Some("http://127.0.0.1:1".into()),
                audit: Some(sink.clone()),
            },
        )
        .unwrap();
        let refs: Vec<String> = [
            "app/path",
            "app/token",
            "app/missing",
            "other/x",
            "app/none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let r = pdp
            .resolve(&token("bot"), &refs, serde_json::json!({"why": "test"}))
            .await
            .unwrap();
        let path = &r.results["app/path"];
        assert!(path.allowed && path.value.as_ref().is_some_and(|v| !v.is_empty()));
        let tok = &r.results["app/token"];
        assert_eq!(tok.mode.as_deref(), Some("short_lived"));
        assert_eq!(tok.ttl, Some(60));
        let claims = signer
            .verifier()
            .verify(tok.token.as_deref().unwrap())
            .unwrap();
        assert_eq!(claims.resource, "app/token");
        assert_eq!(claims.service, "bot");
        let missing = &r.results["app/missing"];
        assert!(missing.allowed && missing.value.is_none());
        assert!(
            missing
                .error
                .as_deref()
                .unwrap()
                .contains("KZ_SURELY_UNSET_VARIABLE")
        );
        assert_eq!(
            r.results["other/x"].policy.as_deref(),
            Some("implicit-deny")
        );
        // Debug never shows the value.
        assert!(format!("{r:?}").contains("[redacted]"));

        {
            let events = sink.events();
            assert_eq!(events.len(), 5);
            let outcomes: Vec<_> = events.iter().map(|e| e.fields["outcome"].clone()).collect();
            assert_eq!(outcomes, ["resolved", "issued", "error", "denied", "error"]);
            let path_value = std::env::var("PATH").unwrap();
            for e in events.iter() {
                assert!(
                    !serde_json::to_string(&e.fields)
                        .unwrap()
                        .contains(&path_value)
                );
            }
        }

        let err = pdp
            .resolve("x.y.z", &refs, serde_json::Value::Null)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            PdpError::InvalidToken(TokenError::Malformed(_))
        ));
        let err = pdp
            .resolve(
                &token("bot"),
                &["a/../b".to_string()],
                serde_json::Value::Null,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PdpError::InvalidRef { .. }));
    }

    #[tokio::test]
    async fn nothing_is_released_when_the_audit_log_cannot_be_written() {
        let pdp = Pdp::new(
            bundle(),
            PdpOptions {
                audit: Some(Arc::new(MemorySink::failing())),
                ..PdpOptions::default()
            },
        )
        .unwrap();
        let r = pdp
            .resolve(
                &token("bot"),
                &["app/path".to_string()],
                serde_json::Value::Null,
            )
            .await
            .unwrap();
        let p = &r.results["app/path"];
        assert!(p.value.is_none());
        assert!(
            p.error
                .as_deref()
                .unwrap()
                .contains("audit log cannot be written")
        );
    }

    #[test]
    fn resource_choice_prefers_exact_then_longest_prefix() {
        let text = r#"version: "1"
resources:
  - ref: "a/**"
    resolver: env
  - ref: "a/b/*"
    resolver: env
  - ref: "a/b/c"
    resolver: env
"#;
        let c = Compiled::build(bundle::parse("r.yaml", text).unwrap()).unwrap();
        let pick = |r| c.match_resource(r).map(|x| x.spec.ref_pattern.clone());
        assert_eq!(pick("a/b/c").as_deref(), Some("a/b/c"));
        assert_eq!(pick("a/b/d").as_deref(), Some("a/b/*"));
        assert_eq!(pick("a/x/y").as_deref(), Some("a/**"));
        assert_eq!(pick("b"), None);
    }
}
