//! `cargo xtask bench proxy`: the swapping proxy against the direct path and its peers, in one
//! run, on one machine.
//!
//! Topology: an upstream netns with nginx (HTTPS h1/h2 on 10.78.0.2:443 with a bench CA, plain
//! HTTP on :80) and a client netns holding every proxy and the load generator (release builds of
//! `kz-agent/examples/proxy_{bench_server,loadgen}.rs`). Targets:
//! - direct: the load generator talks to nginx, sending the real value;
//! - kz (transparent): connections go to kz's transparent listener, whose original-destination
//!   lookup names nginx (what the eBPF redirect will provide); masked token in Authorization;
//! - kz (explicit): CONNECT / absolute-form through kz's explicit listener;
//! - KeyZero: crate kz-proxy 0.3 run by a harness built outside kz's dependency tree
//!   (~/.cache/kz/peers/kz-proxy-harness), CONNECT / absolute-form, `upstream_ca` = bench CA;
//! - mitmproxy: mitmdump (own venv under ~/.cache/kz/peers) with an equivalent swap addon.
//!
//! Nothing leaves the two namespaces.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::stage::{self, Res, Stage, UP_IP, netns_cmd, parse, run, vm, workspace_root};
use crate::setup;

const MASKED: &str = "kz_masked_0123456789abcdef0123456789abcdef";
const REAL: &str = "sk-bench-real-value-0123456789";
const MITM_PORT: u16 = 18080;

const HARNESS_TOML: &str = r#"# KeyZero's proxy (crate kz-proxy 0.3) as a process, for `cargo xtask bench proxy`.
# Deliberately outside kz's workspace and dependency tree.
[package]
name = "kz-proxy-harness"
version = "0.1.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
kz-proxy = "=0.3.0"
tokio = { version = "1", features = ["full"] }

[profile.release]
debug = false
"#;

const HARNESS_MAIN: &str = r#"//! Runs KeyZero's Sandbox with one string mapping (masked -> real, real from $KZ_BENCH_REAL),
//! trusting the bench CA upstream. The sandboxed child writes the proxy URL to OUT and copies
//! the MITM CA to OUT.ca, then waits on stdin; closing stdin ends the harness.
use kz_proxy::{Sandbox, SandboxConfig, StringMapping};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (masked, ca, out) = (&a[1], &a[2], &a[3]);
    let real = std::env::var("KZ_BENCH_REAL").expect("KZ_BENCH_REAL");
    let cfg = SandboxConfig {
        strings: vec![StringMapping::new(masked.clone(), real)],
        upstream_ca: Some(ca.into()),
        allow_private_connect: true,
        ..Default::default()
    };
    let script = format!("cp \"$SSL_CERT_FILE\" {out}.ca && echo \"$HTTPS_PROXY\" > {out}.tmp && mv {out}.tmp {out} && exec cat");
    let st = Sandbox::new(cfg)
        .run("sh", &["-c".to_string(), script])
        .await
        .expect("sandbox");
    std::process::exit(st.code().unwrap_or(1));
}
"#;

const MITM_ADDON: &str = r#"# Equivalent of kz's header/body swap for mitmproxy: masked token -> real value.
import os
from mitmproxy import http

MASKED = os.environ["KZ_BENCH_MASKED"]
REAL = os.environ["KZ_BENCH_REAL"]

def request(flow: http.HTTPFlow) -> None:
    h = flow.request.headers
    for k in list(h.keys()):
        vals = h.get_all(k)
        if any(MASKED in v for v in vals):
            h.set_all(k, [v.replace(MASKED, REAL) for v in vals])
    if MASKED in flow.request.path:
        flow.request.path = flow.request.path.replace(MASKED, REAL)
    if flow.request.raw_content and MASKED.encode() in flow.request.raw_content:
        flow.request.content = flow.request.raw_content.replace(MASKED.encode(), REAL.encode())
"#;

fn peers_dir() -> PathBuf {
    setup::venv_dir()
        .parent()
        .map(|p| p.join("peers"))
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kz/peers"))
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    ca: PathBuf,
    /// `--connect` for transparent/direct, `--proxy` for explicit proxies.
    connect: Option<String>,
    proxy: Option<String>,
    plain_connect: Option<String>,
    plain_bind: Option<&'static str>,
    token: &'static str,
    h2: bool,
    /// Run the load generator under `kz run --blind` (the whole product: eBPF redirect, the
    /// `kz` binary's proxy, the hash-chained audit log on disk).
    blind: bool,
}

pub fn run_bench() -> Result<()> {
    stage::require_root("proxy")?;
    let root = workspace_root();
    let path = setup::path_with_tools();
    eprintln!("bench: building kz's bench server and load generator (release)");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .env("PATH", &path)
            .args([
                "build",
                "--release",
                "-p",
                "kz-agent",
                "--example",
                "proxy_bench_server",
                "--example",
                "proxy_loadgen",
                "--bin",
                "kz",
            ]),
    )?;
    let server_bin = root.join("target/release/examples/proxy_bench_server");
    let loadgen = root.join("target/release/examples/proxy_loadgen");
    let kz_bin = root.join("target/release/kz");

    eprintln!("bench: building the KeyZero kz-proxy 0.3 harness (outside kz's tree)");
    let harness_dir = peers_dir().join("kz-proxy-harness");
    std::fs::create_dir_all(harness_dir.join("src"))?;
    std::fs::write(harness_dir.join("Cargo.toml"), HARNESS_TOML)?;
    std::fs::write(harness_dir.join("src/main.rs"), HARNESS_MAIN)?;
    run(Command::new("cargo")
        .current_dir(&harness_dir)
        .env("PATH", &path)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "--quiet"]))?;
    let harness_bin = harness_dir.join("target/release/kz-proxy-harness");

    // mitmproxy gets a venv of its own: it pins old h11/cryptography versions that would break
    // the test venv's httpx, moto and joserfc.
    let mitm_venv = peers_dir().join("mitmproxy-venv");
    let mitmdump = mitm_venv.join("bin/mitmdump");
    if !mitmdump.exists() {
        eprintln!("bench: installing mitmproxy into {}", mitm_venv.display());
        run(Command::new("python3").args(["-m", "venv", mitm_venv.to_str().unwrap_or("")]))?;
        run(Command::new(mitm_venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "mitmproxy",
        ]))?;
    }

    let mut env = Stage::new("b")?;
    let dir = env.dir.clone();
    // 127.0.0.2 marks plain-HTTP clients for kz's transparent listener.
    run(Command::new("ip").args(["-n", &env.client, "addr", "add", "127.0.0.2/8", "dev", "lo"]))
        .ok();

    // Upstream: nginx with the bench CA's certificate.
    env.start_nginx()?;
    let d = dir.display();

    // kz-blind's project: one secret scoped to nginx's address, the only host it may reach.
    let blind_dir = dir.join("blind");
    std::fs::create_dir_all(&blind_dir)?;
    std::fs::write(
        blind_dir.join(".keyzero.toml"),
        format!(
            r#"[secrets.BENCH]
resolver = "env"
ref = "KZ_BENCH_REAL"
hosts = ["{UP_IP}"]

[blind]
connections = [{{ allow = true, host = "{UP_IP}" }}]
upstream_ca = "{d}/ca.pem"
"#
        ),
    )?;
    // kz.
    let mut kz = netns_cmd(&env.client, &server_bin)
        .args([
            "--dst",
            &format!("{UP_IP}:443"),
            "--plain-dst",
            &format!("{UP_IP}:80"),
            "--upstream-ca",
            &format!("{d}/ca.pem"),
            "--ca-out",
            &format!("{d}/kz-ca.pem"),
            "--masked",
            MASKED,
            "--real-env",
            "KZ_BENCH_REAL",
            "--host",
            UP_IP,
            // The product's default worker count unless KZ_BENCH_KZ_THREADS says otherwise.
            "--threads",
            &std::env::var("KZ_BENCH_KZ_THREADS").unwrap_or_else(|_| "0".into()),
        ])
        .env("KZ_BENCH_REAL", REAL)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start kz bench server")?;
    let mut line = String::new();
    BufReader::new(kz.stdout.take().context("kz stdout")?).read_line(&mut line)?;
    let kz_pid = kz.id();
    env.children.push(("kz".into(), kz));
    let parts: Vec<&str> = line.split_whitespace().collect();
    if parts.len() != 3 || parts[0] != "READY" {
        bail!("kz bench server did not start: {line}");
    }
    let (kz_t, kz_x) = (parts[1].to_owned(), parts[2].to_owned());

    // KeyZero.
    let kzp_out = dir.join("keyzero-url");
    let keyzero = netns_cmd(&env.client, &harness_bin)
        .args([
            MASKED,
            &format!("{d}/ca.pem"),
            kzp_out.to_str().unwrap_or(""),
        ])
        .env("KZ_BENCH_REAL", REAL)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("start KeyZero harness")?;
    let keyzero_pid = keyzero.id();
    env.children.push(("keyzero".into(), keyzero));

    // mitmproxy.
    let mitm_conf = dir.join("mitm");
    std::fs::create_dir_all(&mitm_conf)?;
    std::fs::write(dir.join("swap_addon.py"), MITM_ADDON)?;
    let mitm = netns_cmd(&env.client, &mitmdump)
        .args([
            "--quiet",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &MITM_PORT.to_string(),
            "--set",
            &format!("confdir={}", mitm_conf.display()),
            "--set",
            &format!("ssl_verify_upstream_trusted_ca={d}/ca.pem"),
            "--set",
            "stream_large_bodies=1m",
            "-s",
            &format!("{d}/swap_addon.py"),
        ])
        .env("KZ_BENCH_REAL", REAL)
        .env("KZ_BENCH_MASKED", MASKED)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start mitmdump")?;
    let mitm_pid = mitm.id();
    env.children.push(("mitmproxy".into(), mitm));

    // Wait for KeyZero's URL and mitmproxy's CA.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(kzp_out.exists() && mitm_conf.join("mitmproxy-ca-cert.pem").exists()) {
        if Instant::now() > deadline {
            bail!("KeyZero harness or mitmproxy did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let keyzero_url = std::fs::read_to_string(&kzp_out)?;
    let keyzero_addr = keyzero_url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    std::thread::sleep(Duration::from_secs(2));

    let auth_real = format!("Authorization: Bearer {REAL}");
    let auth_masked = format!("Authorization: Bearer {MASKED}");
    let _ = (&auth_real, &auth_masked);
    let targets = vec![
        Target {
            name: "direct",
            ca: dir.join("ca.pem"),
            connect: Some(format!("{UP_IP}:443")),
            proxy: None,
            plain_connect: Some(format!("{UP_IP}:80")),
            plain_bind: None,
            token: REAL,
            h2: true,
            blind: false,
        },
        Target {
            name: "kz",
            ca: dir.join("kz-ca.pem"),
            connect: Some(kz_t.clone()),
            proxy: None,
            plain_connect: Some(kz_t.clone()),
            plain_bind: Some("127.0.0.2"),
            token: MASKED,
            h2: true,
            blind: false,
        },
        Target {
            name: "kz-blind",
            ca: PathBuf::new(),
            connect: None,
            proxy: None,
            plain_connect: None,
            plain_bind: None,
            token: "",
            h2: true,
            blind: true,
        },
        Target {
            name: "kz-explicit",
            ca: dir.join("kz-ca.pem"),
            connect: None,
            proxy: Some(kz_x.clone()),
            plain_connect: None,
            plain_bind: None,
            token: MASKED,
            h2: true,
            blind: false,
        },
        Target {
            name: "keyzero",
            ca: PathBuf::from(format!("{}.ca", kzp_out.display())),
            connect: None,
            proxy: Some(keyzero_addr.clone()),
            plain_connect: None,
            plain_bind: None,
            token: MASKED,
            h2: false,
            blind: false,
        },
        Target {
            name: "mitmproxy",
            ca: mitm_conf.join("mitmproxy-ca-cert.pem"),
            connect: None,
            proxy: Some(format!("127.0.0.1:{MITM_PORT}")),
            plain_connect: None,
            plain_bind: None,
            token: MASKED,
            h2: true,
            blind: false,
        },
    ];

    let secs = std::env::var("KZ_BENCH_SECS").unwrap_or_else(|_| "5".into());
    let client = env.client.clone();
    let load = |t: &Target, scheme: &str, path: &str, extra: &[&str]| -> Result<Option<Res>> {
        let plain = scheme == "http";
        let url = format!("{scheme}://{UP_IP}{path}");
        let mut c = if t.blind {
            // The agent's view: it dials nginx's address with the masked value kz put in its
            // environment, trusting the CA bundle kz gave it; the kernel redirects it to kz.
            let mut c = netns_cmd(&client, &kz_bin);
            c.arg("--dir").arg(&blind_dir);
            c.args(["run", "--blind", "--user", "nobody", "--", "sh", "-c"]);
            c.arg(r#"exec "$@" --ca "$SSL_CERT_FILE" --header "Authorization: Bearer $BENCH""#);
            c.arg("sh").arg(&loadgen);
            c.args(["load", "--url", &url, "--secs", &secs]);
            c.env("KZ_BENCH_REAL", REAL)
                .env("KZ_AUDIT_LOG", blind_dir.join("audit.jsonl"))
                .env("KZ_STATE_DIR", blind_dir.join("state"));
            if let Ok(n) = std::env::var("KZ_BENCH_KZ_THREADS") {
                c.env("KZ_PROXY_WORKERS", n);
            }
            c
        } else {
            let mut c = netns_cmd(&client, &loadgen);
            c.args(["load", "--url", &url, "--ca", t.ca.to_str().unwrap_or("")]);
            c.args(["--header", &format!("Authorization: Bearer {}", t.token)]);
            c.args(["--secs", &secs]);
            match (plain, &t.connect, &t.proxy, &t.plain_connect) {
                (false, Some(a), _, _) => {
                    c.args(["--connect", a]);
                }
                (_, _, Some(p), _) => {
                    c.args(["--proxy", p]);
                }
                (true, _, _, Some(a)) => {
                    c.args(["--connect", a]);
                    if let Some(b) = t.plain_bind {
                        c.args(["--bind", b]);
                    }
                }
                _ => return Ok(None),
            }
            c
        };
        c.args(extra);
        let out = c.output().with_context(|| format!("run {}", t.name))?;
        let s = String::from_utf8_lossy(&out.stdout);
        let r = s.lines().rev().find_map(parse);
        if r.as_ref().is_none_or(|r| r.errors > 0) {
            eprintln!(
                "bench: {} {scheme}{path} {extra:?} failed: {}",
                t.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(r)
    };

    let scenarios: Vec<(&str, &str, &str, Vec<&str>, bool)> = vec![
        (
            "h1 keep-alive HTTPS (16 conns)",
            "https",
            "/small",
            vec!["--conns", "16"],
            false,
        ),
        (
            "h2 keep-alive HTTPS (4 conns x 8 streams)",
            "https",
            "/small",
            vec!["--h2", "--conns", "4", "--streams", "8"],
            true,
        ),
        (
            "plain HTTP keep-alive (16 conns)",
            "http",
            "/small",
            vec!["--conns", "16"],
            false,
        ),
        (
            "single-connection latency (h1 HTTPS)",
            "https",
            "/small",
            vec!["--conns", "1"],
            false,
        ),
        (
            "new connections/s (full handshakes, 8 conc.)",
            "https",
            "/small",
            vec!["--conns", "8", "--new-conn"],
            false,
        ),
        (
            "100 MiB upload (h1 HTTPS)",
            "https",
            "/upload",
            vec!["--upload", "104857600"],
            false,
        ),
        (
            "100 MiB download (h1 HTTPS)",
            "https",
            "/big.bin",
            vec!["--download"],
            false,
        ),
        // Agents open many connections to one API host at once; this row keeps the upstream
        // pool honest (a pool bounded below the concurrency re-dials on every request).
        (
            "h1 keep-alive HTTPS (64 conns)",
            "https",
            "/small",
            vec!["--conns", "64"],
            false,
        ),
    ];
    // KZ_BENCH_TARGETS=direct,kz and KZ_BENCH_SCENARIOS=1,3 (1-based) narrow a run while
    // profiling; the default is everything, which is what the issue notes quote.
    let only = |var: &str| -> Option<Vec<String>> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
    };
    let only_targets = only("KZ_BENCH_TARGETS");
    let only_scenarios = only("KZ_BENCH_SCENARIOS");
    // The direct path swings by ±10% from run to run on a shared VM, so kz and the direct path
    // are measured in alternating rounds (KZ_BENCH_ROUNDS, default 3) and each reports its
    // median; the slow peers run once. Single big transfers report the best of three.
    let rounds: usize = std::env::var("KZ_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut results: BTreeMap<(usize, &str), Res> = BTreeMap::new();
    for (i, (name, scheme, path, extra, needs_h2)) in scenarios.iter().enumerate() {
        if only_scenarios
            .as_ref()
            .is_some_and(|s| !s.contains(&(i + 1).to_string()))
        {
            continue;
        }
        eprintln!("bench: {name}");
        let big = extra.contains(&"--upload") || extra.contains(&"--download");
        let mut samples: BTreeMap<&str, Vec<Res>> = BTreeMap::new();
        for round in 0..if big { 3 } else { rounds } {
            for t in &targets {
                if *needs_h2 && !t.h2 {
                    continue;
                }
                if only_targets
                    .as_ref()
                    .is_some_and(|o| !o.iter().any(|n| n == t.name))
                {
                    continue;
                }
                let peer = matches!(t.name, "keyzero" | "mitmproxy");
                if round > 0 && peer && !big {
                    continue;
                }
                if let Some(r) = load(t, scheme, path, extra)? {
                    samples.entry(t.name).or_default().push(r);
                }
            }
        }
        for (t, mut runs) in samples {
            let pick = if big {
                runs.iter()
                    .filter(|r| r.errors == 0)
                    .min_by(|a, b| a.secs.total_cmp(&b.secs))
                    .or(runs.first())
                    .cloned()
            } else {
                runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                let lo = runs.first().map_or(0.0, |r| r.rps);
                let hi = runs.last().map_or(0.0, |r| r.rps);
                let n = runs.len();
                runs.get(n / 2).cloned().map(|mut r| {
                    r.spread = (n > 1).then_some((lo, hi));
                    r
                })
            };
            if let Some(r) = pick {
                results.insert((i, t), r);
            }
        }
    }

    // kz-blind leaves the shared eBPF program set pinned; remove it (no instance is alive).
    if targets.iter().any(|t| t.blind) {
        let _ = Command::new(&kz_bin)
            .args(["intercept", "unload"])
            .stdout(Stdio::null())
            .status();
    }

    // Memory: peak RSS so far, then kz's RSS with 1,000 idle keep-alive connections open.
    let peak: Vec<(&str, Option<u64>)> = vec![
        ("kz", vm(kz_pid, "VmHWM:")),
        ("keyzero", vm(keyzero_pid, "VmHWM:")),
        ("mitmproxy", vm(mitm_pid, "VmHWM:")),
    ];
    let before = vm(kz_pid, "VmRSS:");
    let mut hold = netns_cmd(&env.client, &loadgen)
        .args([
            "load",
            "--url",
            &format!("https://{UP_IP}/small"),
            "--ca",
            &format!("{d}/kz-ca.pem"),
            "--connect",
            &kz_t,
            "--header",
            &auth_masked,
            "--hold",
            "1000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut held = String::new();
    BufReader::new(hold.stdout.take().context("hold stdout")?).read_line(&mut held)?;
    std::thread::sleep(Duration::from_secs(1));
    let with_1000 = vm(kz_pid, "VmRSS:");
    if let Some(mut s) = hold.stdin.take() {
        let _ = s.flush();
    }
    let _ = hold.wait();

    // Report.
    println!();
    println!("kz proxy benchmark — one run, same machine; upstream nginx in a netns");
    println!("(direct and kz: median of {rounds} alternating rounds; peers: one round)");
    println!(
        "(ratios: rps vs direct; 'kz/keyzero' = kz rps over KeyZero's; latency p50/p99 in µs)"
    );
    for (i, (name, ..)) in scenarios.iter().enumerate() {
        println!();
        println!("== {name}");
        let direct = results.get(&(i, "direct")).cloned();
        let kz = results.get(&(i, "kz")).cloned();
        let keyzero = results.get(&(i, "keyzero")).cloned();
        for t in &targets {
            let Some(r) = results.get(&(i, t.name)) else {
                println!("  {:<12} n/a", t.name);
                continue;
            };
            let single = r.requests == 1;
            if single {
                let mbps = r.bytes as f64 / (1 << 20) as f64 / r.secs;
                let vs = direct
                    .as_ref()
                    .map(|d| format!("{:.2}x direct", (d.secs / r.secs)))
                    .unwrap_or_default();
                println!(
                    "  {:<12} {:>8.3} s  {:>8.1} MiB/s  {vs}{}",
                    t.name,
                    r.secs,
                    mbps,
                    if r.errors > 0 { "  ERRORS" } else { "" }
                );
            } else {
                let vs = direct
                    .as_ref()
                    .map(|d| format!("{:.2}x direct", r.rps / d.rps))
                    .unwrap_or_default();
                let spread = r
                    .spread
                    .map(|(lo, hi)| format!("  (median of {rounds}: {lo:.0}–{hi:.0})"))
                    .unwrap_or_default();
                println!(
                    "  {:<12} {:>9.0} req/s  p50 {:>7.0}  p99 {:>7.0}  {vs}  errors {}{spread}",
                    t.name, r.rps, r.p50, r.p99, r.errors
                );
            }
        }
        if let (Some(k), Some(z)) = (&kz, &keyzero) {
            if k.requests > 1 {
                println!("  kz/keyzero   {:.1}x", k.rps / z.rps);
            } else {
                println!("  kz/keyzero   {:.1}x (time)", z.secs / k.secs);
            }
        }
        if let (Some(k), Some(d)) = (&kz, &direct)
            && k.requests > 1
        {
            println!("  kz added p50 {:.0} µs", k.p50 - d.p50);
        }
    }
    println!();
    println!("== memory");
    for (name, kb) in peak {
        match kb {
            Some(kb) => println!("  {name:<12} peak RSS {:.1} MB", kb as f64 / 1024.0),
            None => println!("  {name:<12} peak RSS n/a"),
        }
    }
    println!(
        "  kz RSS before holding: {:.1} MB; with {} held keep-alive connections: {:.1} MB",
        before.unwrap_or(0) as f64 / 1024.0,
        held.split_whitespace().nth(1).unwrap_or("?"),
        with_1000.unwrap_or(0) as f64 / 1024.0
    );
    drop(env);
    Ok(())
}
