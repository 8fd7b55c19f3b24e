//! The node's blocked-connection events, each audited in the sink of the sandbox it came from.
//!
//! The node's event ring carries the refusals of every cgroup it made (and of cgroups an agent
//! nested below its own, which are refused everything); each event names the sandbox's cgroup
//! (`guard_id`). One task reads the ring and routes by that id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::audit::{AuditEvent, AuditSink};
use crate::intercept::{Block, BlockEvents};

/// Where one sandbox's events go.
pub struct Route {
    pub audit: Arc<dyn AuditSink>,
    /// The cgroup's path, named in each record.
    pub cgroup: String,
    /// Also print a line on kz's stderr.
    pub echo: bool,
}

type Routes = Arc<Mutex<HashMap<u64, Route>>>;

enum Cmd {
    /// Audit everything in the ring now, then answer.
    Flush(oneshot::Sender<()>),
}

pub struct Dispatch {
    routes: Routes,
    cmds: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
}

impl Dispatch {
    /// Starts reading `events` on the current runtime; events of no routed sandbox go to
    /// `node`.
    pub fn start(events: BlockEvents, node: Arc<dyn AuditSink>) -> Dispatch {
        let routes = Routes::default();
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(read(events, routes.clone(), node, rx));
        Dispatch { routes, cmds, task }
    }

    pub fn route(&self, cgroup_id: u64, route: Route) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cgroup_id, route);
    }

    /// Audits what the sandbox caused so far (the kernel writes an event before the refused
    /// call returns, so once its processes are gone everything is in the ring), then forgets
    /// its route.
    pub async fn unroute(&self, cgroup_id: u64) {
        let (ack, done) = oneshot::channel();
        if self.cmds.send(Cmd::Flush(ack)).is_ok() {
            let _ = done.await;
        }
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cgroup_id);
    }

    /// Audits what is left in the ring and stops reading.
    pub async fn stop(self) {
        let (ack, done) = oneshot::channel();
        if self.cmds.send(Cmd::Flush(ack)).is_ok() {
            let _ = done.await;
        }
        self.task.abort();
    }
}

async fn read(
    mut events: BlockEvents,
    routes: Routes,
    node: Arc<dyn AuditSink>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let record = |b: Block| {
        let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
        match routes.get(&b.guard_id) {
            Some(r) => audit(b, &*r.audit, Some(&r.cgroup), r.echo),
            None => audit(b, &*node, None, false),
        }
    };
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Ok(b) => record(b),
                Err(e) => {
                    tracing::error!(error = %e, "block events stopped");
                    return;
                }
            },
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Flush(ack)) => {
                    while let Some(b) = events.try_next() {
                        record(b);
                    }
                    let _ = ack.send(());
                }
                None => return,
            },
        }
    }
}

/// glibc's name-service cache socket, which every lookup probes first.
fn is_nscd_probe(path: Option<&str>) -> bool {
    matches!(path, Some("/var/run/nscd/socket" | "/run/nscd/socket"))
}

fn audit(b: Block, sink: &dyn AuditSink, cgroup: Option<&str>, echo: bool) {
    // Unix-socket refusals name the peer by its path; the others by address and port.
    let target = b.path.clone().unwrap_or_else(|| b.dest.to_string());
    // glibc probes nscd on every name or user lookup and falls back when refused (nscd would
    // resolve names outside kz's DNS): audited, but not worth a line on the terminal.
    if echo && !is_nscd_probe(b.path.as_deref()) {
        eprintln!(
            "kz: blocked {} {} from {} (pid {}) to {}: {:?}",
            b.proto, b.op, b.comm, b.tgid, target, b.reason
        );
    }
    // The sink adds the sandbox's context (run id, program).
    let mut event = AuditEvent::new("connect_blocked");
    event = match cgroup {
        Some(path) => event.with("cgroup", path),
        None => event.with("cgroup_id", b.guard_id),
    };
    event = event
        .with("pid", b.tgid)
        .with("tid", b.pid)
        .with("comm", b.comm)
        .with("proto", b.proto)
        .with("op", b.op)
        .with(
            "reason",
            serde_json::to_value(b.reason).unwrap_or(Value::Null),
        );
    event = match b.path {
        Some(path) => event.with("path", path),
        None => event.with("dest", b.dest.to_string()),
    };
    if let Err(e) = sink.record(event) {
        tracing::error!(error = %e, "cannot audit a blocked connection");
    }
}

#[cfg(test)]
mod tests {
    use super::is_nscd_probe;

    #[test]
    fn only_the_nscd_socket_is_a_probe() {
        assert!(is_nscd_probe(Some("/run/nscd/socket")));
        assert!(is_nscd_probe(Some("/var/run/nscd/socket")));
        assert!(!is_nscd_probe(Some("/run/docker.sock")));
        assert!(!is_nscd_probe(None));
    }
}
