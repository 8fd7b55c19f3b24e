//! The one in-memory audit sink of kz's tests (unit tests, and the end-to-end tests through the
//! `testing` feature): it keeps every event, or refuses every event as a full disk would.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{AuditError, AuditEvent, AuditSink};

#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<AuditEvent>>,
    /// Refuse every record (the disk under the log is full).
    failing: bool,
}

impl MemorySink {
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A sink whose every `record` fails with an I/O error ("disk full").
    pub fn failing() -> MemorySink {
        MemorySink {
            failing: true,
            ..MemorySink::default()
        }
    }

    /// Every event recorded so far, in order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The events of one kind.
    pub fn of_kind(&self, kind: &str) -> Vec<AuditEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }

    /// Waits up to `timeout` until at least `n` events of `kind` exist (records written when a
    /// stream or connection ends arrive after the response); returns them.
    pub fn wait(&self, kind: &str, n: usize, timeout: Duration) -> Vec<AuditEvent> {
        let start = Instant::now();
        loop {
            let found = self.of_kind(kind);
            if found.len() >= n || start.elapsed() > timeout {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl AuditSink for MemorySink {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        if self.failing {
            return Err(AuditError::Io {
                path: "/audit.jsonl".into(),
                source: std::io::Error::other("disk full"),
            });
        }
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
        Ok(())
    }
}
