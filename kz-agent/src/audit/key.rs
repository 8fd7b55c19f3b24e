//! The chain's key: 32 bytes from the operating system's CSPRNG, kept in a file only kz's user
//! can read ([`super::default_key_path`]: `/var/lib/kz/audit.key` for root), created on first
//! use. Each record's `mac` is HMAC-SHA-256 under it, so rewriting the log needs the key and
//! not only write access to the file. The file holds the key as 64 hex digits and a newline.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::location::{self, LocationError};

const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the audit key {path}: {source}")]
    Location {
        path: PathBuf,
        source: LocationError,
    },
    #[error(
        "the audit key {path} can be read or written by others (mode {mode:o}); `chmod 600 {path}`, and replace the key (move it aside) if someone may have read it"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "the audit key {path} is not 64 hex digits; it was damaged or is not kz's. Restore it from a backup (logs written with it cannot be verified without it) or move it aside to start a new key"
    )]
    Malformed { path: PathBuf },
    #[error("cannot read or write the audit key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system's random number generator failed; no audit key was made")]
    Random,
}

/// An HMAC-SHA-256 key for the audit chain. Never printed: `Debug` shows its id.
pub struct AuditKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    /// Keyed once: each record clones this state instead of hashing the key again.
    mac: Hmac<Sha256>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("id", &self.id())
            .field("path", &self.path)
            .finish()
    }
}

impl AuditKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> AuditKey {
        let bytes = Zeroizing::new(bytes);
        // HMAC pads a short key with zeros to the hash's block size (RFC 2104), so keying with
        // the padded block is the same MAC, through the constructor that cannot fail.
        let mut block = Zeroizing::new([0u8; 64]);
        block[..KEY_LEN].copy_from_slice(&bytes[..]);
        let mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&(*block).into());
        AuditKey {
            bytes,
            mac,
            path: None,
        }
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<AuditKey, KeyError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes[..])
            .map_err(|_| KeyError::Random)?;
        Ok(AuditKey::from_bytes(*bytes))
    }

    /// The key at `path`, or `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<AuditKey>, KeyError> {
        let loc = |source| KeyError::Location {
            path: path.to_owned(),
            source,
        };
        location::refuse_link(path).map_err(loc)?;
        let Some(mut file) = location::open_read(path).map_err(loc)? else {
            return Ok(None);
        };
        location::check_key_file(path, &file).map_err(loc)?;
        if let Some(mode) = location::too_open(&file) {
            return Err(KeyError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = Zeroizing::new(String::new());
        Read::by_ref(&mut file)
            .take(256)
            .read_to_string(&mut text)
            .map_err(|source| KeyError::Io {
                path: path.to_owned(),
                source,
            })?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text.trim(), &mut bytes[..]).map_err(|_| KeyError::Malformed {
            path: path.to_owned(),
        })?;
        let mut key = AuditKey::from_bytes(*bytes);
        key.path = Some(path.to_owned());
        Ok(Some(key))
    }

    /// The key at `path`, created (0600, its directory 0700) when there is none. Two kz
    /// processes starting at once agree on one key: the new key is written under a temporary
    /// name and renamed into place without replacing, which fails if the other got there first.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, KeyError> {
        if let Some(key) = AuditKey::load(path)? {
            return Ok(key);
        }
        let loc = |source| KeyError::Location {
            path: path.to_owned(),
            source,
        };
        let ioe = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        location::check_dirs(path).map_err(loc)?;
        if let Some(dir) = path.parent() {
            location::create_private_dir(dir).map_err(loc)?;
        }
        let key = AuditKey::generate()?;
        let tmp = path.with_file_name(format!(
            ".{}.{}.{:016x}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("audit.key"),
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut file = location::create_new(&tmp).map_err(loc)?;
        let mut text = Zeroizing::new(hex::encode(&key.bytes[..]));
        text.push('\n');
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        drop(file);
        // rename(2) with RENAME_NOREPLACE, not link + unlink: a reader racing the creation
        // must never see the key with two links (which `load` rightly refuses).
        let linked = written.and_then(|()| {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &tmp,
                nix::fcntl::AT_FDCWD,
                path,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .map_err(std::io::Error::from)
        });
        if linked.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        match linked {
            Ok(()) => {
                if let Some(dir) = path.parent()
                    && let Ok(d) = std::fs::File::open(dir)
                {
                    let _ = d.sync_all();
                }
                AuditKey::load(path)?.ok_or_else(|| ioe(std::io::ErrorKind::NotFound.into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                AuditKey::load(path)?.ok_or_else(|| ioe(e))
            }
            Err(e) => Err(ioe(e)),
        }
    }

    /// The file the key came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A short public name for the key (16 hex digits of a hash of it), to tell keys apart.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"kz audit key id\n");
        h.update(&self.bytes[..]);
        hex::encode(&h.finalize()[..8])
    }

    fn keyed(&self, prev: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut m = self.mac.clone();
        m.update(prev.as_bytes());
        m.update(b"\n");
        m.update(body);
        m
    }

    /// HMAC-SHA-256(key, prev ‖ "\n" ‖ body) in hex: the record's `mac`.
    pub(crate) fn mac(&self, prev: &str, body: &[u8]) -> String {
        hex::encode(self.keyed(prev, body).finalize().into_bytes())
    }

    /// Whether `mac_hex` is the record's MAC (compared in constant time).
    pub(crate) fn verify(&self, prev: &str, body: &[u8], mac_hex: &str) -> bool {
        let mut tag = [0u8; 32];
        hex::decode_to_slice(mac_hex, &mut tag).is_ok()
            && self.keyed(prev, body).verify_slice(&tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_0600_in_a_0700_directory_and_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/kz/audit.key");
        let a = AuditKey::load_or_create(&path).unwrap();
        let b = AuditKey::load_or_create(&path).unwrap();
        assert_eq!(a.id(), b.id());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(
            !format!("{a:?}").contains(text.trim()),
            "Debug shows no key"
        );
        // No temporary file is left beside it.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        assert_eq!(a.mac("p", b"{}"), b.mac("p", b"{}"));
        // The padded-block keying is plain HMAC-SHA-256 (RFC 4231 style check).
        let mut plain = <Hmac<Sha256> as Mac>::new_from_slice(&a.bytes[..]).unwrap();
        plain.update(b"p\n{}");
        assert_eq!(
            a.mac("p", b"{}"),
            hex::encode(plain.finalize().into_bytes())
        );
        assert!(a.verify("p", b"{}", &a.mac("p", b"{}")));
        assert!(!a.verify("p", b"{ }", &a.mac("p", b"{}")));
        assert!(!a.verify("p", b"{}", "zz"));
    }

    #[test]
    fn a_readable_key_and_a_linked_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        AuditKey::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = AuditKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let link = dir.path().join("other.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = AuditKey::load_or_create(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::write(dir.path().join("bad.key"), "xyz\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("bad.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let e = AuditKey::load(&dir.path().join("bad.key")).unwrap_err();
        assert!(matches!(e, KeyError::Malformed { .. }), "{e}");
    }

    #[test]
    fn racing_creators_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let ids: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| AuditKey::load_or_create(&path).unwrap().id()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    }
}
