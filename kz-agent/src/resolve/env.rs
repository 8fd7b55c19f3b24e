//! `env`: the secret is the process environment variable named by the reference.

use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

/// `prefix`: prepended to every reference.
pub(super) const SETTINGS: &[&str] = &["prefix"];

#[derive(Debug, Default)]
pub struct EnvResolver {
    /// Optional prefix prepended to every reference (`prefix = "APP_"`).
    prefix: String,
}

impl EnvResolver {
    pub fn new(settings: &Map<String, Value>) -> Result<Self, ResolveError> {
        let prefix = match settings.get("prefix") {
            None => String::new(),
            Some(Value::String(p)) => p.clone(),
            Some(_) => {
                return Err(ResolveError::Config(
                    "env: `prefix` must be a string".into(),
                ));
            }
        };
        Ok(Self { prefix })
    }

    /// The variable this resolver reads for `reference`.
    fn var_name(&self, reference: &str) -> String {
        format!("{}{reference}", self.prefix)
    }
}

/// The variables an `env` resolver with `settings` reads for `references`: each holds a real
/// value. A `prefix` that is not a string fails the resolver's build; here it counts as none.
pub(super) fn source_vars<'a>(
    settings: &Map<String, Value>,
    references: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let resolver = EnvResolver::new(settings).unwrap_or_default();
    references
        .into_iter()
        .map(|r| resolver.var_name(r))
        .collect()
}

impl Resolver for EnvResolver {
    fn kind(&self) -> &'static str {
        "env"
    }

    fn resolve<'a>(
        &'a self,
        request: &'a SecretRequest,
    ) -> BoxFuture<'a, Result<Secret, ResolveError>> {
        Box::pin(async move {
            let name = self.var_name(&request.reference);
            match std::env::var(&name) {
                Ok(value) => Ok(Secret::new(value)),
                Err(_) => Err(ResolveError::NotFound {
                    backend: "env".into(),
                    reference: name,
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_variable_names_it_without_value() {
        let r = EnvResolver::default();
        let err = r
            .resolve(&SecretRequest::new("KZ_TEST_SURELY_UNSET_VAR"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "env: secret 'KZ_TEST_SURELY_UNSET_VAR' not found"
        );
    }

    #[tokio::test]
    async fn reads_a_set_variable() {
        // PATH is always set in test processes; avoids mutating the environment (unsafe in 2024).
        let r = EnvResolver::default();
        let v = r.resolve(&SecretRequest::new("PATH")).await.unwrap();
        assert!(!v.is_empty());
    }
}
