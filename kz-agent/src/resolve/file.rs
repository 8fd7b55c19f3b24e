//! `file`: a directory of files, one secret per file, like a Kubernetes secret volume or Docker
//! secrets (`path = "/var/run/secrets/app"`, `ref = "api-key"`). Symlinks inside the directory
//! (Kubernetes' `..data` indirection) are followed; nothing outside the directory is readable.

use super::settings;
use super::{ResolveError, Resolver, SecretRequest};
use crate::secret::Secret;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use std::path::{Component, Path, PathBuf};
use zeroize::Zeroizing;

/// `path`: the directory; `trim_newline` (default true): drop one trailing newline, which
/// `echo value > file` and most secret tooling add.
pub(super) const SETTINGS: &[&str] = &["path", "trim_newline"];
const KIND: &str = "file";
const MAX_FILE: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct FileResolver {
    dir: PathBuf,
    trim_newline: bool,
}

impl FileResolver {
    pub fn new(s: &Map<String, Value>) -> Result<Self, ResolveError> {
        let dir = settings::path(KIND, s, "path")?.ok_or_else(|| {
            ResolveError::Config(format!(
                "{KIND}: setting `path` is required (the directory holding one file per secret)"
            ))
        })?;
        let trim_newline = settings::boolean(KIND, s, "trim_newline")?.unwrap_or(true);
        Ok(Self { dir, trim_newline })
    }

    fn lookup(&self, request: &SecretRequest) -> Result<Secret, ResolveError> {
        let fail = |message: String| ResolveError::Backend {
            backend: KIND.into(),
            reference: request.reference.clone(),
            message,
        };
        let rel = Path::new(&request.reference);
        let plain = !request.reference.is_empty()
            && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(fail(
                "the reference must be a relative file name inside the directory (no `..`, no absolute path)".into(),
            ));
        }
        let dir = self
            .dir
            .canonicalize()
            .map_err(|e| fail(format!("cannot open directory {}: {e}", self.dir.display())))?;
        let target = match dir.join(rel).canonicalize() {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ResolveError::NotFound {
                    backend: KIND.into(),
                    reference: request.reference.clone(),
                });
            }
            Err(e) => return Err(fail(format!("cannot open: {e}"))),
        };
        if !target.starts_with(&dir) {
            return Err(fail(format!(
                "it resolves (through a symlink) outside {}",
                dir.display()
            )));
        }
        let meta = std::fs::metadata(&target).map_err(|e| fail(format!("cannot open: {e}")))?;
        if !meta.is_file() {
            return Err(fail("it is not a regular file".into()));
        }
        if meta.len() > MAX_FILE {
            return Err(fail("the file is larger than 1 MiB".into()));
        }
        let bytes =
            Zeroizing::new(std::fs::read(&target).map_err(|e| fail(format!("cannot read: {e}")))?);
        let text =
            std::str::from_utf8(&bytes).map_err(|_| fail("the file is not UTF-8 text".into()))?;
        let mut value = text;
        if self.trim_newline {
            value = value
                .strip_suffix("\r\n")
                .or_else(|| value.strip_suffix('\n'))
                .unwrap_or(value);
        }
        match &request.field {
            None => Ok(Secret::new(value)),
            Some(field) => select_json_field(KIND, &request.reference, value, field),
        }
    }
}

/// `field` of a JSON object held in `text`. Errors never quote the text.
pub(super) fn select_json_field(
    backend: &str,
    reference: &str,
    text: &str,
    field: &str,
) -> Result<Secret, ResolveError> {
    let doc: Value = serde_json::from_str(text).map_err(|_| ResolveError::Backend {
        backend: backend.into(),
        reference: reference.into(),
        message: format!("field '{field}' was asked for but the secret is not a JSON object"),
    })?;
    let Value::Object(map) = &doc else {
        return Err(ResolveError::Backend {
            backend: backend.into(),
            reference: reference.into(),
            message: format!("field '{field}' was asked for but the secret is not a JSON object"),
        });
    };
    match map.get(field) {
        None => Err(ResolveError::FieldMissing {
            backend: backend.into(),
            reference: reference.into(),
            field: field.into(),
        }),
        Some(v) => Ok(Secret::new(json_scalar(v))),
    }
}

/// A JSON value as a secret string: strings as they are, anything else as compact JSON.
pub(super) fn json_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Resolver for FileResolver {
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

    fn resolver(dir: &Path) -> FileResolver {
        let mut s = Map::new();
        s.insert("path".into(), Value::String(dir.display().to_string()));
        FileResolver::new(&s).unwrap()
    }

    #[tokio::test]
    async fn reads_kubernetes_style_mounts_and_stays_inside() {
        let root = tempfile::tempdir().unwrap();
        let mount = root.path().join("mount");
        let data = mount.join("..2026_11_25");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("api-key"), "sk-file-secret-1\n").unwrap();
        std::fs::write(data.join("db"), r#"{"user":"app","password":"pw-file-2"}"#).unwrap();
        std::os::unix::fs::symlink("..2026_11_25", mount.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/api-key", mount.join("api-key")).unwrap();
        std::os::unix::fs::symlink("..data/db", mount.join("db")).unwrap();
        std::fs::write(root.path().join("outside"), "not-yours").unwrap();
        std::os::unix::fs::symlink("../outside", mount.join("escape")).unwrap();

        let r = resolver(&mount);
        let v = r.resolve(&SecretRequest::new("api-key")).await.unwrap();
        assert_eq!(v.expose(), "sk-file-secret-1");
        let v = r
            .resolve(&SecretRequest::new("db").with_field(Some("password".into())))
            .await
            .unwrap();
        assert_eq!(v.expose(), "pw-file-2");
        let err = r
            .resolve(&SecretRequest::new("db").with_field(Some("nope".into())))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "file: secret 'db' has no field 'nope'");
        let err = r
            .resolve(&SecretRequest::new("api-key").with_field(Some("x".into())))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a JSON object") && !err.contains("sk-file"),
            "{err}"
        );
        for bad in ["../outside", "/etc/passwd", "escape", ""] {
            let err = r
                .resolve(&SecretRequest::new(bad))
                .await
                .unwrap_err()
                .to_string();
            assert!(!err.contains("not-yours"), "{err}");
            assert!(err.contains("file:"), "{err}");
        }
        let err = r.resolve(&SecretRequest::new("missing")).await.unwrap_err();
        assert!(matches!(err, ResolveError::NotFound { .. }));
    }
}
