//! Which logs kz has keyed, and from which `seq`: one JSON line per keyed chain started
//! (`{"log": PATH, "from_seq": N}`), in `audit.keyed` beside the key, where only kz's user can
//! write. Without it, a log rewritten wholly from its first record with plain SHA-256 would look
//! like a log written before kz keyed its chains; with it, `kz audit verify` knows that this
//! log's records from `from_seq` on must carry a MAC.

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::key::AuditKey;
use super::location;

/// The ledger's file name, beside the key.
pub const LEDGER_NAME: &str = "audit.keyed";

fn ledger_path(key: &AuditKey) -> Option<PathBuf> {
    key.path().map(|p| p.with_file_name(LEDGER_NAME))
}

/// The log's path as the ledger names it: absolute, its directory's links resolved (the file
/// itself may not exist yet).
fn log_name(log: &Path) -> Option<String> {
    let abs = if log.is_absolute() {
        log.to_owned()
    } else {
        std::env::current_dir().ok()?.join(log)
    };
    let dir = std::fs::canonicalize(abs.parent()?).ok()?;
    Some(dir.join(abs.file_name()?).to_string_lossy().into_owned())
}

/// Notes that `log` is keyed from `from_seq` on. Best effort: a log kz cannot note is still
/// keyed, only not protected against the whole-log downgrade (the failure is logged).
pub(crate) fn note(key: &AuditKey, log: &Path, from_seq: u64) {
    let (Some(path), Some(name)) = (ledger_path(key), log_name(log)) else {
        return;
    };
    let line = serde_json::json!({ "log": name, "from_seq": from_seq }).to_string() + "\n";
    let written = location::refuse_link(&path)
        .map_err(std::io::Error::other)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
        })
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(ledger = %path.display(), "cannot note the keyed audit log: {e}");
    }
}

/// The `seq` from which kz keyed `log`, per the ledger beside `key` (the last entry for it).
pub(crate) fn keyed_from(key: &AuditKey, log: &Path) -> Option<u64> {
    let path = ledger_path(key)?;
    let name = log_name(log)?;
    let f = location::open_read(&path).ok()??;
    let mut found = None;
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["log"].as_str() == Some(name.as_str()) {
            found = v["from_seq"].as_u64();
        }
    }
    found
}
