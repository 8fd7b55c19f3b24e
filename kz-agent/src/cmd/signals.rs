//! The signals kz's long-running commands answer, in one place.
//!
//! SIGINT and SIGTERM stop a server: the PDP, the exchange proxy and MCP over HTTP return from
//! their command once [`shutdown`] resolves, and the runtime's drop closes their listeners and
//! connections. SIGHUP reloads the PDP's bundle ([`reload_on_hangup`]). `kz intercept hold`
//! waits for the same pair through [`Shutdown`] (beside stdin closing and block events), so a
//! stop releases its cgroup instead of killing kz with the default action.
//!
//! Forwarding signals to an agent kz runs is not here: that is part of waiting for the child
//! (`run::wait_forwarding`), which `kz run --blind` shares, and the library must not reach up
//! into the composition roots.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// A stop request: SIGTERM or SIGINT (Ctrl-C).
pub struct Shutdown {
    term: Signal,
}

impl Shutdown {
    /// Installs the SIGTERM handler now; SIGINT is caught from the first [`Shutdown::recv`].
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// Resolves at the first SIGTERM or SIGINT; where SIGTERM cannot be caught, at SIGINT only.
pub async fn shutdown() {
    match Shutdown::install() {
        Ok(mut stop) => stop.recv().await,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Calls `reload` on every SIGHUP, from a task of the current runtime. Without a handler
/// (rare: the signal machinery is unavailable) it warns that only file changes reload.
pub fn reload_on_hangup(mut reload: impl FnMut() + Send + 'static) {
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; reload by file change only");
            return;
        };
        while hup.recv().await.is_some() {
            reload();
        }
    });
}
