//! `cargo xtask bench agent`: the node daemon `kz agent run` (release build) on the proxy
//! bench's stage ([`super::stage`]: nginx over HTTPS in an upstream netns, the daemon and its
//! agents in the client netns), driven over its API socket.
//!
//! - Sandbox lifecycle: `POST /v1/sandboxes` then `DELETE` back to back (one client, one
//!   connection per request, as the CLI does), latency p50/p99 of each and pairs per second.
//! - Memory: the daemon's RSS idle, and with 50 idle sandboxes (target < 64 MB); per sandbox
//!   = the difference / 50.
//! - Proxy throughput with 1, 10 and 50 active sandboxes: the load generator of `bench proxy`
//!   runs in each active sandbox's cgroup (placed there before exec: the kernel redirects its
//!   connects to the proxy, which finds the sandbox's session by cgroup id), with the
//!   sandbox's masked token and CA; the total number of connections is the same in every row
//!   (50: 50 in one sandbox, 5 in each of 10, 1 in each of 50), so a row's rps against the
//!   one-sandbox row is the cost of many sessions (target: within 10 %). Rows alternate over
//!   KZ_BENCH_ROUNDS rounds (default 3), each reports its median.
//!
//! KZ_BENCH_SECS (default 5) is each load's duration; KZ_BENCH_CYCLES (default 200) the
//! create/destroy pairs.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::stage::{self, Res, Stage, UP_IP, netns_cmd, parse, vm};

const REAL: &str = "sk-bench-agent-real-value-0123456789";
/// Sandboxes of the memory and busiest throughput rows.
const MANY: usize = 50;
/// Connections in every throughput row, split over its active sandboxes.
const CONNS: usize = 50;

/// One request over the API socket (a connection each, `Connection: close`); status and JSON.
fn api(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kz\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in the daemon's answer: {text}"))?;
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((status, json))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A sandbox of the bench: its id, cgroup, masked token and CA file.
struct Sbx {
    id: u64,
    cgroup: String,
    token: String,
    ca: PathBuf,
}

fn create(socket: &Path, project: &Path, name: &str, dir: &Path) -> Result<Sbx> {
    let (code, v) = api(
        socket,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"name": name, "project_dir": project})),
    )?;
    if code != 201 {
        bail!("creating sandbox {name}: {code} {v}");
    }
    let id = v["id"].as_u64().context("id")?;
    let ca = dir.join(format!("ca-{id}.pem"));
    std::fs::write(&ca, v["ca_cert_pem"].as_str().unwrap_or_default())?;
    Ok(Sbx {
        id,
        cgroup: v["cgroup"].as_str().unwrap_or_default().to_owned(),
        token: v["secrets"]["BENCH"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        ca,
    })
}

fn destroy(socket: &Path, id: u64) -> Result<()> {
    let (code, v) = api(socket, "DELETE", &format!("/v1/sandboxes/{id}"), None)?;
    if code != 200 {
        bail!("destroying sandbox {id}: {code} {v}");
    }
    Ok(())
}

/// The load generator in sandbox `b`'s cgroup (placed before exec), `conns` connections.
fn load_in(client_ns: &str, b: &Sbx, conns: usize, secs: &str) -> Result<Child> {
    let mut c = netns_cmd(client_ns, "sh");
    c.arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(&b.cgroup)
        .arg(stage::loadgen())
        .args(["load", "--url", &format!("https://{UP_IP}/small"), "--ca"])
        .arg(&b.ca)
        .args(["--header", &format!("Authorization: Bearer {}", b.token)])
        .args(["--conns", &conns.to_string(), "--secs", secs])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().context("start the load generator")
}

/// One throughput row: the first `active` sandboxes loaded at once; the sum of their rps,
/// the median p50, the worst p99, the errors.
fn row(client_ns: &str, boxes: &[Sbx], active: usize, secs: &str) -> Result<Res> {
    let per = (CONNS / active).max(1);
    let children: Vec<Child> = boxes[..active]
        .iter()
        .map(|b| load_in(client_ns, b, per, secs))
        .collect::<Result<_>>()?;
    let mut sum = Res::default();
    let mut p50s = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(r) = text.lines().rev().find_map(parse) else {
            bail!(
                "a load generator printed no result: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sum.rps += r.rps;
        sum.requests += r.requests;
        sum.errors += r.errors;
        sum.p99 = sum.p99.max(r.p99);
        p50s.push(r.p50);
    }
    p50s.sort_by(f64::total_cmp);
    sum.p50 = pct(&p50s, 0.5);
    Ok(sum)
}

pub fn run_bench() -> Result<()> {
    stage::require_root("agent")?;
    eprintln!("bench: building kz and the load generator (release)");
    stage::build_release(&["--bin", "kz", "--example", "proxy_loadgen"])?;
    let kz_bin = stage::workspace_root().join("target/release/kz");
    let mut env = Stage::new("g")?;
    env.start_nginx()?;
    let dir = env.dir.clone();
    let d = dir.display();

    // One project for every sandbox: a secret scoped to nginx's address, the only host.
    let project = dir.join("project");
    std::fs::create_dir_all(&project)?;
    std::fs::write(
        project.join(".keyzero.toml"),
        format!(
            r#"[secrets.BENCH]
resolver = "env"
ref = "KZ_BENCH_REAL"
hosts = ["{UP_IP}"]

[blind]
connections = [{{ allow = true, host = "{UP_IP}" }}]
"#
        ),
    )?;
    let socket = dir.join("agent.sock");
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let daemon = netns_cmd(&env.client, &kz_bin)
        .args(["agent", "run", "--socket"])
        .arg(&socket)
        .args(["--socket-group", "root", "--audit-log"])
        .arg(dir.join("audit.jsonl"))
        .args(["--upstream-ca", &format!("{d}/ca.pem")])
        .env("KZ_BENCH_REAL", REAL)
        .env("KZ_STATE_DIR", dir.join("state"))
        .env("KZ_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start kz agent run")?;
    let pid = daemon.id();
    env.children.push(("kz-agent".into(), daemon));
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "kz agent did not open its socket: {}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_start = vm(pid, "VmRSS:").unwrap_or(0);

    // Lifecycle.
    let cycles: usize = std::env::var("KZ_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        .max(1);
    eprintln!("bench: {cycles} sandbox create/destroy pairs");
    for i in 0..5 {
        let b = create(&socket, &project, &format!("warm{i}"), &dir)?;
        destroy(&socket, b.id)?;
    }
    let (mut creates, mut destroys) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    for i in 0..cycles {
        let t = Instant::now();
        let b = create(&socket, &project, &format!("cycle{i}"), &dir)?;
        creates.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        destroy(&socket, b.id)?;
        destroys.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = std::fs::remove_file(&b.ca);
    }
    let pairs_per_sec = cycles as f64 / t0.elapsed().as_secs_f64();
    creates.sort_by(f64::total_cmp);
    destroys.sort_by(f64::total_cmp);

    // Memory with MANY idle sandboxes.
    let rss_idle = vm(pid, "VmRSS:").unwrap_or(0);
    eprintln!("bench: {MANY} sandboxes");
    let t = Instant::now();
    let boxes: Vec<Sbx> = (0..MANY)
        .map(|i| create(&socket, &project, &format!("b{i}"), &dir))
        .collect::<Result<_>>()?;
    let many_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let rss_many = vm(pid, "VmRSS:").unwrap_or(0);

    // Throughput.
    let secs = std::env::var("KZ_BENCH_SECS").unwrap_or_else(|_| "5".into());
    let rounds: usize = std::env::var("KZ_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rows = [1usize, 10, MANY];
    let mut samples: Vec<Vec<Res>> = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        for (k, &active) in rows.iter().enumerate() {
            eprintln!(
                "bench: round {}/{rounds}: {active} active sandbox(es)",
                round + 1
            );
            samples[k].push(row(&env.client, &boxes, active, &secs)?);
        }
    }
    let rss_peak = vm(pid, "VmHWM:").unwrap_or(0);
    // Every request went through its own sandbox's session: the daemon's counters say so.
    let mut counted = 0;
    for b in &boxes {
        let (_, v) = api(&socket, "GET", &format!("/v1/sandboxes/{}", b.id), None)?;
        let swapped = v["counters"]["requests_swapped"].as_u64().unwrap_or(0);
        if swapped == 0 {
            bail!("sandbox {} swapped nothing: {v}", b.id);
        }
        counted += swapped;
    }
    let sent: u64 = samples.iter().flatten().map(|r| r.requests).sum();
    for b in &boxes {
        destroy(&socket, b.id)?;
    }

    // Report.
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!();
    println!(
        "kz agent benchmark — release build, one run, same machine; upstream nginx in a netns"
    );
    println!();
    println!("== sandbox lifecycle over the API socket ({cycles} pairs, one at a time)");
    println!(
        "  create   p50 {:>7.2} ms  p99 {:>7.2} ms",
        pct(&creates, 0.5),
        pct(&creates, 0.99)
    );
    println!(
        "  destroy  p50 {:>7.2} ms  p99 {:>7.2} ms",
        pct(&destroys, 0.5),
        pct(&destroys, 0.99)
    );
    println!("  create+destroy {pairs_per_sec:.1} pairs/s");
    println!(
        "  {MANY} creates back to back: {many_secs:.2} s ({:.1}/s)",
        MANY as f64 / many_secs
    );
    println!();
    println!(
        "== proxy throughput, HTTPS h1 keep-alive /small, {CONNS} connections in all (median of {rounds})"
    );
    let median = |runs: &[Res]| -> Res {
        let mut v = runs.to_vec();
        v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let lo = v.first().map_or(0.0, |r| r.rps);
        let hi = v.last().map_or(0.0, |r| r.rps);
        let mut m = v[v.len() / 2].clone();
        m.spread = Some((lo, hi));
        m
    };
    let one = median(&samples[0]);
    for (k, &active) in rows.iter().enumerate() {
        let r = median(&samples[k]);
        let (lo, hi) = r.spread.unwrap_or_default();
        let ratio = r.rps / one.rps;
        println!(
            "  {active:>2} active sandbox(es) x {:>2} conns  {:>8.0} req/s  p50 {:>6.0} µs  p99 {:>7.0} µs  {ratio:.2}x one sandbox  errors {}  ({lo:.0}–{hi:.0}){}",
            (CONNS / active).max(1),
            r.rps,
            r.p50,
            r.p99,
            r.errors,
            if k > 0 && ratio < 0.9 {
                "  BELOW TARGET (0.90x)"
            } else {
                ""
            }
        );
    }
    println!("  requests sent {sent}, swapped per the daemon's counters {counted}");
    println!();
    println!("== daemon memory (RSS)");
    println!("  at start                 {:>6.1} MB", mb(rss_start));
    println!("  idle, after the pairs    {:>6.1} MB", mb(rss_idle));
    println!(
        "  {MANY} idle sandboxes       {:>6.1} MB  (target < 64 MB){}",
        mb(rss_many),
        if mb(rss_many) >= 64.0 {
            "  ABOVE TARGET"
        } else {
            ""
        }
    );
    println!(
        "  per sandbox              {:>6.0} kB  (({MANY} idle - idle) / {MANY})",
        rss_many.saturating_sub(rss_idle) as f64 / MANY as f64
    );
    println!("  peak (under load)        {:>6.1} MB", mb(rss_peak));
    drop(env);
    Ok(())
}
