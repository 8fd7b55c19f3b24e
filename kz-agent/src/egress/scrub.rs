//! The scrubber: removes real credential values from what goes back to the agent.
//!
//! An upstream may echo a credential (debug endpoints, error pages that print the request,
//! token-introspection APIs), so every byte kz hands back from a host it sent a credential to
//! passes one of these. One type for all three clients; what differs between them is explicit:
//!
//! - [`Replacement`], what an occurrence becomes. The proxy writes the value's masked token back
//!   (the agent holds it and may send it again); MCP `fetch` and the PDP's exchange proxy have
//!   no token the agent could reuse, so they write a fixed marker.
//! - [`Forms`], which spellings of a value are looked for besides the raw bytes. **This is the
//!   seam for issue 14**: the encoded forms the hardening asks for (base64 standard and
//!   URL-safe, kz's own percent-encoding) are added to [`Forms`] and [`forms_of`] once, and every
//!   caller that asks for them gets them, streamed or not.
//!
//! Matching is leftmost-longest, so a value that contains another value is replaced whole.
//! Streaming (the proxy's bodies) runs on [`super::rewrite`], which carries a value straddling
//! two chunks over to the next one.

use super::location::{Keep, percent_encode};
use super::rewrite::{Decide, Patterns, RewriteError, StreamRewriter};
use std::borrow::Cow;
use std::sync::Arc;

/// The marker MCP `fetch` writes (documented in docs/architecture.md).
pub const MARKER: &str = "[REDACTED by kz]";

/// The marker the PDP's exchange proxy writes. Lower-case for history only: clients of the
/// exchange (and tests/pdp.rs) match on it; issue 14 moves it to [`MARKER`].
pub const EXCHANGE_MARKER: &str = "[redacted by kz]";

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error(
        "{values} values but {tokens} replacement tokens; give the scrubber one token per value"
    )]
    Tokens { values: usize, tokens: usize },
    #[error("cannot build the scrubber: {0}")]
    Build(#[from] RewriteError),
}

/// What a found value is replaced with.
#[derive(Debug, Clone)]
pub enum Replacement {
    /// The same text for every value ([`MARKER`], [`EXCHANGE_MARKER`]).
    Marker(&'static str),
    /// One replacement per value, in the order the values were given (the proxy's masked
    /// tokens).
    Tokens(Vec<Box<[u8]>>),
}

/// The spellings of a value that are scrubbed besides the raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Forms {
    /// Every non-alphanumeric byte percent-encoded ([`Keep::Alphanumeric`]): query strings and
    /// form bodies an upstream echoes.
    pub percent: bool,
    /// JSON string escaping (`"` → `\"`, control characters, …), without the quotes.
    pub json: bool,
    // Issue 14: `base64`, `base64url` and kz's own `percent_unreserved` go here.
}

impl Forms {
    /// The raw value only (the proxy, streaming; the PDP's exchange).
    pub const RAW: Forms = Forms {
        percent: false,
        json: false,
    };
    /// The raw value and the forms an echo commonly takes (MCP `fetch`).
    pub const ECHOES: Forms = Forms {
        percent: true,
        json: true,
    };
}

/// The byte patterns that spell `value` under `forms`: raw first, then each enabled form that
/// differs from the ones before. Empty for an empty value (it would match everywhere).
pub fn forms_of(value: &[u8], forms: Forms) -> Vec<Vec<u8>> {
    if value.is_empty() {
        return Vec::new();
    }
    let mut out = vec![value.to_vec()];
    let mut add = |form: Vec<u8>| {
        if !form.is_empty() && !out.contains(&form) {
            out.push(form);
        }
    };
    if forms.percent {
        add(percent_encode(value, Keep::Alphanumeric).into_bytes());
    }
    if forms.json
        && let Ok(text) = std::str::from_utf8(value)
        && let Ok(quoted) = serde_json::to_string(text)
        && let Some(inner) = quoted.strip_prefix('"').and_then(|s| s.strip_suffix('"'))
    {
        add(inner.as_bytes().to_vec());
    }
    out
}

/// Pattern id → what it becomes and whose value it spells.
struct Plan {
    to: Vec<Box<[u8]>>,
    value: Vec<usize>,
}

impl Decide for Plan {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        self.to.get(id).map(|b| &b[..])
    }
}

/// A compiled scrubber over a fixed set of values. Cheap to clone (`Arc`s).
#[derive(Clone)]
pub struct Scrubber {
    pats: Arc<Patterns>,
    plan: Arc<Plan>,
}

impl std::fmt::Debug for Scrubber {
    // Never the patterns: they are the real values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("patterns", &self.plan.to.len())
            .finish()
    }
}

impl Scrubber {
    /// Builds a scrubber for these real values. Empty values are skipped (they match nothing);
    /// value indexes stay those of `values`.
    pub fn new<'a>(
        values: impl IntoIterator<Item = &'a [u8]>,
        forms: Forms,
        replacement: Replacement,
    ) -> Result<Self, ScrubError> {
        let values: Vec<&[u8]> = values.into_iter().collect();
        if let Replacement::Tokens(tokens) = &replacement
            && tokens.len() != values.len()
        {
            return Err(ScrubError::Tokens {
                values: values.len(),
                tokens: tokens.len(),
            });
        }
        let mut pats: Vec<Box<[u8]>> = Vec::new();
        let mut to = Vec::new();
        let mut owner = Vec::new();
        for (i, value) in values.iter().enumerate() {
            for form in forms_of(value, forms) {
                pats.push(form.into_boxed_slice());
                to.push(match &replacement {
                    Replacement::Marker(m) => m.as_bytes().to_vec().into_boxed_slice(),
                    Replacement::Tokens(t) => t.get(i).cloned().unwrap_or_default(),
                });
                owner.push(i);
            }
        }
        Ok(Self {
            pats: Arc::new(Patterns::new(pats)?),
            plan: Arc::new(Plan { to, value: owner }),
        })
    }

    /// A scrubber for a single value with a fixed marker (MCP `fetch`, the PDP's exchange).
    pub fn for_value(value: &str, forms: Forms, marker: &'static str) -> Result<Self, ScrubError> {
        Self::new([value.as_bytes()], forms, Replacement::Marker(marker))
    }

    /// A scrubber that changes nothing.
    pub fn empty() -> Self {
        Self {
            pats: Arc::new(Patterns::empty()),
            plan: Arc::new(Plan {
                to: Vec::new(),
                value: Vec::new(),
            }),
        }
    }

    /// The index (into the values given to [`Scrubber::new`]) of the value pattern `id` spells:
    /// the ids [`StreamRewriter`] and [`Scrubber::rewrite_value`] report are pattern ids.
    pub fn value_of(&self, id: usize) -> usize {
        self.plan.value.get(id).copied().unwrap_or(id)
    }

    /// The longest byte pattern: a reader that caps a body must read this much past the cap so
    /// a value straddling the cap is seen whole.
    pub fn lookahead(&self) -> usize {
        self.pats.max_len()
    }

    /// Whether any form of any value occurs in `data`.
    pub fn contains(&self, data: &[u8]) -> bool {
        self.pats.matches(data).next().is_some()
    }

    /// Indexes of the values found in `data` (adjacent repeats collapsed).
    pub fn found(&self, data: &[u8]) -> Vec<usize> {
        let mut v = Vec::new();
        self.pats
            .for_each_match(data, |id| v.push(self.value_of(id)));
        v.dedup();
        v
    }

    /// Scrubs a complete buffer. Borrowed when nothing needed scrubbing.
    pub fn scrub<'a>(&self, data: &'a [u8]) -> Cow<'a, [u8]> {
        self.rewrite_value(data, &mut |_| {})
            .map_or(Cow::Borrowed(data), Cow::Owned)
    }

    pub fn scrub_str(&self, input: &str) -> String {
        String::from_utf8_lossy(&self.scrub(input.as_bytes())).into_owned()
    }

    /// Scrubs one complete value (a header, a URL); `None` when nothing changed. `seen` gets
    /// the pattern id of every occurrence (see [`Scrubber::value_of`]).
    pub fn rewrite_value(&self, v: &[u8], seen: &mut dyn FnMut(usize)) -> Option<Vec<u8>> {
        self.pats
            .rewrite_all(v, self.plan.as_ref(), &mut |id, _| seen(id))
    }

    /// A streaming scrubber for one body: push chunks, then `finish`.
    pub fn stream(&self) -> StreamRewriter {
        StreamRewriter::new(self.pats.clone(), self.plan.clone())
    }

    /// Scrubs `input` and keeps about `cap` bytes of it. `complete` says whether `input` is the
    /// whole body; if not, it must hold at least `cap + lookahead()` bytes (or all there was).
    /// Returns the scrubbed bytes and whether anything was cut. A credential straddling the
    /// cut is dropped entirely rather than leaving its first bytes in the output.
    pub fn scrub_capped(&self, input: &[u8], cap: usize, complete: bool) -> (Vec<u8>, bool) {
        if complete && input.len() <= cap {
            return (self.scrub(input).into_owned(), false);
        }
        let mut cut = cap.min(input.len());
        for (start, end, _) in self.pats.matches(input) {
            if start >= cut {
                break;
            }
            if end > cut {
                cut = start;
                break;
            }
        }
        let kept = input.get(..cut).unwrap_or(input);
        (self.scrub(kept).into_owned(), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(values: &[&str], forms: Forms) -> Scrubber {
        Scrubber::new(
            values.iter().map(|v| v.as_bytes()),
            forms,
            Replacement::Marker(MARKER),
        )
        .unwrap()
    }

    #[test]
    fn replaces_raw_percent_and_json_forms() {
        let s = marker(&["sk/live+1\"x"], Forms::ECHOES);
        let out = s.scrub_str(r#"a sk/live+1"x b sk%2Flive%2B1%22x c "sk/live+1\"x""#);
        assert!(!out.contains("live"), "{out}");
        assert_eq!(out.matches(MARKER).count(), 3);
        // Raw only: the encoded forms stay.
        let raw = marker(&["sk/live+1\"x"], Forms::RAW);
        let out = raw.scrub_str("sk/live+1\"x sk%2Flive%2B1%22x");
        assert_eq!(out, format!("{MARKER} sk%2Flive%2B1%22x"));
    }

    #[test]
    fn no_values_is_identity() {
        let s = marker(&[""], Forms::ECHOES);
        assert_eq!(&*s.scrub(b"abc"), b"abc");
        assert_eq!(s.lookahead(), 0);
        assert!(!s.contains(b"abc"));
        assert_eq!(&*Scrubber::empty().scrub(b"abc"), b"abc");
    }

    #[test]
    fn cap_never_leaves_a_partial_value() {
        let secret = "SECRETVALUE123";
        let s = marker(&[secret], Forms::ECHOES);
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
        let s = marker(&["tok"], Forms::ECHOES);
        let (out, truncated) = s.scrub_capped(b"a tok b", 100, true);
        assert!(!truncated);
        assert_eq!(out, format!("a {MARKER} b").as_bytes());
    }

    /// The PDP exchange's marker (formerly `pdp::proxy::scrub`).
    #[test]
    fn exchange_marker() {
        let s = Scrubber::for_value("sk_live_1", Forms::RAW, EXCHANGE_MARKER).unwrap();
        assert_eq!(
            &*s.scrub(b"echo: sk_live_1 and sk_live_1!"),
            b"echo: [redacted by kz] and [redacted by kz]!"
        );
        assert!(s.contains(b"x sk_live_1"));
        assert!(!s.contains(b"sk_live_"));
    }

    #[test]
    fn tokens_replace_per_value_and_stream() {
        let s = Scrubber::new(
            [&b"real-one"[..], b"real-two"],
            Forms::RAW,
            Replacement::Tokens(vec![
                b"kz_masked_1".to_vec().into(),
                b"kz_masked_2".to_vec().into(),
            ]),
        )
        .unwrap();
        assert_eq!(&*s.scrub(b"real-two real-one"), b"kz_masked_2 kz_masked_1");
        assert_eq!(s.found(b"real-two real-one"), vec![1, 0]);
        let mut rw = s.stream();
        let mut seen = Vec::new();
        let mut out = rw
            .push(bytes::Bytes::from_static(b"a real-"), &mut |id, _| {
                seen.push(id)
            })
            .to_vec();
        out.extend_from_slice(&rw.push(bytes::Bytes::from_static(b"one b"), &mut |id, _| {
            seen.push(id)
        }));
        out.extend_from_slice(&rw.finish(&mut |id, _| seen.push(id)));
        assert_eq!(out, b"a kz_masked_1 b");
        assert_eq!(seen.iter().map(|&i| s.value_of(i)).collect::<Vec<_>>(), [0]);
        assert!(matches!(
            Scrubber::new([&b"v"[..]], Forms::RAW, Replacement::Tokens(Vec::new())),
            Err(ScrubError::Tokens { .. })
        ));
    }

    #[test]
    fn pattern_ids_map_to_values() {
        // Value 1 has three forms: its pattern ids all map back to it.
        let s = marker(&["plain", "a/b\"c"], Forms::ECHOES);
        let mut ids = Vec::new();
        let _ = s.rewrite_value(b"plain a%2Fb%22c a/b\\\"c", &mut |id| {
            ids.push(s.value_of(id))
        });
        assert_eq!(ids, [0, 1, 1]);
    }
}
