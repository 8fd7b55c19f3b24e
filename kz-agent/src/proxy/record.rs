//! One audit record per request, written when the exchange is over.
//!
//! The request handler, the request body and the response body each hold an `Arc<Record>`;
//! the last one dropped (normally the response body at end of stream) writes the record, so the
//! byte counts and duration cover the whole exchange even for long streams.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use super::Shared;
use super::metrics::Metrics;
use super::tokens::Unswapped;
use crate::audit::{AuditEvent, AuditSink};

#[derive(Default)]
pub struct Fields {
    pub host: String,
    pub port: u16,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub mode: &'static str,
    pub protocol: &'static str,
    pub swapped: BTreeSet<String>,
    pub out_of_scope: BTreeSet<String>,
    pub scrubbed: BTreeSet<String>,
    /// (secret, spelling) pairs of what was scrubbed: `raw`, `percent`, `json`, `base64`…
    pub scrubbed_forms: BTreeSet<(String, &'static str)>,
    pub error: Option<String>,
    pub refused: bool,
    /// Why the first token left masked was (see [`Record::unswapped`]).
    pub unswapped: Option<Unswapped>,
}

pub struct Record {
    shared: Arc<Shared>,
    /// The session's sink.
    audit: Arc<dyn AuditSink>,
    started: Instant,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub fields: Mutex<Fields>,
    /// Dropped with the record (e.g. the connection's in-flight counter).
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Record {
    pub fn new(
        shared: Arc<Shared>,
        audit: Arc<dyn AuditSink>,
        fields: Fields,
        guard: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            shared,
            audit,
            started: Instant::now(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            fields: Mutex::new(fields),
            _guard: guard,
        })
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Fields) -> R) -> R {
        let mut g = self.fields.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Notes a swap (`replaced`) or an out-of-scope token for secret `name`.
    pub fn token(&self, name: &str, replaced: bool) {
        let m = &self.shared.metrics;
        if replaced {
            Metrics::inc(&m.tokens_swapped_total);
        } else {
            Metrics::inc(&m.tokens_out_of_scope_total);
        }
        self.with(|f| {
            let set = if replaced {
                &mut f.swapped
            } else {
                &mut f.out_of_scope
            };
            if !set.contains(name) {
                set.insert(name.to_owned());
            }
        });
    }

    /// Notes a token of secret `name` left masked, and why.
    pub fn unswapped(&self, name: &str, why: Unswapped) {
        self.token(name, false);
        self.with(|f| {
            f.unswapped.get_or_insert(why);
        });
    }

    /// Notes that secret `name` was scrubbed from the response, found spelled as `form`.
    pub fn scrubbed(&self, name: &str, form: &'static str) {
        Metrics::inc(&self.shared.metrics.secrets_scrubbed_total);
        self.with(|f| {
            if !f.scrubbed.contains(name) {
                f.scrubbed.insert(name.to_owned());
            }
            if !f
                .scrubbed_forms
                .iter()
                .any(|(n, s)| n == name && *s == form)
            {
                f.scrubbed_forms.insert((name.to_owned(), form));
            }
        });
    }
}

fn list(s: &mut BTreeSet<String>) -> Value {
    Value::Array(std::mem::take(s).into_iter().map(Value::String).collect())
}

impl Drop for Record {
    fn drop(&mut self) {
        let f = self.fields.get_mut().unwrap_or_else(|p| p.into_inner());
        let up = self.bytes_up.load(Ordering::Relaxed);
        let down = self.bytes_down.load(Ordering::Relaxed);
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        // The fields are the record's last use: their strings move into the event.
        let why = f.unswapped.unwrap_or(Unswapped::OutOfScope);
        let violation = (!f.out_of_scope.is_empty()).then(|| {
            AuditEvent::new(why.error())
                .with("host", f.host.as_str())
                .with("method", f.method.as_str())
                .with("path", f.path.as_str())
                .with(
                    "secrets",
                    f.out_of_scope.iter().cloned().collect::<Vec<_>>(),
                )
                .with("refused", f.refused)
        });
        let mut ev = AuditEvent::new("proxy_request")
            .with("host", std::mem::take(&mut f.host))
            .with("port", f.port)
            .with("method", std::mem::take(&mut f.method))
            .with("path", std::mem::take(&mut f.path))
            .with("status", f.status)
            .with("mode", f.mode)
            .with("protocol", f.protocol)
            .with("swapped", list(&mut f.swapped))
            .with("out_of_scope", list(&mut f.out_of_scope))
            .with("scrubbed", list(&mut f.scrubbed))
            .with(
                "scrubbed_forms",
                Value::Array(
                    std::mem::take(&mut f.scrubbed_forms)
                        .into_iter()
                        .map(|(secret, form)| serde_json::json!({"secret": secret, "form": form}))
                        .collect(),
                ),
            )
            .with("bytes_up", up)
            .with("bytes_down", down)
            .with("duration_ms", (ms * 1000.0).round() / 1000.0);
        if let Some(e) = f.error.take() {
            ev = ev.with("error", e);
        }
        for ev in std::iter::once(ev).chain(violation) {
            if let Err(e) = self.audit.record(ev) {
                Metrics::inc(&self.shared.metrics.audit_errors_total);
                tracing::error!(error = %e, "audit record lost");
            }
        }
    }
}

/// `/a/b?x=1&y=2` → `/a/b?x=&y=`: query names are kept, values (which may carry tokens or data
/// the agent did not mean to log) are not.
pub fn path_without_query_values(path_and_query: &str) -> String {
    match path_and_query.split_once('?') {
        None => path_and_query.to_owned(),
        Some((p, q)) => {
            let names: Vec<&str> = q
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
                .collect();
            format!("{p}?{}", names.join("=&") + "=")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_dropped() {
        assert_eq!(super::path_without_query_values("/a"), "/a");
        assert_eq!(
            super::path_without_query_values("/a?key=sk&b=2&flag"),
            "/a?key=&b=&flag="
        );
    }
}
