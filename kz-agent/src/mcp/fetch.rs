//! The request behind the `fetch` tool: kz, not the agent, talks to the upstream.
//!
//! Order of a hop: parse the URL (https only, no userinfo) → host in the resource's scope →
//! name not a local/metadata name → resolve → every address passes the [`Guard`] → connect to
//! a checked address (no second lookup, so no rebinding) → TLS verified against system roots
//! (+ an optional extra CA) → inject the credential → send. Redirects repeat all of it and are
//! followed only within scope. The response comes back with hop-by-hop and cookie headers
//! dropped, every credential form scrubbed, binary bodies base64-encoded and a size cap.

use super::dns::{Dns, DnsError};
use crate::egress::scrub::{self, Forms, ScrubError, Scrubber};
use crate::egress::{Guard, GuardError, Location, hop, scope};
use crate::secret::Secret;
use crate::tls::{ALPN_H1, ALPN_H2};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use url::{Host, Url};

/// Response headers dropped besides the hop-by-hop ones ([`hop::is_hop_by_hop`]): a session
/// cookie set by an upstream is a credential of its own and stays with kz.
const DROPPED_RESPONSE_HEADERS: &[&str] = &["set-cookie", "set-cookie2"];

/// Request headers the agent may not set besides the hop-by-hop ones: kz frames the message
/// itself, asks for an uncompressed body (compressed bytes could not be scrubbed) and owns the
/// credential header. (`proxy-authenticate` is a response header; refusing it is harmless.)
const REFUSED_REQUEST_HEADERS: &[&str] = &["host", "content-length", "accept-encoding"];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid url '{url}': {reason}")]
    BadUrl { url: String, reason: String },
    #[error("url scheme '{0}' is refused: kz only sends credentials over https")]
    Scheme(String),
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("host '{host}' is outside the resource's scope; allowed hosts: {allowed}")]
    Scope { host: String, allowed: String },
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("invalid HTTP method '{0}'")]
    Method(String),
    #[error("invalid request header '{name}': {reason}")]
    Header { name: String, reason: String },
    #[error(
        "invalid credential_location '{0}' on the resource; expected header:NAME[:PREFIX] or query:NAME"
    )]
    Location(String),
    #[error("cannot connect to {host} ({addrs}): {reason}")]
    Connect {
        host: String,
        addrs: String,
        reason: String,
    },
    #[error("TLS with {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error("HTTP exchange with {host} failed: {reason}")]
    Http { host: String, reason: String },
    #[error("redirect to '{location}' refused: {reason}")]
    Redirect { location: String, reason: String },
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error(
        "upstream sent a body with content-encoding '{0}' although kz asked for identity; it cannot be scrubbed so it is withheld"
    )]
    Encoded(String),
    #[error("the request timed out after {0}s")]
    Timeout(u64),
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("{0}")]
    Scrub(#[from] ScrubError),
}

/// Parses a resource's `credential_location` (`None`: KeyZero's default, a Bearer header).
pub fn location(spec: Option<&str>) -> Result<Location, FetchError> {
    let spec = spec.unwrap_or(Location::DEFAULT);
    Location::parse(spec).map_err(|_| FetchError::Location(spec.to_owned()))
}

/// Limits and trust for outgoing requests. Built once per server.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub guard: Guard,
    pub dns: Dns,
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub max_body: usize,
    pub max_redirects: usize,
}

impl FetchConfig {
    /// System roots plus, if given, the certificates in `extra_ca` (PEM).
    pub fn new(
        guard: Guard,
        dns: Dns,
        extra_ca: Option<&Path>,
        max_body: usize,
    ) -> Result<Self, FetchError> {
        Ok(Self {
            guard,
            dns,
            tls: Arc::new(tls_config(extra_ca)?),
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_body,
            max_redirects: 5,
        })
    }
}

/// System roots plus `extra_ca`, offering h2 then http/1.1. Unreadable individual system
/// certificates are skipped; an empty store only matters if no extra CA.
pub fn tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, FetchError> {
    let roots =
        crate::tls::trusted_roots(extra_ca).map_err(|e| FetchError::TlsSetup(e.to_string()))?;
    Ok(crate::tls::client_config(roots, &[ALPN_H2, ALPN_H1]))
}

/// What the agent asked for.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub url: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
}

/// The credential and where it may go.
#[derive(Debug)]
pub struct Credential<'a> {
    pub secret: &'a Secret,
    pub location: Location,
    /// The resource's `hosts`; empty means only the host of the requested URL (and redirects
    /// stay on it).
    pub hosts: &'a [String],
}

/// What the agent gets back. `body` is text when the (scrubbed) bytes are UTF-8, otherwise
/// base64 with `body_encoding: "base64"`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FetchResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub body_encoding: &'static str,
    pub truncated: bool,
    /// The URL that answered (differs from the request after redirects).
    pub url: String,
}

pub async fn fetch(
    config: &FetchConfig,
    request: &FetchRequest,
    credential: &Credential<'_>,
) -> Result<FetchResponse, FetchError> {
    let secs = config.total_timeout.as_secs();
    tokio::time::timeout(
        config.total_timeout,
        fetch_inner(config, request, credential),
    )
    .await
    .map_err(|_| FetchError::Timeout(secs))?
}

async fn fetch_inner(
    config: &FetchConfig,
    request: &FetchRequest,
    credential: &Credential<'_>,
) -> Result<FetchResponse, FetchError> {
    let mut url = parse_url(&request.url)?;
    let mut method = hyper::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| FetchError::Method(request.method.clone()))?;
    let headers = agent_headers(&request.headers, &credential.location)?;
    let mut body = request.body.clone().map(Bytes::from).unwrap_or_default();
    let first_host = host_of(&url);
    let scope: Vec<String> = if credential.hosts.is_empty() {
        vec![first_host.clone()]
    } else {
        credential.hosts.to_vec()
    };
    // Every spelling (raw, percent-encoded, JSON-escaped, base64): `fetch` hands whole bodies
    // back, so every common echo of the value is looked for; a fixed marker (in the same
    // spelling), since the agent holds no masked token.
    let scrubber = Scrubber::for_value(credential.secret.expose(), Forms::ALL, scrub::MARKER)?;

    let mut redirects = 0;
    loop {
        let host = host_of(&url);
        check_scope(&host, &scope)?;
        let stream = connect(config, &url).await?;
        let response = exchange(config, stream, &url, &method, &headers, &body, credential).await?;
        let status = response.status();
        if status.is_redirection()
            && let Some(location) = response.headers().get(hyper::header::LOCATION)
        {
            let location = String::from_utf8_lossy(location.as_bytes()).into_owned();
            let shown = scrubber.scrub_str(&location);
            redirects += 1;
            if redirects > config.max_redirects {
                return Err(FetchError::TooManyRedirects(config.max_redirects));
            }
            let next = url.join(&location).map_err(|e| FetchError::Redirect {
                location: shown.clone(),
                reason: e.to_string(),
            })?;
            let next = check_url(next).map_err(|e| FetchError::Redirect {
                location: shown.clone(),
                reason: e.to_string(),
            })?;
            check_scope(&host_of(&next), &scope).map_err(|e| FetchError::Redirect {
                location: shown.clone(),
                reason: e.to_string(),
            })?;
            // 303, and 301/302 after a POST, turn into a body-less GET (what browsers and curl
            // do); 307/308 repeat the request as it was.
            if status == hyper::StatusCode::SEE_OTHER
                || (matches!(status.as_u16(), 301 | 302) && method == hyper::Method::POST)
            {
                method = hyper::Method::GET;
                body = Bytes::new();
            }
            url = next;
            continue;
        }
        return finish(config, response, &scrubber, &url, redirects > 0).await;
    }
}

/// `host` against the resource's `hosts` (never empty here: an unscoped resource is scoped to
/// the requested host).
fn check_scope(host: &str, allowed: &[String]) -> Result<(), FetchError> {
    if allowed.is_empty() || scope::in_scope(allowed, host) {
        return Ok(());
    }
    Err(FetchError::Scope {
        host: host.to_owned(),
        allowed: allowed.join(", "),
    })
}

fn parse_url(raw: &str) -> Result<Url, FetchError> {
    let url = Url::parse(raw).map_err(|e| FetchError::BadUrl {
        url: raw.to_owned(),
        reason: e.to_string(),
    })?;
    check_url(url)
}

fn check_url(url: Url) -> Result<Url, FetchError> {
    if url.scheme() != "https" {
        return Err(FetchError::Scheme(url.scheme().to_owned()));
    }
    // Messages name the host only: a redirect target chosen by the upstream may carry anything
    // (even the credential it was sent) in its userinfo, path or query.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FetchError::BadUrl {
            url: format!("https://{}/…", url.host_str().unwrap_or_default()),
            reason: "credentials in the URL are not allowed".to_owned(),
        });
    }
    if url.host().is_none() {
        return Err(FetchError::BadUrl {
            url: "https://".to_owned(),
            reason: "no host".to_owned(),
        });
    }
    Ok(url)
}

/// The host as scope patterns see it: a name, or an IP address without brackets.
fn host_of(url: &Url) -> String {
    match url.host() {
        Some(Host::Domain(d)) => d.to_ascii_lowercase(),
        Some(Host::Ipv4(a)) => a.to_string(),
        Some(Host::Ipv6(a)) => a.to_string(),
        None => String::new(),
    }
}

/// More request headers than any API needs; a bound keeps one call's request small.
const MAX_AGENT_HEADERS: usize = 64;

fn agent_headers(
    given: &BTreeMap<String, String>,
    location: &Location,
) -> Result<Vec<(HeaderName, HeaderValue)>, FetchError> {
    if given.len() > MAX_AGENT_HEADERS {
        return Err(FetchError::Header {
            name: format!("({} headers)", given.len()),
            reason: format!("at most {MAX_AGENT_HEADERS} headers may be sent"),
        });
    }
    let mut out = Vec::new();
    for (name, value) in given {
        let bad = |reason: &str| FetchError::Header {
            name: name.clone(),
            reason: reason.to_owned(),
        };
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("not a valid header name"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| bad("value has control characters"))?;
        if hop::is_hop_by_hop(name.as_str()) || REFUSED_REQUEST_HEADERS.contains(&name.as_str()) {
            continue;
        }
        // The credential header is kz's to set; an agent value would be replaced anyway.
        if location.header_name().as_ref() == Some(&name) {
            continue;
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Resolves and checks the destination, then connects to an address that passed the check.
async fn connect(config: &FetchConfig, url: &Url) -> Result<TcpStream, FetchError> {
    let host = host_of(url);
    let port = url.port_or_known_default().unwrap_or(443);
    let addrs: Vec<IpAddr> = match url.host() {
        Some(Host::Ipv4(a)) => vec![IpAddr::V4(a)],
        Some(Host::Ipv6(a)) => vec![IpAddr::V6(a)],
        Some(Host::Domain(d)) => {
            config.guard.check_name(d)?;
            config.dns.lookup(d, config.connect_timeout).await?
        }
        None => Vec::new(),
    };
    // Every address must pass: a name that also points inside is not one to trust.
    for addr in &addrs {
        config.guard.check_addr(*addr)?;
    }
    let mut last = String::from("no addresses");
    for addr in &addrs {
        let target = SocketAddr::new(*addr, port);
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("{target}: {e}"),
            Err(_) => {
                last = format!(
                    "{target}: timed out after {}s",
                    config.connect_timeout.as_secs()
                )
            }
        }
    }
    Err(FetchError::Connect {
        host,
        addrs: addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        reason: last,
    })
}

async fn exchange(
    config: &FetchConfig,
    stream: TcpStream,
    url: &Url,
    method: &hyper::Method,
    headers: &[(HeaderName, HeaderValue)],
    body: &Bytes,
    credential: &Credential<'_>,
) -> Result<hyper::Response<hyper::body::Incoming>, FetchError> {
    let host = host_of(url);
    let server_name = match url.host() {
        Some(Host::Ipv4(a)) => ServerName::IpAddress(IpAddr::V4(a).into()),
        Some(Host::Ipv6(a)) => ServerName::IpAddress(IpAddr::V6(a).into()),
        _ => ServerName::try_from(host.clone()).map_err(|e| FetchError::Tls {
            host: host.clone(),
            reason: e.to_string(),
        })?,
    };
    let tls = tokio_rustls::TlsConnector::from(config.tls.clone())
        .connect(server_name, stream)
        .await
        .map_err(|e| FetchError::Tls {
            host: host.clone(),
            reason: e.to_string(),
        })?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");

    // The credential enters the request here and nowhere else; errors below never print the
    // request, so the value cannot leak through them.
    let mut target = url.clone();
    let mut builder = hyper::Request::builder().method(method.clone());
    match &credential.location {
        // The URL's own form encoding (`application/x-www-form-urlencoded`), not kz's
        // percent-encoder: `fetch` always sent query credentials that way.
        Location::Query { param } => {
            target
                .query_pairs_mut()
                .append_pair(param, credential.secret.expose());
        }
        Location::Header { name, prefix } => {
            let bad = |reason: &str| FetchError::Header {
                name: name.to_ascii_lowercase(),
                reason: reason.to_owned(),
            };
            let header = credential
                .location
                .header_name()
                .ok_or_else(|| bad("not a valid header name"))?;
            let value = Location::header_value(prefix, credential.secret.expose());
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| bad("the credential is not a valid header value"))?;
            value.set_sensitive(true);
            builder = builder.header(header, value);
        }
    }
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let path = match target.query() {
        Some(q) => format!("{}?{q}", target.path()),
        None => target.path().to_owned(),
    };
    builder = if h2 {
        builder.uri(format!("https://{authority}{path}"))
    } else {
        builder.uri(path).header(hyper::header::HOST, &authority)
    };
    builder = builder.header(hyper::header::ACCEPT_ENCODING, "identity");
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(body.clone()))
        .map_err(|e| FetchError::Http {
            host: host.clone(),
            reason: format!("building the request: {e}"),
        })?;

    let http_err = |e: hyper::Error| FetchError::Http {
        host: host.clone(),
        reason: e.to_string(),
    };
    let io = TokioIo::new(tls);
    if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(http_err)?;
        tokio::spawn(conn);
        sender.send_request(request).await.map_err(http_err)
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(http_err)?;
        tokio::spawn(conn);
        sender.send_request(request).await.map_err(http_err)
    }
}

async fn finish(
    config: &FetchConfig,
    response: hyper::Response<hyper::body::Incoming>,
    scrubber: &Scrubber,
    url: &Url,
    redirected: bool,
) -> Result<FetchResponse, FetchError> {
    let host = host_of(url);
    let (parts, mut incoming) = response.into_parts();
    if let Some(enc) = parts.headers.get(hyper::header::CONTENT_ENCODING) {
        let enc = String::from_utf8_lossy(enc.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if !enc.is_empty() && enc != "identity" {
            return Err(FetchError::Encoded(enc));
        }
    }
    // Headers the Connection header names are hop-by-hop too.
    let connection_named = hop::connection_named(&parts.headers);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        // content-length describes the upstream body, not the (scrubbed, capped) one returned.
        if hop::is_hop_by_hop(n)
            || DROPPED_RESPONSE_HEADERS.contains(&n)
            || n == "content-length"
            || connection_named.contains(name)
        {
            continue;
        }
        let value = scrubber.scrub_str(&String::from_utf8_lossy(value.as_bytes()));
        headers
            .entry(n.to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }

    // Read at most cap + lookahead (+1, so stopping early always means "longer than the cap"):
    // enough to scrub a value straddling the cap; the rest of an oversized body is never read
    // (the connection is dropped).
    let want = config
        .max_body
        .saturating_add(scrubber.lookahead())
        .saturating_add(1);
    let mut buf: Vec<u8> = Vec::new();
    let mut complete = false;
    while buf.len() < want {
        match incoming.frame().await {
            None => {
                complete = true;
                break;
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Err(FetchError::Http {
                    host,
                    reason: format!("reading the response body: {e}"),
                });
            }
        }
    }
    let (mut bytes, truncated) = scrubber.scrub_capped(&buf, config.max_body, complete);
    if truncated {
        // A cut inside a multi-byte character should not turn a text body into "binary".
        if let Err(e) = std::str::from_utf8(&bytes)
            && e.error_len().is_none()
        {
            bytes.truncate(e.valid_up_to());
        }
    }
    let (body, body_encoding) = match String::from_utf8(bytes) {
        Ok(text) => (text, "text"),
        Err(e) => (
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            "base64",
        ),
    };
    Ok(FetchResponse {
        status: parts.status.as_u16(),
        headers,
        body,
        body_encoding,
        truncated,
        // After redirects this URL was chosen by the upstream: it may echo the credential.
        url: if redirected {
            scrubber.scrub_str(url.as_str())
        } else {
            url.to_string()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let default = location(None).unwrap();
        assert_eq!(
            default.header_name(),
            Some(HeaderName::from_static("authorization"))
        );
        assert!(matches!(&default, Location::Header { prefix, .. } if prefix == "Bearer"));
        let key = location(Some("header:X-Api-Key")).unwrap();
        assert_eq!(
            key.header_name(),
            Some(HeaderName::from_static("x-api-key"))
        );
        assert!(matches!(&key, Location::Header { prefix, .. } if prefix.is_empty()));
        assert_eq!(
            location(Some("query:api_key")).unwrap(),
            Location::Query {
                param: "api_key".to_owned()
            }
        );
        // The grammar is egress::location's (tested there); fetch names the resource's spec.
        for bad in ["cookie:x", "header:bad name"] {
            assert!(
                matches!(location(Some(bad)), Err(FetchError::Location(ref spec)) if spec == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn urls() {
        assert!(matches!(
            parse_url("http://example.com/"),
            Err(FetchError::Scheme(_))
        ));
        assert!(matches!(
            parse_url("file:///etc/passwd"),
            Err(FetchError::Scheme(_))
        ));
        assert!(matches!(
            parse_url("not a url"),
            Err(FetchError::BadUrl { .. })
        ));
        let err = parse_url("https://user:pw@example.com/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("pw"), "{err}");
        // WHATWG parsing normalises odd IPv4 spellings, so the guard sees the real address.
        let u = parse_url("https://0x7f.1/").unwrap();
        assert_eq!(host_of(&u), "127.0.0.1");
        let u = parse_url("https://2130706433/").unwrap();
        assert_eq!(host_of(&u), "127.0.0.1");
        let u = parse_url("https://[::ffff:a9fe:a9fe]/").unwrap();
        assert_eq!(
            u.host(),
            Some(Host::Ipv6("::ffff:169.254.169.254".parse().unwrap()))
        );
    }

    #[test]
    fn agent_cannot_set_framing_or_credential_headers() {
        let loc = location(Some("header:X-Api-Key")).unwrap();
        let given: BTreeMap<String, String> = [
            ("Host", "evil"),
            ("X-Api-Key", "mine"),
            ("Accept-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
            ("X-Trace", "1"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        let out = agent_headers(&given, &loc).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.as_str(), "x-trace");
        let bad: BTreeMap<String, String> = [("X-A".to_owned(), "a\r\nInjected: 1".to_owned())]
            .into_iter()
            .collect();
        assert!(agent_headers(&bad, &loc).is_err());
        let many: BTreeMap<String, String> = (0..65)
            .map(|i| (format!("x-h{i}"), "v".to_owned()))
            .collect();
        let err = agent_headers(&many, &loc).unwrap_err().to_string();
        assert!(err.contains("at most 64 headers"), "{err}");
    }
}
