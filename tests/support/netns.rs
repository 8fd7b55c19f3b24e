//! Network namespaces for test hosts.
//!
//! A typical test makes a client namespace and an upstream namespace joined by a veth pair:
//! nothing in either has a route to the outside world, so a test that breaks can never send
//! traffic off this machine. Namespaces are deleted on drop (which also deletes their veths).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;

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
        let file = File::open(self.path()).expect("open netns file");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// Runs `f` on a new thread inside this namespace, e.g. a tokio runtime serving an upstream.
    pub fn spawn<F, R>(&self, f: F) -> std::thread::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns file");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
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
