//! Secret-reference globs: `**` matches any number of whole segments (including none), `*` matches
//! within one segment, `?` matches one character other than `/`. Everything else is literal.
//!
//! Patterns are compiled once (bundle load) into tokens; matching is a table walk bounded by
//! pattern length × reference length.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `*`: any run of characters except `/`.
    Star,
    /// `?`: exactly one character except `/`.
    One,
    /// `**`: any run of characters including `/` (whole segments, see `compile`).
    Deep,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    toks: Vec<Tok>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("empty glob pattern; write the reference or a pattern such as 'team/**'")]
    Empty,
    #[error(
        "glob '{0}': '**' must be a whole path segment (like 'a/**/b' or 'a/**'); use '*' inside a segment"
    )]
    DeepInSegment(String),
    #[error("glob '{0}': '***' is not a pattern; use '**' for any depth or '*' for one segment")]
    TripleStar(String),
    #[error("glob '{0}': character classes ('[', ']') are not supported; use '?' or '*'")]
    CharClass(String),
}

impl Glob {
    pub fn compile(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError::Empty);
        }
        if pattern.contains("***") {
            return Err(GlobError::TripleStar(pattern.to_owned()));
        }
        if pattern.contains('[') || pattern.contains(']') {
            return Err(GlobError::CharClass(pattern.to_owned()));
        }
        for segment in pattern.split('/') {
            if segment.contains("**") && segment != "**" {
                return Err(GlobError::DeepInSegment(pattern.to_owned()));
            }
        }
        let mut toks = Vec::with_capacity(pattern.len());
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    // `a/**/b` must also match `a/b`: fold the following '/' into the deep
                    // token by making it optional (handled in `matches_at`).
                    toks.push(Tok::Deep);
                }
                '*' => toks.push(Tok::Star),
                '?' => toks.push(Tok::One),
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Self {
            source: pattern.to_owned(),
            toks,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the pattern has no wildcard: it only matches itself.
    pub fn is_literal(&self) -> bool {
        self.toks.iter().all(|t| matches!(t, Tok::Lit(_)))
    }

    /// Length of the literal prefix (KeyZero's "specificity" for choosing among resources).
    pub fn literal_prefix_len(&self) -> usize {
        self.toks
            .iter()
            .take_while(|t| matches!(t, Tok::Lit(_)))
            .count()
    }

    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        matches_at(&self.toks, &text)
    }
}

/// Dynamic programming over (token, position): O(tokens × chars), so no pattern can make a
/// request take exponential time. `ok[i][j]` = tokens `i..` match text `j..`.
fn matches_at(toks: &[Tok], text: &[char]) -> bool {
    let (m, n) = (toks.len(), text.len());
    let width = n + 1;
    let mut ok = vec![false; (m + 1) * width];
    ok[m * width + n] = true;
    for i in (0..m).rev() {
        for j in (0..=n).rev() {
            let here = text.get(j);
            let next = |ii: usize, jj: usize| ok[ii * width + jj];
            let v = match &toks[i] {
                Tok::Lit(c) => here == Some(c) && next(i + 1, j + 1),
                Tok::One => matches!(here, Some(c) if *c != '/') && next(i + 1, j + 1),
                Tok::Star => {
                    next(i + 1, j) || (matches!(here, Some(c) if *c != '/') && next(i, j + 1))
                }
                Tok::Deep => {
                    // `**/` may also match nothing at all, so `a/**/b` matches `a/b`.
                    let skip_slash = toks.get(i + 1) == Some(&Tok::Lit('/')) && next(i + 2, j);
                    next(i + 1, j) || skip_slash || (here.is_some() && next(i, j + 1))
                }
            };
            ok[i * width + j] = v;
        }
    }
    ok[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Glob::compile(p).unwrap().matches(t)
    }

    #[test]
    fn deep_star_and_question() {
        assert!(m("secret/data/api/**", "secret/data/api/x"));
        assert!(m("secret/data/api/**", "secret/data/api/x/y/z"));
        assert!(!m("secret/data/api/**", "secret/data/apix"));
        assert!(m("a/**/b", "a/b"));
        assert!(m("a/**/b", "a/x/y/b"));
        assert!(!m("a/**/b", "a/x/y/c"));
        assert!(m("a/*/c", "a/b/c"));
        assert!(!m("a/*/c", "a/b/x/c"));
        assert!(m("a/*", "a/"));
        assert!(m("a/?x", "a/bx"));
        assert!(!m("a/?x", "a//x"));
        assert!(!m("a/?", "a/bc"));
        assert!(m("**", "anything/at/all"));
        assert!(m("exact/ref", "exact/ref"));
        assert!(!m("exact/ref", "exact/ref2"));
    }

    #[test]
    fn bad_patterns_are_specific_errors() {
        assert_eq!(Glob::compile(""), Err(GlobError::Empty));
        assert!(matches!(
            Glob::compile("a/b**"),
            Err(GlobError::DeepInSegment(_))
        ));
        assert!(matches!(
            Glob::compile("a/***"),
            Err(GlobError::TripleStar(_))
        ));
        assert!(matches!(
            Glob::compile("a/[bc]"),
            Err(GlobError::CharClass(_))
        ));
    }

    #[test]
    fn specificity() {
        let g = Glob::compile("payments/stripe/*").unwrap();
        assert_eq!(g.literal_prefix_len(), "payments/stripe/".len());
        assert!(!g.is_literal());
        assert!(Glob::compile("a/b").unwrap().is_literal());
    }

    #[test]
    fn pathological_pattern_stays_fast() {
        let g = Glob::compile("*a*a*a*a*a*a*b").unwrap();
        let text = "a".repeat(30);
        let start = std::time::Instant::now();
        assert!(!g.matches(&text));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }
}
