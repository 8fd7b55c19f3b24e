//! Hidden `kz intercept …` commands: run the loader as its own process (tests kill it with
//! SIGKILL to check fail-closed behaviour), clean up stale state by hand, and unload the shared
//! program set.

use super::{
    Cgroup, Cidr, Interceptor, Ipv6Mode, Listen, Policy, Scope, TcpRedirect, UnixRule, UnixSockets,
    cleanup_stale,
};
use clap::{Args, Subcommand};
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum InterceptCommand {
    /// Load the programs, create one cgroup with the given policy, print a JSON line describing
    /// it, print block events as JSON lines, and hold until stdin closes or SIGTERM/SIGINT; then
    /// clean up everything.
    Hold(HoldArgs),
    /// Clean up pins and cgroups left by kz instances that died (kills their processes).
    Cleanup {
        /// State scope (directory name under /sys/fs/bpf and the cgroup2 root).
        #[arg(long, default_value = super::pins::DEFAULT_SCOPE)]
        scope: String,
    },
    /// Remove the pinned eBPF program set (every build's) once no kz instance is running; dead
    /// instances are cleaned up first. The next kz run loads the programs again.
    Unload {
        /// State scope (directory name under /sys/fs/bpf and the cgroup2 root).
        #[arg(long, default_value = super::pins::DEFAULT_SCOPE)]
        scope: String,
    },
    /// Show interception end to end in throwaway network namespaces (`cargo xtask demo`).
    Demo,
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Cgroup name under `<cgroup2>/<scope>/<instance>/`.
    #[arg(long)]
    pub name: String,
    /// State scope (directory name under /sys/fs/bpf and the cgroup2 root).
    #[arg(long, default_value = super::pins::DEFAULT_SCOPE)]
    pub scope: String,
    #[arg(long, default_value_t = 0)]
    pub proxy_port: u16,
    #[arg(long, default_value_t = 0)]
    pub dns_port: u16,
    /// Redirect only these TCP ports (default: all TCP).
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<u16>,
    #[arg(long)]
    pub deny: Vec<Cidr>,
    #[arg(long)]
    pub allow: Vec<Cidr>,
    #[arg(long)]
    pub require_allow: bool,
    #[arg(long)]
    pub allow_udp: bool,
    #[arg(long)]
    pub loopback_direct: bool,
    /// Redirect native IPv6 to `[::1]:<proxy port>` instead of refusing it.
    #[arg(long)]
    pub ipv6_intercept: bool,
    /// Let servers listen on any address (default: loopback only).
    #[arg(long)]
    pub listen_any: bool,
    /// Unix sockets the cgroup may reach besides its own (`/path`, `/dir/`, `@name`).
    #[arg(long)]
    pub unix_allow: Vec<UnixRule>,
    /// Do not check unix sockets at all.
    #[arg(long)]
    pub unix_any: bool,
}

impl HoldArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            proxy_port: self.proxy_port,
            dns_port: self.dns_port,
            tcp: if self.ports.is_empty() {
                TcpRedirect::All
            } else {
                TcpRedirect::Ports(self.ports.clone())
            },
            ipv6: if self.ipv6_intercept {
                Ipv6Mode::Intercept
            } else {
                Ipv6Mode::Deny
            },
            require_allow: self.require_allow,
            allow_udp: self.allow_udp,
            loopback_direct: self.loopback_direct,
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            listen: if self.listen_any {
                Listen::Any
            } else {
                Listen::Loopback
            },
            unix: if self.unix_any {
                UnixSockets::Any
            } else {
                UnixSockets::Only(self.unix_allow.clone())
            },
        }
    }
}

pub fn run(cmd: InterceptCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InterceptCommand::Cleanup { scope } => {
            let scope = Scope::new(&super::cgroups::cgroup2_root()?, &scope)?;
            let report = cleanup_stale(&scope)?;
            println!(
                "{}",
                serde_json::json!({"cleaned": report.instances, "killed": report.killed})
            );
            Ok(ExitCode::SUCCESS)
        }
        InterceptCommand::Unload { scope } => {
            let scope = Scope::new(&super::cgroups::cgroup2_root()?, &scope)?;
            let report = super::shared::unload(&scope)?;
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let scope = Scope::new(&super::cgroups::cgroup2_root()?, &args.scope)?;
        let mut icpt = Interceptor::load_in(&scope)?;
        let cg = icpt.create_cgroup(&args.name, &args.policy())?;
        let mut events = icpt.block_events()?;
        let mut out = std::io::stdout();
        writeln!(out, "{}", describe(&icpt, &cg))?;
        out.flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                () = &mut stdin_closed => break,
            }
        }
        drop(events);
        drop(icpt);
        writeln!(out, "{}", serde_json::json!({"released": true}))?;
        Ok(ExitCode::SUCCESS)
    })
}
