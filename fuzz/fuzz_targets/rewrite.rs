//! The streaming rewriter (`egress::rewrite`) against the one-shot replacement.
//!
//! Property: for every way of cutting the input into chunks, `StreamRewriter::push` + `finish`
//! writes exactly what `Patterns::rewrite_all` writes for the whole input, and reports the same
//! matches in the same order. A difference would mean a value straddling a chunk boundary leaks
//! (or a token is not swapped), the bug class the hold-back logic exists to prevent.
//!
//! Input: lines until an empty line, each `pattern` (matched, kept as it is) or
//! `pattern\treplacement`; every byte after the empty line is the stream. Readable, so seeds
//! can be written from the unit tests' cases.

#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use kz_agent::egress::rewrite::{Decide, Patterns, StreamRewriter};
use libfuzzer_sys::fuzz_target;

/// Replacement per pattern; `None` keeps the match (a token out of scope).
struct Plan(Vec<Option<Box<[u8]>>>);

impl Decide for Plan {
    fn replacement(&self, id: usize) -> Option<&[u8]> {
        self.0.get(id).and_then(|r| r.as_deref())
    }
}

/// Longest stream checked at every two-chunk split (quadratic; longer inputs get a sample).
const EVERY_SPLIT_UP_TO: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((pats, plan, stream)) = parse(data) else {
        return;
    };
    let Ok(pats) = Patterns::new(pats) else {
        return;
    };
    let pats = Arc::new(pats);
    let plan: Arc<dyn Decide> = Arc::new(Plan(plan));

    let mut want_seen = Vec::new();
    let want = pats
        .rewrite_all(stream, plan.as_ref(), &mut |id, r| want_seen.push((id, r)))
        .unwrap_or_else(|| stream.to_vec());

    let check = |cuts: &[usize]| {
        let mut rw = StreamRewriter::new(pats.clone(), plan.clone());
        let mut got = Vec::new();
        let mut seen = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let chunk = Bytes::copy_from_slice(&stream[from..cut]);
            got.extend_from_slice(&rw.push(chunk, &mut |id, r| seen.push((id, r))));
            assert!(
                rw.held() < pats.max_len().max(1),
                "held {} bytes, longest pattern {}",
                rw.held(),
                pats.max_len()
            );
            from = cut;
        }
        got.extend_from_slice(&rw.finish(&mut |id, r| seen.push((id, r))));
        assert_eq!(got, want, "output differs for cuts {cuts:?}");
        assert_eq!(seen, want_seen, "matches differ for cuts {cuts:?}");
    };

    // One chunk, every single cut, every byte alone, and a pseudo-random cut set from the data.
    check(&[]);
    let n = stream.len();
    if n <= EVERY_SPLIT_UP_TO {
        for cut in 1..n {
            check(&[cut]);
        }
    } else {
        for cut in (1..n).step_by(n / EVERY_SPLIT_UP_TO + 1) {
            check(&[cut]);
        }
    }
    let bytewise: Vec<usize> = (1..n).collect();
    check(&bytewise);
    let mut cuts = Vec::new();
    let mut at = 0usize;
    for &b in stream.iter().take(64) {
        at += usize::from(b % 7) + 1;
        if at >= n {
            break;
        }
        cuts.push(at);
    }
    check(&cuts);
});

type Parsed<'a> = (Vec<Box<[u8]>>, Vec<Option<Box<[u8]>>>, &'a [u8]);

fn parse(data: &[u8]) -> Option<Parsed<'_>> {
    let mut pats = Vec::new();
    let mut plan = Vec::new();
    let mut rest = data;
    loop {
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let line = &rest[..nl];
        rest = &rest[nl + 1..];
        if line.is_empty() {
            break;
        }
        if pats.len() == 16 {
            return None;
        }
        match line.iter().position(|&b| b == b'\t') {
            Some(tab) => {
                pats.push(line[..tab].into());
                plan.push(Some(line[tab + 1..].into()));
            }
            None => {
                pats.push(line.into());
                plan.push(None);
            }
        }
    }
    if rest.len() > 4096 {
        return None;
    }
    Some((pats, plan, rest))
}
