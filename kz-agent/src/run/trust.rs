//! The blind run's on-disk state and the trust it hands the child.
//!
//! Each run gets a private directory (`/run/kz/runs/<id>` as root, else under
//! `$XDG_RUNTIME_DIR` or `/tmp/kz-<uid>`) holding only public material: the CA bundle the child
//! trusts (system roots + this run's CA certificate; never a key) and a `owner` file naming the kz
//! process (pid and start time) so a later run can tell a live run from one whose kz was killed
//! and remove what it left. The directory is removed when the run ends.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot {what} {path}: {source}; check the directory's permissions or set TMPDIR")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no system CA bundle found (looked at {0}); install ca-certificates or set SSL_CERT_FILE"
    )]
    NoSystemRoots(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrustError {
    let path = path.to_owned();
    move |source| TrustError::Io { what, path, source }
}

/// Where common distributions keep the system CA bundle (Debian/Ubuntu/Alpine, Fedora/RHEL,
/// openSUSE, macOS-style/LibreSSL).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Environment variables through which common runtimes and tools pick their CA bundle. All point
/// at the same file: system roots + the run's CA.
pub const CA_ENV_VARS: &[&str] = &[
    "SSL_CERT_FILE", // OpenSSL (curl, git, Python ssl, Ruby, PHP), Go, rustls-native-certs
    "NODE_EXTRA_CA_CERTS", // Node.js (added to its built-in roots)
    "REQUESTS_CA_BUNDLE", // Python requests
    "CURL_CA_BUNDLE", // curl, also honoured by requests
    "GIT_SSL_CAINFO", // git over https
    "AWS_CA_BUNDLE", // AWS CLI and SDKs
    "PIP_CERT",      // pip
    "HTTPLIB2_CA_CERTS", // httplib2 (Google API clients)
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", // gRPC core (Python/Ruby/C++ clients)
    "NPM_CONFIG_CAFILE", // npm
    "YARN_CAFILE",   // yarn v1
    "CARGO_HTTP_CAINFO", // cargo
    "DENO_CERT",     // Deno
    "BUNDLE_SSL_CA_CERT", // Ruby bundler
    "NIX_SSL_CERT_FILE", // Nix-built programs
    "HEX_CACERTS_PATH", // Elixir hex
];

/// Proxy variables a child might inherit. Blind mode with kernel interception removes them (the
/// kernel already sends everything to kz; a stale proxy would only confuse clients); the
/// explicit-proxy fallback sets them.
pub const PROXY_ENV_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

/// The system CA bundle's PEM text.
pub fn system_roots_pem() -> Result<String, TrustError> {
    for path in SYSTEM_BUNDLES {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.contains("-----BEGIN CERTIFICATE-----")
        {
            return Ok(text);
        }
    }
    Err(TrustError::NoSystemRoots(SYSTEM_BUNDLES.join(", ")))
}

/// A run's private directory. Removed on drop.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// The parent of all run directories for this user.
    pub fn base() -> PathBuf {
        if is_root() {
            return PathBuf::from("/run/kz/runs");
        }
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("kz/runs");
        }
        std::env::temp_dir().join(format!("kz-{}/runs", uid()))
    }

    /// Creates `<base>/<id>` (0700) with the owner file, after removing directories of runs
    /// whose kz process is gone.
    pub fn create(id: &str) -> Result<RunDir, TrustError> {
        let base = Self::base();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(io("create", &base))?;
        remove_stale(&base);
        let path = base.join(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io("create", &path))?;
        let dir = RunDir { path };
        let me = std::process::id();
        let owner = format!("{me} {}\n", start_time(me).unwrap_or(0));
        dir.write("owner", owner.as_bytes(), 0o600)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in the run directory with `mode`; returns its path.
    pub fn write(&self, name: &str, data: &[u8], mode: u32) -> Result<PathBuf, TrustError> {
        let path = self.path.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io("create", &path))?;
        f.write_all(data).map_err(io("write", &path))?;
        Ok(path)
    }

    /// Writes the child's CA bundle: the system roots followed by the run's CA certificate.
    /// Returns its path and its text (the agent's mount namespace gets a copy of it).
    pub fn write_ca_bundle(&self, run_ca_pem: &str) -> Result<(PathBuf, String), TrustError> {
        let mut bundle = system_roots_pem()?;
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str("# kz run CA: TLS to every host is terminated by kz for this run\n");
        bundle.push_str(run_ca_pem);
        // Readable by the child even if it drops to another user; it holds no secret.
        let path = self.write("ca-bundle.pem", bundle.as_bytes(), 0o644)?;
        Ok((path, bundle))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the run directory");
        }
    }
}

/// Removes run directories under `base` whose owner process is gone (kz killed by SIGKILL).
/// Returns the names removed.
pub fn remove_stale(base: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let owner = std::fs::read_to_string(path.join("owner")).unwrap_or_default();
        let mut words = owner.split_whitespace();
        let pid: Option<u32> = words.next().and_then(|p| p.parse().ok());
        let started: Option<u64> = words.next().and_then(|s| s.parse().ok());
        let alive = match (pid, started) {
            (Some(pid), Some(started)) => start_time(pid) == Some(started),
            // Being written right now by a starting run: leave it.
            _ => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() < 60),
        };
        if !alive && std::fs::remove_dir_all(&path).is_ok() {
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    removed
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid it
/// names a process uniquely, even after pid reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Effective uid 0.
pub fn is_root() -> bool {
    uid() == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_this_process_and_not_a_dead_one() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert_eq!(start_time(u32::MAX - 1), None);
    }

    #[test]
    fn stale_run_dirs_are_removed_live_ones_kept() {
        let base = std::env::temp_dir().join(format!("kz-trust-test-{}", std::process::id()));
        std::fs::create_dir_all(base.join("dead")).unwrap();
        std::fs::create_dir_all(base.join("live")).unwrap();
        std::fs::write(base.join("dead/owner"), "4294967294 12345\n").unwrap();
        let me = std::process::id();
        let live = format!("{me} {}\n", start_time(me).unwrap());
        std::fs::write(base.join("live/owner"), live).unwrap();
        // Same pid, other start time: a reused pid, so stale.
        std::fs::create_dir_all(base.join("reused")).unwrap();
        std::fs::write(base.join("reused/owner"), format!("{me} 1\n")).unwrap();
        let mut removed = remove_stale(&base);
        removed.sort();
        assert_eq!(removed, ["dead", "reused"]);
        assert!(base.join("live").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn ca_bundle_is_system_roots_plus_run_ca() {
        let id = format!("unit-{}", std::process::id());
        let dir = RunDir::create(&id).unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let (path, _) = dir.write_ca_bundle(pem).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(pem));
        assert!(text.matches("BEGIN CERTIFICATE").count() > 1);
        let root = dir.path().to_owned();
        drop(dir);
        assert!(!root.exists());
    }
}
