//! Where the audit log and its key live, and how kz opens them so that the agent's user can
//! neither read the key nor replace, redirect or rewrite the log.
//!
//! The rule (docs/audit.md):
//! - kz runs as root (through `sudo` or not): `/var/lib/kz/` (created 0700), log
//!   `audit.jsonl`, key `audit.key` (0600). `HOME` and `XDG_STATE_HOME` are ignored: `sudo -E`
//!   keeps the invoking user's, and the agent runs as that user.
//! - otherwise: `$XDG_STATE_HOME/kz/`, else `~/.local/state/kz/` (created 0700), the same names.
//!
//! As root, every directory above the log must be root's and writable by no one else (a sticky
//! directory such as `/tmp` is accepted above it, never as the log's own directory): whoever can
//! write a directory on the way can swap the log for a link or a file of theirs.
//! Files are opened with `O_NOFOLLOW` and must be regular files of kz's own user.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// kz's state directory when it runs as root.
pub const ROOT_STATE_DIR: &str = "/var/lib/kz";
/// The log's file name in the state directory.
pub const LOG_NAME: &str = "audit.jsonl";
/// The key's file name in the state directory.
pub const KEY_NAME: &str = "audit.key";

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error(
        "{path} is a symbolic link (to {target}); kz does not follow links at the audit log or its key, because whoever planted one could make kz (root) write where it points. Remove the link, find out who created it, and run again"
    )]
    Symlink { path: PathBuf, target: String },
    #[error(
        "{path} is not a regular file; move it aside (the audit log and its key must be plain files)"
    )]
    NotAFile { path: PathBuf },
    #[error(
        "{path} belongs to uid {owner}, not to kz's user (uid {euid}); another user could have written it. Move it aside or `chown {euid} {path}`"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{path} has {links} hard links; another name for the file could be written behind the log's back. Move it aside and run again"
    )]
    HardLinked { path: PathBuf, links: u64 },
    #[error(
        "{file} is in {dir}, which {who} can write (owner uid {owner}, mode {mode:o}): that user could replace it or plant a link in its place. Keep the audit log and its key in a directory only root can write, such as kz's default {ROOT_STATE_DIR}"
    )]
    WritableDir {
        file: PathBuf,
        dir: PathBuf,
        who: &'static str,
        owner: u32,
        mode: u32,
    },
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocationError + '_ {
    move |source| LocationError::Io {
        path: path.to_owned(),
        source,
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// kz's audit state directory for this process (see the module docs).
pub fn state_dir() -> PathBuf {
    state_dir_for(
        euid() == 0,
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn state_dir_for(root: bool, xdg_state: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if root {
        return PathBuf::from(ROOT_STATE_DIR);
    }
    xdg_state
        .filter(|v| !v.is_empty() && Path::new(v).is_absolute())
        .map(PathBuf::from)
        .or_else(|| {
            home.filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })
        .unwrap_or_else(std::env::temp_dir)
        .join("kz")
}

/// The audit log kz writes when no path is given.
pub fn default_log_path() -> PathBuf {
    state_dir().join(LOG_NAME)
}

/// The chain's key for this process's user.
pub fn default_key_path() -> PathBuf {
    state_dir().join(KEY_NAME)
}

/// `path` made absolute against the working directory, `.` and `..` folded lexically.
fn absolute(path: &Path) -> Result<PathBuf, LocationError> {
    let joined = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_err(io(path))?.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// Refuses a symbolic link or a non-file at `path` (a missing path is fine).
pub(crate) fn refuse_link(path: &Path) -> Result<(), LocationError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(LocationError::Symlink {
            path: path.to_owned(),
            target: std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into()),
        }),
        Ok(m) if !m.is_file() => Err(LocationError::NotAFile {
            path: path.to_owned(),
        }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// As root: every existing directory from `/` down to `file`'s directory is root's and
/// writable by root only (sticky ones accepted above the last). A directory on the way that is
/// a symbolic link is checked where it points, as well as where the link itself lives.
/// Not root: nothing to check, the agent runs as kz's own user.
pub(crate) fn check_dirs(file: &Path) -> Result<(), LocationError> {
    if euid() != 0 {
        return Ok(());
    }
    let abs = absolute(file)?;
    let Some(parent) = abs.parent() else {
        return Ok(());
    };
    check_chain(&abs, parent)?;
    // The directory as it resolves (links on the way followed), when it exists.
    if let Ok(real) = std::fs::canonicalize(parent)
        && real != parent
    {
        check_chain(&abs, &real)?;
    }
    Ok(())
}

fn check_chain(file: &Path, parent: &Path) -> Result<(), LocationError> {
    let mut dir = PathBuf::new();
    let last = parent.components().count();
    for (i, c) in parent.components().enumerate() {
        dir.push(c);
        let meta = match std::fs::metadata(&dir) {
            Ok(m) => m,
            // kz creates what is missing (0700, root's).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mode = meta.mode() & 0o7777;
        let sticky_ok = mode & 0o1000 != 0 && i + 1 < last;
        let who = if meta.uid() != 0 {
            Some("its owner")
        } else if mode & 0o002 != 0 && !sticky_ok {
            Some("every user")
        } else if mode & 0o020 != 0 && meta.gid() != 0 && !sticky_ok {
            Some("its group")
        } else {
            None
        };
        if let Some(who) = who {
            return Err(LocationError::WritableDir {
                file: file.to_owned(),
                dir,
                who,
                owner: meta.uid(),
                mode,
            });
        }
    }
    Ok(())
}

/// Creates `dir` and missing parents 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), LocationError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// The file just opened is a regular file of kz's user with one name, mode 0600 (tightened if
/// it was looser: the log says which agent used which secret where).
fn check_opened(path: &Path, file: &File) -> Result<u64, LocationError> {
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(LocationError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.uid() != euid() {
        return Err(LocationError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    if meta.nlink() > 1 {
        return Err(LocationError::HardLinked {
            path: path.to_owned(),
            links: meta.nlink(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io(path))?;
    }
    Ok(meta.len())
}

fn nofollow_error(path: &Path, e: std::io::Error) -> LocationError {
    // ELOOP: the last component turned into a link between the check and the open.
    if e.raw_os_error() == Some(libc::ELOOP) {
        return LocationError::Symlink {
            path: path.to_owned(),
            target: std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into()),
        };
    }
    io(path)(e)
}

/// Opens (creating it 0600) the audit log at `path` for appending: no link at the path, the
/// directories safe ([`check_dirs`]), `O_NOFOLLOW`. Returns the file and its size.
pub(crate) fn open_append(path: &Path) -> Result<(File, u64), LocationError> {
    refuse_link(path)?;
    check_dirs(path)?;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| nofollow_error(path, e))?;
    let size = check_opened(path, &file)?;
    Ok((file, size))
}

/// Opens `path` for reading without following a link at it; `None` when it does not exist.
pub(crate) fn open_read(path: &Path) -> Result<Option<File>, LocationError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(nofollow_error(path, e)),
    }
}

/// Creates `path` exclusively (it must not exist), 0600, without following links.
pub(crate) fn create_new(path: &Path) -> Result<File, LocationError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| nofollow_error(path, e))
}

/// A key file just opened is kz's user's, one name, and readable by no one else.
pub(crate) fn check_key_file(path: &Path, file: &File) -> Result<(), LocationError> {
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(LocationError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.uid() != euid() {
        return Err(LocationError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    if meta.nlink() > 1 {
        return Err(LocationError::HardLinked {
            path: path.to_owned(),
            links: meta.nlink(),
        });
    }
    Ok(())
}

/// Whether the key file's mode lets anyone but its owner read or write it.
pub(crate) fn too_open(file: &File) -> Option<u32> {
    let mode = file.metadata().ok()?.mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_ignores_home_and_xdg_state_home() {
        let xdg = Some(OsString::from("/home/alice/.local/state"));
        let home = Some(OsString::from("/home/alice"));
        assert_eq!(
            state_dir_for(true, xdg.clone(), home.clone()),
            Path::new("/var/lib/kz")
        );
        assert_eq!(
            state_dir_for(false, xdg, home.clone()),
            Path::new("/home/alice/.local/state/kz")
        );
        assert_eq!(
            state_dir_for(false, Some("relative".into()), home),
            Path::new("/home/alice/.local/state/kz"),
            "a relative XDG_STATE_HOME is ignored, as the XDG spec says"
        );
    }

    #[test]
    fn absolute_folds_dots() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c")).unwrap(),
            Path::new("/a/c")
        );
    }

    #[test]
    fn a_link_at_the_log_path_is_refused_naming_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        let log = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        let e = open_append(&log).unwrap_err();
        assert!(matches!(e, LocationError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains("victim"), "{e}");
        assert!(!victim.exists());
    }

    #[test]
    fn as_root_a_directory_others_can_write_is_refused() {
        if euid() != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // Sticky and world-writable: fine above the log, not as its own directory.
        assert!(check_dirs(&open.join("sub/audit.jsonl")).is_ok());
        let e = check_dirs(&open.join("audit.jsonl")).unwrap_err();
        assert!(e.to_string().contains("every user"), "{e}");
        std::os::unix::fs::chown(&open, Some(65534), None).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_dirs(&open.join("sub/audit.jsonl")).unwrap_err();
        assert!(e.to_string().contains("its owner"), "{e}");
        assert!(e.to_string().contains(ROOT_STATE_DIR), "{e}");
    }
}
