//! `kz audit verify FILE`: checks a hash-chained audit log and its rotated predecessors
//! ([`crate::audit::verify_path`]); exit 1 with the first break when the chain does not hold.

use crate::audit;
use crate::cli::AuditCommand;
use std::process::ExitCode;

pub(super) fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { file } => match audit::verify_path(&file) {
            Ok(report) => {
                println!(
                    "audit log OK: {} records in {} file(s), chain head {}",
                    report.records,
                    report.files.len(),
                    report.last_hash
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("kz: audit verify FAILED: {e}");
                Ok(ExitCode::from(1))
            }
        },
    }
}
