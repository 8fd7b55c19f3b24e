//! Sandboxes on a node: what one contained agent needs from kz, composed in one place.
//!
//! A [`Node`] is started once: the interception core (the shared eBPF programs, the event
//! ring), the swapping proxy's listeners and workers. A [`Sandbox`] is admitted on it and
//! closed again: its session in the proxy (token table, connection rules, CA, audit sink, DNS
//! view), its own DNS resolver, its cgroup with the kernel policy "all TCP to the proxy, UDP/53
//! to this sandbox's resolver, nothing to an address that resolver did not hand out", and the
//! route of its blocked-connection events to its audit sink. [`Sandbox::spawn`] is the one place
//! a contained agent is started.
//!
//! Everything per sandbox is keyed by its cgroup id: the proxy finds a connection's session from
//! the kernel's record of the redirected connect, the DNS resolver a sandbox's queries reach is
//! the one its policy names (the kernel picks the port by cgroup id), its answers open addresses
//! in that cgroup's allow map only, and its block events carry the cgroup's id.
//!
//! The allow map is one for the whole machine: each sandbox may hold at most
//! [`SandboxSpec::max_allowed_ips`] live entries of it (an answer beyond that is refused,
//! SERVFAIL, audited once per burst: [`allowed`]), and the node deletes expired entries every
//! [`NodeOptions::allowed_ip_purge`], so one agent resolving name after name cannot exhaust it
//! for the others.
//!
//! `kz run --blind` is a node with one sandbox; the node daemon, a node with many. Without the
//! kernel (no root, cgroup v2 or BPF) a node is an explicit proxy serving one sandbox: its agent
//! is told `HTTP(S)_PROXY` ([`Sandbox::proxy_env`]).

mod allowed;
mod blocks;
mod names;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use names::{literal_ips_allowed, name_allowed};

use crate::audit::AuditSink;
use crate::contain::{self, Prepared};
use crate::intercept::dns::{self, DnsConfig, DnsHooks, DnsServer, ResolvedIp};
pub use crate::intercept::spawn::ChildStdio;
use crate::intercept::{
    Cgroup, InterceptError, Interceptor, Ipv6Mode, Listen, Policy, TcpRedirect, UnixSockets,
};
use crate::proxy::{
    self, CertAuthority, ConnectionRules, ProxyError, ProxyHandle, Redirected, Session,
    SessionError, SessionId, TokenTable,
};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the swapping proxy: {0}")]
    Proxy(#[from] ProxyError),
    #[error("cannot start the DNS resolver: {0}")]
    Dns(#[from] dns::DnsError),
    #[error("kernel interception: {0}")]
    Intercept(#[from] InterceptError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error(
        "without kernel interception a node serves one sandbox (its explicit proxy has no way to tell two apart); close the running one first"
    )]
    OneWithoutKernel,
    #[error(
        "the sandbox asks for native IPv6 but the node's proxy does not listen on [::1]; start the node with ipv6"
    )]
    Ipv6NotOnNode,
    #[error(
        "a sandbox on an existing cgroup needs kernel interception (root, cgroup v2, BPF); `kz doctor` says what is missing"
    )]
    ExistingCgroupWithoutKernel,
}

/// What a node is started with.
pub struct NodeOptions {
    /// The loaded interception core; `None`: explicit-proxy mode (cooperative, one sandbox).
    pub kernel: Option<Interceptor>,
    /// Whether the proxy listens on `[::1]` too (for sandboxes with native IPv6).
    pub ipv6: bool,
    /// Extra PEM CA trusted for upstreams, in addition to the system roots.
    pub upstream_ca: Option<PathBuf>,
    pub limits: proxy::Limits,
    /// The node's own sink: what happens before a sandbox is known (or after it closed).
    pub audit: Arc<dyn AuditSink>,
    /// How often expired entries are deleted from the allowed-IP map ([`ALLOWED_IP_PURGE`]).
    pub allowed_ip_purge: Duration,
}

/// What a sandbox is admitted with.
pub struct SandboxSpec {
    /// Its name on the node (the cgroup's; unique, [`crate::intercept::cgroups::valid_name`]).
    pub name: String,
    pub ca: Arc<CertAuthority>,
    pub tokens: TokenTable,
    pub rules: ConnectionRules,
    /// Refuse a request carrying a token outside its scope instead of forwarding it masked.
    pub refuse_out_of_scope: bool,
    /// The resolver that answers the names the rules allow.
    pub dns_upstream: SocketAddr,
    /// Native IPv6 (the kernel redirects v6 to `[::1]`), else v6 connects are refused.
    pub ipv6: bool,
    /// Non-DNS UDP allowed (to addresses its DNS handed out).
    pub udp: bool,
    pub listen: Listen,
    pub unix: UnixSockets,
    /// Its audit sink, with its context (run id, program, …).
    pub audit: Arc<dyn AuditSink>,
    /// Also print each blocked connection on kz's stderr (an interactive `kz run`).
    pub echo_blocks: bool,
    /// Live entries it may hold in the node's allowed-IP map (`[blind] max_allowed_ips`,
    /// default [`crate::intercept::allowed::DEFAULT_QUOTA`]).
    pub max_allowed_ips: usize,
    /// How long a name's addresses stay allowed at least ([`TTL_FLOOR`]; see
    /// [`DnsConfig::ttl_floor`]).
    pub dns_ttl_floor: Duration,
    /// Admit the sandbox on this cgroup, which exists and belongs to someone else (a
    /// Kubernetes pod's, made by the kubelet), instead of a new one of kz's: the policy covers
    /// its subtree (the pod's containers), and [`Node::close`] gives it back (programs
    /// detached, policy gone) instead of killing its processes and removing it
    /// ([`Interceptor::guard_existing_cgroup`]). Needs the kernel.
    pub existing_cgroup: Option<PathBuf>,
}

/// The cgroup of a sandbox does not exist before its policy names its DNS port, so the
/// resolver learns the id once the cgroup is made; until then it answers nothing.
type CgroupCell = Arc<OnceLock<u64>>;

/// How long a name's addresses stay allowed at least (see [`DnsConfig::ttl_floor`]).
pub const TTL_FLOOR: Duration = Duration::from_secs(300);

/// How often the node deletes expired allowed-IP entries. The kernel ignores an expired entry
/// at once; this only frees its slot in the shared map (and a sandbox at its quota frees its own
/// expired entries itself before its next answer is refused).
pub const ALLOWED_IP_PURGE: Duration = Duration::from_secs(30);

/// The session id of the one sandbox of a node without the kernel (cgroup ids start at 1).
const EXPLICIT_SESSION: SessionId = 0;

struct Kernel {
    icpt: Mutex<Interceptor>,
    blocks: blocks::Dispatch,
    _purge: PurgeTask,
}

/// The timer deleting expired allowed-IP entries; stops with the node.
struct PurgeTask(tokio::task::JoinHandle<()>);

impl PurgeTask {
    fn start(map: crate::intercept::AllowMap, every: Duration) -> PurgeTask {
        PurgeTask(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let purged = map.purge_expired();
                if purged > 0 {
                    tracing::debug!(purged, "deleted expired allowed-IP entries");
                }
            }
        }))
    }
}

impl Drop for PurgeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What is started once: the interception core and the proxy.
pub struct Node {
    kernel: Option<Kernel>,
    proxy: ProxyHandle,
    ipv6: bool,
}

impl Node {
    /// Starts the proxy (and, with the kernel, the block-event reader). Inside a tokio runtime.
    pub async fn start(opts: NodeOptions) -> Result<Node, SandboxError> {
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut pcfg = proxy::Config::new(opts.audit.clone());
        pcfg.upstream_ca = opts.upstream_ca;
        pcfg.limits = opts.limits;
        let Some(mut icpt) = opts.kernel else {
            pcfg.explicit_listen = vec![loopback];
            pcfg.explicit_session = Some(EXPLICIT_SESSION);
            let proxy = proxy::start(pcfg).await?;
            return Ok(Node {
                kernel: None,
                proxy,
                ipv6: false,
            });
        };
        let orig = icpt.orig_dst_table();
        // The table is shared by every kz instance on the machine; the cgroup id in each record
        // says whose connect it was, and only a session this node admitted is served.
        pcfg.orig_dst = Some(Arc::new(move |peer| {
            orig.lookup(peer).map(|o| Redirected {
                dest: o.dest,
                session: o.cgroup_id,
            })
        }));
        pcfg.transparent_listen = if opts.ipv6 {
            // The kernel sends v6 connects to [::1]:<proxy port>: the same port on both.
            // A port free on 127.0.0.1 a moment ago; [::1] is a separate address space.
            let port = std::net::TcpListener::bind(loopback)
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|source| ProxyError::Bind {
                    addr: loopback,
                    source,
                })?;
            vec![
                SocketAddr::new(loopback.ip(), port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
            ]
        } else {
            vec![loopback]
        };
        let events = icpt.block_events()?;
        let proxy = proxy::start(pcfg).await?;
        let purge = PurgeTask::start(icpt.allow_map(), opts.allowed_ip_purge);
        Ok(Node {
            kernel: Some(Kernel {
                icpt: Mutex::new(icpt),
                blocks: blocks::Dispatch::start(events, opts.audit),
                _purge: purge,
            }),
            proxy,
            ipv6: opts.ipv6,
        })
    }

    /// Whether the kernel enforces (false: explicit-proxy mode).
    pub fn kernel(&self) -> bool {
        self.kernel.is_some()
    }

    pub fn proxy(&self) -> &ProxyHandle {
        &self.proxy
    }

    /// The parent of the node's sandbox cgroups (none without the kernel).
    pub fn cgroup_dir(&self) -> Option<PathBuf> {
        let k = self.kernel.as_ref()?;
        Some(lock(&k.icpt).cgroup_dir().to_owned())
    }

    /// Admits a sandbox: its DNS resolver, cgroup and policy, session and event route. Nothing
    /// of it is left behind when this fails.
    pub async fn admit(&self, spec: SandboxSpec) -> Result<Sandbox, SandboxError> {
        self.admit_in(spec, Place::New).await
    }

    /// Admits a sandbox in the cgroup `spec.name` with id `id` that a previous process of this
    /// node's held owner left behind ([`Interceptor::load_held`]), with whatever still runs in it:
    /// a DNS resolver and session of its own as [`Node::admit`] gives, and the cgroup's kernel
    /// policy rewritten to name them ([`Interceptor::adopt_cgroup`]). When this fails the cgroup
    /// is left as it was (cut off) for [`Node::sweep_held`], or removed with its processes when
    /// it failed after the policy was rewritten. With [`SandboxSpec::existing_cgroup`] the
    /// cgroup is that one, guarded before by the previous process
    /// ([`Interceptor::adopt_existing_cgroup`]); it is never removed, only given back.
    pub async fn adopt(&self, spec: SandboxSpec, id: u64) -> Result<Sandbox, SandboxError> {
        self.admit_in(spec, Place::Held(id)).await
    }

    /// Removes what the held owner's previous process left and nothing adopted
    /// ([`Interceptor::sweep_held`]).
    pub fn sweep_held(&self) -> Vec<crate::intercept::Swept> {
        match &self.kernel {
            Some(k) => lock(&k.icpt).sweep_held(),
            None => Vec::new(),
        }
    }

    async fn admit_in(&self, spec: SandboxSpec, place: Place) -> Result<Sandbox, SandboxError> {
        let answers = names::Answers::default();
        let resolve = names::host_lookup(
            answers.clone(),
            spec.dns_upstream,
            spec.rules.address_guard(),
        );
        let session = |id| {
            let mut s = Session::new(id, spec.ca.clone(), spec.tokens.clone(), spec.audit.clone());
            s.rules = spec.rules.clone();
            s.refuse_out_of_scope = spec.refuse_out_of_scope;
            s.resolve = Some(resolve.clone());
            s
        };
        let Some(kernel) = &self.kernel else {
            if spec.existing_cgroup.is_some() {
                return Err(SandboxError::ExistingCgroupWithoutKernel);
            }
            self.proxy
                .admit(session(EXPLICIT_SESSION))
                .map_err(|_| SandboxError::OneWithoutKernel)?;
            return Ok(Sandbox {
                name: spec.name,
                session: EXPLICIT_SESSION,
                cgroup: None,
                dns: Vec::new(),
                allowed: None,
                explicit_proxy: self.proxy.explicit_addrs.first().copied(),
            });
        };
        if spec.ipv6 && !self.ipv6 {
            return Err(SandboxError::Ipv6NotOnNode);
        }
        let cgroup_id = CgroupCell::default();
        let opener = Arc::new(allowed::Opener::new(
            lock(&kernel.icpt).allow_map(),
            spec.max_allowed_ips,
            &spec.name,
            spec.audit.clone(),
        ));
        let dns = self
            .start_dns(&spec, &cgroup_id, answers, opener.clone())
            .await?;
        let proxy_port = self
            .proxy
            .transparent_addrs
            .first()
            .map(SocketAddr::port)
            .ok_or(ProxyError::NoListener)?;
        let policy = Policy {
            proxy_port,
            dns_port: dns[0].local_addr().port(),
            tcp: TcpRedirect::All,
            ipv6: if spec.ipv6 {
                Ipv6Mode::Intercept
            } else {
                Ipv6Mode::Deny
            },
            require_allow: true,
            allow_udp: spec.udp,
            loopback_direct: false,
            allow: literal_ips_allowed(&spec.rules),
            deny: Vec::new(),
            listen: spec.listen,
            unix: spec.unix.clone(),
        };
        let cgroup = {
            let mut icpt = lock(&kernel.icpt);
            match (place, &spec.existing_cgroup) {
                (Place::New, None) => icpt.create_cgroup(&spec.name, &policy)?,
                (Place::New, Some(path)) => {
                    icpt.guard_existing_cgroup(path, &spec.name, &policy)?
                }
                (Place::Held(id), None) => icpt.adopt_cgroup(&spec.name, id, &policy)?,
                (Place::Held(id), Some(path)) => {
                    icpt.adopt_existing_cgroup(path, &spec.name, id, &policy)?
                }
            }
        };
        // The cell is fresh: set() cannot fail.
        let _ = cgroup_id.set(cgroup.id);
        if let Err(e) = self.proxy.admit(session(cgroup.id)) {
            let _ = lock(&kernel.icpt).remove_cgroup(cgroup.id);
            return Err(e.into());
        }
        kernel.blocks.route(
            cgroup.id,
            blocks::Route {
                audit: spec.audit.clone(),
                cgroup: cgroup.path.display().to_string(),
                echo: spec.echo_blocks,
            },
        );
        Ok(Sandbox {
            name: spec.name,
            session: cgroup.id,
            cgroup: Some(cgroup),
            dns,
            allowed: Some(opener),
            explicit_proxy: None,
        })
    }

    /// The sandbox's resolver (and its `[::1]` twin on the same port with native IPv6).
    async fn start_dns(
        &self,
        spec: &SandboxSpec,
        cgroup_id: &CgroupCell,
        answers: names::Answers,
        opener: Arc<allowed::Opener>,
    ) -> Result<Vec<DnsServer>, SandboxError> {
        let on_answer = {
            let cgroup_id = cgroup_id.clone();
            Arc::new(
                move |name: &str, ips: &[ResolvedIp]| -> Result<(), dns::AnswerError> {
                    let id = *cgroup_id
                        .get()
                        .ok_or("the sandbox's cgroup does not exist yet")?;
                    opener.open(id, name, ips)?;
                    answers.remember(name, ips.iter().map(|r| r.ip).collect());
                    Ok(())
                },
            )
        };
        let rules = spec.rules.clone();
        let hooks = DnsHooks {
            allow: Arc::new(move |name: &str| name_allowed(&rules, name)),
            on_answer,
            audit: spec.audit.clone(),
        };
        let mut dcfg = DnsConfig::new(([127, 0, 0, 1], 0).into(), spec.dns_upstream);
        dcfg.ttl_floor = spec.dns_ttl_floor;
        dcfg.ipv6 = spec.ipv6;
        // Answers pointing an allowed name at loopback, link-local, metadata… are dropped
        // unless the rules allow that range (`cidr`).
        dcfg.guard = spec.rules.address_guard();
        let v4 = DnsServer::start(dcfg.clone(), hooks.clone()).await?;
        let mut servers = vec![];
        if spec.ipv6 {
            dcfg.listen = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), v4.local_addr().port());
            servers.push(DnsServer::start(dcfg, hooks).await?);
        }
        servers.insert(0, v4);
        Ok(servers)
    }

    /// Closes a sandbox: the events its agent caused are audited (and the allowed-IP refusals
    /// no record counted yet), whatever is left in its cgroup is killed and the cgroup removed
    /// with its allowed-IP entries, its session and resolver stop. Connections still open finish
    /// with their session (see [`proxy::Sessions::close`]).
    pub async fn close(&self, sandbox: Sandbox) {
        if let (Some(kernel), Some(cgroup)) = (&self.kernel, &sandbox.cgroup) {
            kernel.blocks.unroute(cgroup.id).await;
            if let Some(opener) = &sandbox.allowed {
                opener.flush(cgroup.id);
            }
            if let Err(e) = lock(&kernel.icpt).remove_cgroup(cgroup.id) {
                eprintln!("kz: {e}");
            }
        }
        self.proxy.close(sandbox.session);
        drop(sandbox);
    }

    /// The first step of an orderly stop: the proxy accepts nothing new and in-flight requests
    /// finish (up to `limits.drain_timeout`) while every sandbox still stands, so an agent's
    /// last request is answered and audited before its sandbox is closed. Returns the
    /// connections still open when the time ran out.
    pub async fn drain(&self) -> u64 {
        self.proxy.drain().await
    }

    /// Stops the node: the event reader, the interception core (programs detached, pins of
    /// this instance removed), then the proxy, whose in-flight requests get
    /// `limits.drain_timeout` to finish (and be audited).
    pub async fn shutdown(self) {
        if let Some(k) = self.kernel {
            k.blocks.stop().await;
            drop(k.icpt);
        }
        self.proxy.shutdown().await;
    }
}

/// Where an admitted sandbox's cgroup comes from.
enum Place {
    New,
    /// Left by a previous process of the node's held owner, with this id.
    Held(u64),
}

/// One admitted sandbox. Give it back to [`Node::close`].
pub struct Sandbox {
    name: String,
    session: SessionId,
    cgroup: Option<Cgroup>,
    dns: Vec<DnsServer>,
    /// Opens its DNS answers in the allowed-IP map (none without the kernel).
    allowed: Option<Arc<allowed::Opener>>,
    explicit_proxy: Option<SocketAddr>,
}

impl Sandbox {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sandbox's cgroup (none without the kernel).
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The address of the sandbox's DNS resolver (none without the kernel).
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.first().map(DnsServer::local_addr)
    }

    /// What the agent's environment must say for its traffic to reach kz: nothing under the
    /// kernel; the proxy variables (and an empty `NO_PROXY`: loopback and local names go
    /// through kz too) in explicit-proxy mode.
    pub fn proxy_env(&self) -> Vec<(&'static str, String)> {
        let Some(addr) = self.explicit_proxy else {
            return Vec::new();
        };
        let url = format!("http://{addr}");
        let mut env: Vec<_> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
            .into_iter()
            .map(|v| (v, url.clone()))
            .collect();
        env.push(("NO_PROXY", String::new()));
        env.push(("no_proxy", String::new()));
        env
    }

    /// Starts the agent, contained ([`crate::contain`]) before it executes: born in the
    /// sandbox's cgroup with clone3 (no cgroup migration, ~10 ms less), else moved there between
    /// fork and exec on kernels or sandboxes that refuse clone3; without the kernel, contained
    /// in place. Stdio is inherited, or `stdio` (the node daemon's runs: the client's own).
    pub fn spawn(
        &self,
        mut cmd: std::process::Command,
        contained: Arc<Prepared>,
        stdio: Option<ChildStdio>,
    ) -> std::io::Result<Child> {
        let Some(cgroup) = &self.cgroup else {
            set_stdio(&mut cmd, stdio);
            contain::on_exec(&mut cmd, contained);
            return tokio::process::Command::from(cmd).spawn().map(Child::Tokio);
        };
        match cgroup.spawn_with_stdio(&cmd, Some(&contained), stdio.as_ref()) {
            Ok(child) => Ok(Child::Cgroup(child)),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::debug!("{e}; entering the cgroup between fork and exec instead");
                set_stdio(&mut cmd, stdio);
                cgroup
                    .place_child(&mut cmd)
                    .map_err(std::io::Error::other)?;
                contain::on_exec(&mut cmd, contained);
                tokio::process::Command::from(cmd).spawn().map(Child::Tokio)
            }
            Err(e) => Err(e),
        }
    }
}

fn set_stdio(cmd: &mut std::process::Command, stdio: Option<ChildStdio>) {
    if let Some(s) = stdio {
        cmd.stdin(s.stdin).stdout(s.stdout).stderr(s.stderr);
    }
}

/// A child kz waits for: started by std/tokio, or born in a cgroup.
pub enum Child {
    Tokio(tokio::process::Child),
    Cgroup(crate::intercept::spawn::CgroupChild),
}

impl Child {
    pub fn id(&self) -> Option<u32> {
        match self {
            Child::Tokio(c) => c.id(),
            Child::Cgroup(c) => Some(c.id()),
        }
    }

    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Child::Tokio(c) => c.wait().await,
            Child::Cgroup(c) => c.wait().await,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
