//! `.keyzero.toml` (`config`): any text gives a config or an error that says where, never a
//! panic (the file is the developer's, but it is also what a cloned repository brings along).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(names) = kz_agent::config::fuzz_parse(text) {
        // Parsing is deterministic: the same text defines the same secrets.
        assert_eq!(kz_agent::config::fuzz_parse(text).ok(), Some(names));
    }
});
