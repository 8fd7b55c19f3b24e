use super::*;

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn load(dir: &Path, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load_with(dir, &env_of(vars), true)
}

const MULTI_ENV: &str = r#"
[resolvers.hashi]
type = "hashicorp"
address = "https://vault.staging.example.com"

[secrets]
API_KEY = { resolver = "env", ref = "DEV_API_KEY" }
DB_URL = { resolver = "env", ref = "DEV_DB_URL" }

[production.secrets]
API_KEY = { resolver = "env", ref = "PROD_API_KEY" }
DB_URL = { resolver = "env", ref = "PROD_DB_URL" }

[staging.secrets]
API_KEY = { resolver = "hashi", ref = "secret/api", field = "key", hosts = ["api.example.com"] }
DB_URL = { resolver = "hashi", ref = "secret/db", field = "url" }
"#;

#[test]
fn environment_detection_order() {
    assert_eq!(detect_environment(&env_of(&[])), "development");
    assert_eq!(
        detect_environment(&env_of(&[
            ("KEYZERO_ENV", "staging"),
            ("NODE_ENV", "production")
        ])),
        "staging"
    );
    assert_eq!(
        detect_environment(&env_of(&[("KEYZERO_ENV", "  "), ("RACK_ENV", " qa ")])),
        "qa"
    );
    assert_eq!(
        detect_environment(&env_of(&[("APP_ENV", "x"), ("RACK_ENV", "y")])),
        "x"
    );
}

#[test]
fn environment_sections_select_secrets() {
    let dir = dir_with(&[(".keyzero.toml", MULTI_ENV)]);
    let dev = load(dir.path(), &[]).unwrap();
    assert_eq!(dev.environment, "development");
    assert_eq!(dev.secrets["API_KEY"].reference, "DEV_API_KEY");
    let prod = load(dir.path(), &[("NODE_ENV", "production")]).unwrap();
    assert_eq!(prod.secrets["DB_URL"].reference, "PROD_DB_URL");
    let staging = load(dir.path(), &[("KEYZERO_ENV", "staging")]).unwrap();
    let api = &staging.secrets["API_KEY"];
    assert_eq!(
        (api.resolver.as_str(), api.field.as_deref()),
        ("hashi", Some("key"))
    );
    assert_eq!(api.hosts, vec!["api.example.com"]);
    assert_eq!(staging.resolver_spec("hashi").0, "hashicorp");
    let err = load(dir.path(), &[("KEYZERO_ENV", "qa")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"environment "qa" not found in config (available: ["development", "production", "staging"])"#),
        "{err}"
    );
}

#[test]
fn bare_secrets_ignore_the_environment_and_both_forms_conflict() {
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[secrets.K]\nresolver = \"env\"\nref = \"V\"\n",
    )]);
    assert_eq!(
        load(dir.path(), &[("NODE_ENV", "production")])
            .unwrap()
            .secrets["K"]
            .reference,
        "V"
    );
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[secrets.K]\nresolver = \"env\"\nref = \"A\"\n\n[development.secrets.K]\nresolver = \"env\"\nref = \"B\"\n",
    )]);
    let err = load(dir.path(), &[]).unwrap_err().to_string();
    assert!(
        err.contains("both [secrets] and [development.secrets]"),
        "{err}"
    );
    assert!(err.contains(".keyzero.toml:5:"), "{err}");
}

#[test]
fn found_by_walking_up() {
    let dir = dir_with(&[
        (
            ".keyzero.toml",
            "[secrets.K]\nresolver = \"env\"\nref = \"V\"\n",
        ),
        ("a/b/c/.keep", ""),
    ]);
    let cfg = load(&dir.path().join("a/b/c"), &[]).unwrap();
    assert_eq!(cfg.dir, dir.path());
    assert_eq!(cfg.file_name, ".keyzero.toml");
    let empty = tempfile::tempdir().unwrap();
    let err = load(empty.path(), &[]).unwrap_err().to_string();
    assert!(err.starts_with("no config file found in"), "{err}");
}

#[test]
fn local_file_overrides_and_inherits_resolvers() {
    let dir = dir_with(&[
        (
            ".keyzero.toml",
            "[resolvers.aws]\nregion = \"us-east-1\"\nprofile = \"shared\"\n\n[secrets.KEY]\nresolver = \"aws\"\nref = \"sm://shared\"\n\n[secrets.OTHER]\nresolver = \"env\"\nref = \"O\"\n\n[blind]\nconnections = [{ allow = true, host = \"api.example.com\" }]\n",
        ),
        (
            ".keyzero.local.toml",
            "[resolvers.aws]\nregion = \"eu-west-1\"\n\n[secrets.KEY]\nresolver = \"aws\"\nref = \"sm://local\"\n",
        ),
    ]);
    let cfg = load(dir.path(), &[]).unwrap();
    assert_eq!(cfg.file_name, ".keyzero.local.toml");
    assert_eq!(cfg.secrets["KEY"].reference, "sm://local");
    assert!(!cfg.secrets.contains_key("OTHER"));
    let aws = &cfg.resolvers["aws"].settings;
    assert_eq!(aws["region"], "eu-west-1");
    assert_eq!(aws["profile"], "shared");
    assert!(
        cfg.warnings[0].contains("missing from local: OTHER"),
        "{:?}",
        cfg.warnings
    );
    // kz keeps the shared connection rules when the local file has no [blind].
    assert!(!cfg.blind.connection_allowed("evil.example.com"));
}

#[test]
fn global_config_fills_resolver_defaults() {
    let home = dir_with(&[(
        ".config/keyzero/config.toml",
        "[resolvers.vault]\ntype = \"hashicorp\"\naddress = \"https://global:8200\"\nnamespace = \"team\"\n",
    )]);
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[resolvers.vault]\naddress = \"https://project:8200\"\n\n[secrets.K]\nresolver = \"vault\"\nref = \"secret/k\"\n",
    )]);
    let home_s = home.path().display().to_string();
    let cfg = load(dir.path(), &[("HOME", &home_s)]).unwrap();
    let (kind, settings) = cfg.resolver_spec("vault");
    assert_eq!(kind, "hashicorp");
    assert_eq!(settings["address"], "https://project:8200");
    assert_eq!(settings["namespace"], "team");
}

#[test]
fn errors_carry_file_line_and_hints() {
    let cases: &[(&str, &str)] = &[
        (
            "[secrets.K]\nresolvr = \"env\"\nref = \"V\"\n",
            ":2:1: secret K: unknown key `resolvr`; did you mean `resolver`?",
        ),
        (
            "[secret.K]\nresolver = \"env\"\n",
            ":1:2: unknown key `secret`; did you mean `secrets`?",
        ),
        (
            "[secrets.K]\nresolver = \"env\"\n",
            ":1:1: secret K: missing `ref`",
        ),
        (
            "[secrets.K]\nresolver = \"env\"\nref = 5\n",
            ":3:7: secret K: `ref` must be a string",
        ),
        (
            "[secrets.K]\nresolver = \"env\"\nref = \"V\"\nhosts = [\"https://api.x.com/v1\"]\n",
            ":4:10: secret K: `https://api.x.com/v1` is not a host name",
        ),
        (
            "[resolvers.v]\ntype = \"hashicorp\"\nadress = \"x\"\n",
            ":3:1: [resolvers.v]: unknown setting `adress` for a hashicorp_vault resolver; did you mean `address`?",
        ),
        (
            "[resolvers.v]\ntype = \"hashicorp_valt\"\n",
            ":2:8: [resolvers.v]: unknown resolver type 'hashicorp_valt'; did you mean `hashicorp_vault`?",
        ),
        (
            "[blind]\nconections = []\n",
            ":2:1: [blind]: unknown key `conections`; did you mean `connections`?",
        ),
        (
            "[blind]\nconnections = [{ allow = true, host = \"a\", regex = \"b\" }]\n",
            "must specify either 'host' or 'regex', not both",
        ),
        (
            "[blind]\nconnections = [{ allow = true, regex = \"(\" }]\n",
            ":2:40: [blind] connection rule: invalid regex",
        ),
        (
            "[blind]\nconnections = [{ allow = true, cidr = \"127.0.0.0/33\" }]\n",
            ":2:39: [blind] connection rule: cidr `127.0.0.0/33` is not an address range like \"127.0.0.0/8\"",
        ),
        (
            "[blind]\nconnections = [{ allow = true, host = \"a\", cidr = \"127.0.0.1\" }]\n",
            "must specify either 'host' or 'regex', not both",
        ),
        (
            "[blind]\nresolver = \"dns.google\"\n",
            ":2:12: [blind] resolver: `dns.google` is not ADDR:PORT",
        ),
        (
            "[blind]\nupstream_ca = \"missing.pem\"\n",
            "missing.pem is not a readable file",
        ),
        (
            "[blind]\nlisten = \"0.0.0.0\"\n",
            ":2:10: [blind] listen: `0.0.0.0` is not \"loopback\"",
        ),
        (
            "[blind]\nunix_sockets = \"/run/app.sock\"\n",
            ":2:16: [blind] `unix_sockets` must be a list",
        ),
        (
            "[blind]\nunix_sockets = [\"/run/app.sock\", \"run/other.sock\"]\n",
            ":2:34: [blind] unix_sockets: invalid unix-socket rule \"run/other.sock\": write an absolute path",
        ),
        (
            "[blind]\nunix_sockets = [\"/run/../var/run/docker.sock\"]\n",
            "no empty, `.` or `..` components",
        ),
        (
            "[blind]\nunix_sockets = [1]\n",
            ":2:17: [blind] `unix_sockets` entries must be strings",
        ),
        ("this is [[[not valid toml", ":1:6: invalid TOML"),
        (
            "[production]\nsecret = {}\n",
            ":1:2: unknown key `production`",
        ),
        (
            "[production.secrets]\n[production.blind]\n",
            ":2:13: unknown key `blind` in environment section [production]",
        ),
    ];
    for (text, want) in cases {
        let dir = dir_with(&[(".keyzero.toml", text)]);
        let err = load(dir.path(), &[("KEYZERO_ENV", "production")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want),
            "for {text:?}\n got: {err}\nwant: {want}"
        );
        if want.starts_with(':') {
            assert!(err.contains(".keyzero.toml:"), "{err}");
        }
    }
}

#[test]
fn blind_table_parses() {
    let dir = dir_with(&[
        ("ca.pem", "-----BEGIN CERTIFICATE-----\n"),
        (
            ".keyzero.toml",
            "[secrets.K]\nresolver = \"env\"\nref = \"V\"\nhosts = [\"API.GitHub.com\", \"*.example.com\"]\n\n[blind]\nconnections = [\n  { allow = false, host = \"evil.example.com\" },\n  { allow = true, regex = '(.+\\.)?example\\.com' },\n  { allow = true, cidr = \"127.0.0.0/8\" },\n  { allow = true, regex = 'github\\.com' },\n]\nipv6 = true\nrefuse_on_scope_violation = true\nupstream_ca = \"ca.pem\"\nresolver = \"127.0.0.1:5353\"\n",
        ),
    ]);
    let cfg = load(dir.path(), &[]).unwrap();
    assert_eq!(
        cfg.secrets["K"].hosts,
        vec!["api.github.com", "*.example.com"]
    );
    let b = &cfg.blind;
    assert!(b.ipv6 && b.refuse_on_scope_violation && !b.udp && !b.non_http_tcp);
    assert_eq!(
        b.upstream_ca.as_deref(),
        Some(dir.path().join("ca.pem").as_path())
    );
    assert_eq!(b.dns_upstream().unwrap(), "127.0.0.1:5353".parse().unwrap());
    assert!(b.connection_allowed("api.example.com"));
    assert!(b.connection_allowed("example.com"));
    assert!(!b.connection_allowed("evil.example.com"));
    assert!(!b.connection_allowed("other.org"));
    // Regex rules match the whole name (issue 14); the cidr rule matches address literals.
    assert!(b.connection_allowed("github.com"));
    assert!(!b.connection_allowed("github.com.evil.io"));
    assert!(!b.connection_allowed("evilgithub.com"));
    assert!(!b.connection_allowed("example.com.evil.io"));
    assert!(b.connection_allowed("127.0.0.5"));
    assert!(!b.connection_allowed("10.0.0.1"));
    // Containment defaults: servers on loopback only, unix sockets: the system log only.
    assert_eq!(b.listen, crate::intercept::Listen::Loopback);
    assert_eq!(b.unix_sockets, None);
    let defaults: Vec<String> = b.unix_rules().iter().map(ToString::to_string).collect();
    assert_eq!(defaults, super::blind::DEFAULT_UNIX_SOCKETS);
}

#[test]
fn blind_containment_keys_parse() {
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[blind]\nlisten = \"any\"\nunix_sockets = [\"/run/app.sock\", \"/run/app/\", \"@app-bus\"]\n",
    )]);
    let b = load(dir.path(), &[]).unwrap().blind;
    assert_eq!(b.listen, crate::intercept::Listen::Any);
    use crate::intercept::UnixRule;
    assert_eq!(
        b.unix_rules(),
        vec![
            UnixRule::Path("/run/app.sock".into()),
            UnixRule::Dir("/run/app".into()),
            UnixRule::Abstract(b"app-bus".to_vec()),
        ]
    );
    // An explicit empty list allows no unix socket at all (not the defaults).
    let dir = dir_with(&[(".keyzero.toml", "[blind]\nunix_sockets = []\n")]);
    assert!(load(dir.path(), &[]).unwrap().blind.unix_rules().is_empty());
}

#[test]
fn only_filter_reports_every_unknown_name() {
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[secrets]\nAPI_KEY = { resolver = \"env\", ref = \"A\" }\nDB = { resolver = \"env\", ref = \"B\" }\n",
    )]);
    let cfg = load(dir.path(), &[]).unwrap();
    let only = vec!["API_KEY".to_owned()];
    assert_eq!(cfg.select(Some(&only)).unwrap().len(), 1);
    let only = vec!["API_KY".to_owned(), "NOPE".to_owned()];
    let err = cfg.select(Some(&only)).unwrap_err().to_string();
    assert_eq!(
        err,
        "secret(s) not found in config: API_KY (did you mean API_KEY?), NOPE"
    );
}

#[test]
fn blind_warns_when_tokens_may_go_anywhere() {
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[secrets]\nA = { resolver = \"env\", ref = \"A\" }\nB = { resolver = \"env\", ref = \"B\", hosts = [\"api.x.com\"] }\n",
    )]);
    let cfg = load(dir.path(), &[]).unwrap();
    let w = cfg.blind_warnings();
    assert_eq!(w.len(), 1);
    assert!(
        w[0].contains("A has no `hosts`") && w[0].contains("ANY host"),
        "{w:?}"
    );
    let dir = dir_with(&[(
        ".keyzero.toml",
        "[secrets]\nA = { resolver = \"env\", ref = \"A\" }\n[blind]\nconnections = [{ allow = true, host = \"api.x.com\" }]\n",
    )]);
    assert!(load(dir.path(), &[]).unwrap().blind_warnings().is_empty());
}

/// Every truncation and single-byte corruption of a full config (with multi-byte text) gives a
/// value or an error, never a panic.
#[test]
fn malformed_input_never_panics() {
    let full = "# clé ünïcode\n[resolvers.v]\ntype = \"hashicorp\"\naddress = \"https://v:8200\"\ntimeout = 2.5\n\n[secrets]\nA = { resolver = \"v\", ref = \"secret/ä\", field = \"k\", hosts = [\"api.example.com\"] }\n\n[production.secrets.A]\nresolver = \"env\"\nref = \"X\"\n\n[blind]\nconnections = [{ allow = true, regex = '^a\\.b$' }]\nresolver = \"127.0.0.1:53\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(CONFIG_FILENAME);
    let bytes = full.as_bytes();
    let mut variants: Vec<Vec<u8>> = (0..=bytes.len()).map(|i| bytes[..i].to_vec()).collect();
    for i in 0..bytes.len() {
        for b in [b'[', b'"', b'=', b'\n', 0xff] {
            let mut v = bytes.to_vec();
            v[i] = b;
            variants.push(v);
        }
    }
    for v in variants {
        std::fs::write(&path, &v).unwrap();
        let _ = load(dir.path(), &[]);
        let _ = load(dir.path(), &[("KEYZERO_ENV", "production")]);
    }
}

#[test]
fn blind_max_allowed_ips_is_a_bounded_count() {
    let parse = |v: &str| {
        let dir = dir_with(&[(
            ".keyzero.toml",
            &format!("[blind]\nmax_allowed_ips = {v}\n"),
        )]);
        load(dir.path(), &[]).map(|c| c.blind.max_allowed_ips)
    };
    assert_eq!(parse("64").unwrap(), Some(64));
    assert_eq!(parse("262_144").unwrap(), Some(262_144));
    for bad in ["0", "262145", "-1", "\"64\"", "1.5"] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(
            err.contains(":2:19: [blind] max_allowed_ips must be a whole number from 1 to 262144"),
            "{bad}: {err}"
        );
    }
    let dir = dir_with(&[(".keyzero.toml", "[blind]\nipv6 = true\n")]);
    assert_eq!(load(dir.path(), &[]).unwrap().blind.max_allowed_ips, None);
}
