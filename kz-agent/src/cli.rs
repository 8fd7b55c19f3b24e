//! The `kz` command line: every clap definition, and nothing else.
//!
//! The whole CLI surface (flags, defaults, help texts) reads in this one file; what a command
//! does is wired in [`crate::cmd`], which turns these arguments into the library's typed
//! options. Only this module and `cmd` depend on clap: a library module never sees a clap type,
//! so it can be driven by the node daemon or a test without parsing a command line.

use crate::intercept::{Cidr, UnixRule};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "kz", version, about = "Keep an AI agent's credentials out of its hands", long_about = None)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info`, `kz_agent::proxy=debug`. Logs go to stderr.
    #[arg(long, global = true, env = "KZ_LOG", default_value = "warn")]
    pub log: String,

    /// Where to look for .keyzero.toml (and its parents); defaults to the current directory
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve secrets and run a command with them injected as env vars
    Run(RunArgs),
    /// Resolve secrets and print `export KEY='VALUE'` lines
    Export(ExportArgs),
    /// Show resolution status for each secret
    Status(StatusArgs),
    /// Check the config file for errors without resolving secrets
    Validate(FormatArgs),
    /// Create a starter .keyzero.toml in the current directory
    Init,
    /// List configured secrets (without resolving)
    #[command(alias = "ls")]
    List(FormatArgs),
    /// Print a shell completion script, e.g. `kz completions bash > /etc/bash_completion.d/kz`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Approve the project's config for `kz run --blind`: shows what changed since the last
    /// approval, then records it (`--show`: only show; exit 77 when not approved).
    Allow(AllowArgs),
    /// Forget the project's approvals: its next `kz run --blind` is a first use again.
    Deny,
    /// Check whether kernel interception can work here and say what to fix.
    Doctor,
    /// Interception internals for tests and the demo (not a stable interface).
    #[command(hide = true, subcommand)]
    Intercept(InterceptCommand),
    /// The policy decision point: `kz server start --bundle F`, `kz server check --bundle F`.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// Audit log tools: `kz audit verify FILE`.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The node daemon: many sandboxes on one node (`kz agent run`, `kz agent status`).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// The node daemon's sandboxes: `kz sandbox ls`, `kz sandbox show ID`, `kz sandbox rm ID`.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

// ---- kz agent, kz sandbox ----

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Run the node daemon (root, kernel interception required) serving the local API.
    Run(AgentRunArgs),
    /// Show the running daemon's state.
    Status(AgentClientArgs),
}

#[derive(Debug, Args)]
pub struct AgentRunArgs {
    /// The API socket (created 0660 for group --socket-group, else root-only).
    #[arg(long, env = "KZ_AGENT_SOCKET", default_value = crate::agent::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The group given access to the socket, when it exists.
    #[arg(long, default_value = crate::agent::SOCKET_GROUP)]
    pub socket_group: String,
    /// Append audit records (hash-chained JSONL) of every sandbox to FILE.
    #[arg(long, env = "KZ_AUDIT_LOG", value_name = "FILE", default_value = crate::agent::DEFAULT_AUDIT_LOG)]
    pub audit_log: PathBuf,
    /// Extra CA (PEM) trusted for upstream TLS, for every sandbox.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Let sandboxes use native IPv6 (the proxy listens on [::1] too).
    #[arg(long)]
    pub ipv6: bool,
    /// Serve Kubernetes pods (`/v1/pods`): the YAML naming the cluster's token issuer and the
    /// sandbox spec of each namespace and service account (docs/kubernetes.md).
    #[arg(long, env = "KZ_AGENT_PODS", value_name = "FILE")]
    pub pods: Option<PathBuf>,
    /// Keep each sandbox's state (no real value) in DIR (root's, 0700), so that a daemon
    /// started after this one was killed adopts its sandboxes.
    #[arg(long, env = "KZ_AGENT_STATE_DIR", value_name = "DIR", default_value = crate::agent::persist::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// How the CLI reaches the daemon.
#[derive(Debug, Clone, Args)]
pub struct AgentClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "KZ_AGENT_SOCKET", default_value = crate::agent::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// List your sandboxes (all of them for root and group kz-admin).
    #[command(alias = "list")]
    Ls(AgentClientArgs),
    /// Show one sandbox: owner, cgroup, DNS, masked tokens, counters.
    Show {
        /// The sandbox id (its cgroup id, from `kz sandbox ls`).
        id: u64,
        #[command(flatten)]
        client: AgentClientArgs,
    },
    /// Destroy a sandbox: its processes are killed, its cgroup removed.
    Rm {
        /// The sandbox id.
        id: u64,
        #[command(flatten)]
        client: AgentClientArgs,
    },
    /// A sandbox's audit records (requests, refusals, runs): the last ones kept, and with -f
    /// every new one as it happens until the sandbox is destroyed.
    Events {
        /// The sandbox id.
        id: u64,
        /// Follow: keep printing records as they happen.
        #[arg(short, long)]
        follow: bool,
        /// How many of the records kept (at most 256) to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        #[command(flatten)]
        client: AgentClientArgs,
    },
}

// ---- kz run, export, status, validate, list ----

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Blind mode (--blind): the command sees only masked tokens (kz_masked_…); kz swaps in the real\nvalue on the wire, only for hosts the secret is scoped to.  Example: kz run --blind -- node agent.js"
)]
pub struct RunArgs {
    /// Only resolve these secrets (comma-separated)
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// Clear inherited environment, keeping only essential OS vars and resolved secrets
    #[arg(long, conflicts_with = "blind")]
    pub clean_env: bool,
    /// Additional env vars to preserve when using --clean-env (comma-separated)
    #[arg(long, value_delimiter = ',', requires = "clean_env")]
    pub keep_env: Option<Vec<String>>,
    /// Blind mode: the command gets masked tokens, real values are swapped in at the network
    /// boundary for each secret's hosts only
    #[arg(long)]
    pub blind: bool,
    /// With --blind: fail instead of falling back to explicit-proxy mode when kernel
    /// interception (root, cgroup v2, BPF) is not available
    #[arg(long, requires = "blind")]
    pub require_kernel: bool,
    /// With --blind: run the agent as USER[:GROUP] (names or ids) [default: the user who ran
    /// sudo/pkexec, else kz's own user; root is refused without --allow-root-agent]
    #[arg(long, value_name = "USER[:GROUP]", requires = "blind")]
    pub user: Option<String>,
    /// With --blind: allow the agent to be root; it then runs as root only inside a user
    /// namespace of its own (mapped to nobody outside), still without capabilities
    #[arg(long, requires = "blind")]
    pub allow_root_agent: bool,
    /// With --blind: append audit records (HMAC-chained JSONL) to FILE, in a directory only
    /// root can write when kz is root [default: /var/lib/kz/audit.jsonl as root (sudo
    /// included), else $XDG_STATE_HOME/kz/audit.jsonl or ~/.local/state/kz/audit.jsonl]
    #[arg(long, env = "KZ_AUDIT_LOG", value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Command and arguments to run
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    pub cmd: Vec<OsString>,
}

/// `kz allow`: approve the project's config (the project is `--dir` or the current directory).
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "kz remembers, per project, the security-relevant part of the config a blind run last used\n(secret scopes and references, [blind], resolvers, CA files). A change stops `kz run --blind`\n(exit 77) until `kz allow` approves it. As root (sudo kz run --blind), approve with sudo kz allow."
)]
pub struct AllowArgs {
    /// Only show the changes and whether the config is approved; record nothing
    #[arg(long)]
    pub show: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// `--format text|json`, shared by status, validate, list and export.
#[derive(Debug, Clone, Args)]
pub struct FormatArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

// `kz export --shell`: the syntax of the printed lines (a plain comment: clap reads doc comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Zsh,
    Bash,
    Fish,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Only resolve these secrets (comma-separated)
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// Output format
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Shell-specific output (fish uses set -gx instead of export)
    #[arg(long, value_enum, conflicts_with = "format")]
    pub shell: Option<Shell>,
    /// Run `kz run --blind`'s approval gate first (the node daemon resolves a user's sandbox
    /// with it): refused → `{"refused": {...}}` on stdout and exit 77, nothing resolved.
    #[arg(long, hide = true)]
    pub approval_gate: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Only resolve these secrets (comma-separated)
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    #[command(flatten)]
    pub fmt: FormatArgs,
}

// ---- kz server, kz audit ----

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Serve the PDP over HTTP (or, with --proxy, the token-exchange proxy).
    Start(Box<StartArgs>),
    /// Validate a bundle: YAML, schema, every CEL rule, glob, backend and key; print counts.
    Check {
        /// The bundle YAML file.
        #[arg(long)]
        bundle: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The bundle YAML file (reloaded on SIGHUP and when the file changes).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Address to listen on (default 127.0.0.1:8080); port 0 picks a free port (the chosen
    /// address is printed). With --mcp it selects MCP over streamable HTTP instead of stdio.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Run the token-exchange proxy instead of the PDP API: it verifies kz tokens and injects the
    /// real credential at the resource's credential_location.
    #[arg(long)]
    pub proxy: bool,
    /// Also serve the token-exchange proxy on this address, in the same process as the PDP
    /// (shares the signing key, so an ephemeral key works).
    #[arg(long, conflicts_with = "proxy")]
    pub proxy_listen: Option<SocketAddr>,
    /// Private key (PEM) that signs short-lived kz tokens: PKCS#8 P-256 → ES256, RSA → RS256.
    #[arg(long, env = "KEYZERO_SIGNING_KEY_PATH")]
    pub signing_key: Option<PathBuf>,
    /// Public key (PEM) the proxy verifies kz tokens with.
    #[arg(long, env = "KEYZERO_PUBLIC_KEY_PATH")]
    pub public_key: Option<PathBuf>,
    /// URL returned to clients with each kz token (`proxy` field).
    #[arg(long, env = "KEYZERO_PROXY_URL")]
    pub proxy_url: Option<String>,
    /// Let the proxy reach these private networks (CIDR), e.g. a test upstream. Metadata
    /// addresses (169.254.169.254, fd00:ec2::254, …) stay refused whatever this says.
    #[arg(long = "allow-private", value_name = "CIDR")]
    pub allow_private: Vec<String>,
    /// Extra CA (PEM) trusted for upstream TLS, on top of the system roots.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    #[command(flatten)]
    pub mcp: McpArgs,
}

/// MCP settings of `kz server start` (flattened into its arguments). `fetch` also uses the
/// command's `--allow-private CIDR` (off by default) and `--upstream-ca FILE`.
#[derive(Debug, Clone, Args)]
pub struct McpArgs {
    /// Serve the MCP tools `resolve` and `fetch` (server name `keyzero`) instead of the HTTP
    /// API: over stdio, or over MCP streamable HTTP at http://ADDR/mcp when --listen is given.
    #[arg(long, conflicts_with_all = ["proxy", "proxy_listen"])]
    pub mcp: bool,
    /// Resolve `fetch` destinations with this DNS server (IP:PORT, UDP) instead of the system
    /// resolver.
    #[arg(long = "mcp-dns", value_name = "IP:PORT", env = "KZ_MCP_DNS")]
    pub dns: Option<SocketAddr>,
    /// Largest `fetch` response body handed back, in bytes; longer bodies are cut and marked
    /// `truncated`.
    #[arg(long = "mcp-max-body", value_name = "BYTES", default_value_t = crate::mcp::DEFAULT_MAX_BODY)]
    pub max_body: usize,
    /// Time limit for one `fetch` (lookup, connect, TLS, redirects and body), in seconds.
    #[arg(long = "mcp-timeout", value_name = "SECS", default_value_t = 30)]
    pub timeout_secs: u64,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's keyed chain (and its rotated predecessors FILE.1, FILE.2, …); names
    /// the first record that fails and why, and exits 1.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// The chain's key [default: /var/lib/kz/audit.key as root, else
        /// $XDG_STATE_HOME/kz/audit.key or ~/.local/state/kz/audit.key]
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

// ---- kz intercept (hidden) ----

#[derive(Debug, Subcommand)]
pub enum InterceptCommand {
    /// Load the programs, create one cgroup with the given policy, print a JSON line describing
    /// it, print block events as JSON lines, and hold until stdin closes or SIGTERM/SIGINT; then
    /// clean up everything.
    Hold(HoldArgs),
    /// Clean up pins and cgroups left by kz instances that died (kills their processes).
    Cleanup {
        /// State scope (directory name under /sys/fs/bpf and the cgroup2 root).
        #[arg(long, default_value = crate::intercept::pins::DEFAULT_SCOPE)]
        scope: String,
    },
    /// Remove the pinned eBPF program set (every build's) once no kz instance is running; dead
    /// instances are cleaned up first. The next kz run loads the programs again.
    Unload {
        /// State scope (directory name under /sys/fs/bpf and the cgroup2 root).
        #[arg(long, default_value = crate::intercept::pins::DEFAULT_SCOPE)]
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
    #[arg(long, default_value = crate::intercept::pins::DEFAULT_SCOPE)]
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
