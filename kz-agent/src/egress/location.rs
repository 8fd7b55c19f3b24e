//! Where a credential goes in an outgoing request: KeyZero's `credential_location`
//! (`header:NAME[:PREFIX]`), plus kz's `query:PARAM`, and the one percent-encoder kz uses when
//! it writes a value into a URL.
//!
//! Two readers of the same vocabulary:
//! - [`Location`], where kz *injects* a value it holds (MCP `fetch`, the PDP's exchange proxy):
//!   one parser for the bundle (checked at load, with file:line:col) and both injectors, so a
//!   location the bundle accepts is one every injector understands.
//! - [`Places`], where the swapping proxy lets an agent's masked token be *swapped* for the real
//!   value (a `.keyzero.toml` secret's `credential_location`, one entry or a list): the
//!   injection vocabulary plus `basic` (user:password inside `Authorization: Basic`), `path` (a
//!   URL path segment) and `body` (opt-in). A token found anywhere else is not swapped: an agent
//!   that writes its token into a query string, a JSON body or a header the upstream echoes
//!   cannot make kz put the real value where it can be read back.

use http::HeaderName;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error(
        "credential_location `{0}` is not `header:NAME[:PREFIX]` or `query:PARAM` (e.g. \
         `header:Authorization:Bearer`, `header:X-Api-Key`, `query:api_key`)"
    )]
    Invalid(String),
    #[error(
        "credential_location `{0}` is not `header:NAME[:PREFIX]`, `basic`, `query:PARAM`, \
         `path` or `body` (e.g. `header:Authorization:Bearer`, `[\"header:X-Api-Key\", \"query:key\"]`)"
    )]
    Place(String),
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

/// One place a masked token may be swapped (see [`Places`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// `header:NAME[:PREFIX]`: in header NAME; with a prefix the value must be exactly
    /// `PREFIX TOKEN` (the prefix compared case-insensitively, as HTTP auth schemes are).
    Header { name: HeaderName, prefix: String },
    /// `basic`: inside the base64 `user:password` of `Authorization: Basic` (either half).
    Basic,
    /// `query:PARAM`: the value of query parameter PARAM.
    Query { param: String },
    /// `path`: inside the URL path (a segment such as `/bot<TOKEN>/sendMessage`).
    Path,
    /// `body`: in the request body (opt-in: a body is where an agent writes what an upstream
    /// will store and show back, an issue comment, a gist, a chat message).
    Body,
}

/// Where one secret's masked token may be swapped for its real value. The default (a secret
/// without `credential_location`) is headers only: any header, and `Authorization: Basic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Places {
    /// Any header at all (the default, and [`Places::everywhere`]).
    any_header: bool,
    list: Vec<Place>,
}

impl Default for Places {
    fn default() -> Self {
        Self {
            any_header: true,
            list: vec![Place::Basic],
        }
    }
}

impl Places {
    /// Parses a secret's `credential_location` entries (an empty list is the default).
    pub fn parse<S: AsRef<str>>(specs: &[S]) -> Result<Self, LocationError> {
        if specs.is_empty() {
            return Ok(Self::default());
        }
        let list = specs
            .iter()
            .map(|s| {
                let spec = s.as_ref();
                match spec {
                    "basic" => Ok(Place::Basic),
                    "path" => Ok(Place::Path),
                    "body" => Ok(Place::Body),
                    _ => match Location::parse(spec) {
                        Ok(Location::Header { name, prefix }) => Ok(Place::Header {
                            name: HeaderName::from_bytes(name.as_bytes())
                                .map_err(|_| LocationError::Place(spec.to_owned()))?,
                            prefix,
                        }),
                        Ok(Location::Query { param }) => Ok(Place::Query { param }),
                        Err(_) => Err(LocationError::Place(spec.to_owned())),
                    },
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            any_header: false,
            list,
        })
    }

    /// Every place a token can appear except query parameters (which are named one by one):
    /// any header, Basic, the path and the body. For tools and tests that swap wherever a
    /// token is written.
    pub fn everywhere() -> Self {
        Self {
            any_header: true,
            list: vec![Place::Basic, Place::Path, Place::Body],
        }
    }

    /// Adds `query:PARAM`.
    pub fn with_query(mut self, param: &str) -> Self {
        self.list.push(Place::Query {
            param: param.to_owned(),
        });
        self
    }

    /// May `token` be swapped where it appears in header `name` whose whole value is `value`?
    pub fn header(&self, name: &HeaderName, value: &[u8], token: &[u8]) -> bool {
        self.any_header
            || self.list.iter().any(|p| match p {
                Place::Header { name: n, prefix } if n == name => {
                    prefix.is_empty() || is_prefixed(value, prefix.as_bytes(), token)
                }
                _ => false,
            })
    }

    pub fn basic(&self) -> bool {
        self.list.contains(&Place::Basic)
    }

    /// May a token be swapped as (part of) the value of query parameter `param` (raw, as it
    /// appears in the URL)?
    pub fn query(&self, param: &[u8]) -> bool {
        self.list.iter().any(|p| match p {
            Place::Query { param: q } => percent_decode(param).as_deref() == Some(q.as_bytes()),
            _ => false,
        })
    }

    pub fn path(&self) -> bool {
        self.list.contains(&Place::Path)
    }

    pub fn body(&self) -> bool {
        self.list.contains(&Place::Body)
    }

    /// Whether a token can arrive in the request head (what `require = true` checks): false for
    /// `credential_location = ["body"]`.
    pub fn in_head(&self) -> bool {
        self.any_header || self.list.iter().any(|p| *p != Place::Body)
    }
}

impl fmt::Display for Places {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.any_header {
            parts.push("any header".into());
        }
        for p in &self.list {
            parts.push(match p {
                Place::Header { name, prefix } if prefix.is_empty() => format!("header:{name}"),
                Place::Header { name, prefix } => format!("header:{name}:{prefix}"),
                Place::Basic => "basic".into(),
                Place::Query { param } => format!("query:{param}"),
                Place::Path => "path".into(),
                Place::Body => "body".into(),
            });
        }
        f.write_str(&parts.join(", "))
    }
}

/// `value` is exactly `PREFIX TOKEN` (surrounding whitespace ignored, one or more spaces or tabs
/// between, prefix case-insensitive).
fn is_prefixed(value: &[u8], prefix: &[u8], token: &[u8]) -> bool {
    let v = value.trim_ascii();
    let Some((p, rest)) = v.split_at_checked(prefix.len()) else {
        return false;
    };
    p.eq_ignore_ascii_case(prefix)
        && rest.first().is_some_and(|b| matches!(b, b' ' | b'\t'))
        && rest.trim_ascii() == token
}

/// Decodes `%XX` escapes (and `+` as a space, as form encoding writes it); `None` for a bad
/// escape.
pub fn percent_decode(v: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'%' => {
                let hex = v.get(i + 1..i + 3)?;
                let s = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(s, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
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
