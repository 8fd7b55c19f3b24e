//! Verifier unit tests with real keys (tests/fixtures/keys). The HTTP-level attack suite is in
//! tests/pdp.rs.

use super::*;
use crate::bundle::{Issuer, IssuerType, StaticKey};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../tests/fixtures/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn issuer(kind: IssuerType, keys: Vec<StaticKey>, map: &[(&str, &str)]) -> Issuer {
    Issuer {
        name: "test".into(),
        issuer_type: kind,
        issuer_url: "https://iss.example".into(),
        jwks_url: None,
        audience: None,
        static_keys: keys,
        map: map
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        leeway_seconds: None,
        jwks_refresh_seconds: None,
        jwks_cache_seconds: None,
    }
}

fn key(kid: &str, alg: &str, pem: Option<String>, secret: Option<&str>) -> StaticKey {
    StaticKey {
        kid: kid.into(),
        alg: alg.into(),
        pem,
        secret: secret.map(str::to_owned),
        secret_env: None,
    }
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c =
        json!({"iss": "https://iss.example", "exp": jsonwebtoken::get_current_timestamp() + 60});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sign(alg: Algorithm, kid: Option<&str>, enc: &EncodingKey, c: &serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, c, enc).unwrap()
}

async fn verify(iss: Issuer, token: &str) -> Result<Identity, TokenError> {
    Verifier::build(&[iss], 16 * 1024)
        .map_err(|_| ())
        .unwrap()
        .verify(token)
        .await
}

#[tokio::test]
async fn every_asymmetric_family_verifies_with_its_pinned_alg() {
    let cases = [
        ("agent-ed25519", "EdDSA", Algorithm::EdDSA),
        ("agent-es384", "ES384", Algorithm::ES384),
        ("agent-es256", "ES256", Algorithm::ES256),
        ("ci-rs256", "PS256", Algorithm::PS256),
        ("ci-rs256", "RS512", Algorithm::RS512),
    ];
    for (file, alg_name, alg) in cases {
        let priv_pem = fixture(&format!("{file}.key"));
        let enc = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(priv_pem.as_bytes()).unwrap(),
            Algorithm::ES256 | Algorithm::ES384 => {
                EncodingKey::from_ec_pem(priv_pem.as_bytes()).unwrap()
            }
            _ => EncodingKey::from_rsa_pem(priv_pem.as_bytes()).unwrap(),
        };
        let iss = issuer(
            IssuerType::Custom,
            vec![key(
                "k",
                alg_name,
                Some(fixture(&format!("{file}.pub"))),
                None,
            )],
            &[("service", "svc")],
        );
        let t = sign(alg, Some("k"), &enc, &claims(json!({"svc": "billing"})));
        let id = verify(iss.clone(), &t)
            .await
            .unwrap_or_else(|e| panic!("{alg_name}: {e}"));
        assert_eq!(id.service, "billing", "{alg_name}");
        // No kid and a single key: that key, still pinned.
        let t = sign(alg, None, &enc, &claims(json!({})));
        assert!(verify(iss, &t).await.is_ok(), "{alg_name} without kid");
    }
}

#[tokio::test]
async fn hmac_needs_an_explicit_long_secret() {
    let secret = "0123456789abcdef0123456789abcdef-shared";
    let iss = issuer(
        IssuerType::Custom,
        vec![key("h", "HS256", None, Some(secret))],
        &[],
    );
    let t = sign(
        Algorithm::HS256,
        Some("h"),
        &EncodingKey::from_secret(secret.as_bytes()),
        &claims(json!({})),
    );
    assert!(verify(iss.clone(), &t).await.is_ok());
    let wrong = sign(
        Algorithm::HS256,
        Some("h"),
        &EncodingKey::from_secret(b"another-secret-of-32-bytes-or-more!!"),
        &claims(json!({})),
    );
    assert_eq!(
        verify(iss, &wrong).await.unwrap_err(),
        TokenError::BadSignature
    );

    let short = issuer(
        IssuerType::Custom,
        vec![key("h", "HS256", None, Some("short"))],
        &[],
    );
    let err = Verifier::build(&[short], 1024).unwrap_err();
    assert!(err[0].1.to_string().contains("at least 32 bytes"));
}

#[tokio::test]
async fn private_key_in_a_bundle_is_refused() {
    let iss = issuer(
        IssuerType::Custom,
        vec![key("k", "ES256", Some(fixture("agent-es256.key")), None)],
        &[],
    );
    let err = Verifier::build(&[iss], 1024).unwrap_err();
    assert!(err[0].1.to_string().contains("PRIVATE key"), "{}", err[0].1);
}

#[tokio::test]
async fn profiles_and_cel_mappings() {
    let enc = EncodingKey::from_ec_pem(fixture("agent-es256.key").as_bytes()).unwrap();
    let gh = issuer(
        IssuerType::GithubActions,
        vec![key("k", "ES256", Some(fixture("agent-es256.pub")), None)],
        &[
            ("env", "claims.environment + '-' + claims.region"),
            ("groups", "teams"),
        ],
    );
    let t = sign(
        Algorithm::ES256,
        Some("k"),
        &enc,
        &claims(
            json!({"repository_owner": "acme", "repository": "acme/api", "ref": "refs/heads/main",
                       "workflow": "ci", "actor": "octo", "environment": "prod", "region": "eu",
                       "teams": ["a", "b"]}),
        ),
    );
    let id = verify(gh, &t).await.unwrap();
    assert_eq!(
        (
            id.org.as_str(),
            id.service.as_str(),
            id.branch.as_str(),
            id.action.as_str(),
            id.actor.as_str(),
            id.env.as_str()
        ),
        (
            "acme",
            "acme/api",
            "refs/heads/main",
            "ci",
            "octo",
            "prod-eu"
        )
    );
    assert_eq!(id.groups, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(id.claims["region"], "eu");

    let k8s = issuer(
        IssuerType::Kubernetes,
        vec![key("k", "ES256", Some(fixture("agent-es256.pub")), None)],
        &[],
    );
    let t = sign(
        Algorithm::ES256,
        Some("k"),
        &enc,
        &claims(json!({"namespace": "prod", "serviceaccount": "bot"})),
    );
    let id = verify(k8s, &t).await.unwrap();
    assert_eq!((id.org.as_str(), id.service.as_str()), ("prod", "bot"));
}

#[tokio::test]
async fn leeway_applies_to_exp() {
    let enc = EncodingKey::from_ec_pem(fixture("agent-es256.key").as_bytes()).unwrap();
    let mut iss = issuer(
        IssuerType::Custom,
        vec![key("k", "ES256", Some(fixture("agent-es256.pub")), None)],
        &[],
    );
    let now = jsonwebtoken::get_current_timestamp();
    let t = sign(
        Algorithm::ES256,
        Some("k"),
        &enc,
        &json!({"iss": "https://iss.example", "exp": now - 10}),
    );
    assert!(
        verify(iss.clone(), &t).await.is_ok(),
        "within the default 30 s leeway"
    );
    iss.leeway_seconds = Some(0);
    assert_eq!(verify(iss, &t).await.unwrap_err(), TokenError::Expired);
}

#[tokio::test]
async fn cached_verifications_still_expire_and_tampering_misses_the_cache() {
    let enc = EncodingKey::from_ec_pem(fixture("agent-es256.key").as_bytes()).unwrap();
    let mut iss = issuer(
        IssuerType::Custom,
        vec![key("k", "ES256", Some(fixture("agent-es256.pub")), None)],
        &[("service", "svc")],
    );
    iss.leeway_seconds = Some(0);
    let v = Verifier::build(&[iss], 16 * 1024).map_err(|_| ()).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let t = sign(
        Algorithm::ES256,
        Some("k"),
        &enc,
        &json!({"iss": "https://iss.example", "exp": now + 1, "svc": "a"}),
    );
    assert_eq!(v.verify(&t).await.unwrap().service, "a");
    assert_eq!(v.verify(&t).await.unwrap().service, "a", "cache hit");
    // Same signature, edited payload: a different cache key, and a bad signature.
    let parts: Vec<&str> = t.split('.').collect();
    use base64::Engine as _;
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"iss": "https://iss.example", "exp": now + 1, "svc": "admin"}).to_string());
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_eq!(
        v.verify(&forged).await.unwrap_err(),
        TokenError::BadSignature
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        v.verify(&t).await.unwrap_err(),
        TokenError::Expired,
        "expiry re-checked on a hit"
    );
}
