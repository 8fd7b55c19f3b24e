//! `cargo xtask bench run`: the cost `kz run` adds to starting a command, in one run:
//! direct `true`; `kz run -- true` with 5 env secrets; with 5 secrets from a real OpenBao dev
//! server (KV v2 over loopback HTTP); and KeyZero's own `kz run -- true` on the same env config
//! when its binary is available ($KEYZERO_BIN, or ~/.cache/kz/peers/bin/kz from
//! `cargo install keyzero --root ~/.cache/kz/peers`). `kz run --blind` joins once the lead has
//! assembled blind mode.

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

    let kz_run = |bin: PathBuf, dir: PathBuf| {
        let work = work.clone();
        let token = token.clone();
        move || {
            let mut c = Command::new(&bin);
            c.arg("--dir").arg(&dir).args(["run", "--", "true"]);
            c.env("HOME", work.join("home")).env("VAULT_TOKEN", &token);
            for i in 0..SECRETS {
                c.env(format!("KZ_BENCH_{i}"), format!("value-{i}"));
            }
            c.stdout(Stdio::null()).stderr(Stdio::null());
            c
        }
    };
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
