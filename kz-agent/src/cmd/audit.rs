//! `kz audit verify FILE`: checks an audit log's keyed chain and its rotated predecessors
//! ([`crate::audit::verify_path_with`]); exit 1 with the first record that fails (file, line,
//! record index, why), and a warning when the log, or its start, is unkeyed.

use crate::audit::{self, AuditKey};
use crate::cli::AuditCommand;
use std::process::ExitCode;

pub(super) fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { file, key } => {
            let result = match key {
                // A key named on the command line must be there.
                Some(path) => match AuditKey::load(&path) {
                    Ok(Some(k)) => audit::verify_path_with(&file, Ok(&k)),
                    Ok(None) => {
                        eprintln!(
                            "kz: audit verify FAILED: no audit key at {}",
                            path.display()
                        );
                        return Ok(ExitCode::from(1));
                    }
                    Err(e) => {
                        eprintln!("kz: audit verify FAILED: {e}");
                        return Ok(ExitCode::from(1));
                    }
                },
                None => audit::verify_path(&file),
            };
            match result {
                Ok(report) => {
                    if report.unkeyed == report.records {
                        eprintln!(
                            "kz: WARNING: {} is unkeyed (a plain SHA-256 chain, written before kz keyed its audit logs): it shows order and completeness, but anyone who could write the file could have rewritten it",
                            file.display()
                        );
                    } else if report.unkeyed > 0 {
                        eprintln!(
                            "kz: WARNING: the first {} records of {} are unkeyed (plain SHA-256, before the upgrade at record {}): anyone who could write the file could have rewritten those",
                            report.unkeyed,
                            file.display(),
                            report.upgraded_at.unwrap_or(report.unkeyed)
                        );
                    }
                    if let Some(seq) = report.pruned_before {
                        println!(
                            "audit log: rotation removed the files before seq {seq} (as its audit_pruned record says)"
                        );
                    }
                    println!(
                        "audit log OK: {} records in {} file(s), {}, chain head {}",
                        report.records,
                        report.files.len(),
                        match (&report.key_id, report.unkeyed) {
                            (Some(id), 0) => format!("keyed (HMAC-SHA-256, key id {id})"),
                            (Some(id), _) => format!("keyed from the upgrade on (key id {id})"),
                            (None, _) => "UNKEYED".to_owned(),
                        },
                        report.last_hash
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("kz: audit verify FAILED: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
