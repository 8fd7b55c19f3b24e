//! The PDP's HTTP API (hyper): `GET /healthz`, `POST /v1/resolve`, `GET /metrics`.
//!
//! Error shapes follow KeyZero 0.3: 401 `{"error":"invalid_token", …}` (plus our specific
//! `reason`), 400 `{"error":"invalid_ref", …}`; oversized bodies get 413 before they are read.

use super::{Pdp, PdpError};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Header bytes a connection may send. Large enough that an oversized token reaches the
/// verifier and gets its specific 401 (`token_too_large`) instead of a bare 431.
pub const MAX_HEADER_BYTES: usize = 2 * 1024 * 1024;

type Body = Full<Bytes>;

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, pdp: Arc<Pdp>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let pdp = pdp.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let pdp = pdp.clone();
                async move { Ok::<_, Infallible>(handle(&pdp, req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_buf_size(MAX_HEADER_BYTES)
                .header_read_timeout(std::time::Duration::from_secs(10));
            builder
                .http2()
                .max_header_list_size(MAX_HEADER_BYTES as u32);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub async fn handle(pdp: &Pdp, req: Request<Incoming>) -> Response<Body> {
    let (route, resp) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => ("healthz", healthz(pdp)),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(pdp.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            ("metrics", r)
        }
        (&Method::POST, "/v1/resolve") => ("resolve", resolve(pdp, req).await),
        (_, "/healthz" | "/metrics" | "/v1/resolve") => (
            "other",
            json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed"}),
            ),
        ),
        _ => (
            "other",
            json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        ),
    };
    pdp.metrics.request(route, resp.status().as_u16());
    resp
}

fn healthz(pdp: &Pdp) -> Response<Body> {
    let c = pdp.current();
    json_response(
        StatusCode::OK,
        &json!({
            "status": "ok",
            "bundle_loaded": true,
            "bundle_version": c.loaded.bundle.version,
        }),
    )
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn bad_request(message: &str) -> Response<Body> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "invalid_request", "message": message}),
    )
}

async fn resolve(pdp: &Pdp, req: Request<Incoming>) -> Response<Body> {
    let max = pdp.current().loaded.bundle.limits.max_body_bytes;
    let too_large = || {
        json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"error": "payload_too_large", "message": format!("request bodies are limited to {max} bytes")}),
        )
    };
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > max)
    {
        return too_large();
    }
    let token = match bearer(&req) {
        Some(t) => t.to_owned(),
        None => {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_token", "reason": "missing_token",
                        "message": "missing or invalid authorization header: send `Authorization: Bearer <jwt>`"}),
            );
        }
    };
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_large();
            }
            return bad_request("could not read the request body");
        }
    };
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("the body is not JSON: {e}")),
    };
    let Value::Object(mut obj) = parsed else {
        return bad_request("the body must be a JSON object with `ref` or `refs`");
    };
    let refs: Vec<String> = match (
        obj.remove("refs"),
        obj.remove("ref"),
        obj.remove("resource"),
    ) {
        (Some(Value::Array(items)), None, None) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                match i {
                    Value::String(s) => out.push(s),
                    _ => return bad_request("`refs` must be a list of strings"),
                }
            }
            out
        }
        (None, Some(Value::String(r)), None) | (None, None, Some(Value::String(r))) => vec![r],
        (None, None, None) => return bad_request("the request names no ref: send `ref` or `refs`"),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return bad_request("send only one of `ref`, `refs` or `resource`");
        }
        _ => return bad_request("`ref` must be a string and `refs` a list of strings"),
    };
    let context = obj.remove("context").unwrap_or(Value::Null);
    match pdp.resolve(&token, &refs, context).await {
        Ok(resp) => match serde_json::to_value(&resp) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(_) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal_error"}),
            ),
        },
        Err(PdpError::InvalidToken(e)) => json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error": "invalid_token", "reason": e.reason(), "message": e.to_string()}),
        ),
        Err(PdpError::InvalidRef { reference, reason }) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_ref", "ref": reference, "message": reason}),
        ),
        Err(e @ (PdpError::NoRefs | PdpError::TooManyRefs { .. } | PdpError::BadContext)) => {
            bad_request(&e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "resolve failed");
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal_error"}),
            )
        }
    }
}
