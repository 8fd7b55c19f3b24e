//! `kz run`, `kz export` and `kz status`: the commands that resolve the config's secrets.
//!
//! `kz run` is the library's [`crate::run::run`] with its flags as [`RunOptions`]; `export` and
//! `status` are KeyZero's commands and output formats over [`crate::run::resolve_all`] and
//! [`crate::run::resolve_each`].

use crate::cli::{ExportArgs, OutputFormat, RunArgs, Shell, StatusArgs};
use crate::config::approval::{ApprovalError, EXIT_NOT_APPROVED};
use crate::config::{Config, print_warnings};
use crate::run::blind::BlindError;
use crate::run::{RunError, RunOptions, resolve_all, resolve_each};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

/// `kz run [--blind]`: the flags as the library's options; a blind run whose config is not
/// approved exits [`EXIT_NOT_APPROVED`] (77), distinct from kz's other errors (2).
pub(super) async fn run(dir: Option<&Path>, args: RunArgs) -> Result<ExitCode, RunError> {
    match crate::run::run(dir, run_options(args)).await {
        Err(RunError::Blind(BlindError::Approval(
            e @ (ApprovalError::Changed { .. } | ApprovalError::AgentWritable { .. }),
        ))) => {
            eprintln!("kz: {e}");
            Ok(ExitCode::from(EXIT_NOT_APPROVED))
        }
        other => other,
    }
}

fn run_options(args: RunArgs) -> RunOptions {
    RunOptions {
        only: args.only,
        clean_env: args.clean_env,
        keep_env: args.keep_env.unwrap_or_default(),
        blind: args.blind,
        require_kernel: args.require_kernel,
        user: args.user,
        allow_root_agent: args.allow_root_agent,
        audit_log: args.audit_log,
        command: args.cmd,
    }
}

/// Single-quotes a value for POSIX shells and fish (`'` → `'\''`).
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

/// Prints `export NAME='VALUE'` lines (or fish's `set -gx`, or JSON). Values go to stdout by
/// design; nothing else about them goes anywhere.
pub(super) async fn export(dir: Option<&Path>, args: &ExportArgs) -> Result<ExitCode, RunError> {
    let config = Config::load(dir)?;
    print_warnings(&config);
    // For the node daemon: the gate with this user's approvals, before anything is resolved.
    let approval = if args.approval_gate {
        let env = crate::config::process_env;
        let gated = crate::config::approval::Store::open(&env)
            .and_then(|store| crate::config::approval::gate(&config, &store, None, &env));
        match gated {
            Ok(crate::config::approval::Gate::Approved) => Some(serde_json::json!("approved")),
            Ok(crate::config::approval::Gate::FirstUse { record }) => {
                Some(serde_json::json!({"first_use": record}))
            }
            Err(e) => {
                let refused = serde_json::json!({"refused": {"reason": e.reason(), "message": e.to_string()}});
                println!("{refused}");
                return Ok(ExitCode::from(EXIT_NOT_APPROVED));
            }
        }
    } else {
        None
    };
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "warning: writing secrets to a non-terminal; ensure output is not captured in logs"
        );
    }
    let secrets = resolve_all(&config, args.only.as_deref()).await?;
    if args.format == OutputFormat::Json && args.shell.is_none() {
        let mut map = serde_json::Map::new();
        for s in &secrets {
            map.insert(s.name.clone(), s.value.expose().into());
        }
        let mut doc = serde_json::json!({"environment": config.environment, "secrets": map});
        if let Some(a) = approval {
            doc["approval"] = a;
        }
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let lines: Vec<String> = secrets
        .iter()
        .map(|s| match args.shell {
            Some(Shell::Fish) => format!("set -gx {} {}", s.name, quote(s.value.expose())),
            _ => format!("export {}={}", s.name, quote(s.value.expose())),
        })
        .collect();
    println!("{}", lines.join("\n"));
    Ok(ExitCode::SUCCESS)
}

/// `****` plus the last four characters for values longer than four (KeyZero's mask).
fn mask(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() > 4 {
        format!(
            "****{}",
            chars[chars.len() - 4..].iter().collect::<String>()
        )
    } else {
        "****".into()
    }
}

/// Resolves each secret and shows ✓/✗ per secret; exit 1 when any failed.
pub(super) async fn status(dir: Option<&Path>, args: &StatusArgs) -> Result<ExitCode, RunError> {
    let config = Config::load(dir)?;
    print_warnings(&config);
    let results = resolve_each(&config, args.only.as_deref()).await?;
    let all_ok = results.iter().all(|(_, r)| r.is_ok());
    match args.fmt.format {
        OutputFormat::Text => {
            println!("Environment: {}", config.environment);
            println!("Config: {}", config.file_name);
            println!();
            for (name, result) in &results {
                let resolver = config.secrets[name].resolver.as_str();
                match result {
                    Ok(v) => println!("  {name:<20} {resolver:<14} \u{2713}  {}", mask(v.expose())),
                    Err(e) => println!("  {name:<20} {resolver:<14} \u{2717}  {e}"),
                }
            }
        }
        OutputFormat::Json => {
            let list: Vec<_> = results
                .iter()
                .map(|(name, result)| {
                    let e = &config.secrets[name];
                    let mut v = serde_json::json!({
                        "name": name, "resolver": e.resolver, "ref": e.reference,
                        "status": if result.is_ok() { "ok" } else { "error" },
                    });
                    if let Err(err) = result {
                        v["error"] = err.clone().into();
                    }
                    v
                })
                .collect();
            let doc = serde_json::json!({"environment": config.environment, "all_ok": all_ok, "secrets": list});
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_masking() {
        assert_eq!(quote("it's a test"), "'it'\\''s a test'");
        assert_eq!(mask("hello1234"), "****1234");
        assert_eq!(mask("ab"), "****");
        assert_eq!(mask("abcd"), "****");
    }
}
