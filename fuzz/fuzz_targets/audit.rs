//! Audit log verification (`audit::verify_files`) of a chain kz wrote, then damaged.
//!
//! Each run writes a real chain with `ChainSink` (one record per input line, the line as a
//! field value: arbitrary text, escapes, Unicode), checks that it verifies with exactly that
//! many records, then applies the input's edits (overwrite a byte, or cut the file) and
//! verifies again. Properties: the undamaged chain verifies; no damage panics the verifier;
//! damage never makes a chain verify with more records than were written (records cannot be
//! forged without the key). (A cut at a record boundary drops the tail unnoticed here: that is
//! what the ledger of `verify_path` is for.)
//!
//! Input: byte 0 the number of records (1..=8); the record values, one per line; after an empty
//! line, edits of 3 bytes each: offset (u16, big-endian) and a byte (0 cuts the file there).

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kz_agent::audit::{
    AuditEvent, AuditKey, AuditSink, ChainSink, Fsync, Rotation, SinkTarget, verify_files,
};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static Arc<AuditKey> {
    static KEY: OnceLock<Arc<AuditKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(AuditKey::from_bytes([7; 32])))
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kz-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a temp dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    let (values, edits) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest, &[][..]),
    };
    let values: Vec<String> = String::from_utf8_lossy(values)
        .split('\n')
        .cycle()
        .take(n)
        .map(str::to_owned)
        .collect();
    let path = dir().join("audit.log");
    let _ = std::fs::remove_file(&path);
    {
        let sink = ChainSink::open_with_key(
            SinkTarget::File {
                path: path.clone(),
                fsync: Fsync::Never,
                rotation: Rotation::size(None),
            },
            key().clone(),
        )
        .expect("open the audit log");
        for v in &values {
            sink.record(AuditEvent::new("decision").with("ref", v.clone()))
                .expect("record");
        }
    }
    let files = [path.clone()];
    let report = verify_files(&files, Ok(key().as_ref())).expect("the chain kz wrote verifies");
    assert_eq!(report.records, n as u64);

    let mut bytes = std::fs::read(&path).expect("read the log back");
    let original = bytes.clone();
    for e in edits.chunks_exact(3).take(8) {
        let at = usize::from(u16::from_be_bytes([e[0], e[1]]));
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        if e[2] == 0 {
            bytes.truncate(at);
        } else {
            bytes[at] = e[2];
        }
    }
    if bytes == original {
        return;
    }
    std::fs::write(&path, &bytes).expect("write the damaged log");
    if let Ok(r) = verify_files(&files, Ok(key().as_ref())) {
        assert!(
            r.records <= n as u64,
            "{} records verified of {n} written",
            r.records
        );
    }
});
