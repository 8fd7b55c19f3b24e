//! Which environment variables kz's resolvers read credentials from.
//!
//! Blind mode keeps them from the agent and kz scrubs them from its own environment once
//! secrets are resolved. The list is derived from the configured resolvers (what each kind
//! reads, and the variables its settings name), so a resolver added or reconfigured cannot be
//! forgotten by a fixed list elsewhere.

use super::{aws, canonical_kind, env, keyzero, vault};
use crate::config::Config;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// The environment variables a resolver of `kind` with `settings` reads credentials or real
/// values from, when it resolves `references`:
/// - `env`: each reference's variable (`prefix` + reference): it holds the real value;
/// - `hashicorp_vault`: VAULT_TOKEN, BAO_TOKEN, VAULT_ROLE_ID, VAULT_SECRET_ID;
/// - `aws_secrets_manager`: the static keys and session token, AWS_PROFILE and
///   AWS_SHARED_CREDENTIALS_FILE (they point at keys in the shared credentials file);
/// - `keyzero`: the variable of `token_source = "env:NAME"`;
/// - `env_file`, `file`, unknown kinds: none (they read files, or nothing).
pub fn credential_vars<'a>(
    kind: &str,
    settings: &Map<String, Value>,
    references: impl IntoIterator<Item = &'a str>,
) -> BTreeSet<String> {
    let fixed = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
    match canonical_kind(kind) {
        Some("env") => env::source_vars(settings, references).into_iter().collect(),
        Some("hashicorp_vault") => fixed(vault::LOGIN_VARS),
        Some("aws_secrets_manager") => fixed(aws::LOGIN_VARS),
        Some("keyzero") => keyzero::login_var(settings).into_iter().collect(),
        _ => BTreeSet::new(),
    }
}

/// Every variable [`credential_vars`] names for this project: each declared resolver (also
/// ones no secret uses, and those merged from the global config) and each resolver a secret
/// names, with the references of the secrets that use it.
pub fn login_vars(config: &Config) -> BTreeSet<String> {
    let names: BTreeSet<&str> = config
        .resolvers
        .keys()
        .map(String::as_str)
        .chain(config.secrets.values().map(|s| s.resolver.as_str()))
        .collect();
    let mut out = BTreeSet::new();
    for name in names {
        let (kind, settings) = config.resolver_spec(name);
        let references = config
            .secrets
            .values()
            .filter(|s| s.resolver == name)
            .map(|s| s.reference.as_str());
        out.extend(credential_vars(&kind, &settings, references));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".keyzero.toml"), text).unwrap();
        Config::load_with(dir.path(), &|_| None, false).unwrap()
    }

    #[test]
    fn every_resolver_kind_contributes_what_it_reads() {
        let c = config(
            r#"
[resolvers.bao]
type = "openbao"
address = "http://127.0.0.1:8200"
auth_method = "approle"

[resolvers.sm]
type = "aws"
region = "us-east-1"

[resolvers.pdp]
type = "keyzero"
endpoint = "https://kz.internal:8443"
token_source = "env:KZ_PDP_TOKEN"

[resolvers.pdp_file]
type = "keyzero"
endpoint = "https://kz.internal:8443"
token_source = "file:/run/token"

[resolvers.app]
type = "env"
prefix = "APP_"

[resolvers.dotenv]
type = "env_file"
path = ".env"

[secrets.API_KEY]
resolver = "env"
ref = "KZ_REAL_API_KEY"

[secrets.DB]
resolver = "app"
ref = "DB_URL"

[secrets.V]
resolver = "bao"
ref = "secret/app"

[secrets.A]
resolver = "sm"
ref = "sm://prod/key"

[secrets.R]
resolver = "pdp"
ref = "org/x"

[secrets.F]
resolver = "dotenv"
ref = "SOMETHING"
"#,
        );
        let got: Vec<String> = login_vars(&c).into_iter().collect();
        assert_eq!(
            got,
            [
                "APP_DB_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_PROFILE",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "AWS_SHARED_CREDENTIALS_FILE",
                "BAO_TOKEN",
                "KZ_PDP_TOKEN",
                "KZ_REAL_API_KEY",
                "VAULT_ROLE_ID",
                "VAULT_SECRET_ID",
                "VAULT_TOKEN",
            ]
        );
    }

    #[test]
    fn only_configured_kinds_count() {
        // A project with env secrets only: no Vault or AWS variable is a login of kz's.
        let c = config(
            "[secrets.API_KEY]\nresolver = \"env\"\nref = \"KZ_TEST_REAL_KEY\"\n\n[secrets.OTHER]\nresolver = \"env\"\nref = \"OTHER_SRC\"\n",
        );
        let got: Vec<String> = login_vars(&c).into_iter().collect();
        assert_eq!(got, ["KZ_TEST_REAL_KEY", "OTHER_SRC"]);
        assert!(credential_vars("keychain", &Map::new(), ["x"]).is_empty());
        assert!(credential_vars("file", &Map::new(), ["x"]).is_empty());
    }
}
