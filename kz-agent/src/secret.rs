//! The one type that holds a real credential.
//!
//! `Secret` cannot be printed: `Debug` and `Display` write `[redacted]`, so a secret that slips
//! into a log line, an error or a panic message shows nothing. The bytes are zeroed on drop.
//! Reading the value takes an explicit [`Secret::expose`] call, which is easy to grep for.

use std::fmt;
use zeroize::Zeroizing;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The real value. Every call site is a place where a credential leaves kz's custody.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_the_value() {
        let s = Secret::new("sk-live-123");
        assert_eq!(
            format!("{s} {s:?} {s:#?}"),
            "[redacted] Secret([redacted]) Secret([redacted])"
        );
        assert_eq!(s.expose(), "sk-live-123");
    }
}
