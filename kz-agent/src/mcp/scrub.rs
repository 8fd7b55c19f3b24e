//! Removes real credential values from what `fetch` hands back to the agent.
//!
//! An upstream may echo the credential (debug endpoints, error pages that print the request,
//! token-introspection APIs). Every occurrence in response headers and body is replaced by
//! [`MARKER`]. Besides the raw value, the forms an echo commonly takes are covered too: its
//! percent-encoding (query strings, form bodies) and its JSON-string escaping.

use aho_corasick::{AhoCorasick, MatchKind};

/// What a scrubbed credential reads as. The MCP server has no masked-token table (the agent
/// never holds a token it could send back), so a fixed marker says what happened.
pub const MARKER: &str = "[REDACTED by kz]";

#[derive(Debug)]
pub struct Scrubber {
    matcher: Option<AhoCorasick>,
    longest: usize,
}

impl Scrubber {
    /// Builds a scrubber for these real values (empty values are ignored: they match nothing).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            let percent =
                percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            let json = serde_json::to_string(value).unwrap_or_default();
            let json = json
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .unwrap_or(value);
            for form in [value, percent.as_str(), json] {
                if !form.is_empty() && !patterns.iter().any(|p| p == form.as_bytes()) {
                    patterns.push(form.as_bytes().to_vec());
                }
            }
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        // Leftmost-longest so a value that contains another value is replaced whole.
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .ok()
            .filter(|_| !patterns.is_empty());
        Self { matcher, longest }
    }

    /// The longest byte pattern: a reader that caps a body must read this much past the cap so
    /// a value straddling the cap is seen whole.
    pub fn lookahead(&self) -> usize {
        self.longest
    }

    pub fn scrub(&self, input: &[u8]) -> Vec<u8> {
        match &self.matcher {
            Some(m) => m.replace_all_bytes(input, &vec![MARKER; m.patterns_len()]),
            None => input.to_vec(),
        }
    }

    pub fn scrub_str(&self, input: &str) -> String {
        String::from_utf8_lossy(&self.scrub(input.as_bytes())).into_owned()
    }

    /// Scrubs `input` and keeps about `cap` bytes of it. `complete` says whether `input` is the
    /// whole body; if not, it must hold at least `cap + lookahead()` bytes (or all there was).
    /// Returns the scrubbed bytes and whether anything was cut. A credential straddling the
    /// cut is dropped entirely rather than leaving its first bytes in the output.
    pub fn scrub_capped(&self, input: &[u8], cap: usize, complete: bool) -> (Vec<u8>, bool) {
        if complete && input.len() <= cap {
            return (self.scrub(input), false);
        }
        let mut cut = cap.min(input.len());
        if let Some(m) = &self.matcher {
            for found in m.find_iter(input) {
                if found.start() >= cut {
                    break;
                }
                if found.end() > cut {
                    cut = found.start();
                    break;
                }
            }
        }
        (self.scrub(&input[..cut]), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_raw_percent_and_json_forms() {
        let s = Scrubber::new(["sk/live+1\"x"]);
        let out = s.scrub_str(r#"a sk/live+1"x b sk%2Flive%2B1%22x c "sk/live+1\"x""#);
        assert!(!out.contains("live"), "{out}");
        assert_eq!(out.matches(MARKER).count(), 3);
    }

    #[test]
    fn no_values_is_identity() {
        let s = Scrubber::new([""]);
        assert_eq!(s.scrub(b"abc"), b"abc");
        assert_eq!(s.lookahead(), 0);
    }

    #[test]
    fn cap_never_leaves_a_partial_value() {
        let secret = "SECRETVALUE123";
        let s = Scrubber::new([secret]);
        let body = format!("{}{secret}{}", "x".repeat(95), "y".repeat(100));
        // The cap at 100 falls inside the value (which spans 95..109).
        let (out, truncated) = s.scrub_capped(body.as_bytes(), 100, false);
        assert!(truncated);
        assert_eq!(out, "x".repeat(95).as_bytes());
        let (out, truncated) = s.scrub_capped(body.as_bytes(), 120, false);
        assert!(truncated);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(MARKER) && !out.contains("SECRET"), "{out}");
    }

    #[test]
    fn small_complete_body_is_not_truncated() {
        let s = Scrubber::new(["tok"]);
        let (out, truncated) = s.scrub_capped(b"a tok b", 100, true);
        assert!(!truncated);
        assert_eq!(out, format!("a {MARKER} b").as_bytes());
    }
}
