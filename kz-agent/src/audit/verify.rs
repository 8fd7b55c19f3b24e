//! `kz audit verify FILE`: walks the chain (rotated files first) and reports the first record
//! that fails, with its file, line and record index, and why: bad JSON, a torn last line, a
//! MAC (or, in an unkeyed log, hash) that does not match, a broken `prev` link, records
//! missing or moved, or a change of scheme anywhere but the `audit_keyed` upgrade point.
//!
//! A log written before the chain was keyed verifies as unkeyed (the report counts those
//! records, and the command prints a warning): its chain shows order and completeness, but
//! anyone who could write the file could have rewritten it.

use super::chain::{
    GENESIS, PRUNED_KIND, UPGRADE_KIND, canonical_body, record_hash, rotated_files,
};
use super::key::AuditKey;
use super::{ledger, location};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: Vec<PathBuf>,
    pub records: u64,
    /// The last record's digest (its `mac`, or `hash` in an unkeyed log).
    pub last_hash: String,
    /// Records chained with the unkeyed SHA-256 scheme (written before kz keyed the chain).
    pub unkeyed: u64,
    /// The record index of the `audit_keyed` record where an unkeyed log became keyed.
    pub upgraded_at: Option<u64>,
    /// The chain starts at this `seq`: rotation removed the files before it, as the last
    /// `audit_pruned` record says.
    pub pruned_before: Option<u64>,
    /// The id of the key the MACs were checked with (none for a wholly unkeyed log).
    pub key_id: Option<String>,
}

/// Why a record fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    BadJson,
    Torn,
    MissingField(&'static str),
    TwoDigests,
    HashMismatch,
    MacMismatch {
        key: String,
        /// No record before it was checked under this key: a different key is as likely.
        first: bool,
        /// The `key_id` an upgrade record names, when it is not this key's.
        other_key: Option<String>,
    },
    Downgrade,
    UnmarkedUpgrade,
    /// Unkeyed, though the ledger says kz keyed this log from `from_seq` on.
    KeyedByLedger {
        from_seq: u64,
    },
    /// The log ends before `from_seq`, where the ledger says kz began keying it.
    EndsBeforeKeyed {
        from_seq: u64,
    },
    Missing {
        expected: u64,
        found: u64,
        /// The record index of the last `audit_pruned` record, if any.
        pruned_at: Option<u64>,
    },
    Reordered {
        expected: u64,
        found: u64,
    },
    BrokenLink,
}

impl Problem {
    /// Why the record fails, as one sentence; `seq` names the record where it is known. Content
    /// problems begin `record seq N was edited` (the wording scripts have matched since the
    /// unkeyed chain).
    pub fn describe(&self, seq: Option<u64>) -> String {
        let rec = seq.map_or_else(|| "record".to_owned(), |s| format!("record seq {s}"));
        match self {
            Problem::BadJson => {
                "bad JSON: the line is not a JSON record; it was damaged or edited".to_owned()
            }
            Problem::Torn => "torn last line: the file ends inside a record (a write cut short by a crash or a full disk, or the file was truncated)".to_owned(),
            Problem::MissingField(field) => format!("{rec} has no `{field}`; it was edited"),
            Problem::TwoDigests => format!(
                "{rec} was edited: it carries both `mac` and `hash`, and kz writes one"
            ),
            Problem::HashMismatch => format!(
                "{rec} was edited (hash mismatch: its SHA-256 does not match its content)"
            ),
            Problem::MacMismatch {
                key,
                first,
                other_key,
            } => {
                let mut s = format!(
                    "{rec} was edited, or rewritten by someone without the audit key (mac mismatch under {key})"
                );
                if let Some(other) = other_key {
                    s.push_str(&format!(
                        "; it names key id {other}: pass that key with --key"
                    ));
                } else if *first {
                    s.push_str("; no record before it checked out either, so the log may have been written with another key (pass it with --key)");
                }
                s
            }
            Problem::Downgrade => format!(
                "{rec}: the chain goes from keyed (HMAC-SHA-256) back to unkeyed SHA-256 here, which kz never does: this record and the ones after it were rewritten by someone without the key"
            ),
            Problem::UnmarkedUpgrade => format!(
                "{rec}: the chain changes from unkeyed SHA-256 to keyed here, but this is not the `{UPGRADE_KIND}` record kz writes at an upgrade: records were spliced"
            ),
            Problem::KeyedByLedger { from_seq } => format!(
                "{rec} is unkeyed, but kz has keyed this log from seq {from_seq} on (its ledger, `audit.keyed` beside the key, says so): the log was rewritten by someone without the key"
            ),
            Problem::EndsBeforeKeyed { from_seq } => format!(
                "the log ends at {rec}, but kz keyed it from seq {from_seq} on (its ledger says so): records were removed or the log was replaced"
            ),
            Problem::Missing {
                expected,
                found,
                pruned_at,
            } => {
                let mut s = format!(
                    "records are missing before this one (expected seq {expected}, found {found})"
                );
                if let Some(at) = pruned_at {
                    s.push_str(&format!(
                        "; the last pruning (record {at}) kept the chain from seq {expected}, so files were removed after it"
                    ));
                }
                s
            }
            Problem::Reordered { expected, found } => format!(
                "records are out of order (expected seq {expected}, found {found}): a record was moved"
            ),
            Problem::BrokenLink => format!(
                "{rec} does not chain to the record before it (broken prev link: its `prev` is not that record's digest): the log was spliced"
            ),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(None))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}:{line}: {} (record {index})", problem.describe(*.seq))]
    Record {
        path: String,
        line: usize,
        index: u64,
        seq: Option<u64>,
        problem: Problem,
    },
    #[error(
        "{path}:{line}: record {index} is keyed (HMAC-SHA-256) and there is no key to check it: {why}. Run as the user that wrote the log (for root's log: `sudo kz audit verify`), or pass the key with --key FILE"
    )]
    NoKey {
        path: String,
        line: usize,
        index: u64,
        why: String,
    },
    #[error("{path}: the log is empty")]
    Empty { path: String },
}

/// Verifies `path` together with its rotated predecessors (`path.1`, `path.2`, …), checking
/// MACs with the key of kz's user ([`super::default_key_path`]).
pub fn verify_path(path: &Path) -> Result<VerifyReport, VerifyError> {
    let key_path = location::default_key_path();
    match AuditKey::load(&key_path) {
        Ok(Some(key)) => verify_path_with(path, Ok(&key)),
        Ok(None) => verify_path_with(path, Err(format!("no key at {}", key_path.display()))),
        Err(e) => verify_path_with(path, Err(e.to_string())),
    }
}

/// [`verify_path`] with `key`, or the reason there is none (reported if a keyed record comes).
pub fn verify_path_with(
    path: &Path,
    key: Result<&AuditKey, String>,
) -> Result<VerifyReport, VerifyError> {
    let mut files = rotated_files(path);
    if path.exists() || files.is_empty() {
        files.push(path.to_path_buf());
    }
    let keyed_from = key.as_ref().ok().and_then(|k| ledger::keyed_from(k, path));
    verify_chain(&files, key, keyed_from)
}

fn read(path: &Path) -> Result<Vec<u8>, VerifyError> {
    let err = |message: String| VerifyError::Read {
        path: path.display().to_string(),
        message,
    };
    // No link followed: a link planted at a rotated name would splice any file into the chain.
    let mut f = location::open_read(path)
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no such file".into()))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    Ok(bytes)
}

/// Where the chain starts when its first record is not seq 0.
struct Start {
    path: String,
    line: usize,
    index: u64,
    seq: u64,
    prev: String,
}

/// Verifies the given files as one chain, in order (no ledger: copies of a log, say).
pub fn verify_files(
    files: &[PathBuf],
    key: Result<&AuditKey, String>,
) -> Result<VerifyReport, VerifyError> {
    verify_chain(files, key, None)
}

/// The chain of `files`; with `keyed_from`, every record from that `seq` on must be keyed.
fn verify_chain(
    files: &[PathBuf],
    key: Result<&AuditKey, String>,
    keyed_from: Option<u64>,
) -> Result<VerifyReport, VerifyError> {
    let mut expected_seq = 0u64;
    let mut prev = GENESIS.to_owned();
    let mut records = 0u64;
    let mut unkeyed = 0u64;
    // The scheme of the record before (None before the first).
    let mut last_keyed: Option<bool> = None;
    let mut keyed_ok = false;
    let mut upgraded_at = None;
    let mut start: Option<Start> = None;
    let mut last_prune: Option<(u64, u64, String)> = None;
    // Where the last record was (file, line).
    let mut last_at: Option<(String, usize)> = None;
    for file in files {
        let shown = file.display().to_string();
        let bytes = read(file)?;
        let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
        let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // split() leaves one empty piece after a final newline.
        let n = lines.len() - usize::from(!torn);
        for (i, raw) in lines.iter().take(n).enumerate() {
            let line_no = i + 1;
            let index = records;
            let fail = |seq: Option<u64>, problem| VerifyError::Record {
                path: shown.clone(),
                line: line_no,
                index,
                seq,
                problem,
            };
            if torn && i + 1 == n {
                return Err(fail(None, Problem::Torn));
            }
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut rec: Map<String, Value> =
                serde_json::from_slice(raw).map_err(|_| fail(None, Problem::BadJson))?;
            let seq = rec.get("seq").and_then(Value::as_u64);
            let Some(seq) = seq else {
                return Err(fail(None, Problem::MissingField("seq")));
            };
            let Some(rec_prev) = rec.get("prev").and_then(Value::as_str).map(str::to_owned) else {
                return Err(fail(Some(seq), Problem::MissingField("prev")));
            };
            let kind = rec
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let (keyed, digest) = match (rec.remove("mac"), rec.remove("hash")) {
                (Some(Value::String(m)), None) => (true, m),
                (None, Some(Value::String(h))) => (false, h),
                (Some(_), Some(_)) => return Err(fail(Some(seq), Problem::TwoDigests)),
                _ => return Err(fail(Some(seq), Problem::MissingField("mac"))),
            };
            let body = canonical_body(&rec);
            if keyed {
                let k = key.as_ref().map_err(|why| VerifyError::NoKey {
                    path: shown.clone(),
                    line: line_no,
                    index,
                    why: why.clone(),
                })?;
                if !k.verify(&rec_prev, &body, &digest) {
                    let other_key = rec
                        .get("key_id")
                        .and_then(Value::as_str)
                        .filter(|id| *id != k.id())
                        .map(str::to_owned);
                    return Err(fail(
                        Some(seq),
                        Problem::MacMismatch {
                            key: k
                                .path()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| format!("id {}", k.id())),
                            first: !keyed_ok,
                            other_key,
                        },
                    ));
                }
                keyed_ok = true;
            } else if record_hash(&rec_prev, &body) != digest {
                return Err(fail(Some(seq), Problem::HashMismatch));
            } else if let Some(from_seq) = keyed_from.filter(|s| seq >= *s) {
                return Err(fail(Some(seq), Problem::KeyedByLedger { from_seq }));
            }
            match (last_keyed, keyed) {
                (Some(true), false) => return Err(fail(Some(seq), Problem::Downgrade)),
                (Some(false), true) if kind != UPGRADE_KIND => {
                    return Err(fail(Some(seq), Problem::UnmarkedUpgrade));
                }
                (Some(false), true) => upgraded_at = Some(index),
                _ => {}
            }
            if last_keyed.is_none() {
                // The first record: seq 0 from genesis, or where pruning left the chain
                // (checked against the last `audit_pruned` record at the end).
                expected_seq = seq;
                if seq == 0 {
                    if rec_prev != GENESIS {
                        return Err(fail(Some(seq), Problem::BrokenLink));
                    }
                } else {
                    prev = rec_prev.clone();
                    start = Some(Start {
                        path: shown.clone(),
                        line: line_no,
                        index,
                        seq,
                        prev: rec_prev.clone(),
                    });
                }
            }
            if seq > expected_seq {
                // A jump forward is a move if the expected record turns up later in the file.
                let moved = lines.iter().skip(i + 1).any(|l| {
                    serde_json::from_slice::<Map<String, Value>>(l)
                        .ok()
                        .and_then(|m| m.get("seq").and_then(Value::as_u64))
                        == Some(expected_seq)
                });
                let (expected, found) = (expected_seq, seq);
                return Err(fail(
                    Some(seq),
                    if moved {
                        Problem::Reordered { expected, found }
                    } else {
                        Problem::Missing {
                            expected,
                            found,
                            pruned_at: None,
                        }
                    },
                ));
            }
            if seq < expected_seq {
                return Err(fail(
                    Some(seq),
                    Problem::Reordered {
                        expected: expected_seq,
                        found: seq,
                    },
                ));
            }
            if rec_prev != prev {
                return Err(fail(Some(seq), Problem::BrokenLink));
            }
            if keyed && kind == PRUNED_KIND {
                let first_seq = rec.get("first_seq").and_then(Value::as_u64);
                let first_prev = rec.get("first_prev").and_then(Value::as_str);
                if let (Some(s), Some(p)) = (first_seq, first_prev) {
                    last_prune = Some((index, s, p.to_owned()));
                }
            }
            last_keyed = Some(keyed);
            last_at = Some((shown.clone(), line_no));
            unkeyed += u64::from(!keyed);
            prev = digest;
            expected_seq += 1;
            records += 1;
        }
    }
    if records == 0 {
        return Err(VerifyError::Empty {
            path: files
                .last()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        });
    }
    if let (Some(from_seq), Some((path, line))) = (keyed_from, &last_at)
        && expected_seq <= from_seq
    {
        return Err(VerifyError::Record {
            path: path.clone(),
            line: *line,
            index: records - 1,
            seq: Some(expected_seq - 1),
            problem: Problem::EndsBeforeKeyed { from_seq },
        });
    }
    let mut pruned_before = None;
    if let Some(s) = start {
        match &last_prune {
            Some((_, first_seq, first_prev)) if *first_seq == s.seq && *first_prev == s.prev => {
                pruned_before = Some(s.seq);
            }
            _ => {
                return Err(VerifyError::Record {
                    path: s.path,
                    line: s.line,
                    index: s.index,
                    seq: Some(s.seq),
                    problem: Problem::Missing {
                        expected: last_prune.as_ref().map_or(0, |p| p.1),
                        found: s.seq,
                        pruned_at: last_prune.as_ref().map(|p| p.0),
                    },
                });
            }
        }
    }
    Ok(VerifyReport {
        files: files.to_vec(),
        records,
        last_hash: prev,
        unkeyed,
        upgraded_at,
        pruned_before,
        key_id: (unkeyed < records)
            .then(|| key.ok().map(AuditKey::id))
            .flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, AuditSink, ChainSink, Fsync, Rotation, SinkTarget};
    use sha2::{Digest, Sha256};
    use std::sync::Arc;

    /// A keyed log of `n` records; returns its lines.
    fn log(path: &Path, key: &Arc<AuditKey>, n: usize) -> Vec<String> {
        let sink = ChainSink::open_with_key(
            SinkTarget::File {
                path: path.to_owned(),
                fsync: Fsync::Never,
                rotation: Rotation::default(),
            },
            key.clone(),
        )
        .unwrap();
        for i in 0..n {
            sink.record(
                AuditEvent::new("proxy_request")
                    .with("swapped", serde_json::json!(["API_KEY"]))
                    .with("n", i),
            )
            .unwrap();
        }
        lines(path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    /// The body of a line as kz's sink writes it: the line without its last key (`mac` or
    /// `hash`), which the sink appends.
    fn body(line: &str) -> String {
        let cut = line
            .rfind(",\"mac\":")
            .or_else(|| line.rfind(",\"hash\":"))
            .unwrap();
        format!("{}}}", &line[..cut])
    }

    fn set_prev(body: &str, prev: &str) -> String {
        let at = body.find("\"prev\":\"").unwrap() + 8;
        format!("{}{prev}{}", &body[..at], &body[at + 64..])
    }

    /// The attacker of issue 14: edits record `k` and re-hashes from there on with plain
    /// SHA-256 (the unkeyed scheme), writing the digest as `field`.
    fn rehash_from(lines: &mut [String], k: usize, field: &str) {
        let mut prev: Option<String> = None;
        for (i, line) in lines.iter_mut().enumerate().skip(k) {
            let mut b = body(line);
            if i == k {
                b = b.replace("\"swapped\":[\"API_KEY\"]", "\"swapped\":[]");
            }
            if let Some(p) = &prev {
                b = set_prev(&b, p);
            }
            let m: Map<String, Value> = serde_json::from_str(&b).unwrap();
            let p = m["prev"].as_str().unwrap().to_owned();
            let mut h = Sha256::new();
            h.update(format!("{p}\n{b}").as_bytes());
            let digest = hex::encode(h.finalize());
            *line = format!("{},\"{field}\":\"{digest}\"}}", &b[..b.len() - 1]);
            prev = Some(digest);
        }
    }

    fn problem(r: Result<VerifyReport, VerifyError>) -> (usize, u64, Problem) {
        match r {
            Err(VerifyError::Record {
                line,
                index,
                problem,
                ..
            }) => (line, index, problem),
            other => panic!("expected a failing record, got {other:?}"),
        }
    }

    fn setup(n: usize) -> (tempfile::TempDir, PathBuf, Arc<AuditKey>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key = Arc::new(AuditKey::generate().unwrap());
        let lines = log(&path, &key, n);
        (dir, path, key, lines)
    }

    #[test]
    fn a_record_rewritten_and_rehashed_with_sha256_fails_where_it_was_edited() {
        let (_d, path, key, mut lines) = setup(6);
        assert!(verify_path_with(&path, Ok(&key)).is_ok());
        rehash_from(&mut lines, 3, "hash");
        write(&path, &lines);
        let (line, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!((line, index, p), (4, 3, Problem::Downgrade));
        let msg = verify_path_with(&path, Ok(&key)).unwrap_err().to_string();
        assert!(
            msg.contains(":4: record seq 3: the chain goes from keyed")
                && msg.ends_with("(record 3)"),
            "{msg}"
        );
        // The same with the digest written as `mac`: a MAC mismatch at the same record.
        let (_d, path, key, mut lines) = setup(6);
        rehash_from(&mut lines, 3, "mac");
        write(&path, &lines);
        let (line, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!((line, index), (4, 3));
        assert!(
            matches!(p, Problem::MacMismatch { first: false, .. }),
            "{p:?}"
        );
    }

    #[test]
    fn a_wholly_rehashed_log_verifies_only_as_unkeyed() {
        // The documented limit: with every record rewritten from genesis, the log looks like
        // one written before kz keyed its chain; verify says so and the command warns.
        let (_d, path, key, mut lines) = setup(4);
        rehash_from(&mut lines, 0, "hash");
        write(&path, &lines);
        let r = verify_path_with(&path, Ok(&key)).unwrap();
        assert_eq!((r.records, r.unkeyed, r.key_id), (4, 4, None));
    }

    #[test]
    fn another_key_fails_at_the_first_record_and_says_so() {
        let (_d, path, _key, _) = setup(3);
        let other = AuditKey::generate().unwrap();
        let (line, index, p) = problem(verify_path_with(&path, Ok(&other)));
        assert_eq!((line, index), (1, 0));
        assert!(
            matches!(p, Problem::MacMismatch { first: true, .. }),
            "{p:?}"
        );
        assert!(p.to_string().contains("another key"), "{p}");
        let e = verify_path_with(&path, Err("no key at /x".into())).unwrap_err();
        assert!(matches!(e, VerifyError::NoKey { index: 0, .. }), "{e}");
        assert!(e.to_string().contains("--key"), "{e}");
    }

    #[test]
    fn torn_last_line_bad_json_and_broken_link_are_named() {
        let (_d, path, key, lines) = setup(4);
        let torn = lines.join("\n");
        std::fs::write(&path, &torn[..torn.len() - 10]).unwrap();
        let (line, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!((line, index, p), (4, 3, Problem::Torn));
        assert!(Problem::Torn.to_string().starts_with("torn last line"));
        let e = verify_path_with(&path, Ok(&key)).unwrap_err().to_string();
        assert!(
            e.contains(":4: torn last line") && e.ends_with("(record 3)"),
            "{e}"
        );

        let mut bad = lines.clone();
        bad[1] = bad[1].replacen('{', "{{", 1);
        write(&path, &bad);
        assert_eq!(
            problem(verify_path_with(&path, Ok(&key))),
            (2, 1, Problem::BadJson)
        );

        // A record re-MACed with the key but pointing at the wrong predecessor.
        let mut spliced = lines.clone();
        let b = set_prev(&body(&spliced[2]), GENESIS);
        let mac = key.mac(GENESIS, b.as_bytes());
        spliced[2] = format!("{},\"mac\":\"{mac}\"}}", &b[..b.len() - 1]);
        write(&path, &spliced);
        let (line, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!((line, index, p.clone()), (3, 2, Problem::BrokenLink));
        assert!(p.to_string().contains("broken prev link"), "{p}");

        let mut dropped = lines.clone();
        dropped.remove(1);
        write(&path, &dropped);
        let (line, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!((line, index), (2, 1));
        assert!(
            p.to_string()
                .contains("records are missing before this one (expected seq 1"),
            "{p}"
        );
    }

    #[test]
    fn a_change_to_keyed_is_accepted_only_at_the_upgrade_record() {
        // An unkeyed start followed by a keyed record that is not `audit_keyed`.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key = AuditKey::generate().unwrap();
        let mut m = Map::new();
        m.insert("kind".into(), "decision".into());
        m.insert("seq".into(), 0.into());
        m.insert("prev".into(), GENESIS.into());
        let b0 = canonical_body(&m);
        let h0 = record_hash(GENESIS, &b0);
        let l0 = format!(
            "{},\"hash\":\"{h0}\"}}",
            std::str::from_utf8(&b0[..b0.len() - 1]).unwrap()
        );
        let mut m1 = Map::new();
        m1.insert("kind".into(), "decision".into());
        m1.insert("seq".into(), 1.into());
        m1.insert("prev".into(), h0.clone().into());
        let b1 = canonical_body(&m1);
        let mac = key.mac(&h0, &b1);
        let l1 = format!(
            "{},\"mac\":\"{mac}\"}}",
            std::str::from_utf8(&b1[..b1.len() - 1]).unwrap()
        );
        write(&path, &[l0, l1]);
        assert_eq!(
            problem(verify_path_with(&path, Ok(&key))),
            (2, 1, Problem::UnmarkedUpgrade)
        );
    }

    #[test]
    fn the_ledger_catches_a_log_rewritten_wholly_as_unkeyed() {
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(AuditKey::load_or_create(&dir.path().join("state/audit.key")).unwrap());
        let path = dir.path().join("audit.jsonl");
        let mut lines = log(&path, &key, 4);
        assert!(verify_path_with(&path, Ok(&key)).is_ok());
        rehash_from(&mut lines, 0, "hash");
        write(&path, &lines);
        let (line, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!(
            (line, index, p),
            (1, 0, Problem::KeyedByLedger { from_seq: 0 })
        );
        // The same bytes elsewhere (a copy, no ledger entry): only unkeyed.
        let copy = dir.path().join("copy.jsonl");
        std::fs::copy(&path, &copy).unwrap();
        let r = verify_path_with(&copy, Ok(&key)).unwrap();
        assert_eq!(r.unkeyed, 4);
        // A log replaced by a shorter one than the ledger knows was keyed.
        std::fs::remove_file(&path).unwrap();
        log(&path, &key, 2);
        ledger::note(&key, &path, 7);
        let (_, index, p) = problem(verify_path_with(&path, Ok(&key)));
        assert_eq!((index, p), (1, Problem::EndsBeforeKeyed { from_seq: 7 }));
    }
}
