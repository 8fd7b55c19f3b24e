//! The stage the proxy benches share (`bench proxy`, `bench agent`): a client netns and an
//! upstream netns joined by a veth pair (10.78.0.1 ↔ 10.78.0.2), nginx in the upstream one
//! (HTTPS h1/h2 on 10.78.0.2:443 with a bench CA, plain HTTP on :80), the release builds of
//! the load generator and the processes a bench starts, all cleaned up on drop. Nothing leaves
//! the two namespaces.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const UP_IP: &str = "10.78.0.2";
pub const HOST: &str = "bench.test";

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub fn netns_cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}

/// Fails unless this process is root (network namespaces, cgroups).
pub fn require_root(what: &str) -> Result<()> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        });
    if root != Some(true) {
        bail!("the {what} bench needs root (network namespaces)");
    }
    Ok(())
}

/// `cargo build --release -p kz-agent` of `targets` (e.g. `["--example", "proxy_loadgen"]`).
pub fn build_release(targets: &[&str]) -> Result<()> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .env("PATH", crate::setup::path_with_tools())
            .args(["build", "--release", "-p", "kz-agent"])
            .args(targets),
    )
}

/// The load generator's release build (`kz-agent/examples/proxy_loadgen.rs`).
pub fn loadgen() -> PathBuf {
    workspace_root().join("target/release/examples/proxy_loadgen")
}

/// The two namespaces, their directory, and the processes to stop, whatever happens.
pub struct Stage {
    pub client: String,
    pub upstream: String,
    pub dir: PathBuf,
    pub children: Vec<(String, Child)>,
}

impl Drop for Stage {
    fn drop(&mut self) {
        for (name, c) in &mut self.children {
            // Closing stdin stops kz, the KeyZero harness; nginx wants SIGTERM (a SIGKILLed
            // master leaves its workers behind), and so does kz agent (an orderly stop);
            // kill is the fallback.
            drop(c.stdin.take());
            if name == "nginx" || name == "kz-agent" {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
                eprintln!("bench: killed {name}");
            }
        }
        for ns in [&self.client, &self.upstream] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Stage {
    /// The namespaces and the veth pair; `tag` keeps two benches' names apart.
    pub fn new(tag: &str) -> Result<Stage> {
        let id = std::process::id();
        let stage = Stage {
            client: format!("kz{tag}c{id}"),
            upstream: format!("kz{tag}u{id}"),
            dir: std::env::temp_dir().join(format!("kz-bench-{tag}-{id}")),
            children: Vec::new(),
        };
        std::fs::create_dir_all(&stage.dir)?;
        for ns in [&stage.client, &stage.upstream] {
            run(Command::new("ip").args(["netns", "add", ns]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        let (va, vb) = (format!("kz{tag}a{id}"), format!("kz{tag}b{id}"));
        run(Command::new("ip").args([
            "link",
            "add",
            &va,
            "netns",
            &stage.client,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            &stage.upstream,
        ]))?;
        for (ns, dev, cidr) in [
            (&stage.client, &va, "10.78.0.1/24"),
            (&stage.upstream, &vb, "10.78.0.2/24"),
        ] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", cidr, "dev", dev]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
        }
        Ok(stage)
    }

    /// nginx in the upstream netns with the bench CA's certificate (`dir/ca.pem`), serving
    /// `/small`, `/upload` (PUT) and `/big.bin` (100 MiB).
    pub fn start_nginx(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        run(Command::new(loadgen()).args(["certs", dir.to_str().unwrap_or("."), UP_IP, HOST]))?;
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        let f = std::fs::File::create(www.join("big.bin"))?;
        f.set_len(100 << 20)?;
        let d = dir.display();
        let conf = format!(
            r#"user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {d}/body;
  sendfile on;
  default_type text/plain;
  server {{
    listen {UP_IP}:443 ssl http2;
    listen {UP_IP}:80;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    ssl_session_cache shared:SSL:10m;
    root {d}/www;
    location = /small {{ return 200 "hello from nginx\n"; }}
    # A real sink: nginx answers a PUT only after the whole body is stored.
    location = /upload {{ client_max_body_size 0; dav_methods PUT; }}
    location = /big.bin {{ }}
  }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let nginx = netns_cmd(&self.upstream, "nginx")
            .args([
                "-c",
                &format!("{d}/nginx.conf"),
                "-e",
                &format!("{d}/nginx-error.log"),
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("start nginx")?;
        self.children.push(("nginx".into(), nginx));
        Ok(())
    }
}

/// One load generator run's result (its JSON line).
#[derive(Debug, Clone, Default)]
pub struct Res {
    pub rps: f64,
    /// Lowest and highest rps over the rounds, when there were several.
    pub spread: Option<(f64, f64)>,
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
    pub requests: u64,
    pub bytes: u64,
    pub secs: f64,
}

pub fn parse(line: &str) -> Option<Res> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    Some(Res {
        rps: v["rps"].as_f64()?,
        spread: None,
        p50: v["p50_us"].as_f64()?,
        p99: v["p99_us"].as_f64()?,
        errors: v["errors"].as_u64()?,
        requests: v["requests"].as_u64()?,
        bytes: v["bytes"].as_u64()?,
        secs: v["secs"].as_f64()?,
    })
}

/// A `/proc/PID/status` field in kB (`VmRSS:`, `VmHWM:`).
pub fn vm(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
