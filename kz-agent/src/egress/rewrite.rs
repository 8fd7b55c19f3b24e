//! Streaming find-and-replace over byte streams that arrive in arbitrary chunks.
//!
//! The engine under every credential rewrite kz does: the proxy's two directions (masked → real
//! on the way out, only for tokens in scope of the verified host; real → masked on the way back,
//! every real value, always) and every [`super::scrub::Scrubber`] (MCP `fetch`, the PDP's
//! exchange proxy). It lives in `egress`, not `proxy`, so the scrubber all three share sits on
//! one automaton and one set of chunk-boundary rules. Patterns may
//! straddle chunk boundaries, so a [`StreamRewriter`] holds back the shortest tail that could still
//! grow into a match — never more than the longest pattern minus one byte — and emits everything
//! else at once. Data that cannot be part of a match is never delayed, which is what keeps SSE and
//! other long-lived streams live.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::{Bytes, BytesMut};

/// What to do with one occurrence of pattern `id`: write `to`, or keep the original bytes.
pub trait Decide: Send + Sync {
    /// Returns the replacement for pattern `id`, or `None` to keep the match as it is.
    fn replacement(&self, id: usize) -> Option<&[u8]>;
}

/// A compiled set of patterns. Cheap to share (`Arc`); each stream gets its own [`StreamRewriter`].
pub struct Patterns {
    /// `None` for an empty set (aho-corasick is not asked to build one).
    ac: Option<AhoCorasick>,
    pats: Vec<Box<[u8]>>,
    /// `by_first[b]`: the patterns that start with byte `b`. The hold-back scan only looks at
    /// positions holding such a byte, and compares only those patterns: a scrubber has several
    /// spellings per value (issue 14), and most start with a different byte.
    by_first: Vec<Vec<usize>>,
    max_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("cannot build the replacement automaton: {0}; reduce the number or size of secrets")]
    Build(String),
    #[error("an empty pattern cannot be replaced; every token and secret value must be non-empty")]
    Empty,
}

impl Patterns {
    /// Compiles `pats` (leftmost-longest: a longer pattern wins over its own prefix).
    pub fn new(pats: Vec<Box<[u8]>>) -> Result<Self, RewriteError> {
        if pats.iter().any(|p| p.is_empty()) {
            return Err(RewriteError::Empty);
        }
        if pats.is_empty() {
            return Ok(Self::empty());
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&pats)
            .map_err(|e| RewriteError::Build(e.to_string()))?;
        let mut by_first = vec![Vec::new(); 256];
        for (i, p) in pats.iter().enumerate() {
            by_first[usize::from(p[0])].push(i);
        }
        let max_len = pats.iter().map(|p| p.len()).max().unwrap_or(0);
        Ok(Self {
            ac: Some(ac),
            pats,
            by_first,
            max_len,
        })
    }

    /// A set that never matches.
    pub fn empty() -> Self {
        Self {
            ac: None,
            pats: Vec::new(),
            by_first: vec![Vec::new(); 256],
            max_len: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pats.is_empty()
    }

    /// The longest pattern in bytes (0 for an empty set).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Every non-overlapping leftmost-longest match in `hay` as `(start, end, pattern id)`.
    pub fn matches<'a>(
        &'a self,
        hay: &'a [u8],
    ) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
        self.ac
            .iter()
            .flat_map(move |ac| ac.find_iter(hay))
            .map(|m| (m.start(), m.end(), m.pattern().as_usize()))
    }

    /// Calls `seen(id)` for every match in `hay` without rewriting (used to spot tokens).
    pub fn for_each_match(&self, hay: &[u8], mut seen: impl FnMut(usize)) {
        let Some(ac) = &self.ac else { return };
        for m in ac.find_iter(hay) {
            seen(m.pattern().as_usize());
        }
    }

    /// Rewrites a complete value (a header, a URL). Returns `None` when nothing changed, so the
    /// common case allocates nothing. `seen(id, replaced)` is told about every match.
    pub fn rewrite_all(
        &self,
        hay: &[u8],
        decide: &dyn Decide,
        seen: &mut dyn FnMut(usize, bool),
    ) -> Option<Vec<u8>> {
        let ac = self.ac.as_ref()?;
        let mut out: Option<Vec<u8>> = None;
        let mut pos = 0;
        for m in ac.find_iter(hay) {
            let id = m.pattern().as_usize();
            match decide.replacement(id) {
                Some(to) => {
                    seen(id, true);
                    let o = out.get_or_insert_with(|| Vec::with_capacity(hay.len() + 64));
                    o.extend_from_slice(&hay[pos..m.start()]);
                    o.extend_from_slice(to);
                    pos = m.end();
                }
                None => seen(id, false),
            }
        }
        let mut o = out?;
        o.extend_from_slice(&hay[pos..]);
        Some(o)
    }

    /// The earliest index `i >= from` such that `buf[i..]` is a proper prefix of some pattern,
    /// i.e. bytes that might still become a match when more data arrives.
    fn hold_start(&self, buf: &[u8], from: usize) -> usize {
        let len = buf.len();
        let window = len.saturating_sub(self.max_len.saturating_sub(1)).max(from);
        for i in window..len {
            let tail = &buf[i..];
            let could_grow = self.by_first[usize::from(buf[i])].iter().any(|&p| {
                self.pats
                    .get(p)
                    .is_some_and(|p| p.len() > tail.len() && p.starts_with(tail))
            });
            if could_grow {
                return i;
            }
        }
        len
    }
}

/// Per-stream state: the carried tail and the running match bookkeeping.
pub struct StreamRewriter {
    pats: Arc<Patterns>,
    decide: Arc<dyn Decide>,
    carry: BytesMut,
}

impl StreamRewriter {
    pub fn new(pats: Arc<Patterns>, decide: Arc<dyn Decide>) -> Self {
        Self {
            pats,
            decide,
            carry: BytesMut::new(),
        }
    }

    /// Bytes currently held back (bounded by the longest pattern).
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// Feeds one chunk; returns what can be emitted now. `seen(id, replaced)` is told about each
    /// match as it becomes final. A chunk with nothing to replace is passed on without a copy.
    pub fn push(&mut self, chunk: Bytes, seen: &mut dyn FnMut(usize, bool)) -> Bytes {
        let pats = self.pats.clone();
        let Some(ac) = pats.ac.as_ref() else {
            return chunk;
        };
        let buf: Bytes = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(&chunk);
            std::mem::take(&mut self.carry).freeze()
        };
        let mut hold = pats.hold_start(&buf, 0);
        // Fast path: no match that is final yet.
        if ac.find(&buf[..]).is_none_or(|m| m.start() >= hold) {
            self.carry.extend_from_slice(&buf[hold..]);
            return buf.slice(..hold);
        }
        let mut out = BytesMut::with_capacity(buf.len() + 64);
        let mut pos = 0;
        for m in ac.find_iter(&buf[..]) {
            // Held-back candidates inside a final match are consumed by it: the tail to hold is
            // the earliest possible match start after the last final match.
            if pos > hold {
                hold = pats.hold_start(&buf, pos);
            }
            // A match starting in the held tail may still grow or lose to a longer one; it is
            // found again next time.
            if m.start() >= hold {
                break;
            }
            let id = m.pattern().as_usize();
            match self.decide.replacement(id) {
                Some(to) => {
                    seen(id, true);
                    out.extend_from_slice(&buf[pos..m.start()]);
                    out.extend_from_slice(to);
                }
                None => {
                    seen(id, false);
                    out.extend_from_slice(&buf[pos..m.end()]);
                }
            }
            pos = m.end();
        }
        if pos > hold {
            hold = pats.hold_start(&buf, pos);
        }
        out.extend_from_slice(&buf[pos..hold]);
        self.carry.extend_from_slice(&buf[hold..]);
        out.freeze()
    }

    /// Rewrites one complete value (e.g. a trailer) with this stream's patterns and decisions.
    pub fn rewrite_value(&self, v: &[u8], seen: &mut dyn FnMut(usize, bool)) -> Option<Vec<u8>> {
        self.pats.rewrite_all(v, self.decide.as_ref(), seen)
    }

    /// End of stream: everything held back is final now.
    pub fn finish(&mut self, seen: &mut dyn FnMut(usize, bool)) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        if buf.is_empty() {
            return Bytes::new();
        }
        match self.pats.rewrite_all(&buf, self.decide.as_ref(), seen) {
            Some(v) => Bytes::from(v),
            None => buf.freeze(),
        }
    }
}

/// Replaces every occurrence of each `from[i]` by `to[i]` (no scope, no conditions).
pub struct Fixed(pub Vec<Box<[u8]>>);

impl Decide for Fixed {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        self.0.get(id).map(|b| &b[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(pairs: &[(&str, &str)]) -> StreamRewriter {
        let pats = Patterns::new(
            pairs
                .iter()
                .map(|(f, _)| f.as_bytes().to_vec().into_boxed_slice())
                .collect(),
        )
        .unwrap();
        let to = Fixed(
            pairs
                .iter()
                .map(|(_, t)| t.as_bytes().to_vec().into_boxed_slice())
                .collect(),
        );
        StreamRewriter::new(Arc::new(pats), Arc::new(to))
    }

    fn run(r: &mut StreamRewriter, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seen = |_: usize, _: bool| {};
        for c in chunks {
            out.extend_from_slice(&r.push(Bytes::copy_from_slice(c), &mut seen));
        }
        out.extend_from_slice(&r.finish(&mut seen));
        out
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let pairs = [("kz_masked_abc", "REAL-1"), ("kz_masked_abcdef", "REAL-2")];
        let input = b"x kz_masked_abc y kz_masked_abcdef z kz_masked_ab kz_masked_abc";
        let want = b"x REAL-1 y REAL-2 z kz_masked_ab REAL-1".to_vec();
        for i in 0..input.len() {
            for j in i..input.len() {
                let mut r = rw(&pairs);
                let got = run(&mut r, &[&input[..i], &input[i..j], &input[j..]]);
                assert_eq!(got, want, "split at {i},{j}");
            }
        }
        // One byte at a time.
        let mut r = rw(&pairs);
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&mut r, &chunks), want);
    }

    #[test]
    fn random_splits_match_the_one_shot_rewrite() {
        use rand::Rng;
        let pairs = [("aba", "X"), ("abab", "YY"), ("bb", ""), ("ba", "Z")];
        let pats = Arc::new(
            Patterns::new(
                pairs
                    .iter()
                    .map(|(f, _)| f.as_bytes().to_vec().into_boxed_slice())
                    .collect(),
            )
            .unwrap(),
        );
        let to: Arc<dyn Decide> = Arc::new(Fixed(
            pairs
                .iter()
                .map(|(_, t)| t.as_bytes().to_vec().into_boxed_slice())
                .collect(),
        ));
        let mut rng = rand::rng();
        for _ in 0..3000 {
            let len = rng.random_range(0..60);
            let input: Vec<u8> = (0..len)
                .map(|_| if rng.random_bool(0.5) { b'a' } else { b'b' })
                .collect();
            let want = pats
                .rewrite_all(&input, to.as_ref(), &mut |_, _| {})
                .unwrap_or_else(|| input.clone());
            let mut r = StreamRewriter::new(pats.clone(), to.clone());
            let mut got = Vec::new();
            let mut rest = &input[..];
            let mut splits = Vec::new();
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len());
                splits.push(String::from_utf8_lossy(&rest[..n]).into_owned());
                got.extend_from_slice(&r.push(Bytes::copy_from_slice(&rest[..n]), &mut |_, _| {}));
                rest = &rest[n..];
            }
            got.extend_from_slice(&r.finish(&mut |_, _| {}));
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "chunks {splits:?}"
            );
        }
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut r = rw(&[("secret-value", "kz_masked_1")]);
        let mut seen = |_: usize, _: bool| {};
        // "data: hi\n\n" cannot start the pattern: emitted whole, nothing held.
        assert_eq!(
            &r.push(Bytes::from_static(b"data: hi\n\n"), &mut seen)[..],
            b"data: hi\n\n"
        );
        assert_eq!(r.held(), 0);
        let out = r.push(Bytes::from_static(b"abc secr"), &mut seen);
        assert_eq!(&out[..], b"abc ");
        assert_eq!(r.held(), 4);
        let out = r.push(Bytes::from_static(b"et-value!"), &mut seen);
        assert_eq!(&out[..], b"kz_masked_1!");
    }

    #[test]
    fn memory_is_bounded_by_the_longest_pattern() {
        let mut r = rw(&[("aaaaaaaaab", "X")]);
        let mut seen = |_: usize, _: bool| {};
        for _ in 0..10_000 {
            let _ = r.push(
                Bytes::from_static(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
                &mut seen,
            );
            assert!(r.held() < 10);
        }
    }

    #[test]
    fn kept_matches_are_reported() {
        struct Keep;
        impl Decide for Keep {
            fn replacement(&self, _: usize) -> Option<&[u8]> {
                None
            }
        }
        let pats = Patterns::new(vec![b"tok".to_vec().into_boxed_slice()]).unwrap();
        let mut r = StreamRewriter::new(Arc::new(pats), Arc::new(Keep));
        let mut hits = Vec::new();
        let mut seen = |id: usize, rep: bool| hits.push((id, rep));
        let mut out = r.push(Bytes::from_static(b"a to"), &mut seen).to_vec();
        out.extend_from_slice(&r.push(Bytes::from_static(b"k b"), &mut seen));
        out.extend_from_slice(&r.finish(&mut seen));
        assert_eq!(out, b"a tok b");
        assert_eq!(hits, vec![(0, false)]);
    }
}
