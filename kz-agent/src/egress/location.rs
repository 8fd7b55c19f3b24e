//! Where a credential goes in an outgoing request: KeyZero's `credential_location`
//! (`header:NAME[:PREFIX]`), plus kz's `query:PARAM`, and the one percent-encoder kz uses when
//! it writes a value into a URL.
//!
//! One parser for the bundle (checked at load, with file:line:col), MCP `fetch` and the PDP's
//! exchange proxy, so a location the bundle accepts is one every injector understands. Issue 14
//! extends the vocabulary (`basic`, `path`, `body`) here.

use http::HeaderName;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error(
        "credential_location `{0}` is not `header:NAME[:PREFIX]` or `query:PARAM` (e.g. \
         `header:Authorization:Bearer`, `header:X-Api-Key`, `query:api_key`)"
    )]
    Invalid(String),
}

/// A parsed `credential_location`. The header name keeps the spelling it was written with
/// (messages and `Display` show it); [`Location::header_name`] gives the wire name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `header:NAME[:PREFIX]`: `NAME: PREFIX value` (`NAME: value` with no prefix).
    Header { name: String, prefix: String },
    /// `query:PARAM`: `?PARAM=value` appended to the URL.
    Query { param: String },
}

impl Location {
    /// KeyZero's default: a Bearer token in `Authorization`.
    pub const DEFAULT: &'static str = "header:Authorization:Bearer";

    pub fn parse(spec: &str) -> Result<Self, LocationError> {
        let bad = || LocationError::Invalid(spec.to_owned());
        let mut parts = spec.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("header"), Some(name), prefix) if !name.is_empty() => {
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(bad());
                }
                Ok(Self::Header {
                    name: name.to_owned(),
                    prefix: prefix.unwrap_or("").to_owned(),
                })
            }
            (Some("query"), Some(param), None) if !param.is_empty() => Ok(Self::Query {
                param: param.to_owned(),
            }),
            _ => Err(bad()),
        }
    }

    /// The header this location writes, as it goes on the wire (lower-case). `None` for a
    /// query location.
    pub fn header_name(&self) -> Option<HeaderName> {
        match self {
            // Checked by `parse`; a location built by hand with a bad name just has no header.
            Self::Header { name, .. } => HeaderName::from_bytes(name.as_bytes()).ok(),
            Self::Query { .. } => None,
        }
    }

    /// The header value carrying `secret`: `PREFIX secret`, or `secret` alone.
    pub fn header_value(prefix: &str, secret: &str) -> String {
        if prefix.is_empty() {
            secret.to_owned()
        } else {
            format!("{prefix} {secret}")
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header { name, prefix } if prefix.is_empty() => write!(f, "header:{name}"),
            Self::Header { name, prefix } => write!(f, "header:{name}:{prefix}"),
            Self::Query { param } => write!(f, "query:{param}"),
        }
    }
}

/// Which bytes [`percent_encode`] leaves as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// RFC 3986 unreserved (`A-Z a-z 0-9 - . _ ~`): what kz writes when it puts a value into a
    /// URL (the proxy's swap into a path or query, the PDP's `query:` injection).
    Unreserved,
    /// ASCII letters and digits only: the strictest encoder an upstream may echo a value with
    /// (the form MCP `fetch` scrubs besides the raw value).
    Alphanumeric,
}

/// Percent-encodes `v` (upper-case hex, as RFC 3986 recommends).
pub fn percent_encode(v: &[u8], keep: Keep) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(v.len());
    for &b in v {
        let kept = b.is_ascii_alphanumeric()
            || (keep == Keep::Unreserved && matches!(b, b'-' | b'.' | b'_' | b'~'));
        if kept {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse(Location::DEFAULT).unwrap(),
            Location::Header {
                name: "Authorization".into(),
                prefix: "Bearer".into()
            }
        );
        let key = Location::parse("header:X-Api-Key").unwrap();
        assert_eq!(
            key,
            Location::Header {
                name: "X-Api-Key".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            key.header_name(),
            Some(HeaderName::from_static("x-api-key"))
        );
        // An empty prefix is no prefix.
        assert_eq!(Location::parse("header:X-Api-Key:").unwrap(), key);
        assert_eq!(
            Location::parse("query:api_key").unwrap(),
            Location::Query {
                param: "api_key".into()
            }
        );
        for bad in [
            "",
            "header",
            "header:",
            "cookie:x",
            "header:bad name",
            "query:",
            "query:a:b",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
        let e = Location::parse("cookie:x").unwrap_err().to_string();
        assert!(e.contains("`cookie:x`") && e.contains("query:PARAM"), "{e}");
        for spec in [Location::DEFAULT, "header:X-Api-Key", "query:key"] {
            assert_eq!(Location::parse(spec).unwrap().to_string(), spec);
        }
        assert_eq!(Location::header_value("Bearer", "v"), "Bearer v");
        assert_eq!(Location::header_value("", "v"), "v");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(
            percent_encode(b"a-b.c_d~e f/+\"\xff", Keep::Unreserved),
            "a-b.c_d~e%20f%2F%2B%22%FF"
        );
        assert_eq!(
            percent_encode(b"sk/live+1\"x-y", Keep::Alphanumeric),
            "sk%2Flive%2B1%22x%2Dy"
        );
    }
}
