//! JWKS: an issuer's public keys fetched from `jwks_url`.
//!
//! Cached for `jwks_cache_seconds`; an unknown kid triggers a refresh, at most once per
//! `jwks_refresh_seconds` (a stream of forged kids must not turn kz into a request amplifier);
//! when a refresh fails the previous keys keep serving (stale-while-error) and the failure is
//! logged. Each key's algorithm comes from the JWK (`alg`, else its key type) and is pinned.

use super::{Key, parse_alg};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS URL `{0}` is not an http(s) URL")]
    BadUrl(String),
    #[error("fetching {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{url} did not return a JWKS document: {message}")]
    Parse { url: String, message: String },
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Arc<Key>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

pub struct Jwks {
    url: String,
    ttl: Duration,
    min_refresh: Duration,
    state: RwLock<State>,
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: String,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

fn jwk_to_key(j: &Jwk) -> Option<Key> {
    if j.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let kid = j.kid.clone()?;
    let alg = match (&j.alg, j.kty.as_str(), j.crv.as_deref()) {
        (Some(a), ..) => parse_alg(a)?,
        (None, "RSA", _) => Algorithm::RS256,
        (None, "EC", Some("P-256")) => Algorithm::ES256,
        (None, "EC", Some("P-384")) => Algorithm::ES384,
        (None, "OKP", Some("Ed25519")) => Algorithm::EdDSA,
        _ => return None,
    };
    let key = match (j.kty.as_str(), alg) {
        ("RSA", Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
        | ("RSA", Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512) => {
            DecodingKey::from_rsa_components(j.n.as_deref()?, j.e.as_deref()?).ok()?
        }
        ("EC", Algorithm::ES256 | Algorithm::ES384) => {
            DecodingKey::from_ec_components(j.x.as_deref()?, j.y.as_deref()?).ok()?
        }
        ("OKP", Algorithm::EdDSA) => DecodingKey::from_ed_components(j.x.as_deref()?).ok()?,
        // An HMAC "key" in a public JWKS, or a kty/alg mismatch: never usable.
        _ => return None,
    };
    Some(Key { kid, alg, key })
}

impl Jwks {
    pub fn new(url: String, ttl: Duration, min_refresh: Duration) -> Self {
        Self {
            url,
            ttl,
            min_refresh,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, kid: &str) -> (Option<Arc<Key>>, bool, bool) {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        let fresh = s.fetched_at.is_some_and(|t| t.elapsed() < self.ttl);
        let may_refresh = s
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.min_refresh);
        (s.keys.get(kid).cloned(), fresh, may_refresh)
    }

    /// The key for `kid`, refreshing the set when the kid is unknown or the cache is old.
    pub async fn key(&self, kid: &str) -> Result<Option<Arc<Key>>, JwksError> {
        let (hit, fresh, may_refresh) = self.cached(kid);
        if hit.is_some() && fresh {
            return Ok(hit);
        }
        if !may_refresh {
            return Ok(hit);
        }
        let _guard = self.fetching.lock().await;
        // Someone else may have refreshed while we waited.
        let (hit, fresh, may_refresh) = self.cached(kid);
        if (hit.is_some() && fresh) || !may_refresh {
            return Ok(hit);
        }
        match self.refresh().await {
            Ok(()) => Ok(self.cached(kid).0),
            Err(e) => {
                let has_cache = self
                    .state
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .fetched_at
                    .is_some();
                if has_cache {
                    tracing::warn!(error = %e, "JWKS refresh failed; serving the cached keys");
                    Ok(hit)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The single key of the set, for tokens without `kid` (only when the set has one key).
    pub async fn only_key(&self) -> Result<Option<Arc<Key>>, JwksError> {
        let needs_fetch = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fetched_at
            .is_none();
        if needs_fetch {
            let _guard = self.fetching.lock().await;
            self.refresh().await?;
        }
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        Ok(if s.keys.len() == 1 {
            s.keys.values().next().cloned()
        } else {
            None
        })
    }

    async fn refresh(&self) -> Result<(), JwksError> {
        {
            let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
            s.last_attempt = Some(Instant::now());
        }
        let body = fetch(&self.url).await?;
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| JwksError::Parse {
            url: self.url.clone(),
            message: e.to_string(),
        })?;
        let keys: HashMap<String, Arc<Key>> = set
            .keys
            .iter()
            .filter_map(jwk_to_key)
            .map(|k| (k.kid.clone(), Arc::new(k)))
            .collect();
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.keys = keys;
        s.fetched_at = Some(Instant::now());
        Ok(())
    }
}

/// GET `url` (http or https with the system roots), bounded in time and size.
pub async fn fetch(url: &str) -> Result<Bytes, JwksError> {
    let fail = |message: String| JwksError::Fetch {
        url: url.to_owned(),
        message,
    };
    let uri: http::Uri = url.parse().map_err(|_| JwksError::BadUrl(url.to_owned()))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(JwksError::BadUrl(url.to_owned())),
    };
    let host = uri
        .host()
        .ok_or_else(|| JwksError::BadUrl(url.to_owned()))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = if https {
            let tls = tls_connector();
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| fail(e.to_string()))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            send(hyper_util::rt::TokioIo::new(stream), req).await
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), req).await
        }
        .map_err(fail)?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| fail(format!("timed out after {}s", FETCH_TIMEOUT.as_secs())))?
}

async fn send<T>(
    io: hyper_util::rt::TokioIo<T>,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// System roots only, no ALPN: the JWKS fetch speaks HTTP/1.1 (see [`send`]).
fn tls_connector() -> tokio_rustls::TlsConnector {
    let config = crate::tls::client_config(crate::tls::system_roots().clone(), &[]);
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
