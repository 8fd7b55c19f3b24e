//! `kz server start --proxy`: the token-exchange proxy at the network boundary.
//!
//! A client sends its request through the proxy with `Authorization: Bearer <kz token>`. The
//! proxy verifies the token (algorithm pinned), finds the resource it names, checks the target
//! host against the resource's `hosts` scope, resolves the host ONCE and refuses private,
//! loopback, link-local and metadata addresses, connects to exactly the address it checked (no
//! second lookup, so DNS rebinding cannot swap in an internal address), resolves the credential
//! and injects it at the resource's `credential_location`. The credential is scrubbed from the
//! response before it goes back.

use super::{Pdp, TokenVerifier, secret_request, validate_ref};
use crate::audit::AuditEvent;
use crate::bundle::CredentialLocation;
use crate::egress::scrub::{self, Forms, Scrubber};
use crate::egress::{Classes, Guard, GuardError, Keep, hop, percent_encode, scope};
use crate::tls::CaFileError;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const MAX_BODY: usize = 10 * 1024 * 1024;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

type Body = Full<Bytes>;

/// `--allow-private` entries (the egress guard's; the name stays for the command wiring).
pub use crate::egress::guard::Cidr;

pub struct ProxyOptions {
    pub allow_private: Vec<Cidr>,
    pub upstream_ca: Option<PathBuf>,
}

pub struct Proxy {
    pdp: Arc<Pdp>,
    verifier: TokenVerifier,
    guard: Guard,
    tls: tokio_rustls::TlsConnector,
}

#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    error: &'static str,
    message: String,
}

fn refuse(status: StatusCode, error: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error,
        message: message.into(),
    }
}

/// The exchange speaks HTTP/1.1 to the upstream, so the config offers no ALPN.
fn tls_connector(extra_ca: Option<&PathBuf>) -> Result<tokio_rustls::TlsConnector, CaFileError> {
    let roots = crate::tls::trusted_roots(extra_ca.map(PathBuf::as_path))?;
    let config = crate::tls::client_config(roots, &[]);
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl Proxy {
    pub fn new(pdp: Arc<Pdp>, verifier: TokenVerifier, options: ProxyOptions) -> Self {
        let tls = tls_connector(options.upstream_ca.as_ref()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "upstream CA unusable; using the system roots only");
            // Only the extra CA can be unusable: the system roots alone always build.
            let config = crate::tls::client_config(crate::tls::system_roots().clone(), &[]);
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        Self {
            pdp,
            verifier,
            // Internal classes only: the exchange's targets come from the operator's bundle
            // (`hosts`), not from the agent (see `Classes::Internal`).
            guard: Guard::new(
                options.allow_private.iter().map(Cidr::net).collect(),
                Classes::Internal,
            ),
            tls,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        match self.exchange(req).await {
            Ok(r) => r,
            Err(r) => {
                let mut resp = Response::new(Full::new(Bytes::from(
                    json!({"error": r.error, "message": r.message}).to_string(),
                )));
                *resp.status_mut() = r.status;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
        }
    }

    async fn exchange(&self, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    "send the kz token as `Authorization: Bearer <token>`",
                )
            })?;
        let claims = self.verifier.verify(token).map_err(|e| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("{} ({})", e, e.reason()),
            )
        })?;
        validate_ref(&claims.resource)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "invalid_ref", e.to_string()))?;
        let compiled = self.pdp.current();
        let resource = compiled.match_resource(&claims.resource).ok_or_else(|| {
            refuse(
                StatusCode::FORBIDDEN,
                "unknown_ref",
                "the token names a ref no resource matches",
            )
        })?;
        if resource.spec.resolver != claims.resolver {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "resolver_mismatch",
                "the token's resolver does not match the resource's",
            ));
        }

        // Target: absolute-form URI (HTTP proxy style) or Host header (reverse-proxy style).
        let uri = req.uri().clone();
        let (https, host, port) = match (uri.scheme_str(), uri.host()) {
            (Some(scheme), Some(h)) => {
                let https = scheme == "https";
                (
                    https,
                    h.to_owned(),
                    uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
                )
            }
            _ => {
                let host_header = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            "no Host header and no absolute URI",
                        )
                    })?;
                let a: http::uri::Authority = host_header.parse().map_err(|_| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "the Host header is not host[:port]",
                    )
                })?;
                (true, a.host().to_owned(), a.port_u16().unwrap_or(443))
            }
        };
        let host = host.trim_matches(|c| c == '[' || c == ']').to_owned();
        let hosts = &resource.spec.hosts;
        if !hosts.is_empty() && !scope::in_scope(hosts, &host) {
            self.audit(
                &claims,
                &host,
                None,
                "refused",
                "host not in the resource's hosts",
            );
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "host_not_in_scope",
                format!("`{}` is not one of this credential's hosts", host),
            ));
        }

        // Resolve once; refuse if ANY answer is forbidden, then connect to exactly that answer.
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| {
                refuse(
                    StatusCode::BAD_GATEWAY,
                    "dns_error",
                    format!("cannot resolve `{host}`"),
                )
            })?
            .collect();
        let Some(target) = addrs.first().copied() else {
            return Err(refuse(
                StatusCode::BAD_GATEWAY,
                "dns_error",
                format!("`{host}` has no addresses"),
            ));
        };
        if let Some((bad, e)) = addrs
            .iter()
            .find_map(|a| self.guard.check_addr(a.ip()).err().map(|e| (a, e)))
        {
            let why = match e {
                GuardError::Metadata { .. } => "a cloud metadata address",
                _ => "a private address",
            };
            self.audit(&claims, &host, Some(bad.ip()), "refused", why);
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "forbidden_address",
                format!(
                    "`{host}` resolves to {} ({why}); credentials are never sent there",
                    bad.ip()
                ),
            ));
        }

        let resolver = compiled
            .resolvers
            .get(&resource.spec.resolver)
            .ok_or_else(|| {
                refuse(
                    StatusCode::BAD_GATEWAY,
                    "resolver_error",
                    "the resource's backend is not available",
                )
            })?;
        let secret = resolver
            .resolve(&secret_request(
                &claims.resource,
                &resource.spec,
                resolver.kind(),
            ))
            .await
            .map_err(|e| refuse(StatusCode::BAD_GATEWAY, "resolver_error", e.to_string()))?;

        // Build the upstream request.
        let (parts, body) = req.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body too large",
                )
            })?
            .to_bytes();
        let mut path_q = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let mut out = Request::builder().method(parts.method.clone());
        for (name, value) in &parts.headers {
            let n = name.as_str();
            // Hop-by-hop, plus what the exchange owns: `Host` (set below) and `Authorization`
            // (the kz token, which never goes upstream).
            if hop::is_hop_by_hop(n) || n == "host" || n == "authorization" {
                continue;
            }
            out = out.header(name, value);
        }
        let authority = if (https && port == 443) || (!https && port == 80) {
            host_for_header(&host)
        } else {
            format!("{}:{port}", host_for_header(&host))
        };
        out = out.header(header::HOST, authority);
        match &resource.location {
            CredentialLocation::Header { name, prefix } => {
                let v = CredentialLocation::header_value(prefix, secret.expose());
                let hv = header::HeaderValue::from_str(&v).map_err(|_| {
                    refuse(
                        StatusCode::BAD_GATEWAY,
                        "resolver_error",
                        "the credential cannot be sent in a header",
                    )
                })?;
                out = out.header(name.as_str(), hv);
            }
            CredentialLocation::Query { param } => {
                let sep = if path_q.contains('?') { '&' } else { '?' };
                path_q = format!(
                    "{path_q}{sep}{}={}",
                    percent_encode(param.as_bytes(), Keep::Unreserved),
                    percent_encode(secret.expose().as_bytes(), Keep::Unreserved)
                );
            }
        }
        let uri: Uri = path_q
            .parse()
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, "bad_request", "bad request path"))?;
        let upstream_req = out.uri(uri).body(Full::new(body)).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "cannot build the upstream request",
            )
        })?;

        let work = async {
            let tcp = tokio::net::TcpStream::connect(target)
                .await
                .map_err(|e| format!("connect {target}: {e}"))?;
            if https {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| e.to_string())?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(TokioIo::new(tls), upstream_req).await
            } else {
                send(TokioIo::new(tcp), upstream_req).await
            }
        };
        let resp = tokio::time::timeout(UPSTREAM_TIMEOUT, work)
            .await
            .map_err(|_| {
                refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "upstream timed out",
                )
            })?
            .map_err(|e| refuse(StatusCode::BAD_GATEWAY, "upstream_error", e))?;
        let (mut rparts, rbody) = resp.into_parts();
        let rbody = Limited::new(rbody, MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                refuse(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "upstream response too large or broken",
                )
            })?
            .to_bytes();
        // Never hand the credential back: an echoing upstream must not leak it to the agent.
        // Every spelling, as the proxy and MCP `fetch` do (a `query:` injection is
        // percent-encoded, an upstream may echo it encoded), and the exchange's own marker (see
        // `scrub::EXCHANGE_MARKER`). A header holding any spelling is dropped below.
        let scrubber = Scrubber::for_value(secret.expose(), Forms::ALL, scrub::EXCHANGE_MARKER)
            .map_err(|e| refuse(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()))?;
        // Nothing to scrub (the common case): hand the upstream's bytes back without a copy.
        let body = match scrubber.scrub(&rbody) {
            std::borrow::Cow::Borrowed(_) => rbody.clone(),
            std::borrow::Cow::Owned(scrubbed) => Bytes::from(scrubbed),
        };
        // Framing is hyper's to set again for the scrubbed body; other upstream headers pass.
        rparts.headers.remove(header::CONTENT_LENGTH);
        rparts.headers.remove(header::TRANSFER_ENCODING);
        rparts.headers.remove(header::CONNECTION);
        let names: Vec<_> = rparts.headers.keys().cloned().collect();
        for n in names {
            let vals: Vec<_> = rparts.headers.get_all(&n).iter().cloned().collect();
            // A header echoing the credential is dropped whole, not scrubbed.
            if vals.iter().any(|v| scrubber.contains(v.as_bytes())) {
                rparts.headers.remove(&n);
            }
        }
        self.audit(&claims, &host, Some(target.ip()), "forwarded", "");
        Ok(Response::from_parts(rparts, Full::new(body)))
    }

    fn audit(
        &self,
        claims: &super::ProxyClaims,
        host: &str,
        ip: Option<IpAddr>,
        outcome: &str,
        reason: &str,
    ) {
        let mut e = AuditEvent::new("proxy_exchange")
            .with("jti", claims.jti.as_str())
            .with("ref", claims.resource.as_str())
            .with("resolver", claims.resolver.as_str())
            .with("service", claims.service.as_str())
            .with("sub", claims.sub.as_str())
            .with("host", host)
            .with("outcome", outcome);
        if let Some(ip) = ip {
            e = e.with("ip", ip.to_string());
        }
        if !reason.is_empty() {
            e = e.with("reason", reason);
        }
        let _ = self.pdp.audit().record(e);
    }
}

fn host_for_header(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

async fn send<T>(io: TokioIo<T>, req: Request<Body>) -> Result<Response<Incoming>, String>
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

pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exchange's choices on top of the egress pieces (their own tests cover the rest).
    #[test]
    fn exchange_guard_scope_and_marker() {
        let p = Guard::new(Vec::new(), Classes::Internal);
        for ip in ["10.1.2.3", "127.0.0.1", "::ffff:10.0.0.1", "fd00::1"] {
            assert!(p.check_addr(ip.parse().unwrap()).is_err(), "{ip}");
        }
        assert!(p.check_addr("93.184.216.34".parse().unwrap()).is_ok());
        let c = Cidr::parse("10.200.0.0/16").unwrap();
        assert!(c.contains("10.200.3.4".parse().unwrap()));
        assert!(!c.contains("10.201.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        let hosts = |h: &str| vec![h.to_owned()];
        assert!(scope::in_scope(&hosts("api.stripe.com"), "API.stripe.com"));
        assert!(scope::in_scope(&hosts("*.stripe.com"), "api.stripe.com"));
        assert!(!scope::in_scope(&hosts("*.stripe.com"), "stripe.com"));
        assert!(!scope::in_scope(
            &hosts("api.stripe.com"),
            "api.stripe.com.evil.io"
        ));
        let s = Scrubber::for_value("sk_live_1", Forms::RAW, scrub::EXCHANGE_MARKER).unwrap();
        assert_eq!(
            &s.scrub(b"echo: sk_live_1 and sk_live_1!")[..],
            b"echo: [redacted by kz] and [redacted by kz]!"
        );
    }
}
