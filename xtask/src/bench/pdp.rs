//! `cargo xtask bench pdp`: resolve decisions per second and p50/p99 latency (JWT verify + CEL +
//! resolver + response) at 1, 64 and 1000 concurrent clients, kz against KeyZero 0.3's own
//! server on the same bundle and the same token, in one run. kz is built in release; KeyZero is
//! `cargo install keyzero --root ~/.cache/kz/peers` (its binary is also called `kz`, so it lives
//! outside PATH). kz runs twice: without an audit log (like KeyZero, which has none) and with
//! its hash-chained audit file (fsync: interval).

use super::load::{self, Outcome, Spec};
use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "bench-secret-value-7f3a9c";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn peer_binary() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    let bin = Path::new(&home).join(".cache/kz/peers/bin/kz");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "bench: installing KeyZero 0.3 into ~/.cache/kz/peers (compiles for several minutes)"
    );
    let st = Command::new("cargo")
        .args(["install", "keyzero", "--version", "0.3.0", "--root"])
        .arg(Path::new(&home).join(".cache/kz/peers"))
        .status()?;
    if !st.success() || !bin.exists() {
        bail!("`cargo install keyzero --root ~/.cache/kz/peers` failed");
    }
    Ok(bin)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_ready(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("server exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("server on {addr} did not come up")
}

fn start_keyzero(bin: &Path, bundle: &Path, env_file: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut child = Command::new(bin)
        .args(["server", "start", "--bundle"])
        .arg(bundle)
        .args(["--listen", &addr.to_string()])
        .env("RUST_LOG", "error")
        .env("KZ_BENCH_ENV_FILE", env_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting KeyZero")?;
    wait_ready(addr, &mut child)?;
    Ok((Proc(child), addr))
}

fn start_kz(bin: &Path, bundle: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut child = Command::new(bin)
        .args(["--log", "error", "server", "start", "--bundle"])
        .arg(bundle)
        .args(["--listen", "127.0.0.1:0"])
        .env("KZ_BENCH_KEY", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kz")?;
    let stderr = child.stderr.take().context("kz stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.trim().strip_prefix("kz: PDP listening on http://") {
                    break a.parse::<SocketAddr>()?;
                }
            }
            _ => bail!("kz did not start"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    wait_ready(addr, &mut child)?;
    Ok((Proc(child), addr))
}

fn token() -> anyhow::Result<String> {
    let pem = std::fs::read(root().join("tests/fixtures/keys/agent-es256.key"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": "https://id.agents.example", "aud": "kz", "sub": "agent:bench-bot",
        "iat": now, "exp": now + 3600,
        "agent_name": "bench-bot", "environment": "production", "agent_instance": "bench-1",
    });
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("agents-2026".into());
    Ok(jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&pem)?,
    )?)
}

fn bundle_text(backend: &str, audit: Option<&Path>) -> anyhow::Result<String> {
    let pubkey = std::fs::read_to_string(root().join("tests/fixtures/keys/agent-es256.pub"))?;
    let pem: String = pubkey
        .trim()
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let audit = audit
        .map(|p| format!("audit:\n  path: {}\n  fsync: interval\n", p.display()))
        .unwrap_or_default();
    Ok(format!(
        r#"version: "1"
issuers:
  - name: agent-idp
    type: custom
    issuer_url: https://id.agents.example
    audience: kz
    static_keys:
      - kid: agents-2026
        alg: ES256
        pem: |
{pem}    map:
      service: agent_name
      env: environment
      actor: agent_instance
policies:
  - name: never-admin
    rule: ref.startsWith('admin/')
    effect: deny
  - name: staging-only
    rule: env == 'staging' && ref.startsWith('staging/')
    effect: allow
  - name: bench-bot
    rule: service == 'bench-bot' && env == 'production' && ref.startsWith('bench/')
    effect: allow
resources:
  - ref: bench/api-key
    resolver: secrets
    path: KZ_BENCH_KEY
backends:
{backend}{audit}"#
    ))
}

fn row(name: &str, o: &Outcome) {
    println!(
        "  {name:<22} {:>10.0}/s   p50 {:>8.3} ms   p99 {:>8.3} ms   ({} ok, {} errors)",
        o.per_sec,
        o.p50_us / 1000.0,
        o.p99_us / 1000.0,
        o.ok,
        o.errors
    );
}

pub fn run() -> anyhow::Result<()> {
    let root = root();
    eprintln!("bench: building kz (release)");
    let st = Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "kz-agent", "--bin", "kz"])
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    let kz = root.join("target/release/kz");
    let peer = peer_binary()?;

    let dir = std::env::temp_dir().join(format!("kz-bench-pdp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let env_file = dir.join("secrets.env");
    std::fs::write(
        &env_file,
        format!("bench/api-key={SECRET}\nKZ_BENCH_KEY={SECRET}\n"),
    )?;
    let env_file_backend = format!(
        "  secrets:\n    type: env_file\n    path: {}\n",
        env_file.display()
    );
    let keyzero_bundle = dir.join("keyzero.yaml");
    std::fs::write(&keyzero_bundle, bundle_text(&env_file_backend, None)?)?;

    // The same bundle for kz, unless this build has no env_file resolver yet: then the same
    // in-memory lookup through kz's `env` resolver (value from the process environment).
    let kz_bundle = dir.join("kz.yaml");
    std::fs::write(&kz_bundle, bundle_text(&env_file_backend, None)?)?;
    let check = Command::new(&kz)
        .args(["server", "check", "--bundle"])
        .arg(&kz_bundle)
        .output()?;
    let mut note = "same bundle file for both";
    if !check.status.success() {
        std::fs::write(
            &kz_bundle,
            bundle_text("  secrets:\n    type: env\n", None)?,
        )?;
        note =
            "kz uses its `env` backend (no env_file resolver in this build); otherwise identical";
    }
    let kz_backend = if note.starts_with("same") {
        env_file_backend.clone()
    } else {
        "  secrets:\n    type: env\n".to_owned()
    };
    let kz_audit_bundle = dir.join("kz-audit.yaml");
    std::fs::write(
        &kz_audit_bundle,
        bundle_text(&kz_backend, Some(&dir.join("audit.jsonl")))?,
    )?;

    let token = token()?;
    let (_p1, keyzero_addr) = start_keyzero(&peer, &keyzero_bundle, &env_file)?;
    let (_p2, kz_addr) = start_kz(&kz, &kz_bundle)?;
    let (_p3, kz_audit_addr) = start_kz(&kz, &kz_audit_bundle)?;
    let spec = |addr| Spec {
        addr,
        path: "/v1/resolve".into(),
        token: token.clone(),
        body: r#"{"ref":"bench/api-key"}"#.into(),
        expect: SECRET.into(),
    };
    // Correctness first: every server must actually return the secret.
    for (name, addr) in [
        ("KeyZero", keyzero_addr),
        ("kz", kz_addr),
        ("kz+audit", kz_audit_addr),
    ] {
        let o = load::run(spec(addr), 1, Duration::ZERO, Duration::from_millis(300))?;
        if o.ok == 0 || o.errors > 0 {
            bail!(
                "{name} did not return the secret for the bench request ({} errors)",
                o.errors
            );
        }
    }

    println!(
        "PDP resolve benchmark: POST /v1/resolve, ES256 JWT + 3 CEL policies + in-memory resolver"
    );
    println!("  ({note}; load generator: 1 thread, closed loop, keep-alive HTTP/1.1)");
    let mut summary = Vec::new();
    for clients in [1usize, 64, 1000] {
        let (warm, measure) = if clients >= 1000 {
            (Duration::from_secs(2), Duration::from_secs(5))
        } else {
            (Duration::from_secs(1), Duration::from_secs(5))
        };
        println!("\n{clients} concurrent client(s):");
        let k = load::run(spec(keyzero_addr), clients, warm, measure)?;
        row("KeyZero 0.3", &k);
        let z = load::run(spec(kz_addr), clients, warm, measure)?;
        row("kz", &z);
        let za = load::run(spec(kz_audit_addr), clients, warm, measure)?;
        row("kz + audit log", &za);
        println!(
            "  ratio kz/KeyZero: throughput {:.2}x, p99 {:.2}x (lower is better); with audit: {:.2}x, p99 {:.2}x",
            z.per_sec / k.per_sec,
            z.p99_us / k.p99_us,
            za.per_sec / k.per_sec,
            za.p99_us / k.p99_us
        );
        summary.push((clients, k, z));
    }
    println!("\ntargets:");
    for (clients, k, z) in &summary {
        if *clients == 64 {
            println!(
                "  64 clients: kz throughput {:.2}x KeyZero (target >= 3x): {}; p99 lower: {}",
                z.per_sec / k.per_sec,
                if z.per_sec >= 3.0 * k.per_sec {
                    "met"
                } else {
                    "NOT met"
                },
                if z.p99_us < k.p99_us { "yes" } else { "NO" }
            );
        }
        if *clients == 1 {
            println!(
                "  1 client: kz p99 {:.3} ms (target < 0.3 ms): {}",
                z.p99_us / 1000.0,
                if z.p99_us < 300.0 { "met" } else { "NOT met" }
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
