//! The node daemon's state on disk: one file per sandbox, so that a daemon started after
//! another one was killed adopts the sandboxes it left ([`super::adopt`]).
//!
//! ```text
//! <state dir>/                 default /var/lib/kz/agent: root's, 0700
//!   lock                       flock'ed for as long as a daemon uses the directory
//!   sandboxes/                 0700
//!     <id>.json                0600: one sandbox
//! ```
//! A sandbox's file holds what cannot be found again: its id (the cgroup's), name, owner (uid
//! and gid, to resolve its secrets as the owner again), project directory, creation time,
//! whether a `POST /v1/runs` command made it, the masked token of each secret (masked tokens are
//! not secrets: the agent holds them in its environment), and its CA's certificate and key (the
//! agent trusts that CA; the key is no user's secret, but whoever holds it can mint certificates
//! the agent accepts, so it is root's only). **No real secret value is ever written**: adoption
//! resolves the secrets again from the project, as the owner, and maps the same masked tokens to
//! the values it gets.
//!
//! A Kubernetes pod's sandbox ([`super::pods`]) also keeps its pod: uid, name, namespace,
//! service account, the kubelet's cgroup driver and the pod's QoS class, and the pod's cgroup
//! (the kubelet's, not kz's; the file's id is that cgroup's). The pod's projected token is not
//! kept: it was verified at registration, and the cgroup's id ties the sandbox to that pod.
//!
//! Only root may write any directory above the state directory (a sticky one such as `/tmp` is
//! accepted above it), and the directory must be root's and 0700: whoever could write on the way
//! could plant a file kz would believe. A file is written under a temporary name (`O_EXCL`,
//! `O_NOFOLLOW`, 0600), synced, renamed into place, and the directory synced, so a file that
//! exists is whole; one is believed only when it is a regular root-owned file of mode 0600 with
//! one link, opened without following links.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Where the daemon keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kz/agent";
/// The format of a sandbox's file.
const VERSION: u32 = 1;
/// A sandbox's file is a few kilobytes (a certificate, a key, names and tokens).
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error(
        "the state directory {dir} is unsafe: {why}; keep it in a directory only root can write (the default is {DEFAULT_STATE_DIR}) or pass another --state-dir"
    )]
    Unsafe { dir: PathBuf, why: String },
    #[error(
        "another kz agent uses the state directory {0}; stop it first, or give this one its own --state-dir"
    )]
    InUse(PathBuf),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a sandbox's state kz can trust: {why}")]
    Bad { path: PathBuf, why: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// One sandbox as its file holds it. Dropping it zeroes the CA key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persisted {
    pub version: u32,
    /// The cgroup's id.
    pub id: u64,
    pub name: String,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub project_dir: PathBuf,
    /// RFC 3339, UTC.
    pub created: String,
    /// Made for one `POST /v1/runs` command: destroyed once its processes are gone.
    pub run: bool,
    /// The masked token of each secret, by secret name.
    pub tokens: BTreeMap<String, String>,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// The approvals store the owner named at creation: the gate runs against it again at
    /// adoption (a config the agent changed during the gap is refused as at creation).
    #[serde(default)]
    pub approvals: Option<PathBuf>,
    /// The Kubernetes pod whose cgroup it guards ([`super::pods`]); none: a sandbox of kz's own
    /// cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PersistedPod>,
}

/// The pod a pod sandbox guards, as registration found it ([`super::pods`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub driver: super::kubepods::Driver,
    pub qos: super::kubepods::Qos,
    /// The pod's cgroup, made and owned by the kubelet.
    pub cgroup: PathBuf,
}

impl Persisted {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        name: String,
        owner: (u32, u32),
        project_dir: PathBuf,
        created: String,
        run: bool,
        tokens: BTreeMap<String, String>,
        ca: &crate::proxy::CertAuthority,
    ) -> Persisted {
        Persisted {
            version: VERSION,
            id,
            name,
            owner_uid: owner.0,
            owner_gid: owner.1,
            project_dir,
            created,
            run,
            tokens,
            ca_cert_pem: ca.cert_pem().to_owned(),
            ca_key_pem: ca.key_pem().to_string(),
            pod: None,
            approvals: None,
        }
    }
}

impl Drop for Persisted {
    fn drop(&mut self) {
        self.ca_key_pem.zeroize();
    }
}

impl std::fmt::Debug for Persisted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persisted")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("owner_uid", &self.owner_uid)
            .field("project_dir", &self.project_dir)
            .finish_non_exhaustive()
    }
}

/// A file found in the state directory.
pub struct Found {
    pub path: PathBuf,
    /// The id its name gives (`<id>.json`).
    pub id: u64,
    pub state: Result<Persisted, PersistError>,
}

/// The daemon's state directory, locked for as long as this value lives.
pub struct StateDir {
    dir: PathBuf,
    sandboxes: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Opens (creating it 0700 if missing) and locks `dir`; refused when it is unsafe (see the
    /// module docs) or another daemon holds it.
    pub fn open(dir: &Path) -> Result<StateDir, PersistError> {
        let dir = std::path::absolute(dir).map_err(io("resolve", dir))?;
        check_ancestors(&dir)?;
        let sandboxes = dir.join("sandboxes");
        for d in [&dir, &sandboxes] {
            if !d.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)
                    .map_err(io("create", d))?;
            }
            check_private_dir(&dir, d)?;
        }
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(PersistError::InUse(dir)),
            Err((_, errno)) => return Err(io("lock", &lock_path)(errno.into())),
        };
        Ok(StateDir {
            dir,
            sandboxes,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The name of the daemon's cgroup and pin directories (`<cgroup2>/kz/<name>`,
    /// `/sys/fs/bpf/kz/<name>`): the same for every daemon of this state directory, so the next
    /// one finds the sandboxes a killed one left, and another for each state directory, so two
    /// daemons never share one.
    pub fn held_name(&self) -> String {
        let digest = Sha256::digest(self.dir.as_os_str().as_encoded_bytes());
        format!(
            "{}{}",
            crate::intercept::pins::HELD_PREFIX,
            hex::encode(&digest[..8])
        )
    }

    fn file_of(&self, id: u64) -> PathBuf {
        self.sandboxes.join(format!("{id}.json"))
    }

    /// Writes a sandbox's file (replacing an older one) atomically.
    pub fn save(&self, state: &Persisted) -> Result<(), PersistError> {
        let path = self.file_of(state.id);
        let tmp = self.sandboxes.join(format!(".{}.json.tmp", state.id));
        let bytes =
            Zeroizing::new(
                serde_json::to_vec_pretty(state).map_err(|e| PersistError::Bad {
                    path: path.clone(),
                    why: e.to_string(),
                })?,
            );
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(&bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename into place", &tmp))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        self.sync_dir()
    }

    /// Removes a sandbox's file (gone already is fine).
    pub fn remove(&self, id: u64) -> Result<(), PersistError> {
        self.discard(&self.file_of(id))
    }

    /// Removes a file of the sandboxes directory.
    pub fn discard(&self, path: &Path) -> Result<(), PersistError> {
        match std::fs::remove_file(path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<(), PersistError> {
        File::open(&self.sandboxes)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.sandboxes))
    }

    /// Every sandbox file, read and checked; temporary files a killed daemon left are removed,
    /// anything else that is not `<id>.json` is left alone.
    pub fn load_all(&self) -> Result<Vec<Found>, PersistError> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.sandboxes).map_err(io("read", &self.sandboxes))?;
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') && name.ends_with(".json.tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let state = read(&path).and_then(|s| {
                if s.version != VERSION {
                    return Err(PersistError::Bad {
                        path: path.clone(),
                        why: format!("format version {}, this kz reads {VERSION}", s.version),
                    });
                }
                if s.id != id {
                    return Err(PersistError::Bad {
                        path: path.clone(),
                        why: format!("it names sandbox {}", s.id),
                    });
                }
                Ok(s)
            });
            found.push(Found { path, id, state });
        }
        found.sort_by_key(|f| f.id);
        Ok(found)
    }
}

/// Reads one file: a regular file of root's (kz's user), mode 0600 or tighter, one link,
/// opened without following a link.
fn read(path: &Path) -> Result<Persisted, PersistError> {
    let bad = |why: String| PersistError::Bad {
        path: path.to_owned(),
        why,
    };
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| bad(format!("cannot open it without following links: {e}")))?;
    let meta = f.metadata().map_err(io("stat", path))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != euid() || meta.mode() & 0o077 != 0 || meta.nlink() != 1 {
        return Err(bad(format!(
            "owner uid {}, mode {:o}, {} links (kz writes its own files 0600 with one link)",
            meta.uid(),
            meta.mode() & 0o7777,
            meta.nlink()
        )));
    }
    if meta.len() > MAX_FILE {
        return Err(bad(format!("{} bytes is too large", meta.len())));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.read_to_end(&mut bytes).map_err(io("read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Every existing directory from `/` to `dir`'s parent is root's or kz's user's and writable by
/// no one else (sticky directories accepted: no one can replace what another user made there).
fn check_ancestors(dir: &Path) -> Result<(), PersistError> {
    let mut at = PathBuf::new();
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        let meta = match std::fs::metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("stat", &at)(e)),
        };
        let mode = meta.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if (meta.uid() != 0 && meta.uid() != euid()) || (!sticky && mode & 0o022 != 0) {
            return Err(PersistError::Unsafe {
                dir: dir.to_owned(),
                why: format!(
                    "{} (owner uid {}, mode {mode:o}) can be written by another user",
                    at.display(),
                    meta.uid()
                ),
            });
        }
    }
    Ok(())
}

/// `d` is a directory (not a link) of kz's user that no one else can enter.
fn check_private_dir(state: &Path, d: &Path) -> Result<(), PersistError> {
    let meta = std::fs::symlink_metadata(d).map_err(io("stat", d))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != euid() || mode & 0o077 != 0 {
        return Err(PersistError::Unsafe {
            dir: state.to_owned(),
            why: format!(
                "{} must be a directory of uid {} with mode 0700 (it is {}, owner uid {}, mode {mode:o}); `chmod 0700` it if it is yours",
                d.display(),
                euid(),
                if meta.is_dir() {
                    "a directory"
                } else {
                    "no directory"
                },
                meta.uid()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kz-persist-{tag}-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    fn sample(id: u64) -> Persisted {
        let ca = crate::proxy::CertAuthority::generate(4).unwrap();
        Persisted::new(
            id,
            "agent-1".into(),
            (1000, 1000),
            "/home/me/project".into(),
            "2026-12-03T10:41:30.490Z".into(),
            false,
            BTreeMap::from([("API_KEY".into(), "kz_masked_0123".into())]),
            &ca,
        )
    }

    #[test]
    fn a_sandbox_round_trips_privately_and_one_daemon_holds_the_directory() {
        let root = scratch("rt");
        let dir = root.join("agent");
        let state = StateDir::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("sandboxes")), 0o700);
        assert!(matches!(StateDir::open(&dir), Err(PersistError::InUse(_))));
        let s = sample(42);
        state.save(&s).unwrap();
        state.save(&s).unwrap();
        let file = dir.join("sandboxes/42.json");
        assert_eq!(mode(&file), 0o600);
        let found = state.load_all().unwrap();
        assert_eq!(found.len(), 1);
        let back = found[0].state.as_ref().unwrap();
        assert_eq!(
            (back.id, &back.name, &back.tokens, &back.ca_key_pem),
            (42, &s.name, &s.tokens, &s.ca_key_pem)
        );
        assert!(!format!("{back:?}").contains("PRIVATE KEY"));
        // A file that others could have written, or one that names another sandbox, is not
        // believed.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            state.load_all().unwrap()[0].state,
            Err(PersistError::Bad { .. })
        ));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&file, dir.join("sandboxes/43.json")).unwrap();
        assert!(matches!(
            state.load_all().unwrap()[0].state,
            Err(PersistError::Bad { .. })
        ));
        state.remove(43).unwrap();
        state.remove(43).unwrap();
        assert!(state.load_all().unwrap().is_empty());
        let name = state.held_name();
        assert!(name.starts_with("agent-") && name.len() == 22, "{name}");
        assert!(crate::intercept::pins::Instance::parse(&name).is_none());
        drop(state);
        assert_eq!(StateDir::open(&dir).unwrap().held_name(), name);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A pod sandbox's file keeps its pod; a file without one (a sandbox of kz's own cgroup)
    /// loads with none, and writes none.
    #[test]
    fn a_pod_sandbox_keeps_its_pod() {
        let root = scratch("pod");
        let state = StateDir::open(&root.join("agent")).unwrap();
        let plain = sample(7);
        state.save(&plain).unwrap();
        let text = std::fs::read_to_string(root.join("agent/sandboxes/7.json")).unwrap();
        assert!(!text.contains("\"pod\""), "{text}");
        let mut s = sample(8);
        let pod = PersistedPod {
            uid: "5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6".into(),
            name: "coder-7d9f".into(),
            namespace: "agents".into(),
            service_account: "coder".into(),
            driver: super::super::kubepods::Driver::Systemd,
            qos: super::super::kubepods::Qos::Burstable,
            cgroup: "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f0c2a7e_1b3d_4c5e_9f80_a1b2c3d4e5f6.slice".into(),
        };
        s.pod = Some(pod.clone());
        state.save(&s).unwrap();
        let found = state.load_all().unwrap();
        let back: Vec<Option<PersistedPod>> = found
            .iter()
            .map(|f| f.state.as_ref().unwrap().pod.clone())
            .collect();
        assert_eq!(back, vec![None, Some(pod)]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_loose_or_linked_state_directory_is_refused() {
        let root = scratch("loose");
        let loose = root.join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            StateDir::open(&loose),
            Err(PersistError::Unsafe { .. })
        ));
        let link = root.join("link");
        std::os::unix::fs::symlink(&loose, &link).unwrap();
        assert!(matches!(
            StateDir::open(&link),
            Err(PersistError::Unsafe { .. })
        ));
        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            StateDir::open(&open.join("agent")),
            Err(PersistError::Unsafe { .. })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}
