//! The token table: masked token → (real value, hosts it may go to, where in a request it may
//! be swapped, whether it must be present, whether cleartext HTTP may carry it).
//!
//! Readers (every request) take an immutable [`Snapshot`] with both automata precompiled:
//! masked tokens (for swapping out) and real values (for scrubbing back). Writers rebuild the
//! snapshot; inserts are rare (start-up, short-lived token issue), requests are not.

use std::sync::{Arc, RwLock};

use crate::egress::location::Places;
use crate::egress::rewrite::{Decide, Patterns, RewriteError, StreamRewriter};
use crate::egress::scope::ScopePattern;
use crate::egress::scrub::{self, Forms, Replacement, ScrubError};
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "masked token `{0}` is unusable: tokens must be at least 8 printable ASCII characters without spaces"
    )]
    BadToken(String),
    #[error(
        "the value for token `{0}` is empty or contains CR, LF or NUL; such a value cannot be sent in an HTTP header"
    )]
    BadValue(String),
    #[error("token `{0}` is already in the table; each secret needs its own masked token")]
    Duplicate(String),
    #[error("scope host `{host}` for token `{token}` is invalid: use `name`, `*.suffix` or an IP")]
    BadScope { token: String, host: String },
    #[error(
        "secret `{0}` has `require = true` but no hosts: list the hosts that must receive it, or drop `require`"
    )]
    RequireWithoutHosts(String),
    #[error(
        "secret `{0}` has `require = true` but its credential_location is body only: a required token must be in the request head (a header, basic, query or path)"
    )]
    RequireInBody(String),
    #[error("{0}")]
    Build(#[from] RewriteError),
    #[error("{0}")]
    Scrub(#[from] ScrubError),
}

#[derive(Clone)]
struct Entry {
    name: String,
    masked: String,
    secret: Secret,
    /// Empty = any host the connection rules allow (KeyZero behaviour).
    hosts: Vec<ScopePattern>,
    places: Places,
    require: bool,
    allow_plaintext: bool,
}

/// One secret for [`TokenTable::add`].
#[derive(Clone)]
pub struct TokenSpec {
    /// For audit records (e.g. `OPENAI_API_KEY`); never the value.
    pub name: String,
    pub masked: String,
    pub secret: Secret,
    /// `name`, `*.suffix` or an IP literal; empty = any host the connection rules allow.
    pub hosts: Vec<String>,
    /// Where in a request the token may be swapped (default: headers only).
    pub places: Places,
    /// A request to one of `hosts` must carry the token in one of `places` (in the head), or it
    /// is refused: a real key the agent got hold of some other way cannot be used there.
    pub require: bool,
    /// The real value may go over cleartext HTTP (default: only over TLS).
    pub allow_plaintext: bool,
}

impl TokenSpec {
    /// Defaults for everything but the name, token, value and hosts.
    pub fn new(name: &str, masked: &str, secret: Secret, hosts: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            masked: masked.to_owned(),
            secret,
            hosts,
            places: Places::default(),
            require: false,
            allow_plaintext: false,
        }
    }
}

/// Why a masked token found in a request was left masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unswapped {
    /// The verified host is not in the secret's scope.
    OutOfScope,
    /// The request goes over cleartext HTTP and the secret does not say `allow_plaintext`.
    Plaintext,
    /// The token is somewhere its `credential_location` does not name.
    Misplaced,
}

impl Unswapped {
    /// The stable name in audit records.
    pub fn error(self) -> &'static str {
        match self {
            Self::OutOfScope => "token_out_of_scope",
            Self::Plaintext => "token_plaintext",
            Self::Misplaced => "token_misplaced",
        }
    }
}

/// One consistent view of the table.
pub struct Snapshot {
    entries: Vec<Entry>,
    masked: Arc<Patterns>,
    /// Real values → masked tokens (the egress scrubber with the token replacement policy).
    real: scrub::Scrubber,
    version: u64,
}

impl Snapshot {
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The secret's name (for audit records; never its value).
    pub fn name(&self, id: usize) -> &str {
        self.entries.get(id).map_or("?", |e| e.name.as_str())
    }

    /// The name of the secret a scrub match belongs to: scrubbers report pattern ids, and a
    /// value may have several patterns (its encoded forms, issue 14).
    pub fn scrubbed_name(&self, pattern: usize) -> &str {
        self.name(self.real.value_of(pattern))
    }

    /// Which spelling of the value a scrub match was (`raw`, `base64`, …; the audit record's
    /// `form`).
    pub fn scrubbed_form(&self, pattern: usize) -> &'static str {
        self.real.form_of(pattern).as_str()
    }

    pub fn in_scope(&self, id: usize, host: &str) -> bool {
        self.entries
            .get(id)
            .is_some_and(|e| e.hosts.is_empty() || e.hosts.iter().any(|p| p.matches(host)))
    }

    /// True when at least one token may be swapped for `host`.
    pub fn any_in_scope(&self, host: &str) -> bool {
        (0..self.entries.len()).any(|i| self.in_scope(i, host))
    }
}

/// Swapping decisions for one verified host: masked → real when in scope (and, over cleartext
/// HTTP, allowed there), else kept masked. Where in the request a token may be swapped is asked
/// per place ([`SwapPlan::at`]).
pub struct SwapPlan {
    snap: Arc<Snapshot>,
    /// `None`: may be swapped toward this host; else why not.
    blocked: Vec<Option<Unswapped>>,
    /// Tokens that must be present in the head of a request to this host.
    required: Vec<usize>,
}

/// A place in a request, for [`SwapPlan::at`].
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    /// A header (or trailer) and its whole value.
    Header(&'a http::HeaderName, &'a [u8]),
    /// The decoded `user:password` of `Authorization: Basic`.
    Basic,
    /// The value of a query parameter (its raw name).
    Query(&'a [u8]),
    Path,
    Body,
}

impl SwapPlan {
    /// The plan toward `host`; `plaintext`: the request goes over cleartext HTTP.
    pub fn new(snap: Arc<Snapshot>, host: &str, plaintext: bool) -> Self {
        let blocked = snap
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if !snap.in_scope(i, host) {
                    Some(Unswapped::OutOfScope)
                } else if plaintext && !e.allow_plaintext {
                    Some(Unswapped::Plaintext)
                } else {
                    None
                }
            })
            .collect();
        let required = snap
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.require && e.hosts.iter().any(|p| p.matches(host)))
            .map(|(i, _)| i)
            .collect();
        Self {
            snap,
            blocked,
            required,
        }
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    pub fn patterns(&self) -> &Arc<Patterns> {
        &self.snap.masked
    }

    /// The decisions for tokens found at `at`.
    pub fn at<'a>(&'a self, at: At<'a>) -> PlaceDecide<'a> {
        PlaceDecide { plan: self, at }
    }

    /// Why token `id`, found at a place its secret does not allow or toward a host it may not
    /// go to, was left masked. (Only meaningful for a token that was not swapped.)
    pub fn why_unswapped(&self, id: usize) -> Unswapped {
        self.blocked
            .get(id)
            .copied()
            .flatten()
            .unwrap_or(Unswapped::Misplaced)
    }

    /// The secrets whose token must be in the head of every request to this host.
    pub fn required(&self) -> &[usize] {
        &self.required
    }

    /// Whether a body can need a swap at all toward this host (some token may go there and
    /// may be swapped in a body).
    pub fn body_swaps(&self) -> bool {
        self.snap
            .entries
            .iter()
            .zip(&self.blocked)
            .any(|(e, b)| b.is_none() && e.places.body())
    }

    fn allows(&self, id: usize, at: At<'_>) -> bool {
        let Some(e) = self.snap.entries.get(id) else {
            return false;
        };
        if self.blocked.get(id).copied().flatten().is_some() {
            return false;
        }
        match at {
            At::Header(name, value) => e.places.header(name, value, e.masked.as_bytes()),
            At::Basic => e.places.basic(),
            At::Query(param) => e.places.query(param),
            At::Path => e.places.path(),
            At::Body => e.places.body(),
        }
    }

    fn real(&self, id: usize) -> Option<&[u8]> {
        self.snap
            .entries
            .get(id)
            .map(|e| e.secret.expose().as_bytes())
    }
}

/// [`SwapPlan`]'s decisions at one place of a request.
pub struct PlaceDecide<'a> {
    plan: &'a SwapPlan,
    at: At<'a>,
}

impl Decide for PlaceDecide<'_> {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        if self.plan.allows(id, self.at) {
            self.plan.real(id)
        } else {
            None
        }
    }
}

/// The body's decisions, owned (a streamed body outlives the request's borrow of the plan).
#[derive(Clone)]
pub struct BodySwap(pub Arc<SwapPlan>);

impl Decide for BodySwap {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        if self.0.allows(id, At::Body) {
            self.0.real(id)
        } else {
            None
        }
    }
}

/// Reusable scrubber (real values → masked tokens) over one snapshot of the table: the proxy
/// uses it on responses. A thin view of the snapshot's [`scrub::Scrubber`].
#[derive(Clone)]
pub struct Scrubber {
    snap: Arc<Snapshot>,
}

impl Scrubber {
    /// A scrubber over one snapshot of the table.
    pub fn for_snapshot(snap: Arc<Snapshot>) -> Self {
        Self { snap }
    }

    /// Scrubs a complete buffer. Borrowed when nothing needed scrubbing.
    pub fn scrub<'a>(&self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        self.snap.real.scrub(data)
    }

    /// A streaming scrubber for one body: push chunks, then `finish`. It reports pattern ids
    /// ([`Snapshot::scrubbed_name`]).
    pub fn stream(&self) -> StreamRewriter {
        self.snap.real.stream()
    }

    /// Scrubs one complete value (a header); `seen` gets the secret's name and the spelling
    /// found per occurrence.
    pub fn rewrite_value(
        &self,
        v: &[u8],
        seen: &mut dyn FnMut(&str, &'static str),
    ) -> Option<Vec<u8>> {
        self.snap.real.rewrite_value(v, &mut |id| {
            seen(self.snap.scrubbed_name(id), self.snap.scrubbed_form(id))
        })
    }

    /// Names of the secrets found in `data` (for audit records).
    pub fn found(&self, data: &[u8]) -> Vec<String> {
        let mut v: Vec<String> = self
            .snap
            .real
            .found(data)
            .into_iter()
            .map(|i| self.snap.name(i).to_owned())
            .collect();
        v.dedup();
        v
    }
}

/// The table shared by the proxy and whoever fills it (`kz run`, the PDP's token issuer).
#[derive(Clone)]
pub struct TokenTable {
    inner: Arc<RwLock<Arc<Snapshot>>>,
}

impl Default for TokenTable {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenTable {
    pub fn new() -> Self {
        let empty = Snapshot {
            entries: Vec::new(),
            masked: Arc::new(Patterns::empty()),
            real: scrub::Scrubber::empty(),
            version: 0,
        };
        Self {
            inner: Arc::new(RwLock::new(Arc::new(empty))),
        }
    }

    /// A fresh masked token: `kz_masked_` + 32 lowercase hex (128 random bits).
    pub fn generate_masked() -> String {
        let bytes: [u8; 16] = rand::random();
        format!("kz_masked_{}", hex::encode(bytes))
    }

    /// Adds `masked` → `secret`, allowed to go to `hosts` (`name`, `*.suffix`, IP literal), in
    /// headers only. An empty `hosts` list means any host the connection rules allow (KeyZero
    /// behaviour).
    pub fn insert(
        &self,
        masked: &str,
        secret: Secret,
        hosts: Vec<String>,
    ) -> Result<(), TokenError> {
        self.add(TokenSpec::new(masked, masked, secret, hosts))
    }

    /// Same as [`insert`](Self::insert), with a name for audit records (e.g. `OPENAI_API_KEY`).
    pub fn insert_named(
        &self,
        name: &str,
        masked: &str,
        secret: Secret,
        hosts: Vec<String>,
    ) -> Result<(), TokenError> {
        self.add(TokenSpec::new(name, masked, secret, hosts))
    }

    /// Adds one secret with all its settings.
    pub fn add(&self, spec: TokenSpec) -> Result<(), TokenError> {
        let TokenSpec {
            name,
            masked,
            secret,
            hosts,
            places,
            require,
            allow_plaintext,
        } = spec;
        if masked.len() < 8 || !masked.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadToken(masked));
        }
        if secret.is_empty()
            || secret
                .expose()
                .bytes()
                .any(|b| matches!(b, b'\r' | b'\n' | 0))
        {
            return Err(TokenError::BadValue(masked));
        }
        if require && hosts.is_empty() {
            return Err(TokenError::RequireWithoutHosts(name));
        }
        if require && !places.in_head() {
            return Err(TokenError::RequireInBody(name));
        }
        let hosts = hosts
            .iter()
            .map(|h| {
                ScopePattern::parse(h).map_err(|_| TokenError::BadScope {
                    token: masked.clone(),
                    host: h.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if guard.entries.iter().any(|e| e.masked == masked) {
            return Err(TokenError::Duplicate(masked));
        }
        let mut entries = guard.entries.clone();
        entries.push(Entry {
            name,
            masked,
            secret,
            hosts,
            places,
            require,
            allow_plaintext,
        });
        let next = build(entries, guard.version + 1)?;
        *guard = Arc::new(next);
        Ok(())
    }

    /// Removes a token (e.g. an expired short-lived one). Returns whether it was present.
    pub fn remove(&self, masked: &str) -> Result<bool, TokenError> {
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if !guard.entries.iter().any(|e| e.masked == masked) {
            return Ok(false);
        }
        let entries: Vec<Entry> = guard
            .entries
            .iter()
            .filter(|e| e.masked != masked)
            .cloned()
            .collect();
        let next = build(entries, guard.version + 1)?;
        *guard = Arc::new(next);
        Ok(true)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A scrubber over the current contents (call again after inserts to pick them up).
    pub fn scrubber(&self) -> Scrubber {
        Scrubber::for_snapshot(self.snapshot())
    }
}

fn build(entries: Vec<Entry>, version: u64) -> Result<Snapshot, TokenError> {
    let masked = Patterns::new(
        entries
            .iter()
            .map(|e| e.masked.as_bytes().to_vec().into_boxed_slice())
            .collect(),
    )?;
    // Every spelling (raw, percent-encoded, JSON-escaped, base64): an upstream echoing a value
    // encoded hands it back as surely as one echoing it raw. Each is replaced by the same
    // spelling of the masked token where the encoding allows (`egress::scrub` docs).
    let real = scrub::Scrubber::new(
        entries.iter().map(|e| e.secret.expose().as_bytes()),
        Forms::ALL,
        Replacement::Tokens(
            entries
                .iter()
                .map(|e| e.masked.as_bytes().to_vec().into_boxed_slice())
                .collect(),
        ),
    )?;
    Ok(Snapshot {
        entries,
        masked: Arc::new(masked),
        real,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_and_swap() {
        let t = TokenTable::new();
        let m = TokenTable::generate_masked();
        assert_eq!(m.len(), 42);
        t.insert_named(
            "OPENAI",
            &m,
            Secret::new("sk-real-1"),
            vec!["api.openai.com".into()],
        )
        .unwrap();
        let snap = t.snapshot();
        let plan = SwapPlan::new(snap.clone(), "api.openai.com", false);
        let auth = http::header::AUTHORIZATION;
        let plan = plan.at(At::Header(&auth, b""));
        let hay = format!("Bearer {m}");
        let mut seen = Vec::new();
        let out = snap
            .masked
            .rewrite_all(hay.as_bytes(), &plan, &mut |id, r| seen.push((id, r)))
            .unwrap();
        assert_eq!(out, b"Bearer sk-real-1");
        let other = SwapPlan::new(snap.clone(), "evil.com", false);
        let other = other.at(At::Header(&auth, b""));
        assert!(
            snap.masked
                .rewrite_all(hay.as_bytes(), &other, &mut |_, r| assert!(!r))
                .is_none()
        );
        assert_eq!(
            &*t.scrubber().scrub(b"x sk-real-1 y"),
            format!("x {m} y").as_bytes()
        );
        assert_eq!(t.scrubber().found(b"sk-real-1"), vec!["OPENAI".to_string()]);
    }

    #[test]
    fn bad_input_is_rejected() {
        let t = TokenTable::new();
        assert!(matches!(
            t.insert("short", Secret::new("v"), vec![]),
            Err(TokenError::BadToken(_))
        ));
        assert!(matches!(
            t.insert("kz_masked_0123456789", Secret::new("a\nb"), vec![]),
            Err(TokenError::BadValue(_))
        ));
        t.insert("kz_masked_0123456789", Secret::new("ok"), vec![])
            .unwrap();
        assert!(matches!(
            t.insert("kz_masked_0123456789", Secret::new("ok"), vec![]),
            Err(TokenError::Duplicate(_))
        ));
        assert!(t.remove("kz_masked_0123456789").unwrap());
        assert!(t.snapshot().is_empty());
        // The error never carries the value.
        let e = t
            .insert("kz_masked_x1234567", Secret::new("top\rsecret"), vec![])
            .unwrap_err();
        assert!(!e.to_string().contains("secret"));
    }
}
