//! `cargo xtask bench mcp`: what the MCP `fetch` tool costs against calling the upstream
//! directly, from the same Python client.
//!
//! Setup (root, like the e2e tests): a client and an upstream network namespace joined by a
//! veth; nginx serves HTTPS (HTTP/2, test CA from openssl, IP SAN) at 10.78.0.2 and answers 200
//! only with the right Bearer credential; `kz server start --mcp` (release build) runs in the
//! client namespace over stdio and over streamable HTTP with `--allow-private 10.78.0.0/24`.
//! The client (mcp_bench.py, official MCP SDK + httpx) prints the table and the ratios.

use crate::sandbox::{Cleanup, in_ns, run_ok};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CLIENT_SCRIPT: &str = include_str!("mcp_bench.py");
const UPSTREAM: &str = "10.78.0.2";

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run_ok(Command::new("openssl").current_dir(dir).args(args))
}

pub fn run_bench() -> Result<()> {
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .map(|d| PathBuf::from(d).join(".."))
        .unwrap_or_else(|_| PathBuf::from("."));
    eprintln!("bench: building kz (release)");
    run_ok(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "kz-agent",
        "--bin",
        "kz",
    ]))?;
    let kz = root.join("target/release/kz").canonicalize()?;
    let python =
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kz/venv/bin/python");
    if !python.exists() {
        bail!("{} is missing: run `cargo xtask setup`", python.display());
    }

    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("kz-bench-mcp-{pid}"));
    std::fs::create_dir_all(&dir)?;
    let (cli, up) = (format!("kzbmc{pid}"), format!("kzbmu{pid}"));
    let mut guard = Cleanup {
        netns: Vec::new(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    for ns in [&cli, &up] {
        run_ok(Command::new("ip").args(["netns", "add", ns]))?;
        guard.netns.push(ns.clone());
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
    }
    let (va, vb) = (format!("kzbm{pid}a"), format!("kzbm{pid}b"));
    run_ok(Command::new("ip").args([
        "link", "add", &va, "netns", &cli, "type", "veth", "peer", "name", &vb, "netns", &up,
    ]))?;
    for (ns, dev, cidr) in [(&cli, &va, "10.78.0.1/24"), (&up, &vb, "10.78.0.2/24")] {
        run_ok(Command::new("ip").args(["-n", ns, "addr", "add", cidr, "dev", dev]))?;
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
    }

    // Test CA, upstream leaf (IP SAN), the agents' ES256 key.
    let ec = ["-pkeyopt", "ec_paramgen_curve:P-256"];
    openssl(
        &dir,
        &[
            &["req", "-x509", "-newkey", "ec"],
            &ec[..],
            &[
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=kz-bench-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &dir,
        &[
            &["req", "-newkey", "ec"],
            &ec[..],
            &[
                "-nodes",
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=kz-bench-upstream",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "subjectAltName=IP:{UPSTREAM}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    )?;
    openssl(
        &dir,
        &[
            &["genpkey", "-algorithm", "EC"],
            &ec[..],
            &["-out", "agent.key"],
        ]
        .concat(),
    )?;
    openssl(
        &dir,
        &["pkey", "-in", "agent.key", "-pubout", "-out", "agent.pub"],
    )?;

    let secret = format!(
        "sk-bench-{pid:08x}{:08x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{
    listen {UPSTREAM}:443 ssl http2;
    ssl_certificate {d}/leaf.pem;
    ssl_certificate_key {d}/leaf.key;
    location / {{
      if ($http_authorization != "Bearer {secret}") {{ return 401; }}
      return 200 "ok\n";
    }}
  }}
}}
"#
        ),
    )?;
    let nginx = in_ns(&up, "nginx")
        .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start nginx (cargo xtask setup installs nginx-light)")?;
    guard.children.push(nginx);

    let pubkey = std::fs::read_to_string(dir.join("agent.pub"))?
        .lines()
        .map(|l| format!("          {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        dir.join("bundle.yaml"),
        format!(
            r#"version: "1"
issuers:
  - name: bench
    type: custom
    issuer_url: https://id.bench
    audience: kz-bench
    static_keys:
      - kid: b1
        alg: ES256
        pem: |
{pubkey}
    map:
      service: claims.agent
policies:
  - name: bench
    rule: "service == 'bench' && ref == 'bench/api'"
    effect: allow
resources:
  - ref: bench/api
    resolver: env
    path: KZ_BENCH_SECRET
    hosts: ["{UPSTREAM}"]
backends:
  env:
    type: env
audit:
  path: {d}/audit.jsonl
"#
        ),
    )?;
    let kz_args: Vec<String> = [
        kz.display().to_string(),
        "server".into(),
        "start".into(),
        "--bundle".into(),
        format!("{d}/bundle.yaml"),
        "--mcp".into(),
        "--upstream-ca".into(),
        format!("{d}/ca.pem"),
        "--allow-private".into(),
        "10.78.0.0/24".into(),
    ]
    .into();

    // The streamable HTTP server, in the client namespace.
    let mut http = in_ns(&cli, &kz_args[0])
        .args(&kz_args[1..])
        .args(["--listen", "127.0.0.1:0"])
        .env("KZ_BENCH_SECRET", &secret)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = http.stderr.take().context("kz stderr")?;
    guard.children.push(http);
    let mut lines = BufReader::new(stderr).lines();
    let mcp_url = loop {
        let line = lines
            .next()
            .context("kz exited before listening")?
            .context("read kz stderr")?;
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let cfg = format!(
        r#"{{"n": {n}, "warmup": 20, "url": "https://{UPSTREAM}/", "ca": "{d}/ca.pem",
            "secret": "{secret}", "key": "{d}/agent.key", "mcp_url": "{mcp_url}",
            "kz": [{kz_json}], "env": {{"KZ_BENCH_SECRET": "{secret}"}}}}"#,
        n = std::env::var("KZ_BENCH_N").unwrap_or_else(|_| "300".into()),
        kz_json = kz_args
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", "),
    );
    std::fs::write(dir.join("bench.json"), cfg)?;
    std::fs::write(dir.join("mcp_bench.py"), CLIENT_SCRIPT)?;
    let status = in_ns(&cli, &python.display().to_string())
        .arg(dir.join("mcp_bench.py"))
        .arg(dir.join("bench.json"))
        .status()?;
    if !status.success() {
        bail!("the benchmark client failed ({status})");
    }
    Ok(())
}
