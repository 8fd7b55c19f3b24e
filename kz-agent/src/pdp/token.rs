//! Short-lived kz tokens: a signed JWT naming one resource, its resolver and the identity it was
//! issued to, valid for the resource's `ttl`. The token-exchange proxy verifies it and injects
//! the real credential; the agent never holds the credential itself.
//!
//! ES256 by default; RS256 for KeyZero compatibility (its proxy only verifies RS256). Claims
//! follow KeyZero's (`iss: keyzero`, `aud: keyzero-proxy`, `resource`, `resolver`) plus ours.

use crate::identity::Identity;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const PROXY_ISSUER: &str = "keyzero";
pub const PROXY_AUDIENCE: &str = "keyzero-proxy";

#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable key: expected a PKCS#8 P-256 EC key (ES256) or an RSA key (RS256) in PEM; create one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem`"
    )]
    Unusable { path: String },
    #[error("{path} is not a PEM public key (EC P-256 or RSA)")]
    BadPublic { path: String },
    #[error("generating a signing key failed")]
    Generate,
    #[error("signing failed: {0}")]
    Sign(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyClaims {
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub resource: String,
    pub resolver: String,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub sub: String,
    /// The issuer (bundle issuer name) of the identity the token was issued to.
    #[serde(default)]
    pub idp: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub env: String,
    #[serde(default)]
    pub actor: String,
}

pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    public: DecodingKey,
    public_pem: Option<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A fresh in-memory ES256 key (the PDP and an in-process proxy share it).
    pub fn generate() -> Result<Self, TokenKeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| TokenKeyError::Generate)?;
        Self::from_ec_pkcs8(pkcs8.as_ref()).ok_or(TokenKeyError::Generate)
    }

    fn from_ec_pkcs8(der: &[u8]) -> Option<Self> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .ok()?;
        Some(Self {
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_der(der),
            public: DecodingKey::from_ec_der(pair.public_key().as_ref()),
            public_pem: None,
        })
    }

    /// Reads a PEM private key: PKCS#8 P-256 → ES256, RSA (PKCS#1 or PKCS#8) → RS256. An RSA
    /// key also needs its public half for in-process verification: `public_pem` (optional).
    pub fn from_pem_file(path: &Path, public_pem: Option<&Path>) -> Result<Self, TokenKeyError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TokenKeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let unusable = || TokenKeyError::Unusable {
            path: shown.clone(),
        };
        let mut reader = std::io::BufReader::new(pem.as_slice());
        let item = rustls_pemfile::read_one(&mut reader)
            .ok()
            .flatten()
            .ok_or_else(unusable)?;
        let public_text = match public_pem {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| TokenKeyError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
            ),
            None => None,
        };
        match item {
            rustls_pemfile::Item::Pkcs8Key(der) => {
                if let Some(mut s) = Self::from_ec_pkcs8(der.secret_pkcs8_der()) {
                    s.public_pem = public_text;
                    return Ok(s);
                }
                Self::rsa(&pem, der.secret_pkcs8_der(), true, public_text).ok_or_else(unusable)
            }
            rustls_pemfile::Item::Pkcs1Key(der) => {
                Self::rsa(&pem, der.secret_pkcs1_der(), false, public_text).ok_or_else(unusable)
            }
            _ => Err(unusable()),
        }
    }

    fn rsa(pem: &[u8], der: &[u8], pkcs8: bool, public_pem: Option<String>) -> Option<Self> {
        let pair = if pkcs8 {
            signature::RsaKeyPair::from_pkcs8(der).ok()?
        } else {
            signature::RsaKeyPair::from_der(der).ok()?
        };
        // ring gives the public key as PKCS#1 DER, which jsonwebtoken accepts for RSA.
        let public = DecodingKey::from_rsa_der(pair.public().as_ref());
        Some(Self {
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(pem).ok()?,
            public,
            public_pem,
        })
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn public_pem(&self) -> Option<&str> {
        self.public_pem.as_deref()
    }

    /// Signs a token for `resource`; returns it with its `jti`.
    pub fn sign(
        &self,
        resource: &str,
        resolver: &str,
        identity: &Identity,
        ttl: u64,
    ) -> Result<(String, String), TokenKeyError> {
        let now = jsonwebtoken::get_current_timestamp();
        let jti = format!("{:032x}", rand::random::<u128>());
        let claims = ProxyClaims {
            iss: PROXY_ISSUER.into(),
            aud: PROXY_AUDIENCE.into(),
            iat: now,
            exp: now + ttl,
            resource: resource.into(),
            resolver: resolver.into(),
            jti: jti.clone(),
            sub: identity.subject().into(),
            idp: identity.issuer.clone(),
            service: identity.service.clone(),
            env: identity.env.clone(),
            actor: identity.actor.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key)
            .map_err(|e| TokenKeyError::Sign(e.to_string()))?;
        Ok((token, jti))
    }

    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            alg: self.alg,
            key: self.public.clone(),
        }
    }
}

/// Verifies kz tokens at the network boundary (the proxy). Algorithm pinned to the key's.
#[derive(Clone)]
pub struct TokenVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("alg", &self.alg)
            .finish()
    }
}

impl TokenVerifier {
    /// From a PEM public key file: EC → ES256, RSA → RS256.
    pub fn from_public_pem_file(path: &Path) -> Result<Self, TokenKeyError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TokenKeyError::Read {
            path: shown.clone(),
            source,
        })?;
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Self {
                alg: Algorithm::ES256,
                key,
            });
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self {
                alg: Algorithm::RS256,
                key,
            });
        }
        Err(TokenKeyError::BadPublic { path: shown })
    }

    pub fn verify(&self, token: &str) -> Result<ProxyClaims, crate::identity::TokenError> {
        use crate::identity::TokenError;
        if token.len() > 16 * 1024 {
            return Err(TokenError::TooLarge {
                size: token.len(),
                max: 16 * 1024,
            });
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Malformed("not a kz token"))?;
        if header.alg != self.alg {
            return Err(TokenError::AlgMismatch {
                kid: "kz".into(),
                expected: format!("{:?}", self.alg),
                got: format!("{:?}", header.alg),
            });
        }
        let mut v = Validation::new(self.alg);
        v.leeway = 5;
        v.set_issuer(&[PROXY_ISSUER]);
        v.set_audience(&[PROXY_AUDIENCE]);
        jsonwebtoken::decode::<ProxyClaims>(token, &self.key, &v)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::ExpiredSignature => TokenError::Expired,
                    K::ImmatureSignature => TokenError::NotYetValid,
                    K::InvalidAudience => TokenError::WrongAudience(PROXY_AUDIENCE.into()),
                    K::InvalidIssuer => TokenError::UnknownIssuer(PROXY_ISSUER.into()),
                    K::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                    _ => TokenError::BadSignature,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_signs_and_verifies() {
        let s = Signer::generate().unwrap();
        let id = Identity::new(
            "agents",
            serde_json::Map::new(),
            [("service", "bot")],
            vec![],
        );
        let (t, jti) = s.sign("payments/stripe", "env", &id, 60).unwrap();
        let c = s.verifier().verify(&t).unwrap();
        assert_eq!(c.resource, "payments/stripe");
        assert_eq!(c.jti, jti);
        assert_eq!(c.service, "bot");
        let other = Signer::generate().unwrap();
        assert!(other.verifier().verify(&t).is_err());
    }
}
