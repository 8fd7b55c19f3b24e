//! The hidden `kz intercept …` commands: run the loader as its own process (tests kill it with
//! SIGKILL to check fail-closed behaviour), clean up stale state by hand, unload the shared
//! program set, and the demo ([`super::demo`]).

use super::signals::Shutdown;
use crate::cli::{HoldArgs, InterceptCommand};
use crate::intercept::{
    Cgroup, Interceptor, Ipv6Mode, Listen, Policy, Scope, TcpRedirect, UnixSockets, cgroups,
    cleanup_stale, shared,
};
use std::io::Write;
use std::process::ExitCode;

pub(super) fn run(cmd: InterceptCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InterceptCommand::Cleanup { scope } => {
            let scope = Scope::new(&cgroups::cgroup2_root()?, &scope)?;
            let report = cleanup_stale(&scope)?;
            println!(
                "{}",
                serde_json::json!({"cleaned": report.instances, "killed": report.killed})
            );
            Ok(ExitCode::SUCCESS)
        }
        InterceptCommand::Unload { scope } => {
            let scope = Scope::new(&cgroups::cgroup2_root()?, &scope)?;
            let report = shared::unload(&scope)?;
            println!(
                "{}",
                serde_json::json!({
                    "removed": report.removed,
                    "cleaned": report.stale.instances,
                    "killed": report.stale.killed,
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        InterceptCommand::Hold(args) => hold(&args),
        InterceptCommand::Demo => super::demo::run().map(|()| ExitCode::SUCCESS),
    }
}

/// `kz intercept hold`'s flags as the cgroup's [`Policy`].
fn hold_policy(args: &HoldArgs) -> Policy {
    Policy {
        proxy_port: args.proxy_port,
        dns_port: args.dns_port,
        tcp: if args.ports.is_empty() {
            TcpRedirect::All
        } else {
            TcpRedirect::Ports(args.ports.clone())
        },
        ipv6: if args.ipv6_intercept {
            Ipv6Mode::Intercept
        } else {
            Ipv6Mode::Deny
        },
        require_allow: args.require_allow,
        allow_udp: args.allow_udp,
        loopback_direct: args.loopback_direct,
        allow: args.allow.clone(),
        deny: args.deny.clone(),
        listen: if args.listen_any {
            Listen::Any
        } else {
            Listen::Loopback
        },
        unix: if args.unix_any {
            UnixSockets::Any
        } else {
            UnixSockets::Only(args.unix_allow.clone())
        },
    }
}

fn describe(icpt: &Interceptor, cg: &Cgroup) -> serde_json::Value {
    serde_json::json!({
        "cgroup_id": cg.id,
        "cgroup_path": cg.path,
        "pin_dir": icpt.pin_dir(),
        "shared_dir": icpt.shared_dir(),
        "instance_cgroup_dir": icpt.cgroup_dir(),
        "ids": icpt.kernel_ids(),
    })
}

fn hold(args: &HoldArgs) -> anyhow::Result<ExitCode> {
    super::block_on(async {
        let scope = Scope::new(&cgroups::cgroup2_root()?, &args.scope)?;
        let mut icpt = Interceptor::load_in(&scope)?;
        let cg = icpt.create_cgroup(&args.name, &hold_policy(args))?;
        let mut events = icpt.block_events()?;
        let mut out = std::io::stdout();
        writeln!(out, "{}", describe(&icpt, &cg))?;
        out.flush()?;
        let mut stop = Shutdown::install()?;
        let stdin_closed = async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 256];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::pin!(stdin_closed);
        loop {
            tokio::select! {
                ev = events.next() => {
                    let ev = ev?;
                    writeln!(out, "{}", serde_json::json!({"block": ev}))?;
                    out.flush()?;
                }
                () = stop.recv() => break,
                () = &mut stdin_closed => break,
            }
        }
        drop(events);
        drop(icpt);
        writeln!(out, "{}", serde_json::json!({"released": true}))?;
        Ok(ExitCode::SUCCESS)
    })?
}
