//! The JSONL sink: one JSON object per line, each carrying `seq`, the previous record's hash
//! (`prev`) and its own `hash` = SHA-256(prev ‖ "\n" ‖ the record without `hash`, keys sorted).
//! Editing, deleting or reordering any line breaks the chain at that line.
//!
//! Files rotate by size: `audit.jsonl` is renamed to `audit.jsonl.N` (N = 1, 2, … oldest first)
//! and the chain continues in the new file, so `kz audit verify audit.jsonl` checks all of them
//! as one chain. On start the sink resumes from the last record on disk.

use super::{AuditError, AuditEvent, AuditSink};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub use crate::bundle::Fsync;

pub enum SinkTarget {
    File {
        path: PathBuf,
        fsync: Fsync,
        max_bytes: Option<u64>,
    },
    Stdout,
}

struct FileState {
    path: PathBuf,
    file: File,
    size: u64,
    fsync: Fsync,
    max_bytes: Option<u64>,
    last_sync: Instant,
}

struct Inner {
    seq: u64,
    prev: String,
    file: Option<FileState>,
}

pub struct ChainSink {
    inner: Mutex<Inner>,
}

/// A record without its `hash` key as the chain hashes it: compact JSON, keys sorted (a
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

/// Hash of one record (without its `hash` key) chained to the previous hash.
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
    found.into_iter().map(|(_, p)| p).collect()
}

/// `seq` and `hash` of the last record of a file, or None for an empty file.
fn last_record(path: &Path) -> Result<Option<(u64, String)>, AuditError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
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
    let v: Map<String, Value> =
        serde_json::from_str(line).map_err(|_| damaged("the last line is not JSON"))?;
    match (
        v.get("seq").and_then(Value::as_u64),
        v.get("hash").and_then(Value::as_str),
    ) {
        (Some(seq), Some(hash)) => Ok(Some((seq, hash.to_owned()))),
        _ => Err(damaged("the last record has no seq/hash")),
    }
}

fn open_append(path: &Path) -> Result<(File, u64), AuditError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| io_err(path, e))?;
    }
    // Owner-only: the log says which agent used which secret where (no values, but nothing a
    // sandboxed agent running as another user should read).
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let size = file.metadata().map_err(|e| io_err(path, e))?.len();
    Ok((file, size))
}

impl ChainSink {
    pub fn open(target: SinkTarget) -> Result<Self, AuditError> {
        let inner = match target {
            SinkTarget::Stdout => Inner {
                seq: 0,
                prev: GENESIS.to_owned(),
                file: None,
            },
            SinkTarget::File {
                path,
                fsync,
                max_bytes,
            } => {
                let mut last = last_record(&path)?;
                if last.is_none()
                    && let Some(newest) = rotated_files(&path).last()
                {
                    last = last_record(newest)?;
                }
                let (seq, prev) = match last {
                    Some((seq, hash)) => (seq + 1, hash),
                    None => (0, GENESIS.to_owned()),
                };
                let (file, size) = open_append(&path)?;
                Inner {
                    seq,
                    prev,
                    file: Some(FileState {
                        path,
                        file,
                        size,
                        fsync,
                        max_bytes,
                        last_sync: Instant::now(),
                    }),
                }
            }
        };
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    /// Builds the chained line for `event` (exposed for tests and for `kz audit verify`'s docs).
    fn line(seq: u64, prev: &str, event: AuditEvent) -> (Vec<u8>, String) {
        let mut m = event.fields;
        m.remove("hash");
        m.insert("kind", Value::from(event.kind));
        m.insert("time", Value::from(rfc3339_now()));
        m.insert("seq", Value::from(seq));
        m.insert("prev", Value::from(prev));
        let mut line = canonical_body(&m);
        let hash = record_hash(prev, &line);
        // Append `"hash":"…"` as the last key; sorted order is restored on parse by verify.
        line.pop();
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
        (line, hash)
    }
}

impl AuditSink for ChainSink {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (line, hash) = Self::line(inner.seq, &inner.prev, event);
        match inner.file.as_mut() {
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line)
                    .and_then(|()| out.flush())
                    .map_err(|e| io_err(Path::new("<stdout>"), e))?;
            }
            Some(fs) => {
                if let Some(max) = fs.max_bytes
                    && fs.size > 0
                    && fs.size + line.len() as u64 > max
                {
                    rotate(fs)?;
                }
                fs.file.write_all(&line).map_err(|e| io_err(&fs.path, e))?;
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
        inner.seq += 1;
        inner.prev = hash;
        Ok(())
    }
}

fn rotate(fs: &mut FileState) -> Result<(), AuditError> {
    fs.file.sync_all().map_err(|e| io_err(&fs.path, e))?;
    let next = rotated_files(&fs.path)
        .last()
        .and_then(|p| p.extension().and_then(|e| e.to_str()?.parse::<u64>().ok()))
        .unwrap_or(0)
        + 1;
    let mut rotated = fs.path.clone().into_os_string();
    rotated.push(format!(".{next}"));
    std::fs::rename(&fs.path, &rotated).map_err(|e| io_err(&fs.path, e))?;
    let (file, size) = open_append(&fs.path)?;
    fs.file = file;
    fs.size = size;
    Ok(())
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

    #[test]
    fn chain_resumes_and_rotates() {
        let dir = std::env::temp_dir().join(format!("kz-audit-{}", rand::random::<u64>()));
        let path = dir.join("audit.jsonl");
        let open = || {
            ChainSink::open(SinkTarget::File {
                path: path.clone(),
                fsync: Fsync::Never,
                max_bytes: Some(600),
            })
            .unwrap()
        };
        let sink = open();
        for i in 0..5 {
            sink.record(AuditEvent::new("decision").with("ref", format!("a/{i}")))
                .unwrap();
        }
        drop(sink);
        let sink = open();
        for i in 5..10 {
            sink.record(AuditEvent::new("decision").with("ref", format!("a/{i}")))
                .unwrap();
        }
        assert!(!rotated_files(&path).is_empty(), "rotation happened");
        let report = super::super::verify_path(&path).unwrap();
        assert_eq!(report.records, 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_prunes_by_count_and_age() {
        let dir = std::env::temp_dir().join(format!("kz-audit-{}", rand::random::<u64>()));
        let path = dir.join("audit.jsonl");
        let sink = ChainSink::open(SinkTarget::File {
            path: path.clone(),
            fsync: Fsync::Never,
            max_bytes: Some(300),
        })
        .unwrap();
        for i in 0..40 {
            sink.record(AuditEvent::new("decision").with("ref", format!("a/{i}")))
                .unwrap();
        }
        let rotated = rotated_files(&path);
        assert!(rotated.len() <= 10, "kept {} rotated files", rotated.len());
        // Age: files last written 31 days ago go at the next rotation, wherever they are in
        // the order (the count cap alone would take the oldest, rotated[0]).
        let old = SystemTime::now() - std::time::Duration::from_secs(31 * 86_400);
        for p in &rotated[3..6] {
            File::options()
                .append(true)
                .open(p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        sink.record(AuditEvent::new("decision").with("ref", "b"))
            .unwrap();
        let now = rotated_files(&path);
        for p in &rotated[3..6] {
            assert!(!now.contains(p), "{} is older than 30 days", p.display());
        }
        assert!(now.contains(&rotated[1]) && now.contains(&rotated[6]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
