//! `cargo xtask demo`: `kz run --blind` of a small Python agent (examples/blind-agent).
//!
//! The demo builds a two-namespace network on this machine (nothing leaves it): the agent's side,
//! where kz runs, and a "remote" side with a DNS server, an HTTPS API (`api.demo.test`, accepts
//! only the real key and carelessly echoes what it got) and a host the agent must not reach
//! (`exfil.demo.test`). The agent gets a masked key, calls the API with it (kz swaps the real key
//! in on the wire and scrubs the echo), then tries the exfiltration host by name (DNS refused) and
//! by address (EPERM from the kernel). The audit log of the run is printed at the end.

use crate::sandbox::{Cleanup, in_ns, run_ok};
use crate::setup;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT_IP: &str = "10.99.0.1";
const DNS_IP: &str = "10.99.0.2";
const API_IP: &str = "10.99.0.10";
const EXFIL_IP: &str = "10.99.0.66";
/// The real key only the API and kz ever see (a demo value, not a credential).
const REAL_KEY: &str = "sk-demo-REAL-7d1f0c2b9e";

pub fn run() -> Result<()> {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = setup::path_with_tools();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "kz-agent", "--bin", "kz"])
        .env("PATH", &path)
        .current_dir(&workspace)
        .status()?;
    if !status.success() {
        bail!("building kz failed");
    }
    let kz = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("debug/kz");

    let id = std::process::id();
    let dir = std::env::temp_dir().join(format!("kz-demo-{id}"));
    let agent_ns = format!("kzdemo-a{id}");
    let remote_ns = format!("kzdemo-r{id}");
    let mut cleanup = Cleanup {
        netns: Vec::new(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    std::fs::create_dir_all(&dir)?;
    let example = workspace.join("examples/blind-agent");
    for f in [
        ".keyzero.toml",
        "agent.py",
        "api_server.py",
        "dns_server.py",
    ] {
        std::fs::copy(example.join(f), dir.join(f)).with_context(|| format!("copy {f}"))?;
    }
    make_certs(&dir)?;

    // The network: agent side <-> remote side, no route anywhere else.
    for ns in [&agent_ns, &remote_ns] {
        run_ok(Command::new("ip").args(["netns", "add", ns]))?;
        cleanup.netns.push(ns.clone());
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
    }
    let (va, vr) = (format!("kzda{id}"), format!("kzdr{id}"));
    let (va, vr) = (trunc15(&va), trunc15(&vr));
    run_ok(Command::new("ip").args([
        "link", "add", &va, "netns", &agent_ns, "type", "veth", "peer", "name", &vr, "netns",
        &remote_ns,
    ]))?;
    run_ok(Command::new("ip").args([
        "-n",
        &agent_ns,
        "addr",
        "add",
        &format!("{AGENT_IP}/24"),
        "dev",
        &va,
    ]))?;
    for ip in [DNS_IP, API_IP, EXFIL_IP] {
        run_ok(Command::new("ip").args([
            "-n",
            &remote_ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &vr,
        ]))?;
    }
    run_ok(Command::new("ip").args(["-n", &agent_ns, "link", "set", &va, "up"]))?;
    run_ok(Command::new("ip").args(["-n", &remote_ns, "link", "set", &vr, "up"]))?;

    // The remote side: DNS, the API, and the host the agent must not reach.
    let spawn = |cmd: &mut Command| -> Result<Child> {
        cmd.current_dir(&dir)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {cmd:?}"))
    };
    cleanup
        .children
        .push(spawn(in_ns(&remote_ns, "python3").args([
            "-u",
            "dns_server.py",
            DNS_IP,
            &format!("api.demo.test={API_IP}"),
            &format!("exfil.demo.test={EXFIL_IP}"),
        ]))?);
    for ip in [API_IP, EXFIL_IP] {
        cleanup.children.push(spawn(
            in_ns(&remote_ns, "python3")
                .args([
                    "-u",
                    "api_server.py",
                    ip,
                    "443",
                    "api.pem",
                    "api-key.pem",
                    "DEMO_REAL_KEY",
                ])
                .env("DEMO_REAL_KEY", REAL_KEY),
        )?);
    }
    wait_for_tcp(&remote_ns, API_IP, &dir)?;

    println!("\n== kz run --blind -- python3 agent.py   (real key: {REAL_KEY})\n");
    let status = in_ns(&agent_ns, &kz.display().to_string())
        .arg("--dir")
        .arg(&dir)
        // The agent runs as nobody: kz refuses a root agent (it could read kz's memory).
        .args([
            "run", "--blind", "--user", "nobody", "--", "python3", "-u", "agent.py",
        ])
        .env("DEMO_REAL_KEY", REAL_KEY)
        .env("DEMO_EXFIL_IP", EXFIL_IP)
        .env("KZ_AUDIT_LOG", dir.join("audit.jsonl"))
        // Approvals of this throwaway project stay with it (not in /var/lib/kz/approved, where
        // a later demo in a directory of the same name would meet a stale record).
        .env("KZ_STATE_DIR", dir.join("state"))
        .current_dir(&dir)
        .status()?;
    println!("\n== audit log ({})\n", dir.join("audit.jsonl").display());
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    for line in audit.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let pick = |k: &str| {
            v.get(k)
                .filter(|x| !x.is_null())
                .map(|x| format!("{k}={x}"))
        };
        let fields: Vec<String> = [
            "host",
            "port",
            "status",
            "swapped",
            "name",
            "comm",
            "pid",
            "dest",
            "reason",
            "exit_code",
        ]
        .iter()
        .filter_map(|k| pick(k))
        .collect();
        println!(
            "  {:<16} {}",
            v["kind"].as_str().unwrap_or("?"),
            fields.join(" ")
        );
    }
    if audit.contains(REAL_KEY) {
        bail!("the real key is in the audit log");
    }
    if !status.success() {
        bail!("the agent failed ({status})");
    }
    println!(
        "\nThe agent only ever held a masked token; the API got the real key; exfil was refused."
    );
    drop(cleanup);
    Ok(())
}

fn trunc15(s: &str) -> String {
    s.chars().take(15).collect()
}

/// A demo CA and a certificate for the remote hosts, with the openssl CLI.
fn make_certs(dir: &Path) -> Result<()> {
    let openssl = |args: &[&str]| run_ok(Command::new("openssl").args(args).current_dir(dir));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "demo-ca-key.pem",
        "-out",
        "demo-ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=kz demo remote CA",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "api-key.pem",
        "-out",
        "api.csr",
        "-subj",
        "/CN=api.demo.test",
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:api.demo.test,DNS:exfil.demo.test\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "api.csr",
        "-CA",
        "demo-ca.pem",
        "-CAkey",
        "demo-ca-key.pem",
        "-CAcreateserial",
        "-out",
        "api.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ])
}

fn wait_for_tcp(ns: &str, ip: &str, dir: &Path) -> Result<()> {
    let start = Instant::now();
    loop {
        let ok = in_ns(ns, "bash")
            .args(["-c", &format!("exec 3<>/dev/tcp/{ip}/443")])
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("the demo API did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
