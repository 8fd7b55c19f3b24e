//! `POST /v1/runs`: the daemon starts a command as the caller, contained, in a sandbox, with
//! the caller's own stdio and working directory ([`super::wire`] has the protocol).
//!
//! Why one request that creates the sandbox and starts the command (and not a create followed
//! by an exec): the sandbox of a `kz run --blind` belongs to one process and must not outlive
//! it. Created in the request whose connection the run lives on, it is destroyed on every way
//! out: the child exits, the client goes away (its connection ends: the child is killed), the
//! upgrade or the descriptors never come. A separate create would leave a window in which a
//! killed client leaks a sandbox. `"sandbox": ID` starts the command in an existing sandbox of
//! the caller's instead; that one stays when the child exits.
//!
//! The child:
//! - runs as the caller: uid and gid from SO_PEERCRED, supplementary groups from the group
//!   database (`getgrouplist` of the caller's name; none without a passwd entry), HOME, USER
//!   and LOGNAME from its passwd entry;
//! - is contained exactly as a root `kz run --blind` contains its agent
//!   ([`crate::run::blind::contain_agent`], [`crate::sandbox::Sandbox::spawn`]): born in the
//!   sandbox's cgroup, its own mount and cgroup namespaces with the masks (the project's
//!   `[blind] hide`, the resolvers' files, the daemon's audit log, `/run/kz` reduced to the
//!   run's CA bundle), capabilities gone, no_new_privs, Landlock scopes, seccomp;
//! - gets the client's environment minus every variable a resolver logs in with or an `env`
//!   resolver reads (named by the project's config), every variable whose value holds one of
//!   the sandbox's real values, and the proxy variables; plus the masked tokens and the CA
//!   variables. Nothing of the daemon's own environment reaches it;
//! - starts in the client's working directory: the descriptor proves the client could open it;
//!   the child enters it by path in its own mount namespace as the caller (a descriptor from
//!   outside that namespace would let `..` walk around the masks), and the path must still
//!   name the same directory as the descriptor.
//!
//! Root is refused (`root_caller`): a root `kz run --blind` runs in-process, as today.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::api::{Api, ApiError};
use super::auth::Caller;
use super::state::{CreateRequest, RunTarget, SandboxInfo};
use super::wire::{self, RunRequest, ToClient, ToDaemon};
use crate::audit::AuditEvent;
use crate::contain::AgentUser;
use crate::run::blind::{self, Masks};
use crate::run::trust::{self, RunDir};
use crate::sandbox::ChildStdio;

/// A run's request body: argv and an environment.
const MAX_BODY: usize = 1024 * 1024;
/// How long the client has to send its descriptors once upgraded.
const FD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "POST /v1/runs needs `Connection: upgrade` and `Upgrade: kz-exec` (the connection then carries the descriptors and the exit code; see docs/agent.md)"
    )]
    NoUpgrade,
    #[error(
        "root does not run through the daemon: a root `kz run --blind` contains its agent in-process"
    )]
    RootCaller,
    #[error(
        "the body must be JSON {{\"argv\": [...], \"env\": [[k, v], ...], \"project_dir\" or \"sandbox\"}}: {0}"
    )]
    BadBody(String),
    #[error("argv is empty: give the program and its arguments")]
    NoCommand,
    #[error(
        "environment variable {0:?} is not NAME=VALUE (no '=' or NUL in the name, no NUL in the value)"
    )]
    BadEnv(String),
    #[error("argv holds a NUL byte")]
    BadArgv,
}

impl ExecError {
    pub(crate) fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            ExecError::NoUpgrade => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            ExecError::RootCaller => (StatusCode::BAD_REQUEST, "root_caller"),
            ExecError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            ExecError::NoCommand | ExecError::BadArgv => (StatusCode::BAD_REQUEST, "bad_command"),
            ExecError::BadEnv(_) => (StatusCode::BAD_REQUEST, "bad_env"),
        }
    }
}

/// A failure after the upgrade: told to the client as an `error` line, then `exit` with
/// `exit_code`, and audited (`run_refused` with `reason` = the code).
struct Failed {
    code: &'static str,
    message: String,
    exit_code: i32,
}

fn failed(code: &'static str, message: impl Into<String>) -> Failed {
    Failed {
        code,
        message: message.into(),
        exit_code: 126,
    }
}

/// Everything checked before the answer: the rest happens on the upgraded stream.
struct Prepared {
    caller: Caller,
    info: SandboxInfo,
    target: RunTarget,
    /// The run created the sandbox and destroys it.
    owned: bool,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    removed: Vec<String>,
    agent: AgentUser,
}

/// Checks the request, creates (or finds) the sandbox, and answers `101`; the run continues
/// on the upgraded connection in a task of the daemon's.
pub async fn start(
    api: Arc<Api>,
    caller: Caller,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(wire::UPGRADE.as_bytes()));
    if !upgrade {
        return Err(ExecError::NoUpgrade.into());
    }
    if caller.uid == 0 {
        return Err(ExecError::RootCaller.into());
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ExecError::BadBody(e.to_string()))?
        .to_bytes();
    let run: RunRequest =
        serde_json::from_slice(&body).map_err(|e| ExecError::BadBody(e.to_string()))?;
    if run.argv.is_empty() {
        return Err(ExecError::NoCommand.into());
    }
    if run.argv.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::BadArgv.into());
    }
    if let Some((k, _)) = run
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(ExecError::BadEnv(k.clone()).into());
    }
    let (info, target, owned) = match (run.sandbox, &run.project_dir) {
        (Some(id), None) => {
            let (info, target) = api.registry.run_target(&caller, id)?;
            (info, target, false)
        }
        (None, Some(dir)) => {
            let name = run
                .name
                .clone()
                .unwrap_or_else(|| format!("run-{}", hex::encode(rand::random::<[u8; 4]>())));
            let created = api
                .registry
                .create_for_run(
                    &caller,
                    CreateRequest {
                        name: Some(name),
                        project_dir: dir.clone(),
                        state_dir: state_dir(&run.env),
                    },
                )
                .await?;
            let (info, target) = api.registry.run_target(&caller, created.id)?;
            (info, target, true)
        }
        _ => {
            return Err(ExecError::BadBody(
                "give exactly one of project_dir (a new sandbox) and sandbox (an existing one)"
                    .into(),
            )
            .into());
        }
    };
    let (env, removed) = child_env(run.env, &info, &target);
    let prepared = Prepared {
        agent: agent_user(&caller),
        caller,
        info,
        target,
        owned,
        argv: run.argv,
        env,
        removed,
    };
    {
        let mut runs = api.runs.lock().unwrap_or_else(|p| p.into_inner());
        while runs.try_join_next().is_some() {}
        runs.spawn(upgraded(api.clone(), prepared, on_upgrade));
    }
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, wire::UPGRADE)
        .body(Full::new(Bytes::new()))
        .map_err(|e| ExecError::BadBody(e.to_string()).into())
}

/// The caller as the agent's user.
fn agent_user(caller: &Caller) -> AgentUser {
    let entry = nix::unistd::User::from_uid(caller.uid.into())
        .ok()
        .flatten();
    let groups = entry
        .as_ref()
        .and_then(|u| {
            let name = std::ffi::CString::new(u.name.as_bytes()).ok()?;
            nix::unistd::getgrouplist(&name, caller.gid.into()).ok()
        })
        .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    AgentUser {
        uid: caller.uid,
        gid: caller.gid,
        groups,
        name: entry.as_ref().map(|u| u.name.clone()),
        home: entry.map(|u| u.dir),
        root_in_userns: false,
    }
}

/// The client's kz state directory as its own kz finds it (`KZ_STATE_DIR`, else
/// `$XDG_STATE_HOME/kz`, else `$HOME/.local/state/kz`): the approvals its `kz allow` wrote and
/// its project is checked against. Only absolute paths; none: the caller's passwd home's.
fn state_dir(env: &[(String, String)]) -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let var = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, v)| n == k && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v))
    };
    let dir = var(crate::config::approval::STATE_DIR_VAR)
        .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("kz")))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/kz")))?;
    dir.is_absolute().then_some(dir)
}

/// The child's environment from the client's (see the module documentation), and the names
/// taken out because they hold credentials (sorted; no values).
fn child_env(
    client: Vec<(String, String)>,
    info: &SandboxInfo,
    target: &RunTarget,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut removed = Vec::new();
    let mut env = Vec::with_capacity(client.len() + info.secrets.len());
    for (k, v) in client {
        let v = zeroize::Zeroizing::new(v);
        if target.credential_vars.contains(&k) || !target.values.found(v.as_bytes()).is_empty() {
            removed.push(k);
            continue;
        }
        if trust::PROXY_ENV_VARS.contains(&k.as_str())
            || info.secrets.contains_key(&k)
            || trust::CA_ENV_VARS.contains(&k.as_str())
        {
            continue;
        }
        env.push((k, v.to_string()));
    }
    for (name, s) in &info.secrets {
        env.push((name.clone(), s.token.clone()));
    }
    removed.sort();
    removed.dedup();
    (env, removed)
}

/// The run on the upgraded connection; the sandbox is destroyed at the end when the run made
/// it, whatever happened.
async fn upgraded(api: Arc<Api>, p: Prepared, on_upgrade: hyper::upgrade::OnUpgrade) {
    let id = p.info.id;
    let stream = match on_upgrade
        .await
        .map(|u| u.downcast::<TokioIo<UnixStream>>())
    {
        Ok(Ok(parts)) if parts.read_buf.is_empty() => Some(parts.io.into_inner()),
        Ok(Ok(_)) => {
            refused(&api, &p, "protocol", "data arrived before the descriptors");
            None
        }
        _ => {
            refused(&api, &p, "protocol", "the connection was not upgraded");
            None
        }
    };
    if let Some(stream) = stream {
        serve(&api, &p, stream).await;
    }
    if p.owned
        && let Err(e) = api.registry.remove(&p.caller, id).await
    {
        tracing::debug!(error = %e, "the run's sandbox was already gone");
    }
}

fn refused(api: &Api, p: &Prepared, code: &str, message: &str) {
    api.registry.record(
        AuditEvent::new("run_refused")
            .with("sandbox_id", p.info.id)
            .with("uid", p.caller.uid)
            .with("caller_pid", p.caller.pid)
            .with("reason", code.to_owned())
            .with("error", message.to_owned()),
    );
}

async fn serve(api: &Api, p: &Prepared, stream: UnixStream) {
    let fds = match tokio::time::timeout(FD_TIMEOUT, wire::recv_fds(&stream)).await {
        Ok(Ok(fds)) => fds,
        Ok(Err(e)) => {
            let (_, mut wr) = stream.into_split();
            report(api, p, &mut wr, failed("bad_descriptors", e.to_string())).await;
            return;
        }
        Err(_) => {
            let (_, mut wr) = stream.into_split();
            let f = failed(
                "bad_descriptors",
                format!("no descriptors within {} s", FD_TIMEOUT.as_secs()),
            );
            report(api, p, &mut wr, f).await;
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    let [stdin, stdout, stderr, cwd] = fds;
    let dir = match RunDir::create(&format!(
        "agent-{}-{}",
        p.info.id,
        hex::encode(rand::random::<[u8; 4]>())
    )) {
        Ok(d) => d,
        Err(e) => return report(api, p, &mut wr, failed("run_dir", e.to_string())).await,
    };
    let cmd = match command(api, p, &cwd, &dir) {
        Ok(c) => c,
        Err(f) => return report(api, p, &mut wr, f).await,
    };
    drop(cwd);
    let (cmd, contained) = cmd;
    let stdio = ChildStdio {
        stdin,
        stdout,
        stderr,
    };
    let mut child = match api.registry.spawn(p.info.id, cmd, contained, stdio) {
        None => {
            let f = failed(
                "no_such_sandbox",
                format!("sandbox {} was removed", p.info.id),
            );
            return report(api, p, &mut wr, f).await;
        }
        Some(Err(e)) => {
            let mut f = failed("spawn_failed", format!("cannot run '{}': {e}", p.argv[0]));
            if e.kind() == std::io::ErrorKind::NotFound {
                f.exit_code = 127;
            }
            return report(api, p, &mut wr, f).await;
        }
        Some(Ok(c)) => c,
    };
    let Some(pid) = child.id() else {
        return report(
            api,
            p,
            &mut wr,
            failed("spawn_failed", "the child has no pid"),
        )
        .await;
    };
    api.registry.record(
        AuditEvent::new("run_started")
            .with("sandbox_id", p.info.id)
            .with("uid", p.caller.uid)
            .with("caller_pid", p.caller.pid)
            .with("pid", pid)
            .with("program", p.argv[0].clone())
            .with("not_passed", p.removed.clone()),
    );
    let started = ToClient::Started {
        pid,
        sandbox: p.info.id,
        not_passed: p.removed.clone(),
    };
    let _ = wr.write_all(&wire::line(&started)).await;
    let mut signals = client_lines(rd);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let mut client_gone = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            msg = signals.recv(), if !client_gone => match msg {
                Some(sig) => {
                    if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
                        let _ = nix::sys::signal::kill(pid, sig);
                    }
                }
                None => {
                    // The client is gone (killed, or its connection broke): so is its child.
                    // The pid is still ours to signal: it is reaped only by the wait above.
                    client_gone = true;
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            },
        }
    };
    let (code, signal) = match &status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal())
        }
        Err(_) => (None, None),
    };
    api.registry.record(
        AuditEvent::new("run_end")
            .with("sandbox_id", p.info.id)
            .with("uid", p.caller.uid)
            .with("pid", pid.as_raw())
            .with("exit_code", code)
            .with("signal", signal)
            .with("client_gone", client_gone),
    );
    // The sandbox goes before the client learns the code: when `kz run` exits, nothing of
    // the run is left.
    if p.owned
        && let Err(e) = api.registry.remove(&p.caller, p.info.id).await
    {
        tracing::debug!(error = %e, "the run's sandbox was already gone");
    }
    drop(dir);
    if !client_gone {
        let _ = wr
            .write_all(&wire::line(&ToClient::Exit { code, signal }))
            .await;
    }
}

/// The command and its containment: argv, environment, CA bundle, working directory.
fn command(
    api: &Api,
    p: &Prepared,
    cwd: &OwnedFd,
    dir: &RunDir,
) -> Result<(std::process::Command, Arc<crate::contain::Prepared>), Failed> {
    let path = same_directory(cwd)?;
    let mut cmd = std::process::Command::new(&p.argv[0]);
    cmd.args(&p.argv[1..]);
    // Sandbox::spawn's clone3 path starts from the daemon's environment and applies the
    // command's changes (it cannot see env_clear): every variable of the daemon's is removed.
    for (k, _) in std::env::vars_os() {
        cmd.env_remove(k);
    }
    cmd.envs(p.env.iter().map(|(k, v)| (k, v)));
    let (bundle, pem) = dir
        .write_ca_bundle(&p.info.ca_cert_pem)
        .map_err(|e| failed("run_dir", e.to_string()))?;
    for var in trust::CA_ENV_VARS {
        cmd.env(var, &bundle);
    }
    cmd.current_dir(&path);
    let masks = Masks {
        config: &p.target.blind,
        hide_extra: &p.target.hide_extra,
        audit_path: Some(&api.audit_log),
    };
    let contained =
        blind::contain_agent(&mut cmd, &masks, p.agent.clone(), dir, (&bundle, pem), true)
            .map_err(|e| failed("containment_failed", e.to_string()))?;
    Ok((cmd, Arc::new(contained)))
}

/// The path of the directory `fd` is open on, checked to still name that directory.
fn same_directory(fd: &OwnedFd) -> Result<PathBuf, Failed> {
    let bad = |m: String| failed("bad_cwd", m);
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| bad(format!("cannot read the working directory's path: {e}")))?;
    let by_fd = nix::sys::stat::fstat(fd).map_err(|e| bad(format!("fstat: {e}")))?;
    if by_fd.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(bad(
            "the working directory descriptor is not a directory".into()
        ));
    }
    let by_path = nix::sys::stat::stat(&link).map_err(|e| {
        bad(format!(
            "the working directory {} is not reachable from the daemon ({e}); run kz from a directory on the node's filesystem",
            link.display()
        ))
    })?;
    if (by_fd.st_dev, by_fd.st_ino) != (by_path.st_dev, by_path.st_ino) {
        return Err(bad(format!(
            "{} no longer names the working directory (moved or in another mount namespace)",
            link.display()
        )));
    }
    Ok(link)
}

/// The client's `signal` lines as signal numbers ([`wire::FORWARDABLE`] only); the channel
/// closes when the client's side of the stream ends or breaks the protocol.
fn client_lines(rd: tokio::net::unix::OwnedReadHalf) -> tokio::sync::mpsc::Receiver<i32> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut rd = tokio::io::BufReader::new(rd);
        loop {
            let mut buf = Vec::new();
            match (&mut rd)
                .take(wire::MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) if buf.last() != Some(&b'\n') => return,
                Ok(_) => {}
            }
            let Ok(ToDaemon::Signal(sig)) = serde_json::from_slice::<ToDaemon>(&buf) else {
                return;
            };
            if wire::FORWARDABLE.contains(&sig) && tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Tells the client why the run failed (then `exit`), and audits it.
async fn report(api: &Api, p: &Prepared, wr: &mut tokio::net::unix::OwnedWriteHalf, f: Failed) {
    refused(api, p, f.code, &f.message);
    let err = ToClient::Error {
        code: f.code.to_owned(),
        message: f.message,
    };
    let _ = wr.write_all(&wire::line(&err)).await;
    let exit = ToClient::Exit {
        code: Some(f.exit_code),
        signal: None,
    };
    let _ = wr.write_all(&wire::line(&exit)).await;
}
