//! Builds kz's eBPF programs (crate `kz-ebpf`) for `bpfel-unknown-none` and leaves the object at
//! `$OUT_DIR/kz-ebpf`, where `intercept::shared` embeds it, and its SHA-256 (hex) at
//! `$OUT_DIR/kz-ebpf.sha256`: the name of the pinned program set this build uses, so a kz built
//! from other eBPF code never reuses an incompatible set (hashed here, not at every start).
//!
//! Same recipe as aya-build 0.2 (`rustup run nightly cargo build -Z build-std=core`), written out
//! so that (1) a missing toolchain piece is ONE clear error naming `cargo xtask setup`, and
//! (2) the script reruns only when the eBPF or shared-type sources change: every build of kz-agent
//! goes through here, so it must be a no-op otherwise.

use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const SETUP_HINT: &str =
    "run `cargo xtask setup` (installs the nightly toolchain with rust-src and bpf-linker)";

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: kz-agent cannot build its eBPF programs: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or("CARGO_MANIFEST_DIR has no parent")?
        .to_path_buf();
    for rel in [
        "kz-ebpf/src",
        "kz-ebpf/Cargo.toml",
        "kz-common/src",
        "kz-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(rel).display());
    }
    println!("cargo:rerun-if-env-changed=KZ_TOOLS_DIR");

    let tools_bin = tools_dir().join("bin");
    let linker = tools_bin.join("bpf-linker");
    // Reruns once the linker appears (or is rebuilt for a new nightly).
    println!("cargo:rerun-if-changed={}", linker.display());

    // One check for all three pieces so a fresh machine gets one message, not three.
    let mut missing = Vec::new();
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
                missing.push("rust-src for the nightly toolchain".to_owned());
            }
        }
        _ => missing.push("the nightly toolchain (via rustup)".to_owned()),
    }
    if !linker.is_file() {
        missing.push(format!("bpf-linker at {}", linker.display()));
    }
    if !missing.is_empty() {
        return Err(format!("missing {}; {SETUP_HINT}", missing.join(", ")));
    }

    // A target dir of its own: the parent cargo holds the lock on the main one.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("bpf");
    let path = std::env::join_paths(std::iter::once(tools_bin.clone()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .map_err(|e| format!("PATH: {e}"))?;
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "kz-ebpf",
        "--bins",
        "--release",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&workspace)
    .env("PATH", path)
    .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The parent build's compiler settings must not leak into the nested nightly build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run `rustup run nightly cargo`: {e}; {SETUP_HINT}"))?;
    if !out.status.success() {
        return Err(format!(
            "the nested build `{cmd:?}` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let object = target_dir.join("bpfel-unknown-none/release/kz-ebpf");
    let out = PathBuf::from(env("OUT_DIR")?);
    let bytes = std::fs::read(&object).map_err(|e| format!("read {}: {e}", object.display()))?;
    let digest = hex(&sha2::Sha256::digest(&bytes));
    write_if_changed(&out.join("kz-ebpf"), &bytes)?;
    write_if_changed(&out.join("kz-ebpf.sha256"), digest.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Leaves the file (and its mtime) alone when the content is the same.
fn write_if_changed(to: &Path, new: &[u8]) -> Result<(), String> {
    if std::fs::read(to).ok().as_deref() == Some(new) {
        return Ok(());
    }
    std::fs::write(to, new).map_err(|e| format!("write {}: {e}", to.display()))
}

fn tools_dir() -> PathBuf {
    std::env::var_os("KZ_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"))
                .join(".cache/kz/tools")
        })
}

fn env(key: &str) -> Result<String, String> {
    std::env::var(key).map_err(|_| format!("{key} is not set (is this running under cargo?)"))
}
