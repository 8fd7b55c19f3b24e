//! Streaming bodies: swap (requests) or scrub (responses) chunk by chunk, count bytes, and keep
//! the request's audit record alive until the stream ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

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
