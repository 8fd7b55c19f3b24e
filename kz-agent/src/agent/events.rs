//! Event streams: a sandbox's audit records as they happen, as JSON lines
//! (`GET /v1/sandboxes/{id}/events`, `GET /v1/events`).
//!
//! Each sandbox has a [`Feed`]: its audit sink passes every record through it ([`Publishing`])
//! on the way to the daemon's log. The feed keeps the last [`RING`] records (for `?since=N`)
//! and hands each record, serialised once, to its subscribers' queues. The audit path never
//! waits for a reader: a queue holds [`QUEUE`] lines, and a record that finds it full is dropped
//! for that reader and counted; the reader gets one `events_dropped` line with the count where
//! the gap is, once there is room again (or before the stream's last line). A stream of a
//! sandbox ends with a `sandbox_destroyed` line when the sandbox goes; `/v1/events` (every
//! sandbox the caller may see, those created later too) ends with the daemon.
//!
//! Who may read: a sandbox's owner, root and `kz-admin` ([`super::auth::may_manage`]), decided
//! when the stream is opened and, for `/v1/events`, for each record. A user (admins too) holds
//! at most [`MAX_PER_USER`] streams at once: each costs a queue of up to [`QUEUE`] lines.
//!
//! One lock guards every feed and subscriber: it is held for a ring push and a few
//! non-blocking queue sends per record (the chain sink behind it takes its own lock per record
//! anyway), never across an await.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::auth::{Caller, may_manage};
use crate::audit::{AuditError, AuditEvent, AuditSink};

/// Records a sandbox keeps for `?since=N` (N above it is cut to it).
pub const RING: usize = 256;
/// Lines a subscriber's queue holds before records are dropped for it.
pub const QUEUE: usize = 1024;
/// Streams one user may hold open at once.
pub const MAX_PER_USER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("no sandbox {0}; `kz sandbox ls` lists yours")]
    NotFound(u64),
    #[error(
        "sandbox {0} belongs to another user; only its owner, root or group kz-admin read its events"
    )]
    Forbidden(u64),
    #[error(
        "you already hold {MAX_PER_USER} event streams, the most a user may; close one (each `kz sandbox events -f` holds one)"
    )]
    TooMany,
    #[error("?since must be a number of records (at most {RING} are kept), got {0:?}")]
    BadSince(String),
}

/// Which records a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Sandbox(u64),
    /// Every sandbox the caller may see.
    All,
}

/// The event feeds of the daemon's sandboxes and their subscribers.
#[derive(Clone, Default)]
pub struct Events {
    shared: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// By feed key (given before the sandbox has an id).
    feeds: HashMap<u64, FeedState>,
    /// Sandbox id → feed key.
    by_sandbox: HashMap<u64, u64>,
    /// `/v1/events` subscribers.
    global: Vec<Sub>,
    /// Open streams per uid.
    per_user: HashMap<u32, usize>,
    next: u64,
}

struct FeedState {
    owner: u32,
    sandbox_id: Option<u64>,
    ring: VecDeque<Bytes>,
    subs: Vec<Sub>,
}

struct Sub {
    key: u64,
    tx: mpsc::Sender<Bytes>,
    /// Records dropped since the last `events_dropped` line (shared with the reader, which
    /// reports what is left when the stream ends).
    dropped: Arc<AtomicU64>,
    /// The reader, for `/v1/events`: which sandboxes it may see.
    reader: Caller,
    /// The stream's last line (`sandbox_destroyed`), sent by the reader's side after what is
    /// queued, so a full queue cannot lose it.
    last: Arc<OnceLock<Bytes>>,
}

impl Sub {
    /// Queues `line` without waiting; on a full queue the record is counted as dropped.
    /// `false` when the reader is gone.
    fn offer(&self, line: &Bytes, sandbox_id: Option<u64>) -> bool {
        let pending = self.dropped.load(Ordering::Relaxed);
        if pending > 0 {
            match self.tx.try_send(dropped_line(pending, sandbox_id)) {
                Ok(()) => {
                    self.dropped.fetch_sub(pending, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(line.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl Events {
    pub fn new() -> Events {
        Events::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A feed for a sandbox of `owner` about to be admitted (its id comes with [`Feed::bind`]).
    pub fn open(&self, owner: u32) -> Feed {
        let mut inner = self.lock();
        inner.next += 1;
        let key = inner.next;
        inner.feeds.insert(
            key,
            FeedState {
                owner,
                sandbox_id: None,
                ring: VecDeque::new(),
                subs: Vec::new(),
            },
        );
        Feed {
            events: self.clone(),
            key,
        }
    }

    /// Publishes a record about sandbox `id` that does not pass through its audit sink (the
    /// daemon's own records naming it: runs started and ended). Nothing when it has no feed.
    pub fn publish_to(&self, id: u64, event: &AuditEvent) {
        let key = self.lock().by_sandbox.get(&id).copied();
        if let Some(key) = key {
            self.publish(key, event);
        }
    }

    fn publish(&self, key: u64, event: &AuditEvent) {
        let mut inner = self.lock();
        let Some(feed) = inner.feeds.get_mut(&key) else {
            return;
        };
        let (owner, sandbox_id) = (feed.owner, feed.sandbox_id);
        let line = render(event, sandbox_id);
        if feed.ring.len() == RING {
            feed.ring.pop_front();
        }
        feed.ring.push_back(line.clone());
        feed.subs.retain(|s| s.offer(&line, sandbox_id));
        inner
            .global
            .retain(|s| !may_manage(&s.reader, owner) || s.offer(&line, sandbox_id));
    }

    /// The sandbox `id` is gone: `last` (its `sandbox_destroyed` record) is its subscribers'
    /// last line, their streams end, and the feed is forgotten. `/v1/events` readers get the
    /// line and go on.
    pub fn close(&self, id: u64, last: &AuditEvent) {
        let mut inner = self.lock();
        let Some(key) = inner.by_sandbox.remove(&id) else {
            return;
        };
        let Some(feed) = inner.feeds.remove(&key) else {
            return;
        };
        let line = render(last, Some(id));
        for s in feed.subs {
            // Dropping the sender closes the queue; the reader sends this after what is queued.
            let _ = s.last.set(line.clone());
        }
        inner
            .global
            .retain(|s| !may_manage(&s.reader, feed.owner) || s.offer(&line, Some(id)));
    }

    /// The daemon stops: every stream ends (after what is queued).
    pub fn end_all(&self) {
        let mut inner = self.lock();
        inner.global.clear();
        for f in inner.feeds.values_mut() {
            f.subs.clear();
        }
    }

    /// A stream for `caller`: the last `since` records kept (of each sandbox, for
    /// [`Scope::All`]), then (`follow`) every new one.
    pub fn subscribe(
        &self,
        caller: &Caller,
        scope: Scope,
        since: usize,
        follow: bool,
    ) -> Result<Stream, EventsError> {
        let since = since.min(RING);
        let mut inner = self.lock();
        let open = inner.per_user.get(&caller.uid).copied().unwrap_or(0);
        // Authorisation first: a refusal says nothing about the caller's other streams.
        let key = match scope {
            Scope::Sandbox(id) => {
                let key = *inner.by_sandbox.get(&id).ok_or(EventsError::NotFound(id))?;
                let owner = inner.feeds.get(&key).map(|f| f.owner);
                if !owner.is_some_and(|o| may_manage(caller, o)) {
                    return Err(EventsError::Forbidden(id));
                }
                Some(key)
            }
            Scope::All => None,
        };
        if open >= MAX_PER_USER {
            return Err(EventsError::TooMany);
        }
        inner.next += 1;
        let sub_key = inner.next;
        let (tx, rx) = mpsc::channel(QUEUE + RING + 1);
        let dropped = Arc::new(AtomicU64::new(0));
        let last = Arc::new(OnceLock::new());
        let sandbox_id = match scope {
            Scope::Sandbox(id) => Some(id),
            Scope::All => None,
        };
        let mut first = Map::new();
        first.insert("kind".into(), "events_subscribed".into());
        first.insert("ts".into(), crate::audit::rfc3339_now().into());
        if let Some(id) = sandbox_id {
            first.insert("sandbox_id".into(), id.into());
        }
        let _ = tx.try_send(line_of(first));
        // The backlog goes in before the subscriber is registered, under the same lock: no
        // record is both in it and sent live, and none falls between.
        let backlog = |f: &FeedState, tx: &mpsc::Sender<Bytes>| {
            for line in f.ring.iter().skip(f.ring.len().saturating_sub(since)) {
                let _ = tx.try_send(line.clone());
            }
        };
        let sub = Sub {
            key: sub_key,
            tx: tx.clone(),
            dropped: dropped.clone(),
            reader: *caller,
            last: last.clone(),
        };
        match key {
            Some(key) => {
                if let Some(f) = inner.feeds.get_mut(&key) {
                    backlog(f, &tx);
                    if follow {
                        f.subs.push(sub);
                    }
                }
            }
            None => {
                let mut feeds: Vec<&FeedState> = inner
                    .feeds
                    .values()
                    .filter(|f| f.sandbox_id.is_some() && may_manage(caller, f.owner))
                    .collect();
                feeds.sort_by_key(|f| f.sandbox_id);
                for f in feeds {
                    backlog(f, &tx);
                }
                if follow {
                    inner.global.push(sub);
                }
            }
        }
        drop(tx);
        *inner.per_user.entry(caller.uid).or_default() += 1;
        Ok(Stream {
            rx,
            dropped,
            last,
            sandbox_id,
            _registration: Registration {
                events: self.clone(),
                key,
                sub_key,
                uid: caller.uid,
            },
            state: End::Open,
        })
    }
}

/// One sandbox's feed, given to its audit sink ([`Publishing`]).
#[derive(Clone)]
pub struct Feed {
    events: Events,
    key: u64,
}

impl Feed {
    /// The sandbox was admitted under `id`: its stream can be opened by id now.
    pub fn bind(&self, id: u64) {
        let mut inner = self.events.lock();
        if let Some(f) = inner.feeds.get_mut(&self.key) {
            f.sandbox_id = Some(id);
            inner.by_sandbox.insert(id, self.key);
        }
    }

    /// The sandbox was never admitted: the feed goes.
    pub fn discard(&self) {
        self.events.lock().feeds.remove(&self.key);
    }
}

/// Passes a sandbox's records to its feed on their way to `inner`.
pub struct Publishing {
    pub inner: Arc<dyn AuditSink>,
    pub feed: Feed,
}

impl AuditSink for Publishing {
    fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.feed.events.publish(self.feed.key, &event);
        self.inner.record(event)
    }
}

/// A record as a stream line: `ts`, `kind`, `sandbox_id` and its fields, one JSON line.
fn render(event: &AuditEvent, sandbox_id: Option<u64>) -> Bytes {
    let mut m = Map::new();
    for (k, v) in event.fields.sorted() {
        m.insert(k.to_owned(), v.clone());
    }
    m.insert("kind".into(), event.kind.into());
    m.entry("ts")
        .or_insert_with(|| crate::audit::rfc3339_now().into());
    if let Some(id) = sandbox_id {
        m.entry("sandbox_id").or_insert_with(|| id.into());
    }
    line_of(m)
}

fn dropped_line(count: u64, sandbox_id: Option<u64>) -> Bytes {
    let mut m = Map::new();
    m.insert("kind".into(), "events_dropped".into());
    m.insert("ts".into(), crate::audit::rfc3339_now().into());
    m.insert("count".into(), count.into());
    if let Some(id) = sandbox_id {
        m.insert("sandbox_id".into(), id.into());
    }
    line_of(m)
}

fn line_of(m: Map<String, Value>) -> Bytes {
    let mut v = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Unregisters a stream's subscriber when the stream is dropped (the reader went away, or the
/// stream ended).
struct Registration {
    events: Events,
    /// The sandbox feed's key; `None` for `/v1/events`.
    key: Option<u64>,
    sub_key: u64,
    uid: u32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.events.lock();
        match self.key {
            Some(key) => {
                if let Some(f) = inner.feeds.get_mut(&key) {
                    f.subs.retain(|s| s.key != self.sub_key);
                }
            }
            None => inner.global.retain(|s| s.key != self.sub_key),
        }
        if let Some(n) = inner.per_user.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.per_user.remove(&self.uid);
            }
        }
    }
}

/// The body of a streaming answer: queued lines as chunks until the queue closes; then an
/// `events_dropped` line if records were dropped since the last one, and the last line
/// (`sandbox_destroyed`) if the sandbox went.
pub struct Stream {
    rx: mpsc::Receiver<Bytes>,
    dropped: Arc<AtomicU64>,
    last: Arc<OnceLock<Bytes>>,
    sandbox_id: Option<u64>,
    _registration: Registration,
    state: End,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    /// The queue closed; the dropped count (if any) and the last line follow.
    Closed,
    /// The dropped count went out; the last line follows.
    Counted,
    Done,
}

impl Stream {
    /// The next line, `None` when the stream is over (for the CLI's and tests' use without
    /// HTTP).
    pub async fn next_line(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_line(cx)).await
    }

    fn poll_line(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            match self.state {
                End::Open => match self.rx.poll_recv(cx) {
                    Poll::Ready(Some(line)) => return Poll::Ready(Some(line)),
                    Poll::Ready(None) => self.state = End::Closed,
                    Poll::Pending => return Poll::Pending,
                },
                End::Closed => {
                    self.state = End::Counted;
                    let left = self.dropped.swap(0, Ordering::Relaxed);
                    if left > 0 {
                        return Poll::Ready(Some(dropped_line(left, self.sandbox_id)));
                    }
                }
                End::Counted => {
                    self.state = End::Done;
                    if let Some(line) = self.last.get() {
                        return Poll::Ready(Some(line.clone()));
                    }
                }
                End::Done => return Poll::Ready(None),
            }
        }
    }
}

impl Body for Stream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        this.poll_line(cx).map(|l| l.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, admin: bool) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: None,
            admin,
        }
    }

    fn kinds(lines: &[Bytes]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_slice(l).unwrap();
                v["kind"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    async fn drain(s: &mut Stream) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(l) = s.next_line().await {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn owners_read_their_sandbox_and_the_stream_ends_with_it() {
        let events = Events::new();
        let feed = events.open(1000);
        feed.bind(7);
        let sink = Publishing {
            inner: Arc::new(crate::audit::NullSink),
            feed: feed.clone(),
        };
        sink.record(AuditEvent::new("proxy_request")).unwrap();
        let alice = caller(1000, false);
        assert!(matches!(
            events.subscribe(&caller(1001, false), Scope::Sandbox(7), 0, true),
            Err(EventsError::Forbidden(7))
        ));
        assert!(matches!(
            events.subscribe(&alice, Scope::Sandbox(8), 0, true),
            Err(EventsError::NotFound(8))
        ));
        let mut s = events
            .subscribe(&alice, Scope::Sandbox(7), 10, true)
            .unwrap();
        let mut other = events
            .subscribe(&caller(1001, false), Scope::All, 10, true)
            .unwrap();
        let mut admin = events
            .subscribe(&caller(0, true), Scope::All, 0, true)
            .unwrap();
        sink.record(AuditEvent::new("connect_blocked")).unwrap();
        events.close(7, &AuditEvent::new("sandbox_destroyed"));
        assert_eq!(
            kinds(&drain(&mut s).await),
            [
                "events_subscribed",
                "proxy_request",
                "connect_blocked",
                "sandbox_destroyed"
            ]
        );
        // The global streams end with the daemon.
        events.end_all();
        let got = drain(&mut admin).await;
        assert_eq!(
            kinds(&got),
            ["events_subscribed", "connect_blocked", "sandbox_destroyed"]
        );
        assert_eq!(kinds(&drain(&mut other).await), ["events_subscribed"]);
    }

    #[tokio::test]
    async fn a_slow_reader_loses_records_counted_and_never_blocks() {
        let events = Events::new();
        let feed = events.open(0);
        feed.bind(1);
        let root = caller(0, true);
        let mut s = events.subscribe(&root, Scope::Sandbox(1), 0, true).unwrap();
        let extra = 100;
        let capacity = QUEUE + RING; // the queue's room beside the subscribed line
        for _ in 0..capacity + extra {
            events.publish(feed.key, &AuditEvent::new("proxy_request"));
        }
        // Room again: the gap is reported where it is, then records flow.
        for _ in 0..10 {
            s.next_line().await.unwrap();
        }
        events.publish(feed.key, &AuditEvent::new("dns_refused"));
        events.close(1, &AuditEvent::new("sandbox_destroyed"));
        let rest = drain(&mut s).await;
        let k = kinds(&rest);
        let gap = k.iter().position(|k| k == "events_dropped").unwrap();
        let v: Value = serde_json::from_slice(&rest[gap]).unwrap();
        assert_eq!(v["count"], extra as u64);
        assert_eq!(k[gap + 1], "dns_refused");
        assert_eq!(k.last().unwrap(), "sandbox_destroyed");
    }

    #[test]
    fn streams_per_user_are_bounded_and_given_back() {
        let events = Events::new();
        let feed = events.open(5);
        feed.bind(3);
        let u = caller(5, false);
        let held: Vec<Stream> = (0..MAX_PER_USER)
            .map(|_| events.subscribe(&u, Scope::Sandbox(3), 0, true).unwrap())
            .collect();
        assert!(matches!(
            events.subscribe(&u, Scope::All, 0, true),
            Err(EventsError::TooMany)
        ));
        assert!(
            events
                .subscribe(&caller(6, false), Scope::All, 0, true)
                .is_ok()
        );
        drop(held);
        assert!(events.subscribe(&u, Scope::Sandbox(3), 0, true).is_ok());
        assert_eq!(events.lock().feeds[&feed.key].subs.len(), 0);
    }
}
