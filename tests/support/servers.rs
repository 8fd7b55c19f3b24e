//! Real backend servers for resolver tests, each on its own loopback port and killed on drop:
//! an OpenBao dev server ([`Bao`]) and moto's AWS server ([`Moto`]). Both binaries come from the
//! Python venv `cargo xtask setup` creates (~/.cache/kz/venv, or $KZ_VENV).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A program from the test venv, else from PATH. Panics with the setup hint when missing.
pub fn tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("KZ_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/kz/venv")
        });
    let candidate = venv.join("bin").join(name);
    if candidate.exists() {
        return candidate;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "`{name}` not found in {} or PATH: run `cargo xtask setup`",
        venv.display()
    );
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Status code of `GET path` on a plain-HTTP loopback server, or None if it does not answer.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(300),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

fn wait_until(what: &str, child: &mut Child, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} not ready after {timeout:?}");
}

/// An OpenBao dev server (in-memory, unsealed, KV v2 at `secret/`).
pub struct Bao {
    child: Child,
    pub port: u16,
    pub addr: String,
    pub root_token: String,
    /// HOME for the server and the CLI (the CLI writes ~/.vault-token there, not in ours).
    home: tempfile::TempDir,
    /// With TLS: the dev CA certificate that signed the listener's certificate.
    pub ca_cert: Option<PathBuf>,
}

impl Bao {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// `-dev-tls`: HTTPS with a CA generated into a temp dir.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let home = tempfile::tempdir().unwrap();
        let root_token = format!("root-{}", super::unique_name("t"));
        let port = free_port();
        let mut cmd = Command::new(tool("bao"));
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg("-dev-no-store-token")
            .env("HOME", home.path())
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let cert_dir = home.path().join("tls");
        if tls {
            std::fs::create_dir_all(&cert_dir).unwrap();
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", cert_dir.display()));
        }
        let mut child = cmd.spawn().expect("start bao");
        let scheme = if tls { "https" } else { "http" };
        let addr = format!("{scheme}://127.0.0.1:{port}");
        let ca_cert = tls.then(|| cert_dir.join("vault-ca.pem"));
        let probe = cli_command(
            home.path(),
            &addr,
            &root_token,
            ca_cert.as_deref(),
            &["status"],
        );
        let mut probe = Some(probe);
        wait_until(
            "bao server",
            &mut child,
            Duration::from_secs(30),
            || match &ca_cert {
                // With TLS the CLI (which trusts the generated CA) is the readiness probe.
                Some(ca) => {
                    ca.exists()
                        && probe.as_mut().is_some_and(|p| {
                            p.stdout(Stdio::null())
                                .stderr(Stdio::null())
                                .status()
                                .is_ok_and(|s| s.success())
                        })
                }
                None => http_status(port, "/v1/sys/health") == Some(200),
            },
        );
        probe.take();
        Self {
            child,
            port,
            addr,
            root_token,
            home,
            ca_cert,
        }
    }

    /// Runs the `bao` CLI against this server as root; returns trimmed stdout, panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.cli_command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn cli_command(&self, args: &[&str]) -> Command {
        cli_command(
            self.home.path(),
            &self.addr,
            &self.root_token,
            self.ca_cert.as_deref(),
            args,
        )
    }
}

fn cli_command(home: &Path, addr: &str, token: &str, ca: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(tool("bao"));
    cmd.args(args)
        .env("HOME", home)
        .env("BAO_ADDR", addr)
        .env("VAULT_ADDR", addr)
        .env("BAO_TOKEN", token)
        .env("VAULT_TOKEN", token);
    if let Some(ca) = ca {
        cmd.env("BAO_CACERT", ca).env("VAULT_CACERT", ca);
    }
    cmd
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's server: AWS APIs (Secrets Manager, SSM, …) in memory, any credentials accepted.
pub struct Moto {
    child: Child,
    pub port: u16,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Self {
        let port = free_port();
        let mut child = Command::new(tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        wait_until("moto_server", &mut child, Duration::from_secs(60), || {
            http_status(port, "/moto-api/").is_some()
        });
        Self {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs a Python snippet with boto3 (from the venv) against this server. The snippet gets
    /// `sm` (secretsmanager) and `ssm` clients in us-east-1.
    pub fn boto3(&self, code: &str) {
        let python = tool("python3");
        let script = format!(
            "import boto3\nkw=dict(endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\nsm=boto3.client('secretsmanager', **kw)\nssm=boto3.client('ssm', **kw)\n{code}\n",
            self.endpoint
        );
        let out = Command::new(python).arg("-c").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "boto3 snippet failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
