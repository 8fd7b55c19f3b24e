//! The PDP end to end: real `kz server start` processes, curl as the client, the bundles in
//! bundles/, the JWT attack suite, bad bundles, reload, audit verification, the token-exchange
//! proxy, and a scan of every captured log and audit file for the test secrets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use jsonwebtoken::Algorithm;
use serde_json::json;
use std::path::Path;
use support::pdp::*;
use support::tls::{self, TestCa};
use support::upstream::{Routes, Upstream};

const ZENDESK: &str = "zd-secret-4f1c9a77e2";
const SEARCH: &str = "srch-secret-b8d03e1155";
const DEPLOY: &str = "dep-secret-91aa0c3d7f";
const ADMIN: &str = "adm-secret-c2e4f60b18";
const STAGING: &str = "stg-secret-7d52ab90e3";
const STRIPE: &str = "sk_test_51KzSecretValue0123";
const WAREHOUSE: &str = "postgres://wh:pw-3c9e1f@db/wh";
const NPM: &str = "npm_secret_e5a7c1d902";
const ALL: &[&str] = &[
    ZENDESK, SEARCH, DEPLOY, ADMIN, STAGING, STRIPE, WAREHOUSE, NPM,
];

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KZ_DEMO_ZENDESK_TOKEN", ZENDESK),
        ("KZ_DEMO_SEARCH_KEY", SEARCH),
        ("KZ_DEMO_DEPLOY_TOKEN", DEPLOY),
        ("KZ_DEMO_ADMIN_TOKEN", ADMIN),
        ("KZ_DEMO_STAGING_TOKEN", STAGING),
        ("KZ_DEMO_STRIPE_KEY", STRIPE),
        ("KZ_DEMO_WAREHOUSE_DSN", WAREHOUSE),
        ("KZ_DEMO_NPM_TOKEN", NPM),
    ]
}

fn bundle(name: &str) -> std::path::PathBuf {
    Path::new(BUNDLES).join(name)
}

fn result<'a>(r: &'a serde_json::Value, reference: &str) -> &'a serde_json::Value {
    &r["results"][reference]
}

#[test]
fn every_bundle_in_bundles_dir_checks() {
    let mut n = 0;
    for entry in std::fs::read_dir(BUNDLES).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = kz()
            .args(["server", "check", "--bundle"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("policies compiled successfully"),
            "{stdout}"
        );
        assert!(stdout.ends_with("bundle OK\n"), "{stdout}");
        n += 1;
    }
    assert_eq!(n, 5, "one bundle per pattern");
}

#[test]
fn pattern_per_agent_identity() {
    let s = Server::start(&bundle("per-agent-identity.yaml"), &[], &env());
    let r = resolve(
        &s.url,
        Some(&agent_token("support-bot", "staging", &[])),
        &json!({"ref": "support/zendesk"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let z = result(&v, "support/zendesk");
    assert_eq!(z["allowed"], true);
    assert_eq!(z["policy"], "support-bot-reads-zendesk");
    assert_eq!(z["mode"], "direct");
    assert_eq!(z["value"], ZENDESK);

    // The same ref for another agent: its own identity decides, not a shared key.
    let r = resolve(
        &s.url,
        Some(&agent_token("research-bot", "staging", &[])),
        &json!({"refs": ["support/zendesk", "research/serp"]}),
    );
    let v = r.json();
    assert_eq!(result(&v, "support/zendesk")["allowed"], false);
    assert_eq!(result(&v, "support/zendesk")["policy"], "implicit-deny");
    assert!(result(&v, "support/zendesk").get("value").is_none());
    assert_eq!(
        result(&v, "research/serp")["allowed"],
        false,
        "staging research agent"
    );

    let r = resolve(
        &s.url,
        Some(&agent_token("research-bot", "production", &[])),
        &json!({"ref": "research/serp"}),
    );
    let v = r.json();
    assert_eq!(
        result(&v, "research/serp")["policy"],
        "research-bot-prod-search"
    );
    assert_eq!(result(&v, "research/serp")["value"], SEARCH);
    assert_no_secret("server log", &s.logs(), ALL);
}

#[test]
fn pattern_least_privilege_default_deny() {
    let s = Server::start(&bundle("least-privilege.yaml"), &[], &env());
    let deploy = agent_token("deploy-bot", "production", &[]);
    let r = resolve(
        &s.url,
        Some(&deploy),
        &json!({"refs": ["prod/deploy/k8s", "prod/admin/root", "prod/other"]}),
    );
    let v = r.json();
    assert_eq!(result(&v, "prod/deploy/k8s")["value"], DEPLOY);
    let admin = result(&v, "prod/admin/root");
    assert_eq!(
        (admin["allowed"].clone(), admin["policy"].clone()),
        (json!(false), json!("never-prod-admin"))
    );
    assert!(
        admin["reason"]
            .as_str()
            .unwrap()
            .contains("never-prod-admin")
    );
    assert_eq!(result(&v, "prod/other")["policy"], "implicit-deny");

    let ops = agent_token("oncall-bot", "staging", &["ops", "sre"]);
    let v = resolve(
        &s.url,
        Some(&ops),
        &json!({"refs": ["staging/db", "prod/deploy/k8s"]}),
    )
    .json();
    assert_eq!(result(&v, "staging/db")["policy"], "ops-team-staging");
    assert_eq!(result(&v, "staging/db")["value"], STAGING);
    assert_eq!(result(&v, "prod/deploy/k8s")["allowed"], false);
    assert_no_secret("server log", &s.logs(), ALL);
}

#[test]
fn pattern_short_lived_payments_through_the_proxy() {
    let dir = TempDir::new("pay");
    let upstream = Upstream::loopback(None, Routes::EchoAuthQuery);
    // The shipped bundle scopes the key to api.stripe.com; the test scopes it to its upstream.
    let text = std::fs::read_to_string(bundle("short-lived-payments.yaml"))
        .unwrap()
        .replace(
            "hosts: [api.stripe.com]",
            "hosts: [127.0.0.1, 169.254.169.254, 10.9.9.9]",
        );
    let b = dir.path("b.yaml");
    std::fs::write(&b, text).unwrap();
    let s = Server::start(
        &b,
        &[
            "--proxy-listen",
            "127.0.0.1:0",
            "--allow-private",
            "127.0.0.1/32",
        ],
        &env(),
    );
    let r = resolve(
        &s.url,
        Some(&agent_token("billing-bot", "production", &[])),
        &json!({"ref": "payments/stripe"}),
    );
    let v = r.json();
    let p = result(&v, "payments/stripe");
    assert_eq!(p["allowed"], true);
    assert_eq!(p["mode"], "short_lived");
    assert_eq!(p["ttl"], 300);
    assert!(
        p.get("value").is_none(),
        "short-lived mode never returns the value"
    );
    let token = p["token"].as_str().unwrap().to_owned();
    assert_eq!(
        p["proxy"].as_str().unwrap(),
        s.proxy_url.as_deref().unwrap()
    );
    assert_no_secret("resolve response", &r.body, ALL);

    // Exchange at the boundary: the upstream gets the real key, the agent never sees it.
    let proxy = s.proxy_url.clone().unwrap();
    let call = |url: &str, tok: &str| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-x", &proxy])
            .args(["-H", &format!("Authorization: Bearer {tok}")])
            .arg(url);
        curl(cmd)
    };
    let up = format!(
        "http://127.0.0.1:{}/v1/charges?amount=100",
        upstream.addr().port()
    );
    let r = call(&up, &token);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(upstream.last().credential(), format!("Bearer {STRIPE}"));
    assert!(
        r.body.contains("auth=[Bearer [redacted by kz]]"),
        "{}",
        r.body
    );
    assert_no_secret("proxied response", &r.body, ALL);

    // A forged token, a metadata address, a private address not allowed: all refused.
    let r = call(&up, &agent_token("billing-bot", "production", &[]));
    assert_eq!(r.status, 401, "{}", r.body);
    let r = call("http://169.254.169.254/latest/meta-data/", &token);
    assert_eq!(
        (r.status, r.json()["error"].as_str().unwrap()),
        (403, "forbidden_address"),
        "{}",
        r.body
    );
    let r = call("http://10.9.9.9/x", &token);
    assert_eq!(
        (r.status, r.json()["error"].as_str().unwrap()),
        (403, "forbidden_address")
    );
    let r = call("http://localhost:9/x", &token);
    assert_eq!(
        (r.status, r.json()["error"].as_str().unwrap()),
        (403, "host_not_in_scope")
    );

    // The billing agent for staging gets nothing.
    let v = resolve(
        &s.url,
        Some(&agent_token("billing-bot", "staging", &[])),
        &json!({"ref": "payments/stripe"}),
    )
    .json();
    assert_eq!(result(&v, "payments/stripe")["allowed"], false);
    assert!(result(&v, "payments/stripe").get("token").is_none());
    assert_no_secret("server log", &s.logs(), ALL);
}

#[test]
fn pattern_audit_records_every_decision_and_verify_catches_tampering() {
    let dir = TempDir::new("audit");
    let log = dir.path("audit.jsonl");
    let text = std::fs::read_to_string(bundle("audit.yaml"))
        .unwrap()
        .replace("/var/log/kz/audit.jsonl", log.to_str().unwrap());
    let b = dir.path("b.yaml");
    std::fs::write(&b, text).unwrap();
    let s = Server::start(&b, &[], &env());
    let good = agent_token("analytics-bot", "production", &[]);
    let v = resolve(
        &s.url,
        Some(&good),
        &json!({"refs": ["data/warehouse/main", "data/lake/raw"]}),
    )
    .json();
    assert_eq!(result(&v, "data/warehouse/main")["value"], WAREHOUSE);
    resolve(
        &s.url,
        Some(&agent_token("intruder", "production", &[])),
        &json!({"ref": "data/warehouse/main"}),
    );
    resolve(
        &s.url,
        Some("garbage.token.here"),
        &json!({"ref": "data/warehouse/main"}),
    );
    for i in 0..4 {
        resolve(
            &s.url,
            Some(&good),
            &json!({"ref": format!("data/warehouse/t{i}")}),
        );
    }
    drop(s);

    let audit = std::fs::read_to_string(&log).unwrap();
    assert_no_secret("audit log", &audit, ALL);
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 8, "{audit}");
    let first = &records[0];
    assert_eq!(first["kind"], "decision");
    assert_eq!(first["service"], "analytics-bot");
    assert_eq!(first["actor"], "analytics-bot-7f3a");
    assert_eq!(first["policy"], "analytics-reads-warehouse");
    assert_eq!(first["outcome"], "resolved");
    assert_eq!(first["mode"], "direct");
    assert_eq!(first["resolver"], "env");
    assert!(
        first["latency_us"].is_u64()
            && first["request_id"].is_string()
            && first["time"].is_string()
    );
    assert_eq!(records[1]["outcome"], "denied");
    assert_eq!(records[1]["policy"], "implicit-deny");
    assert_eq!(records[2]["service"], "intruder");
    assert_eq!(records[3]["kind"], "token_rejected");
    assert_eq!(records[3]["reason"], "malformed_token");

    let verify = |path: &Path| {
        let out = kz().args(["audit", "verify"]).arg(path).output().unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit log OK: 8 records"), "{out}");

    let lines: Vec<&str> = audit.lines().collect();
    let write = |name: &str, ls: Vec<String>| {
        let p = dir.path(name);
        std::fs::write(&p, ls.join("\n") + "\n").unwrap();
        p
    };
    let owned = |ls: &[&str]| ls.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let mut edited = owned(&lines);
    edited[2] = edited[2].replace("\"outcome\":\"denied\"", "\"outcome\":\"resolved\"");
    assert_ne!(edited[2], lines[2]);
    let (code, out) = verify(&write("edited.jsonl", edited));
    assert_eq!(code, 1);
    assert!(
        out.contains("edited.jsonl:3: record seq 2 was edited"),
        "{out}"
    );

    let mut deleted = owned(&lines);
    deleted.remove(4);
    let (code, out) = verify(&write("deleted.jsonl", deleted));
    assert_eq!(code, 1);
    assert!(
        out.contains(
            "deleted.jsonl:5: records are missing before this one (expected seq 4, found 5)"
        ),
        "{out}"
    );

    let mut reordered = owned(&lines);
    reordered.swap(5, 6);
    let (code, out) = verify(&write("reordered.jsonl", reordered));
    assert_eq!(code, 1);
    assert!(
        out.contains("reordered.jsonl:6: records are out of order (expected seq 5, found 6)"),
        "{out}"
    );

    // Rewriting a record AND its hash still breaks the link to the next one.
    let mut forged = owned(&lines);
    let mut rec: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&forged[1]).unwrap();
    rec.insert("outcome".into(), json!("resolved"));
    rec.insert("hash".into(), json!("00".repeat(32)));
    forged[1] = serde_json::Value::Object(rec).to_string();
    let (code, out) = verify(&write("forged.jsonl", forged));
    assert_eq!(code, 1);
    assert!(
        out.contains("forged.jsonl:2: record seq 1 was edited"),
        "{out}"
    );
}

#[test]
fn pattern_ci_batch_with_context() {
    let s = Server::start(&bundle("ci-github-actions.yaml"), &[], &env());
    let claims = |branch: &str| {
        json!({"iss": "https://token.actions.githubusercontent.com", "aud": "kz", "iat": now(), "exp": now() + 300,
               "repository_owner": "acme", "repository": "acme/api", "ref": branch, "workflow": "deploy", "actor": "octocat"})
    };
    let main = mint(
        "ci-rs256.key",
        Algorithm::RS256,
        Some("gh-1"),
        &claims("refs/heads/main"),
    );
    let v = resolve(
        &s.url,
        Some(&main),
        &json!({"refs": ["ci/deploy/prod", "ci/npm-token"], "context": {"reason": "deploy"}}),
    )
    .json();
    assert_eq!(result(&v, "ci/deploy/prod")["value"], DEPLOY);
    assert_eq!(result(&v, "ci/npm-token")["value"], NPM);
    // Without the context the deploy rule errors on the missing key: denied, with the reason.
    let v = resolve(&s.url, Some(&main), &json!({"refs": ["ci/deploy/prod"]})).json();
    let d = result(&v, "ci/deploy/prod");
    assert_eq!(
        (d["allowed"].clone(), d["policy"].clone()),
        (json!(false), json!("main-branch-deploys"))
    );
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("no such key `reason`"),
        "{d}"
    );
    let feature = mint(
        "ci-rs256.key",
        Algorithm::RS256,
        Some("gh-1"),
        &claims("refs/heads/feature"),
    );
    let v = resolve(
        &s.url,
        Some(&feature),
        &json!({"refs": ["ci/deploy/prod", "ci/npm-token"], "context": {"reason": "deploy"}}),
    )
    .json();
    assert_eq!(result(&v, "ci/deploy/prod")["allowed"], false);
    assert_eq!(result(&v, "ci/npm-token")["allowed"], true);
    // KeyZero 0.1's request shape.
    let v = resolve(&s.url, Some(&feature), &json!({"resource": "ci/npm-token"})).json();
    assert_eq!(result(&v, "ci/npm-token")["value"], NPM);
    assert_no_secret("server log", &s.logs(), ALL);
}

#[test]
fn jwt_attack_suite_each_gets_its_own_401() {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let s = Server::start(&bundle("ci-github-actions.yaml"), &[], &env());
    let iss = "https://token.actions.githubusercontent.com";
    let base = json!({"iss": iss, "aud": "kz", "iat": now(), "exp": now() + 300, "repository_owner": "acme"});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let rs = |c: &serde_json::Value| mint("ci-rs256.key", Algorithm::RS256, Some("gh-1"), c);

    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "gh-1"})),
        b64(&base)
    );
    let hs_with_pubkey = {
        let pubkey = std::fs::read(fixture("ci-rs256.pub")).unwrap();
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("gh-1".into());
        jsonwebtoken::encode(&h, &base, &jsonwebtoken::EncodingKey::from_secret(&pubkey)).unwrap()
    };
    let tampered = {
        let t = rs(&base);
        let parts: Vec<&str> = t.split('.').collect();
        format!(
            "{}.{}.{}",
            parts[0],
            b64(&with("repository_owner", json!("evil-corp"))),
            parts[2]
        )
    };
    let unknown_kid = mint("ci-rs256.key", Algorithm::RS256, Some("gh-9"), &base);
    let huge = format!(
        "{}.{}.sig",
        b64(&json!({"alg": "RS256"})),
        "A".repeat(1024 * 1024)
    );

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "alg_none"),
        (
            "HS256 signed with the RSA public key",
            hs_with_pubkey,
            "alg_mismatch",
        ),
        (
            "expired",
            rs(&with("exp", json!(now() - 3600))),
            "token_expired",
        ),
        (
            "future nbf",
            rs(&with("nbf", json!(now() + 3600))),
            "token_not_yet_valid",
        ),
        (
            "wrong iss",
            rs(&with("iss", json!("https://evil.example"))),
            "unknown_issuer",
        ),
        (
            "wrong aud",
            rs(&with("aud", json!("someone-else"))),
            "wrong_audience",
        ),
        ("unknown kid", unknown_kid, "unknown_kid"),
        ("tampered payload", tampered, "bad_signature"),
        ("1 MiB token", huge, "token_too_large"),
        ("garbage base64", "!!!.@@@.###".into(), "malformed_token"),
        (
            "future iat",
            rs(&with("iat", json!(now() + 3600))),
            "token_issued_in_future",
        ),
        (
            "no exp",
            rs(&{
                let mut c = base.clone();
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
            "missing_claim",
        ),
    ];
    let mut reasons = std::collections::HashSet::new();
    for (name, token, reason) in &cases {
        let r = resolve(&s.url, Some(token), &json!({"ref": "ci/npm-token"}));
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"], "invalid_token", "{name}");
        assert_eq!(v["reason"], *reason, "{name}: {}", r.body);
        assert!(reasons.insert(*reason), "reasons are distinct");
    }
    let r = resolve(&s.url, None, &json!({"ref": "ci/npm-token"}));
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (401, json!("missing_token"))
    );
    // And a good token still works after all that.
    let v = resolve(&s.url, Some(&rs(&base)), &json!({"ref": "ci/npm-token"})).json();
    assert_eq!(result(&v, "ci/npm-token")["value"], NPM);
    let m = get(&format!("{}/metrics", s.url)).body;
    assert!(
        m.contains("kz_tokens_rejected_total{reason=\"alg_none\"} 1"),
        "{m}"
    );
}

#[test]
fn http_errors_and_metrics() {
    let s = Server::start(&bundle("ci-github-actions.yaml"), &[], &env());
    let h = get(&format!("{}/healthz", s.url));
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let tok = mint(
        "ci-rs256.key",
        Algorithm::RS256,
        Some("gh-1"),
        &json!({"iss": "https://token.actions.githubusercontent.com", "aud": "kz", "exp": now() + 300, "repository_owner": "acme"}),
    );
    for bad in [
        "",
        "../etc/passwd",
        "ci/../../x",
        "ci/%2e%2e/x",
        "ci/\u{0}x",
    ] {
        let r = resolve(&s.url, Some(&tok), &json!({"ref": bad}));
        assert_eq!(r.status, 400, "{bad:?}: {}", r.body);
        assert_eq!(r.json()["error"], "invalid_ref", "{bad:?}");
    }
    let big = json!({"refs": vec!["ci/npm-token".to_string(); 8000]});
    let r = resolve(&s.url, Some(&tok), &big);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, json!("payload_too_large"))
    );
    let r = resolve(&s.url, Some(&tok), &json!({"ref": "ci/unknown/ref"}));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["results"]["ci/unknown/ref"]["policy"],
        "implicit-deny"
    );
    resolve(&s.url, Some(&tok), &json!({"ref": "ci/npm-token"}));
    let m = get(&format!("{}/metrics", s.url)).body;
    assert!(
        m.contains("kz_decisions_total{effect=\"allow\",policy=\"any-branch-reads-npm\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("kz_decisions_total{effect=\"deny\",policy=\"implicit-deny\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("kz_resolver_duration_seconds_count{backend=\"env\",outcome=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("kz_http_requests_total{route=\"resolve\",status=\"400\"} 5"),
        "{m}"
    );
    assert_eq!(get(&format!("{}/nope", s.url)).status, 404);
    // HTTP/2 (prior knowledge) is served too, not only HTTP/1.1.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg(format!("{}/healthz", s.url))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
}

#[test]
fn bad_bundles_each_get_their_exact_error() {
    let dir = TempDir::new("bad");
    let good = std::fs::read_to_string(bundle("least-privilege.yaml")).unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "syntax",
            "version: \"1\"\npolicies: [\n".into(),
            vec!["syntax.yaml:3:1: YAML syntax:"],
        ),
        (
            "typos",
            good.replace("    effect: deny", "    efect: deny")
                .replace("version: \"1\"", "version: \"1\"\npolices: []"),
            vec![
                "typos.yaml:4:1: unknown key `polices` in bundle; did you mean `policies`?",
                "unknown key `efect` in bundle.policies[0]; did you mean `effect`?",
                "bundle.policies[0] is missing the required key `effect`",
            ],
        ),
        (
            "cel",
            good.replace(
                "rule: ref.matches('prod/admin/**')",
                "rule: ref.matches('prod/admin/**') &&",
            ),
            vec!["policy `never-prod-admin`: the CEL rule does not compile"],
        ),
        (
            "glob",
            good.replace("ref: prod/deploy/**", "ref: prod/deploy**"),
            vec!["glob 'prod/deploy**': '**' must be a whole path segment"],
        ),
        (
            "backend",
            good.replace(
                "resolver: env\n    path: KZ_DEMO_ADMIN_TOKEN",
                "resolver: vault\n    path: KZ_DEMO_ADMIN_TOKEN",
            ),
            vec![
                "resource `prod/admin/**` uses resolver `vault`, which is not a backend; define it under `backends:`",
            ],
        ),
        (
            "key",
            good.replace("alg: ES256", "alg: RS256"),
            vec!["issuer `agent-idp` key `agents-2026`: `pem` is not an RSA public key"],
        ),
        (
            "mode",
            good.replace(
                "    path: KZ_DEMO_STAGING_TOKEN",
                "    path: KZ_DEMO_STAGING_TOKEN\n    mode: short_live",
            ),
            vec![
                "bundle.resources[2].mode: `short_live` is not one of direct, short_lived; did you mean `short_lived`?",
            ],
        ),
    ];
    for (name, text, expected) in cases {
        let p = dir.path(&format!("{name}.yaml"));
        std::fs::write(&p, &text).unwrap();
        let out = kz()
            .args(["server", "check", "--bundle"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        for e in expected {
            assert!(err.contains(e), "{name}: expected `{e}` in:\n{err}");
        }
        // Every problem line carries file:line:col.
        for line in err.lines().skip(1) {
            let rest = line
                .trim()
                .strip_prefix(p.to_str().unwrap())
                .unwrap_or_else(|| panic!("{name}: {line}"));
            let mut parts = rest.splitn(4, ':');
            parts.next();
            assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
            assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
        }
    }
}

#[test]
fn reload_on_file_change_and_sighup_refuses_invalid_bundles() {
    let dir = TempDir::new("reload");
    let b = dir.path("b.yaml");
    let original = std::fs::read_to_string(bundle("per-agent-identity.yaml")).unwrap();
    std::fs::write(&b, &original).unwrap();
    let s = Server::start(&b, &[], &env());
    let tok = agent_token("support-bot", "staging", &[]);
    let ask = || {
        resolve(&s.url, Some(&tok), &json!({"ref": "support/zendesk"})).json()["results"]["support/zendesk"]["allowed"].clone()
    };
    assert_eq!(ask(), true);

    // A valid change (deny everything for the support bot first) is picked up.
    let denying = original.replace(
        "policies:\n",
        "policies:\n  - name: freeze\n    rule: service == 'support-bot'\n    effect: deny\n",
    );
    std::fs::write(&b, &denying).unwrap();
    s.wait_log(|l| l.contains("bundle reloaded (file change)"));
    assert_eq!(ask(), false);

    // An invalid bundle is refused; the previous one keeps serving.
    std::fs::write(&b, denying.replace("effect: deny", "effect: maybe")).unwrap();
    s.wait_log(|l| l.contains("bundle reload refused (file change)"));
    assert!(s.logs().contains("`maybe` is not one of allow, deny"));
    assert_eq!(ask(), false);

    // SIGHUP reloads too (file fixed back to the original meanwhile).
    std::fs::write(&b, &original).unwrap();
    s.wait_log(|l| l.matches("bundle reloaded").count() >= 2);
    let st = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    s.wait_log(|l| l.contains("bundle reloaded (SIGHUP)"));
    assert_eq!(ask(), true);
    let m = get(&format!("{}/metrics", s.url)).body;
    assert!(
        m.contains("kz_bundle_reloads_total{outcome=\"refused\"} 1"),
        "{m}"
    );
}

#[test]
fn jwks_cache_refresh_on_unknown_kid_is_rate_limited_and_serves_stale_on_error() {
    let dir = TempDir::new("jwks");
    let jwk_a = ec_jwk("agent-es256.key", "a");
    let jwk_b = ec_jwk("kz-signing.key", "b");
    let jwks = Upstream::loopback(
        None,
        Routes::fixed(200, &json!({"keys": [jwk_a]}).to_string()),
    );
    let b = dir.path("b.yaml");
    std::fs::write(
        &b,
        format!(
            r#"version: "1"
issuers:
  - name: dyn
    issuer_url: https://dyn.example
    jwks_url: http://{}/.well-known/jwks.json
    jwks_refresh_seconds: 2
    jwks_cache_seconds: 4
    map:
      service: claims.agent_name
policies:
  - name: bot
    rule: service == 'bot'
    effect: allow
resources:
  - ref: "x/**"
    resolver: env
    path: KZ_DEMO_NPM_TOKEN
"#,
            jwks.addr()
        ),
    )
    .unwrap();
    let s = Server::start(&b, &[], &env());
    let claims = json!({"iss": "https://dyn.example", "exp": now() + 600, "agent_name": "bot"});
    let tok = |key: &str, kid: &str| mint(key, Algorithm::ES256, Some(kid), &claims);
    let ask = |t: &str| resolve(&s.url, Some(t), &json!({"ref": "x/y"}));

    let r = ask(&tok("agent-es256.key", "a"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["results"]["x/y"]["value"], NPM);
    assert_eq!(jwks.seen().len(), 1);

    // Unknown kids right after a fetch do not hammer the JWKS endpoint.
    for _ in 0..5 {
        let r = ask(&tok("kz-signing.key", "b"));
        assert_eq!(
            (r.status, r.json()["reason"].clone()),
            (401, json!("unknown_kid"))
        );
    }
    assert_eq!(jwks.seen().len(), 1, "refreshes are rate limited");

    // Key rotation: once the rate limit allows, an unknown kid triggers one refresh.
    jwks.set_reply(200, &json!({"keys": [jwk_a, jwk_b]}).to_string());
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = ask(&tok("kz-signing.key", "b"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(jwks.seen().len(), 2);

    // The endpoint fails after the cache expired: the cached keys keep serving.
    jwks.set_reply(500, "down");
    std::thread::sleep(std::time::Duration::from_millis(4100));
    let r = ask(&tok("agent-es256.key", "a"));
    assert_eq!(r.status, 200, "stale-while-error: {}", r.body);
    assert!(jwks.seen().len() >= 3, "a refresh was attempted");
    s.wait_log(|l| l.contains("JWKS refresh failed; serving the cached keys"));
    // A token signed by a key the JWKS never had, under a known kid: bad signature.
    let forged = mint("ci-rs256.key", Algorithm::RS256, Some("a"), &claims);
    let r = ask(&forged);
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (401, json!("alg_mismatch"))
    );
    assert_no_secret("server log", &s.logs(), ALL);
}

#[test]
fn audit_rotation_keeps_one_chain_and_stdout_sink_chains_too() {
    let dir = TempDir::new("rot");
    let log = dir.path("audit.jsonl");
    let text = std::fs::read_to_string(bundle("audit.yaml"))
        .unwrap()
        .replace("/var/log/kz/audit.jsonl", log.to_str().unwrap())
        .replace("max_bytes: 104857600", "max_bytes: 2000\n  stdout: true");
    let b = dir.path("b.yaml");
    std::fs::write(&b, text).unwrap();
    let tok = agent_token("analytics-bot", "production", &[]);
    {
        let s = Server::start(&b, &[], &env());
        for i in 0..12 {
            resolve(
                &s.url,
                Some(&tok),
                &json!({"ref": format!("data/warehouse/t{i}")}),
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.stdout.lock().unwrap().lines().count() < 12 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = s.stdout.lock().unwrap().clone();
        assert_no_secret("audit on stdout", &out, ALL);
        let stdout_log = dir.path("stdout.jsonl");
        std::fs::write(&stdout_log, &out).unwrap();
        let v = kz()
            .args(["audit", "verify"])
            .arg(&stdout_log)
            .output()
            .unwrap();
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        assert!(String::from_utf8_lossy(&v.stdout).contains("12 records"));
    }
    // A restarted server continues the chain where the files left off.
    {
        let s = Server::start(&b, &[], &env());
        resolve(
            &s.url,
            Some(&tok),
            &json!({"ref": "data/warehouse/after-restart"}),
        );
    }
    let rotated: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl."))
        .collect();
    assert!(rotated.len() >= 2, "size rotation produced several files");
    let v = kz().args(["audit", "verify"]).arg(&log).output().unwrap();
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(out.contains("audit log OK: 13 records"), "{out}");
    for f in std::fs::read_dir(&dir.0).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("audit.jsonl")
        {
            assert_no_secret(
                "rotated audit file",
                &std::fs::read_to_string(&p).unwrap(),
                ALL,
            );
        }
    }
    // Removing the oldest rotated file is detected (the chain no longer starts at seq 0).
    std::fs::remove_file(dir.path("audit.jsonl.1")).unwrap();
    let v = kz().args(["audit", "verify"]).arg(&log).output().unwrap();
    assert_eq!(v.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&v.stderr)
            .contains("records are missing before this one (expected seq 0")
    );
}

#[test]
fn keyzero_style_separate_proxy_with_rs256_tokens_and_query_injection() {
    let dir = TempDir::new("sep");
    let upstream = Upstream::loopback(None, Routes::EchoAuthQuery);
    let text = std::fs::read_to_string(bundle("short-lived-payments.yaml"))
        .unwrap()
        .replace("hosts: [api.stripe.com]", "hosts: [127.0.0.1]")
        .replace(
            "    rule: service == 'billing-bot' && env == 'production' && ref == 'payments/stripe'",
            "    rule: service == 'billing-bot' && env == 'production' && ref.matches('payments/*')",
        )
        + "  - ref: payments/maps\n    resolver: env\n    path: KZ_DEMO_SEARCH_KEY\n    mode: short_lived\n    ttl: 60\n    credential_location: query:key\n    hosts: [127.0.0.1]\n";
    let b = dir.path("b.yaml");
    std::fs::write(&b, text).unwrap();
    let key = fixture("ci-rs256.key");
    let pdp = Server::start(&b, &["--signing-key", key.to_str().unwrap()], &env());
    let pubkey = fixture("ci-rs256.pub");
    let proxy = Server::start(
        &b,
        &[
            "--proxy",
            "--public-key",
            pubkey.to_str().unwrap(),
            "--allow-private",
            "127.0.0.1/32",
        ],
        &env(),
    );
    let v = resolve(
        &pdp.url,
        Some(&agent_token("billing-bot", "production", &[])),
        &json!({"refs": ["payments/stripe", "payments/maps"]}),
    )
    .json();
    let stripe_tok = result(&v, "payments/stripe")["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let maps_tok = result(&v, "payments/maps")["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // KeyZero compatibility: RS256, iss keyzero, aud keyzero-proxy.
    let header = jsonwebtoken::decode_header(&stripe_tok).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    let call = |tok: &str, path: &str| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-x", &proxy.url])
            .args(["-H", &format!("Authorization: Bearer {tok}")])
            .arg(format!("http://127.0.0.1:{}{path}", upstream.addr().port()));
        curl(cmd)
    };
    let r = call(&stripe_tok, "/v1/charges");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(upstream.last().credential(), format!("Bearer {STRIPE}"));
    let r = call(&maps_tok, "/geo?q=x");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(upstream.last().query(), format!("q=x&key={SEARCH}"));
    assert!(
        r.body.contains("query=[q=x&key=[redacted by kz]]"),
        "{}",
        r.body
    );
    // A kz token signed by another key (the in-memory one of a different PDP) is refused.
    let other = Server::start(&b, &[], &env());
    let v = resolve(
        &other.url,
        Some(&agent_token("billing-bot", "production", &[])),
        &json!({"ref": "payments/stripe"}),
    )
    .json();
    let foreign = result(&v, "payments/stripe")["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = call(&foreign, "/v1/charges");
    assert_eq!(r.status, 401, "{}", r.body);
    for s in [&pdp, &proxy, &other] {
        assert_no_secret("server log", &s.logs(), ALL);
    }
}

#[test]
fn proxy_verifies_upstream_tls_against_the_configured_ca() {
    let dir = TempDir::new("tls");
    // HTTPS on 127.0.0.1 with a certificate for `localhost` from a fresh test CA.
    let upstream_ca = TestCa::new("kz pdp upstream CA");
    let ca_pem = upstream_ca.write_pem(&dir.0, "upstream-ca.pem");
    let cert = upstream_ca.server_cert(&["localhost"], &[]);
    let upstream = Upstream::loopback(
        Some(tls::server_config_alpn(&cert, tls::H1)),
        Routes::fixed(200, "tls upstream ok"),
    );
    let text = std::fs::read_to_string(bundle("short-lived-payments.yaml"))
        .unwrap()
        .replace("hosts: [api.stripe.com]", "hosts: [localhost]");
    let b = dir.path("b.yaml");
    std::fs::write(&b, text).unwrap();
    let ca = ca_pem.to_str().unwrap().to_owned();
    let trusting = Server::start(
        &b,
        &[
            "--proxy-listen",
            "127.0.0.1:0",
            "--allow-private",
            "127.0.0.1/32",
            "--upstream-ca",
            &ca,
        ],
        &env(),
    );
    let untrusting = Server::start(
        &b,
        &[
            "--proxy-listen",
            "127.0.0.1:0",
            "--allow-private",
            "127.0.0.1/32",
        ],
        &env(),
    );
    let call = |s: &Server| {
        let v = resolve(
            &s.url,
            Some(&agent_token("billing-bot", "production", &[])),
            &json!({"ref": "payments/stripe"}),
        )
        .json();
        let tok = result(&v, "payments/stripe")["token"]
            .as_str()
            .unwrap()
            .to_owned();
        // Reverse-proxy style (KeyZero's): the Host header names the upstream, reached over TLS.
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
            .args(["-H", &format!("Host: localhost:{}", upstream.addr().port())])
            .args(["-H", &format!("Authorization: Bearer {tok}")])
            .arg(format!("{}/v1/charges", s.proxy_url.as_deref().unwrap()));
        curl(cmd)
    };
    let r = call(&trusting);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "tls upstream ok");
    assert_eq!(
        upstream.last().header("authorization").unwrap_or_default(),
        format!("Bearer {STRIPE}")
    );
    let before = upstream.seen().len();
    let r = call(&untrusting);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (502, json!("upstream_error")),
        "{}",
        r.body
    );
    assert!(r.body.contains("TLS"), "{}", r.body);
    assert_eq!(
        upstream.seen().len(),
        before,
        "nothing reached an unverified upstream"
    );
    for s in [&trusting, &untrusting] {
        assert_no_secret("server log", &s.logs(), ALL);
    }
}
