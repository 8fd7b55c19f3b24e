//! `kz doctor`: prints [`crate::intercept::doctor::checks`] as a table; exit code 0 only when
//! every required check passes.

use crate::intercept::doctor::checks;
use std::process::ExitCode;

pub(super) fn run() -> ExitCode {
    let checks = checks();
    println!("{:<16} {:<6} DETAIL / WHAT TO DO", "CHECK", "STATUS");
    for c in &checks {
        let status = match (c.ok, c.required) {
            (true, _) => "ok",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        println!("{:<16} {:<6} {}", c.name, status, c.detail);
    }
    if checks.iter().all(|c| c.ok || !c.required) {
        println!("interception can work here");
        ExitCode::SUCCESS
    } else {
        println!("interception cannot work here: fix the FAIL rows");
        ExitCode::FAILURE
    }
}
