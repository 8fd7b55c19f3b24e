//! Resolvers against real servers the tests start themselves on loopback: an OpenBao dev server
//! (KV v2, KV v1, AppRole, TLS with its own CA) and moto (Secrets Manager, SSM). Plus timeouts,
//! bounded retries, the remote-PDP (`keyzero`) wire contract, and: no value in any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kz_agent::resolve::{self, ResolveError, Resolver, SecretRequest};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use support::servers::{Bao, Moto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn settings(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn build(kind: &str, v: Value) -> Arc<dyn Resolver> {
    resolve::build(kind, &settings(v)).unwrap()
}

async fn get(
    r: &Arc<dyn Resolver>,
    reference: &str,
    field: Option<&str>,
) -> Result<String, ResolveError> {
    r.resolve(&SecretRequest::new(reference).with_field(field.map(str::to_owned)))
        .await
        .map(|s| s.expose().to_owned())
}

const V2_KEY: &str = "sk-live-v2-7d1f0c3b9a";
const V2_USER: &str = "svc-user-v2";
const V1_PASS: &str = "pw-v1-55aa21e0";
const APPROLE_VAL: &str = "approle-secret-3c9e";
const AWS_PLAIN: &str = "aws-plain-91b2c7d4";
const AWS_JSON_PW: &str = "aws-json-pw-0f6e2a";
const SSM_VAL: &str = "ssm-param-48d1";

#[tokio::test]
async fn vault_kv2_paths_fields_and_missing() {
    let bao = Bao::start();
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "app",
        &format!("api_key={V2_KEY}"),
        &format!("user={V2_USER}"),
    ]);
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "single",
        &format!("token={V2_KEY}"),
    ]);
    // KeyZero's kind name and settings.
    let r = build(
        "hashicorp",
        json!({"address": bao.addr, "token": bao.root_token}),
    );
    assert_eq!(r.kind(), "hashicorp_vault");

    // kz form (mount detected as KV v2) and KeyZero's full API path form.
    assert_eq!(
        get(&r, "secret/app", Some("api_key")).await.unwrap(),
        V2_KEY
    );
    assert_eq!(
        get(&r, "secret/data/app", Some("user")).await.unwrap(),
        V2_USER
    );
    // No field: one key → its value; several → the JSON object (KeyZero's behaviour).
    assert_eq!(get(&r, "secret/single", None).await.unwrap(), V2_KEY);
    let whole: Value = serde_json::from_str(&get(&r, "secret/app", None).await.unwrap()).unwrap();
    assert_eq!(whole, json!({"api_key": V2_KEY, "user": V2_USER}));

    let err = get(&r, "secret/nope", Some("api_key")).await.unwrap_err();
    assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "hashicorp_vault: secret 'secret/nope' not found"
    );
    let err = get(&r, "secret/app", Some("passwd")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "hashicorp_vault: secret 'secret/app' has no field 'passwd'"
    );
    // Explicit kv_version = 2 works without detection too.
    let r2 = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token, "kv_version": 2}),
    );
    assert_eq!(
        get(&r2, "secret/app", Some("api_key")).await.unwrap(),
        V2_KEY
    );
}

/// `namespace` (X-Vault-Namespace): the same path resolves inside the namespace only.
#[tokio::test]
async fn vault_namespace() {
    let bao = Bao::start();
    bao.cli(&["namespace", "create", "team"]);
    bao.cli(&[
        "secrets",
        "enable",
        "-namespace=team",
        "-path=secret",
        "-version=2",
        "kv",
    ]);
    bao.cli(&[
        "kv",
        "put",
        "-namespace=team",
        "-mount=secret",
        "ns-app",
        &format!("key={V2_KEY}"),
    ]);
    let r = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token, "namespace": "team"}),
    );
    assert_eq!(get(&r, "secret/ns-app", Some("key")).await.unwrap(), V2_KEY);
    let root = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token}),
    );
    let err = get(&root, "secret/ns-app", Some("key")).await.unwrap_err();
    assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn vault_kv1_detected_and_explicit() {
    let bao = Bao::start();
    bao.cli(&["secrets", "enable", "-path=kv1", "-version=1", "kv"]);
    bao.cli(&[
        "kv",
        "put",
        "-mount=kv1",
        "db",
        &format!("password={V1_PASS}"),
    ]);
    let r = build(
        "vault",
        json!({"address": bao.addr, "token": bao.root_token}),
    );
    assert_eq!(get(&r, "kv1/db", Some("password")).await.unwrap(), V1_PASS);
    assert_eq!(get(&r, "kv1/db", None).await.unwrap(), V1_PASS);
    let r1 = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token, "kv_version": 1}),
    );
    assert_eq!(get(&r1, "kv1/db", Some("password")).await.unwrap(), V1_PASS);
    let err = get(&r1, "kv1/missing", None).await.unwrap_err();
    assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn vault_approle_login_and_bad_secret_id() {
    let bao = Bao::start();
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "agent/payments",
        &format!("key={APPROLE_VAL}"),
    ]);
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "other/admin",
        "key=admin-only-value",
    ]);
    bao.cli_stdin(
        &["policy", "write", "agent-read", "-"],
        Some("path \"secret/data/agent/*\" { capabilities = [\"read\"] }\n"),
    );
    bao.cli(&["auth", "enable", "approle"]);
    bao.cli(&[
        "write",
        "auth/approle/role/agent",
        "token_policies=agent-read",
        "token_ttl=10m",
    ]);
    let role_id = bao.cli(&["read", "-field=role_id", "auth/approle/role/agent/role-id"]);
    let secret_id = bao.cli(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/agent/secret-id",
    ]);

    // KeyZero bundles say `auth: {method: approle, role: ..}` → auth_method / auth_role.
    let r = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "auth_method": "approle", "auth_role": role_id, "secret_id": secret_id, "kv_version": 2}),
    );
    assert_eq!(
        get(&r, "secret/agent/payments", Some("key")).await.unwrap(),
        APPROLE_VAL
    );
    // The bundle's nested form `auth: {method, role}` works the same.
    let nested = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "auth": {"method": "approle", "role": role_id}, "secret_id": secret_id}),
    );
    assert_eq!(
        get(&nested, "secret/agent/payments", Some("key"))
            .await
            .unwrap(),
        APPROLE_VAL
    );
    // Least privilege holds: the AppRole token cannot read outside its policy.
    let err = get(&r, "secret/other/admin", Some("key"))
        .await
        .unwrap_err();
    assert!(matches!(err, ResolveError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("permission denied"), "{err}");

    let bad = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "auth_method": "approle", "role_id": role_id, "secret_id": "not-the-secret-id"}),
    );
    let err = get(&bad, "secret/agent/payments", Some("key"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::Unauthorized { .. }), "{msg}");
    assert!(msg.contains("AppRole login"), "{msg}");
    assert!(
        !msg.contains("not-the-secret-id") && !msg.contains(&role_id),
        "{msg}"
    );
}

#[tokio::test]
async fn vault_wrong_token_is_unauthorized_without_echo() {
    let bao = Bao::start();
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "app",
        &format!("api_key={V2_KEY}"),
    ]);
    let r = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": "hvs.wrong-token-value", "kv_version": 2}),
    );
    let err = get(&r, "secret/app", Some("api_key")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::Unauthorized { .. }), "{msg}");
    assert!(
        msg.starts_with("hashicorp_vault: not authorized to read 'secret/app'"),
        "{msg}"
    );
    assert!(
        !msg.contains("wrong-token-value") && !msg.contains(V2_KEY),
        "{msg}"
    );
}

#[tokio::test]
async fn vault_tls_with_custom_ca() {
    let bao = Bao::start_tls();
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "app",
        &format!("api_key={V2_KEY}"),
    ]);
    let ca = bao.ca_cert.clone().unwrap();
    let r = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token, "ca_cert": ca}),
    );
    assert_eq!(
        get(&r, "secret/app", Some("api_key")).await.unwrap(),
        V2_KEY
    );

    // Without the CA the server's certificate is refused, at once (a TLS failure is not retried).
    let untrusted = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token, "retries": 5}),
    );
    let start = Instant::now();
    let err = get(&untrusted, "secret/app", Some("api_key"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot reach") && msg.to_lowercase().contains("certificate"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "TLS failure was retried: {:?} {msg}",
        start.elapsed()
    );
    // A CA file that is not PEM is a configuration error naming the file.
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), "not a certificate").unwrap();
    let err = resolve::build(
        "hashicorp_vault",
        &settings(json!({"address": bao.addr, "token": "t", "ca_cert": junk.path()})),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("holds no certificate"), "{err}");
}

/// A TCP server that accepts and never answers: the resolver must give up after `timeout`.
#[tokio::test]
async fn timeout_is_bounded_and_named() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU32::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    let r = build(
        "hashicorp_vault",
        json!({"address": format!("http://127.0.0.1:{port}"), "token": "t", "kv_version": 2, "timeout": 0.5, "retries": 1}),
    );
    let start = Instant::now();
    let err = get(&r, "secret/app", None).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, ResolveError::Timeout { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "hashicorp_vault: resolving 'secret/app' timed out after 1s"
    );
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "one try plus one retry");
}

/// 503 is transient (retried with backoff up to `retries`), 400 is not (one request).
#[tokio::test]
async fn retries_only_transient_statuses() {
    async fn serve(status: &'static str) -> (u16, Arc<AtomicU32>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicU32::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    loop {
                        let Ok(n) = sock.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        let body = r#"{"errors":["try later"]}"#;
                        let resp = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, hits)
    }
    let (port, hits) = serve("503 Service Unavailable").await;
    let r = build(
        "hashicorp_vault",
        json!({"address": format!("http://127.0.0.1:{port}"), "token": "t", "kv_version": 2, "retries": 3}),
    );
    let err = get(&r, "secret/app", None).await.unwrap_err().to_string();
    assert_eq!(hits.load(Ordering::SeqCst), 4, "{err}");
    assert!(err.contains("503") && err.contains("try later"), "{err}");

    let (port, hits) = serve("400 Bad Request").await;
    let r = build(
        "hashicorp_vault",
        json!({"address": format!("http://127.0.0.1:{port}"), "token": "t", "kv_version": 2, "retries": 3}),
    );
    let err = get(&r, "secret/app", None).await.unwrap_err().to_string();
    assert_eq!(hits.load(Ordering::SeqCst), 1, "{err}");
}

#[tokio::test]
async fn aws_plain_json_field_ssm_and_missing() {
    let moto = Moto::start();
    moto.boto3(&format!(
        "sm.create_secret(Name='app/plain', SecretString='{AWS_PLAIN}')\n\
         sm.create_secret(Name='app/db', SecretString='{{\"username\": \"app\", \"password\": \"{AWS_JSON_PW}\", \"port\": 5432}}')\n\
         ssm.put_parameter(Name='/app/flag', Value='{SSM_VAL}', Type='SecureString')"
    ));
    // KeyZero's kind name and settings (`endpoint_url`); explicit test credentials.
    let r = build(
        "aws",
        json!({"region": "us-east-1", "endpoint_url": moto.endpoint, "access_key_id": "testing", "secret_access_key": "testing"}),
    );
    assert_eq!(r.kind(), "aws_secrets_manager");
    assert_eq!(get(&r, "sm://app/plain", None).await.unwrap(), AWS_PLAIN);
    assert_eq!(get(&r, "app/plain", None).await.unwrap(), AWS_PLAIN);
    assert_eq!(
        get(&r, "sm://app/db", Some("password")).await.unwrap(),
        AWS_JSON_PW
    );
    assert_eq!(get(&r, "sm://app/db", Some("port")).await.unwrap(), "5432");
    assert_eq!(get(&r, "ssm:///app/flag", None).await.unwrap(), SSM_VAL);
    // Bundles pass `secret_id` as a request parameter; it wins over the reference.
    let req = SecretRequest::new("payments").with_param("secret_id", "app/plain");
    assert_eq!(r.resolve(&req).await.unwrap().expose(), AWS_PLAIN);

    let err = get(&r, "sm://app/none", None).await.unwrap_err();
    assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
    let err = get(&r, "sm://app/db", Some("nope")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "aws_secrets_manager: secret 'sm://app/db' has no field 'nope'"
    );
    let err = get(&r, "sm://app/plain", Some("password"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a JSON object") && !err.contains(AWS_PLAIN),
        "{err}"
    );
    let err = get(&r, "ssm:///app/none", None).await.unwrap_err();
    assert!(matches!(err, ResolveError::NotFound { .. }), "{err}");
}

/// The remote-PDP wire contract (`POST /v1/resolve`, KeyZero 0.3 shape) against a minimal
/// loopback HTTP server speaking it: the bearer token is sent, `value`/`token` are returned,
/// a denial carries the policy's reason, 401 is Unauthorized.
#[tokio::test]
async fn keyzero_remote_pdp_contract() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let head = text[..i].to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + len {
                            break (head, text[i + 4..i + 4 + len].to_owned());
                        }
                    }
                };
                let req: Value = serde_json::from_str(&body).unwrap();
                let r = req["ref"].as_str().unwrap_or_default().to_owned();
                let (status, answer) = if !head.contains("authorization: bearer agent-jwt-1") {
                    (
                        "401 Unauthorized",
                        json!({"error": "invalid_token", "reason": "signature mismatch"}),
                    )
                } else {
                    let result = match r.as_str() {
                        "secret/api" => {
                            json!({"allowed": true, "policy": "agents-read", "mode": "direct", "value": V2_KEY})
                        }
                        "secret/pay" => {
                            json!({"allowed": true, "policy": "pay", "mode": "short_lived", "token": "kz-short-lived-token", "ttl": 300})
                        }
                        _ => {
                            json!({"allowed": false, "policy": "implicit-deny", "reason": "no policy matched"})
                        }
                    };
                    ("200 OK", json!({"results": {r: result}}))
                };
                let body = answer.to_string();
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    let r = build(
        "keyzero",
        json!({"endpoint": endpoint, "token": "agent-jwt-1"}),
    );
    assert_eq!(get(&r, "secret/api", None).await.unwrap(), V2_KEY);
    assert_eq!(
        get(&r, "secret/pay", None).await.unwrap(),
        "kz-short-lived-token"
    );
    let err = get(&r, "secret/admin", None).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "keyzero: access to 'secret/admin' denied: no policy matched"
    );
    let bad = build("keyzero", json!({"endpoint": endpoint, "token": "forged"}));
    let err = get(&bad, "secret/api", None).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ResolveError::Unauthorized { .. }), "{msg}");
    assert!(
        msg.contains("invalid_token: signature mismatch") && !msg.contains("forged"),
        "{msg}"
    );
    // Plain http to a non-loopback host is refused at build time (the token would travel in clear).
    let err = resolve::build(
        "keyzero",
        &settings(json!({"endpoint": "http://pdp.example"})),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("must use https://"), "{err}");
}

/// Every failure mode above, collected: no error string carries a secret value or credential.
#[tokio::test]
async fn no_value_in_any_error() {
    let bao = Bao::start();
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "app",
        &format!("api_key={V2_KEY}"),
        &format!("user={V2_USER}"),
    ]);
    let moto = Moto::start();
    moto.boto3(&format!(
        "sm.create_secret(Name='plain', SecretString='{AWS_PLAIN}')\n\
         sm.create_secret(Name='db', SecretString='{{\"password\": \"{AWS_JSON_PW}\"}}')"
    ));
    let vault = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": bao.root_token}),
    );
    let vault_bad = build(
        "hashicorp_vault",
        json!({"address": bao.addr, "token": "tok-should-not-leak"}),
    );
    let aws = build(
        "aws_secrets_manager",
        json!({"region": "us-east-1", "endpoint": moto.endpoint, "access_key_id": "AKIATEST", "secret_access_key": "aws-secret-key-should-not-leak"}),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k"), AWS_PLAIN).unwrap();
    std::fs::write(dir.path().join(".env"), format!("A={V2_KEY}\n")).unwrap();
    let file = build("file", json!({"path": dir.path()}));
    let env_file = build("env_file", json!({"path": dir.path().join(".env")}));

    let mut errors = Vec::new();
    for (r, reference, field) in [
        (&vault, "secret/app", Some("missing")),
        (&vault, "secret/nope", None),
        (&vault, "secret/../sys/raw", None),
        (&vault_bad, "secret/app", Some("api_key")),
        (&aws, "plain", Some("x")),
        (&aws, "db", Some("missing")),
        (&aws, "none", None),
        (&file, "k", Some("x")),
        (&file, "../k", None),
        (&env_file, "B", None),
    ] {
        let err = get(r, reference, field).await.unwrap_err();
        errors.push(format!("{err} | {err:?}"));
    }
    for bad in [
        json!({"address": bao.addr, "token": 5}),
        json!({"address": bao.addr, "auth_method": "kerberos", "token": "tok-should-not-leak"}),
        json!({"address": bao.addr, "token": "tok-should-not-leak", "tokn": "x"}),
    ] {
        errors.push(
            resolve::build("hashicorp_vault", &settings(bad))
                .unwrap_err()
                .to_string(),
        );
    }
    assert_eq!(errors.len(), 13);
    for e in &errors {
        for v in [
            V2_KEY,
            V2_USER,
            AWS_PLAIN,
            AWS_JSON_PW,
            "tok-should-not-leak",
            "aws-secret-key-should-not-leak",
            bao.root_token.as_str(),
        ] {
            assert!(!e.contains(v), "error leaks a value: {e}");
        }
        assert!(
            ["hashicorp_vault", "aws_secrets_manager", "file", "env_file"]
                .iter()
                .any(|b| e.contains(b)),
            "error does not name its backend: {e}"
        );
    }
}
