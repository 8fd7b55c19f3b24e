//! The token table: masked token → (real value, hosts it may go to).
//!
//! Readers (every request) take an immutable [`Snapshot`] with both automata precompiled:
//! masked tokens (for swapping out) and real values (for scrubbing back). Writers rebuild the
//! snapshot; inserts are rare (start-up, short-lived token issue), requests are not.

use std::sync::{Arc, RwLock};

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
    #[error("{0}")]
    Build(#[from] RewriteError),
    #[error("{0}")]
    Scrub(#[from] ScrubError),
}

struct Entry {
    name: String,
    masked: String,
    secret: Secret,
    /// Empty = any host the connection rules allow (KeyZero behaviour).
    hosts: Vec<ScopePattern>,
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

/// Swapping decisions for one verified host: masked → real when in scope, else kept masked.
pub struct SwapPlan {
    snap: Arc<Snapshot>,
    in_scope: Vec<bool>,
}

impl SwapPlan {
    pub fn new(snap: Arc<Snapshot>, host: &str) -> Self {
        let in_scope = (0..snap.entries.len())
            .map(|i| snap.in_scope(i, host))
            .collect();
        Self { snap, in_scope }
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    pub fn patterns(&self) -> &Arc<Patterns> {
        &self.snap.masked
    }
}

impl Decide for SwapPlan {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        if self.in_scope.get(id).copied().unwrap_or(false) {
            self.snap
                .entries
                .get(id)
                .map(|e| e.secret.expose().as_bytes())
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

    /// Adds `masked` → `secret`, allowed to go to `hosts` (`name`, `*.suffix`, IP literal).
    /// An empty `hosts` list means any host the connection rules allow (KeyZero behaviour).
    pub fn insert(
        &self,
        masked: &str,
        secret: Secret,
        hosts: Vec<String>,
    ) -> Result<(), TokenError> {
        self.insert_named(masked, masked, secret, hosts)
    }

    /// Same as [`insert`](Self::insert), with a name for audit records (e.g. `OPENAI_API_KEY`).
    pub fn insert_named(
        &self,
        name: &str,
        masked: &str,
        secret: Secret,
        hosts: Vec<String>,
    ) -> Result<(), TokenError> {
        if masked.len() < 8 || !masked.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadToken(masked.to_owned()));
        }
        if secret.is_empty()
            || secret
                .expose()
                .bytes()
                .any(|b| matches!(b, b'\r' | b'\n' | 0))
        {
            return Err(TokenError::BadValue(masked.to_owned()));
        }
        let hosts = hosts
            .iter()
            .map(|h| {
                ScopePattern::parse(h).map_err(|_| TokenError::BadScope {
                    token: masked.to_owned(),
                    host: h.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if guard.entries.iter().any(|e| e.masked == masked) {
            return Err(TokenError::Duplicate(masked.to_owned()));
        }
        let mut entries: Vec<Entry> = guard
            .entries
            .iter()
            .map(|e| Entry {
                name: e.name.clone(),
                masked: e.masked.clone(),
                secret: e.secret.clone(),
                hosts: e.hosts.clone(),
            })
            .collect();
        entries.push(Entry {
            name: name.to_owned(),
            masked: masked.to_owned(),
            secret,
            hosts,
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
            .map(|e| Entry {
                name: e.name.clone(),
                masked: e.masked.clone(),
                secret: e.secret.clone(),
                hosts: e.hosts.clone(),
            })
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
        let plan = SwapPlan::new(snap.clone(), "api.openai.com");
        let hay = format!("Bearer {m}");
        let mut seen = Vec::new();
        let out = snap
            .masked
            .rewrite_all(hay.as_bytes(), &plan, &mut |id, r| seen.push((id, r)))
            .unwrap();
        assert_eq!(out, b"Bearer sk-real-1");
        let other = SwapPlan::new(snap.clone(), "evil.com");
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
