//! `kz validate`, `kz init`, `kz list`: KeyZero's commands and output formats.

use crate::cli::{FormatArgs, OutputFormat};
use crate::config::{CONFIG_FILENAME, Config, ConfigError, print_warnings};
use crate::resolve;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

struct Problem {
    name: String,
    error: String,
}

/// Checks the config without resolving anything: the file parses (syntax, known keys, types),
/// every secret names a known or declared resolver, and every used resolver can be built from
/// its settings (a missing Vault token or region shows up here, not at run time).
pub fn validate(dir: Option<&Path>, fmt: &FormatArgs) -> anyhow::Result<ExitCode> {
    let (file, loaded) = match Config::load(dir) {
        Ok(c) => (c.file_name.to_owned(), Ok(c)),
        Err(e @ ConfigError::NotFound { .. }) => return Err(e.into()),
        Err(e) => (CONFIG_FILENAME.to_owned(), Err(e)),
    };
    let mut problems = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    let (secrets_count, resolvers_count) = match &loaded {
        Err(e) => {
            problems.push(Problem {
                name: String::new(),
                error: e.to_string(),
            });
            (0, 0)
        }
        Ok(config) => {
            print_warnings(config);
            let mut used = BTreeSet::new();
            for (name, entry) in &config.secrets {
                used.insert(entry.resolver.as_str());
                let (kind, settings) = config.resolver_spec(&entry.resolver);
                if !config.resolvers.contains_key(&entry.resolver) && !resolve::is_known_kind(&kind)
                {
                    let candidates = resolve::KINDS
                        .iter()
                        .copied()
                        .chain(config.resolvers.keys().map(String::as_str));
                    problems.push(Problem {
                        name: name.clone(),
                        error: format!(
                            "unknown resolver '{}'{} (at {})",
                            entry.resolver,
                            crate::suggest::hint(&entry.resolver, candidates),
                            entry.location
                        ),
                    });
                    continue;
                }
                match resolve::build(&kind, &settings) {
                    Ok(_) => {}
                    // Missing VAULT_TOKEN & co. here says nothing about where the secrets run.
                    Err(e @ resolve::ResolveError::MissingEnvironment(_)) => {
                        warnings.push(format!("{name}: resolver '{}': {e}", entry.resolver));
                    }
                    Err(e) => problems.push(Problem {
                        name: name.clone(),
                        error: format!("resolver '{}': {e}", entry.resolver),
                    }),
                }
            }
            (config.secrets.len(), used.len())
        }
    };
    let valid = problems.is_empty();
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    match fmt.format {
        OutputFormat::Text => {
            if valid {
                println!("{file}: ok\n  {secrets_count} secrets, {resolvers_count} resolvers");
            } else {
                println!("{file}: errors found");
                for p in &problems {
                    if p.name.is_empty() {
                        println!("  {}", p.error);
                    } else {
                        println!("  {}: {}", p.name, p.error);
                    }
                }
            }
        }
        OutputFormat::Json => {
            let errors: Vec<_> = problems
                .iter()
                .map(|p| serde_json::json!({"name": p.name, "error": p.error}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "file": file,
                    "valid": valid,
                    "secrets_count": secrets_count,
                    "resolvers_count": resolvers_count,
                    "errors": errors,
                    "warnings": warnings,
                }))?
            );
        }
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

const STARTER: &str = r#"# keyzero configuration (read by kz and KeyZero)
# Declare resolvers and their configuration here.
# Each resolver block is optional; omit if you use defaults.

# [resolvers.env]
# (no config needed for env resolver)

# [resolvers.vault]
# type = "hashicorp_vault"          # token from VAULT_TOKEN
# address = "https://vault.internal:8200"

# [resolvers.aws]
# region = "us-east-1"

# Declare secrets below.
# Each secret maps an environment variable name to a resolver and reference.

# [secrets.MY_SECRET]
# resolver = "env"
# ref = "MY_ENV_VAR"

# [secrets.GITHUB_TOKEN]
# resolver = "vault"
# ref = "secret/ci/github"
# field = "token"
# hosts = ["api.github.com"]        # kz: where `kz run --blind` may swap it in

# [blind]                           # kz run --blind: where the agent may connect
# connections = [                  # first match wins; no match = refused
#   { allow = true, host = "api.github.com" },
#   { allow = true, regex = '(.+\.)?example\.com' },   # must match the whole host name
#   { allow = true, cidr = "10.20.0.0/16" },  # kz: an address range (needed for loopback,
# ]                                           #   link-local, multicast: refused otherwise)
# hide = ["~/.aws/credentials", ".env"]   # masked for the agent (default: common credential files)
"#;

/// Creates a starter `.keyzero.toml` in `dir` (default: the current directory).
pub fn init(dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_dir()?,
    };
    let target = dir.join(CONFIG_FILENAME);
    if target.exists() {
        anyhow::bail!("{CONFIG_FILENAME} already exists at {}", target.display());
    }
    std::fs::write(&target, STARTER)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", target.display()))?;
    println!("created {}", target.display());
    println!();
    println!("  Next steps:");
    println!("    edit {CONFIG_FILENAME}   — map env var names to resolvers and references");
    println!("    kz validate        — check it");
    println!("    kz run -- <cmd>    — run with secrets injected");
    println!("    kz run --blind -- <cmd>  — run an agent that only ever sees masked tokens");
    Ok(ExitCode::SUCCESS)
}

/// Lists the configured secrets without resolving them.
pub fn list(dir: Option<&Path>, fmt: &FormatArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(dir)?;
    print_warnings(&config);
    match fmt.format {
        OutputFormat::Text => {
            if !config.secrets.is_empty() {
                println!("{:<30} {:<14} REF", "NAME", "RESOLVER");
            }
            for (name, e) in &config.secrets {
                println!("{name:<30} {:<14} {}", e.resolver, e.reference);
            }
        }
        OutputFormat::Json => {
            let mut out = serde_json::Map::new();
            for (name, e) in &config.secrets {
                let mut v = serde_json::json!({"resolver": e.resolver, "ref": e.reference});
                if let Some(f) = &e.field {
                    v["field"] = f.clone().into();
                }
                if !e.hosts.is_empty() {
                    v["hosts"] = e.hosts.clone().into();
                }
                out.insert(name.clone(), v);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
