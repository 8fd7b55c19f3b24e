//! Audit: one record per decision, swap, block and denial; never a value.
//!
//! Producers (PDP, proxy, interception, MCP) build an [`AuditEvent`] and hand it to an
//! [`AuditSink`]. The sink owns ordering and the keyed chain, so producers stay simple.
//!
//! - `chain`: the JSONL sink (HMAC-SHA-256 chain, rotation with count and age caps);
//! - `key`: the chain's key, where it lives and how it is made;
//! - `ledger`: which logs kz has keyed, so a log rewritten wholly as unkeyed is caught;
//! - `location`: where the log and the key live, and opening them so the agent cannot
//!   redirect or replace either (`O_NOFOLLOW`, directories only root can write);
//! - `verify`: `kz audit verify`, which names the first record that fails and why.
//!
//! The format, the key's location and what verification proves: docs/audit.md.

use std::borrow::Cow;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// What happened, with its details. `kind` is a stable snake_case name
/// (`decision`, `proxy_request`, `token_out_of_scope`, `connect_blocked`, `mcp_call`, …).
/// `fields` must never contain a secret value: callers put names of secrets, never contents.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub kind: &'static str,
    pub fields: Fields,
}

impl AuditEvent {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            fields: Fields::default(),
        }
    }

    /// Builder-style field setter.
    pub fn with(mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Value>) -> Self {
        self.fields.insert(key, value.into());
        self
    }
}

/// An audit record's fields: a list that a later `insert` of the same key overrides, written
/// with its keys sorted (the chain's canonical form, the same bytes as a `serde_json::Map`).
/// Why not a map: the proxy builds one record per request, and a `BTreeMap` of owned keys cost
/// it an allocation per field plus the tree's nodes; here a literal key allocates nothing and
/// the one sort happens when the record is written.
#[derive(Debug, Clone, Default)]
pub struct Fields(Vec<(Cow<'static, str>, Value)>);

impl Fields {
    /// Sets `key`, overriding an earlier value (which stays in the list, unwritten: records
    /// set each key a fixed number of times, so appending beats searching).
    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: Value) {
        self.0.push((key.into(), value));
    }

    /// Sets `key` only if nothing set it yet.
    pub fn insert_if_absent(&mut self, key: Cow<'static, str>, value: impl FnOnce() -> Value) {
        if !self.contains_key(&key) {
            self.0.push((key, value()));
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    pub fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    /// The current value of every key, sorted by key.
    pub fn sorted(&self) -> Vec<(&str, &Value)> {
        let mut v: Vec<(&str, &Value)> = self.0.iter().map(|(k, v)| (k.as_ref(), v)).collect();
        // Stable: of equal keys the last set stays last, and dedup keeps the first of a run.
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.reverse();
        v.dedup_by(|a, b| a.0 == b.0);
        v.reverse();
        v
    }

    /// Every entry as set, in order (an overridden key appears more than once).
    pub fn iter(&self) -> impl Iterator<Item = (&Cow<'static, str>, &Value)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.sorted() == other.sorted()
    }
}

impl std::ops::Index<&str> for Fields {
    type Output = Value;
    /// `Value::Null` for a key that is not set, as `serde_json::Value` indexes.
    fn index(&self, key: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.get(key).unwrap_or(&NULL)
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sorted = self.sorted();
        let mut m = s.serialize_map(Some(sorted.len()))?;
        for (k, v) in sorted {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit log {path}: {source}; check the path and its permissions")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the audit log {path} ends with a damaged record ({reason}); run `kz audit verify {path}` and move the file aside before restarting"
    )]
    DamagedTail { path: String, reason: String },
    #[error(
        "the audit log {path} ends with a record whose MAC does not match the audit key ({key}): it was written with another key, or edited. Run `kz audit verify {path}` (with `--key FILE` for another key), then move the file aside to start a new chain"
    )]
    ForeignTail { path: String, key: String },
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Where audit events go. Implementations must be cheap to call from hot paths (the proxy calls
/// it once per request) and must serialise appends so the hash chain stays linear.
pub trait AuditSink: Send + Sync {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError>;
}

mod chain;
mod key;
mod ledger;
mod location;
#[cfg(any(test, feature = "testing"))]
mod memory;
mod verify;

#[cfg(any(test, feature = "testing"))]
pub use memory::MemorySink;

pub(crate) use chain::rfc3339_now;
pub use chain::{
    ChainSink, DEFAULT_MAX_AGE_DAYS, DEFAULT_MAX_FILES, Fsync, GENESIS, PRUNED_KIND, Rotation,
    SinkTarget, UPGRADE_KIND, rotated_files,
};
pub use key::{AuditKey, KeyError};
pub use location::{LocationError, ROOT_STATE_DIR, default_key_path, default_log_path, state_dir};
pub use verify::{Problem, VerifyError, VerifyReport, verify_files, verify_path, verify_path_with};

/// A sink that drops everything (no `audit:` section in the bundle).
#[derive(Debug, Default)]
pub struct NullSink;

impl AuditSink for NullSink {
    fn record(&self, _event: AuditEvent) -> Result<(), AuditError> {
        Ok(())
    }
}

/// Adds `context` (e.g. a run's id, program and mode) to every record that does not set those
/// keys itself, then passes it on.
pub struct WithContext {
    pub inner: std::sync::Arc<dyn AuditSink>,
    pub context: Fields,
}

impl AuditSink for WithContext {
    fn record(&self, mut event: AuditEvent) -> Result<(), AuditError> {
        for (k, v) in self.context.iter() {
            event.fields.insert_if_absent(k.clone(), || v.clone());
        }
        self.inner.record(event)
    }
}

/// Fans one event out to several sinks (file and stdout).
pub struct MultiSink(pub Vec<std::sync::Arc<dyn AuditSink>>);

impl AuditSink for MultiSink {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let mut result = Ok(());
        for sink in &self.0 {
            if let Err(e) = sink.record(event.clone()) {
                result = Err(e);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[test]
    fn fields_serialise_as_the_map_verify_reads_back() {
        // Unsorted keys, an override, and strings that need escaping: the bytes must be the
        // ones a `serde_json::Map` with the same final contents gives, or chains would not verify.
        let mut f = Fields::default();
        let mut m = Map::new();
        for (k, v) in [
            ("status", Value::from(200)),
            ("host", Value::from("api.example.com")),
            ("path", Value::from("/a?\"q\"=\u{1}\n")),
            ("status", Value::from(502)),
            ("é", Value::from(vec!["x", "y"])),
            ("bytes_up", Value::from(0)),
            ("Host", Value::Null),
        ] {
            f.insert(k, v.clone());
            m.insert(k.to_owned(), v);
        }
        f.insert(String::from("dynamic"), Value::from(1.5));
        m.insert("dynamic".into(), Value::from(1.5));
        assert_eq!(
            serde_json::to_vec(&f).unwrap(),
            serde_json::to_vec(&m).unwrap()
        );
        assert_eq!(serde_json::to_value(&f).unwrap(), Value::Object(m));
        assert_eq!(f["status"], 502);
        assert_eq!(f["missing"], Value::Null);
        assert_eq!(f.sorted().len(), 7);
    }

    #[test]
    fn insert_if_absent_keeps_what_is_set_and_remove_drops_every_copy() {
        let mut f = Fields::default();
        f.insert("mode", "transparent".into());
        f.insert_if_absent("mode".into(), || "kernel".into());
        f.insert_if_absent("run".into(), || "run-1".into());
        assert_eq!(f["mode"], "transparent");
        assert_eq!(f["run"], "run-1");
        f.insert("mode", "explicit".into());
        f.remove("mode");
        assert!(!f.contains_key("mode"));
        let mut g = Fields::default();
        g.insert("run", "run-1".into());
        assert_eq!(f, g);
    }
}
