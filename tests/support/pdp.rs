//! PDP test support: a real `kz server start` process with captured stderr, JWT minting with
//! the fixture keys, and curl as the HTTP client (upstreams: [`super::upstream`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/keys");
pub const BUNDLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../bundles");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

pub fn kz() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kz"))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A per-test scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "kz-pdp-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Signs `claims` with a fixture private key.
pub fn mint(
    key_file: &str,
    alg: jsonwebtoken::Algorithm,
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> String {
    let pem = std::fs::read(fixture(key_file)).unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::ES384 => {
            jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap()
        }
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// A token from the per-agent issuer used by the bundles in bundles/.
pub fn agent_token(agent: &str, environment: &str, teams: &[&str]) -> String {
    mint(
        "agent-es256.key",
        jsonwebtoken::Algorithm::ES256,
        Some("agents-2026"),
        &serde_json::json!({
            "iss": "https://id.agents.example",
            "aud": "kz",
            "sub": format!("agent:{agent}"),
            "iat": now(),
            "exp": now() + 600,
            "agent_name": agent,
            "environment": environment,
            "agent_instance": format!("{agent}-7f3a"),
            "teams": teams,
        }),
    )
}

/// A running `kz server start` with its stderr captured for secret scanning.
pub struct Server {
    child: Child,
    pub url: String,
    pub proxy_url: Option<String>,
    pub stderr: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(bundle: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = kz();
        cmd.args(["--log", "debug", "server", "start", "--bundle"])
            .arg(bundle)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("KEYZERO_SIGNING_KEY_PATH")
            .env_remove("KEYZERO_PUBLIC_KEY_PATH")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kz server start");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                sink.lock().unwrap().push_str(&line);
                let _ = tx.send(line.clone());
                line.clear();
            }
        });
        let stdout_buf = Arc::new(Mutex::new(String::new()));
        let mut out_reader = BufReader::new(child.stdout.take().unwrap());
        let out_sink = stdout_buf.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while out_reader
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                out_sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let proxy_only = extra.contains(&"--proxy");
        let wants_proxy = proxy_only || extra.contains(&"--proxy-listen");
        let (mut url, mut proxy_url) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while (url.is_none() && !proxy_only) || (wants_proxy && proxy_url.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "kz server did not start; stderr:\n{}",
                    stderr.lock().unwrap()
                )
            });
            if let Some(u) = line.trim().strip_prefix("kz: PDP listening on ") {
                url = Some(u.to_owned());
            }
            if let Some(u) = line.trim().strip_prefix("kz: proxy listening on ") {
                proxy_url = Some(u.to_owned());
            }
        }
        Self {
            child,
            url: url.or_else(|| proxy_url.clone()).unwrap(),
            proxy_url,
            stderr,
            stdout: stdout_buf,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `pred(stderr)` holds (reload messages and the like).
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if pred(&self.logs()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("log condition not met; stderr:\n{}", self.logs());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What curl got back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// POST /v1/resolve with curl; the Authorization header goes through a file so that even a
/// 1 MiB token fits (argv strings are limited to 128 KiB).
pub fn resolve(base: &str, token: Option<&str>, body: &serde_json::Value) -> Reply {
    let dir = TempDir::new("curl");
    if let Some(t) = token.filter(|t| t.len() > 64 * 1024) {
        // curl refuses header lines this long ("Out of memory"); Python's http.client sends them.
        std::fs::write(dir.path("tok"), t).unwrap();
        std::fs::write(dir.path("body"), body.to_string()).unwrap();
        let hostport = base.trim_start_matches("http://");
        let script = format!(
            "import http.client,sys\nt=open('{tok}').read()\nb=open('{body}','rb').read()\nc=http.client.HTTPConnection('{hostport}',timeout=20)\nc.request('POST','/v1/resolve',body=b,headers={{'Authorization':'Bearer '+t,'Content-Type':'application/json'}})\nr=c.getresponse()\nsys.stdout.write(r.read().decode()+'\\n'+str(r.status))",
            tok = dir.path("tok").display(),
            body = dir.path("body").display(),
        );
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script);
        return curl(cmd);
    }
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "Content-Type: application/json"])
        .arg("--data-binary")
        .arg(format!("@{}", dir.path("body").display()));
    std::fs::write(dir.path("body"), body.to_string()).unwrap();
    if let Some(t) = token {
        std::fs::write(dir.path("hdr"), format!("Authorization: Bearer {t}\n")).unwrap();
        cmd.arg("-H").arg(format!("@{}", dir.path("hdr").display()));
    }
    cmd.arg(format!("{base}/v1/resolve"));
    curl(cmd)
}

pub fn curl(mut cmd: Command) -> Reply {
    let out = cmd.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Reply {
        status: code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl failed: {}\n{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        }),
        body: body.to_owned(),
    }
}

pub fn get(url: &str) -> Reply {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", url]);
    curl(cmd)
}

/// Panics if any of `secrets` occurs in `haystack` (logs, audit files, bodies that must not
/// carry values).
pub fn assert_no_secret(what: &str, haystack: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !haystack.contains(s),
            "a test secret value leaked into {what}"
        );
    }
}

/// The JWK (kty EC, P-256) of a fixture PKCS#8 private key.
pub fn ec_jwk(key_file: &str, kid: &str) -> serde_json::Value {
    use base64::Engine as _;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let pem = std::fs::read(fixture(key_file)).unwrap();
    let der = match rustls_pemfile::read_one(&mut pem.as_slice())
        .unwrap()
        .unwrap()
    {
        rustls_pemfile::Item::Pkcs8Key(k) => k.secret_pkcs8_der().to_vec(),
        _ => panic!("not PKCS#8"),
    };
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &der,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let point = pair.public_key().as_ref();
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                       "x": b(&point[1..33]), "y": b(&point[33..65])})
}
