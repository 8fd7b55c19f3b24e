//! Who the agent runs as.
//!
//! `--user USER[:GROUP]` (names or ids), else the user who invoked kz through `sudo`
//! (SUDO_UID/SUDO_GID) or `pkexec` (PKEXEC_UID), else kz's own user. The agent gets that user's
//! supplementary groups. An agent that would be uid 0 is refused unless `--allow-root-agent`
//! is given; then it is root only inside a user namespace of its own, mapped outside to the
//! kernel's overflow user ([`OVERFLOW_ID`], "nobody"), which owns nothing.

use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

/// The kernel's overflow id (`/proc/sys/kernel/overflowuid`, "nobody"): the outside identity of
/// a root-in-namespace agent when no user is named.
pub const OVERFLOW_ID: u32 = 65534;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("--user {0}: no such user; give a user name or uid that exists on this machine")]
    NoUser(String),
    #[error("--user …:{0}: no such group; give a group name or gid that exists on this machine")]
    NoGroup(String),
    #[error(
        "--user {0}: uid {1} has no passwd entry, so kz cannot know its group; give it: --user {1}:GID"
    )]
    NoPrimaryGroup(String, u32),
    #[error("{var}={value} is not a numeric id; unset it or pass --user")]
    BadEnv { var: &'static str, value: String },
    #[error(
        "the agent would run as root (uid 0){why}: a root agent can read kz's memory, leave its cgroup and detach the eBPF programs. Choose an unprivileged user with --user USER (or start kz with sudo from that user), or pass --allow-root-agent to run it as root inside a user namespace of its own"
    )]
    RootAgent { why: &'static str },
    #[error(
        "--user needs kz to run as root (it is uid {0}); without root the agent runs as kz's own user"
    )]
    NotRoot(u32),
    #[error("cannot read the user database: {0}")]
    Lookup(String),
}

/// The identity the agent gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    /// The uid outside any namespace (for a root-in-namespace agent, the one its uid 0 maps to).
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty for a root-in-namespace agent: setgroups is denied there).
    pub groups: Vec<u32>,
    /// Login name, when the uid has a passwd entry.
    pub name: Option<String>,
    /// Home directory, when the uid has a passwd entry (`~` in `[blind] hide`, the child's HOME).
    pub home: Option<PathBuf>,
    /// Root inside a user namespace of its own (`--allow-root-agent`).
    pub root_in_userns: bool,
}

impl AgentUser {
    /// True when the agent runs as kz's own user: nothing to switch.
    pub fn is_self(&self) -> bool {
        !self.root_in_userns && self.uid == Uid::current().as_raw()
    }
}

/// What the caller asked for.
#[derive(Debug, Clone, Default)]
pub struct UserRequest {
    /// `--user USER[:GROUP]`.
    pub spec: Option<String>,
    /// `--allow-root-agent`.
    pub allow_root: bool,
}

/// Resolves the agent's user from the request and kz's environment (`env` looks a variable up,
/// so tests need not change the process environment).
pub fn resolve(
    req: &UserRequest,
    env: impl Fn(&str) -> Option<String>,
) -> Result<AgentUser, UserError> {
    let me = Uid::current().as_raw();
    let (uid, gid, why) = match &req.spec {
        Some(spec) => {
            let (u, g) = parse_spec(spec)?;
            if me != 0 && u != me {
                return Err(UserError::NotRoot(me));
            }
            (u, g, " (--user names root)")
        }
        None if me == 0 => match invoker(&env)? {
            Some((u, g)) => (u, g, " (the user who ran sudo/pkexec is root)"),
            None => (
                0,
                None,
                " (kz runs as root and was not started through sudo)",
            ),
        },
        None => (me, Some(nix::unistd::Gid::current().as_raw()), ""),
    };
    if uid == 0 {
        if !req.allow_root {
            return Err(UserError::RootAgent { why });
        }
        return Ok(root_in_userns(req));
    }
    let entry = User::from_uid(Uid::from_raw(uid)).map_err(|e| UserError::Lookup(e.to_string()))?;
    let gid = match (gid, &entry) {
        (Some(g), _) => g,
        (None, Some(u)) => u.gid.as_raw(),
        (None, None) => {
            return Err(UserError::NoPrimaryGroup(
                req.spec.clone().unwrap_or_default(),
                uid,
            ));
        }
    };
    let groups = match &entry {
        Some(u) => supplementary(&u.name, gid)?,
        None => vec![gid],
    };
    Ok(AgentUser {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|u| u.name.clone()),
        home: entry.map(|u| u.dir),
        root_in_userns: false,
    })
}

/// `--allow-root-agent`: uid 0 inside, an unprivileged id outside.
fn root_in_userns(req: &UserRequest) -> AgentUser {
    let outside = User::from_uid(Uid::from_raw(OVERFLOW_ID)).ok().flatten();
    AgentUser {
        uid: OVERFLOW_ID,
        gid: outside.as_ref().map_or(OVERFLOW_ID, |u| u.gid.as_raw()),
        groups: Vec::new(),
        name: Some("root".to_owned()),
        home: std::env::var_os("HOME").map(PathBuf::from),
        root_in_userns: req.allow_root,
    }
}

/// SUDO_UID/SUDO_GID, else PKEXEC_UID.
fn invoker(env: &impl Fn(&str) -> Option<String>) -> Result<Option<(u32, Option<u32>)>, UserError> {
    let id = |var: &'static str| -> Result<Option<u32>, UserError> {
        match env(var).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| UserError::BadEnv { var, value: v }),
        }
    };
    if let Some(uid) = id("SUDO_UID")? {
        return Ok(Some((uid, id("SUDO_GID")?)));
    }
    if let Some(uid) = id("PKEXEC_UID")? {
        return Ok(Some((uid, None)));
    }
    Ok(None)
}

/// `USER[:GROUP]`, names or ids.
fn parse_spec(spec: &str) -> Result<(u32, Option<u32>), UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let uid = match user.parse::<u32>() {
        Ok(id) => id,
        Err(_) => User::from_name(user)
            .map_err(|e| UserError::Lookup(e.to_string()))?
            .ok_or_else(|| UserError::NoUser(user.to_owned()))?
            .uid
            .as_raw(),
    };
    let gid = match group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => Group::from_name(g)
                .map_err(|e| UserError::Lookup(e.to_string()))?
                .ok_or_else(|| UserError::NoGroup(g.to_owned()))?
                .gid
                .as_raw(),
        }),
    };
    Ok((uid, gid))
}

fn supplementary(name: &str, gid: u32) -> Result<Vec<u32>, UserError> {
    let cname = CString::new(name).map_err(|e| UserError::Lookup(e.to_string()))?;
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(&cname, Gid::from_raw(gid))
        .map_err(|e| UserError::Lookup(format!("groups of {name}: {e}")))?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn specs_take_names_and_ids() {
        assert_eq!(parse_spec("0").unwrap(), (0, None));
        assert_eq!(parse_spec("root:0").unwrap(), (0, Some(0)));
        assert_eq!(parse_spec("1234:5678").unwrap(), (1234, Some(5678)));
        assert!(matches!(
            parse_spec("no-such-user-kz"),
            Err(UserError::NoUser(_))
        ));
        assert!(matches!(
            parse_spec("0:no-such-group-kz"),
            Err(UserError::NoGroup(_))
        ));
    }

    #[test]
    fn a_root_agent_needs_the_flag_and_then_lives_in_a_user_namespace() {
        let req = UserRequest {
            spec: Some("root".into()),
            allow_root: false,
        };
        if Uid::current().is_root() {
            let err = resolve(&req, env(&[])).unwrap_err();
            assert!(err.to_string().contains("--user USER"), "{err}");
            let ok = resolve(
                &UserRequest {
                    allow_root: true,
                    ..req
                },
                env(&[]),
            )
            .unwrap();
            assert!(ok.root_in_userns);
            assert_ne!(ok.uid, 0);
            assert!(ok.groups.is_empty());
        }
    }

    #[test]
    fn sudo_names_the_invoking_user() {
        if !Uid::current().is_root() {
            return;
        }
        let u = resolve(
            &UserRequest::default(),
            env(&[("SUDO_UID", "65534"), ("SUDO_GID", "65534")]),
        )
        .unwrap();
        assert_eq!((u.uid, u.gid), (65534, 65534));
        assert!(!u.root_in_userns);
        let bad = resolve(&UserRequest::default(), env(&[("SUDO_UID", "x")])).unwrap_err();
        assert!(matches!(bad, UserError::BadEnv { .. }));
        let root = resolve(&UserRequest::default(), env(&[])).unwrap_err();
        assert!(matches!(root, UserError::RootAgent { .. }));
    }
}
