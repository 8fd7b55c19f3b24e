//! `env_file`: the secret is a `KEY=VALUE` line of a dotenv file (`path` setting). The file is
//! read at each lookup, so rotated values are picked up; its contents never appear in errors.

use super::settings;
use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use std::path::PathBuf;
use zeroize::Zeroizing;

pub(super) const SETTINGS: &[&str] = &["path"];
const KIND: &str = "env_file";
const MAX_FILE: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct EnvFileResolver {
    path: PathBuf,
}

impl EnvFileResolver {
    pub fn new(s: &Map<String, Value>) -> Result<Self, ResolveError> {
        let path = settings::path(KIND, s, "path")?.ok_or_else(|| {
            ResolveError::Config(format!(
                "{KIND}: setting `path` is required (the dotenv file to read)"
            ))
        })?;
        Ok(Self { path })
    }

    fn lookup(&self, request: &SecretRequest) -> Result<Secret, ResolveError> {
        let fail = |message: String| ResolveError::Backend {
            backend: KIND.into(),
            reference: request.reference.clone(),
            message,
        };
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| fail(format!("cannot read {}: {e}", self.path.display())))?;
        if meta.len() > MAX_FILE {
            return Err(fail(format!(
                "{} is larger than 1 MiB; is it really a dotenv file?",
                self.path.display()
            )));
        }
        let contents = Zeroizing::new(
            std::fs::read_to_string(&self.path)
                .map_err(|e| fail(format!("cannot read {}: {e}", self.path.display())))?,
        );
        match parse_value(&contents, &request.reference) {
            Some(v) => Ok(Secret::new(v)),
            None => Err(ResolveError::NotFound {
                backend: KIND.into(),
                reference: request.reference.clone(),
            }),
        }
    }
}

/// The value of `key` in dotenv text: `KEY=VALUE`, optional `export `, `#` comments, values in
/// single quotes (literal) or double quotes (`\n`, `\"`, `\\` escapes). The last definition wins.
fn parse_value(contents: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in contents.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() != key {
            continue;
        }
        found = Some(unquote(v.trim()));
    }
    found
}

fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
        return v[1..v.len() - 1].to_owned();
    }
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        let mut out = String::with_capacity(v.len());
        let mut chars = v[1..v.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    // Unquoted: an inline comment starts at ` #`.
    match v.find(" #") {
        Some(i) => v[..i].trim_end().to_owned(),
        None => v.to_owned(),
    }
}

impl Resolver for EnvFileResolver {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn resolve<'a>(
        &'a self,
        request: &'a SecretRequest,
    ) -> BoxFuture<'a, Result<Secret, ResolveError>> {
        Box::pin(async move { self.lookup(request) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dotenv_forms() {
        let text =
            "# c\nA=1\nexport B = two \nC='x y # z'\nD=\"l1\\nl2\"\nE=v # note\nA=last\nbad line\n";
        assert_eq!(parse_value(text, "A").as_deref(), Some("last"));
        assert_eq!(parse_value(text, "B").as_deref(), Some("two"));
        assert_eq!(parse_value(text, "C").as_deref(), Some("x y # z"));
        assert_eq!(parse_value(text, "D").as_deref(), Some("l1\nl2"));
        assert_eq!(parse_value(text, "E").as_deref(), Some("v"));
        assert_eq!(parse_value(text, "F"), None);
    }

    #[tokio::test]
    async fn missing_key_and_missing_file_never_show_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "TOKEN=sk-live-envfile-123\n").unwrap();
        let mut s = Map::new();
        s.insert("path".into(), Value::String(path.display().to_string()));
        let r = EnvFileResolver::new(&s).unwrap();
        let v = r.resolve(&SecretRequest::new("TOKEN")).await.unwrap();
        assert_eq!(v.expose(), "sk-live-envfile-123");
        let err = r.resolve(&SecretRequest::new("NOPE")).await.unwrap_err();
        assert_eq!(err.to_string(), "env_file: secret 'NOPE' not found");
        std::fs::remove_file(&path).unwrap();
        let err = r.resolve(&SecretRequest::new("TOKEN")).await.unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
