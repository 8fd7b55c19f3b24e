//! A sandbox's DNS answers opened in the node's allowed-IP map, under the sandbox's quota, and
//! the audit records of the answers that were not (see [`crate::intercept::allowed`]).
//!
//! An answer over quota (or finding the shared map full) is refused whole and the agent gets
//! SERVFAIL, not a trimmed answer: the name is allowed, so REFUSED (policy) would be a lie, and
//! SERVFAIL is what stub resolvers read as "temporarily unavailable" (glibc: EAI_AGAIN), which is
//! what it is, since the sandbox's entries expire. A trimmed answer would hide the limit from
//! the agent and from the audit log.

use std::sync::Arc;

use crate::audit::{AuditEvent, AuditSink};
use crate::intercept::dns::ResolvedIp;
use crate::intercept::{AllowError, AllowMap};

/// Opens one sandbox's answers.
pub(super) struct Opener {
    map: AllowMap,
    quota: usize,
    sandbox: String,
    audit: Arc<dyn AuditSink>,
}

impl Opener {
    pub(super) fn new(
        map: AllowMap,
        quota: usize,
        sandbox: &str,
        audit: Arc<dyn AuditSink>,
    ) -> Opener {
        Opener {
            map,
            quota,
            sandbox: sandbox.to_owned(),
            audit,
        }
    }

    /// Lets the sandbox's cgroup reach the addresses of the answer for `name`, all or none;
    /// a refusal is audited once per burst (the record counts the refusals it stands for).
    pub(super) fn open(
        &self,
        cgroup_id: u64,
        name: &str,
        ips: &[ResolvedIp],
    ) -> Result<(), AllowError> {
        let opened = self
            .map
            .open(cgroup_id, ips.iter().map(|r| (r.ip, r.ttl)), self.quota);
        let Err(e) = opened else {
            return Ok(());
        };
        if let Some(refused) = e.audit() {
            let mut event = self
                .event(e.kind(), cgroup_id, refused)
                .with("name", name)
                .with("reason", e.reason())
                .with("error", e.to_string());
            if let AllowError::OverQuota { open, wanted, .. } = &e {
                event = event
                    .with("open", *open as u64)
                    .with("wanted", *wanted as u64);
            }
            self.record(event);
        }
        Err(e)
    }

    /// At close: one last record for refusals no record counted yet.
    pub(super) fn flush(&self, cgroup_id: u64) {
        if let Some((refused, kind)) = self.map.take_unaudited(cgroup_id) {
            let event = self
                .event(kind, cgroup_id, refused)
                .with("reason", "refusals_since_last_record");
            self.record(event);
        }
    }

    fn event(&self, kind: &'static str, cgroup_id: u64, refused: u64) -> AuditEvent {
        AuditEvent::new(kind)
            .with("sandbox", self.sandbox.clone())
            .with("cgroup_id", cgroup_id)
            .with("quota", self.quota as u64)
            .with("refused", refused)
    }

    fn record(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record(event) {
            tracing::error!(sandbox = %self.sandbox, "cannot audit an allowed-IP refusal: {e}");
        }
    }
}
