//! Bundle YAML: KeyZero 0.3's schema (version, issuers, policies, resources, backends) plus our
//! additions (resource `hosts`, `audit`, `blind`, `limits`, issuer `leeway_seconds`, HMAC
//! `secret`/`secret_env`).
//!
//! Loading happens in two passes so that `kz server check` can report every problem at once, each
//! with `file:line:col`: a positioned YAML tree is checked against the schema table below
//! (unknown keys with a "did you mean" hint, missing keys, wrong shapes, bad enum values), and
//! only a tree that passes is deserialised by serde_yaml into the typed [`Bundle`]. Semantic checks
//! that need other modules (CEL compilation, key material, resolver settings) run in
//! `pdp::Compiled::build` and report through the same [`Problem`] type.

pub mod yaml;

use crate::policy::glob::Glob;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
pub use yaml::{Kind, Node, Pos};

/// The largest bundle we read; a bundle is configuration, not data.
pub const MAX_BUNDLE_BYTES: u64 = 8 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Typed view (serde_yaml)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
pub struct Bundle {
    pub version: String,
    #[serde(default)]
    pub issuers: Vec<Issuer>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub resources: Vec<Resource>,
    #[serde(default)]
    pub backends: BTreeMap<String, Backend>,
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    #[serde(default)]
    pub blind: Option<BlindConfig>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IssuerType {
    GithubActions,
    Kubernetes,
    Gcp,
    Aws,
    #[default]
    Custom,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Issuer {
    pub name: String,
    #[serde(rename = "type", default)]
    pub issuer_type: IssuerType,
    pub issuer_url: String,
    pub jwks_url: Option<String>,
    pub audience: Option<String>,
    #[serde(default)]
    pub static_keys: Vec<StaticKey>,
    /// Identity field → claim name or CEL expression over `claims`.
    #[serde(default)]
    pub map: BTreeMap<String, String>,
    /// + Clock skew allowed on exp/nbf/iat, seconds (default 30).
    pub leeway_seconds: Option<u64>,
    /// + Minimum seconds between two JWKS fetches triggered by unknown kids (default 30).
    pub jwks_refresh_seconds: Option<u64>,
    /// + How long a fetched JWKS is trusted before a background refresh (default 3600).
    pub jwks_cache_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StaticKey {
    pub kid: String,
    pub alg: String,
    pub pem: Option<String>,
    /// + HMAC shared secret (HS* only), given inline.
    pub secret: Option<String>,
    /// + HMAC shared secret (HS* only), read from this environment variable.
    pub secret_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Policy {
    pub name: String,
    pub description: Option<String>,
    pub rule: String,
    pub effect: Effect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Direct,
    ShortLived,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::ShortLived => "short_lived",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Resource {
    #[serde(rename = "ref")]
    pub ref_pattern: String,
    pub resolver: String,
    #[serde(default)]
    pub mode: Mode,
    pub credential_location: Option<String>,
    pub ttl: Option<u64>,
    pub path: Option<String>,
    pub field: Option<String>,
    pub role_arn: Option<String>,
    pub duration_seconds: Option<u64>,
    pub secret_id: Option<String>,
    /// + Hosts this credential may be sent to (proxy scope).
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// A backend: `type` plus resolver-specific settings handed to `resolve::build` unchanged.
#[derive(Debug, Clone, Deserialize)]
pub struct Backend {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(flatten)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// fsync after every record: nothing acknowledged is ever lost.
    #[default]
    Always,
    /// fsync at most once a second (on the next record after the second has passed).
    Interval,
    /// leave flushing to the kernel.
    Never,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditConfig {
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub fsync: Fsync,
    /// Rotate the file once it reaches this size; the chain continues in the next file.
    pub max_bytes: Option<u64>,
    /// Rotated files kept (the newest); 0 keeps every one. Pruned at rotation.
    #[serde(default = "default_audit_max_files")]
    pub max_files: u32,
    /// Rotated files last written more than this many days ago are removed at rotation; 0
    /// keeps them however old.
    #[serde(default = "default_audit_max_age_days")]
    pub max_age_days: u32,
    /// The chain's HMAC key file [default: `crate::audit::default_key_path`], created 0600 on
    /// first use.
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub stdout: bool,
}

fn default_audit_max_files() -> u32 {
    crate::audit::DEFAULT_MAX_FILES
}
fn default_audit_max_age_days() -> u32 {
    crate::audit::DEFAULT_MAX_AGE_DAYS
}

impl AuditConfig {
    /// The sink's rotation: `max_bytes`, and the caps (0 turns one off).
    pub fn rotation(&self) -> crate::audit::Rotation {
        crate::audit::Rotation {
            max_bytes: self.max_bytes,
            max_files: (self.max_files > 0).then_some(self.max_files),
            max_age: (self.max_age_days > 0)
                .then(|| std::time::Duration::from_secs(u64::from(self.max_age_days) * 86_400)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlindConfig {
    #[serde(default)]
    pub connections: Vec<BlindRule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlindRule {
    pub allow: bool,
    pub host: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Limits {
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_refs")]
    pub max_refs: usize,
}

fn default_max_token_bytes() -> usize {
    16 * 1024
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_max_refs() -> usize {
    100
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_token_bytes: default_max_token_bytes(),
            max_body_bytes: default_max_body_bytes(),
            max_refs: default_max_refs(),
        }
    }
}

/// Identity fields a `map` may set (KeyZero's normalised identity).
pub const IDENTITY_FIELDS: &[&str] = &[
    "org", "service", "env", "action", "branch", "actor", "groups",
];

pub const ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
    "HS384", "HS512",
];

// ---------------------------------------------------------------------------------------------
// Problems and errors
// ---------------------------------------------------------------------------------------------

/// One thing wrong with a bundle, at a position in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub pos: Pos,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read bundle {path}: {source}; check the path and its permissions")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("bundle {path} is {size} bytes; the limit is {MAX_BUNDLE_BYTES} bytes")]
    TooLarge { path: String, size: u64 },
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &str, problems: &[Problem]) -> String {
    let mut out = format!("bundle {path} has {} problem(s):", problems.len());
    for p in problems {
        out.push_str(&format!(
            "\n  {path}:{}:{}: {}",
            p.pos.line, p.pos.col, p.message
        ));
    }
    out
}

impl BundleError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            BundleError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loaded bundle: typed view + positions
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct LoadedBundle {
    pub path: String,
    pub bundle: Bundle,
    tree: Node,
}

impl LoadedBundle {
    /// Position of the node at `path` (keys and list indexes), falling back to the nearest
    /// ancestor that exists, so a semantic problem always points somewhere useful.
    pub fn pos<S: AsRef<str>>(&self, path: &[S]) -> Pos {
        let mut node = &self.tree;
        for seg in path.iter().map(AsRef::as_ref) {
            let next = match &node.kind {
                Kind::Map(_) => node.get(seg),
                Kind::Seq(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node.pos.clone()
    }

    pub fn problem<S: AsRef<str>>(&self, path: &[S], message: impl Into<String>) -> Problem {
        Problem {
            pos: self.pos(path),
            message: message.into(),
        }
    }

    pub fn invalid(&self, problems: Vec<Problem>) -> BundleError {
        BundleError::Invalid {
            path: self.path.clone(),
            problems,
        }
    }
}

/// Reads, schema-checks and deserialises a bundle file. Semantic checks that need compiled
/// policies or keys are done by `pdp::Compiled::build`.
pub fn load(path: &Path) -> Result<LoadedBundle, BundleError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| BundleError::Read {
        path: shown.clone(),
        source,
    })?;
    if meta.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge {
            path: shown,
            size: meta.len(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| BundleError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// Parses bundle text; `path` is only used in messages.
pub fn parse(path: &str, text: &str) -> Result<LoadedBundle, BundleError> {
    let invalid = |problems| BundleError::Invalid {
        path: path.to_owned(),
        problems,
    };
    let tree = yaml::parse(text).map_err(|e| {
        invalid(vec![Problem {
            pos: e.pos,
            message: e.message,
        }])
    })?;
    let mut problems = Vec::new();
    check_shape(&tree, &TOP, "bundle", &mut problems);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let bundle: Bundle = serde_yaml::from_str(text).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line(),
                col: l.column(),
            })
            .unwrap_or(Pos { line: 1, col: 1 });
        invalid(vec![Problem {
            pos,
            message: e.to_string(),
        }])
    })?;
    let loaded = LoadedBundle {
        path: path.to_owned(),
        bundle,
        tree,
    };
    let problems = check_semantics(&loaded);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(loaded)
}

// ---------------------------------------------------------------------------------------------
// Schema table
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Shape {
    /// Any scalar (strings, numbers and booleans all deserialise to text where we want text).
    Str,
    /// A non-negative integer.
    Int,
    Bool,
    OneOf(&'static [&'static str]),
    StrList,
    /// A mapping with known keys; `open` allows extra keys (backend settings).
    Obj(&'static [Field], bool),
    List(&'static Shape),
    /// A mapping with free keys, each value of the given shape.
    Dict(&'static Shape),
}

#[derive(Debug)]
struct Field {
    name: &'static str,
    shape: Shape,
    required: bool,
}

const fn f(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: false,
    }
}

const fn req(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: true,
    }
}

static STATIC_KEY: Shape = Shape::Obj(
    &[
        req("kid", Shape::Str),
        req("alg", Shape::OneOf(ALGORITHMS)),
        f("pem", Shape::Str),
        f("secret", Shape::Str),
        f("secret_env", Shape::Str),
    ],
    false,
);

static STR: Shape = Shape::Str;

static ISSUER: Shape = Shape::Obj(
    &[
        req("name", Shape::Str),
        f(
            "type",
            Shape::OneOf(&["github-actions", "kubernetes", "gcp", "aws", "custom"]),
        ),
        req("issuer_url", Shape::Str),
        f("jwks_url", Shape::Str),
        f("audience", Shape::Str),
        f("static_keys", Shape::List(&STATIC_KEY)),
        f("map", Shape::Dict(&STR)),
        f("leeway_seconds", Shape::Int),
        f("jwks_refresh_seconds", Shape::Int),
        f("jwks_cache_seconds", Shape::Int),
    ],
    false,
);

static POLICY: Shape = Shape::Obj(
    &[
        req("name", Shape::Str),
        f("description", Shape::Str),
        req("rule", Shape::Str),
        req("effect", Shape::OneOf(&["allow", "deny"])),
    ],
    false,
);

static RESOURCE: Shape = Shape::Obj(
    &[
        req("ref", Shape::Str),
        req("resolver", Shape::Str),
        f("mode", Shape::OneOf(&["direct", "short_lived"])),
        f("credential_location", Shape::Str),
        f("ttl", Shape::Int),
        f("path", Shape::Str),
        f("field", Shape::Str),
        f("role_arn", Shape::Str),
        f("duration_seconds", Shape::Int),
        f("secret_id", Shape::Str),
        f("hosts", Shape::StrList),
    ],
    false,
);

static BACKEND: Shape = Shape::Obj(&[req("type", Shape::Str)], true);

static BLIND_RULE: Shape = Shape::Obj(
    &[
        req("allow", Shape::Bool),
        f("host", Shape::Str),
        f("regex", Shape::Str),
    ],
    false,
);

static TOP: Shape = Shape::Obj(
    &[
        req("version", Shape::Str),
        f("issuers", Shape::List(&ISSUER)),
        f("policies", Shape::List(&POLICY)),
        f("resources", Shape::List(&RESOURCE)),
        f("backends", Shape::Dict(&BACKEND)),
        f(
            "audit",
            Shape::Obj(
                &[
                    f("path", Shape::Str),
                    f("fsync", Shape::OneOf(&["always", "interval", "never"])),
                    f("max_bytes", Shape::Int),
                    f("max_files", Shape::Int),
                    f("max_age_days", Shape::Int),
                    f("key", Shape::Str),
                    f("stdout", Shape::Bool),
                ],
                false,
            ),
        ),
        f(
            "blind",
            Shape::Obj(&[f("connections", Shape::List(&BLIND_RULE))], false),
        ),
        f(
            "limits",
            Shape::Obj(
                &[
                    f("max_token_bytes", Shape::Int),
                    f("max_body_bytes", Shape::Int),
                    f("max_refs", Shape::Int),
                ],
                false,
            ),
        ),
    ],
    false,
);

/// The closest known name, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(word, k), k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

fn check_shape(node: &Node, shape: &Shape, what: &str, out: &mut Vec<Problem>) {
    let mut bad = |message: String| {
        out.push(Problem {
            pos: node.pos.clone(),
            message,
        })
    };
    if matches!(node.kind, Kind::Alias) {
        bad(format!(
            "{what}: YAML aliases are not supported in bundles; write the value out"
        ));
        return;
    }
    match shape {
        Shape::Str => {
            if node.as_str().is_none() {
                bad(format!("{what} must be a string, not {}", node.kind_name()));
            }
        }
        Shape::Int => match node.as_str() {
            Some(s) if s.parse::<u64>().is_ok() => {}
            _ => bad(format!("{what} must be a non-negative integer")),
        },
        Shape::Bool => match node.as_str() {
            Some("true" | "false") => {}
            _ => bad(format!("{what} must be true or false")),
        },
        Shape::OneOf(values) => match node.as_str() {
            Some(s) if values.contains(&s) => {}
            Some(s) => {
                let hint = did_you_mean(s, values.iter().copied())
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                bad(format!(
                    "{what}: `{s}` is not one of {}{hint}",
                    values.join(", ")
                ))
            }
            None => bad(format!("{what} must be one of {}", values.join(", "))),
        },
        Shape::StrList => match &node.kind {
            Kind::Seq(items) => {
                for item in items {
                    check_shape(item, &Shape::Str, &format!("{what} entry"), out);
                }
            }
            _ => bad(format!("{what} must be a list of strings")),
        },
        Shape::List(inner) => match &node.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_shape(item, inner, &format!("{what}[{i}]"), out);
                }
            }
            _ => bad(format!("{what} must be a list, not {}", node.kind_name())),
        },
        Shape::Dict(inner) => match &node.kind {
            Kind::Map(entries) => {
                for (k, v) in entries {
                    let key = k.as_str().unwrap_or("?");
                    check_shape(v, inner, &format!("{what}.{key}"), out);
                }
            }
            _ => bad(format!(
                "{what} must be a mapping, not {}",
                node.kind_name()
            )),
        },
        Shape::Obj(fields, open) => {
            let Kind::Map(entries) = &node.kind else {
                bad(format!(
                    "{what} must be a mapping, not {}",
                    node.kind_name()
                ));
                return;
            };
            let mut seen: Vec<&str> = Vec::new();
            for (k, v) in entries {
                let Some(key) = k.as_str() else {
                    out.push(Problem {
                        pos: k.pos.clone(),
                        message: format!("{what}: keys must be strings"),
                    });
                    continue;
                };
                if seen.contains(&key) {
                    out.push(Problem {
                        pos: k.pos.clone(),
                        message: format!("{what}: duplicate key `{key}`"),
                    });
                    continue;
                }
                seen.push(key);
                match fields.iter().find(|fl| fl.name == key) {
                    Some(field) => check_shape(v, &field.shape, &format!("{what}.{key}"), out),
                    None if *open => {}
                    None => {
                        let names = fields.iter().map(|fl| fl.name);
                        let hint = match did_you_mean(key, names.clone()) {
                            Some(k) => format!("did you mean `{k}`?"),
                            None => format!("known keys: {}", names.collect::<Vec<_>>().join(", ")),
                        };
                        out.push(Problem {
                            pos: k.pos.clone(),
                            message: format!("unknown key `{key}` in {what}; {hint}"),
                        });
                    }
                }
            }
            for field in fields.iter().filter(|fl| fl.required) {
                if !seen.contains(&field.name) {
                    out.push(Problem {
                        pos: node.pos.clone(),
                        message: format!("{what} is missing the required key `{}`", field.name),
                    });
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Semantic checks that need no other module
// ---------------------------------------------------------------------------------------------

/// Resolver kinds that exist without a `backends` entry (a resource may say `resolver: env`).
pub const BUILTIN_BACKENDS: &[&str] = &["env"];

fn check_semantics(lb: &LoadedBundle) -> Vec<Problem> {
    let b = &lb.bundle;
    let mut out = Vec::new();

    let mut names: Vec<&str> = Vec::new();
    for (i, issuer) in b.issuers.iter().enumerate() {
        let idx = i.to_string();
        if names.contains(&issuer.name.as_str()) {
            out.push(lb.problem(
                &["issuers", &idx, "name"],
                format!("duplicate issuer name `{}`", issuer.name),
            ));
        }
        names.push(&issuer.name);
        if issuer.static_keys.is_empty() && issuer.jwks_url.is_none() {
            out.push(lb.problem(
                &["issuers", &idx],
                format!(
                    "issuer `{}` has no keys: add `static_keys` or `jwks_url`",
                    issuer.name
                ),
            ));
        }
        for field in issuer.map.keys() {
            if !IDENTITY_FIELDS.contains(&field.as_str()) {
                let hint = did_you_mean(field, IDENTITY_FIELDS.iter().copied())
                    .map(|k| format!("did you mean `{k}`?"))
                    .unwrap_or_else(|| format!("known fields: {}", IDENTITY_FIELDS.join(", ")));
                out.push(lb.problem(
                    &["issuers", &idx, "map", field],
                    format!("unknown identity field `{field}` in map; {hint}"),
                ));
            }
        }
        let mut kids: Vec<&str> = Vec::new();
        for (j, key) in issuer.static_keys.iter().enumerate() {
            let at = ["issuers", idx.as_str(), "static_keys", &j.to_string()];
            if kids.contains(&key.kid.as_str()) {
                out.push(lb.problem(
                    &at,
                    format!("issuer `{}`: duplicate kid `{}`", issuer.name, key.kid),
                ));
            }
            kids.push(&key.kid);
            let hmac = key.alg.starts_with("HS");
            match (hmac, &key.pem, &key.secret, &key.secret_env) {
                (true, Some(_), _, _) => out.push(lb.problem(
                    &at,
                    format!(
                        "key `{}`: {} takes a shared secret, not a `pem` (a public key used as an HMAC secret is the alg-confusion attack); use `secret_env: VAR` or `secret:`",
                        key.kid, key.alg
                    ),
                )),
                (true, None, None, None) => out.push(lb.problem(
                    &at,
                    format!(
                        "key `{}`: {} needs an explicit shared secret: `secret_env: VAR` or `secret:`",
                        key.kid, key.alg
                    ),
                )),
                (false, None, _, _) => out.push(lb.problem(
                    &at,
                    format!("key `{}`: {} needs a public key in `pem`", key.kid, key.alg),
                )),
                (false, Some(_), Some(_), _) | (false, Some(_), _, Some(_)) => {
                    out.push(lb.problem(
                        &at,
                        format!(
                            "key `{}`: `secret`/`secret_env` only apply to HS* keys",
                            key.kid
                        ),
                    ))
                }
                _ => {}
            }
        }
    }

    let mut policy_names: Vec<&str> = Vec::new();
    for (i, p) in b.policies.iter().enumerate() {
        if policy_names.contains(&p.name.as_str()) {
            out.push(lb.problem(
                &["policies", &i.to_string(), "name"],
                format!("duplicate policy name `{}`", p.name),
            ));
        }
        if p.name == "implicit-deny" {
            out.push(lb.problem(
                &["policies", &i.to_string(), "name"],
                "`implicit-deny` is reserved for the decision when no policy matches; rename the policy",
            ));
        }
        policy_names.push(&p.name);
    }

    for (i, r) in b.resources.iter().enumerate() {
        let idx = i.to_string();
        if let Err(e) = Glob::compile(&r.ref_pattern) {
            out.push(lb.problem(&["resources", &idx, "ref"], e.to_string()));
        }
        if !b.backends.contains_key(&r.resolver) && !BUILTIN_BACKENDS.contains(&r.resolver.as_str())
        {
            let known = b
                .backends
                .keys()
                .map(String::as_str)
                .chain(BUILTIN_BACKENDS.iter().copied());
            let hint = did_you_mean(&r.resolver, known)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_else(|| "; define it under `backends:`".into());
            out.push(lb.problem(
                &["resources", &idx, "resolver"],
                format!(
                    "resource `{}` uses resolver `{}`, which is not a backend{hint}",
                    r.ref_pattern, r.resolver
                ),
            ));
        }
        if let Some(loc) = &r.credential_location
            && let Err(e) = CredentialLocation::parse(loc)
        {
            out.push(lb.problem(&["resources", &idx, "credential_location"], e.to_string()));
        }
        for (j, h) in r.hosts.iter().enumerate() {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            let valid = !bare.is_empty()
                && bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
                && !bare.contains("..");
            if !valid {
                out.push(lb.problem(
                    &["resources", &idx, "hosts", &j.to_string()],
                    format!(
                        "host `{h}` is not a host name or address (write `api.example.com` or `*.example.com`, no scheme, port or path)"
                    ),
                ));
            }
        }
        if r.ttl == Some(0) {
            out.push(lb.problem(&["resources", &idx, "ttl"], "ttl must be at least 1 second"));
        }
    }

    if let Some(blind) = &b.blind {
        for (i, rule) in blind.connections.iter().enumerate() {
            if rule.host.is_some() == rule.regex.is_some() {
                out.push(lb.problem(
                    &["blind", "connections", &i.to_string()],
                    "a connection rule needs exactly one of `host` or `regex`",
                ));
            }
            if let Some(re) = &rule.regex
                && let Err(e) = crate::proxy::rules::HostRegex::new(re)
            {
                out.push(lb.problem(
                    &["blind", "connections", &i.to_string(), "regex"],
                    format!(
                        "`{re}` is not a valid regex: {}",
                        e.to_string().replace('\n', " ")
                    ),
                ));
            }
        }
    }
    if let Some(audit) = &b.audit
        && audit.path.is_none()
        && !audit.stdout
    {
        out.push(lb.problem(&["audit"], "audit needs a `path` or `stdout: true`"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// credential_location
// ---------------------------------------------------------------------------------------------

/// Where a credential goes: `header:NAME[:PREFIX]` or `query:PARAM` (one parser for every
/// injector, in [`crate::egress::location`]).
pub use crate::egress::location::Location as CredentialLocation;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version: "1"
issuers:
  - name: agents
    type: custom
    issuer_url: https://id.example
    static_keys:
      - kid: k1
        alg: ES256
        pem: "x"
    map:
      service: claims.agent_name
policies:
  - name: allow-all
    rule: "true"
    effect: allow
resources:
  - ref: "api/**"
    resolver: env
"#;

    #[test]
    fn good_bundle_loads() {
        let lb = parse("b.yaml", GOOD).unwrap();
        assert_eq!(lb.bundle.policies.len(), 1);
        assert_eq!(lb.bundle.resources[0].mode, Mode::Direct);
    }

    #[test]
    fn every_problem_is_reported_with_position_and_hint() {
        let text = GOOD
            .replace("    effect: allow", "    efect: allow")
            .replace(
                "    resolver: env",
                "    resolver: env\n    mode: short_lvied",
            )
            .replace("version: \"1\"", "version: \"1\"\npolices: []");
        let err = parse("b.yaml", &text).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("unknown key `efect` in bundle.policies[0]; did you mean `effect`?"),
            "{msg}"
        );
        assert!(
            msg.contains("bundle.policies[0] is missing the required key `effect`"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "`short_lvied` is not one of direct, short_lived; did you mean `short_lived`?"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("unknown key `polices` in bundle; did you mean `policies`?"),
            "{msg}"
        );
        assert!(msg.contains("b.yaml:3:1: unknown key `polices`"), "{msg}");
        assert_eq!(err.problems().len(), 4, "{msg}");
    }

    #[test]
    fn semantic_problems() {
        let text = GOOD
            .replace("resolver: env", "resolver: vualt")
            .replace("ref: \"api/**\"", "ref: \"api/x**\"")
            .replace("service: claims", "servce: claims");
        let err = parse("b.yaml", &text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'**' must be a whole path segment"), "{msg}");
        assert!(
            msg.contains("uses resolver `vualt`, which is not a backend"),
            "{msg}"
        );
        assert!(
            msg.contains("unknown identity field `servce` in map; did you mean `service`?"),
            "{msg}"
        );
    }

    #[test]
    fn blind_regex_and_hosts_are_checked() {
        let text = GOOD.replace(
            "    resolver: env\n",
            "    resolver: env\n    hosts: [\"https://api.example.com/x\", \"*.ok.example\"]\n",
        ) + "blind:\n  connections:\n    - allow: true\n      regex: \"(unclosed\"\n";
        let msg = parse("b.yaml", &text).unwrap_err().to_string();
        assert!(
            msg.contains("host `https://api.example.com/x` is not a host name"),
            "{msg}"
        );
        assert!(!msg.contains("*.ok.example"), "{msg}");
        assert!(msg.contains("`(unclosed` is not a valid regex"), "{msg}");
    }

    #[test]
    fn hmac_with_pem_is_refused() {
        let text = GOOD.replace("alg: ES256", "alg: HS256");
        let msg = parse("b.yaml", &text).unwrap_err().to_string();
        assert!(msg.contains("takes a shared secret, not a `pem`"), "{msg}");
    }

    #[test]
    fn credential_locations() {
        assert_eq!(
            CredentialLocation::parse("header:Authorization:Bearer").unwrap(),
            CredentialLocation::Header {
                name: "Authorization".into(),
                prefix: "Bearer".into()
            }
        );
        assert!(CredentialLocation::parse("query:key").is_ok());
        assert!(CredentialLocation::parse("cookie:x").is_err());
        assert!(CredentialLocation::parse("header:").is_err());
    }
}
