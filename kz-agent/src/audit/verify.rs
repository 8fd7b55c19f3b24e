//! `kz audit verify FILE`: walks the chain (rotated files first) and reports the first record
//! that was edited, deleted, inserted or reordered.

use super::chain::{GENESIS, canonical_body, record_hash, rotated_files};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: Vec<PathBuf>,
    pub records: u64,
    pub last_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}:{line}: not a JSON record; the line was damaged or edited")]
    NotJson { path: String, line: usize },
    #[error("{path}:{line}: record has no `{field}`; it was edited")]
    MissingField {
        path: String,
        line: usize,
        field: &'static str,
    },
    #[error("{path}:{line}: record seq {seq} was edited (its hash does not match its content)")]
    Tampered { path: String, line: usize, seq: u64 },
    #[error(
        "{path}:{line}: records are missing before this one (expected seq {expected}, found {found})"
    )]
    Missing {
        path: String,
        line: usize,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path}:{line}: records are out of order (expected seq {expected}, found {found}): a record was moved"
    )]
    Reordered {
        path: String,
        line: usize,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path}:{line}: record seq {seq} does not chain to the record before it (its `prev` differs): the log was spliced"
    )]
    BrokenLink { path: String, line: usize, seq: u64 },
    #[error("{path}: the log is empty")]
    Empty { path: String },
}

/// Verifies `path` together with its rotated predecessors (`path.1`, `path.2`, …).
pub fn verify_path(path: &Path) -> Result<VerifyReport, VerifyError> {
    let mut files = rotated_files(path);
    if path.exists() || files.is_empty() {
        files.push(path.to_path_buf());
    }
    verify_files(&files)
}

/// Verifies the given files as one chain, in order.
pub fn verify_files(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    let mut expected_seq = 0u64;
    let mut prev = GENESIS.to_owned();
    let mut records = 0u64;
    for file in files {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|e| VerifyError::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let mut rec: Map<String, Value> =
                serde_json::from_str(line).map_err(|_| VerifyError::NotJson {
                    path: shown.clone(),
                    line: line_no,
                })?;
            let missing = |field| VerifyError::MissingField {
                path: shown.clone(),
                line: line_no,
                field,
            };
            let hash = match rec.remove("hash") {
                Some(Value::String(h)) => h,
                _ => return Err(missing("hash")),
            };
            let seq = rec
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| missing("seq"))?;
            let rec_prev = rec
                .get("prev")
                .and_then(Value::as_str)
                .ok_or_else(|| missing("prev"))?;
            if record_hash(rec_prev, &canonical_body(&rec)) != hash {
                return Err(VerifyError::Tampered {
                    path: shown,
                    line: line_no,
                    seq,
                });
            }
            if seq > expected_seq {
                // A jump forward is a move if the expected record turns up later in the file.
                let moved = text.lines().skip(i + 1).any(|l| {
                    serde_json::from_str::<Map<String, Value>>(l)
                        .ok()
                        .and_then(|m| m.get("seq").and_then(Value::as_u64))
                        == Some(expected_seq)
                });
                if moved {
                    return Err(VerifyError::Reordered {
                        path: shown,
                        line: line_no,
                        expected: expected_seq,
                        found: seq,
                    });
                }
                return Err(VerifyError::Missing {
                    path: shown,
                    line: line_no,
                    expected: expected_seq,
                    found: seq,
                });
            }
            if seq < expected_seq {
                return Err(VerifyError::Reordered {
                    path: shown,
                    line: line_no,
                    expected: expected_seq,
                    found: seq,
                });
            }
            if rec_prev != prev {
                return Err(VerifyError::BrokenLink {
                    path: shown,
                    line: line_no,
                    seq,
                });
            }
            prev = hash;
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
    Ok(VerifyReport {
        files: files.to_vec(),
        records,
        last_hash: prev,
    })
}
