//! The HTTP client every remote resolver uses: hyper 1 + rustls (ring provider), system roots
//! plus an optional extra CA, a per-attempt timeout, and bounded retries with exponential backoff
//! that retry only transient failures (connect errors, timeouts, 429/502/503/504).

use super::ResolveError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use std::path::Path;
use std::time::Duration;

/// Resolver responses are small JSON documents; anything bigger is refused, not buffered.
const MAX_BODY: usize = 1024 * 1024;
const BACKOFF_BASE_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 2_000;

#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Shared by the resolvers of one backend; cheap to clone (the pool is shared).
#[derive(Clone)]
pub(crate) struct HttpClient {
    backend: &'static str,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    retries: u32,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("backend", &self.backend)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

impl HttpClient {
    /// `extra_ca`: a PEM file of CA certificates trusted in addition to the system roots (a
    /// private Vault's CA, a test CA). `base_url`: the endpoint; for a plain-http one the
    /// system roots are not loaded (parsing them costs milliseconds of every `kz run`).
    pub fn new(
        backend: &'static str,
        base_url: &str,
        extra_ca: Option<&Path>,
        timeout: Duration,
        retries: u32,
    ) -> Result<Self, ResolveError> {
        let mut roots = if base_url.starts_with("http://") {
            RootCertStore::empty()
        } else {
            crate::tls::system_roots().clone()
        };
        if let Some(path) = extra_ca {
            crate::tls::add_ca_file(&mut roots, path)
                .map_err(|e| ResolveError::Config(format!("{backend}: {e}")))?;
        }
        // No ALPN here: hyper-rustls refuses a config that has one and sets its own offer (h2,
        // http/1.1) from the protocols enabled below.
        let tls = crate::tls::client_config(roots, &[]);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            backend,
            client,
            timeout,
            retries,
        })
    }

    /// Sends the request built by `make` (called once per attempt), retrying transient failures.
    /// `transient` may mark more responses as retryable (AWS throttling arrives as a 400).
    /// Non-transient HTTP statuses are returned for the caller to interpret.
    pub async fn send(
        &self,
        reference: &str,
        make: impl Fn() -> Result<Request<Full<Bytes>>, ResolveError>,
        transient: impl Fn(&HttpResponse) -> bool,
    ) -> Result<HttpResponse, ResolveError> {
        let mut attempt = 0u32;
        loop {
            let outcome = self.attempt(reference, make()?).await;
            let retry = match &outcome {
                Ok(resp) => {
                    matches!(
                        resp.status,
                        StatusCode::TOO_MANY_REQUESTS
                            | StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ) || transient(resp)
                }
                Err(Attempt::Transient(_)) => true,
                Err(Attempt::Fatal(_)) => false,
            };
            if !retry || attempt >= self.retries {
                return outcome.map_err(Attempt::into_error);
            }
            let backoff = (BACKOFF_BASE_MS << attempt.min(10)).min(BACKOFF_MAX_MS);
            let jitter = rand::random_range(0..=backoff / 2);
            tracing::debug!(
                backend = self.backend,
                reference,
                attempt,
                "transient failure, retrying in {}ms",
                backoff + jitter
            );
            tokio::time::sleep(Duration::from_millis(backoff + jitter)).await;
            attempt += 1;
        }
    }

    async fn attempt(
        &self,
        reference: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<HttpResponse, Attempt> {
        let host = request.uri().authority().map(|a| a.to_string());
        let host = host.as_deref().unwrap_or("?");
        let timed_out = || {
            Attempt::Transient(ResolveError::Timeout {
                backend: self.backend.into(),
                reference: reference.into(),
                seconds: self.timeout.as_secs().max(1),
            })
        };
        let exchange = async {
            let resp = self.client.request(request).await.map_err(|e| {
                let err = ResolveError::Backend {
                    backend: self.backend.into(),
                    reference: reference.into(),
                    message: format!("cannot reach {host}: {}", error_chain(&e)),
                };
                // A certificate the server cannot prove is not going to get better by asking
                // again; a refused or reset connection might.
                if is_tls_error(&e) || !e.is_connect() {
                    Attempt::Fatal(err)
                } else {
                    Attempt::Transient(err)
                }
            })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    Attempt::Transient(ResolveError::Backend {
                        backend: self.backend.into(),
                        reference: reference.into(),
                        message: format!("reading the response from {host} failed: {e}"),
                    })
                })?
                .to_bytes();
            Ok(HttpResponse { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(timed_out()),
        }
    }
}

enum Attempt {
    Transient(ResolveError),
    Fatal(ResolveError),
}

impl Attempt {
    fn into_error(self) -> ResolveError {
        match self {
            Attempt::Transient(e) | Attempt::Fatal(e) => e,
        }
    }
}

/// `a: b: c` from an error and its sources (hyper's top-level messages alone say little).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    // Connectors nest io::Errors (hyper-rustls in tokio-rustls), and `io::Error::source` skips the wrapped
    // error itself, so look through boxes and io wrappers explicitly.
    if err.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
        && is_tls_error(inner)
    {
        return true;
    }
    err.source().is_some_and(is_tls_error)
}

/// Percent-encodes one path segment (RFC 3986 unreserved characters stay).
pub(crate) fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks a secret path taken from configuration before it goes into a URL: no empty, `.` or `..`
/// segments, no control characters. Returns the path with surrounding slashes trimmed.
pub(crate) fn checked_path<'a>(backend: &str, reference: &'a str) -> Result<&'a str, ResolveError> {
    let trimmed = reference.trim_matches('/');
    let bad = |why: &str| ResolveError::Backend {
        backend: backend.into(),
        reference: reference.into(),
        message: format!("invalid secret path: {why}"),
    };
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(bad("it contains control characters"));
    }
    if trimmed
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(bad("empty, `.` or `..` segments are not allowed"));
    }
    Ok(trimmed)
}

/// The path with each segment percent-encoded.
pub(crate) fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_and_encoded() {
        assert_eq!(
            checked_path("v", "/secret/data/app/").unwrap(),
            "secret/data/app"
        );
        assert!(checked_path("v", "secret/../sys").is_err());
        assert!(checked_path("v", "secret//x").is_err());
        assert!(checked_path("v", "").is_err());
        assert!(checked_path("v", "a\nb").is_err());
        assert_eq!(encode_path("kv/my app/x?y"), "kv/my%20app/x%3Fy");
    }
}
