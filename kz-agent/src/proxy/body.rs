//! Bodies crossing the proxy: swap (requests) or scrub (responses) chunk by chunk, count
//! bytes, and keep the request's audit record alive until the stream ends; the body read
//! timeout of request bodies ([`TimedBody`]); and bodies read whole for rewriting, whose bytes
//! come out of one node-wide [`BufferPool`] ([`read_whole`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::metrics::Metrics;
use super::record::Record;
use super::tokens::{At, Snapshot, SwapPlan};
use crate::egress::rewrite::StreamRewriter;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream: masked tokens become real values (in scope only).
    Up,
    /// Upstream → client: real values become masked tokens.
    Down,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "kz refused to forward this request: it carries a masked token kz did not swap (outside its host scope, outside its credential_location, or over cleartext HTTP; see the audit log)"
)]
pub struct RefusedOutOfScope;

pub struct RewriteBody<B> {
    inner: B,
    rw: StreamRewriter,
    snap: Arc<Snapshot>,
    record: Arc<Record>,
    dir: Direction,
    refuse_out_of_scope: bool,
    /// Trailers that arrived while data was still held back.
    pending_trailers: Option<http::HeaderMap>,
    done: bool,
    /// Up: the request's plan, for why a token was left masked and for the trailers, which
    /// are headers and follow the header rules (not the body's).
    plan: Option<Arc<SwapPlan>>,
}

impl<B> RewriteBody<B> {
    pub fn new(
        inner: B,
        rw: StreamRewriter,
        snap: Arc<Snapshot>,
        record: Arc<Record>,
        dir: Direction,
        refuse_out_of_scope: bool,
    ) -> Self {
        Self {
            inner,
            rw,
            snap,
            record,
            dir,
            refuse_out_of_scope,
            pending_trailers: None,
            done: false,
            plan: None,
        }
    }

    /// Up: the plan the body is swapped with.
    pub fn swapping(mut self, plan: Arc<SwapPlan>) -> Self {
        self.plan = Some(plan);
        self
    }

    /// Notes token `id` of a request body or trailer (`replaced` or left masked).
    fn note_token(
        record: &Record,
        snap: &Snapshot,
        plan: Option<&SwapPlan>,
        id: usize,
        replaced: bool,
    ) {
        match (replaced, plan) {
            (false, Some(plan)) => record.unswapped(snap.name(id), plan.why_unswapped(id)),
            _ => record.token(snap.name(id), replaced),
        }
    }

    /// Runs the rewriter on `data` (or flushes at the end when `None`). Returns the bytes to emit
    /// and whether an out-of-scope token was seen.
    fn rewrite(&mut self, data: Option<Bytes>) -> (Bytes, bool) {
        let mut violation = false;
        let snap = &self.snap;
        let record = &self.record;
        let dir = self.dir;
        let plan = self.plan.as_deref();
        // Up: swap ids are token ids; Down: scrub ids are pattern ids (a value may have several).
        let mut seen = |id: usize, replaced: bool| match dir {
            Direction::Up => {
                if !replaced {
                    violation = true;
                }
                Self::note_token(record, snap, plan, id, replaced);
            }
            Direction::Down => record.scrubbed(snap.scrubbed_name(id), snap.scrubbed_form(id)),
        };
        let out = match data {
            Some(d) => self.rw.push(d, &mut seen),
            None => self.rw.finish(&mut seen),
        };
        (out, violation)
    }

    fn count(&self, n: usize) {
        let n = n as u64;
        let m = self.record.metrics();
        match self.dir {
            Direction::Up => {
                self.record
                    .bytes_up
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Metrics::add(&m.bytes_upstream_total, n);
            }
            Direction::Down => {
                self.record
                    .bytes_down
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Metrics::add(&m.bytes_downstream_total, n);
            }
        }
    }
}

impl<B> Body for RewriteBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.pending_trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let (out, violation) = this.rewrite(Some(data));
                        if violation && this.refuse_out_of_scope {
                            this.record.with(|f| f.refused = true);
                            return Poll::Ready(Some(Err(Box::new(RefusedOutOfScope))));
                        }
                        if out.is_empty() {
                            continue;
                        }
                        this.count(out.len());
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => {
                        // Trailers end the body: flush what is held back first. Up, they are
                        // headers and follow the header rules; down they are scrubbed like
                        // the body.
                        let mut violation = false;
                        this.pending_trailers = frame.into_trailers().ok().map(|mut t| {
                            for (name, v) in t.iter_mut() {
                                let snap = &this.snap;
                                let record = &this.record;
                                let plan = this.plan.as_deref();
                                let new = match (this.dir, plan) {
                                    (Direction::Up, Some(plan)) => {
                                        let mut seen = |id: usize, replaced: bool| {
                                            violation |= !replaced;
                                            Self::note_token(
                                                record,
                                                snap,
                                                Some(plan),
                                                id,
                                                replaced,
                                            );
                                        };
                                        plan.patterns().rewrite_all(
                                            v.as_bytes(),
                                            &plan.at(At::Header(name, v.as_bytes())),
                                            &mut seen,
                                        )
                                    }
                                    (Direction::Up, None) => {
                                        let mut seen = |id: usize, replaced: bool| {
                                            violation |= !replaced;
                                            record.token(snap.name(id), replaced);
                                        };
                                        this.rw.rewrite_value(v.as_bytes(), &mut seen)
                                    }
                                    (Direction::Down, _) => {
                                        let mut seen = |id: usize, _| {
                                            record.scrubbed(
                                                snap.scrubbed_name(id),
                                                snap.scrubbed_form(id),
                                            );
                                        };
                                        this.rw.rewrite_value(v.as_bytes(), &mut seen)
                                    }
                                };
                                if let Some(nv) = new
                                    && let Ok(hv) = http::HeaderValue::from_bytes(&nv)
                                {
                                    *v = hv;
                                }
                            }
                            t
                        });
                        if violation && this.refuse_out_of_scope {
                            this.record.with(|f| f.refused = true);
                            return Poll::Ready(Some(Err(Box::new(RefusedOutOfScope))));
                        }
                        this.done = true;
                        let (out, _) = this.rewrite(None);
                        if !out.is_empty() {
                            this.count(out.len());
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.done = true;
                    let (out, violation) = this.rewrite(None);
                    if violation && this.refuse_out_of_scope {
                        this.record.with(|f| f.refused = true);
                        return Poll::Ready(Some(Err(Box::new(RefusedOutOfScope))));
                    }
                    if !out.is_empty() {
                        this.count(out.len());
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending_trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // The length may change with every swap; only "at least nothing" is honest.
        SizeHint::default()
    }
}

/// A body that only counts bytes (the splice-free path for bodies that need no rewriting, e.g.
/// when the token table is empty).
pub struct CountBody<B> {
    inner: B,
    record: Arc<Record>,
    dir: Direction,
}

impl<B> CountBody<B> {
    pub fn new(inner: B, record: Arc<Record>, dir: Direction) -> Self {
        Self { inner, record, dir }
    }
}

impl<B> Body for CountBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    let m = this.record.metrics();
                    let (c, total) = match this.dir {
                        Direction::Up => (&this.record.bytes_up, &m.bytes_upstream_total),
                        Direction::Down => (&this.record.bytes_down, &m.bytes_downstream_total),
                    };
                    c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    Metrics::add(total, n);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that stalled: kz answers 408 (or resets the stream) and audits `body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error(
    "kz: the request body stalled (no data for {idle:?}, or less than {min_bytes} bytes in {idle:?}); \
     send the body without pauses, or raise `body_read_timeout` / lower `body_min_rate`"
)]
pub struct BodyTimeout {
    pub idle: Duration,
    pub min_bytes: u64,
}

/// The body read timeout of a request body, for every plan (passed through, streamed, read
/// whole). Two rules, both counting only time spent waiting for the client (time in which kz
/// does not ask for more because the upstream is slow to take it is not the client's fault):
/// - no gap between two frames longer than `idle`;
/// - with a declared length (`min_bytes > 0`), every `idle` of waiting brings at least
///   `min_bytes` (a client that declared its length has the bytes; one trickling a few bytes
///   a second to hold a connection, a buffer and an upstream slot is cut off after one window).
///   Bodies of unknown length (chunked, h2 without `content-length`) may be long-lived streams
///   that pause legitimately (gRPC client streams); only the gap rule holds for them.
///
/// On expiry the body fails with [`BodyTimeout`] and the request's record gets
/// `error = "body_timeout"`, which is how `forward` tells it from an upstream failure.
pub struct TimedBody<B> {
    inner: B,
    idle: Duration,
    min_bytes: u64,
    /// Told of the timeout (none in unit tests).
    record: Option<Arc<Record>>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Start of the current wait (cleared by every frame).
    gap_start: Option<Instant>,
    /// Start of the part of the current wait not yet added to `window_waited`.
    mark: Option<Instant>,
    window_waited: Duration,
    window_bytes: u64,
    fired: bool,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, idle: Duration, min_bytes: u64, record: Option<Arc<Record>>) -> Self {
        Self {
            inner,
            idle,
            min_bytes,
            record,
            sleep: None,
            gap_start: None,
            mark: None,
            window_waited: Duration::ZERO,
            window_bytes: 0,
            fired: false,
        }
    }

    fn fire(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.fired = true;
        self.sleep = None;
        if let Some(r) = &self.record {
            Metrics::inc(&r.metrics().request_body_timeouts_total);
            r.with(|f| f.error = Some(BODY_TIMEOUT.to_owned()));
        }
        Poll::Ready(Some(Err(Box::new(BodyTimeout {
            idle: self.idle,
            min_bytes: self.min_bytes,
        }))))
    }
}

/// The audit `error` of a request whose body stalled.
pub const BODY_TIMEOUT: &str = "body_timeout";

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.fired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(m) = this.mark.take() {
                    this.window_waited += m.elapsed();
                }
                this.gap_start = None;
                if let Some(d) = frame.data_ref() {
                    this.window_bytes += d.len() as u64;
                }
                if this.window_waited >= this.idle {
                    this.window_waited = Duration::ZERO;
                    this.window_bytes = 0;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                let now = Instant::now();
                let gap_start = *this.gap_start.get_or_insert(now);
                let mark = *this.mark.get_or_insert(now);
                let gap_end = gap_start + this.idle;
                let mut deadline = gap_end;
                if this.min_bytes > 0 {
                    let window_end = mark + this.idle.saturating_sub(this.window_waited);
                    if now >= window_end {
                        if this.window_bytes < this.min_bytes {
                            return this.fire();
                        }
                        // The window was met: a new one starts where it ended.
                        this.window_waited = Duration::ZERO;
                        this.window_bytes = 0;
                        this.mark = Some(window_end);
                        continue;
                    }
                    deadline = deadline.min(window_end);
                }
                if now >= gap_end {
                    return this.fire();
                }
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if s.deadline() != deadline {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.fired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The node-wide budget of bytes held in bodies read whole for rewriting (requests and
/// responses of every session): `Limits::max_buffered_total`.
pub struct BufferPool {
    permits: Arc<Semaphore>,
}

impl BufferPool {
    pub fn new(total: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// `n` bytes of the budget, if that much is free now (never waits).
    pub fn reserve(&self, n: usize) -> Option<Reserved> {
        let n = u32::try_from(n).ok()?;
        self.permits
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(Reserved)
    }

    /// Bytes of the budget not held by any body.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// Bytes held from a [`BufferPool`], given back when dropped.
pub struct Reserved(OwnedSemaphorePermit);

impl Reserved {
    pub fn bytes(&self) -> usize {
        self.0.num_permits()
    }

    /// Grows the reservation to `n` bytes; false if the pool has not that much free.
    fn grow_to(&mut self, pool: &BufferPool, n: usize) -> bool {
        let have = self.bytes();
        if n <= have {
            return true;
        }
        match pool.reserve(n - have) {
            Some(more) => {
                self.0.merge(more.0);
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadWholeError {
    #[error(transparent)]
    Timeout(#[from] BodyTimeout),
    #[error("kz is holding as many buffered bodies as `max_buffered_total` allows; retry shortly")]
    PoolFull,
    #[error("the body is longer than its Content-Length ({0} bytes)")]
    TooLong(usize),
    #[error("reading the body failed: {0}")]
    Read(BoxError),
}

/// Reads a whole body of at most `limit` bytes into one buffer whose capacity is always covered
/// by `held` (grown from `pool` as the buffer grows; [`ReadWholeError::PoolFull`] when it cannot).
///
/// Each frame is copied out at once. Why: hyper hands out each frame as a slice of its read
/// buffer, and keeping the frames (what `collect()` does) keeps every buffer they came from
/// alive: a client trickling one byte per read pinned 8 KiB per byte (4,096 such clients took
/// kz past 450 MB in a few seconds). Trailers are dropped, as a rewritten whole body is sent
/// without them.
pub async fn read_whole<B>(
    body: B,
    limit: usize,
    pool: &BufferPool,
    mut held: Reserved,
) -> Result<(Bytes, Reserved), ReadWholeError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: BoxError = e.into();
            match e.downcast::<BodyTimeout>() {
                Ok(t) => ReadWholeError::Timeout(*t),
                Err(e) => ReadWholeError::Read(e),
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let need = buf.len() + data.len();
        if need > limit {
            return Err(ReadWholeError::TooLong(limit));
        }
        if need > buf.capacity() {
            // Double (as Vec would), within the limit, and hold the bytes before allocating.
            let cap = need.max(buf.capacity() * 2).max(4096).min(limit);
            if !held.grow_to(pool, cap) {
                return Err(ReadWholeError::PoolFull);
            }
            buf.reserve_exact(cap - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), held))
}

/// A whole body and the pool bytes it holds until hyper has sent it (and dropped it).
pub fn full_held(data: Bytes, held: Reserved) -> ProxyBody {
    Held {
        inner: http_body_util::Full::new(data),
        _held: held,
    }
    .boxed()
}

struct Held {
    inner: http_body_util::Full<Bytes>,
    _held: Reserved,
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|never| match never {})
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    type Frames = futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, BoxError>>;

    /// A body yielding `chunks`, each after its delay.
    fn paced(chunks: Vec<(u64, &'static [u8])>) -> StreamBody<Frames> {
        use futures_util::StreamExt;
        let s = futures_util::stream::iter(chunks).then(|(ms, c)| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(c)))
        });
        StreamBody::new(s.boxed())
    }

    async fn drain<B: Body<Data = Bytes, Error = BoxError> + Unpin>(
        mut b: B,
    ) -> Result<usize, BoxError> {
        let mut n = 0;
        while let Some(f) = b.frame().await {
            n += f?.data_ref().map_or(0, |d| d.len());
        }
        Ok(n)
    }

    #[tokio::test]
    async fn a_gap_longer_than_the_timeout_fails_the_body() {
        let b = TimedBody::new(
            paced(vec![(0, b"ab"), (100, b"cd"), (400, b"ef")]),
            Duration::from_millis(200),
            0,
            None,
        );
        let e = drain(b).await.unwrap_err();
        assert!(e.downcast_ref::<BodyTimeout>().is_some(), "{e}");
    }

    #[tokio::test]
    async fn a_trickle_below_the_minimum_rate_is_cut_after_a_window() {
        // Each gap is short, but 300 ms windows bring 4 bytes where 100 are due.
        let idle = Duration::from_millis(300);
        let chunks = (0..20).map(|_| (70, &b"x"[..])).collect();
        let t = tokio::time::Instant::now();
        let b = TimedBody::new(paced(chunks), idle, 100, None);
        assert!(drain(b).await.is_err());
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        // Without a declared length only the gap rule holds: the same trickle goes through.
        let chunks = (0..20).map(|_| (70, &b"x"[..])).collect();
        let b = TimedBody::new(paced(chunks), idle, 0, None);
        assert_eq!(drain(b).await.unwrap(), 20);
    }

    #[tokio::test]
    async fn time_the_consumer_does_not_ask_is_not_the_clients() {
        // The client sends at once; the consumer (a slow upstream) waits 5 s between reads.
        let mut b = TimedBody::new(
            paced(vec![(0, b"ab"), (0, b"cd")]),
            Duration::from_millis(100),
            100,
            None,
        );
        assert!(b.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(b.frame().await.unwrap().is_ok());
        assert!(b.frame().await.is_none());
    }

    #[tokio::test]
    async fn bodies_read_whole_take_their_bytes_from_the_pool() {
        let pool = BufferPool::new(10_000);
        let body = || paced(vec![(0, &[7u8; 3000][..]), (0, &[7u8; 3000][..])]);
        let (a, held_a) = read_whole(body(), 6000, &pool, pool.reserve(0).unwrap())
            .await
            .unwrap();
        assert_eq!((a.len(), held_a.bytes()), (6000, 6000));
        assert_eq!(pool.available(), 4000);
        // The pool cannot cover a second one.
        let e = read_whole(body(), 6000, &pool, pool.reserve(0).unwrap()).await;
        assert!(matches!(e, Err(ReadWholeError::PoolFull)));
        assert_eq!(
            pool.available(),
            4000,
            "a refused body gives back what it took"
        );
        drop(held_a);
        assert_eq!(pool.available(), 10_000);
        // Longer than declared: refused.
        let e = read_whole(body(), 5000, &pool, pool.reserve(0).unwrap()).await;
        assert!(matches!(e, Err(ReadWholeError::TooLong(5000))));
        // A body held for sending keeps its bytes until it is dropped.
        let held = pool.reserve(2500).unwrap();
        let b = full_held(Bytes::from_static(b"x"), held);
        assert_eq!(pool.available(), 7500);
        drop(b);
        assert_eq!(pool.available(), 10_000);
    }
}
