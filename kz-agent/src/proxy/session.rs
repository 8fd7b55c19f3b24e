//! Sessions: one per sandbox the proxy serves.
//!
//! A node runs one proxy for every sandbox on it. What differs between sandboxes (whose masked
//! tokens may be swapped, which hosts they may reach, which CA their agent trusts, which names
//! their DNS answered, and where their records go) is a [`Session`]. The proxy finds a
//! connection's session from what the kernel recorded when it redirected the connect: the
//! sandbox's cgroup id ([`Redirected::session`]); an explicit-proxy listener belongs to the one
//! session its config names. A connection with no live session is refused and audited to the
//! node's sink: sandbox A's token table is never consulted for sandbox B's traffic, even when
//! both hold a secret of the same name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use super::tls::CertAuthority;
use super::{ConnectionRules, HostLookup, TokenTable};
use crate::audit::AuditSink;

/// Which sandbox a connection belongs to: under kernel interception, the id of the sandbox's
/// cgroup (what the kernel's record of a redirected connect carries).
pub type SessionId = u64;

/// The original destination of a redirected connection and the session it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirected {
    pub dest: SocketAddr,
    pub session: SessionId,
}

/// One sandbox's view of the proxy.
pub struct Session {
    pub id: SessionId,
    /// The CA the sandbox's agent trusts. A node may give every session the same one (one leaf
    /// cache) or each its own.
    pub ca: Arc<CertAuthority>,
    pub tokens: TokenTable,
    pub rules: ConnectionRules,
    /// Refuse (403) a request carrying a token outside its scope instead of forwarding it masked.
    pub refuse_out_of_scope: bool,
    /// The sandbox's audit sink (with its context: run id, program, …).
    pub audit: Arc<dyn AuditSink>,
    /// Name resolution consulted before the system resolver: what the sandbox's own DNS
    /// answered, never another sandbox's answers.
    pub resolve: Option<HostLookup>,
}

impl Session {
    /// A session with empty rules (allow all), forwarding out-of-scope tokens masked, and the
    /// system resolver.
    pub fn new(
        id: SessionId,
        ca: Arc<CertAuthority>,
        tokens: TokenTable,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            id,
            ca,
            tokens,
            rules: ConnectionRules::default(),
            refuse_out_of_scope: false,
            audit,
            resolve: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session {0} is already admitted; close it before admitting it again")]
    Exists(SessionId),
}

/// The live sessions, by id. Read once per connection (not per request).
#[derive(Default)]
pub struct Sessions {
    live: RwLock<HashMap<SessionId, Arc<Session>>>,
}

impl Sessions {
    pub fn admit(&self, session: Session) -> Result<Arc<Session>, SessionError> {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        if live.contains_key(&session.id) {
            return Err(SessionError::Exists(session.id));
        }
        let session = Arc::new(session);
        live.insert(session.id, session.clone());
        Ok(session)
    }

    /// Removes a session: new connections for it are refused. Connections already open keep
    /// their session until they end (the sandbox's processes are gone by then, or about to be).
    pub fn close(&self, id: SessionId) -> Option<Arc<Session>> {
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    pub fn get(&self, id: SessionId) -> Option<Arc<Session>> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.live.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Minted leaf certificates over every distinct CA of the live sessions.
    pub fn cached_leaves(&self) -> usize {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let mut seen: Vec<*const CertAuthority> = Vec::new();
        let mut n = 0;
        for s in live.values() {
            let p = Arc::as_ptr(&s.ca);
            if !seen.contains(&p) {
                seen.push(p);
                n += s.ca.cached();
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemorySink;

    fn session(id: SessionId, ca: &Arc<CertAuthority>) -> Session {
        Session::new(
            id,
            ca.clone(),
            TokenTable::new(),
            Arc::new(MemorySink::new()),
        )
    }

    #[test]
    fn a_session_is_admitted_once_and_found_by_its_id_only() {
        let ca = Arc::new(CertAuthority::generate(4).unwrap());
        let s = Sessions::default();
        s.admit(session(7, &ca)).unwrap();
        assert!(matches!(
            s.admit(session(7, &ca)),
            Err(SessionError::Exists(7))
        ));
        assert_eq!(s.get(7).map(|x| x.id), Some(7));
        assert!(s.get(8).is_none());
        assert!(s.close(7).is_some());
        assert!(s.get(7).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn leaves_of_a_shared_ca_are_counted_once() {
        let shared = Arc::new(CertAuthority::generate(4).unwrap());
        let own = Arc::new(CertAuthority::generate(4).unwrap());
        shared.leaf("a.test").unwrap();
        own.leaf("b.test").unwrap();
        own.leaf("c.test").unwrap();
        let s = Sessions::default();
        s.admit(session(1, &shared)).unwrap();
        s.admit(session(2, &shared)).unwrap();
        s.admit(session(3, &own)).unwrap();
        assert_eq!(s.cached_leaves(), 3);
    }
}
