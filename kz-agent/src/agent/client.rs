//! The CLI's side of the local API: one HTTP/1.1 request over the daemon's unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no kz agent is listening at {0}: start it with `sudo kz agent run`, or pass --socket PATH"
    )]
    NoDaemon(PathBuf),
    #[error(
        "permission denied on {0}: the socket is open to root and group kz only (ask an admin to add you to group kz)"
    )]
    Permission(PathBuf),
    #[error("cannot talk to the kz agent at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kz agent at {path} broke off the request: {message}")]
    Http { path: PathBuf, message: String },
    #[error("the kz agent refused ({status}, {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the kz agent answered something that is not JSON ({0})")]
    NotJson(StatusCode),
}

/// A connection to the daemon at `socket`, or why there is none.
pub async fn connect(socket: &Path) -> Result<tokio::net::UnixStream, ClientError> {
    tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon(socket.to_owned())
            }
            std::io::ErrorKind::PermissionDenied => ClientError::Permission(socket.to_owned()),
            _ => ClientError::Io {
                path: socket.to_owned(),
                source,
            },
        })
}

/// The daemon's refusal in a JSON error answer.
pub fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return ClientError::NotJson(status);
    };
    let field = |k: &str| {
        v.pointer(&format!("/error/{k}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    ClientError::Refused {
        status: status.as_u16(),
        code: field("code"),
        message: field("message"),
    }
}

/// A hyper error on the connection to `socket`.
pub(super) fn http_error(socket: &Path) -> impl Fn(hyper::Error) -> ClientError + Copy + '_ {
    move |e| ClientError::Http {
        path: socket.to_owned(),
        message: e.to_string(),
    }
}

/// One HTTP/1.1 connection to the daemon at `socket`, driven on its own task (able to switch
/// protocols when `upgrades`): the request sender.
pub(super) async fn open(
    socket: &Path,
    upgrades: bool,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
    let stream = connect(socket).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error(socket))?;
    if upgrades {
        tokio::spawn(conn.with_upgrades());
    } else {
        tokio::spawn(conn);
    }
    Ok(sender)
}

/// Sends `method path` (with a JSON `body`) to the daemon at `socket`; its JSON answer, or the
/// daemon's refusal as [`ClientError::Refused`].
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let http = http_error(socket);
    let mut sender = open(socket, false).await?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "kz")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| ClientError::Http {
            path: socket.to_owned(),
            message: e.to_string(),
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
    if !status.is_success() {
        return Err(refusal(status, &bytes));
    }
    serde_json::from_slice(&bytes).map_err(|_| ClientError::NotJson(status))
}

/// `GET path` as a stream of JSON lines (an event stream): each line is handed to `line` as
/// it arrives, until the daemon ends the stream; a refusal is [`ClientError::Refused`].
pub async fn stream_lines(
    socket: &Path,
    path: &str,
    mut line: impl FnMut(&[u8]),
) -> Result<(), ClientError> {
    let http = http_error(socket);
    let mut sender = open(socket, false).await?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "kz")
        .body(Full::new(Bytes::new()))
        .map_err(|e| ClientError::Http {
            path: socket.to_owned(),
            message: e.to_string(),
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let bytes = body.collect().await.map_err(http)?.to_bytes();
        return Err(refusal(status, &bytes));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(http)?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            line(&pending[..end]);
            pending.drain(..=end);
        }
    }
    if !pending.is_empty() {
        line(&pending);
    }
    Ok(())
}
