//! Audit: one record per decision, swap, block and denial; never a value.
//!
//! Producers (PDP, proxy, interception, MCP) build an [`AuditEvent`] and hand it to an
//! [`AuditSink`]. The sink owns ordering and the hash chain, so producers stay simple.

use serde_json::{Map, Value};

/// What happened, with its details. `kind` is a stable snake_case name
/// (`decision`, `proxy_request`, `token_out_of_scope`, `connect_blocked`, `mcp_call`, …).
/// `fields` must never contain a secret value: callers put names of secrets, never contents.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub kind: &'static str,
    pub fields: Map<String, Value>,
}

impl AuditEvent {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            fields: Map::new(),
        }
    }

    /// Builder-style field setter.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit log {path}: {source}; check the path and its permissions")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Where audit events go. Implementations must be cheap to call from hot paths (the proxy calls
/// it once per request) and must serialise appends so the hash chain stays linear.
pub trait AuditSink: Send + Sync {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError>;
}
