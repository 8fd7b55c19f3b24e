//! `.keyzero.toml`, read exactly as KeyZero 0.3 reads it, plus kz's additions.
//!
//! - Found by walking up from the current directory (or `--dir`): the first directory holding
//!   `.keyzero.local.toml` or `.keyzero.toml`. When the local file exists it is the config (its
//!   secrets replace the shared file's); it inherits `[resolvers]` settings it does not set from
//!   `.keyzero.toml`, and kz warns when the two files declare different secrets.
//! - `~/.config/keyzero/config.toml` fills in `[resolvers.NAME]` settings the project leaves out.
//! - `[secrets.VAR] {resolver, ref, field?, allow_empty?, …}`; environment sections
//!   `[production.secrets]` chosen by KEYZERO_ENV, then NODE_ENV, RAILS_ENV, APP_ENV, RACK_ENV,
//!   default `development`; a bare `[secrets]` is the development environment.
//! - kz additions: per-secret `hosts = ["api.github.com"]` (where its masked token may be
//!   swapped), `credential_location` (where in a request: `"header:NAME[:PREFIX]"`, `"basic"`,
//!   `"query:PARAM"`, `"path"`, `"body"`, one or a list; default headers only), `require = true`
//!   (requests to its hosts must carry its token), `allow_plaintext = true` (cleartext HTTP may
//!   carry it), and the `[blind]` options (see [`blind`]).
//!
//! Errors carry `file:line:column`. Unknown keys are errors with a "did you mean" hint (KeyZero
//! silently ignores them, which turns a typo into a secret that is never scoped).

pub mod approval;
pub mod blind;

pub use blind::{BlindConfig, ConnectionRule, HostPattern, in_scope};

use crate::egress::location::Places;
use crate::resolve::{self, ResolveError, Resolver, SecretRequest};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub const CONFIG_FILENAME: &str = ".keyzero.toml";
pub const LOCAL_CONFIG_FILENAME: &str = ".keyzero.local.toml";
pub const DEFAULT_ENVIRONMENT: &str = "development";
const ENV_DETECTION_ORDER: &[&str] = &[
    "KEYZERO_ENV",
    "NODE_ENV",
    "RAILS_ENV",
    "APP_ENV",
    "RACK_ENV",
];
const TOP_LEVEL: &[&str] = &["resolvers", "secrets", "blind"];
/// Keys of a `[secrets.VAR]` entry. Besides ours, KeyZero's per-request parameters are kept and
/// passed to the resolver (`secret_name`, `secret_id`, `path`, `role_arn`, `duration_seconds`).
const SECRET_KEYS: &[&str] = &[
    "resolver",
    "ref",
    "field",
    "allow_empty",
    "hosts",
    "credential_location",
    "require",
    "allow_plaintext",
    "description",
    "secret_name",
    "secret_id",
    "path",
    "role_arn",
    "duration_seconds",
    "version_stage",
];

/// Where something is in a config file, printed `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no config file found in {} or its parents: expected '{LOCAL_CONFIG_FILENAME}' or '{CONFIG_FILENAME}' (create one with `kz init`)",
        dir.display()
    )]
    NotFound { dir: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
    #[error("{}: environment {env:?} not found in config (available: {available:?}); set KEYZERO_ENV to one of them", path.display())]
    EnvironmentNotFound {
        path: PathBuf,
        env: String,
        available: Vec<String>,
    },
    #[error("secret(s) not found in config: {0}")]
    UnknownSecrets(String),
    #[error("resolver '{name}': {source}")]
    Resolver {
        name: String,
        #[source]
        source: ResolveError,
    },
}

/// A `[resolvers.NAME]` table: its `type` (defaults to NAME) and its other settings as JSON.
#[derive(Debug, Clone, Default)]
pub struct ResolverConfig {
    pub kind: Option<String>,
    pub settings: Map<String, Value>,
    pub location: Option<Location>,
}

/// One `[secrets.VAR]` entry.
#[derive(Debug, Clone)]
pub struct SecretEntry {
    pub resolver: String,
    pub reference: String,
    pub field: Option<String>,
    pub allow_empty: bool,
    /// kz: hosts this secret's masked token may be swapped for (empty = the allowed connections).
    pub hosts: Vec<String>,
    /// kz: where in a request the token may be swapped (`credential_location`).
    pub places: Places,
    /// kz: a request to one of `hosts` must carry the token (`require = true`).
    pub require: bool,
    /// kz: cleartext HTTP may carry the real value (`allow_plaintext = true`).
    pub allow_plaintext: bool,
    /// KeyZero's extra request parameters (`secret_name`, `secret_id`, …).
    pub params: BTreeMap<String, String>,
    pub location: Location,
}

impl SecretEntry {
    pub fn request(&self) -> SecretRequest {
        SecretRequest {
            reference: self.reference.clone(),
            field: self.field.clone(),
            params: self.params.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The directory holding the config file.
    pub dir: PathBuf,
    /// Which file was used: `.keyzero.local.toml` or `.keyzero.toml`.
    pub file_name: &'static str,
    pub environment: String,
    pub resolvers: BTreeMap<String, ResolverConfig>,
    pub secrets: BTreeMap<String, SecretEntry>,
    pub blind: BlindConfig,
    /// Things the user should know (local/shared drift, an ignored broken shared file).
    pub warnings: Vec<String>,
}

/// Prints the config's warnings on stderr, one `warning: …` line each: every command that
/// loads the config shows them before its own output.
pub fn print_warnings(config: &Config) {
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
}

/// Reads environment variables; tests pass a closure instead of mutating the process env.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The environment: KEYZERO_ENV, NODE_ENV, RAILS_ENV, APP_ENV, RACK_ENV (first non-blank),
/// else `development`.
pub fn detect_environment(env: EnvLookup<'_>) -> String {
    ENV_DETECTION_ORDER
        .iter()
        .filter_map(|v| env(v))
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned())
}

/// The first of `start` and its ancestors holding a config file.
pub fn find_dir(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join(LOCAL_CONFIG_FILENAME).is_file() || d.join(CONFIG_FILENAME).is_file())
        .map(Path::to_path_buf)
}

/// `$XDG_CONFIG_HOME/keyzero/config.toml`, else `~/.config/keyzero/config.toml`.
pub fn global_config_path(env: EnvLookup<'_>) -> Option<PathBuf> {
    env("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .map(|d| d.join("keyzero").join("config.toml"))
}

impl Config {
    /// Loads the config for `dir` (default: the current directory) with the process
    /// environment, including the global resolver defaults.
    pub fn load(dir: Option<&Path>) -> Result<Self, ConfigError> {
        let start = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_dir().map_err(|source| ConfigError::Read {
                path: PathBuf::from("."),
                source,
            })?,
        };
        Self::load_with(&start, &process_env, true)
    }

    /// [`Config::load`] with an explicit environment; `global` merges the global config.
    pub fn load_with(start: &Path, env: EnvLookup<'_>, global: bool) -> Result<Self, ConfigError> {
        let dir = find_dir(start).ok_or_else(|| ConfigError::NotFound {
            dir: start.to_path_buf(),
        })?;
        let environment = detect_environment(env);
        let local_path = dir.join(LOCAL_CONFIG_FILENAME);
        let shared_path = dir.join(CONFIG_FILENAME);
        let mut warnings = Vec::new();
        let (mut parsed, file_name) = if local_path.is_file() {
            let mut local = parse_file(&local_path, Some(&environment), &dir)?;
            if shared_path.is_file() {
                match parse_file(&shared_path, Some(&environment), &dir) {
                    Ok(shared) => {
                        let missing: Vec<&str> = shared
                            .secrets
                            .keys()
                            .filter(|k| !local.secrets.contains_key(*k))
                            .map(String::as_str)
                            .collect();
                        let extra: Vec<&str> = local
                            .secrets
                            .keys()
                            .filter(|k| !shared.secrets.contains_key(*k))
                            .map(String::as_str)
                            .collect();
                        if !missing.is_empty() || !extra.is_empty() {
                            let mut w = format!(
                                "{LOCAL_CONFIG_FILENAME} is out of sync with {CONFIG_FILENAME}"
                            );
                            if !missing.is_empty() {
                                w.push_str(&format!(
                                    "\n  missing from local: {}",
                                    missing.join(", ")
                                ));
                            }
                            if !extra.is_empty() {
                                w.push_str(&format!("\n  extra in local: {}", extra.join(", ")));
                            }
                            warnings.push(w);
                        }
                        merge_resolvers(&mut local.resolvers, shared.resolvers);
                        // kz: a local file without [blind] keeps the shared connection rules
                        // (KeyZero would drop them, opening the sandbox).
                        if local.blind.is_none() {
                            local.blind = shared.blind;
                        }
                    }
                    // KeyZero ignores a shared file it cannot read when a local one exists.
                    Err(e) => warnings.push(format!("ignoring {CONFIG_FILENAME}: {e}")),
                }
            }
            (local, LOCAL_CONFIG_FILENAME)
        } else {
            (
                parse_file(&shared_path, Some(&environment), &dir)?,
                CONFIG_FILENAME,
            )
        };
        if global && let Some(path) = global_config_path(env).filter(|p| p.is_file()) {
            let g = parse_file(&path, None, path.parent().unwrap_or(Path::new("/")))?;
            merge_resolvers(&mut parsed.resolvers, g.resolvers);
        }
        Ok(Self {
            dir,
            file_name,
            environment,
            resolvers: parsed.resolvers,
            secrets: parsed.secrets,
            blind: parsed.blind.unwrap_or_default(),
            warnings,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(self.file_name)
    }

    /// The resolver kind and settings for a secret's `resolver` name: a declared
    /// `[resolvers.NAME]` (its `type`, default NAME) or a bare kind name.
    pub fn resolver_spec(&self, name: &str) -> (String, Map<String, Value>) {
        match self.resolvers.get(name) {
            Some(r) => (
                r.kind.clone().unwrap_or_else(|| name.to_owned()),
                r.settings.clone(),
            ),
            None => (name.to_owned(), Map::new()),
        }
    }

    /// Secrets selected by `--only` (all when `None`); every unknown name is reported at once.
    pub fn select(
        &self,
        only: Option<&[String]>,
    ) -> Result<Vec<(&str, &SecretEntry)>, ConfigError> {
        let Some(only) = only else {
            return Ok(self.secrets.iter().map(|(k, v)| (k.as_str(), v)).collect());
        };
        let mut unknown: Vec<String> = only
            .iter()
            .filter(|k| !self.secrets.contains_key(*k))
            .map(|k| {
                match crate::suggest::did_you_mean(k, self.secrets.keys().map(String::as_str)) {
                    Some(s) => format!("{k} (did you mean {s}?)"),
                    None => k.clone(),
                }
            })
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ConfigError::UnknownSecrets(unknown.join(", ")));
        }
        Ok(self
            .secrets
            .iter()
            .filter(|(k, _)| only.contains(k))
            .map(|(k, v)| (k.as_str(), v))
            .collect())
    }

    /// What `kz run --blind` must say loudly before it starts: secrets whose masked token may be
    /// swapped in for any host (no `hosts` and no `[blind] connections` rules).
    pub fn blind_warnings(&self) -> Vec<String> {
        if !self.blind.is_open() {
            return Vec::new();
        }
        let unscoped: Vec<&str> = self
            .secrets
            .iter()
            .filter(|(_, e)| e.hosts.is_empty())
            .map(|(n, _)| n.as_str())
            .collect();
        if unscoped.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "[blind] has no connection rules and {} ha{} no `hosts`: the real value{} may be sent to ANY host the agent contacts; add hosts = [\"api.example.com\"] to each secret or [blind] connections rules",
            unscoped.join(", "),
            if unscoped.len() == 1 { "s" } else { "ve" },
            if unscoped.len() == 1 { "" } else { "s" },
        )]
    }

    /// Builds each resolver the given secrets use, once per name.
    pub fn build_resolvers<'a>(
        &self,
        secrets: impl IntoIterator<Item = &'a SecretEntry>,
    ) -> Result<BTreeMap<String, Arc<dyn Resolver>>, ConfigError> {
        let mut out = BTreeMap::new();
        for entry in secrets {
            if out.contains_key(&entry.resolver) {
                continue;
            }
            let (kind, settings) = self.resolver_spec(&entry.resolver);
            let r = resolve::build(&kind, &settings).map_err(|source| ConfigError::Resolver {
                name: entry.resolver.clone(),
                source,
            })?;
            out.insert(entry.resolver.clone(), r);
        }
        Ok(out)
    }
}

fn merge_resolvers(
    into: &mut BTreeMap<String, ResolverConfig>,
    from: BTreeMap<String, ResolverConfig>,
) {
    for (name, other) in from {
        let mine = into.entry(name).or_default();
        if mine.kind.is_none() {
            mine.kind = other.kind;
        }
        for (k, v) in other.settings {
            mine.settings.entry(k).or_insert(v);
        }
        if mine.location.is_none() {
            mine.location = other.location;
        }
    }
}

/// One file, parsed. `environment: None` = not environment-aware (the global config).
struct Parsed {
    resolvers: BTreeMap<String, ResolverConfig>,
    secrets: BTreeMap<String, SecretEntry>,
    blind: Option<BlindConfig>,
}

struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Relative paths in the file are taken from here.
    dir: &'a Path,
}

impl Source<'_> {
    fn location(&self, span: std::ops::Range<usize>) -> Location {
        // Spans are byte offsets; never slice inside a UTF-8 sequence, whatever the span says.
        let mut offset = span.start.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Location {
            file: self.path.to_path_buf(),
            line,
            column,
        }
    }

    fn err(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            location: self.location(span),
            message: message.into(),
        }
    }
}

fn parse_file(path: &Path, environment: Option<&str>, dir: &Path) -> Result<Parsed, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_text(path, &text, environment, dir)
}

/// Parses the text of the config file at `path` (shown in errors only).
fn parse_text(
    path: &Path,
    text: &str,
    environment: Option<&str>,
    dir: &Path,
) -> Result<Parsed, ConfigError> {
    let src = Source { path, text, dir };
    let root = DeTable::parse(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        src.err(span, format!("invalid TOML: {}", e.message().trim()))
    })?;
    parse_root(&src, root.get_ref(), environment)
}

/// For the fuzz target (fuzz/fuzz_targets/config.rs) only: `.keyzero.toml` text parsed as
/// [`Config::load`] parses the file (environment `dev`, relative paths taken from a directory
/// that does not exist). Returns the names of the secrets it defines.
#[doc(hidden)]
pub fn fuzz_parse(text: &str) -> Result<Vec<String>, ConfigError> {
    let dir = Path::new("/nonexistent/kz-fuzz");
    let parsed = parse_text(&dir.join(CONFIG_FILENAME), text, Some("dev"), dir)?;
    Ok(parsed.secrets.into_keys().collect())
}

fn parse_root(
    src: &Source<'_>,
    root: &DeTable<'_>,
    environment: Option<&str>,
) -> Result<Parsed, ConfigError> {
    let mut resolvers = BTreeMap::new();
    let mut bare_secrets: Option<&Spanned<DeValue<'_>>> = None;
    let mut env_sections: Vec<(&str, &Spanned<DeValue<'_>>)> = Vec::new();
    let mut blind = None;
    for (key, value) in root {
        match key.get_ref().as_ref() {
            "resolvers" => {
                for (name, table) in table_of(src, value, "[resolvers]")? {
                    let r = parse_resolver(src, name.get_ref(), table)?;
                    resolvers.insert(name.get_ref().to_string(), r);
                }
            }
            "secrets" => bare_secrets = Some(value),
            "blind" => blind = Some(parse_blind(src, value)?),
            other => match value.get_ref() {
                DeValue::Table(t)
                    if environment.is_some() && t.keys().any(|k| k.get_ref() == "secrets") =>
                {
                    for k in t.keys() {
                        if k.get_ref() != "secrets" {
                            return Err(src.err(
                                k.span(),
                                format!("unknown key `{}` in environment section [{other}]; environment sections hold only `secrets`", k.get_ref()),
                            ));
                        }
                    }
                    let secrets = t
                        .iter()
                        .find(|(k, _)| k.get_ref() == "secrets")
                        .map(|(_, v)| v);
                    if let Some(s) = secrets {
                        env_sections.push((other, s));
                    }
                }
                _ => {
                    return Err(src.err(
                        key.span(),
                        format!(
                            "unknown key `{other}`{}; top-level keys are resolvers, secrets, blind, and environment sections like [production.secrets]",
                            crate::suggest::hint(other, TOP_LEVEL.iter().copied())
                        ),
                    ));
                }
            },
        }
    }
    // KeyZero's rules: with environment sections, [secrets] is sugar for [development.secrets]
    // (both is an error) and the selected environment must exist; without any, [secrets] is
    // used whatever the environment.
    let chosen = match environment {
        Some(env) if !env_sections.is_empty() => {
            if let Some(dev) = env_sections.iter().find(|(n, _)| *n == DEFAULT_ENVIRONMENT)
                && bare_secrets.is_some()
            {
                return Err(src.err(
                    dev.1.span(),
                    "config has both [secrets] and [development.secrets]; use one or the other, not both",
                ));
            }
            match env_sections.iter().find(|(n, _)| *n == env) {
                Some((_, s)) => Some(*s),
                None if env == DEFAULT_ENVIRONMENT && bare_secrets.is_some() => bare_secrets,
                None => {
                    let mut available: Vec<String> =
                        env_sections.iter().map(|(n, _)| (*n).to_owned()).collect();
                    if bare_secrets.is_some() {
                        available.push(DEFAULT_ENVIRONMENT.to_owned());
                    }
                    available.sort();
                    return Err(ConfigError::EnvironmentNotFound {
                        path: src.path.to_path_buf(),
                        env: env.to_owned(),
                        available,
                    });
                }
            }
        }
        _ => bare_secrets,
    };
    let mut secrets = BTreeMap::new();
    if let Some(value) = chosen {
        for (name, entry) in table_of(src, value, "[secrets]")? {
            let n = name.get_ref();
            if n.is_empty() || n.contains('=') || n.contains('\0') {
                return Err(src.err(
                    name.span(),
                    format!("secret name {n:?} cannot be an environment variable name"),
                ));
            }
            secrets.insert(n.to_string(), parse_secret(src, n, entry)?);
        }
    }
    Ok(Parsed {
        resolvers,
        secrets,
        blind,
    })
}

type Entries<'a, 'i> = Vec<(
    &'a Spanned<std::borrow::Cow<'i, str>>,
    &'a Spanned<DeValue<'i>>,
)>;

fn table_of<'a, 'i>(
    src: &Source<'_>,
    value: &'a Spanned<DeValue<'i>>,
    what: &str,
) -> Result<Entries<'a, 'i>, ConfigError> {
    match value.get_ref() {
        DeValue::Table(t) => Ok(t.iter().collect()),
        _ => Err(src.err(value.span(), format!("{what} must be a table"))),
    }
}

fn parse_resolver(
    src: &Source<'_>,
    name: &str,
    value: &Spanned<DeValue<'_>>,
) -> Result<ResolverConfig, ConfigError> {
    let what = format!("[resolvers.{name}]");
    let entries = table_of(src, value, &what)?;
    let mut kind = None;
    let mut settings = Map::new();
    for (k, v) in &entries {
        if k.get_ref() == "type" {
            match v.get_ref() {
                DeValue::String(s) => kind = Some((s.to_string(), v.span())),
                _ => return Err(src.err(v.span(), format!("{what}: `type` must be a string"))),
            }
            continue;
        }
        settings.insert(k.get_ref().to_string(), to_json(src, v)?);
    }
    let (kind_name, kind_span) = kind
        .clone()
        .unwrap_or_else(|| (name.to_owned(), value.span()));
    if !resolve::is_known_kind(&kind_name) {
        let mut msg = format!(
            "{what}: unknown resolver type '{kind_name}'{}; known types: {}",
            crate::suggest::hint(&kind_name, resolve::KINDS.iter().copied()),
            resolve::KINDS.join(", ")
        );
        if kind.is_none() {
            msg.push_str(" (set `type = \"...\"` when the name is not a type)");
        }
        return Err(src.err(kind_span, msg));
    }
    // Settings are checked key by key so the error points at the line of the unknown key.
    if let Some(known) = resolve::kind_settings(&kind_name) {
        for (k, _) in &entries {
            let key = k.get_ref().as_ref();
            if key == "type"
                || known.contains(&key)
                || ["timeout", "retries", "cache_ttl"].contains(&key)
            {
                continue;
            }
            let all = known
                .iter()
                .copied()
                .chain(["timeout", "retries", "cache_ttl"]);
            return Err(src.err(
                k.span(),
                format!(
                    "{what}: unknown setting `{key}` for a {} resolver{}; accepted: {}",
                    resolve::canonical_kind(&kind_name).unwrap_or(&kind_name),
                    crate::suggest::hint(key, all),
                    known.join(", ")
                ),
            ));
        }
    }
    // File settings are taken from the config file's directory, not the current one, so
    // `kz --dir` and running from a subdirectory find the same files (KeyZero uses the cwd,
    // which is the same thing in the usual case of running next to the config).
    for key in ["path", "ca_cert"] {
        if let Some(Value::String(p)) = settings.get(key) {
            let path = Path::new(p);
            if !p.is_empty() && path.is_relative() {
                let abs = src.dir.join(path).display().to_string();
                settings.insert(key.to_owned(), Value::String(abs));
            }
        }
    }
    Ok(ResolverConfig {
        kind: kind.map(|(k, _)| k),
        settings,
        location: Some(src.location(value.span())),
    })
}

fn parse_secret(
    src: &Source<'_>,
    name: &str,
    value: &Spanned<DeValue<'_>>,
) -> Result<SecretEntry, ConfigError> {
    let what = format!("secret {name}");
    let entries = table_of(src, value, &what)?;
    let mut resolver = None;
    let mut reference = None;
    let mut field = None;
    let mut allow_empty = false;
    let mut hosts = Vec::new();
    let mut places = Places::default();
    let mut require = false;
    let mut allow_plaintext = false;
    let mut params = BTreeMap::new();
    for (k, v) in &entries {
        let key = k.get_ref().as_ref();
        match key {
            "resolver" => resolver = Some(string(src, v, &what, key)?),
            "ref" => reference = Some(string(src, v, &what, key)?),
            "field" => field = Some(string(src, v, &what, key)?),
            "allow_empty" => allow_empty = boolean(src, v, &what, key)?,
            "require" => require = boolean(src, v, &what, key)?,
            "allow_plaintext" => allow_plaintext = boolean(src, v, &what, key)?,
            "hosts" => hosts = parse_hosts(src, v, &what)?,
            "credential_location" => places = parse_places(src, v, &what)?,
            "description" => {
                string(src, v, &what, key)?;
            }
            _ if SECRET_KEYS.contains(&key) => {
                let s = match v.get_ref() {
                    DeValue::String(s) => s.to_string(),
                    DeValue::Integer(i) => i.as_str().to_owned(),
                    _ => {
                        return Err(src.err(
                            v.span(),
                            format!("{what}: `{key}` must be a string or an integer"),
                        ));
                    }
                };
                params.insert(key.to_owned(), s);
            }
            _ => {
                return Err(src.err(
                    k.span(),
                    format!(
                        "{what}: unknown key `{key}`{}; accepted: {}",
                        crate::suggest::hint(key, SECRET_KEYS.iter().copied()),
                        SECRET_KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    let resolver = resolver.ok_or_else(|| {
        src.err(
            value.span(),
            format!("{what}: missing `resolver` (e.g. resolver = \"env\")"),
        )
    })?;
    let reference = reference.ok_or_else(|| {
        src.err(
            value.span(),
            format!("{what}: missing `ref` (what the resolver looks up)"),
        )
    })?;
    if require && hosts.is_empty() {
        return Err(src.err(
            value.span(),
            format!(
                "{what}: `require = true` needs `hosts` (the hosts that must receive the token)"
            ),
        ));
    }
    if require && !places.in_head() {
        return Err(src.err(
            value.span(),
            format!("{what}: `require = true` needs a credential_location in the request head (a header, basic, query or path), not body only"),
        ));
    }
    Ok(SecretEntry {
        resolver,
        reference,
        field,
        allow_empty,
        hosts,
        places,
        require,
        allow_plaintext,
        params,
        location: src.location(value.span()),
    })
}

fn string(
    src: &Source<'_>,
    v: &Spanned<DeValue<'_>>,
    what: &str,
    key: &str,
) -> Result<String, ConfigError> {
    match v.get_ref() {
        DeValue::String(s) => Ok(s.to_string()),
        _ => Err(src.err(v.span(), format!("{what}: `{key}` must be a string"))),
    }
}

fn boolean(
    src: &Source<'_>,
    v: &Spanned<DeValue<'_>>,
    what: &str,
    key: &str,
) -> Result<bool, ConfigError> {
    match v.get_ref() {
        DeValue::Boolean(b) => Ok(*b),
        _ => Err(src.err(v.span(), format!("{what}: `{key}` must be true or false"))),
    }
}

/// `credential_location = "header:X-Api-Key"` or a list of such entries.
fn parse_places(
    src: &Source<'_>,
    v: &Spanned<DeValue<'_>>,
    what: &str,
) -> Result<Places, ConfigError> {
    let specs: Vec<(String, std::ops::Range<usize>)> = match v.get_ref() {
        DeValue::String(s) => vec![(s.to_string(), v.span())],
        DeValue::Array(items) => items
            .iter()
            .map(|item| match item.get_ref() {
                DeValue::String(s) => Ok((s.to_string(), item.span())),
                _ => Err(src.err(
                    item.span(),
                    format!("{what}: each entry of `credential_location` must be a string"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(src.err(
                v.span(),
                format!(
                    "{what}: `credential_location` must be a string or a list, e.g. \"header:Authorization:Bearer\" or [\"header:X-Api-Key\", \"query:api_key\"]"
                ),
            ));
        }
    };
    if specs.is_empty() {
        return Err(src.err(
            v.span(),
            format!(
                "{what}: `credential_location` is empty; leave it out for the default (headers)"
            ),
        ));
    }
    for (spec, span) in &specs {
        if let Err(e) = Places::parse(std::slice::from_ref(spec)) {
            return Err(src.err(span.clone(), format!("{what}: {e}")));
        }
    }
    let list: Vec<&str> = specs.iter().map(|(s, _)| s.as_str()).collect();
    Places::parse(&list).map_err(|e| src.err(v.span(), format!("{what}: {e}")))
}

/// Host names (optionally `*.example.com`), lower-cased; no scheme, port or path.
fn parse_hosts(
    src: &Source<'_>,
    v: &Spanned<DeValue<'_>>,
    what: &str,
) -> Result<Vec<String>, ConfigError> {
    let DeValue::Array(items) = v.get_ref() else {
        return Err(src.err(
            v.span(),
            format!("{what}: `hosts` must be a list of host names, e.g. [\"api.github.com\"]"),
        ));
    };
    let mut out = Vec::new();
    for item in items {
        let DeValue::String(h) = item.get_ref() else {
            return Err(src.err(
                item.span(),
                format!("{what}: each entry of `hosts` must be a string"),
            ));
        };
        let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
        let name = h.strip_prefix("*.").unwrap_or(&h);
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        let ip = name.parse::<std::net::IpAddr>().is_ok();
        if !valid && !ip {
            return Err(src.err(
                item.span(),
                format!("{what}: `{h}` is not a host name (write `api.github.com`, not a URL; `*.example.com` for subdomains)"),
            ));
        }
        out.push(h);
    }
    Ok(out)
}

fn parse_blind(src: &Source<'_>, value: &Spanned<DeValue<'_>>) -> Result<BlindConfig, ConfigError> {
    let mut cfg = BlindConfig::default();
    for (k, v) in table_of(src, value, "[blind]")? {
        let key = k.get_ref().as_ref();
        let flag = |v: &Spanned<DeValue<'_>>| match v.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(src.err(v.span(), format!("[blind] `{key}` must be true or false"))),
        };
        match key {
            "connections" => {
                let DeValue::Array(rules) = v.get_ref() else {
                    return Err(src.err(
                        v.span(),
                        "[blind] `connections` must be a list of {allow, host|regex|cidr} tables",
                    ));
                };
                for rule in rules {
                    cfg.connections.push(parse_rule(src, rule)?);
                }
            }
            "ipv6" => cfg.ipv6 = flag(v)?,
            "udp" => cfg.udp = flag(v)?,
            "non_http_tcp" => cfg.non_http_tcp = flag(v)?,
            // Also refuses a token outside its credential_location or over cleartext HTTP.
            "refuse_on_scope_violation" | "refuse_out_of_scope" => {
                cfg.refuse_on_scope_violation = flag(v)?
            }
            "upstream_ca" => {
                let p = PathBuf::from(string(src, v, "[blind]", key)?);
                let p = if p.is_absolute() { p } else { src.dir.join(p) };
                if !p.is_file() {
                    return Err(src.err(
                        v.span(),
                        format!(
                            "[blind] upstream_ca: {} is not a readable file",
                            p.display()
                        ),
                    ));
                }
                cfg.upstream_ca = Some(p);
            }
            "hide" => {
                let DeValue::Array(paths) = v.get_ref() else {
                    return Err(src.err(
                        v.span(),
                        "[blind] `hide` must be a list of paths, e.g. [\"~/.aws/credentials\", \".env\"]",
                    ));
                };
                let mut hide = Vec::with_capacity(paths.len());
                for p in paths {
                    let DeValue::String(text) = p.get_ref() else {
                        return Err(src.err(
                            p.span(),
                            "[blind] `hide` entries must be strings (paths: absolute, ~/…, or relative to the project)",
                        ));
                    };
                    if text.is_empty() {
                        return Err(src.err(
                            p.span(),
                            "[blind] `hide`: an empty path hides nothing; remove it",
                        ));
                    }
                    hide.push(text.to_string());
                }
                cfg.hide = Some(hide);
            }
            "listen" => {
                let s = string(src, v, "[blind]", key)?;
                cfg.listen = blind::parse_listen(&s).map_err(|m| src.err(v.span(), m))?;
            }
            "unix_sockets" => {
                let DeValue::Array(items) = v.get_ref() else {
                    return Err(src.err(
                        v.span(),
                        "[blind] `unix_sockets` must be a list, e.g. [\"/run/app.sock\", \"/run/app/\", \"@name\"]",
                    ));
                };
                let mut rules = Vec::with_capacity(items.len());
                for item in items {
                    let DeValue::String(text) = item.get_ref() else {
                        return Err(src.err(
                            item.span(),
                            "[blind] `unix_sockets` entries must be strings: a socket path, a directory ending in `/`, or `@name`",
                        ));
                    };
                    rules
                        .push(blind::parse_unix_socket(text).map_err(|m| src.err(item.span(), m))?);
                }
                cfg.unix_sockets = Some(rules);
            }
            "max_allowed_ips" => {
                let cap = crate::intercept::allowed::CAPACITY;
                let bad = || {
                    src.err(
                        v.span(),
                        format!("[blind] max_allowed_ips must be a whole number from 1 to {cap} (the machine's shared map; default {})", crate::intercept::allowed::DEFAULT_QUOTA),
                    )
                };
                let DeValue::Integer(i) = v.get_ref() else {
                    return Err(bad());
                };
                let n = usize::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                    .map_err(|_| bad())?;
                if n == 0 || n > cap {
                    return Err(bad());
                }
                cfg.max_allowed_ips = Some(n);
            }
            "resolver" => {
                let s = string(src, v, "[blind]", key)?;
                cfg.resolver = Some(blind::parse_resolver(&s).ok_or_else(|| {
                    src.err(
                        v.span(),
                        format!(
                            "[blind] resolver: `{s}` is not ADDR:PORT (e.g. \"127.0.0.53:53\")"
                        ),
                    )
                })?);
            }
            _ => {
                return Err(src.err(
                    k.span(),
                    format!(
                        "[blind]: unknown key `{key}`{}; accepted: {}",
                        crate::suggest::hint(key, blind::KEYS.iter().copied()),
                        blind::KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(cfg)
}

fn parse_rule(
    src: &Source<'_>,
    rule: &Spanned<DeValue<'_>>,
) -> Result<ConnectionRule, ConfigError> {
    let what = "[blind] connection rule";
    let mut allow = None;
    let mut given = Vec::new();
    for (k, v) in table_of(src, rule, what)? {
        match k.get_ref().as_ref() {
            "allow" => match v.get_ref() {
                DeValue::Boolean(b) => allow = Some(*b),
                _ => {
                    return Err(src.err(v.span(), format!("{what}: `allow` must be true or false")));
                }
            },
            key @ ("host" | "regex" | "cidr") => {
                given.push((key, string(src, v, what, key)?, v.span()));
            }
            other => {
                return Err(src.err(
                    k.span(),
                    format!(
                        "{what}: unknown key `{other}`{}; accepted: allow, host, regex, cidr",
                        crate::suggest::hint(other, ["allow", "host", "regex", "cidr"])
                    ),
                ));
            }
        }
    }
    let allow = allow
        .ok_or_else(|| src.err(rule.span(), format!("{what}: missing `allow = true|false`")))?;
    let pattern = match given.as_slice() {
        [("host", h, _)] => HostPattern::Host(h.trim_end_matches('.').to_ascii_lowercase()),
        [("regex", r, span)] => HostPattern::Regex(
            crate::proxy::rules::HostRegex::new(r)
                .map_err(|e| src.err(span.clone(), format!("{what}: invalid regex: {e}")))?,
        ),
        [("cidr", c, span)] => {
            HostPattern::Cidr(crate::proxy::rules::parse_cidr(c).ok_or_else(|| {
                src.err(
                    span.clone(),
                    format!(
                        "{what}: cidr `{c}` is not an address range like \"127.0.0.0/8\", \"fd00::/8\" or a single address"
                    ),
                )
            })?)
        }
        [] => {
            return Err(src.err(
                rule.span(),
                format!("{what} must specify either 'host' or 'regex' (or kz's 'cidr')"),
            ));
        }
        _ => {
            return Err(src.err(
                rule.span(),
                format!(
                    "{what} must specify either 'host' or 'regex', not both (or kz's 'cidr' alone)"
                ),
            ));
        }
    };
    Ok(ConnectionRule { allow, pattern })
}

/// A TOML value as JSON (the form resolvers take their settings in).
fn to_json(src: &Source<'_>, v: &Spanned<DeValue<'_>>) -> Result<Value, ConfigError> {
    Ok(match v.get_ref() {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            let n = i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| src.err(v.span(), "integer out of range"))?;
            Value::from(n)
        }
        DeValue::Float(f) => {
            let n: f64 = f
                .as_str()
                .replace('_', "")
                .parse()
                .map_err(|_| src.err(v.span(), "not a number"))?;
            serde_json::Number::from_f64(n)
                .map(Value::Number)
                .ok_or_else(|| src.err(v.span(), "not a finite number"))?
        }
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| to_json(src, i))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(t) => {
            let mut m = Map::new();
            for (k, v) in t {
                m.insert(k.get_ref().to_string(), to_json(src, v)?);
            }
            Value::Object(m)
        }
    })
}

#[cfg(test)]
mod tests;
