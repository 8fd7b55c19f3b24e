//! Resolvers fetch real secret values at run time. They never know who asked (the PDP decided
//! that already) and never write a value anywhere: errors name the backend and the reference only.
//!
//! Kinds (KeyZero's names accepted as aliases): `env`, `env_file`, `file`, `hashicorp_vault`
//! (`hashicorp`, `vault`), `aws_secrets_manager` (`aws`), `keyzero` (a remote kz/KeyZero PDP).
//! Every kind also takes the common settings `timeout` (seconds per attempt, default 10),
//! `retries` (transient failures only, default 2) and `cache_ttl` (seconds, default 0 = off).

mod aws;
mod cache;
mod env;
mod env_file;
mod file;
mod http;
mod keyzero;
mod logins;
mod settings;
mod vault;

pub use aws::AwsSecretsManagerResolver;
pub use cache::CachedResolver;
pub use env::EnvResolver;
pub use env_file::EnvFileResolver;
pub use file::FileResolver;
pub use keyzero::KeyzeroResolver;
pub use logins::{credential_vars, login_vars};
pub use vault::VaultResolver;

use crate::secret::Secret;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use settings::Common;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One lookup: `reference` is the resolver-specific locator (an env var name, a Vault path, an
/// AWS secret id, …), `field` selects one key of a structured secret. `params` carries the rest
/// of KeyZero's request parameters (`path`, `secret_id`, `role_arn`, `duration_seconds`, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SecretRequest {
    pub reference: String,
    pub field: Option<String>,
    pub params: BTreeMap<String, String>,
}

impl SecretRequest {
    pub fn new(reference: impl Into<String>) -> Self {
        Self {
            reference: reference.into(),
            ..Self::default()
        }
    }

    pub fn with_field(mut self, field: Option<String>) -> Self {
        self.field = field;
        self
    }

    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{backend}: secret '{reference}' not found")]
    NotFound { backend: String, reference: String },
    #[error("{backend}: secret '{reference}' has no field '{field}'")]
    FieldMissing {
        backend: String,
        reference: String,
        field: String,
    },
    #[error("{backend}: resolving '{reference}' failed: {message}")]
    Backend {
        backend: String,
        reference: String,
        message: String,
    },
    #[error("{backend}: resolving '{reference}' timed out after {seconds}s")]
    Timeout {
        backend: String,
        reference: String,
        seconds: u64,
    },
    #[error("resolver configuration: {0}")]
    Config(String),
    /// The backend refused our credentials (wrong or expired token, bad signature).
    #[error("{backend}: not authorized to read '{reference}': {message}")]
    Unauthorized {
        backend: String,
        reference: String,
        message: String,
    },
    /// A credential or setting the resolver takes from the environment (VAULT_TOKEN,
    /// AWS_REGION, AWS keys) is missing here. `kz validate` reports it as a warning: the
    /// environment that runs the secrets may well have it.
    #[error("resolver configuration: {0}")]
    MissingEnvironment(String),
    /// A remote PDP evaluated its policies and said no.
    #[error("{backend}: access to '{reference}' denied: {reason}")]
    Denied {
        backend: String,
        reference: String,
        reason: String,
    },
}

/// A source of secret values. Object-safe so resolvers can be chosen from configuration.
pub trait Resolver: Send + Sync + std::fmt::Debug {
    /// The backend kind, e.g. `env`, `hashicorp_vault`; used in errors and audit records.
    fn kind(&self) -> &'static str;

    fn resolve<'a>(
        &'a self,
        request: &'a SecretRequest,
    ) -> BoxFuture<'a, Result<Secret, ResolveError>>;
}

/// Resolver kinds kz implements, by canonical name.
pub const KINDS: &[&str] = &[
    "env",
    "env_file",
    "file",
    "hashicorp_vault",
    "aws_secrets_manager",
    "keyzero",
];

/// KeyZero resolver kinds kz does not implement (they need a desktop keychain, a vendor CLI or
/// cloud metadata); naming one gives a clear error instead of "unknown".
const KEYZERO_ONLY_KINDS: &[&str] = &[
    "keychain",
    "1password",
    "1password_cli",
    "onepassword_cli",
    "gcp",
    "age",
    "aws_sts",
];

/// The canonical kind for a kind name or one of its aliases (KeyZero's `hashicorp`, `aws`, the
/// bundle's `hashicorp_vault`, …). `None` when kz does not know the kind.
pub fn canonical_kind(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "env" => "env",
        "env_file" | "dotenv" => "env_file",
        "file" | "files" | "directory" => "file",
        "hashicorp_vault" | "hashicorp" | "vault" | "openbao" => "hashicorp_vault",
        "aws_secrets_manager" | "aws" | "aws_sm" => "aws_secrets_manager",
        "keyzero" | "kz" => "keyzero",
        _ => return None,
    })
}

/// True for kind names kz or KeyZero knows (KeyZero-only kinds included: `kz validate` accepts
/// them like KeyZero does; building one fails with a clear error).
pub fn is_known_kind(kind: &str) -> bool {
    canonical_kind(kind).is_some() || KEYZERO_ONLY_KINDS.contains(&kind)
}

/// Settings a kind accepts, besides `type` and the common `timeout`, `retries`, `cache_ttl`.
pub fn kind_settings(kind: &str) -> Option<&'static [&'static str]> {
    Some(match canonical_kind(kind)? {
        "env" => env::SETTINGS,
        "env_file" => env_file::SETTINGS,
        "file" => file::SETTINGS,
        "hashicorp_vault" => vault::SETTINGS,
        "aws_secrets_manager" => aws::SETTINGS,
        "keyzero" => keyzero::SETTINGS,
        _ => return None,
    })
}

/// Checks that every key of `settings` is one `kind` accepts; the error names the first unknown
/// key with a "did you mean" hint. `kz validate` and [`build`] both use it.
pub fn check_settings(kind: &str, settings: &Map<String, Value>) -> Result<(), ResolveError> {
    let Some(known) = kind_settings(kind) else {
        return Err(unknown_kind(kind));
    };
    for key in settings.keys() {
        if key == "type"
            || settings::COMMON.contains(&key.as_str())
            || known.contains(&key.as_str())
        {
            continue;
        }
        let all = known.iter().chain(settings::COMMON.iter()).copied();
        return Err(ResolveError::Config(format!(
            "{}: unknown setting `{key}`{}; accepted: {}",
            canonical_kind(kind).unwrap_or(kind),
            crate::suggest::hint(key, all),
            known
                .iter()
                .chain(settings::COMMON.iter())
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

fn unknown_kind(kind: &str) -> ResolveError {
    if KEYZERO_ONLY_KINDS.contains(&kind) {
        return ResolveError::Config(format!(
            "resolver type '{kind}' is a KeyZero resolver kz does not support; supported types: {}",
            KINDS.join(", ")
        ));
    }
    ResolveError::Config(format!(
        "unknown resolver type '{kind}'{}; known types: {}",
        crate::suggest::hint(kind, KINDS.iter().copied()),
        KINDS.join(", ")
    ))
}

/// Builds a resolver from its kind and settings: a bundle's `backends.NAME` entry or a
/// `.keyzero.toml` `[resolvers.NAME]` table, converted to a JSON object (a `type` key, if still
/// present, is ignored). Unknown settings are errors. With `cache_ttl > 0` the resolver is
/// wrapped in a [`CachedResolver`].
pub fn build(kind: &str, settings: &Map<String, Value>) -> Result<Arc<dyn Resolver>, ResolveError> {
    check_settings(kind, settings)?;
    let Some(canonical) = canonical_kind(kind) else {
        return Err(unknown_kind(kind));
    };
    let common = Common::read(canonical, settings)?;
    let resolver: Arc<dyn Resolver> = match canonical {
        "env" => Arc::new(EnvResolver::new(settings)?),
        "env_file" => Arc::new(EnvFileResolver::new(settings)?),
        "file" => Arc::new(FileResolver::new(settings)?),
        "hashicorp_vault" => Arc::new(VaultResolver::new(settings, &common)?),
        "aws_secrets_manager" => Arc::new(AwsSecretsManagerResolver::new(settings, &common)?),
        "keyzero" => Arc::new(KeyzeroResolver::new(settings, &common)?),
        _ => return Err(unknown_kind(kind)),
    };
    Ok(match common.cache_ttl {
        Some(ttl) => Arc::new(CachedResolver::new(resolver, ttl)),
        None => resolver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn keyzero_kind_names_are_aliases() {
        assert_eq!(canonical_kind("hashicorp"), Some("hashicorp_vault"));
        assert_eq!(canonical_kind("aws"), Some("aws_secrets_manager"));
        assert_eq!(canonical_kind("env_file"), Some("env_file"));
        assert!(is_known_kind("keychain"));
        assert!(!is_known_kind("keychian"));
    }

    #[test]
    fn unknown_kind_and_setting_have_hints() {
        let err = build("hashicorp_vualt", &Map::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `hashicorp_vault`"), "{err}");
        let err = build("keychain", &Map::new()).unwrap_err().to_string();
        assert!(
            err.contains("KeyZero resolver kz does not support"),
            "{err}"
        );
        let err = build("env", &obj(json!({"prefx": "A_"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown setting `prefx`; did you mean `prefix`?"),
            "{err}"
        );
    }

    #[test]
    fn cache_ttl_wraps() {
        let r = build("env", &obj(json!({"cache_ttl": 5}))).unwrap();
        assert!(format!("{r:?}").contains("CachedResolver"));
    }
}
