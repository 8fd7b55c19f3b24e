//! JWT verification (`identity::Verifier`): header and claims decoding, algorithm pinning, the
//! registered-claim checks and the claim mapping (plain claims and CEL) into an identity.
//!
//! Two inputs per run: the bytes as a token (what any caller can send: must be refused without
//! a panic; without the key it never verifies), and the bytes as a claims object signed with the
//! issuer's key (what a compromised or odd issuer could send: decoding and mapping of arbitrary
//! claims must not panic).

#![no_main]

use std::sync::OnceLock;

use kz_agent::bundle::{Issuer, IssuerType, StaticKey};
use kz_agent::identity::Verifier;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-hs256-secret-of-32-bytes!!!";
const ISS: &str = "https://iss.example";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let issuer = Issuer {
            name: "fuzz".into(),
            issuer_type: IssuerType::GithubActions,
            issuer_url: ISS.into(),
            jwks_url: None,
            audience: None,
            static_keys: vec![StaticKey {
                kid: "k1".into(),
                alg: "HS256".into(),
                pem: None,
                secret: Some(SECRET.into()),
                secret_env: None,
            }],
            map: [
                ("groups".to_owned(), "claims.groups".to_owned()),
                (
                    "actor".to_owned(),
                    "claims.actor + '@' + claims.sub".to_owned(),
                ),
            ]
            .into_iter()
            .collect(),
            leeway_seconds: None,
            jwks_refresh_seconds: None,
            jwks_cache_seconds: None,
        };
        match Verifier::build(&[issuer], 16 * 1024) {
            Ok(v) => v,
            Err(e) => panic!("the fuzz issuer does not build: {:?}", e.len()),
        }
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let v = verifier();
    let rt = runtime();
    // As a token: nobody without the key gets an identity.
    assert!(
        rt.block_on(v.verify(text)).is_err(),
        "an unsigned token verified"
    );
    // As claims, signed with the issuer's key.
    let Ok(serde_json::Value::Object(mut claims)) = serde_json::from_str(text) else {
        return;
    };
    claims.insert("iss".into(), ISS.into());
    if !claims.contains_key("exp") {
        claims.insert(
            "exp".into(),
            (jsonwebtoken::get_current_timestamp() + 600).into(),
        );
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let Ok(token) = jsonwebtoken::encode(&header, &claims, &key) else {
        return;
    };
    let first = rt
        .block_on(v.verify(&token))
        .map(|id| id.subject().to_owned());
    // The second answer comes from the cache and must agree.
    let second = rt
        .block_on(v.verify(&token))
        .map(|id| id.subject().to_owned());
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Ok(a), Ok(b)) = (first, second) {
        assert_eq!(a, b);
    }
});
