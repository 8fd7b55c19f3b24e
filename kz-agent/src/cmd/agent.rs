//! `kz agent run|status` and `kz sandbox ls|show|rm|events`: the node daemon ([`crate::agent::run`])
//! and the CLI over its API ([`crate::agent::client`]): a table, or the daemon's JSON with
//! `--json`.

use std::process::ExitCode;

use http::Method;
use serde_json::Value;

use super::block_on_multi;
use crate::agent::{self, AgentOptions, client};
use crate::cli::{AgentClientArgs, AgentCommand, AgentRunArgs, SandboxCommand};

pub(super) fn agent(command: AgentCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentCommand::Run(args) => {
            block_on_multi(run(args))??;
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Status(c) => show(&c, Method::GET, "/v1/status", print_status),
    }
}

pub(super) fn sandbox(command: SandboxCommand) -> anyhow::Result<ExitCode> {
    match command {
        SandboxCommand::Ls(c) => show(&c, Method::GET, "/v1/sandboxes", print_list),
        SandboxCommand::Show { id, client } => show(
            &client,
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            print_one,
        ),
        SandboxCommand::Rm { id, client } => show(
            &client,
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            |v| println!("removed sandbox {} ({})", field(v, "id"), field(v, "name")),
        ),
        SandboxCommand::Events {
            id,
            follow,
            lines,
            client,
        } => events(&client, id, follow, lines),
    }
}

/// `kz sandbox events ID [-f]`: one line per record (`--json`: the daemon's lines as they are).
fn events(c: &AgentClientArgs, id: u64, follow: bool, lines: usize) -> anyhow::Result<ExitCode> {
    let path = format!(
        "/v1/sandboxes/{id}/events?since={lines}&follow={}",
        if follow { 1 } else { 0 }
    );
    let json = c.json;
    let print = move |line: &[u8]| {
        if json {
            println!("{}", String::from_utf8_lossy(line));
            return;
        }
        let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let kind = field(&Value::Object(m.clone()), "kind");
        if kind == "events_subscribed" {
            return;
        }
        let ts = field(&Value::Object(m.clone()), "ts");
        // Said by the stream itself, not news on every line.
        for k in [
            "kind",
            "ts",
            "sandbox_id",
            "sandbox",
            "owner_uid",
            "seq",
            "prev",
            "mac",
        ] {
            m.remove(k);
        }
        let rest: Vec<String> = m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        println!("{ts} {kind:<20} {}", rest.join(" "));
    };
    match super::block_on(client::stream_lines(&c.socket, &path, print))? {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("kz: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run(args: AgentRunArgs) -> Result<(), agent::AgentError> {
    let opts = AgentOptions {
        socket: args.socket,
        socket_group: args.socket_group,
        audit_log: args.audit_log,
        upstream_ca: args.upstream_ca,
        ipv6: args.ipv6,
        pods: args.pods,
        state_dir: args.state_dir,
    };
    agent::run(opts, super::signals::shutdown()).await
}

/// One request; its answer printed by `table` (or as JSON), or the refusal on stderr (exit 1).
fn show(
    c: &AgentClientArgs,
    method: Method,
    path: &str,
    table: impl FnOnce(&Value),
) -> anyhow::Result<ExitCode> {
    let answer = super::block_on(client::call(&c.socket, method, path, None))?;
    match answer {
        Ok(v) if c.json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Ok(v) => {
            table(&v);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("kz: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn field(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn counter(v: &Value, k: &str) -> String {
    v.get("counters")
        .map(|c| field(c, k))
        .unwrap_or_else(|| "-".into())
}

fn print_status(v: &Value) {
    for k in [
        "version",
        "pid",
        "kernel",
        "socket",
        "uptime_secs",
        "sandboxes",
        "sandboxes_total",
        "cgroup_dir",
    ] {
        if v.get(k).is_some() {
            println!("{k:<16} {}", field(v, k));
        }
    }
    if let Some(c) = v.get("caller") {
        println!(
            "{:<16} uid {} {}",
            "you",
            field(c, "uid"),
            if c.get("admin") == Some(&Value::Bool(true)) {
                "(admin: you see every sandbox)"
            } else {
                "(you see your own sandboxes)"
            }
        );
    }
}

fn print_list(v: &Value) {
    let rows = v.as_array().cloned().unwrap_or_default();
    println!(
        "{:<8} {:<24} {:<7} {:<22} {:>8} {:>8} {:>8}  SECRETS",
        "ID", "NAME", "OWNER", "CREATED", "REQS", "SWAPPED", "REFUSED"
    );
    for r in &rows {
        let secrets: Vec<String> = r
            .get("secrets")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        println!(
            "{:<8} {:<24} {:<7} {:<22} {:>8} {:>8} {:>8}  {}",
            field(r, "id"),
            field(r, "name"),
            field(r, "owner_uid"),
            field(r, "created"),
            counter(r, "requests"),
            counter(r, "requests_swapped"),
            counter(r, "refused"),
            secrets.join(",")
        );
    }
    if rows.is_empty() {
        println!("(no sandboxes you can see)");
    }
}

fn print_one(v: &Value) {
    for k in [
        "id",
        "name",
        "owner_uid",
        "cgroup",
        "dns",
        "project_dir",
        "created",
    ] {
        println!("{k:<12} {}", field(v, k));
    }
    println!(
        "{:<12} {} requests, {} swapped, {} refused",
        "counters",
        counter(v, "requests"),
        counter(v, "requests_swapped"),
        counter(v, "refused")
    );
    if let Some(m) = v.get("secrets").and_then(Value::as_object) {
        println!("secrets (masked tokens; not secret):");
        for (name, s) in m {
            let hosts: Vec<String> = s
                .get("hosts")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  {name:<20} {}  hosts: {}",
                field(s, "token"),
                if hosts.is_empty() {
                    "(the connection rules)".to_owned()
                } else {
                    hosts.join(", ")
                }
            );
        }
    }
}
