//! Typed reads of a resolver's settings (a JSON object built from TOML or YAML), with errors
//! that name the resolver kind and the key. Credentials read here become [`Secret`]s at once.

use super::ResolveError;
use crate::secret::Secret;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Settings every kind accepts.
pub const COMMON: &[&str] = &["timeout", "retries", "cache_ttl"];

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_RETRIES: u32 = 2;
const MAX_RETRIES: u32 = 10;

/// The common settings, validated.
#[derive(Debug, Clone)]
pub struct Common {
    pub timeout: Duration,
    pub retries: u32,
    pub cache_ttl: Option<Duration>,
}

impl Common {
    pub fn read(kind: &str, s: &Map<String, Value>) -> Result<Self, ResolveError> {
        let timeout = match seconds(kind, s, "timeout")? {
            None => DEFAULT_TIMEOUT,
            Some(d) if d.is_zero() => {
                return Err(bad(kind, "timeout", "must be greater than 0"));
            }
            Some(d) => d,
        };
        let retries = match uint(kind, s, "retries")? {
            None => DEFAULT_RETRIES,
            Some(n) if n > u64::from(MAX_RETRIES) => {
                return Err(bad(
                    kind,
                    "retries",
                    &format!("must be at most {MAX_RETRIES}"),
                ));
            }
            Some(n) => u32::try_from(n).unwrap_or(MAX_RETRIES),
        };
        let cache_ttl = seconds(kind, s, "cache_ttl")?.filter(|d| !d.is_zero());
        Ok(Self {
            timeout,
            retries,
            cache_ttl,
        })
    }
}

impl Default for Common {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            cache_ttl: None,
        }
    }
}

pub fn bad(kind: &str, key: &str, why: &str) -> ResolveError {
    ResolveError::Config(format!("{kind}: setting `{key}` {why}"))
}

/// A string setting; numbers are not silently turned into strings.
pub fn string(
    kind: &str,
    s: &Map<String, Value>,
    key: &str,
) -> Result<Option<String>, ResolveError> {
    match s.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => Ok(Some(v.clone())),
        Some(_) => Err(bad(kind, key, "must be a string")),
    }
}

/// A string setting holding a credential. The type error never echoes the value.
pub fn secret(
    kind: &str,
    s: &Map<String, Value>,
    key: &str,
) -> Result<Option<Secret>, ResolveError> {
    match s.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(v)) => Ok(Some(Secret::new(v.clone()))),
        Some(_) => Err(bad(kind, key, "must be a string")),
    }
}

pub fn path(
    kind: &str,
    s: &Map<String, Value>,
    key: &str,
) -> Result<Option<PathBuf>, ResolveError> {
    Ok(string(kind, s, key)?.map(PathBuf::from))
}

pub fn uint(kind: &str, s: &Map<String, Value>, key: &str) -> Result<Option<u64>, ResolveError> {
    match s.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(kind, key, "must be a non-negative integer")),
        // YAML and env-derived settings sometimes carry numbers as strings.
        Some(Value::String(v)) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bad(kind, key, "must be a non-negative integer")),
        Some(_) => Err(bad(kind, key, "must be a non-negative integer")),
    }
}

pub fn boolean(
    kind: &str,
    s: &Map<String, Value>,
    key: &str,
) -> Result<Option<bool>, ResolveError> {
    match s.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(kind, key, "must be true or false")),
    }
}

/// A duration in seconds, integer or fractional (`timeout = 0.5`).
pub fn seconds(
    kind: &str,
    s: &Map<String, Value>,
    key: &str,
) -> Result<Option<Duration>, ResolveError> {
    let secs = match s.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(v)) => v.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match secs {
        Some(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => {
            Ok(Some(Duration::from_secs_f64(v)))
        }
        _ => Err(bad(
            kind,
            key,
            "must be a number of seconds between 0 and 86400",
        )),
    }
}

/// An environment variable as a fallback for a setting; empty counts as unset.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
