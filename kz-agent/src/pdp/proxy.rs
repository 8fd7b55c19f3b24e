//! `kz server start --proxy`: the token-exchange proxy at the network boundary.
//!
//! A client sends its request through the proxy with `Authorization: Bearer <kz token>`. The
//! proxy verifies the token (algorithm pinned), finds the resource it names, checks the target
//! host against the resource's `hosts` scope, resolves the host ONCE and refuses private,
//! loopback, link-local and metadata addresses, connects to exactly the address it checked (no
//! second lookup, so DNS rebinding cannot swap in an internal address), resolves the credential
//! and injects it at the resource's `credential_location`. The credential is scrubbed from the
//! response before it goes back.

use super::cli::StartArgs;
use super::{Pdp, PdpOptions, TokenVerifier, secret_request, validate_ref};
use crate::audit::AuditEvent;
use crate::bundle::CredentialLocation;
use crate::tls::CaFileError;
use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const MAX_BODY: usize = 10 * 1024 * 1024;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

type Body = Full<Bytes>;

/// A CIDR block (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a CIDR block like 10.0.0.0/8 or fd00::/8");
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>().map_err(|_| bad())?
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Cloud metadata endpoints: refused even inside an allowed private range.
pub fn is_metadata(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => [
            Ipv4Addr::new(169, 254, 169, 254),
            Ipv4Addr::new(169, 254, 170, 2),
            Ipv4Addr::new(100, 100, 100, 200),
            Ipv4Addr::new(168, 63, 129, 16),
        ]
        .contains(&v4),
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_metadata(IpAddr::V4(v4)))
        }
    }
}

/// Addresses a credential must never be sent to unless explicitly allowed.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

pub struct ProxyOptions {
    pub allow_private: Vec<Cidr>,
    pub upstream_ca: Option<PathBuf>,
}

impl ProxyOptions {
    pub fn from_args(args: &StartArgs) -> anyhow::Result<Self> {
        let allow_private = args
            .allow_private
            .iter()
            .map(|s| Cidr::parse(s).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            allow_private,
            upstream_ca: args.upstream_ca.clone(),
        })
    }
}

pub struct Proxy {
    pdp: Arc<Pdp>,
    verifier: TokenVerifier,
    allow_private: Vec<Cidr>,
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
            allow_private: options.allow_private,
            tls,
        }
    }

    fn address_allowed(&self, ip: IpAddr) -> bool {
        if is_metadata(ip) {
            return false;
        }
        !is_private(ip) || self.allow_private.iter().any(|c| c.contains(ip))
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
        if !hosts.is_empty() && !hosts.iter().any(|h| host_in_scope(h, &host)) {
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
        if let Some(bad) = addrs.iter().find(|a| !self.address_allowed(a.ip())) {
            let why = if is_metadata(bad.ip()) {
                "a cloud metadata address"
            } else {
                "a private address"
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
            if matches!(
                n,
                "host"
                    | "authorization"
                    | "connection"
                    | "proxy-connection"
                    | "proxy-authorization"
                    | "keep-alive"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
            ) {
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
                let v = if prefix.is_empty() {
                    secret.expose().to_owned()
                } else {
                    format!("{prefix} {}", secret.expose())
                };
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
                    url_encode(param),
                    url_encode(secret.expose())
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
        let body = scrub(&rbody, secret.expose().as_bytes());
        rparts.headers.remove(header::CONTENT_LENGTH);
        rparts.headers.remove(header::TRANSFER_ENCODING);
        rparts.headers.remove(header::CONNECTION);
        let names: Vec<_> = rparts.headers.keys().cloned().collect();
        for n in names {
            let vals: Vec<_> = rparts.headers.get_all(&n).iter().cloned().collect();
            if vals
                .iter()
                .any(|v| contains(v.as_bytes(), secret.expose().as_bytes()))
            {
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

/// `api.stripe.com` matches itself; `*.stripe.com` matches any subdomain (not the apex).
pub fn host_in_scope(pattern: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => host == pattern,
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn scrub(body: &Bytes, secret: &[u8]) -> Bytes {
    if !contains(body, secret) {
        return body.clone();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(secret) {
            out.extend_from_slice(b"[redacted by kz]");
            i += secret.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    Bytes::from(out)
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

/// `kz server start --proxy`: the proxy alone, verifying tokens with `--public-key`.
pub async fn start_standalone(args: StartArgs) -> anyhow::Result<ExitCode> {
    let verifier = match (&args.public_key, &args.signing_key) {
        (Some(p), _) => TokenVerifier::from_public_pem_file(p)?,
        (None, Some(k)) => super::Signer::from_pem_file(k, None)?.verifier(),
        (None, None) => anyhow::bail!(
            "--proxy needs the key that verifies kz tokens: --public-key FILE (or KEYZERO_PUBLIC_KEY_PATH)"
        ),
    };
    let pdp = Arc::new(Pdp::from_file(&args.bundle, PdpOptions::default())?);
    let proxy = Arc::new(Proxy::new(
        pdp.clone(),
        verifier,
        ProxyOptions::from_args(&args)?,
    ));
    let listener = TcpListener::bind(args.listen_addr())
        .await
        .with_context(|| format!("cannot listen on {}", args.listen_addr()))?;
    eprintln!("kz: proxy listening on http://{}", listener.local_addr()?);
    super::cli::spawn_reloaders(pdp);
    tokio::spawn(serve(listener, proxy));
    super::cli::wait_for_shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classes() {
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "192.168.0.1",
            "172.16.5.5",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.4.4"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
        assert!(is_metadata("169.254.169.254".parse().unwrap()));
        assert!(is_metadata("fd00:ec2::254".parse().unwrap()));
        assert!(is_metadata("::ffff:169.254.169.254".parse().unwrap()));
    }

    #[test]
    fn cidr_and_scope() {
        let c = Cidr::parse("10.200.0.0/16").unwrap();
        assert!(c.contains("10.200.3.4".parse().unwrap()));
        assert!(!c.contains("10.201.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(host_in_scope("api.stripe.com", "API.stripe.com"));
        assert!(host_in_scope("*.stripe.com", "api.stripe.com"));
        assert!(!host_in_scope("*.stripe.com", "stripe.com"));
        assert!(!host_in_scope("api.stripe.com", "api.stripe.com.evil.io"));
    }

    #[test]
    fn scrubbing() {
        let b = Bytes::from_static(b"echo: sk_live_1 and sk_live_1!");
        assert_eq!(
            &scrub(&b, b"sk_live_1")[..],
            b"echo: [redacted by kz] and [redacted by kz]!"
        );
    }
}
