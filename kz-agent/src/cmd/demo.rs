//! `kz intercept demo` (run by `cargo xtask demo`): interception end to end on this machine.
//!
//! Two network namespaces joined by a veth (10.231.7.1 ↔ 10.231.7.2) stand in for "the agent's
//! host" and "a remote upstream"; nothing in them can reach the outside world. curl runs in an
//! intercepted cgroup inside the first one: its connect to the upstream lands on a local listener
//! that prints the original destination; its connect to a denied CIDR fails with EPERM and a
//! block event names it. A curl outside the cgroup goes straight to the upstream.

use crate::intercept::{Cgroup, Cidr, Interceptor, Policy};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

const CLIENT_IP: &str = "10.231.7.1";
const UPSTREAM_IP: &str = "10.231.7.2";
const DENIED: &str = "10.231.8.0/24";

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread inside the namespace (sockets it makes live there).
fn in_ns<F: FnOnce() + Send + 'static>(ns: &str, f: F) -> Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    std::thread::spawn(move || {
        if nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
            f();
        }
    });
    Ok(())
}

fn http_reply(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn curl(ns: &str, cg: Option<&Cgroup>, url: &str) -> Result<(bool, String)> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "curl", "-sS", "--max-time", "5", url]);
    if let Some(cg) = cg {
        cg.place_child(&mut cmd)?;
    }
    let out = cmd
        .output()
        .context("run curl (is it installed? `cargo xtask setup`)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text.trim().to_owned()))
}

pub(super) fn run() -> Result<()> {
    let tag = std::process::id();
    let client = Ns(format!("kzdemo-c{tag}"));
    let upstream = Ns(format!("kzdemo-u{tag}"));
    let (va, vb) = (format!("kzdc{tag}"), format!("kzdu{tag}"));
    for ns in [&client.0, &upstream.0] {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&[
        "link",
        "add",
        &va,
        "netns",
        &client.0,
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        &upstream.0,
    ])?;
    for (ns, dev, addr) in [(&client.0, &va, CLIENT_IP), (&upstream.0, &vb, UPSTREAM_IP)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    println!(
        "== network: namespace {} ({CLIENT_IP}) <-> namespace {} ({UPSTREAM_IP}:80)",
        client.0, upstream.0
    );

    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(&upstream.0, move || {
        let Ok(l) = TcpListener::bind((UPSTREAM_IP, 80)) else {
            return;
        };
        let _ = tx.send(());
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(http_reply("hello from the upstream itself\n").as_bytes());
        }
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("upstream did not start")?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _enter = rt.enter();
    let mut icpt = Interceptor::load()?;
    let table = icpt.orig_dst_table();
    let mut events = icpt.block_events()?;
    let (tx, rx) = std::sync::mpsc::channel();
    in_ns(&client.0, move || {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            return;
        };
        let Ok(addr) = l.local_addr() else { return };
        let _ = tx.send(addr.port());
        for mut s in l.incoming().flatten() {
            let Ok(peer) = s.peer_addr() else { continue };
            let body = match table.take(peer) {
                Some(o) => {
                    println!(
                        "   listener: connection from {peer} (pid {}), original destination {}",
                        o.tgid, o.dest
                    );
                    format!("intercepted by kz: you asked for {}\n", o.dest)
                }
                None => format!("no interception record for {peer}\n"),
            };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(http_reply(&body).as_bytes());
        }
    })?;
    let port = rx
        .recv_timeout(Duration::from_secs(5))
        .context("listener did not start")?;
    let policy = Policy {
        proxy_port: port,
        deny: vec![DENIED.parse::<Cidr>()?],
        ..Policy::default()
    };
    let cg = icpt.create_cgroup(&format!("demo-{tag}"), &policy)?;
    println!(
        "== cgroup {} (id {}): TCP -> 127.0.0.1:{port}, deny {DENIED}",
        cg.path.display(),
        cg.id
    );

    println!("\n1. curl http://{UPSTREAM_IP}/ inside the cgroup (redirected in the kernel):");
    let (ok, text) = curl(&client.0, Some(&cg), &format!("http://{UPSTREAM_IP}/"))?;
    println!("   curl: {text}");
    if !ok || !text.contains("intercepted by kz") {
        bail!("the connection was not intercepted");
    }

    println!("\n2. the same curl outside the cgroup (untouched):");
    let (ok, text) = curl(&client.0, None, &format!("http://{UPSTREAM_IP}/"))?;
    println!("   curl: {text}");
    if !ok || !text.contains("upstream itself") {
        bail!("the direct connection did not reach the upstream");
    }

    println!("\n3. curl http://10.231.8.9/ inside the cgroup (denied CIDR {DENIED}):");
    let (ok, text) = curl(&client.0, Some(&cg), "http://10.231.8.9/")?;
    println!("   curl: {text}");
    if ok {
        bail!("the denied connection succeeded");
    }
    let block = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), events.next()).await })
        .context("no block event arrived")??;
    println!(
        "   block event: pid {} ({}) -> {} {} refused: {:?}",
        block.tgid, block.comm, block.proto, block.dest, block.reason
    );

    drop(events);
    drop(icpt);
    println!("\n== done: programs detached, pins and cgroups removed");
    Ok(())
}
