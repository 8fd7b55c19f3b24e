//! The run protocol between `kz run --blind` (as an ordinary user) and the daemon: one
//! `POST /v1/runs` with `Upgrade: kz-exec`, after which the connection is a plain byte stream.
//!
//! 1. The client sends the request (JSON [`RunRequest`]: argv, environment, and either a
//!    `project_dir` to create a sandbox from or the id of one of its sandboxes). The daemon
//!    checks it and creates the sandbox *before* it answers, so every refusal is an ordinary
//!    JSON error with its status; only then does it answer `101 Switching Protocols`.
//! 2. The client sends one byte with its stdin, stdout, stderr and working directory attached
//!    (SCM_RIGHTS), in that order. Nothing else may be in flight: hyper has handed both sides
//!    the raw socket, and ancillary data read by an ordinary `read` would be lost.
//! 3. Both sides then exchange JSON lines: the daemon sends [`ToClient`] (`started`, then
//!    `exit`, or `error` followed by `exit`); the client sends [`ToDaemon`] (`signal`). A line
//!    is at most [`MAX_LINE`] bytes. The daemon kills the child when the stream ends before the
//!    child did.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The `Upgrade` protocol token of a run.
pub const UPGRADE: &str = "kz-exec";
/// Descriptors passed once the connection is upgraded: stdin, stdout, stderr, working directory.
pub const FDS: usize = 4;
/// The longest JSON line either side accepts.
pub const MAX_LINE: usize = 4096;

/// What `POST /v1/runs` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Program and arguments (the program is looked up in the environment's PATH).
    pub argv: Vec<String>,
    /// The child's environment before kz's changes (the caller's own, minus what holds
    /// credentials; the daemon removes more, see docs/agent.md).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Create a sandbox from this project directory for the run; it is destroyed when the
    /// child exits or the client goes away.
    #[serde(default)]
    pub project_dir: Option<PathBuf>,
    /// Its name (default `run-<hex>`), with `project_dir`.
    #[serde(default)]
    pub name: Option<String>,
    /// Start the child in this existing sandbox of the caller's instead (it stays).
    #[serde(default)]
    pub sandbox: Option<u64>,
}

/// A line from the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToClient {
    /// The child runs (its pid on the node, and the sandbox it runs in); `not_passed` names
    /// the client's variables it did not get because they hold credentials.
    Started {
        pid: u32,
        sandbox: u64,
        #[serde(default)]
        not_passed: Vec<String>,
    },
    /// Why the child could not be started or watched; an `exit` follows.
    Error { code: String, message: String },
    /// The child is gone: its exit code, or the signal that killed it. The last line.
    Exit {
        #[serde(default)]
        code: Option<i32>,
        #[serde(default)]
        signal: Option<i32>,
    },
}

/// A line from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToDaemon {
    /// Deliver this signal to the child (one of [`FORWARDABLE`]).
    Signal(i32),
}

/// Signals a client may have delivered to its child: what a terminal or a supervisor sends a
/// foreground program. The connection ending kills the child (SIGKILL).
pub const FORWARDABLE: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// One JSON line.
pub fn line<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Sends `fds` with one byte of data (ancillary data needs a byte to ride on).
pub async fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> std::io::Result<()> {
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(b"F")];
            let cmsg = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(std::io::Error::other("the descriptors were not sent")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives the byte [`send_fds`] sent and exactly [`FDS`] descriptors with it (close-on-exec).
/// Anything else (no descriptors, more, a truncated set, end of stream) is an error, and every
/// descriptor that did arrive is closed.
pub async fn recv_fds(stream: &UnixStream) -> Result<[OwnedFd; FDS], FdError> {
    loop {
        stream.readable().await.map_err(FdError::Io)?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([RawFd; FDS + 1]);
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel installed these descriptors in this process for
                        // this message; nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            Ok((msg.bytes, truncated, fds))
        });
        match got {
            Ok((0, _, _)) => return Err(FdError::Closed),
            Ok((_, true, _)) => return Err(FdError::Count(FDS + 1)),
            Ok((_, false, fds)) => {
                let n = fds.len();
                return <[OwnedFd; FDS]>::try_from(fds).map_err(|_| FdError::Count(n));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(FdError::Io(e)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("the client closed the connection before sending its descriptors")]
    Closed,
    #[error(
        "the client sent {0} descriptors with its first byte; a run takes exactly {FDS} (stdin, stdout, stderr, working directory)"
    )]
    Count(usize),
    #[error("receiving the client's descriptors failed: {0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_external_tags() {
        let l = line(&ToClient::Exit {
            code: Some(7),
            signal: None,
        });
        assert_eq!(l, b"{\"exit\":{\"code\":7,\"signal\":null}}\n");
        let s: ToDaemon = serde_json::from_slice(b"{\"signal\":2}").unwrap();
        assert_eq!(s, ToDaemon::Signal(2));
        assert!(serde_json::from_slice::<ToDaemon>(b"{\"kill\":9}").is_err());
    }

    #[tokio::test]
    async fn descriptors_pass_once_and_exactly() {
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let raw = null.as_raw_fd();
        send_fds(&a, &[raw, raw, raw, raw]).await.unwrap();
        let fds = recv_fds(&b).await.unwrap();
        assert!(fds.iter().all(|f| f.as_raw_fd() != raw));
        send_fds(&a, &[raw]).await.unwrap();
        assert!(matches!(recv_fds(&b).await, Err(FdError::Count(1))));
        drop(a);
        assert!(matches!(recv_fds(&b).await, Err(FdError::Closed)));
    }
}
