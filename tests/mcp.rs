//! The MCP server end to end, driven by the official Python MCP SDK (tests/mcp/drive.py) over
//! stdio and over streamable HTTP.
//!
//! Topology per test: a client namespace (the Python client, `kz server start --mcp`, and a
//! test DNS server on its loopback) joined by a veth to an upstream namespace serving HTTPS at
//! 10.77.0.2 with a certificate from a test CA. The upstream's address is private, so kz only
//! reaches it with `--allow-private 10.77.0.0/24`; one test shows the same fetch refused
//! without it. Nothing here can reach outside the machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use support::dns::{TestDns, Zone};
use support::netns::{Netns, Pair};
use support::tls::{self, TestCa};
use support::upstream::{Routes, Upstream};

const MARKER: &str = "[REDACTED by kz]";
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// UPSTREAM_IP as the test DNS zone takes it.
const UPSTREAM: &str = "10.77.0.2";
/// A private address an SSRF guard must refuse.
const EVIL: &str = "10.1.2.3";

struct Env {
    cli: Netns,
    _up: Netns,
    dir: PathBuf,
    secret: String,
    dns: SocketAddr,
    upstream: Upstream,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> Option<Env> {
    if !support::require_root() {
        return None;
    }
    let Pair {
        client: cli,
        upstream: up,
        ..
    } = Pair::new("mc", "mu");
    let dir = std::env::temp_dir().join(support::unique_name("kzmcp"));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = format!("sk-live-{:032x}", rand::random::<u128>());

    let ca = TestCa::new("kz test CA (mcp)");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    // HTTPS (h2 and http/1.1) with a leaf for every name the tests fetch.
    let cert = ca.server_cert(
        &["api.upstream.test", "other.test", "flip.test", "mixed.test"],
        &[],
    );
    let upstream = Upstream::start(
        Some(&up),
        &[(
            SocketAddr::from((UPSTREAM_IP, 443)),
            Some(tls::server_config(&cert)),
        )],
        Routes::api(&secret),
    );
    let zone = Zone::new(0)
        .host("api.upstream.test", &[UPSTREAM])
        .host("other.test", &[UPSTREAM])
        .host("evil.test", &[EVIL])
        .host("meta.test", &["169.254.169.254"])
        // A rebinding attacker: the allowed upstream first, loopback on the next lookup.
        .sets("flip.test", &[&[UPSTREAM], &["127.0.0.1"]])
        // One good and one private address in the same answer.
        .sets("mixed.test", &[&[UPSTREAM, EVIL]]);
    let dns = TestDns::start(&cli, "127.0.0.1:0".parse().unwrap(), zone).addr;

    // The agents' signing key: ES256, public half in the bundle, private half for PyJWT.
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("agent-key.pem"), key.serialize_pem()).unwrap();
    let pem = key
        .public_key_pem()
        .lines()
        .map(|l| format!("          {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    let bundle = format!(
        r#"version: "1"
issuers:
  - name: agents
    type: custom
    issuer_url: https://id.test
    audience: kz-mcp
    static_keys:
      - kid: k1
        alg: ES256
        pem: |
{pem}
    map:
      service: claims.agent
policies:
  - name: deny-prod
    rule: "ref.matches('prod/**')"
    effect: deny
  - name: builder-api
    rule: "service == 'builder' && ref.matches('api/**')"
    effect: allow
  # After the api/** rule: refs that reach it without a `ticket` fail to evaluate (= deny).
  - name: deploy-ticket
    rule: "ref == 'ctx/deploy' && context.ticket == 'T-1'"
    effect: allow
resources:
  - ref: api/upstream
    resolver: env
    path: KZ_MCP_TEST_SECRET
    credential_location: "header:Authorization:Bearer"
    hosts: ["api.upstream.test"]
  - ref: api/apikey
    resolver: env
    path: KZ_MCP_TEST_SECRET
    credential_location: "header:X-Api-Key"
  - ref: api/query
    resolver: env
    path: KZ_MCP_TEST_SECRET
    credential_location: "query:api_key"
  - ref: api/short
    resolver: env
    path: KZ_MCP_TEST_SECRET
    mode: short_lived
    ttl: 60
    credential_location: "header:X-Api-Key"
  - ref: ctx/deploy
    resolver: env
    path: KZ_MCP_TEST_SECRET
  - ref: prod/db
    resolver: env
    path: KZ_MCP_TEST_SECRET
backends:
  env:
    type: env
audit:
  path: {audit}
"#,
        audit = dir.join("audit.jsonl").display()
    );
    std::fs::write(dir.join("bundle.yaml"), bundle).unwrap();
    Some(Env {
        cli,
        _up: up,
        dir,
        secret,
        dns,
        upstream,
    })
}

impl Env {
    fn kz_args(&self, allow_private: bool, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            env!("CARGO_BIN_EXE_kz").to_owned(),
            "server".into(),
            "start".into(),
            "--bundle".into(),
            self.dir.join("bundle.yaml").display().to_string(),
            "--mcp".into(),
            "--mcp-dns".into(),
            self.dns.to_string(),
            "--upstream-ca".into(),
            self.dir.join("ca.pem").display().to_string(),
        ];
        if allow_private {
            args.extend(["--allow-private".into(), "10.77.0.0/24".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn plan(&self, transport: Value, calls: Value) -> Value {
        let mut plan = json!({
            "signing_key": self.dir.join("agent-key.pem"),
            "kid": "k1",
            "issuer": "https://id.test",
            "audience": "kz-mcp",
            "tokens": {
                "builder": {"agent": "builder", "sub": "agent-1"},
                "intruder": {"agent": "someone-else"},
                "expired": {"agent": "builder", "exp": 1_000_000_000, "iat": 999_999_000},
            },
            "calls": calls,
        });
        for (k, v) in transport.as_object().unwrap() {
            plan[k] = v.clone();
        }
        plan
    }

    fn stdio_plan(&self, allow_private: bool, calls: Value) -> Value {
        self.stdio_plan_with(allow_private, &[], calls)
    }

    fn stdio_plan_with(&self, allow_private: bool, extra: &[&str], calls: Value) -> Value {
        self.plan(
            json!({
                "transport": "stdio",
                "command": self.kz_args(allow_private, extra),
                "env": {"KZ_MCP_TEST_SECRET": self.secret, "KZ_LOG": "debug"},
            }),
            calls,
        )
    }

    /// Runs the Python client inside the client namespace; returns its report and stderr
    /// (which includes the stdio server's stderr).
    fn drive(&self, plan: &Value) -> (Value, String) {
        let path = self
            .dir
            .join(format!("plan-{}.json", support::unique_name("p")));
        std::fs::write(&path, plan.to_string()).unwrap();
        let python = format!(
            "{}/.cache/kz/venv/bin/python",
            std::env::var("HOME").unwrap()
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mcp/drive.py");
        let out = self
            .cli
            .command(&python)
            .arg(script)
            .arg(&path)
            .output()
            .expect("run the Python MCP client (cargo xtask setup installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "python client failed: {stderr}\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        (serde_json::from_slice(&out.stdout).unwrap(), stderr)
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default()
    }

    fn assert_no_secret(&self, what: &str, text: &str) {
        assert!(
            !text.contains(&self.secret),
            "the real credential leaked into {what}: {text}"
        );
    }
}

fn fetch(jwt: &str, resource: &str, url: &str) -> Value {
    json!({"tool": "fetch", "jwt": jwt, "args": {"resource": resource, "url": url}})
}

fn ok_fetch<'a>(r: &'a Value, what: &str) -> &'a Value {
    assert_eq!(r["is_error"], false, "{what}: {r}");
    &r["structured"]
}

fn err_text(r: &Value, what: &str) -> String {
    assert_eq!(r["is_error"], true, "{what} must be a tool error: {r}");
    r["text"].as_str().unwrap().to_owned()
}

#[test]
fn stdio_lists_tools_resolves_and_fetches_scrubbed() {
    let Some(env) = setup() else { return };
    let echo = "https://api.upstream.test/echo";
    let calls = json!([
        {"tool": "resolve", "jwt": "builder", "args": {"resource": "api/upstream"}},
        {"tool": "resolve", "jwt": "builder", "args": {"resource": "prod/db"}},
        {"tool": "resolve", "jwt": "intruder", "args": {"resource": "api/upstream"}},
        {"tool": "resolve", "jwt": "raw:not-a-jwt", "args": {"resource": "api/upstream"}},
        {"tool": "resolve", "jwt": "expired", "args": {"resource": "api/upstream"}},
        {"tool": "fetch", "jwt": "builder", "args": {
            "resource": "api/upstream", "url": echo, "method": "POST",
            "headers": {"X-Trace": "t-1", "Accept-Encoding": "gzip", "Authorization": "Bearer agent-guess"},
            "body": "hello"}},
        fetch("builder", "api/apikey", echo),
        fetch("builder", "api/query", "https://api.upstream.test/echo?x=1"),
        fetch("builder", "prod/db", echo),
        fetch("raw:not-a-jwt", "api/upstream", echo),
        fetch("builder", "api/upstream", "https://other.test/echo"),
        fetch("builder", "api/upstream", "https://api.upstream.test/redirect-in"),
        fetch("builder", "api/apikey", "https://api.upstream.test/redirect-out"),
        fetch("builder", "api/upstream", "https://api.upstream.test/big"),
        fetch("builder", "api/upstream", "https://api.upstream.test/binary"),
        fetch("builder", "api/upstream", "https://api.upstream.test/gzip"),
        fetch("builder", "api/upstream", "https://api.upstream.test/redirect-leak"),
    ]);
    let (report, stderr) = env.drive(&env.stdio_plan(true, calls));

    // Server identity and tool schemas (KeyZero 0.3 compatible).
    assert_eq!(report["server"]["name"], "keyzero");
    let tools = report["tools"].as_array().unwrap();
    let tool = |name: &str| tools.iter().find(|t| t["name"] == name).unwrap().clone();
    assert_eq!(tools.len(), 2, "{tools:?}");
    let resolve = tool("resolve");
    let schema = &resolve["input_schema"];
    assert_eq!(schema["type"], "object");
    for p in ["jwt", "resource", "context"] {
        assert!(schema["properties"][p].is_object(), "resolve.{p}: {schema}");
    }
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(required, ["jwt", "resource"]);
    let fetch_tool = tool("fetch");
    let schema = &fetch_tool["input_schema"];
    for p in [
        "jwt", "resource", "url", "method", "headers", "body", "context",
    ] {
        assert!(schema["properties"][p].is_object(), "fetch.{p}: {schema}");
    }
    assert_eq!(schema["properties"]["method"]["default"], "GET");
    assert_eq!(schema["properties"]["headers"]["type"], "object");
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(required, ["jwt", "resource", "url"]);

    let r = report["results"].as_array().unwrap();
    // resolve: allowed (KeyZero's /v1/resolve shape, direct mode carries the value).
    let allowed = &r[0]["structured"]["results"]["api/upstream"];
    assert_eq!(r[0]["is_error"], false, "{}", r[0]);
    assert_eq!(allowed["allowed"], true);
    assert_eq!(allowed["policy"], "builder-api");
    assert_eq!(allowed["value"], env.secret.as_str());
    // resolve: denied by an explicit policy and by no match.
    let denied = &r[1]["structured"]["results"]["prod/db"];
    assert_eq!(denied["allowed"], false, "{}", r[1]);
    assert_eq!(denied["policy"], "deny-prod");
    assert!(denied.get("value").is_none());
    let denied = &r[2]["structured"]["results"]["api/upstream"];
    assert_eq!(denied["allowed"], false, "{}", r[2]);
    assert!(denied.get("value").is_none());
    // resolve: invalid and expired tokens are tool errors with a reason.
    assert!(err_text(&r[3], "garbage jwt").contains("invalid_token"));
    let t = err_text(&r[4], "expired jwt");
    assert!(t.contains("invalid_token") && t.contains("expired"), "{t}");

    // fetch: bearer injected (the upstream answers 200 only with the right credential), echoed
    // back, and scrubbed in body and headers; cookies and agent-set credential headers dropped.
    let f = ok_fetch(&r[5], "fetch bearer");
    assert_eq!(f["status"], 200, "{f}");
    let body: Value = serde_json::from_str(f["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["ok"], true);
    assert_eq!(body["authorization"], format!("Bearer {MARKER}"));
    assert_eq!(body["method"], "POST");
    assert_eq!(body["body"], "hello");
    assert_eq!(body["x_trace"], "t-1");
    assert_eq!(body["accept_encoding"], "identity");
    assert_eq!(
        body["version"], "HTTP/2.0",
        "ALPN h2 is used when the upstream offers it"
    );
    assert_eq!(f["headers"]["x-echo-auth"], format!("Bearer {MARKER}"));
    assert_eq!(f["headers"]["x-custom"], "hi");
    assert!(f["headers"].get("set-cookie").is_none(), "{f}");
    assert_eq!(f["body_encoding"], "text");
    assert_eq!(f["truncated"], false);
    // X-Api-Key and query-parameter locations.
    let f = ok_fetch(&r[6], "fetch x-api-key");
    assert_eq!(f["status"], 200, "{f}");
    assert!(
        f["body"]
            .as_str()
            .unwrap()
            .contains(&format!("\"x_api_key\":\"{MARKER}\""))
    );
    let f = ok_fetch(&r[7], "fetch query");
    assert_eq!(f["status"], 200, "{f}");
    assert!(
        f["body"]
            .as_str()
            .unwrap()
            .contains(&format!("api_key={MARKER}")),
        "{f}"
    );
    assert_eq!(f["url"], "https://api.upstream.test/echo?x=1");
    // Denied and invalid token.
    assert!(err_text(&r[8], "fetch denied").contains("denied by policy 'deny-prod'"));
    assert!(err_text(&r[9], "fetch bad jwt").contains("invalid_token"));
    // Host outside the resource's hosts.
    let t = err_text(&r[10], "fetch out of scope");
    assert!(t.contains("outside the resource's scope"), "{t}");
    // Redirects: followed on the same host, refused to another host.
    let f = ok_fetch(&r[11], "redirect in scope");
    assert_eq!(f["status"], 200);
    assert_eq!(f["url"], "https://api.upstream.test/echo?from=redirect");
    let t = err_text(&r[12], "redirect out of scope");
    assert!(
        t.contains("redirect to 'https://other.test/echo' refused"),
        "{t}"
    );
    // Oversized body: cut at the cap, marked, still scrubbed.
    let f = ok_fetch(&r[13], "big");
    assert_eq!(f["truncated"], true);
    let big = f["body"].as_str().unwrap();
    assert!(big.starts_with(MARKER), "{}", &big[..64]);
    assert!(big.len() <= 1024 * 1024 + MARKER.len(), "{}", big.len());
    assert!(big.len() >= 1024 * 1024 - 64);
    // Binary body: base64 with a flag, scrubbed before encoding.
    let f = ok_fetch(&r[14], "binary");
    assert_eq!(f["body_encoding"], "base64");
    let decoded = base64_decode(f["body"].as_str().unwrap());
    let mut want = vec![0xff, 0xfe, 0x00];
    want.extend_from_slice(MARKER.as_bytes());
    want.push(0x80);
    assert_eq!(decoded, want);
    // A compressed body cannot be scrubbed: withheld.
    assert!(err_text(&r[15], "gzip").contains("content-encoding 'gzip'"));
    // A redirect whose target URL carries the credential: followed (same host), and the URL
    // reported back is scrubbed like the body.
    let f = ok_fetch(&r[16], "redirect leak");
    assert_eq!(f["status"], 200);
    assert_eq!(
        f["url"],
        format!("https://api.upstream.test/echo?leak={MARKER}")
    );

    // The upstream saw exactly the fetches that were allowed to go out.
    let seen = env.upstream.paths();
    assert_eq!(
        seen,
        [
            "/echo",
            "/echo",
            "/echo",
            "/redirect-in",
            "/echo",
            "/redirect-out",
            "/big",
            "/binary",
            "/gzip",
            "/redirect-leak",
            "/echo"
        ]
    );

    // Every call audited (one mcp_call each), and the value is nowhere.
    let audit = env.audit();
    let calls: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.to_string().contains("mcp_call"))
        .collect();
    assert_eq!(calls.len(), 17, "{audit}");
    assert!(audit.contains("\"outcome\":\"denied\""), "{audit}");
    assert!(audit.contains("\"outcome\":\"invalid_token\""), "{audit}");
    assert!(audit.contains("\"outcome\":\"blocked\""), "{audit}");
    env.assert_no_secret("the audit log", &audit);
    env.assert_no_secret("kz's stderr", &stderr);
    for (i, res) in r.iter().enumerate().skip(1) {
        env.assert_no_secret(&format!("fetch/resolve result {i}"), &res.to_string());
    }
    let verify = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["audit", "verify"])
        .arg(env.dir.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn ssrf_destinations_are_refused() {
    let Some(env) = setup() else { return };
    // api/apikey has no `hosts`, so only the SSRF guard stands between the agent and these.
    let targets = [
        ("https://127.0.0.1/", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://evil.test/", "10.1.2.3"),
        ("https://meta.test/", "metadata"),
        ("https://localhost/", "local machine"),
        ("https://[::1]/", "loopback"),
        ("https://0x7f.1/", "loopback"),
        ("https://[::ffff:169.254.169.254]/", "metadata"),
        ("https://nowhere.test/", "NXDOMAIN"),
        (
            "http://api.upstream.test/echo",
            "only sends credentials over https",
        ),
        ("file:///etc/passwd", "only sends credentials over https"),
    ];
    let calls: Vec<Value> = targets
        .iter()
        .map(|(url, _)| fetch("builder", "api/apikey", url))
        .collect();
    let (report, stderr) = env.drive(&env.stdio_plan(true, Value::Array(calls)));
    for (res, (url, why)) in report["results"].as_array().unwrap().iter().zip(targets) {
        let t = err_text(res, url);
        assert!(t.contains(why), "{url}: expected '{why}' in: {t}");
    }
    assert!(
        env.upstream.paths().is_empty(),
        "nothing reached the upstream"
    );
    let audit = env.audit();
    assert_eq!(audit.matches("mcp_call").count(), targets.len(), "{audit}");
    env.assert_no_secret("the audit log", &audit);
    env.assert_no_secret("kz's stderr", &stderr);
}

#[test]
fn rebinding_mixed_answers_and_timeouts() {
    let Some(env) = setup() else { return };
    let calls = json!([
        fetch("builder", "api/apikey", "https://flip.test/echo"),
        fetch("builder", "api/apikey", "https://flip.test/echo"),
        fetch("builder", "api/apikey", "https://mixed.test/echo"),
        fetch("builder", "api/apikey", "https://api.upstream.test/slow"),
        {"tool": "resolve", "jwt": "builder", "args": {"resource": "api/short"}},
        fetch("builder", "api/short", "https://api.upstream.test/echo"),
    ]);
    let plan = env.stdio_plan_with(true, &["--mcp-timeout", "3"], calls);
    let started = std::time::Instant::now();
    let (report, _) = env.drive(&plan);
    let r = report["results"].as_array().unwrap();
    // First lookup answered with the allowed upstream: kz connects to exactly that address (a
    // client that looked the name up again to connect would now be sent to 127.0.0.1).
    assert_eq!(ok_fetch(&r[0], "flip 1")["status"], 200);
    // Next lookup answers loopback: refused before any connection.
    let t = err_text(&r[1], "flip 2");
    assert!(t.contains("127.0.0.1") && t.contains("loopback"), "{t}");
    // Any bad address in an answer refuses the name, even beside a good one.
    let t = err_text(&r[2], "mixed");
    assert!(t.contains("10.1.2.3"), "{t}");
    // The upstream stalls for 30s; the fetch gives up at the configured limit.
    let t = err_text(&r[3], "slow");
    assert!(t.contains("timed out after 3s"), "{t}");
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
    // short_lived resources: `resolve` hands out a kz token, never the value; `fetch` still
    // injects the real credential (the agent never sees it either way).
    let short = &r[4]["structured"]["results"]["api/short"];
    assert_eq!(short["allowed"], true, "{}", r[4]);
    assert_eq!(short["mode"], "short_lived");
    assert!(
        short["token"].is_string() && short.get("value").is_none(),
        "{short}"
    );
    assert_eq!(ok_fetch(&r[5], "short_lived fetch")["status"], 200);
    assert_eq!(env.upstream.paths(), ["/echo", "/slow", "/echo"]);
}

#[test]
fn private_upstream_refused_without_allow_list() {
    let Some(env) = setup() else { return };
    let calls = json!([fetch(
        "builder",
        "api/upstream",
        "https://api.upstream.test/echo"
    )]);
    let (report, _) = env.drive(&env.stdio_plan(false, calls));
    let t = err_text(&report["results"][0], "private upstream");
    assert!(t.contains("10.77.0.2") && t.contains("private"), "{t}");
    assert!(env.upstream.paths().is_empty());
}

#[test]
fn streamable_http_transport() {
    let Some(env) = setup() else { return };
    let mut args = env.kz_args(true, &[]);
    args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let mut child = env
        .cli
        .command(&args[0])
        .args(&args[1..])
        .env("KZ_MCP_TEST_SECRET", &env.secret)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("kz exited before listening").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    let calls = json!([
        {"tool": "resolve", "jwt": "builder", "args": {"resource": "api/upstream"}},
        {"tool": "resolve", "jwt": "builder", "args": {"resource": "prod/db"}},
        fetch("builder", "api/upstream", "https://api.upstream.test/echo"),
        fetch("raw:eyJhbGciOiJub25lIn0.e30.", "api/upstream", "https://api.upstream.test/echo"),
        fetch("builder", "api/apikey", "https://169.254.169.254/"),
        {"tool": "resolve", "jwt": "builder",
         "args": {"resource": "ctx/deploy", "context": {"ticket": "T-1"}}},
        {"tool": "resolve", "jwt": "builder",
         "args": {"resource": "ctx/deploy", "context": {"ticket": "T-2"}}},
    ]);
    let plan = env.plan(json!({"transport": "http", "url": url}), calls);
    let (report, stderr) = env.drive(&plan);
    let _ = child.kill();
    let _ = child.wait();

    assert_eq!(report["server"]["name"], "keyzero");
    let names: Vec<&str> = report["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"resolve") && names.contains(&"fetch"));
    let r = report["results"].as_array().unwrap();
    assert_eq!(
        r[0]["structured"]["results"]["api/upstream"]["allowed"],
        true
    );
    assert_eq!(r[1]["structured"]["results"]["prod/db"]["allowed"], false);
    let f = ok_fetch(&r[2], "http fetch");
    assert_eq!(f["status"], 200);
    assert_eq!(f["headers"]["x-echo-auth"], format!("Bearer {MARKER}"));
    env.assert_no_secret("the fetch result", &r[2].to_string());
    let t = err_text(&r[3], "alg none");
    assert!(t.contains("invalid_token"), "{t}");
    assert!(err_text(&r[4], "metadata").contains("metadata"));
    // `context` reaches the policy.
    let ctx = &r[5]["structured"]["results"]["ctx/deploy"];
    assert_eq!(ctx["allowed"], true, "{}", r[5]);
    assert_eq!(ctx["policy"], "deploy-ticket");
    assert_eq!(
        r[6]["structured"]["results"]["ctx/deploy"]["allowed"], false,
        "{}",
        r[6]
    );
    let audit = env.audit();
    assert_eq!(
        audit.matches("\"transport\":\"http\"").count(),
        7,
        "{audit}"
    );
    env.assert_no_secret("the audit log", &audit);
    env.assert_no_secret("the client's stderr", &stderr);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
