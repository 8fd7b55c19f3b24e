//! The binary starts, answers --help and --version, and generates completions.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

fn kz() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kz"))
}

#[test]
fn help_and_version() {
    let out = kz().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: kz"));
    let out = kz().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kz "));
}

#[test]
fn completions_name_every_subcommand() {
    let out = kz().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("completions"));
}

#[test]
fn netns_pair_is_reachable_only_inside() {
    if !support::require_root() {
        return;
    }
    let pair = support::netns::Pair::with_addrs("ta", "10.231.0.1/24", "tb", "10.231.0.2/24");
    let ok = pair
        .client
        .command("ping")
        .args(["-c1", "-W2", "10.231.0.2"])
        .status()
        .unwrap();
    assert!(ok.success(), "veth peer answers ping");
}
