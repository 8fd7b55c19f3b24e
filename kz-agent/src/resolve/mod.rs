//! Resolvers fetch real secret values at run time. They never know who asked (the PDP decided
//! that already) and never write a value anywhere: errors name the backend and the reference only.

mod env;

pub use env::EnvResolver;

use crate::secret::Secret;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One lookup: `reference` is the resolver-specific locator (an env var name, a Vault path, an
/// AWS secret id, …), `field` selects one key of a structured secret. `params` carries the rest
/// of KeyZero's request parameters (`path`, `secret_id`, `role_arn`, `duration_seconds`, …).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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

/// Builds a resolver from its kind and settings: a bundle's `backends.NAME` entry or a
/// `.keyzero.toml` `[resolvers.NAME]` table, converted to a JSON object (without `type`).
pub fn build(kind: &str, settings: &Map<String, Value>) -> Result<Arc<dyn Resolver>, ResolveError> {
    match kind {
        "env" => Ok(Arc::new(EnvResolver::new(settings)?)),
        other => Err(ResolveError::Config(format!(
            "unknown resolver type '{other}'; known types: env"
        ))),
    }
}
