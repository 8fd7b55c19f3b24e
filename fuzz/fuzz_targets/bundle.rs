//! Bundle YAML (`bundle::parse`, its positioned YAML tree `bundle::yaml`): any text gives a
//! bundle or a list of problems with positions, never a panic.
//!
//! Property: every problem's position lies inside the text (at most one past the last line,
//! lines broken as YAML breaks them), so `kz` can always show the offending line.

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
        // YAML breaks lines at `\n`, `\r\n` and a bare `\r` (the fuzzer found the last one:
        // `str::lines` does not count it).
        let lines = text.replace("\r\n", "\n").matches(['\n', '\r']).count() + 2;
        for p in &problems {
            assert!(
                p.pos.line <= lines,
                "problem at line {} of {lines}",
                p.pos.line
            );
        }
    }
});
