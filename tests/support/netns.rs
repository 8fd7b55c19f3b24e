//! Network namespaces for test hosts.
//!
//! A typical test makes a client namespace and an upstream namespace joined by a veth pair
//! ([`Pair`]): nothing in either has a route to the outside world, so a test that breaks can
//! never send traffic off this machine. Namespaces are deleted on drop (which also deletes their
//! veths). Test servers run on threads inside them: [`Netns::serve`] (a tokio runtime) and
//! [`Netns::serve_blocking`] (std sockets) return once the server says it is ready.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// How long a test server may take to bind its sockets.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `/run/netns/<unique name>` with loopback up.
    pub fn new(prefix: &str) -> Netns {
        let name = super::unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(ns.ip().args(["link", "set", "lo", "up"]));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> …`
    pub fn ip(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]);
        cmd
    }

    /// A command that runs inside this namespace. Uses nsenter, not `ip netns exec`, because the
    /// latter remounts /sys and hides cgroupfs (ebpf-toolchain.md).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Moves the calling thread into this namespace. Sockets it creates afterwards live here.
    /// Only call it on a thread you own (see [`Netns::spawn`]).
    pub fn enter_current_thread(&self) {
        enter(&self.path());
    }

    /// Runs `f` on a new thread inside this namespace, e.g. a tokio runtime serving an upstream.
    pub fn spawn<F, R>(&self, f: F) -> std::thread::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// Starts a server on a thread inside this namespace with a tokio runtime of its own:
    /// `server` binds its sockets, sends what the test needs (addresses, ports) on `ready`, then
    /// serves. Returns what it sent; fails the test if it does not get ready.
    pub fn serve<T, F, Fut>(&self, server: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(mpsc::Sender<T>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        serve(Some(self), server)
    }

    /// [`Netns::serve`] for a server written with blocking std sockets.
    pub fn serve_blocking<T, F>(&self, server: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(mpsc::Sender<T>) + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.spawn(move || server(tx));
        rx.recv_timeout(READY_TIMEOUT)
            .expect("the test server in the namespace did not get ready")
    }

    /// Adds `cidr` to `dev` (IPv6 addresses without duplicate address detection, so they are
    /// usable at once).
    pub fn add_addr(&self, dev: &str, cidr: &str) {
        let mut cmd = self.ip();
        cmd.args(["addr", "add", cidr, "dev", dev]);
        if cidr.contains(':') {
            cmd.arg("nodad");
        }
        run(&mut cmd);
    }
}

/// [`Netns::serve`] inside `ns`, or in the test process's own network namespace when `None`
/// (servers that only listen on loopback).
pub fn serve<T, F, Fut>(ns: Option<&Netns>, server: F) -> T
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (tx, rx) = mpsc::channel();
    let path = ns.map(Netns::path);
    std::thread::spawn(move || {
        // Before the runtime exists: its worker threads inherit this thread's namespace.
        if let Some(path) = path {
            enter(&path);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(server(tx));
    });
    rx.recv_timeout(READY_TIMEOUT)
        .expect("the test server did not get ready")
}

fn enter(path: &Path) {
    let file = File::open(path).expect("open netns file");
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair: `a_cidr` (e.g. "10.231.0.1/24") on a's end and
/// `b_cidr` on b's. Returns the two interface names.
pub fn link(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) -> (String, String) {
    let va = super::unique_name("va");
    let vb = super::unique_name("vb");
    run(Command::new("ip").args([
        "link",
        "add",
        &va,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        b.name(),
    ]));
    for (ns, dev, cidr) in [(a, &va, a_cidr), (b, &vb, b_cidr)] {
        run(ns.ip().args(["addr", "add", cidr, "dev", dev]));
        run(ns.ip().args(["link", "set", dev, "up"]));
    }
    (va, vb)
}

/// The client/upstream layout of the end-to-end tests: two namespaces joined by one veth, the
/// client at [`CLIENT_IP`] and the upstream at [`UPSTREAM_IP`] (or other addresses, see
/// [`Pair::with_addrs`]). More hosts on either side are more addresses on its end of the veth.
pub struct Pair {
    pub client: Netns,
    pub upstream: Netns,
    /// The client's end of the veth.
    pub client_dev: String,
    /// The upstream's end of the veth.
    pub upstream_dev: String,
}

pub const CLIENT_IP: &str = "10.77.0.1";
pub const UPSTREAM_IP: &str = "10.77.0.2";

impl Pair {
    /// Namespaces `<client_prefix>…` (10.77.0.1/24) and `<upstream_prefix>…` (10.77.0.2/24).
    pub fn new(client_prefix: &str, upstream_prefix: &str) -> Pair {
        Pair::with_addrs(
            client_prefix,
            &format!("{CLIENT_IP}/24"),
            upstream_prefix,
            &format!("{UPSTREAM_IP}/24"),
        )
    }

    pub fn with_addrs(
        client_prefix: &str,
        client_cidr: &str,
        upstream_prefix: &str,
        upstream_cidr: &str,
    ) -> Pair {
        let client = Netns::new(client_prefix);
        let upstream = Netns::new(upstream_prefix);
        let (client_dev, upstream_dev) = link(&client, client_cidr, &upstream, upstream_cidr);
        Pair {
            client,
            upstream,
            client_dev,
            upstream_dev,
        }
    }

    /// One more address (`10.77.0.3/24`, `fd77::10/64`) on the upstream's end: another host.
    pub fn add_upstream_addr(&self, cidr: &str) {
        self.upstream.add_addr(&self.upstream_dev, cidr);
    }

    /// One more address on the client's end.
    pub fn add_client_addr(&self, cidr: &str) {
        self.client.add_addr(&self.client_dev, cidr);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
