//! `cargo xtask bench run`: the cost `kz run` adds to starting a command, in one run:
//! direct `true`; `kz run -- true` with 5 env secrets; with 5 secrets from a real OpenBao dev
//! server (KV v2 over loopback HTTP); and KeyZero's own `kz run -- true` on the same env config
//! when its binary is available ($KEYZERO_BIN, or ~/.cache/kz/peers/bin/kz from
//! `cargo install keyzero --root ~/.cache/kz/peers`). Then blind mode: kz's `kz run --blind --
//! true` (kernel interception when run as root: cgroup, eBPF attach, proxy, DNS, CA, cleanup)
//! against KeyZero's `kz run --blind -- true` (its explicit HTTP proxy), with the agent
//! contained (`--user nobody`: user switch, mount and cgroup namespaces, masks, seccomp) and
//! as a root-in-namespace agent (`--allow-root-agent`); `KZ_BENCH_BASELINE_KZ=<kz binary>` adds
//! a kz from before containment to the same run. Target: blind adds < 20 ms to `kz run`.

use crate::setup;
use anyhow::{Context, Result, bail};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRETS: usize = 5;
const WARMUP: usize = 3;
const RUNS: usize = 40;

struct Bao(Child);

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<()> {
    let root = workspace_root();
    let path = setup::path_with_tools();
    eprintln!("bench run: building kz (release)…");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "kz-agent", "--bin", "kz"])
        .current_dir(&root)
        .env("PATH", &path)
        .status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let kz = root.join("target/release/kz");
    let work = std::env::temp_dir().join(format!("kz-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(work.join("env"))?;
    std::fs::create_dir_all(work.join("vault"))?;
    std::fs::create_dir_all(work.join("home"))?;

    let mut env_cfg = String::new();
    for i in 0..SECRETS {
        env_cfg.push_str(&format!(
            "[secrets.S{i}]\nresolver = \"env\"\nref = \"KZ_BENCH_{i}\"\n\n"
        ));
    }
    std::fs::write(work.join("env/.keyzero.toml"), &env_cfg)?;
    // Blind: the same secrets, scoped, with connection rules. The resolver is loopback so that
    // nothing could ever leave the machine (`true` resolves nothing anyway).
    std::fs::create_dir_all(work.join("blind"))?;
    let mut blind_cfg = String::new();
    for i in 0..SECRETS {
        blind_cfg.push_str(&format!(
            "[secrets.S{i}]\nresolver = \"env\"\nref = \"KZ_BENCH_{i}\"\nhosts = [\"api{i}.example.test\"]\n\n"
        ));
    }
    blind_cfg.push_str(
        "[blind]\nconnections = [{ allow = true, host = \"api0.example.test\" }]\nresolver = \"127.0.0.1:53\"\n",
    );
    std::fs::write(work.join("blind/.keyzero.toml"), &blind_cfg)?;
    // KeyZero's parser rejects our additions (hosts, resolver): give it its own dialect.
    std::fs::create_dir_all(work.join("blind-keyzero"))?;
    let mut kz03_cfg = env_cfg.clone();
    kz03_cfg.push_str("[blind]\nconnections = [{ allow = true, host = \"api0.example.test\" }]\n");
    std::fs::write(work.join("blind-keyzero/.keyzero.toml"), &kz03_cfg)?;

    // A real OpenBao dev server with the same 5 secrets.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("http://127.0.0.1:{port}");
    let token = format!("bench-{}", std::process::id());
    let bao_bin = setup::venv_dir().join("bin/bao");
    let _bao = Bao(Command::new(&bao_bin)
        .args(["server", "-dev", "-dev-no-store-token"])
        .arg(format!("-dev-root-token-id={token}"))
        .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
        .env("HOME", work.join("home"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {} (run `cargo xtask setup`)", bao_bin.display()))?);
    let bao = |args: &[&str]| {
        Command::new(&bao_bin)
            .args(args)
            .env("HOME", work.join("home"))
            .env("BAO_ADDR", &addr)
            .env("BAO_TOKEN", &token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    let start = Instant::now();
    while !bao(&["status"])?.success() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("bao dev server not ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut vault_cfg =
        format!("[resolvers.vault]\ntype = \"hashicorp\"\naddress = \"{addr}\"\n\n");
    for i in 0..SECRETS {
        if !bao(&[
            "kv",
            "put",
            "-mount=secret",
            &format!("bench/s{i}"),
            &format!("v=value-{i}"),
        ])?
        .success()
        {
            bail!("bao kv put failed");
        }
        vault_cfg.push_str(&format!(
            "[secrets.S{i}]\nresolver = \"vault\"\nref = \"secret/bench/s{i}\"\nfield = \"v\"\n\n"
        ));
    }
    std::fs::write(work.join("vault/.keyzero.toml"), &vault_cfg)?;

    // `blind`: None for plain `kz run`, else the flags after `--blind` (kz's containment:
    // `--user nobody`; KeyZero and a baseline kz without containment take none).
    let kz_run_mode = |bin: PathBuf, dir: PathBuf, blind: Option<&'static [&'static str]>| {
        let work = work.clone();
        let token = token.clone();
        move || {
            let mut c = Command::new(&bin);
            c.arg("--dir").arg(&dir).arg("run");
            if let Some(extra) = blind {
                c.arg("--blind").args(extra);
            }
            c.args(["--", "true"]);
            c.env("KZ_AUDIT_LOG", work.join("audit.jsonl"))
                .env("KZ_STATE_DIR", work.join("state"));
            c.env("HOME", work.join("home")).env("VAULT_TOKEN", &token);
            for i in 0..SECRETS {
                c.env(format!("KZ_BENCH_{i}"), format!("value-{i}"));
            }
            c.stdout(Stdio::null()).stderr(Stdio::null());
            c
        }
    };
    let kz_run = |bin: PathBuf, dir: PathBuf| kz_run_mode(bin, dir, None);
    let mut rows: Vec<Stats> = Vec::new();
    rows.push(measure("direct: true", WARMUP, RUNS, || {
        Command::new("true")
    })?);
    rows.push(measure(
        "kz run -- true (5 env secrets)",
        WARMUP,
        RUNS,
        kz_run(kz.clone(), work.join("env")),
    )?);
    rows.push(measure(
        "kz run -- true (5 OpenBao secrets)",
        WARMUP,
        RUNS,
        kz_run(kz.clone(), work.join("vault")),
    )?);
    let keyzero = keyzero_bin();
    match &keyzero {
        Some(bin) => rows.push(measure(
            "KeyZero kz run -- true (5 env secrets)",
            WARMUP,
            RUNS,
            kz_run(bin.clone(), work.join("env")),
        )?),
        None => eprintln!(
            "bench run: KeyZero not found (set KEYZERO_BIN or `cargo install keyzero --root ~/.cache/kz/peers`); its row is skipped"
        ),
    }
    let direct = rows[0].mean();
    let kz_env = rows[1].mean();
    let peer = keyzero.as_ref().map(|_| rows[rows.len() - 1].mean());
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let blind_label = if root_user {
        "kz run --blind -- true (kernel)"
    } else {
        "kz run --blind -- true (fallback: not root)"
    };
    // Before the contained start: a kz binary from before containment (user switch,
    // namespaces, masks, seccomp), measured in the same run when given.
    if let Some(baseline) = std::env::var_os("KZ_BENCH_BASELINE_KZ").map(PathBuf::from) {
        rows.push(measure(
            "baseline kz (uncontained) run --blind -- true",
            WARMUP,
            RUNS,
            kz_run_mode(baseline, work.join("blind"), Some(&[])),
        )?);
    }
    let blind = measure(
        blind_label,
        WARMUP,
        RUNS,
        kz_run_mode(
            kz.clone(),
            work.join("blind"),
            Some(if root_user {
                &["--user", "nobody"]
            } else {
                &[]
            }),
        ),
    )?;
    let blind_mean = blind.mean();
    rows.push(blind);
    if root_user {
        rows.push(measure(
            "kz run --blind --allow-root-agent -- true",
            WARMUP,
            RUNS,
            kz_run_mode(
                kz.clone(),
                work.join("blind"),
                Some(&["--allow-root-agent"]),
            ),
        )?);
    }
    let peer_blind = match &keyzero {
        Some(bin) => {
            let r = measure(
                "KeyZero kz run --blind -- true",
                WARMUP,
                RUNS,
                kz_run_mode(bin.clone(), work.join("blind-keyzero"), Some(&[])),
            )?;
            let m = r.mean();
            rows.push(r);
            Some(m)
        }
        None => None,
    };
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "command", "mean ms", "p50 ms", "p95 ms", "vs direct", "vs KeyZero"
    );
    for r in &rows {
        let vs_peer = match peer {
            Some(p) if !p.is_zero() => format!("{:.2}x", r.mean().as_secs_f64() / p.as_secs_f64()),
            _ => "-".into(),
        };
        println!(
            "{:<42} {:>9} {:>9} {:>9} {:>9.2}x {:>12}",
            r.label,
            ms(r.mean()),
            ms(r.percentile(0.5)),
            ms(r.percentile(0.95)),
            r.mean().as_secs_f64() / direct.as_secs_f64().max(1e-9),
            vs_peer
        );
    }
    println!(
        "kz run adds {} ms over a direct start (5 env secrets), {} ms with 5 OpenBao lookups",
        ms(kz_env.saturating_sub(direct)),
        ms(rows[2].mean().saturating_sub(direct))
    );
    let added = blind_mean.saturating_sub(kz_env);
    println!(
        "kz run --blind (contained) adds {} ms over kz run (target < 20 ms: {}){}",
        ms(added),
        if added < Duration::from_millis(20) {
            "met"
        } else {
            "MISSED"
        },
        match peer_blind {
            Some(p) if !p.is_zero() => format!(
                "; {:.2}x KeyZero's blind start",
                blind_mean.as_secs_f64() / p.as_secs_f64()
            ),
            _ => String::new(),
        }
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn keyzero_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEYZERO_BIN").map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let p = home.join(".cache/kz/peers/bin/kz");
    is_keyzero(&p).then_some(p)
}

fn is_keyzero(p: &Path) -> bool {
    Command::new(p)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("keyzero"))
}

/// Wall-clock statistics of repeated runs of one command.
pub struct Stats {
    pub label: String,
    pub samples: Vec<Duration>,
}

impl Stats {
    pub fn mean(&self) -> Duration {
        let total: Duration = self.samples.iter().sum();
        total / u32::try_from(self.samples.len().max(1)).unwrap_or(1)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        let idx = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(idx).copied().unwrap_or_default()
    }
}

/// Runs `make()` `warmup` + `n` times; only successful runs count.
pub fn measure(label: &str, warmup: usize, n: usize, make: impl Fn() -> Command) -> Result<Stats> {
    for _ in 0..warmup {
        let status = make().status()?;
        if !status.success() {
            bail!("{label}: warm-up run failed ({status})");
        }
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let status = make().status()?;
        samples.push(start.elapsed());
        if !status.success() {
            bail!("{label}: run failed ({status})");
        }
    }
    Ok(Stats {
        label: label.to_owned(),
        samples,
    })
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
