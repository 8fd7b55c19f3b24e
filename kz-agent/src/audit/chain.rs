//! The JSONL sink: one JSON object per line, each carrying `seq`, the previous record's digest
//! (`prev`) and its own `mac` = HMAC-SHA-256(key, prev ‖ "\n" ‖ the record without `mac`, keys
//! sorted), under the key of [`super::AuditKey`]. Editing, deleting or reordering any line breaks
//! the chain at that line, and rewriting the chain from there on needs the key, which the agent
//! cannot read (docs/audit.md).
//!
//! Logs written before the chain was keyed carry `hash` = SHA-256(prev ‖ "\n" ‖ record) instead.
//! The sink continues such a log with one `audit_keyed` record (the upgrade point) and keys
//! every record after it; `kz audit verify` accepts the change of scheme there and nowhere else.
//!
//! Files rotate by size: `audit.jsonl` is renamed to `audit.jsonl.N` (N = 1, 2, … oldest first)
//! and the chain continues in the new file, so `kz audit verify audit.jsonl` checks all of them
//! as one chain. At rotation the oldest rotated files beyond `max_files`, and those not written
//! for `max_age`, are removed (only from the oldest end, so the chain keeps no gap), and an
//! `audit_pruned` record says where the kept chain now starts. On start the sink resumes from the
//! last record on disk, after checking that record's MAC against its key.

use super::key::AuditKey;
use super::{AuditError, AuditEvent, AuditSink, Fields};
use super::{ledger, location};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `kind` of the record that switches an unkeyed log to the keyed chain.
pub const UPGRADE_KIND: &str = "audit_keyed";
/// The `kind` of the record written when rotation removed old files.
pub const PRUNED_KIND: &str = "audit_pruned";

/// Rotated files kept by default: with the 64 MiB files of a blind run, 640 MiB of history.
pub const DEFAULT_MAX_FILES: u32 = 10;
/// Rotated files not written for this many days are removed by default (a month of history:
/// enough to investigate an incident noticed on the next monthly review).
pub const DEFAULT_MAX_AGE_DAYS: u32 = 30;

pub use crate::bundle::Fsync;

pub enum SinkTarget {
    File {
        path: PathBuf,
        fsync: Fsync,
        rotation: Rotation,
    },
    Stdout,
}

/// When the file rotates and which rotated files are kept. `None` turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the file would grow beyond this size.
    pub max_bytes: Option<u64>,
    /// Keep at most this many rotated files (the newest).
    pub max_files: Option<u32>,
    /// Remove rotated files last written longer ago than this.
    pub max_age: Option<Duration>,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            max_bytes: None,
            max_files: Some(DEFAULT_MAX_FILES),
            max_age: Some(Duration::from_secs(
                u64::from(DEFAULT_MAX_AGE_DAYS) * 86_400,
            )),
        }
    }
}

impl Rotation {
    /// Size rotation at `max_bytes` with the default caps.
    pub fn size(max_bytes: Option<u64>) -> Rotation {
        Rotation {
            max_bytes,
            ..Rotation::default()
        }
    }
}

struct FileState {
    path: PathBuf,
    file: File,
    size: u64,
    fsync: Fsync,
    rotation: Rotation,
    last_sync: Instant,
}

struct Inner {
    seq: u64,
    prev: String,
    key: Arc<AuditKey>,
    file: Option<FileState>,
}

pub struct ChainSink {
    inner: Mutex<Inner>,
}

/// A record without its digest key (`mac`, or `hash` in an unkeyed log) as the chain hashes it: compact JSON, keys sorted (a
/// `serde_json::Map` when `kz audit verify` reads a record back, [`super::Fields`] when the sink
/// writes one; both give the same bytes).
/// Serialised straight into bytes: `Value`'s `Display` goes through `core::fmt` a string at a
/// time, which cost the proxy more per request than the hash and the write together.
/// Serialising string-keyed maps to a Vec cannot fail; the fallback only keeps the line whole
/// if that ever changes.
pub(crate) fn canonical_body(m: &impl serde::Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    if serde_json::to_writer(&mut out, m).is_err() {
        out = serde_json::to_value(m)
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_else(|_| b"{}".to_vec());
    }
    out
}

/// The unkeyed scheme of logs written before the chain was keyed: SHA-256 of one record
/// (without its `hash` key) chained to the previous hash. Only `kz audit verify` uses it now.
pub(crate) fn record_hash(prev: &str, body_without_hash: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body_without_hash);
    hex::encode(h.finalize())
}

fn io_err(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// RFC 3339 UTC with milliseconds, without a date library.
pub(crate) fn rfc3339_now() -> String {
    rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// `d` after the Unix epoch in RFC 3339 UTC with milliseconds.
fn rfc3339(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Digit by digit rather than `format!`: this runs once per audit record, on the proxy's
    // request path.
    let mut out = [0u8; 24];
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3600);
    put(14, 2, rem % 3600 / 60);
    put(17, 2, rem % 60);
    put(20, 3, u64::from(d.subsec_millis()));
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        out[i] = c;
    }
    out.iter().map(|b| char::from(*b)).collect()
}

/// Rotated siblings of `path` (`path.1`, `path.2`, …) in chain order.
pub fn rotated_files(path: &Path) -> Vec<PathBuf> {
    rotated_entries(path).into_iter().map(|(_, p)| p).collect()
}

fn rotated_entries(path: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let (Some(dir), Some(name)) = (
        path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        }),
        path.file_name().and_then(|n| n.to_str()),
    ) else {
        return Vec::new();
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let fname = e.file_name();
            let Some(f) = fname.to_str() else { continue };
            if let Some(n) = f
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('.'))
                .and_then(|r| r.parse::<u64>().ok())
            {
                found.push((n, path.with_file_name(f)));
            }
        }
    }
    found.sort();
    found
}

/// Every rotated file is a plain file, not a link someone planted at a rotated name (kz would
/// read it as the chain's tail and, at pruning, remove what the name holds).
fn check_rotated(path: &Path) -> Result<(), AuditError> {
    for (_, p) in rotated_entries(path) {
        location::refuse_link(&p)?;
    }
    Ok(())
}

/// The last record of a file as the sink resumes from it.
struct Tail {
    seq: u64,
    /// Its `mac`, or its `hash` when `keyed` is false.
    digest: String,
    keyed: bool,
    /// For a keyed record: whether its MAC checks out under the sink's key.
    mac_ok: bool,
}

/// The last record of a file, or None for an empty or missing file.
fn last_record(path: &Path, key: &AuditKey) -> Result<Option<Tail>, AuditError> {
    let Some(mut f) = location::open_read(path)? else {
        return Ok(None);
    };
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start))
        .map_err(|e| io_err(path, e))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| io_err(path, e))?;
    let damaged = |reason: &str| AuditError::DamagedTail {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    };
    if buf.last() != Some(&b'\n') {
        return Err(damaged("the last line is incomplete"));
    }
    let text = String::from_utf8_lossy(&buf[..buf.len() - 1]);
    let line = text.rsplit('\n').next().unwrap_or("");
    let mut v: Map<String, Value> =
        serde_json::from_str(line).map_err(|_| damaged("the last line is not JSON"))?;
    let seq = v.get("seq").and_then(Value::as_u64);
    let prev = v.get("prev").and_then(Value::as_str).map(str::to_owned);
    match (seq, prev, v.remove("mac"), v.remove("hash")) {
        (Some(seq), Some(prev), Some(Value::String(mac)), None) => Ok(Some(Tail {
            seq,
            mac_ok: key.verify(&prev, &canonical_body(&v), &mac),
            digest: mac,
            keyed: true,
        })),
        (Some(seq), Some(_), None, Some(Value::String(hash))) => Ok(Some(Tail {
            seq,
            digest: hash,
            keyed: false,
            mac_ok: false,
        })),
        _ => Err(damaged("the last record has no seq/prev and mac")),
    }
}

/// `seq` and `prev` of the first record of `path` (where the chain starts after pruning).
fn first_record(path: &Path) -> Option<(u64, String)> {
    let f = location::open_read(path).ok()??;
    let mut line = Vec::new();
    std::io::BufReader::new(f)
        .take(1024 * 1024)
        .read_until(b'\n', &mut line)
        .ok()?;
    let v: Map<String, Value> = serde_json::from_slice(&line).ok()?;
    Some((v.get("seq")?.as_u64()?, v.get("prev")?.as_str()?.to_owned()))
}

impl ChainSink {
    /// Opens `target` with the key of kz's user ([`super::default_key_path`]), creating the key
    /// on first use.
    pub fn open(target: SinkTarget) -> Result<Self, AuditError> {
        let key = AuditKey::load_or_create(&location::default_key_path())?;
        Self::open_with_key(target, Arc::new(key))
    }

    /// Opens `target`, chaining its records under `key`.
    pub fn open_with_key(target: SinkTarget, key: Arc<AuditKey>) -> Result<Self, AuditError> {
        let mut inner = match target {
            SinkTarget::Stdout => Inner {
                seq: 0,
                prev: GENESIS.to_owned(),
                key,
                file: None,
            },
            SinkTarget::File {
                path,
                fsync,
                rotation,
            } => {
                // Where the log is comes first: nothing is read from a place the agent's user
                // could have prepared.
                location::refuse_link(&path)?;
                location::check_dirs(&path)?;
                check_rotated(&path)?;
                let mut last = last_record(&path, &key)?;
                if last.is_none()
                    && let Some(newest) = rotated_files(&path).last()
                {
                    last = last_record(newest, &key)?;
                }
                if let Some(t) = &last
                    && t.keyed
                    && !t.mac_ok
                {
                    return Err(AuditError::ForeignTail {
                        path: path.display().to_string(),
                        key: key
                            .path()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| format!("id {}", key.id())),
                    });
                }
                let (file, size) = location::open_append(&path)?;
                let upgrade = last.as_ref().is_some_and(|t| !t.keyed);
                let (seq, prev) = match last {
                    Some(t) => (t.seq + 1, t.digest),
                    None => (0, GENESIS.to_owned()),
                };
                let mut inner = Inner {
                    seq,
                    prev,
                    key,
                    file: Some(FileState {
                        path,
                        file,
                        size,
                        fsync,
                        rotation,
                        last_sync: Instant::now(),
                    }),
                };
                if let Some(fs) = &inner.file {
                    // A new chain, or an upgrade: keyed from here on, as the ledger will say.
                    if seq == 0 || upgrade {
                        ledger::note(&inner.key, &fs.path, seq);
                    }
                }
                if upgrade {
                    // The documented upgrade point: the chain is keyed from this record on.
                    let id = inner.key.id();
                    inner.append(
                        AuditEvent::new(UPGRADE_KIND)
                            .with("previous_scheme", "sha256")
                            .with("key_id", id),
                    )?;
                }
                inner
            }
        };
        if let Some(fs) = inner.file.as_mut()
            && fs.fsync != Fsync::Never
        {
            let _ = fs.file.sync_data();
        }
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }
}

/// `event` as a record without its place in the chain: its fields, `kind` and `time`.
fn prepare(event: AuditEvent) -> Fields {
    let mut m = event.fields;
    m.remove("mac");
    m.remove("hash");
    m.insert("kind", Value::from(event.kind));
    m.insert("time", Value::from(rfc3339_now()));
    m
}

impl Inner {
    /// The line for `m` as the next record (`seq` and `prev` set, overriding earlier ones), and
    /// its MAC.
    fn seal(&self, m: &mut Fields) -> (Vec<u8>, String) {
        m.insert("seq", Value::from(self.seq));
        m.insert("prev", Value::from(self.prev.as_str()));
        let mut line = canonical_body(m);
        let mac = self.key.mac(&self.prev, &line);
        // Append `"mac":"…"` as the last key; sorted order is restored on parse by verify.
        line.pop();
        line.extend_from_slice(b",\"mac\":\"");
        line.extend_from_slice(mac.as_bytes());
        line.extend_from_slice(b"\"}\n");
        (line, mac)
    }

    /// Writes one sealed record (no rotation) and advances the chain.
    fn write(&mut self, line: &[u8], mac: String) -> Result<(), AuditError> {
        match self.file.as_mut() {
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(line)
                    .and_then(|()| out.flush())
                    .map_err(|e| io_err(Path::new("<stdout>"), e))?;
            }
            Some(fs) => {
                fs.file.write_all(line).map_err(|e| io_err(&fs.path, e))?;
                fs.size += line.len() as u64;
                let sync = match fs.fsync {
                    Fsync::Always => true,
                    Fsync::Interval => fs.last_sync.elapsed().as_secs() >= 1,
                    Fsync::Never => false,
                };
                if sync {
                    fs.file.sync_data().map_err(|e| io_err(&fs.path, e))?;
                    fs.last_sync = Instant::now();
                }
            }
        }
        self.seq += 1;
        self.prev = mac;
        Ok(())
    }

    fn append(&mut self, event: AuditEvent) -> Result<(), AuditError> {
        let mut m = prepare(event);
        let (line, mac) = self.seal(&mut m);
        self.write(&line, mac)
    }
}

impl Inner {
    /// Takes the log file's lock (other kz processes may append to the same log: two
    /// `sudo kz run --blind` share the default one) and continues the chain from what is on
    /// disk: a file another writer rotated away is reopened, records another writer appended
    /// are read back for their `seq` and `mac`. Unlock with [`Inner::unlock`].
    fn lock_and_resync(&mut self) -> Result<(), AuditError> {
        let Some(fs) = self.file.as_mut() else {
            return Ok(());
        };
        loop {
            fs.file.lock().map_err(|e| io_err(&fs.path, e))?;
            let held = fs.file.metadata().map_err(|e| io_err(&fs.path, e))?;
            let on_path = std::fs::symlink_metadata(&fs.path).ok();
            let same = on_path
                .as_ref()
                .is_some_and(|m| m.ino() == held.ino() && m.dev() == held.dev());
            if same {
                if held.len() != fs.size {
                    let mut tail = last_record(&fs.path, &self.key)?;
                    if tail.is_none()
                        && let Some(newest) = rotated_files(&fs.path).last()
                    {
                        tail = last_record(newest, &self.key)?;
                    }
                    match tail {
                        Some(t) if t.keyed && t.mac_ok => {
                            self.seq = t.seq + 1;
                            self.prev = t.digest;
                        }
                        Some(_) => {
                            let _ = fs.file.unlock();
                            return Err(AuditError::ForeignTail {
                                path: fs.path.display().to_string(),
                                key: self
                                    .key
                                    .path()
                                    .map(|p| p.display().to_string())
                                    .unwrap_or_else(|| format!("id {}", self.key.id())),
                            });
                        }
                        None => {}
                    }
                    fs.size = held.len();
                }
                return Ok(());
            }
            // Rotated (or removed) by another writer: continue in the file now at the path.
            let _ = fs.file.unlock();
            location::refuse_link(&fs.path)?;
            let (file, _) = location::open_append(&fs.path)?;
            fs.file = file;
            // Size unknown to this writer: the next pass reads the tail back.
            fs.size = u64::MAX;
        }
    }

    fn unlock(&mut self) {
        if let Some(fs) = self.file.as_mut() {
            let _ = fs.file.unlock();
        }
    }
}

impl AuditSink for ChainSink {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.lock_and_resync()?;
        let r = Self::record_locked(&mut inner, event);
        inner.unlock();
        r
    }
}

impl ChainSink {
    fn record_locked(inner: &mut Inner, event: AuditEvent) -> Result<(), AuditError> {
        let mut m = prepare(event);
        let (mut line, mut mac) = inner.seal(&mut m);
        let mut pruned = None;
        if let Some(fs) = inner.file.as_mut()
            && let Some(max) = fs.rotation.max_bytes
            && fs.size > 0
            && fs.size + line.len() as u64 > max
        {
            rotate(fs)?;
            // The new file is this writer's until the record is in it.
            fs.file.lock().map_err(|e| io_err(&fs.path, e))?;
            pruned = prune(&fs.path, &fs.rotation)?;
        }
        if let Some(p) = pruned {
            let (first_seq, first_prev) = p.first.unwrap_or((inner.seq, inner.prev.clone()));
            inner.append(
                AuditEvent::new(PRUNED_KIND)
                    .with("removed", p.removed)
                    .with("removed_by_count", p.by_count)
                    .with("removed_by_age", p.by_age)
                    .with("first_seq", first_seq)
                    .with("first_prev", first_prev),
            )?;
            // The event follows the pruning record: sealed again at its new place.
            (line, mac) = inner.seal(&mut m);
        }
        inner.write(&line, mac)
    }
}

fn rotate(fs: &mut FileState) -> Result<(), AuditError> {
    fs.file.sync_all().map_err(|e| io_err(&fs.path, e))?;
    check_rotated(&fs.path)?;
    let next = rotated_entries(&fs.path).last().map_or(0, |(n, _)| *n) + 1;
    let mut rotated = fs.path.clone().into_os_string();
    rotated.push(format!(".{next}"));
    std::fs::rename(&fs.path, &rotated).map_err(|e| io_err(&fs.path, e))?;
    let (file, size) = location::open_append(&fs.path)?;
    fs.file = file;
    fs.size = size;
    Ok(())
}

/// What one pruning removed, and where the kept chain starts (`None`: no rotated file is left,
/// the chain starts at the `audit_pruned` record itself).
struct Pruned {
    removed: u64,
    by_count: u64,
    by_age: u64,
    first: Option<(u64, String)>,
}

/// Removes the oldest rotated files of `path` while there are more than `max_files` of them or
/// the oldest was last written before `max_age` ago. Stops at the first file it keeps, so what
/// remains is one unbroken chain. `None` when nothing was removed.
fn prune(path: &Path, rotation: &Rotation) -> Result<Option<Pruned>, AuditError> {
    if rotation.max_files.is_none() && rotation.max_age.is_none() {
        return Ok(None);
    }
    let files = rotated_files(path);
    let over = rotation
        .max_files
        .map_or(0, |m| files.len().saturating_sub(m as usize));
    let now = SystemTime::now();
    let mut p = Pruned {
        removed: 0,
        by_count: 0,
        by_age: 0,
        first: None,
    };
    let mut kept = None;
    for (i, f) in files.iter().enumerate() {
        let too_many = i < over;
        let too_old = rotation.max_age.is_some_and(|age| {
            std::fs::symlink_metadata(f)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d > age))
        });
        if !too_many && !too_old {
            kept = Some(f);
            break;
        }
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(f, e)),
        }
        p.removed += 1;
        if too_many {
            p.by_count += 1;
        } else {
            p.by_age += 1;
        }
    }
    if p.removed == 0 {
        return Ok(None);
    }
    p.first = kept.and_then(|f| first_record(f));
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        let at = |secs: u64, ms: u64| rfc3339(std::time::Duration::from_millis(secs * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_825_599, 7), "2000-02-29T11:59:59.007Z");
        assert_eq!(at(1_798_761_599, 999), "2026-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400, 120), "2100-03-01T00:00:00.120Z");
    }

    fn temp_log() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        (dir, path)
    }

    fn key() -> Arc<AuditKey> {
        Arc::new(AuditKey::generate().unwrap())
    }

    fn open(path: &Path, key: &Arc<AuditKey>, rotation: Rotation) -> ChainSink {
        ChainSink::open_with_key(
            SinkTarget::File {
                path: path.to_owned(),
                fsync: Fsync::Never,
                rotation,
            },
            key.clone(),
        )
        .unwrap()
    }

    fn records(sink: &ChainSink, tag: &str, n: usize) {
        for i in 0..n {
            sink.record(AuditEvent::new("decision").with("ref", format!("{tag}/{i}")))
                .unwrap();
        }
    }

    fn verify(path: &Path, key: &AuditKey) -> Result<super::super::VerifyReport, VerifyError> {
        super::super::verify_path_with(path, Ok(key))
    }

    use super::super::VerifyError;

    #[test]
    fn two_writers_on_one_log_keep_one_chain() {
        // Two kz processes (`sudo kz run --blind` twice) share the default log: each record
        // must continue the chain as it is on disk, not as its writer last left it.
        let (_dir, path) = temp_log();
        let k = key();
        let a = open(&path, &k, Rotation::size(None));
        let b = open(&path, &k, Rotation::size(None));
        for i in 0..20 {
            records(if i % 3 == 0 { &a } else { &b }, &format!("w{i}"), 2);
        }
        let report = verify(&path, &k).unwrap();
        assert_eq!(report.records, 40);
    }

    #[test]
    fn two_writers_across_a_rotation_keep_one_chain() {
        let (_dir, path) = temp_log();
        let k = key();
        let no_caps = Rotation {
            max_bytes: Some(700),
            max_files: None,
            max_age: None,
        };
        let a = open(&path, &k, no_caps);
        let b = open(&path, &k, no_caps);
        for i in 0..30 {
            records(if i % 2 == 0 { &a } else { &b }, &format!("r{i}"), 1);
        }
        assert!(!rotated_files(&path).is_empty(), "rotation happened");
        let report = verify(&path, &k).unwrap();
        assert_eq!(report.records, 30);
    }

    #[test]
    fn chain_resumes_and_rotates() {
        let (_dir, path) = temp_log();
        let k = key();
        let no_caps = Rotation {
            max_bytes: Some(600),
            max_files: None,
            max_age: None,
        };
        records(&open(&path, &k, no_caps), "a", 5);
        records(&open(&path, &k, no_caps), "b", 5);
        assert!(!rotated_files(&path).is_empty(), "rotation happened");
        let report = verify(&path, &k).unwrap();
        assert_eq!(report.records, 10);
        assert_eq!((report.unkeyed, report.pruned_before), (0, None));
        assert_eq!(report.key_id, Some(k.id()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"mac\":") && !text.contains("\"hash\":"),
            "{text}"
        );
    }

    #[test]
    fn rotation_prunes_by_count_and_verify_accepts_the_pruned_start_only() {
        let (_dir, path) = temp_log();
        let k = key();
        // About one record per file.
        let sink = open(&path, &k, Rotation::size(Some(300)));
        records(&sink, "a", 40);
        let rotated = rotated_files(&path);
        assert_eq!(rotated.len(), DEFAULT_MAX_FILES as usize, "{rotated:?}");
        let report = verify(&path, &k).unwrap();
        let first = report
            .pruned_before
            .expect("the chain starts after pruned files");
        assert!(first > 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"kind\":\"audit_pruned\""), "{text}");
        // Removing one more old file is not pruning: verify names the chain's new start.
        std::fs::remove_file(&rotated[0]).unwrap();
        let e = verify(&path, &k).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("expected seq {first}")) && msg.contains("the last pruning"),
            "{msg}"
        );
    }

    #[test]
    fn rotation_prunes_by_age_from_the_oldest_end_only() {
        let (_dir, path) = temp_log();
        let k = key();
        let by_age = Rotation {
            max_bytes: Some(300),
            max_files: None,
            max_age: Some(Duration::from_secs(30 * 86_400)),
        };
        let sink = open(&path, &k, by_age);
        records(&sink, "a", 8);
        let rotated = rotated_files(&path);
        assert_eq!(rotated.len(), 7);
        let old = SystemTime::now() - Duration::from_secs(31 * 86_400);
        // The two oldest, and one in the middle: removing that one would leave a gap.
        for p in [&rotated[0], &rotated[1], &rotated[4]] {
            File::options()
                .append(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        records(&sink, "b", 1);
        let now = rotated_files(&path);
        assert!(
            !now.contains(&rotated[0]) && !now.contains(&rotated[1]),
            "{now:?}"
        );
        assert!(
            now.contains(&rotated[2]) && now.contains(&rotated[4]),
            "{now:?}"
        );
        let report = verify(&path, &k).unwrap();
        assert_eq!(report.pruned_before, Some(2));
    }

    #[test]
    fn no_caps_keep_every_rotated_file() {
        let (_dir, path) = temp_log();
        let k = key();
        let sink = open(
            &path,
            &k,
            Rotation {
                max_bytes: Some(300),
                max_files: None,
                max_age: None,
            },
        );
        records(&sink, "a", 15);
        assert_eq!(rotated_files(&path).len(), 14);
        assert_eq!(verify(&path, &k).unwrap().pruned_before, None);
    }

    #[test]
    fn a_link_at_a_rotated_name_is_refused() {
        let (dir, path) = temp_log();
        let k = key();
        records(&open(&path, &k, Rotation::default()), "a", 1);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep\n").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_file_name("audit.jsonl.3")).unwrap();
        let e = ChainSink::open_with_key(
            SinkTarget::File {
                path: path.clone(),
                fsync: Fsync::Never,
                rotation: Rotation::default(),
            },
            k.clone(),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("audit.jsonl.3 is a symbolic link"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep\n");
    }

    #[test]
    fn a_log_whose_last_mac_is_another_keys_is_not_continued() {
        let (_dir, path) = temp_log();
        records(&open(&path, &key(), Rotation::default()), "a", 2);
        let e = ChainSink::open_with_key(
            SinkTarget::File {
                path: path.clone(),
                fsync: Fsync::Never,
                rotation: Rotation::default(),
            },
            key(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, AuditError::ForeignTail { .. }), "{e}");
    }

    #[test]
    fn an_unkeyed_log_continues_after_one_upgrade_record() {
        let (_dir, path) = temp_log();
        // Three records as kz wrote them before the chain was keyed.
        let mut prev = GENESIS.to_owned();
        let mut text = String::new();
        for seq in 0..3u64 {
            let mut m = Map::new();
            m.insert("kind".into(), "decision".into());
            m.insert("seq".into(), seq.into());
            m.insert("prev".into(), prev.clone().into());
            let body = canonical_body(&m);
            let hash = record_hash(&prev, &body);
            m.insert("hash".into(), hash.clone().into());
            text.push_str(&serde_json::to_string(&m).unwrap());
            text.push('\n');
            prev = hash;
        }
        std::fs::write(&path, &text).unwrap();
        let k = key();
        let old = super::super::verify_path_with(&path, Err("none".into())).unwrap();
        assert_eq!((old.records, old.unkeyed, old.key_id), (3, 3, None));
        records(&open(&path, &k, Rotation::default()), "a", 2);
        let report = verify(&path, &k).unwrap();
        assert_eq!(report.records, 6);
        assert_eq!((report.unkeyed, report.upgraded_at), (3, Some(3)));
        let last: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(last[3]["kind"], UPGRADE_KIND);
        assert_eq!(last[3]["key_id"], k.id());
        assert_eq!(last[3]["prev"], last[2]["hash"]);
    }
}
