//! Who is asking, and what they may see: the local API's authorisation.
//!
//! The caller is the kernel's record of the process at the other end of the unix socket
//! (SO_PEERCRED, taken when it connected), never anything the request says. The rule: a user
//! sees and manages only the sandboxes it created (their owner uid is its uid); uid 0 and the
//! members of the group [`ADMIN_GROUP`] see and manage all. Anyone who can open the socket (its
//! mode and group decide that) may create sandboxes for itself.

/// Members of this group (primary or listed) manage every sandbox on the node.
pub const ADMIN_GROUP: &str = "kz-admin";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "cannot read the caller's credentials from the socket (SO_PEERCRED): {0}; the request is refused"
    )]
    PeerCred(std::io::Error),
}

/// The process at the other end of one API connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// uid 0 or a member of [`ADMIN_GROUP`] when it connected.
    pub admin: bool,
}

impl Caller {
    /// The caller of a connection, from the kernel's record of it.
    pub fn of(stream: &tokio::net::UnixStream) -> Result<Caller, AuthError> {
        let cred = stream.peer_cred().map_err(AuthError::PeerCred)?;
        let admin = is_admin(cred.uid(), cred.gid(), &admin_group());
        Ok(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            admin,
        })
    }
}

/// What an admin group looks like to [`is_admin`]: its gid and its listed members' names.
#[derive(Debug, Clone, Default)]
pub struct AdminGroup {
    pub gid: Option<u32>,
    pub members: Vec<String>,
}

/// [`ADMIN_GROUP`] as the system's group database has it now (empty when it does not exist):
/// read per connection, so adding a user to the group takes effect without a restart.
pub fn admin_group() -> AdminGroup {
    match nix::unistd::Group::from_name(ADMIN_GROUP) {
        Ok(Some(g)) => AdminGroup {
            gid: Some(g.gid.as_raw()),
            members: g.mem,
        },
        _ => AdminGroup::default(),
    }
}

/// uid 0, or a user whose primary group (the peer's gid) is the admin group or who is listed
/// as one of its members.
pub fn is_admin(uid: u32, gid: u32, group: &AdminGroup) -> bool {
    if uid == 0 {
        return true;
    }
    if group.gid.is_some_and(|g| g == gid) {
        return true;
    }
    if group.members.is_empty() {
        return false;
    }
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    name.is_some_and(|n| group.members.contains(&n))
}

/// Whether `caller` may see and manage a sandbox owned by `owner`.
pub fn may_manage(caller: &Caller, owner: u32) -> bool {
    caller.admin || caller.uid == owner
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, admin: bool) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: None,
            admin,
        }
    }

    #[test]
    fn owners_manage_their_own_and_admins_all() {
        let alice = caller(1000, false);
        let bob = caller(1001, false);
        let admin = caller(1002, true);
        let root = caller(0, true);
        assert!(may_manage(&alice, 1000));
        assert!(!may_manage(&alice, 1001));
        assert!(!may_manage(&bob, 1000));
        assert!(
            !may_manage(&bob, 0),
            "a user does not manage root's sandboxes"
        );
        assert!(may_manage(&admin, 1000) && may_manage(&admin, 0));
        assert!(may_manage(&root, 1001));
    }

    #[test]
    fn admin_is_root_or_the_admin_group() {
        let none = AdminGroup::default();
        assert!(is_admin(0, 0, &none));
        assert!(!is_admin(1000, 1000, &none));
        let group = AdminGroup {
            gid: Some(4242),
            members: vec![],
        };
        assert!(
            is_admin(1000, 4242, &group),
            "primary group is the admin group"
        );
        assert!(!is_admin(1000, 1000, &group));
        // A listed member, found by name (every passwd database has `nobody`).
        if let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") {
            let uid = nobody.uid.as_raw();
            let listed = AdminGroup {
                gid: Some(4242),
                members: vec!["nobody".into()],
            };
            assert!(is_admin(uid, 1, &listed));
            assert!(!is_admin(uid, 1, &group));
        }
    }
}
