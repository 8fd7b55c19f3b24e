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
    #[error(
        "the audit log {path} ends with a damaged record ({reason}); run `kz audit verify {path}` and move the file aside before restarting"
    )]
    DamagedTail { path: String, reason: String },
}

/// Where audit events go. Implementations must be cheap to call from hot paths (the proxy calls
/// it once per request) and must serialise appends so the hash chain stays linear.
pub trait AuditSink: Send + Sync {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError>;
}

mod chain;
mod verify;

pub use chain::{ChainSink, Fsync, GENESIS, SinkTarget};
pub use verify::{VerifyError, VerifyReport, verify_files, verify_path};

/// A sink that drops everything (no `audit:` section in the bundle).
#[derive(Debug, Default)]
pub struct NullSink;

impl AuditSink for NullSink {
    fn record(&self, _event: AuditEvent) -> Result<(), AuditError> {
        Ok(())
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
