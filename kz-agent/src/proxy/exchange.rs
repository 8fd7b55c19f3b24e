//! One request's exchange with its upstream, as named phases over the request's and the
//! response's parts:
//! 1. [`swap_head`]: masked → real in the URL (percent-encoded) and header values, where the
//!    verified host is in the token's scope and the token sits where its secret's
//!    `credential_location` says (headers, Basic, a query parameter, the path);
//! 2. [`prepare_head`]: hop-by-hop headers out, identity encoding asked for where a secret may go;
//! 3. [`plan_body`]: the request body sent as is, counted, rewritten whole or streamed;
//! 4. [`target_uri`]: the absolute URI (and `Host`) for the upstream's protocol;
//! 5. (send) then [`scrub_head`]: real → masked in the response's header values;
//! 6. [`plan_response_body`]: the response body sent as is, counted, scrubbed whole or streamed.
//!
//! The phases are plain functions (no sockets, no runtime) with unit tests; [`forward`] and
//! [`respond`] run them in order. Every way a request is refused becomes a response in one
//! place, [`Rejection::respond`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{self, CountBody, Direction, ProxyBody, RewriteBody};
use super::metrics::Metrics;
use super::record::Record;
use super::serving::{ConnCtx, fields};
use super::tokens::{At, BodySwap, Scrubber, SwapPlan, Unswapped};
use super::upstream::{Upstream, UpstreamBody, UpstreamError};
use crate::egress::hop;
use crate::egress::location::{Keep, percent_encode};
use crate::egress::rewrite::{Decide, StreamRewriter};
use base64::Engine as _;

/// Why kz answers a request itself instead of with the upstream's response.
#[derive(Debug)]
pub enum Rejection {
    /// The request cannot be forwarded as it is (400).
    BadRequest {
        error: &'static str,
        message: String,
    },
    /// It carries a masked token kz did not swap (not allowed to go to `host`, outside its
    /// `credential_location`, or over cleartext HTTP), and the session refuses such requests
    /// (403).
    Unswapped {
        host: String,
        secret: String,
        why: Unswapped,
    },
    /// It goes to a host of a `require = true` secret without that secret's masked token (403).
    Required { host: String, secret: String },
    /// Its `Host` / `:authority` names another host than the one verified for the connection
    /// (421).
    Misdirected { verified: String, claimed: String },
    /// The connection rules do not allow `host` (403).
    Denied { host: String },
    /// The upstream could not be reached or spoke badly (502, 504 on a connect timeout).
    Upstream(UpstreamError),
    /// The upstream compressed its answer although kz asked for identity (502).
    UpstreamCompressed,
    /// Reading the upstream's response body failed (502).
    UpstreamBody(String),
    /// The request body stalled: `body_read_timeout` / `body_min_rate` (408).
    BodyTimeout(body::BodyTimeout),
    /// Bodies read whole already hold `max_buffered_total` (503, `Retry-After`).
    BuffersFull,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unswapped { .. } | Self::Required { .. } | Self::Denied { .. } => {
                StatusCode::FORBIDDEN
            }
            Self::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::Upstream(UpstreamError::ConnectTimeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            Self::Upstream(_) | Self::UpstreamCompressed | Self::UpstreamBody(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BuffersFull => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable name in the request's audit record (`error`).
    pub fn error(&self) -> &'static str {
        match self {
            Self::BadRequest { error, .. } => error,
            Self::Unswapped { why, .. } => why.error(),
            Self::Required { .. } => "token_required",
            Self::Misdirected { .. } => "host_mismatch",
            Self::Denied { .. } => "connection_denied",
            Self::Upstream(e) => e.kind(),
            Self::UpstreamCompressed => "upstream_compressed_response",
            Self::UpstreamBody(_) => "upstream_body_failed",
            Self::BodyTimeout(_) => body::BODY_TIMEOUT,
            Self::BuffersFull => "buffered_bodies_full",
        }
    }

    /// What the client reads.
    pub fn message(&self) -> String {
        match self {
            Self::BadRequest { message, .. } => message.clone(),
            Self::Unswapped {
                host,
                secret,
                why: Unswapped::OutOfScope,
            } => format!(
                "kz: this request carries the masked token of {secret}, which is not allowed to go to {host}; it was not sent"
            ),
            Self::Unswapped {
                host,
                secret,
                why: Unswapped::Plaintext,
            } => format!(
                "kz: this request to {host} carries the masked token of {secret} over cleartext HTTP; use https, or set `allow_plaintext = true` on the secret; it was not sent"
            ),
            Self::Unswapped {
                host,
                secret,
                why: Unswapped::Misplaced,
            } => format!(
                "kz: this request to {host} carries the masked token of {secret} outside the secret's credential_location; put it where the secret says (or extend credential_location); it was not sent"
            ),
            Self::Required { host, secret } => format!(
                "kz: requests to {host} must carry the masked token of {secret} (`require = true`); it was not sent"
            ),
            Self::Misdirected { verified, claimed } => format!(
                "kz: this connection was verified for {verified}, but the request names {claimed} (Host / :authority); open a connection to {claimed} instead"
            ),
            Self::Denied { host } => {
                format!("kz: connections to {host} are not allowed by the connection rules")
            }
            Self::Upstream(e) => format!("kz: {e}"),
            Self::UpstreamCompressed => "kz: the upstream sent a compressed response although kz asked for identity encoding; kz cannot scrub it, so it was not forwarded".into(),
            Self::UpstreamBody(e) => format!("kz: reading the upstream response failed: {e}"),
            Self::BodyTimeout(e) => e.to_string(),
            Self::BuffersFull => {
                "kz: too many request bodies are being buffered on this node; retry shortly".into()
            }
        }
    }

    fn upstream_side(&self) -> bool {
        matches!(
            self,
            Self::Upstream(_) | Self::UpstreamCompressed | Self::UpstreamBody(_)
        )
    }

    /// Notes the rejection in the request's record (and the upstream-error metric) and returns
    /// the response the client gets.
    pub fn respond(self, rec: &Record) -> Response<ProxyBody> {
        if self.upstream_side() {
            Metrics::inc(&rec.metrics().upstream_errors_total);
        }
        let status = self.status();
        rec.with(|f| {
            f.status = status.as_u16();
            f.error = Some(self.error().to_owned());
            f.refused |= matches!(
                self,
                Self::Unswapped { .. } | Self::Required { .. } | Self::Misdirected { .. }
            );
        });
        let mut r = text(status, self.message());
        // Both leave the request body unread: hyper closes an h1 connection after the answer
        // and resets an h2 stream, so what the client still sends costs nothing.
        if matches!(self, Self::BuffersFull) {
            Metrics::inc(&rec.metrics().buffered_bodies_full_total);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn bad_request(error: &'static str, message: &str) -> Rejection {
    Rejection::BadRequest {
        error,
        message: message.to_owned(),
    }
}

/// A short text response from kz itself.
pub fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(msg + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Real values placed into a URL, percent-encoded ([`Keep::Unreserved`]), for the tokens the
/// plan allows at one place of it.
struct UrlEncoded(Vec<Option<Vec<u8>>>);

impl UrlEncoded {
    fn new(plan: &SwapPlan, at: At<'_>) -> Self {
        let decide = plan.at(at);
        Self(
            (0..plan.snapshot().len())
                .map(|i| {
                    decide
                        .replacement(i)
                        .map(|v| percent_encode(v, Keep::Unreserved).into_bytes())
                })
                .collect(),
        )
    }
}

impl Decide for UrlEncoded {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        self.0.get(id).and_then(|v| v.as_deref())
    }
}

/// Phase 1: masked → real in the URL's path and query and in the header values, for the
/// tokens `plan` allows toward its host at the place each was found; `seen(token, swapped)`
/// hears of every token found (`swapped` false: left masked, [`SwapPlan::why_unswapped`] says
/// why). Returns the new path and query when a token was swapped into it.
pub fn swap_head(
    parts: &mut http::request::Parts,
    plan: &SwapPlan,
    seen: &mut dyn FnMut(usize, bool),
) -> Result<Option<String>, Rejection> {
    if plan.snapshot().is_empty() {
        return Ok(None);
    }
    let patterns = plan.patterns();
    let mut swapped_pq = None;
    if let Some(pq) = parts.uri.path_and_query() {
        let mut hit = false;
        patterns.for_each_match(pq.as_str().as_bytes(), |_| hit = true);
        if hit {
            let (path, query) = match pq.as_str().split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (pq.as_str(), None),
            };
            let mut changed = false;
            let mut out =
                match patterns.rewrite_all(path.as_bytes(), &UrlEncoded::new(plan, At::Path), seen)
                {
                    Some(v) => {
                        changed = true;
                        v
                    }
                    None => path.as_bytes().to_vec(),
                };
            if let Some(query) = query {
                out.push(b'?');
                for (i, pair) in query.split('&').enumerate() {
                    if i > 0 {
                        out.push(b'&');
                    }
                    let (name, value) = match pair.split_once('=') {
                        Some((n, v)) => (n, Some(v)),
                        None => (pair, None),
                    };
                    // A token in a parameter's name is never where a location points.
                    let nowhere = UrlEncoded(Vec::new());
                    match patterns.rewrite_all(name.as_bytes(), &nowhere, seen) {
                        Some(v) => out.extend_from_slice(&v),
                        None => out.extend_from_slice(name.as_bytes()),
                    }
                    if let Some(value) = value {
                        out.push(b'=');
                        let enc = UrlEncoded::new(plan, At::Query(name.as_bytes()));
                        match patterns.rewrite_all(value.as_bytes(), &enc, seen) {
                            Some(v) => {
                                changed = true;
                                out.extend_from_slice(&v);
                            }
                            None => out.extend_from_slice(value.as_bytes()),
                        }
                    }
                }
            }
            if changed {
                swapped_pq = Some(String::from_utf8_lossy(&out).into_owned());
            }
        }
    }
    for (name, value) in parts.headers.iter_mut() {
        let new = match basic_credentials(name, value.as_bytes()) {
            Some(decoded) => patterns
                .rewrite_all(&decoded, &plan.at(At::Basic), seen)
                .map(|v| {
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(v)
                    )
                    .into_bytes()
                }),
            None => patterns.rewrite_all(
                value.as_bytes(),
                &plan.at(At::Header(name, value.as_bytes())),
                seen,
            ),
        };
        if let Some(v) = new {
            *value = HeaderValue::from_bytes(&v).map_err(|_| {
                bad_request(
                    "swapped_header_invalid",
                    "kz: a swapped header value is not a valid header",
                )
            })?;
        }
    }
    Ok(swapped_pq)
}

/// The decoded `user:password` of an `Authorization: Basic …` value; `None` for any other
/// header or a value that is not valid base64 (then it is an ordinary header value).
fn basic_credentials(name: &http::HeaderName, value: &[u8]) -> Option<Vec<u8>> {
    if name != header::AUTHORIZATION {
        return None;
    }
    let v = value.trim_ascii();
    let (scheme, rest) = v.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()
}

/// The first `require = true` secret toward this host that `swapped` (token ids swapped in the
/// head) does not include.
pub fn missing_required(plan: &SwapPlan, swapped: &[usize]) -> Option<usize> {
    plan.required()
        .iter()
        .copied()
        .find(|id| !swapped.contains(id))
}

/// Do the `Host` header and the request target's authority (absolute form, or h2's
/// `:authority`) both name `verified`, with the connection's port if they give one? `None` when
/// they do, else the first other name claimed (for the 421).
pub fn misdirected(parts: &http::request::Parts, verified: &str, port: u16) -> Option<String> {
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let host = parts
        .headers
        .get_all(header::HOST)
        .iter()
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    authority.into_iter().chain(host).find(|claimed| {
        let Some((name, claimed_port)) = plain_authority(claimed, port) else {
            return true;
        };
        let same_name = name
            .trim_end_matches('.')
            .eq_ignore_ascii_case(verified.trim_end_matches('.'));
        !same_name || claimed_port != port
    })
}

/// `claimed` as `(name, port)` when it is a plain `host[:port]` or `[v6][:port]`: only name
/// characters, and a port, if one is written, that is a number. Anything else counts as another
/// name: `split_authority` falls back to the default for a port it cannot read, and
/// `api.test:x@evil.test` is host `evil.test` to the `http` crate and to lenient upstreams.
fn plain_authority(claimed: &str, default_port: u16) -> Option<(String, u16)> {
    let name_chars = |b: u8| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b);
    if claimed.is_empty() || !claimed.bytes().all(name_chars) {
        return None;
    }
    let written_port = match claimed.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.1.strip_prefix(':'),
        None => claimed
            .rsplit_once(':')
            .filter(|(h, _)| !h.contains(':'))
            .map(|(_, p)| p),
    };
    let (name, port) = super::serving::split_authority(claimed, default_port);
    match written_port {
        Some(p) if p.parse::<u16>().ok() != Some(port) => None,
        _ => Some((name, port)),
    }
}

/// Phase 2: hop-by-hop headers out (`Upgrade` kept for an upgrade); for an upgrade that may
/// carry tokens no permessage-deflate (compressed frames could hide a real value from the
/// scrubber); and where a secret may go (`guarded`), an identity-encoded response asked for so
/// every byte coming back can be scrubbed.
pub fn prepare_head(headers: &mut HeaderMap, upgrade: bool, has_tokens: bool, guarded: bool) {
    hop::strip(headers, upgrade);
    if upgrade && has_tokens {
        headers.remove("sec-websocket-extensions");
    }
    if guarded {
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
}

/// How a body crosses the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// No body.
    Empty,
    /// Passed through, bytes counted: unsized or long, and nothing in it can need a rewrite.
    Count,
    /// Read whole (its Content-Length is at most `max_buffered_body`) before the upstream is
    /// asked, rewritten where it may need it, sent with its exact length.
    Buffer,
    /// Rewritten as it streams (chunked, or longer than `max_buffered_body`).
    Stream,
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Phase 3: how the request body goes up.
///
/// A body of known length up to `max` is read whole before the upstream is asked, whether or
/// not it needs scanning (`scan`: a token may be swapped in it, or one found there refuses the
/// request): a client that trickles its body then holds bytes of the node's bounded buffer
/// pool and its own connection, never an upstream connection too (nginx's request buffering,
/// for the same reason). Longer or unsized bodies stream: through the rewriter when `scan`,
/// else counted.
pub fn plan_body(headers: &HeaderMap, end_stream: bool, scan: bool, max: usize) -> BodyPlan {
    if end_stream {
        return BodyPlan::Empty;
    }
    match content_length(headers) {
        Some(n) if n <= max as u64 => BodyPlan::Buffer,
        _ if scan => BodyPlan::Stream,
        _ => BodyPlan::Count,
    }
}

/// Phase 4: the request line for the upstream's protocol, built from parsed parts (the URL is
/// parsed again only when a token was swapped into it): absolute form here, the upstream side
/// turns it into what its protocol needs. A request without `Host` gets one.
pub fn target_uri(
    parts: &mut http::request::Parts,
    host: &str,
    port: u16,
    tls: bool,
    swapped_pq: Option<String>,
) -> Result<(), Rejection> {
    let authority = match parts.uri.authority().cloned() {
        Some(a) => Some(a),
        None => match parts.headers.get(header::HOST) {
            Some(h) => Authority::try_from(h.as_bytes()).ok(),
            None if (tls && port == 443) || (!tls && port == 80) => Authority::try_from(host).ok(),
            None => Authority::try_from(format!("{host}:{port}")).ok(),
        },
    };
    if authority.is_none() {
        return Err(bad_request(
            "host_invalid",
            "kz: the request's Host is not a valid host[:port]",
        ));
    }
    let path_and_query = match swapped_pq {
        None => Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        ),
        Some(s) => PathAndQuery::try_from(s).ok(),
    };
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    uri_parts.authority = authority;
    uri_parts.path_and_query = path_and_query;
    let uri = match Uri::from_parts(uri_parts) {
        Ok(u) if u.authority().is_some() && u.path_and_query().is_some() => u,
        _ => {
            return Err(bad_request(
                "swapped_url_invalid",
                "kz: the request URL is not valid after swapping",
            ));
        }
    };
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.uri = uri;
    Ok(())
}

/// Phase 5: real → masked in every response header value (`Location` too); `seen` hears the
/// secret's name and the spelling found.
pub fn scrub_head(
    headers: &mut HeaderMap,
    scrub: &Scrubber,
    seen: &mut dyn FnMut(&str, &'static str),
) {
    for (_, value) in headers.iter_mut() {
        if let Some(v) = scrub.rewrite_value(value.as_bytes(), seen) {
            // A scrubbed value that is no longer a valid header (no replacement kz writes makes
            // one, but this is the last line of defence) goes out empty, never as it came.
            *value = HeaderValue::from_bytes(&v).unwrap_or_else(|_| HeaderValue::from_static(""));
        }
    }
}

/// Phase 6: how the response body comes down. A compressed body from a host a secret may go to
/// is refused: kz asked for identity, and a compressed body could hide a real value from the
/// scrubber.
pub fn plan_response_body(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    has_tokens: bool,
    guarded: bool,
    max: usize,
) -> Result<BodyPlan, Rejection> {
    let no_body = method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    if no_body {
        return Ok(BodyPlan::Empty);
    }
    if !has_tokens {
        return Ok(BodyPlan::Count);
    }
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    if encoded && guarded {
        return Err(Rejection::UpstreamCompressed);
    }
    Ok(match content_length(headers) {
        Some(n) if n <= max as u64 => BodyPlan::Buffer,
        _ => BodyPlan::Stream,
    })
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Bytes a body of `declared` length must bring per `body_read_timeout` of waiting.
fn min_window_bytes(limits: &super::Limits, declared: Option<u64>) -> u64 {
    match declared {
        Some(n) if n > 0 => limits
            .body_min_rate
            .saturating_mul(limits.body_read_timeout.as_secs().max(1)),
        _ => 0,
    }
}

/// The request body under the body read timeout (every plan).
fn timed(
    incoming: Incoming,
    limits: &super::Limits,
    declared: Option<u64>,
    rec: &Arc<Record>,
) -> body::TimedBody<Incoming> {
    body::TimedBody::new(
        incoming,
        limits.body_read_timeout,
        min_window_bytes(limits, declared),
        Some(rec.clone()),
    )
}

/// Reads a request body of at most `limit` bytes whole, its bytes taken from the node's
/// buffer pool as they arrive.
async fn read_request_body(
    incoming: body::TimedBody<Incoming>,
    limit: usize,
    sh: &super::Shared,
) -> Result<(Bytes, body::Reserved), Rejection> {
    let none = sh.buffers.reserve(0).ok_or(Rejection::BuffersFull)?;
    body::read_whole(incoming, limit, &sh.buffers, none)
        .await
        .map_err(|e| match e {
            body::ReadWholeError::Timeout(t) => Rejection::BodyTimeout(t),
            body::ReadWholeError::PoolFull => Rejection::BuffersFull,
            e => Rejection::BadRequest {
                error: "request_body_read_failed",
                message: format!("kz: {e}"),
            },
        })
}

struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one request through the phases to `up` and returns what the client gets.
pub async fn forward(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
    host: String,
    port: u16,
    up: Arc<Upstream>,
    tls: bool,
) -> Response<ProxyBody> {
    let sh = ctx.sh.clone();
    Metrics::inc(&sh.metrics.requests_total);
    ctx.inflight.fetch_add(1, Ordering::Relaxed);
    let guard = InflightGuard(ctx.inflight.clone());
    let rec = Record::new(
        sh.clone(),
        ctx.session.audit.clone(),
        fields(&ctx, &req, &host, port),
        Some(Box::new(guard)),
    );
    let (snap, plan, guarded) = ctx.plan_for(&host, !tls);
    let refuse_out_of_scope = ctx.session.refuse_out_of_scope;
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    // A shared front end routes by Host: a value verified for one name must not be carried to
    // another behind the same address. (Plain HTTP's host was checked against the same claim.)
    if let Some(claimed) = misdirected(&parts, &host, port) {
        return Rejection::Misdirected {
            verified: host,
            claimed,
        }
        .respond(&rec);
    }
    let mut unswapped: Option<(usize, Unswapped)> = None;
    let mut swapped: Vec<usize> = Vec::new();
    let mut seen = |id: usize, replaced: bool| {
        if replaced {
            rec.token(snap.name(id), true);
            if !swapped.contains(&id) {
                swapped.push(id);
            }
        } else {
            let why = plan.why_unswapped(id);
            unswapped.get_or_insert((id, why));
            rec.unswapped(snap.name(id), why);
        }
    };

    let swapped_pq = match swap_head(&mut parts, &plan, &mut seen) {
        Ok(pq) => pq,
        Err(r) => return r.respond(&rec),
    };
    if let Some((id, why)) = unswapped
        && refuse_out_of_scope
    {
        return Rejection::Unswapped {
            host,
            secret: snap.name(id).to_owned(),
            why,
        }
        .respond(&rec);
    }
    if let Some(id) = missing_required(&plan, &swapped) {
        return Rejection::Required {
            host,
            secret: snap.name(id).to_owned(),
        }
        .respond(&rec);
    }
    prepare_head(&mut parts.headers, upgrade, !snap.is_empty(), guarded);

    // A body is read through the swapper only where a token may be swapped in it, or where a
    // token found in it must refuse the request.
    let body_swaps = plan.body_swaps();
    let scan = !snap.is_empty() && (body_swaps || refuse_out_of_scope);
    let plan_now = plan_body(
        &parts.headers,
        incoming.is_end_stream(),
        scan,
        sh.limits.max_buffered_body,
    );
    let declared = content_length(&parts.headers);
    let incoming = timed(incoming, &sh.limits, declared, &rec);
    let up_body = match plan_now {
        BodyPlan::Empty => body::empty(),
        BodyPlan::Count => CountBody::new(incoming, rec.clone(), Direction::Up).boxed(),
        BodyPlan::Buffer => {
            let limit = declared.map_or(0, |n| n as usize);
            let (data, held) = match read_request_body(incoming, limit, &sh).await {
                Ok(x) => x,
                Err(r) => return r.respond(&rec),
            };
            let mut unswapped: Option<(usize, Unswapped)> = None;
            let mut seen = |id: usize, replaced: bool| {
                if replaced {
                    rec.token(snap.name(id), true);
                } else {
                    let why = plan.why_unswapped(id);
                    unswapped.get_or_insert((id, why));
                    rec.unswapped(snap.name(id), why);
                }
            };
            let out = if scan {
                plan.patterns()
                    .rewrite_all(&data, &plan.at(At::Body), &mut seen)
                    .map_or(data, Bytes::from)
            } else {
                data
            };
            if let Some((id, why)) = unswapped
                && refuse_out_of_scope
            {
                return Rejection::Unswapped {
                    host,
                    secret: snap.name(id).to_owned(),
                    why,
                }
                .respond(&rec);
            }
            rec.bytes_up.fetch_add(out.len() as u64, Ordering::Relaxed);
            Metrics::add(&sh.metrics.bytes_upstream_total, out.len() as u64);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            body::full_held(out, held)
        }
        BodyPlan::Stream => {
            // Only a swap changes a body's length: where none can happen the length stays exact
            // (object stores refuse chunked uploads). Elsewhere it is known only at the end:
            // chunked / h2 DATA frames.
            if body_swaps {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            let rw = StreamRewriter::new(plan.patterns().clone(), Arc::new(BodySwap(plan.clone())));
            RewriteBody::new(
                incoming,
                rw,
                snap.clone(),
                rec.clone(),
                Direction::Up,
                refuse_out_of_scope,
            )
            .swapping(plan.clone())
            .boxed()
        }
    };

    if let Err(r) = target_uri(&mut parts, &host, port, tls, swapped_pq) {
        return r.respond(&rec);
    }
    let method = parts.method.clone();
    let resp = match up.send(&sh, Request::from_parts(parts, up_body)).await {
        Ok(r) => r,
        // A streamed body that met an out-of-scope token stopped the send.
        Err(_) if rec.with(|f| f.refused) => {
            let (secret, why) = rec.with(|f| {
                (
                    f.out_of_scope.iter().next().cloned().unwrap_or_default(),
                    f.unswapped.unwrap_or(Unswapped::OutOfScope),
                )
            });
            return Rejection::Unswapped { host, secret, why }.respond(&rec);
        }
        // A streamed or passed-through body stalled and stopped the send.
        Err(_) if rec.with(|f| f.error.as_deref() == Some(body::BODY_TIMEOUT)) => {
            return Rejection::BodyTimeout(body::BodyTimeout {
                idle: sh.limits.body_read_timeout,
                min_bytes: min_window_bytes(&sh.limits, declared),
            })
            .respond(&rec);
        }
        Err(e) => return Rejection::Upstream(e).respond(&rec),
    };
    respond(ctx, rec, plan, guarded, method, resp, client_upgrade).await
}

/// The response phases: scrub the head, then the body as planned (or relay an upgrade).
async fn respond(
    ctx: Arc<ConnCtx>,
    rec: Arc<Record>,
    plan: Arc<SwapPlan>,
    guarded: bool,
    method: Method,
    mut resp: Response<UpstreamBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    let snap = plan.snapshot().clone();
    let sh = ctx.sh.clone();
    let status = resp.status();
    rec.with(|f| f.status = status.as_u16());
    let scrub = Scrubber::for_snapshot(snap.clone());
    if status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let refuse = ctx.session.refuse_out_of_scope;
        relay_upgrade(&mut resp, client, &rec, &plan, refuse, &scrub);
    }
    let (mut parts, incoming) = resp.into_parts();
    if !snap.is_empty() {
        scrub_head(&mut parts.headers, &scrub, &mut |name, form| {
            rec.scrubbed(name, form)
        });
    }
    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS;
    hop::strip(&mut parts.headers, upgraded);
    if upgraded {
        return Response::from_parts(parts, body::empty());
    }
    let mut planned = plan_response_body(
        &method,
        status,
        &parts.headers,
        !snap.is_empty(),
        guarded,
        sh.limits.max_buffered_body,
    );
    // A response read whole holds its length of the node's buffer pool until it is sent (an
    // agent that does not read its answers would otherwise pin them); with the pool held it
    // streams, which for a response costs nothing more.
    let mut held = None;
    if let Ok(BodyPlan::Buffer) = planned {
        let len = content_length(&parts.headers).map_or(0, |n| n as usize);
        held = sh.buffers.reserve(len).map(|h| (h, len));
        if held.is_none() {
            Metrics::inc(&sh.metrics.buffered_responses_streamed_total);
            planned = Ok(BodyPlan::Stream);
        }
    }
    match planned {
        Err(r) => r.respond(&rec),
        Ok(BodyPlan::Empty) => Response::from_parts(parts, body::empty()),
        Ok(BodyPlan::Count) => Response::from_parts(
            parts,
            CountBody::new(incoming, rec, Direction::Down).boxed(),
        ),
        Ok(BodyPlan::Buffer) => {
            let Some((held, len)) = held else {
                return Rejection::BuffersFull.respond(&rec);
            };
            let (data, held) = match body::read_whole(incoming, len, &sh.buffers, held).await {
                Ok(x) => x,
                Err(e) => return Rejection::UpstreamBody(e.to_string()).respond(&rec),
            };
            let mut seen = |name: &str, form| rec.scrubbed(name, form);
            let out = scrub
                .rewrite_value(&data, &mut seen)
                .map_or(data, Bytes::from);
            rec.bytes_down
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            Metrics::add(&sh.metrics.bytes_downstream_total, out.len() as u64);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            Response::from_parts(parts, body::full_held(out, held))
        }
        Ok(BodyPlan::Stream) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let rw = scrub.stream();
            let b = RewriteBody::new(incoming, rw, snap, rec, Direction::Down, false);
            Response::from_parts(parts, b.boxed())
        }
    }
}

/// Relays an upgraded connection (101) on its own task. A WebSocket is re-framed both ways:
/// up with the request body's swap rules (`refuse` closes it at a token left masked), down
/// scrubbed. Other upgraded protocols go up as they come (kz cannot read them, so it swaps
/// nothing in them) and get nothing down from hosts holding secrets (their bytes cannot be
/// scrubbed).
fn relay_upgrade(
    resp: &mut Response<UpstreamBody>,
    client: hyper::upgrade::OnUpgrade,
    rec: &Arc<Record>,
    plan: &Arc<SwapPlan>,
    refuse: bool,
    scrub: &Scrubber,
) {
    let server = hyper::upgrade::on(&mut *resp);
    let rec = rec.clone();
    let plan = plan.clone();
    let snap = plan.snapshot().clone();
    let rw = scrub.stream();
    let is_ws = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    tokio::spawn(async move {
        let (Ok(c), Ok(s)) = (client.await, server.await) else {
            return;
        };
        let (mut cr, cw) = tokio::io::split(TokioIo::new(c));
        let (sr, mut sw) = tokio::io::split(TokioIo::new(s));
        let left_masked = std::sync::atomic::AtomicBool::new(false);
        let up = async {
            if !is_ws || snap.is_empty() {
                let n = tokio::io::copy(&mut cr, &mut sw).await.unwrap_or(0);
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
                return n;
            }
            let swap =
                StreamRewriter::new(plan.patterns().clone(), Arc::new(BodySwap(plan.clone())));
            let mut seen = |id: usize, replaced: bool| {
                if replaced {
                    rec.token(snap.name(id), true);
                } else {
                    rec.unswapped(snap.name(id), plan.why_unswapped(id));
                    left_masked.store(true, Ordering::Relaxed);
                }
            };
            let refused = || refuse && left_masked.load(Ordering::Relaxed);
            match super::ws::relay_up(cr, sw, swap, &mut seen, &refused).await {
                Ok(n) => n,
                Err(e) => {
                    if matches!(e, super::ws::WsError::Refused) {
                        rec.with(|f| {
                            f.refused = true;
                            f.error.get_or_insert_with(|| {
                                f.unswapped
                                    .unwrap_or(Unswapped::OutOfScope)
                                    .error()
                                    .to_owned()
                            });
                        });
                    }
                    tracing::info!(error = %e, "WebSocket relay closed");
                    0
                }
            }
        };
        let down = async {
            if !is_ws && !snap.is_empty() {
                return 0;
            }
            let mut seen =
                |id: usize, _| rec.scrubbed(snap.scrubbed_name(id), snap.scrubbed_form(id));
            match super::ws::relay_down(sr, cw, rw, &mut seen).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::info!(error = %e, "WebSocket relay closed");
                    0
                }
            }
        };
        let (a, b) = tokio::join!(up, down);
        rec.bytes_up.fetch_add(a, Ordering::Relaxed);
        rec.bytes_down.fetch_add(b, Ordering::Relaxed);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::location::Places;
    use crate::proxy::{TokenSpec, TokenTable};
    use crate::secret::Secret;

    const REAL: &str = "sk-real/value+0123456789";

    /// A table with one secret scoped to api.test (swapped wherever kz can: any header, Basic,
    /// the path, the body and `?key=`), and its masked token.
    fn table() -> (TokenTable, String) {
        table_with(|s| TokenSpec {
            places: Places::everywhere().with_query("key"),
            ..s
        })
    }

    /// A table with one secret scoped to api.test, set up by `f` from the defaults.
    fn table_with(f: impl FnOnce(TokenSpec) -> TokenSpec) -> (TokenTable, String) {
        let masked = TokenTable::generate_masked();
        let t = TokenTable::new();
        t.add(f(TokenSpec::new(
            "API_KEY",
            &masked,
            Secret::new(REAL),
            vec!["api.test".into()],
        )))
        .unwrap();
        (t, masked)
    }

    fn places(specs: &[&str]) -> Places {
        Places::parse(specs).unwrap()
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// Runs phase 1 toward `host`; returns the swapped path and query and what `seen` heard.
    fn swap(parts: &mut http::request::Parts, t: &TokenTable, host: &str) -> Swapped {
        swap_over(parts, t, host, false).0
    }

    /// What phase 1 returned and what `seen` heard.
    type Swapped = (Option<String>, Vec<(usize, bool)>);

    /// Phase 1 toward `host` (over cleartext when `plaintext`); also returns the plan, for
    /// `why_unswapped` and `missing_required`.
    fn swap_over(
        parts: &mut http::request::Parts,
        t: &TokenTable,
        host: &str,
        plaintext: bool,
    ) -> (Swapped, SwapPlan) {
        let plan = SwapPlan::new(t.snapshot(), host, plaintext);
        let mut heard = Vec::new();
        let pq = swap_head(parts, &plan, &mut |id, ok| heard.push((id, ok))).unwrap();
        ((pq, heard), plan)
    }

    fn b64(v: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(v)
    }

    #[test]
    fn by_default_a_token_is_swapped_in_headers_only() {
        let (t, masked) = table_with(|s| s);
        let bearer = format!("Bearer {masked}");
        let mut p = request(
            &format!("/bot{masked}/x?key={masked}"),
            &[("authorization", &bearer), ("x-any", &masked)],
        );
        let ((pq, heard), plan) = swap_over(&mut p, &t, "api.test", false);
        assert_eq!(pq, None, "the URL keeps the masked token");
        assert_eq!(
            p.headers["authorization"],
            format!("Bearer {REAL}").as_str()
        );
        assert_eq!(p.headers["x-any"], REAL);
        assert_eq!(
            heard.iter().filter(|(_, ok)| !ok).count(),
            2,
            "path and query: {heard:?}"
        );
        assert_eq!(plan.why_unswapped(0), Unswapped::Misplaced);
        assert!(!plan.body_swaps(), "no body swap by default");
    }

    #[test]
    fn a_header_location_names_the_header_and_its_prefix() {
        let (t, masked) = table_with(|s| TokenSpec {
            places: places(&["header:Authorization:Bearer", "header:X-Api-Key"]),
            ..s
        });
        let cases = [
            ("authorization", format!("Bearer {masked}"), true),
            ("authorization", format!("bearer  {masked} "), true),
            ("authorization", format!("token {masked}"), false),
            ("authorization", format!("Bearer {masked} extra"), false),
            ("x-api-key", masked.clone(), true),
            ("x-api-key", format!("pre-{masked}"), true),
            ("x-echo-me", masked.clone(), false),
            ("cookie", format!("s={masked}"), false),
        ];
        for (name, value, swapped) in cases {
            let mut p = request("/", &[(name, &value)]);
            let ((_, heard), _) = swap_over(&mut p, &t, "api.test", false);
            assert_eq!(heard, vec![(0, swapped)], "{name}: {value}");
            assert_eq!(
                p.headers[name].to_str().unwrap().contains(REAL),
                swapped,
                "{name}: {value}"
            );
        }
    }

    #[test]
    fn basic_credentials_are_decoded_swapped_and_re_encoded() {
        let (t, masked) = table_with(|s| s);
        let mut p = request(
            "/",
            &[(
                "authorization",
                &format!("Basic {}", b64(&format!("x-token:{masked}"))),
            )],
        );
        let ((_, heard), _) = swap_over(&mut p, &t, "api.test", false);
        assert_eq!(heard, vec![(0, true)]);
        assert_eq!(
            p.headers["authorization"],
            format!("Basic {}", b64(&format!("x-token:{REAL}"))).as_str()
        );
        // `basic` not listed: the token stays masked inside the encoding.
        let (t, masked) = table_with(|s| TokenSpec {
            places: places(&["header:X-Api-Key"]),
            ..s
        });
        let value = format!("Basic {}", b64(&format!("u:{masked}")));
        let mut p = request("/", &[("authorization", &value)]);
        let ((_, heard), plan) = swap_over(&mut p, &t, "api.test", false);
        assert_eq!(heard, vec![(0, false)]);
        assert_eq!(plan.why_unswapped(0), Unswapped::Misplaced);
        assert_eq!(p.headers["authorization"], value.as_str());
    }

    #[test]
    fn a_query_location_names_its_parameter_and_path_is_opt_in() {
        let (t, masked) = table_with(|s| TokenSpec {
            places: places(&["query:api_key", "path"]),
            ..s
        });
        let mut p = request(
            &format!("/bot{masked}/send?api_key={masked}&other={masked}&{masked}=1"),
            &[],
        );
        let ((pq, heard), _) = swap_over(&mut p, &t, "api.test", false);
        let enc = "sk-real%2Fvalue%2B0123456789";
        assert_eq!(
            pq.as_deref(),
            Some(format!("/bot{enc}/send?api_key={enc}&other={masked}&{masked}=1").as_str())
        );
        assert_eq!(
            heard,
            vec![(0, true), (0, true), (0, false), (0, false)],
            "path, api_key swapped; another parameter and a parameter name are not"
        );
        // A header is not a listed place either.
        let mut p = request("/", &[("x-api-key", &masked)]);
        let ((_, heard), _) = swap_over(&mut p, &t, "api.test", false);
        assert_eq!(heard, vec![(0, false)]);
    }

    #[test]
    fn cleartext_http_carries_a_value_only_when_the_secret_allows_it() {
        let (t, masked) = table_with(|s| s);
        let mut p = request("/", &[("x-api-key", &masked)]);
        let ((_, heard), plan) = swap_over(&mut p, &t, "api.test", true);
        assert_eq!(heard, vec![(0, false)]);
        assert_eq!(plan.why_unswapped(0), Unswapped::Plaintext);
        let (t, masked) = table_with(|s| TokenSpec {
            allow_plaintext: true,
            ..s
        });
        let mut p = request("/", &[("x-api-key", &masked)]);
        let ((_, heard), _) = swap_over(&mut p, &t, "api.test", true);
        assert_eq!(heard, vec![(0, true)]);
    }

    #[test]
    fn a_required_token_must_be_in_the_head_toward_its_hosts() {
        let (t, masked) = table_with(|s| TokenSpec { require: true, ..s });
        let mut p = request("/", &[("authorization", "Bearer sk-smuggled-real-key")]);
        let ((_, heard), plan) = swap_over(&mut p, &t, "api.test", false);
        assert!(heard.is_empty());
        assert_eq!(missing_required(&plan, &[]), Some(0));
        let mut p = request("/", &[("authorization", &format!("Bearer {masked}"))]);
        let ((_, heard), plan) = swap_over(&mut p, &t, "api.test", false);
        assert_eq!(missing_required(&plan, &[0]), None, "{heard:?}");
        // Other hosts are not concerned.
        let plan = SwapPlan::new(t.snapshot(), "other.test", false);
        assert_eq!(missing_required(&plan, &[]), None);
        // A required secret needs hosts and a head location.
        let bad = TokenTable::new().add(TokenSpec {
            require: true,
            ..TokenSpec::new("X", &masked, Secret::new(REAL), vec![])
        });
        assert!(matches!(
            bad,
            Err(crate::proxy::TokenError::RequireWithoutHosts(_))
        ));
        let bad = TokenTable::new().add(TokenSpec {
            require: true,
            places: places(&["body"]),
            ..TokenSpec::new("X", &masked, Secret::new(REAL), vec!["api.test".into()])
        });
        assert!(matches!(
            bad,
            Err(crate::proxy::TokenError::RequireInBody(_))
        ));
    }

    #[test]
    fn host_and_authority_must_name_the_verified_host() {
        let ok = [
            ("/", Some("api.test")),
            ("/", Some("API.test.")),
            ("/", Some("api.test:443")),
            ("https://api.test/x", None),
            ("https://api.test:443/x", Some("api.test")),
            ("/", None),
        ];
        for (uri, host) in ok {
            let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
            let p = request(uri, &headers);
            assert_eq!(misdirected(&p, "api.test", 443), None, "{uri} {host:?}");
        }
        let bad = [
            ("/", Some("evil.test"), "evil.test"),
            ("/", Some("api.test:8443"), "api.test:8443"),
            ("/", Some("api.test.evil"), "api.test.evil"),
            ("https://evil.test/x", Some("api.test"), "evil.test"),
            ("https://api.test/x", Some("evil.test"), "evil.test"),
        ];
        for (uri, host, claimed) in bad {
            let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
            let p = request(uri, &headers);
            assert_eq!(
                misdirected(&p, "api.test", 443).as_deref(),
                Some(claimed),
                "{uri} {host:?}"
            );
        }
    }

    /// Found by fuzz/fuzz_targets/http_head.rs: a port `split_authority` cannot read fell back to
    /// the connection's port, so `api.test:x@evil.test` passed for `api.test` while the `http`
    /// crate (and a lenient upstream) reads its host as `evil.test`.
    #[test]
    fn a_host_with_userinfo_or_an_unreadable_port_is_misdirected() {
        for claimed in [
            "api.test:x@evil.test",
            "api.test:443@evil.test",
            "api.test:4yy@y43",
            "api.test:",
            "api.test:99999",
            "api.test:+443",
            "api.test 443",
            "[::1]:x",
        ] {
            let p = request("/", &[("host", claimed)]);
            assert_eq!(
                misdirected(&p, "api.test", 443).as_deref(),
                Some(claimed),
                "{claimed}"
            );
        }
        let p = request("/", &[("host", "[::1]:443")]);
        assert_eq!(misdirected(&p, "::1", 443), None);
    }

    #[test]
    fn a_token_in_a_header_is_swapped_toward_its_host_only() {
        let (t, masked) = table();
        let bearer = format!("Bearer {masked}");
        let mut p = request("/v1", &[("authorization", &bearer)]);
        let (pq, heard) = swap(&mut p, &t, "api.test");
        assert_eq!(pq, None);
        assert_eq!(heard, vec![(0, true)]);
        assert_eq!(
            p.headers["authorization"],
            format!("Bearer {REAL}").as_str()
        );

        let mut p = request("/v1", &[("authorization", &bearer)]);
        let (_, heard) = swap(&mut p, &t, "evil.test");
        assert_eq!(heard, vec![(0, false)], "out of scope must be reported");
        assert_eq!(p.headers["authorization"], bearer.as_str());
    }

    #[test]
    fn a_token_in_the_url_is_swapped_percent_encoded() {
        let (t, masked) = table();
        let mut p = request(&format!("/q?key={masked}&x=1"), &[]);
        let (pq, heard) = swap(&mut p, &t, "api.test");
        assert_eq!(heard, vec![(0, true)]);
        assert_eq!(
            pq.as_deref(),
            Some("/q?key=sk-real%2Fvalue%2B0123456789&x=1")
        );
        // A URL without a token is left alone (not re-parsed).
        let mut p = request("/plain?x=1", &[]);
        assert_eq!(swap(&mut p, &t, "api.test").0, None);
    }

    #[test]
    fn nothing_is_touched_without_tokens() {
        let t = TokenTable::new();
        let mut p = request(
            "/a?b=c",
            &[("x-a", "kz_masked_00000000000000000000000000000000")],
        );
        let (pq, heard) = swap(&mut p, &t, "api.test");
        assert_eq!((pq, heard.len()), (None, 0));
    }

    #[test]
    fn the_head_loses_hop_headers_and_asks_for_identity_where_a_secret_may_go() {
        let mut h = request(
            "/",
            &[
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("accept-encoding", "gzip"),
                ("sec-websocket-extensions", "permessage-deflate"),
                ("upgrade", "websocket"),
            ],
        )
        .headers;
        prepare_head(&mut h, true, true, true);
        assert!(h.get("x-hop").is_none() && h.get("keep-alive").is_none());
        assert_eq!(
            h["connection"], "upgrade",
            "an upgrade is announced again, alone"
        );
        assert_eq!(h["upgrade"], "websocket", "an upgrade keeps Upgrade");
        assert!(h.get("sec-websocket-extensions").is_none());
        assert_eq!(h["accept-encoding"], "identity");

        let mut h = request("/", &[("accept-encoding", "gzip")]).headers;
        prepare_head(&mut h, false, false, false);
        assert_eq!(h["accept-encoding"], "gzip", "no secret may go there");
    }

    #[test]
    fn bodies_are_planned_by_tokens_and_length() {
        let h = |cl: Option<&str>| {
            let mut m = HeaderMap::new();
            if let Some(v) = cl {
                m.insert(header::CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert_eq!(plan_body(&h(Some("5")), true, true, 10), BodyPlan::Empty);
        // Known and small: read whole first, scanned or not (see plan_body).
        assert_eq!(plan_body(&h(Some("5")), false, false, 10), BodyPlan::Buffer);
        assert_eq!(plan_body(&h(Some("11")), false, false, 10), BodyPlan::Count);
        assert_eq!(plan_body(&h(None), false, false, 10), BodyPlan::Count);
        assert_eq!(plan_body(&h(Some("10")), false, true, 10), BodyPlan::Buffer);
        assert_eq!(plan_body(&h(Some("11")), false, true, 10), BodyPlan::Stream);
        assert_eq!(plan_body(&h(None), false, true, 10), BodyPlan::Stream);
        assert_eq!(plan_body(&h(Some("x")), false, true, 10), BodyPlan::Stream);
    }

    #[test]
    fn the_target_uri_is_absolute_with_a_host() {
        let mut p = request("/a?b=1", &[("host", "api.test:8443")]);
        target_uri(&mut p, "api.test", 8443, true, None).unwrap();
        assert_eq!(p.uri, "https://api.test:8443/a?b=1");

        // No Host: the verified host, with the port unless it is the scheme's.
        let mut p = request("/a", &[]);
        target_uri(&mut p, "api.test", 443, true, None).unwrap();
        assert_eq!(p.uri, "https://api.test/a");
        assert_eq!(p.headers["host"], "api.test");
        let mut p = request("/a", &[]);
        target_uri(&mut p, "api.test", 8080, false, None).unwrap();
        assert_eq!(p.uri, "http://api.test:8080/a");
        assert_eq!(p.headers["host"], "api.test:8080");

        // The swapped path replaces the original.
        let mut p = request("/a?k=masked", &[("host", "api.test")]);
        target_uri(&mut p, "api.test", 443, true, Some("/a?k=real".into())).unwrap();
        assert_eq!(p.uri, "https://api.test/a?k=real");
    }

    #[test]
    fn a_bad_host_or_swapped_url_is_a_specific_400() {
        let mut p = request("/a", &[("host", "bad host")]);
        let r = target_uri(&mut p, "api.test", 443, true, None).unwrap_err();
        assert_eq!(
            (r.status(), r.error()),
            (StatusCode::BAD_REQUEST, "host_invalid")
        );
        let mut p = request("/a", &[("host", "api.test")]);
        let r = target_uri(&mut p, "api.test", 443, true, Some("no slash \n".into())).unwrap_err();
        assert_eq!(r.error(), "swapped_url_invalid");
    }

    #[test]
    fn response_headers_are_scrubbed() {
        let (t, masked) = table();
        let scrub = Scrubber::for_snapshot(t.snapshot());
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo",
            HeaderValue::from_str(&format!("key={REAL}")).unwrap(),
        );
        h.insert("x-other", HeaderValue::from_static("fine"));
        // A redirect carrying the value as kz percent-encoded it into a URL.
        let enc = percent_encode(REAL.as_bytes(), Keep::Unreserved);
        h.insert(
            header::LOCATION,
            HeaderValue::from_str(&format!("/next?k={enc}")).unwrap(),
        );
        let mut heard = Vec::new();
        scrub_head(&mut h, &scrub, &mut |n, f| heard.push((n.to_owned(), f)));
        assert_eq!(h["x-echo"], format!("key={masked}").as_str());
        assert_eq!(h["x-other"], "fine");
        assert_eq!(h[header::LOCATION], format!("/next?k={masked}").as_str());
        heard.sort();
        assert_eq!(
            heard,
            vec![
                ("API_KEY".to_owned(), "percent"),
                ("API_KEY".to_owned(), "raw")
            ]
        );
    }

    #[test]
    fn response_bodies_are_planned_and_compressed_ones_refused_where_a_secret_may_go() {
        let mut gz = HeaderMap::new();
        gz.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        gz.insert(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
        let ok = StatusCode::OK;
        let plan = |m: &Method, s, h: &HeaderMap, tokens, guarded| {
            plan_response_body(m, s, h, tokens, guarded, 10)
        };
        assert_eq!(
            plan(&Method::HEAD, ok, &gz, true, true).unwrap(),
            BodyPlan::Empty
        );
        let none = StatusCode::NO_CONTENT;
        assert_eq!(
            plan(&Method::GET, none, &gz, true, true).unwrap(),
            BodyPlan::Empty
        );
        assert_eq!(
            plan(&Method::GET, ok, &gz, false, true).unwrap(),
            BodyPlan::Count
        );
        let r = plan(&Method::GET, ok, &gz, true, true).unwrap_err();
        assert_eq!(
            (r.status(), r.error()),
            (StatusCode::BAD_GATEWAY, "upstream_compressed_response")
        );
        // Toward a host no secret may go to, compression does not matter; length decides.
        assert_eq!(
            plan(&Method::GET, ok, &gz, true, false).unwrap(),
            BodyPlan::Buffer
        );
        assert_eq!(
            plan(&Method::GET, ok, &HeaderMap::new(), true, true).unwrap(),
            BodyPlan::Stream
        );
    }

    #[test]
    fn every_rejection_has_its_status_and_audit_name() {
        let timeout = UpstreamError::ConnectTimeout {
            addr: "10.0.0.1:443".parse().unwrap(),
        };
        let cases = [
            (
                Rejection::Unswapped {
                    host: "h".into(),
                    secret: "S".into(),
                    why: Unswapped::OutOfScope,
                },
                403,
                "token_out_of_scope",
            ),
            (
                Rejection::Unswapped {
                    host: "h".into(),
                    secret: "S".into(),
                    why: Unswapped::Misplaced,
                },
                403,
                "token_misplaced",
            ),
            (
                Rejection::Unswapped {
                    host: "h".into(),
                    secret: "S".into(),
                    why: Unswapped::Plaintext,
                },
                403,
                "token_plaintext",
            ),
            (
                Rejection::Required {
                    host: "h".into(),
                    secret: "S".into(),
                },
                403,
                "token_required",
            ),
            (
                Rejection::Misdirected {
                    verified: "h".into(),
                    claimed: "e".into(),
                },
                421,
                "host_mismatch",
            ),
            (
                Rejection::Denied { host: "h".into() },
                403,
                "connection_denied",
            ),
            (
                Rejection::Upstream(timeout),
                504,
                "upstream_connect_timeout",
            ),
            (
                Rejection::Upstream(UpstreamError::Http("x".into())),
                502,
                "upstream_http_failed",
            ),
            (
                Rejection::UpstreamCompressed,
                502,
                "upstream_compressed_response",
            ),
            (
                Rejection::UpstreamBody("eof".into()),
                502,
                "upstream_body_failed",
            ),
        ];
        for (r, status, error) in cases {
            assert_eq!(r.status().as_u16(), status, "{r:?}");
            assert_eq!(r.error(), error);
            assert!(r.message().starts_with("kz: "), "{}", r.message());
        }
        let r = Rejection::Unswapped {
            host: "evil.test".into(),
            secret: "S".into(),
            why: Unswapped::OutOfScope,
        };
        assert!(r.message().contains("evil.test") && r.message().contains("not sent"));
    }
}
