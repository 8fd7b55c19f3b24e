//! Bundle YAML (`bundle::parse`, its positioned YAML tree `bundle::yaml`): any text gives a
//! bundle or a list of problems with positions, never a panic.
//!
//! Property: every problem's position lies inside the text (line 1.. and at most one past the
//! last line), so `kz` can always show the offending line.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = kz_agent::bundle::yaml::parse(text);
    if let Err(kz_agent::bundle::BundleError::Invalid { problems, .. }) =
        kz_agent::bundle::parse("fuzz.yaml", text)
    {
        let lines = text.lines().count().max(1) + 1;
        for p in &problems {
            assert!(
                p.pos.line <= lines,
                "problem at line {} of {lines}",
                p.pos.line
            );
        }
    }
});
