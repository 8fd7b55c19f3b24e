//! The environment of a `kz run --blind` end-to-end test (tests/run_blind.rs,
//! tests/containment.rs): a client netns where kz runs (nsenter) and an upstream netns joined
//! by a veth. The upstream netns holds the test DNS server (10.77.0.2:53) and three hosts, each
//! serving HTTPS on 443 and HTTP on 80 with certificates from a test CA:
//! - api.allowed.test   10.77.0.10  allowed, in API_KEY's scope
//! - other.allowed.test 10.77.0.11  allowed, out of API_KEY's scope
//! - denied.test        10.77.0.66  not allowed by `[blind] connections`
//!
//! kz's config points `[blind] resolver` at the test DNS server and `upstream_ca` at the test CA.
//! The agent runs as the unprivileged test user ([`super::agent_user`]), as `sudo` would start
//! it; [`Env::kz_as_root_agent`] starts it with `--allow-root-agent` instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::net::IpAddr;

use super::dns::{TestDns, Zone};
use super::netns::{Netns, Pair};
use super::tls::{self, TestCa};
use super::upstream::{Routes, Upstream};

pub const REAL: &str = "real-secret-7f3a9c1e5b";
pub const API: &str = "10.77.0.10";
pub const OTHER: &str = "10.77.0.11";
pub const DENIED: &str = "10.77.0.66";

pub struct Env {
    pub client: Netns,
    pub _upstream_ns: Netns,
    pub dir: PathBuf,
    pub api: Upstream,
    pub other: Upstream,
    pub denied: Upstream,
    pub dns: TestDns,
}

impl Env {
    pub fn new() -> Env {
        let pair = Pair::new("rbc", "rbu");
        for ip in [API, OTHER, DENIED] {
            pair.add_upstream_addr(&format!("{ip}/24"));
        }
        let Pair {
            client,
            upstream: upstream_ns,
            ..
        } = pair;
        let ca = TestCa::new("kz test upstream CA");
        let api = host(&upstream_ns, API.parse().unwrap(), &ca, "api.allowed.test");
        let other = host(
            &upstream_ns,
            OTHER.parse().unwrap(),
            &ca,
            "other.allowed.test",
        );
        let denied = host(&upstream_ns, DENIED.parse().unwrap(), &ca, "denied.test");
        let zone = Zone::new(30)
            .host("api.allowed.test", &[API])
            .host("other.allowed.test", &[OTHER])
            .host("denied.test", &[DENIED])
            // An allowed name pointed at this machine (DNS rebinding, issue 14).
            .host("rebind.allowed.test", &["127.0.0.1"]);
        let dns = TestDns::start(&upstream_ns, "10.77.0.2:53".parse().unwrap(), zone);

        let dir = super::agent_readable_dir("kzrb");
        ca.write_pem(&dir, "upstream-ca.pem");
        write_config(
            &dir,
            "api.allowed.test",
            &["api.allowed.test", "other.allowed.test"],
            "",
        );
        Env {
            client,
            _upstream_ns: upstream_ns,
            dir,
            api,
            other,
            denied,
            dns,
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// kz's state directory for this test's runs (config approvals): one per test, so a
    /// record of an earlier test that had the same (pid-derived) project path never applies.
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}.kzstate", self.dir.display()))
    }

    /// `kz run --blind -- bash -c SCRIPT` in the client netns, as root started by `sudo` from
    /// the test user: the agent runs as that user.
    pub fn kz(&self, extra: &[&str], script: &str) -> Command {
        let mut cmd = self.kz_as_root_agent(extra, script);
        super::agent_user().sudo_env(&mut cmd);
        cmd
    }

    /// The same without SUDO_UID: kz refuses to run the agent as root unless `extra` has
    /// `--allow-root-agent`.
    pub fn kz_as_root_agent(&self, extra: &[&str], script: &str) -> Command {
        let mut cmd = self.client.command(env!("CARGO_BIN_EXE_kz"));
        cmd.arg("--dir")
            .arg(&self.dir)
            .args(["run", "--blind"])
            .args(extra)
            .args(["--", "bash", "-c", script])
            .env("KZ_TEST_REAL_KEY", REAL)
            .env("KZ_AUDIT_LOG", self.audit_path())
            .env("KZ_STATE_DIR", self.state_dir())
            .env("KZ_LOG", "info")
            .current_dir(&self.dir);
        cmd
    }

    pub fn run(&self, script: &str) -> Output {
        let out = self.kz(&[], script).output().unwrap();
        no_leak(&out);
        out
    }

    /// kz's resolver never passed a name containing `needle` to the upstream DNS server.
    pub fn assert_never_forwarded(&self, needle: &str) {
        let q = self.dns.questions();
        assert!(
            !q.iter().any(|q| q.contains(needle)),
            "a refused name was forwarded: {q:?}"
        );
    }

    /// The run's records, once their hash chain checks out as `kz audit verify` checks it
    /// (the proxy's, the resolver's and the interceptor's records all go into one chain).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let report = kz_agent::audit::verify_path(&self.audit_path())
            .unwrap_or_else(|e| panic!("the run's audit log does not verify: {e}"));
        assert_eq!(report.records, records.len() as u64);
        records
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

/// An upstream "remote API" host of a blind run at `ip` in `ns`: HTTPS on 443 (HTTP/1.1, a
/// certificate from `ca` for `name`) and HTTP on 80, answering with [`Routes::EchoAuth`] (the
/// request's Authorization header echoed back, so a test can check the proxy scrubs real
/// values out of responses).
pub fn host(ns: &Netns, ip: IpAddr, ca: &TestCa, name: &str) -> Upstream {
    let tls = tls::server_config_alpn(&ca.server_cert(&[name], &[]), tls::H1);
    Upstream::host(ns, ip, tls, Routes::EchoAuth)
}

/// The project's `.keyzero.toml` in `dir`: `API_KEY` from the environment, scoped to
/// `secret_host` and allowed over plain HTTP (most of these tests use `http://` upstreams; the
/// tests of the TLS-only default write their own); the agent may connect to `allowed`; `extra`
/// adds `[blind]` keys.
pub fn write_config(dir: &Path, secret_host: &str, allowed: &[&str], extra: &str) {
    let connections: String = allowed
        .iter()
        .map(|h| format!("  {{ allow = true, host = \"{h}\" }},\n"))
        .collect();
    let toml = format!(
        r#"
[secrets.API_KEY]
resolver = "env"
ref = "KZ_TEST_REAL_KEY"
hosts = ["{secret_host}"]
allow_plaintext = true

[blind]
connections = [
{connections}]
{extra}resolver = "10.77.0.2:53"
upstream_ca = "upstream-ca.pem"
"#
    );
    std::fs::write(dir.join(".keyzero.toml"), toml).unwrap();
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The real value appears nowhere the child or the operator's terminal can see.
pub fn no_leak(out: &Output) {
    let (o, e) = text(out);
    assert!(!o.contains(REAL), "real value in the child's output:\n{o}");
    assert!(!e.contains(REAL), "real value on stderr:\n{e}");
}

pub fn masked_token(s: &str) -> String {
    let i = s.find("kz_masked_").expect("no masked token in output");
    let tok = &s[i..i + "kz_masked_".len() + 32];
    assert!(
        tok["kz_masked_".len()..]
            .chars()
            .all(|c| c.is_ascii_hexdigit())
    );
    tok.to_owned()
}

pub fn assert_ok(out: &Output) -> String {
    let (o, e) = text(out);
    assert!(
        out.status.success(),
        "kz failed: {:?}\nstdout:\n{o}\nstderr:\n{e}",
        out.status
    );
    o
}

/// The last request the upstream saw carried `Authorization: Bearer <REAL>`.
pub fn upstream_got_real(up: &Upstream, tls: bool) {
    let reqs = up.seen();
    let req = reqs
        .iter()
        .rev()
        .find(|r| r.tls == tls)
        .unwrap_or_else(|| panic!("no request (tls={tls}): {reqs:?}"));
    assert_eq!(
        req.header("authorization"),
        Some(&*format!("Bearer {REAL}")),
        "{req:?}"
    );
}
