//! `kz run --blind -- CMD` as an ordinary user when a node daemon listens: the daemon creates
//! a sandbox from the project and starts the command in it as this user, contained; this
//! process hands over its stdin, stdout, stderr and working directory (SCM_RIGHTS), forwards
//! the signals a terminal or supervisor sends, and exits with the child's code (128 + signal
//! when it was killed). The protocol is [`super::wire`]'s.
//!
//! The environment sent is this process's, minus the variables the project's resolvers log in
//! with or read values from (an `env` resolver's source) and anything not UTF-8; the daemon
//! removes more (any variable holding a real value, the proxy variables) and adds the masked
//! tokens and the CA variables. When this process dies, its connection ends and the daemon
//! kills the child and destroys the sandbox.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::client::{self, ClientError};
use super::wire::{self, RunRequest, ToClient, ToDaemon};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum RunClientError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "argument {0:?} is not UTF-8; the kz agent takes UTF-8 arguments only (run without the daemon as root, or rename)"
    )]
    NotUtf8(String),
    #[error("cannot open the working directory to hand it to the kz agent: {0}")]
    Cwd(std::io::Error),
    #[error("cannot hand stdin, stdout, stderr and the working directory to the kz agent: {0}")]
    Fds(std::io::Error),
    #[error("the kz agent at {path} broke the run protocol: {message}")]
    Protocol {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(
        "the kz agent closed the connection before the command ended (was it stopped?); the command was killed with its sandbox"
    )]
    Gone,
    #[error(
        "--only is not supported through the kz agent yet: the daemon resolves every secret of the project"
    )]
    Only,
}

/// Runs `argv` in a new sandbox made from `config`'s project by the daemon at `socket`.
pub async fn run(
    socket: &Path,
    config: &Config,
    argv: &[OsString],
) -> Result<ExitCode, RunClientError> {
    let argv: Vec<String> = argv
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .ok_or_else(|| RunClientError::NotUtf8(a.to_string_lossy().into_owned()))
        })
        .collect::<Result<_, _>>()?;
    let logins = crate::resolve::login_vars(config);
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !logins.contains(k))
        .collect();
    let body = RunRequest {
        argv,
        env,
        project_dir: Some(config.dir.clone()),
        name: None,
        sandbox: None,
    };
    let cwd = std::fs::File::open(".").map_err(RunClientError::Cwd)?;
    let stream = upgrade(socket, &body).await?;
    let fds = [0, 1, 2, cwd.as_raw_fd()];
    wire::send_fds(&stream, &fds)
        .await
        .map_err(RunClientError::Fds)?;
    drop(cwd);
    follow(socket, stream).await
}

/// `POST /v1/runs` with `Upgrade: kz-exec`; the raw stream once the daemon switched.
async fn upgrade(socket: &Path, body: &RunRequest) -> Result<UnixStream, RunClientError> {
    let http = client::http_error(socket);
    let mut sender = client::open(socket, true).await?;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/runs")
        .header(header::HOST, "kz")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, wire::UPGRADE)
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).unwrap_or_default(),
        )))
        .map_err(|e| ClientError::Http {
            path: socket.to_owned(),
            message: e.to_string(),
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        return Err(client::refusal(status, &bytes).into());
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(http)?;
    let protocol = |message: &str| RunClientError::Protocol {
        path: socket.to_owned(),
        message: message.to_owned(),
    };
    let parts = upgraded
        .downcast::<TokioIo<UnixStream>>()
        .map_err(|_| protocol("the upgraded connection is not the socket"))?;
    if !parts.read_buf.is_empty() {
        return Err(protocol("data arrived before the descriptors were sent"));
    }
    Ok(parts.io.into_inner())
}

/// Forwards signals and reads the daemon's lines until `exit`.
async fn follow(socket: &Path, stream: UnixStream) -> Result<ExitCode, RunClientError> {
    use tokio::signal::unix::{SignalKind, signal};
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    let mut listeners = Vec::new();
    for &sig in wire::FORWARDABLE {
        match signal(SignalKind::from_raw(sig)) {
            Ok(mut stream) => {
                let tx = tx.clone();
                listeners.push(tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if tx.send(sig).is_err() {
                            break;
                        }
                    }
                }));
            }
            Err(e) => tracing::warn!(signal = sig, error = %e, "cannot forward this signal"),
        }
    }
    drop(tx);
    // The child is not in this terminal's process group (the daemon started it), so Ctrl-C
    // reaches only this process: SIGINT is forwarded like the others.
    let writer = tokio::spawn(async move {
        while let Some(sig) = rx.recv().await {
            if wr
                .write_all(&wire::line(&ToDaemon::Signal(sig)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let protocol = |message: String| RunClientError::Protocol {
        path: socket.to_owned(),
        message,
    };
    let mut rd = tokio::io::BufReader::new(rd);
    let result = loop {
        let mut buf = Vec::new();
        let n = (&mut rd)
            .take(wire::MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        if n == 0 {
            break Err(RunClientError::Gone);
        }
        let msg: ToClient = match serde_json::from_slice(&buf) {
            Ok(m) => m,
            Err(e) => break Err(protocol(format!("a line that is not JSON: {e}"))),
        };
        match msg {
            ToClient::Started { not_passed, .. } => {
                if !not_passed.is_empty() {
                    eprintln!(
                        "kz: not passing {} to the agent: they hold real credentials",
                        not_passed.join(", ")
                    );
                }
            }
            ToClient::Error { code, message } => eprintln!("kz: error: {message} ({code})"),
            ToClient::Exit { code, signal } => break Ok(exit_code(code, signal)),
        }
    };
    for l in listeners {
        l.abort();
    }
    writer.abort();
    result
}

/// The child's status as this process's exit code (128 + signal when it was killed).
fn exit_code(code: Option<i32>, signal: Option<i32>) -> ExitCode {
    match (code, signal) {
        (Some(c), _) => ExitCode::from(u8::try_from(c & 0xff).unwrap_or(1)),
        (None, Some(s)) => ExitCode::from(u8::try_from(128 + (s & 0x7f)).unwrap_or(255)),
        (None, None) => ExitCode::from(1),
    }
}

/// The daemon's socket when one is there for `kz run --blind` to use: `KZ_AGENT_SOCKET`, else
/// [`super::DEFAULT_SOCKET`]. Only its existence is looked at: with a socket present the daemon
/// is the way, and a daemon that does not answer is an error, not a fallback.
pub fn socket() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("KZ_AGENT_SOCKET")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| super::DEFAULT_SOCKET.into());
    std::fs::symlink_metadata(&path).is_ok().then_some(path)
}
