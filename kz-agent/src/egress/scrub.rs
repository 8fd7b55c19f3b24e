//! The scrubber: removes real credential values from what goes back to the agent.
//!
//! An upstream may echo a credential (debug endpoints, error pages that print the request,
//! token-introspection APIs), so every byte kz hands back from a host it sent a credential to
//! passes one of these. One type for all three clients; what differs between them is explicit:
//!
//! - [`Replacement`], what an occurrence becomes. The proxy writes the value's masked token back
//!   (the agent holds it and may send it again); MCP `fetch` and the PDP's exchange proxy have
//!   no token the agent could reuse, so they write a fixed marker.
//! - [`Forms`], which spellings of a value are looked for besides the raw bytes ([`forms_of`]).
//!   All three clients ask for [`Forms::ALL`] (issue 14); [`Forms::RAW`] is for tests and for
//!   callers that know their data cannot hold an encoding.
//!
//! Matching is leftmost-longest, so a value that contains another value is replaced whole, and
//! a longer spelling (the exact base64 with its padding) wins over the shorter one it starts
//! with. Streaming (the proxy's bodies, WebSocket frames) runs on [`super::rewrite`], which
//! carries a spelling straddling two chunks over to the next one; every spelling is a plain
//! byte string, so the automaton and the carry-over rules are the raw value's.
//!
//! # The spellings ([`Form`])
//!
//! - **percent** ([`Form::Percent`]): the encoders upstreams and clients use, each with upper-
//!   and lower-case hex: every byte but letters and digits; RFC 3986 unreserved kept
//!   (`-._~`: kz's own [`percent_encode`](super::location::percent_encode) with
//!   [`Keep::Unreserved`](super::location::Keep::Unreserved), i.e. what kz writes when it
//!   puts a value into a URL, Python's `quote(safe="")`); the same with a space as `+` (Go's
//!   `QueryEscape`); `-._~/` (Python's `quote` default); JavaScript's `encodeURIComponent`
//!   (`-_.!~*'()`); form encoding (`-._*`, space as `+`; WHATWG, Java's `URLEncoder`). Mixed-case
//!   hex in one string is written by no encoder and is not looked for.
//! - **json** ([`Form::Json`]): the inside of a JSON string as serde_json and
//!   `JSON.stringify` write it (`\"`, `\\`, `\n`-style short escapes, other control characters as
//!   `\u00xx`), and the optional escapes other encoders add, in every combination: `\/` (PHP,
//!   some Java), non-ASCII as `\uXXXX` with surrogate pairs (Python's `ensure_ascii`, PHP), `<`
//!   `>` `&` U+2028 U+2029 as `\u003c`… (Go's `encoding/json`), upper-case hex (Jackson).
//! - **base64** / **base64url** ([`Form::Base64`], [`Form::Base64Url`]): the standard and the
//!   URL-safe alphabet. The exact encoding of the value alone, padded and unpadded (how an
//!   upstream re-encodes a token it decoded, or a JWT-style segment), and the value
//!   inside a longer encoded blob (`base64("user:" + value)`, a JSON document encoded whole):
//!   there the characters depend on where the value starts within a 3-byte group. For each of
//!   the three offsets `o` a value of `n` bytes has a run of characters that depends only on
//!   it, the characters `ceil(8o/6) .. floor(8(o+n)/6)` of `base64(o zero bytes + value)`;
//!   the three runs are looked for. What such a run cannot cover is the character on each side
//!   that mixes the value's bits with its neighbours': at most 4 bits of the value at each end
//!   stay in a scrubbed blob (never more than 8 of a value of at least 64). A base64 spelling
//!   holding `+` `/` `=` is also looked for written again as a URL or JSON would write it:
//!   percent-encoded (upper- and lower-case hex) and with `\/`.
//!
//! Percent and JSON spellings are searched for values of any length: each is the raw value
//! with some bytes written longer, so it is found by chance no more often than the raw value
//! is. Base64 runs are not: a run of a short value is a short string of letters and digits that
//! random base64 (images, certificates, other tokens) holds by chance. They are searched for
//! values of at least [`MIN_BASE64_LEN`] (8) bytes, whose shortest run is 10 characters (60
//! bits: one false match in about 2^57 characters of random base64, counting all six runs).
//! Shorter values are scrubbed raw, percent-encoded and JSON-escaped only.
//!
//! # What replaces a match
//!
//! The replacement `R` is the masked token ([`Replacement::Tokens`]) or the marker
//! ([`Replacement::Marker`]); a match is replaced by **the same spelling of `R`**, so what the
//! agent sees still decodes the way the upstream meant it to (a percent-encoded query decodes
//! to the masked token, which the agent can send again; a JSON string stays valid JSON):
//!
//! - raw, percent and JSON: `R` written by the same encoder (same kept set, same hex case);
//!   a base64 spelling written again (percent, `\/`): its replacement below, written again.
//! - base64, exact padded encoding: `R` encoded the same way. Padding ends an encoding, so
//!   nothing after it can move.
//! - base64, exact unpadded encoding (`n % 3 != 0`): as many `A` as it has characters (below).
//!   Its last character holds the value's last bits and zero bits of whatever follows; when
//!   the blob goes on (the next byte's top bits happened to be zero: any byte below `@` for
//!   `n % 3 == 2`, a quarter of all bytes) a longer replacement would misalign the rest, while
//!   `A`s zero exactly the value's bits and leave the neighbour's (zero) bits as they were.
//! - base64 run of a value whose encoding is whole 4-character groups (offset 0, `n % 3 == 0`):
//!   the encoding of `R` when `R` is also whole groups (`R.len() % 3 == 0`; kz's generated masked
//!   tokens are 42 bytes), so the rest of the blob keeps its alignment and still decodes.
//! - any other run: as many `A` as the run has characters (zero bits). Anything of another
//!   length would shift every later character of the blob out of its group and turn the rest of
//!   the blob into garbage, and a character outside the alphabet would make it undecodable; a
//!   same-length run of one base64 character keeps the blob valid and every byte around the
//!   value intact, and the value's bytes decode as zeros. The agent cannot reuse that, but it
//!   cannot reuse a token inside someone else's blob either.
//!
//! When a standard and a URL-safe spelling are the same bytes (no `+` `/` `-` `_` in them), the
//! standard one's replacement is written.

use super::rewrite::{Decide, Patterns, RewriteError, StreamRewriter};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use std::borrow::Cow;
use std::sync::Arc;

/// The marker MCP `fetch` writes (documented in docs/architecture.md).
pub const MARKER: &str = "[REDACTED by kz]";

/// The marker the PDP's exchange proxy writes. Lower-case for history only: clients of the
/// exchange (and tests/pdp.rs) match on it; issue 14 moves it to [`MARKER`].
pub const EXCHANGE_MARKER: &str = "[redacted by kz]";

/// Values shorter than this (in bytes) are not searched for in base64 (see the module docs).
pub const MIN_BASE64_LEN: usize = 8;

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

/// The spellings of a value that are scrubbed besides the raw bytes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Forms {
    /// Percent-encoded by any of the common encoders, upper- or lower-case hex.
    pub percent: bool,
    /// JSON string escaping, without the quotes, as the common encoders write it.
    pub json: bool,
    /// Base64, standard and URL-safe, alone (padded or not) or inside a longer blob.
    pub base64: bool,
}

impl Forms {
    /// The raw value only.
    pub const RAW: Forms = Forms {
        percent: false,
        json: false,
        base64: false,
    };
    /// Every spelling kz knows: what the proxy, MCP `fetch` and the PDP's exchange scrub.
    pub const ALL: Forms = Forms {
        percent: true,
        json: true,
        base64: true,
    };
}

/// Which spelling a match was (the audit record's `form`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Form {
    Raw,
    Percent,
    Json,
    Base64,
    Base64Url,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Percent => "percent",
            Self::Json => "json",
            Self::Base64 => "base64",
            Self::Base64Url => "base64url",
        }
    }
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The percent encoders: bytes kept besides letters and digits, and whether a space is `+`.
const PERCENT: [(&[u8], bool); 6] = [
    (b"", false),
    (b"-._~", false),
    (b"-._~", true),
    (b"-._~/", false),
    (b"-_.!~*'()", false),
    (b"-._*", true),
];

/// How one spelling was written, so the replacement can be written the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    Raw,
    Percent {
        keep: &'static [u8],
        plus: bool,
        upper: bool,
    },
    Json {
        slash: bool,
        ascii: bool,
        html: bool,
        upper: bool,
    },
    /// The exact encoding of the value alone.
    Base64Exact {
        url: bool,
        pad: bool,
    },
    /// The stable run at `offset` within a 3-byte group; `whole`: offset 0 and the value is
    /// whole groups.
    Base64Run {
        url: bool,
        whole: bool,
    },
}

/// One spelling of a value: its bytes, and how to write a replacement the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spelling {
    pub form: Form,
    pub bytes: Vec<u8>,
    encoder: Encoder,
    then: Then,
    /// The spelling's length before `then`.
    inner_len: usize,
}

/// A second encoding over a base64 spelling: a blob put in a URL or a JSON string has its
/// `+` `/` `=` written again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Nothing,
    /// Every byte but letters and digits as `%XX`.
    Percent {
        upper: bool,
    },
    /// `/` as `\/` (PHP's `json_encode`).
    JsonSlash,
}

impl Spelling {
    /// `r` (a masked token, a marker) written the way this spelling was (module docs).
    pub fn replacement(&self, r: &[u8]) -> Vec<u8> {
        let first = self.first_replacement(r);
        match self.then {
            Then::Nothing => first,
            Then::Percent { upper } => percent(&first, b"", false, upper),
            Then::JsonSlash => json_slash(&first),
        }
    }

    fn first_replacement(&self, r: &[u8]) -> Vec<u8> {
        match self.encoder {
            Encoder::Raw => r.to_vec(),
            Encoder::Percent { keep, plus, upper } => percent(r, keep, plus, upper),
            Encoder::Json {
                slash,
                ascii,
                html,
                upper,
            } => match std::str::from_utf8(r) {
                Ok(text) => json(text, slash, ascii, html, upper).into_bytes(),
                // A replacement that is no text cannot be a JSON string; kz's never are.
                Err(_) => vec![b'A'; self.inner_len],
            },
            Encoder::Base64Exact { url, pad: true } => engine(url, true).encode(r).into_bytes(),
            Encoder::Base64Run { url, whole } if whole && r.len().is_multiple_of(3) => {
                engine(url, false).encode(r).into_bytes()
            }
            Encoder::Base64Exact { pad: false, .. } | Encoder::Base64Run { .. } => {
                vec![b'A'; self.inner_len]
            }
        }
    }
}

fn engine(url: bool, pad: bool) -> &'static base64::engine::GeneralPurpose {
    match (url, pad) {
        (false, true) => &STANDARD,
        (false, false) => &STANDARD_NO_PAD,
        (true, true) => &URL_SAFE,
        (true, false) => &URL_SAFE_NO_PAD,
    }
}

/// `v` percent-encoded: letters, digits and `keep` as they are, a space as `+` with `plus`.
fn percent(v: &[u8], keep: &[u8], plus: bool, upper: bool) -> Vec<u8> {
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    const LOWER: &[u8; 16] = b"0123456789abcdef";
    let hex = if upper { UPPER } else { LOWER };
    let mut out = Vec::with_capacity(v.len() * 3);
    for &b in v {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b);
        } else if b == b' ' && plus {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 0x0f)]]);
        }
    }
    out
}

/// The inside of a JSON string holding `v`: serde_json's escaping, plus `\/` (`slash`),
/// non-ASCII as `\uXXXX` (`ascii`), `<>&` U+2028 U+2029 as `\u…` (`html`), upper-case hex.
fn json(v: &str, slash: bool, ascii: bool, html: bool, upper: bool) -> String {
    let mut out = String::with_capacity(v.len() + 8);
    let unit = |out: &mut String, u: u16| {
        out.push_str(&if upper {
            format!("\\u{u:04X}")
        } else {
            format!("\\u{u:04x}")
        });
    };
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '/' if slash => out.push_str("\\/"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if html => {
                let mut buf = [0u16; 1];
                for u in c.encode_utf16(&mut buf) {
                    unit(&mut out, *u);
                }
            }
            c if u32::from(c) < 0x20 => unit(&mut out, u32::from(c) as u16),
            c if ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    unit(&mut out, *u);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// `v` with every `/` written `\/`.
fn json_slash(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 4);
    for &b in v {
        if b == b'/' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// The characters of `base64(offset zero bytes + value)` that depend on `value` only.
fn base64_run(value: &[u8], offset: usize, url: bool) -> Vec<u8> {
    let mut input = vec![0u8; offset];
    input.extend_from_slice(value);
    let enc = engine(url, false).encode(&input).into_bytes();
    let start = (8 * offset).div_ceil(6);
    let end = 8 * (offset + value.len()) / 6;
    enc.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
}

/// The byte patterns that spell `value` under `forms`: raw first, then each enabled spelling
/// whose bytes differ from the ones before. Empty for an empty value (it would match
/// everywhere).
pub fn forms_of(value: &[u8], forms: Forms) -> Vec<Spelling> {
    if value.is_empty() {
        return Vec::new();
    }
    let mut out = vec![Spelling {
        form: Form::Raw,
        bytes: value.to_vec(),
        encoder: Encoder::Raw,
        then: Then::Nothing,
        inner_len: value.len(),
    }];
    let mut add = |form: Form, bytes: Vec<u8>, encoder: Encoder| {
        if bytes.is_empty() || out.iter().any(|s| s.bytes == bytes) {
            return;
        }
        let b64 = matches!(
            encoder,
            Encoder::Base64Exact { .. } | Encoder::Base64Run { .. }
        );
        let mut again = Vec::new();
        if b64 && bytes.iter().any(|b| matches!(b, b'+' | b'/' | b'=')) {
            for upper in [true, false] {
                again.push((percent(&bytes, b"", false, upper), Then::Percent { upper }));
            }
        }
        if b64 && bytes.contains(&b'/') {
            again.push((json_slash(&bytes), Then::JsonSlash));
        }
        let inner_len = bytes.len();
        out.push(Spelling {
            form,
            bytes,
            encoder,
            then: Then::Nothing,
            inner_len,
        });
        for (bytes, then) in again {
            if !out.iter().any(|s| s.bytes == bytes) {
                out.push(Spelling {
                    form,
                    bytes,
                    encoder,
                    then,
                    inner_len,
                });
            }
        }
    };
    if forms.percent {
        for (keep, plus) in PERCENT {
            for upper in [true, false] {
                let e = Encoder::Percent { keep, plus, upper };
                add(Form::Percent, percent(value, keep, plus, upper), e);
            }
        }
    }
    if forms.json
        && let Ok(text) = std::str::from_utf8(value)
    {
        for bits in 0..16u8 {
            let (slash, ascii, html, upper) =
                (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
            let e = Encoder::Json {
                slash,
                ascii,
                html,
                upper,
            };
            add(
                Form::Json,
                json(text, slash, ascii, html, upper).into_bytes(),
                e,
            );
        }
    }
    if forms.base64 && value.len() >= MIN_BASE64_LEN {
        for url in [false, true] {
            let form = if url { Form::Base64Url } else { Form::Base64 };
            let whole = value.len().is_multiple_of(3);
            if !whole {
                for pad in [true, false] {
                    let bytes = engine(url, pad).encode(value).into_bytes();
                    add(form, bytes, Encoder::Base64Exact { url, pad });
                }
            }
            for offset in 0..3 {
                let e = Encoder::Base64Run {
                    url,
                    whole: whole && offset == 0,
                };
                add(form, base64_run(value, offset, url), e);
            }
        }
    }
    out
}

/// Pattern id → what it becomes, whose value it spells and which spelling it is.
struct Plan {
    to: Vec<Box<[u8]>>,
    value: Vec<usize>,
    form: Vec<Form>,
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
        let mut form = Vec::new();
        for (i, value) in values.iter().enumerate() {
            let r: &[u8] = match &replacement {
                Replacement::Marker(m) => m.as_bytes(),
                Replacement::Tokens(t) => t.get(i).map_or(&[][..], |t| &t[..]),
            };
            for spelling in forms_of(value, forms) {
                to.push(spelling.replacement(r).into_boxed_slice());
                form.push(spelling.form);
                pats.push(spelling.bytes.into_boxed_slice());
                owner.push(i);
            }
        }
        Ok(Self {
            pats: Arc::new(Patterns::new(pats)?),
            plan: Arc::new(Plan {
                to,
                value: owner,
                form,
            }),
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
                form: Vec::new(),
            }),
        }
    }

    /// The index (into the values given to [`Scrubber::new`]) of the value pattern `id` spells:
    /// the ids [`StreamRewriter`] and [`Scrubber::rewrite_value`] report are pattern ids.
    pub fn value_of(&self, id: usize) -> usize {
        self.plan.value.get(id).copied().unwrap_or(id)
    }

    /// Which spelling pattern `id` is (for the audit record).
    pub fn form_of(&self, id: usize) -> Form {
        self.plan.form.get(id).copied().unwrap_or(Form::Raw)
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
    use crate::egress::location::{Keep, percent_encode};

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
        let s = marker(&["sk/live+1\"x"], Forms::ALL);
        let out = s.scrub_str(r#"a sk/live+1"x b sk%2Flive%2B1%22x c "sk/live+1\"x""#);
        // Each spelling becomes the marker in that spelling.
        assert_eq!(
            out,
            format!(r#"a {MARKER} b %5BREDACTED%20by%20kz%5D c "{MARKER}""#)
        );
        // Raw only: the encoded forms stay.
        let raw = marker(&["sk/live+1\"x"], Forms::RAW);
        let out = raw.scrub_str("sk/live+1\"x sk%2Flive%2B1%22x");
        assert_eq!(out, format!("{MARKER} sk%2Flive%2B1%22x"));
    }

    #[test]
    fn no_values_is_identity() {
        let s = marker(&[""], Forms::ALL);
        assert_eq!(&*s.scrub(b"abc"), b"abc");
        assert_eq!(s.lookahead(), 0);
        assert!(!s.contains(b"abc"));
        assert_eq!(&*Scrubber::empty().scrub(b"abc"), b"abc");
    }

    #[test]
    fn cap_never_leaves_a_partial_value() {
        let secret = "SECRETVALUE123";
        let s = marker(&[secret], Forms::ALL);
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
        let s = marker(&["tok"], Forms::ALL);
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
        let s = marker(&["plain", "a/b\"c"], Forms::ALL);
        let mut ids = Vec::new();
        let _ = s.rewrite_value(b"plain a%2Fb%22c a/b\\\"c", &mut |id| {
            ids.push(s.value_of(id))
        });
        assert_eq!(ids, [0, 1, 1]);
    }

    /// A masked token as kz generates them (42 bytes: whole base64 groups).
    const MASKED: &str = "kz_masked_0123456789abcdef0123456789abcdef";

    /// Values of each length mod 3, with every byte class an encoder treats specially.
    const VALUES: [&str; 3] = [
        "sk/live+\"q\"\\<&>\u{e9}-012345678",
        "sk/live+\"q\"\\<&>\u{e9}-0123456789",
        "sk/live+\"q\"\\<&>\u{e9}-0123456789a",
    ];

    fn masked(values: &[&str]) -> Scrubber {
        Scrubber::new(
            values.iter().map(|v| v.as_bytes()),
            Forms::ALL,
            Replacement::Tokens(vec![MASKED.as_bytes().into(); values.len()]),
        )
        .unwrap()
    }

    fn has(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn value_lengths_cover_every_alignment() {
        let lens: Vec<usize> = VALUES.iter().map(|v| v.len() % 3).collect();
        assert_eq!(lens, [0, 1, 2]);
    }

    /// Every spelling, in a body: found, replaced by the same spelling of the masked token, no
    /// spelling of the value left.
    #[test]
    fn each_spelling_is_replaced_by_the_same_spelling_of_the_token() {
        for v in VALUES {
            let s = masked(&[v]);
            let spellings = forms_of(v.as_bytes(), Forms::ALL);
            for f in [Form::Percent, Form::Json, Form::Base64, Form::Base64Url] {
                assert!(spellings.iter().any(|s| s.form == f), "{f} missing for {v}");
            }
            for sp in &spellings {
                let body = [&b"pre "[..], &sp.bytes, b" post"].concat();
                let out = s.scrub(&body).into_owned();
                let want = [&b"pre "[..], &sp.replacement(MASKED.as_bytes()), b" post"].concat();
                assert_eq!(
                    out,
                    want,
                    "{} {:?}",
                    sp.form,
                    String::from_utf8_lossy(&sp.bytes)
                );
                for other in &spellings {
                    assert!(!has(&out, &other.bytes), "{} left in {out:?}", other.form);
                }
                let mut forms = Vec::new();
                s.rewrite_value(&body, &mut |id| forms.push(s.form_of(id)));
                assert_eq!(forms, [sp.form]);
            }
        }
    }

    /// kz's own percent-encoding (what the swap writes into a URL), the strictest encoder, and
    /// both with lower-case hex.
    #[test]
    fn percent_spellings_include_kz_own_and_lower_case() {
        for v in VALUES {
            let got: Vec<Vec<u8>> = forms_of(v.as_bytes(), Forms::ALL)
                .into_iter()
                .map(|s| s.bytes)
                .collect();
            for keep in [Keep::Unreserved, Keep::Alphanumeric] {
                let upper = percent_encode(v.as_bytes(), keep);
                let lower = upper
                    .split('%')
                    .enumerate()
                    .map(|(i, p)| {
                        if i == 0 {
                            p.to_owned()
                        } else {
                            p[..2].to_ascii_lowercase() + &p[2..]
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("%");
                assert!(got.contains(&upper.into_bytes()), "{keep:?}");
                assert!(got.contains(&lower.into_bytes()), "{keep:?} lower");
            }
        }
        // kz's own URL encoding of a value, echoed back: the masked token comes back.
        let v = VALUES[1];
        let s = masked(&[v]);
        let url = format!(
            "/echo?key={}",
            percent_encode(v.as_bytes(), Keep::Unreserved)
        );
        assert_eq!(s.scrub_str(&url), format!("/echo?key={MASKED}"));
    }

    /// JSON documents written by serde_json (= JSON.stringify for these values) and the other
    /// common encoders still parse after scrubbing, and hold the masked token.
    #[test]
    fn json_spellings_keep_documents_valid() {
        for v in VALUES {
            let s = masked(&[v]);
            let serde = serde_json::json!({ "token": v, "n": 1 }).to_string();
            let inner = serde_json::to_string(v).unwrap();
            let inner = &inner[1..inner.len() - 1];
            let php = inner.replace('/', "\\/").replace('\u{e9}', "\\u00e9");
            let go = inner
                .replace('<', "\\u003c")
                .replace('>', "\\u003e")
                .replace('&', "\\u0026");
            let upper = php.replace("\\u00e9", "\\u00E9");
            for doc in [
                serde.clone(),
                serde.replace(inner, &php),
                serde.replace(inner, &go),
                serde.replace(inner, &upper),
            ] {
                assert_ne!(doc.find(v), Some(0));
                let out = s.scrub_str(&doc);
                let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
                assert_eq!(parsed["token"], MASKED, "{doc} -> {out}");
            }
        }
        // Control characters as serde writes them.
        let v = "line1\nline2\u{1}\ttab-xyz";
        let s = masked(&[v]);
        let doc = serde_json::json!({ "token": v }).to_string();
        let parsed: serde_json::Value = serde_json::from_str(&s.scrub_str(&doc)).unwrap();
        assert_eq!(parsed["token"], MASKED);
    }

    /// Base64 in each alphabet, padded or not, with the value at every offset of a longer blob:
    /// the blob still decodes, the bytes around the value are intact, at most 4 bits of the
    /// value survive at each end, and where the alignment allows the token is there instead.
    #[test]
    fn base64_at_every_alignment() {
        let engines = [
            (&STANDARD, "std", true),
            (&STANDARD_NO_PAD, "std unpadded", false),
            (&URL_SAFE, "url", true),
            (&URL_SAFE_NO_PAD, "url unpadded", false),
        ];
        for v in VALUES {
            let s = masked(&[v]);
            let vb = v.as_bytes();
            for prefix in ["", "x", "xy", "xyz", "user:"] {
                for suffix in ["", "\"", "-tail", "}\n"] {
                    for (engine, name, padded) in engines {
                        let plain = [prefix.as_bytes(), vb, suffix.as_bytes()].concat();
                        let blob = engine.encode(&plain);
                        let out = s.scrub(blob.as_bytes()).into_owned();
                        let what = format!("{name} {prefix:?}+value({})+{suffix:?}", vb.len());
                        let decoded = engine
                            .decode(&out)
                            .unwrap_or_else(|e| panic!("{what}: {e}: {}", blob));
                        assert!(!has(&decoded, vb), "{what}: value left");
                        let aligned = prefix.len() % 3 == 0 && vb.len() % 3 == 0;
                        // The exact padded encoding ends the blob; whole groups on both sides.
                        let exact = prefix.len() % 3 == 0
                            && suffix.is_empty()
                            && padded
                            && vb.len() % 3 != 0;
                        if exact || aligned {
                            let want =
                                [prefix.as_bytes(), MASKED.as_bytes(), suffix.as_bytes()].concat();
                            assert_eq!(decoded, want, "{what}");
                            continue;
                        }
                        assert_eq!(decoded.len(), plain.len(), "{what}");
                        assert!(decoded.starts_with(prefix.as_bytes()), "{what}");
                        assert!(decoded.ends_with(suffix.as_bytes()), "{what}");
                        // The value's bytes are zeros, bar the first and last (boundary bits).
                        let mid = &decoded[prefix.len() + 1..prefix.len() + vb.len() - 1];
                        assert!(mid.iter().all(|&b| b == 0), "{what}: {mid:?}");
                    }
                }
            }
        }
    }

    /// A base64 blob put in a URL (percent-encoded) or a PHP JSON string (`\/`): found, and
    /// it still decodes, without the value, once the outer encoding is undone.
    #[test]
    fn base64_written_again_in_a_url_or_json() {
        let mut exercised = 0;
        for v in VALUES {
            let s = masked(&[v]);
            for prefix in ["", "user:", "x"] {
                let blob = STANDARD.encode([prefix.as_bytes(), v.as_bytes()].concat());
                if !blob.contains(['+', '/', '=']) {
                    continue;
                }
                exercised += 1;
                let lower = |t: String| {
                    t.replace("%2B", "%2b")
                        .replace("%2F", "%2f")
                        .replace("%3D", "%3d")
                };
                let undo_pct = |t: &str| {
                    t.replace("%2B", "+")
                        .replace("%2b", "+")
                        .replace("%2F", "/")
                        .replace("%2f", "/")
                        .replace("%3D", "=")
                        .replace("%3d", "=")
                };
                let upper = percent_encode(blob.as_bytes(), Keep::Alphanumeric);
                for (written, undo) in [
                    (upper.clone(), &undo_pct as &dyn Fn(&str) -> String),
                    (lower(upper), &undo_pct),
                    (blob.replace('/', "\\/"), &|t: &str| t.replace("\\/", "/")),
                ] {
                    let out = s.scrub_str(&written);
                    assert_ne!(out, written, "{prefix:?} {written}");
                    let decoded = STANDARD.decode(undo(&out)).unwrap();
                    assert!(!has(&decoded, v.as_bytes()), "{written} -> {out}");
                    assert!(decoded.starts_with(prefix.as_bytes()));
                }
            }
        }
        assert!(exercised >= 3, "{exercised}");
    }

    #[test]
    fn short_values_are_not_searched_in_base64() {
        let short = "k7Qz9pA"; // 7 bytes
        assert_eq!(short.len(), MIN_BASE64_LEN - 1);
        let s = masked(&[short]);
        let b = STANDARD.encode(short);
        assert_eq!(&*s.scrub(b.as_bytes()), b.as_bytes());
        assert!(
            forms_of(short.as_bytes(), Forms::ALL)
                .iter()
                .all(|sp| sp.form != Form::Base64)
        );
        let long = "k7Qz9pAx";
        let s = masked(&[long]);
        assert_ne!(
            &*s.scrub(STANDARD.encode(long).as_bytes()),
            STANDARD.encode(long).as_bytes()
        );
    }

    /// The marker clients get the marker's own spellings: base64 of the marker where exact.
    #[test]
    fn marker_spellings() {
        let v = VALUES[1];
        let s = Scrubber::for_value(v, Forms::ALL, MARKER).unwrap();
        assert_eq!(
            STANDARD
                .decode(s.scrub(STANDARD.encode(v).as_bytes()))
                .unwrap(),
            MARKER.as_bytes()
        );
        let pct = percent_encode(v.as_bytes(), Keep::Alphanumeric);
        assert_eq!(
            s.scrub_str(&pct),
            percent_encode(MARKER.as_bytes(), Keep::Alphanumeric)
        );
    }

    /// The streaming rewriter over every spelling: every split of the input into two chunks,
    /// and one byte at a time, gives the one-shot result.
    #[test]
    fn every_two_chunk_split_of_every_spelling() {
        for v in VALUES {
            let s = masked(&[v]);
            let mut input = b"start ".to_vec();
            for sp in forms_of(v.as_bytes(), Forms::ALL) {
                input.extend_from_slice(&sp.bytes);
                input.extend_from_slice(b" | ");
            }
            let blob = STANDARD.encode([b"xy", v.as_bytes(), b"-tail"].concat());
            input.extend_from_slice(blob.as_bytes());
            let want = s.scrub(&input).into_owned();
            assert!(!has(&want, v.as_bytes()));
            let run = |chunks: &[&[u8]]| {
                let mut rw = s.stream();
                let mut out = Vec::new();
                let mut forms = Vec::new();
                for c in chunks {
                    out.extend_from_slice(
                        &rw.push(bytes::Bytes::copy_from_slice(c), &mut |id, _| {
                            forms.push(s.form_of(id))
                        }),
                    );
                    assert!(rw.held() < s.lookahead());
                }
                out.extend_from_slice(&rw.finish(&mut |id, _| forms.push(s.form_of(id))));
                (out, forms)
            };
            let (_, all_forms) = run(&[&input]);
            for i in 0..=input.len() {
                let (out, forms) = run(&[&input[..i], &input[i..]]);
                assert_eq!(out, want, "split at {i}");
                assert_eq!(forms, all_forms, "split at {i}");
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(run(&bytes).0, want);
        }
    }
}
