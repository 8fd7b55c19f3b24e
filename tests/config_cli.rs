//! The `kz` binary as a real process: `run` (values in the child env, --only, --clean-env,
//! --keep-env, exit codes, signals, progress), `export`, `status`, `validate`, `init`, `list`,
//! environment sections, the local override, walking up to the config, a real OpenBao behind
//! `kz run`, and: no secret value ever on stderr.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VALUE_A: &str = "sk-live-cli-a-93f1d0";
const VALUE_B: &str = "sk-live-cli-b-5e2c7a";

/// `kz --dir DIR …` with a private HOME (no global config) and no environment selection vars.
fn kz(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kz"));
    c.arg("--dir")
        .arg(dir)
        .env("HOME", dir.join("home"))
        // Blind runs' config approvals stay in the test's directory.
        .env("KZ_STATE_DIR", dir.join("kz-state"))
        .env_remove("XDG_CONFIG_HOME");
    for v in [
        "KEYZERO_ENV",
        "NODE_ENV",
        "RAILS_ENV",
        "APP_ENV",
        "RACK_ENV",
        "VAULT_TOKEN",
        "VAULT_ADDR",
    ] {
        c.env_remove(v);
    }
    c
}

fn project(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_values(text: &str) {
    for v in [VALUE_A, VALUE_B] {
        assert!(!text.contains(v), "a secret value leaked:\n{text}");
    }
}

const TWO_SECRETS: &str = r#"
[secrets.SECRET_A]
resolver = "env"
ref = "KZ_CLI_SRC_A"

[secrets.SECRET_B]
resolver = "env"
ref = "KZ_CLI_SRC_B"
hosts = ["api.example.com"]
"#;

#[test]
fn run_injects_values_only_and_args() {
    let p = project(&[(".keyzero.toml", TWO_SECRETS)]);
    let out = kz(p.path())
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "echo A=$SECRET_A B=$SECRET_B \"$0\"",
            "arg-one",
        ])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .env("KZ_CLI_SRC_B", VALUE_B)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("A={VALUE_A} B={VALUE_B} arg-one")
    );
    assert_no_values(&stderr(&out));

    let out = kz(p.path())
        .args([
            "run",
            "--only",
            "SECRET_A",
            "--",
            "sh",
            "-c",
            "echo A=$SECRET_A B=${SECRET_B:-unset}",
        ])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("A={VALUE_A} B=unset"));

    let out = kz(p.path())
        .args(["run", "--only", "SECRET_X,SECRET_A", "--", "true"])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("secret(s) not found in config: SECRET_X"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn clean_env_keeps_essentials_and_keep_env() {
    let p = project(&[(".keyzero.toml", TWO_SECRETS)]);
    let out = kz(p.path())
        .args([
            "run",
            "--clean-env",
            "--keep-env",
            "CUSTOM_KEPT",
            "--",
            "env",
        ])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .env("KZ_CLI_SRC_B", VALUE_B)
        .env("CUSTOM_KEPT", "preserved")
        .env("CUSTOM_DROPPED", "gone")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let env = stdout(&out);
    assert!(env.contains(&format!("SECRET_A={VALUE_A}")), "{env}");
    assert!(
        env.contains("CUSTOM_KEPT=preserved") && env.contains("PATH="),
        "{env}"
    );
    assert!(
        !env.contains("CUSTOM_DROPPED") && !env.contains("KZ_CLI_SRC_A"),
        "{env}"
    );
}

#[test]
fn failures_list_every_secret_and_never_a_value() {
    let p = project(&[
        (".env", &format!("PRESENT={VALUE_B}\nEMPTY=\n")),
        (
            ".keyzero.toml",
            r#"
[resolvers.dotenv]
type = "env_file"
path = ".env"

[secrets.GOOD]
resolver = "env"
ref = "KZ_CLI_SRC_A"

[secrets.MISSING]
resolver = "env"
ref = "KZ_CLI_NOT_SET"

[secrets.EMPTY]
resolver = "dotenv"
ref = "EMPTY"

[secrets.NOKEY]
resolver = "dotenv"
ref = "ABSENT"

[secrets.BROKEN]
resolver = "nosuchkind"
ref = "x"
"#,
        ),
    ]);
    // `path = ".env"` is taken from the config's directory, whatever the current one.
    let out = kz(p.path())
        .current_dir("/")
        .args(["run", "--", "sh", "-c", "echo should-not-run"])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("failed to resolve 4 secret(s)"), "{err}");
    for name in ["MISSING", "EMPTY", "NOKEY", "BROKEN"] {
        assert!(
            err.contains(&format!("secret '{name}'")),
            "{name} not listed: {err}"
        );
    }
    assert!(err.contains("resolved to empty value"), "{err}");
    assert!(err.contains("unknown resolver type 'nosuchkind'"), "{err}");
    assert!(!stdout(&out).contains("should-not-run"));
    assert_no_values(&err);
}

#[test]
fn exit_codes_pass_through() {
    let p = project(&[(".keyzero.toml", "[secrets]\n")]);
    let code = |args: &[&str]| {
        kz(p.path())
            .arg("run")
            .arg("--")
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(code(&["sh", "-c", "exit 7"]), Some(7));
    assert_eq!(code(&["true"]), Some(0));
    assert_eq!(code(&["sh", "-c", "kill -KILL $$"]), Some(137));
    assert_eq!(code(&["sh", "-c", "kill -TERM $$"]), Some(143));
    assert_eq!(code(&["/nonexistent/kz-test-cmd"]), Some(127));
}

/// SIGTERM and SIGINT sent to kz reach the child, whose own exit code kz then returns.
#[test]
fn signals_are_forwarded() {
    let p = project(&[(".keyzero.toml", "[secrets]\n")]);
    for (sig, code) in [
        (nix::sys::signal::Signal::SIGTERM, 42),
        (nix::sys::signal::Signal::SIGINT, 43),
    ] {
        let script = "trap 'echo got-term; exit 42' TERM; trap 'echo got-int; exit 43' INT; echo ready; while :; do sleep 0.05; done";
        let mut child = kz(p.path())
            .args(["run", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
        let start = Instant::now();
        let status = child.wait().unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(status.code(), Some(code), "after {sig:?}");
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        assert!(rest.iter().any(|l| l.starts_with("got-")), "{rest:?}");
    }
}

#[test]
fn environment_sections_are_selected() {
    let p = project(&[(
        ".keyzero.toml",
        r#"
[secrets.API_KEY]
resolver = "env"
ref = "KZ_CLI_DEV"

[production.secrets.API_KEY]
resolver = "env"
ref = "KZ_CLI_PROD"

[staging.secrets.API_KEY]
resolver = "env"
ref = "KZ_CLI_STAGING"
"#,
    )]);
    let run = |vars: &[(&str, &str)]| {
        let mut c = kz(p.path());
        c.args(["run", "--", "sh", "-c", "echo $API_KEY"])
            .env("KZ_CLI_DEV", "dev-value")
            .env("KZ_CLI_PROD", "prod-value")
            .env("KZ_CLI_STAGING", "staging-value");
        for (k, v) in vars {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            stdout(&out).trim().to_owned(),
            stderr(&out),
        )
    };
    assert_eq!(run(&[]).1, "dev-value");
    assert_eq!(run(&[("NODE_ENV", "production")]).1, "prod-value");
    assert_eq!(run(&[("RACK_ENV", "staging")]).1, "staging-value");
    assert_eq!(
        run(&[("KEYZERO_ENV", "staging"), ("NODE_ENV", "production")]).1,
        "staging-value"
    );
    let (code, _, err) = run(&[("KEYZERO_ENV", "qa")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("environment \"qa\" not found"), "{err}");

    let out = kz(p.path())
        .args(["status"])
        .env("APP_ENV", "production")
        .env("KZ_CLI_PROD", "prod-value")
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("Environment: production"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn local_file_overrides_and_config_is_found_walking_up() {
    let p = project(&[
        (
            ".keyzero.toml",
            "[secrets.K]\nresolver = \"env\"\nref = \"KZ_CLI_SHARED\"\n\n[secrets.ONLY_SHARED]\nresolver = \"env\"\nref = \"X\"\n",
        ),
        (
            ".keyzero.local.toml",
            "[secrets.K]\nresolver = \"env\"\nref = \"KZ_CLI_LOCAL\"\n",
        ),
        ("deep/er/dir/.keep", ""),
    ]);
    // No --dir: from a subdirectory, kz walks up to the project.
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .current_dir(p.path().join("deep/er/dir"))
        .env("HOME", p.path().join("home"))
        .env_remove("KEYZERO_ENV")
        .env_remove("NODE_ENV")
        .args(["run", "--", "sh", "-c", "echo $K"])
        .env("KZ_CLI_SHARED", "from_shared")
        .env("KZ_CLI_LOCAL", "from_local")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "from_local");
    let err = stderr(&out);
    assert!(
        err.contains(".keyzero.local.toml is out of sync") && err.contains("ONLY_SHARED"),
        "{err}"
    );

    let out = kz(p.path())
        .args(["status"])
        .env("KZ_CLI_LOCAL", "from_local")
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("Config: .keyzero.local.toml"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn export_formats_and_quoting() {
    let p = project(&[(".keyzero.toml", TWO_SECRETS)]);
    let export = |args: &[&str]| {
        let out = kz(p.path())
            .arg("export")
            .args(args)
            .env("KZ_CLI_SRC_A", "it's a test")
            .env("KZ_CLI_SRC_B", "has 'quotes' and \"double\" and spaces")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("writing secrets to a non-terminal"));
        stdout(&out)
    };
    let text = export(&[]);
    assert_eq!(
        text,
        "export SECRET_A='it'\\''s a test'\nexport SECRET_B='has '\\''quotes'\\'' and \"double\" and spaces'\n"
    );
    // The exported line evaluates back to the exact value in a real shell.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{text}\nprintf %s \"$SECRET_B\""))
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "has 'quotes' and \"double\" and spaces");
    assert!(export(&["--shell", "fish"]).contains("set -gx SECRET_A 'it'\\''s a test'"));
    let json: serde_json::Value =
        serde_json::from_str(&export(&["--format", "json", "--only", "SECRET_B"])).unwrap();
    assert_eq!(json["environment"], "development");
    assert_eq!(
        json["secrets"]["SECRET_B"],
        "has 'quotes' and \"double\" and spaces"
    );
    assert!(json["secrets"].get("SECRET_A").is_none());
}

#[test]
fn status_text_json_and_exit_code() {
    let p = project(&[(".keyzero.toml", TWO_SECRETS)]);
    let out = kz(p.path())
        .args(["status"])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .env("KZ_CLI_SRC_B", VALUE_B)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("Environment: development") && text.contains("Config: .keyzero.toml"),
        "{text}"
    );
    assert!(
        text.contains("SECRET_A") && text.contains("\u{2713}  ****"),
        "{text}"
    );
    assert!(
        text.contains(&format!("****{}", &VALUE_A[VALUE_A.len() - 4..])),
        "{text}"
    );
    assert_no_values(&text);

    let out = kz(p.path())
        .args(["status", "--format", "json"])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["all_ok"], false);
    let b = doc["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "SECRET_B")
        .unwrap();
    assert_eq!(
        (b["status"].as_str(), b["ref"].as_str()),
        (Some("error"), Some("KZ_CLI_SRC_B"))
    );
    assert!(b["error"].as_str().unwrap().contains("KZ_CLI_SRC_B"));
    assert_no_values(&stdout(&out));
}

#[test]
fn validate_reports_with_locations_and_hints() {
    let ok = project(&[(
        ".keyzero.toml",
        "[resolvers.my-custom]\ntype = \"env\"\n\n[secrets]\nA = { resolver = \"my-custom\", ref = \"X\" }\nB = { resolver = \"env\", ref = \"Y\" }\n",
    )]);
    let out = kz(ok.path()).arg("validate").output().unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    assert_eq!(
        stdout(&out),
        ".keyzero.toml: ok\n  2 secrets, 2 resolvers\n"
    );

    let bad = project(&[(
        ".keyzero.toml",
        "[secrets.GOOD]\nresolver = \"env\"\nref = \"X\"\n\n[secrets.BAD]\nresolver = \"hashicorp_vualt\"\nref = \"Y\"\n",
    )]);
    let out = kz(bad.path()).arg("validate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("BAD: unknown resolver 'hashicorp_vualt'; did you mean `hashicorp_vault`?"),
        "{text}"
    );
    assert!(text.contains(".keyzero.toml:5:1"), "{text}");
    let out = kz(bad.path())
        .args(["validate", "--format", "json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["errors"][0]["name"], "BAD");

    // Settings are checked by building the resolver: a bad value is an error, a credential
    // missing from this environment (VAULT_TOKEN) only a warning.
    let badvalue = project(&[(
        ".keyzero.toml",
        "[resolvers.v]\ntype = \"hashicorp\"\nauth_method = \"kerberos\"\n\n[secrets.S]\nresolver = \"v\"\nref = \"secret/s\"\n",
    )]);
    let out = kz(badvalue.path()).arg("validate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("S: resolver 'v': resolver configuration: hashicorp_vault: setting `auth_method` is 'kerberos'"),
        "{}",
        stdout(&out)
    );
    let notoken = project(&[(
        ".keyzero.toml",
        "[resolvers.v]\ntype = \"hashicorp\"\naddress = \"http://127.0.0.1:1\"\n\n[secrets.S]\nresolver = \"v\"\nref = \"secret/s\"\n",
    )]);
    let out = kz(notoken.path()).arg("validate").output().unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning: S: resolver 'v'") && err.contains("no Vault token"),
        "{err}"
    );

    for (text, want) in [
        (
            "this is [[[not valid toml",
            ".keyzero.toml:1:6: invalid TOML",
        ),
        (
            "[secrets.K]\nresolver = \"env\"\nreff = \"X\"\n",
            ":3:1: secret K: unknown key `reff`; did you mean `ref`?",
        ),
    ] {
        let p = project(&[(".keyzero.toml", text)]);
        let out = kz(p.path()).arg("validate").output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(stdout(&out).contains(want), "{}", stdout(&out));
    }
    let empty = tempfile::tempdir().unwrap();
    let out = kz(empty.path()).arg("validate").output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no config file found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn init_and_list() {
    let p = tempfile::tempdir().unwrap();
    let out = kz(p.path()).arg("init").output().unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains("created"));
    let written = std::fs::read_to_string(p.path().join(".keyzero.toml")).unwrap();
    assert!(written.contains("keyzero configuration"));
    // The starter file is valid (everything commented out).
    assert!(
        kz(p.path())
            .arg("validate")
            .output()
            .unwrap()
            .status
            .success()
    );
    let out = kz(p.path()).arg("init").output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"));

    let p = project(&[(".keyzero.toml", TWO_SECRETS)]);
    let out = kz(p.path()).arg("list").output().unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        [
            "NAME RESOLVER REF",
            "SECRET_A env KZ_CLI_SRC_A",
            "SECRET_B env KZ_CLI_SRC_B"
        ]
    );
    let out = kz(p.path())
        .args(["ls", "--format", "json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        doc["SECRET_A"],
        serde_json::json!({"resolver": "env", "ref": "KZ_CLI_SRC_A"})
    );
    assert_eq!(
        doc["SECRET_B"]["hosts"],
        serde_json::json!(["api.example.com"])
    );
}

/// A remote PDP (the `keyzero` resolver) that takes 1.5 s to answer: kz prints progress on
/// stderr, then runs the command with the value, which stays off stderr.
#[test]
fn slow_resolution_shows_progress() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf);
            std::thread::sleep(Duration::from_millis(1500));
            let body = format!(
                r#"{{"results":{{"secret/slow":{{"allowed":true,"policy":"p","mode":"direct","value":"{VALUE_A}"}}}}}}"#
            );
            let _ = write!(
                sock,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let p = project(&[(
        ".keyzero.toml",
        &format!(
            "[resolvers.pdp]\ntype = \"keyzero\"\nendpoint = \"http://127.0.0.1:{port}\"\ntoken = \"agent-jwt\"\n\n[secrets.SLOW]\nresolver = \"pdp\"\nref = \"secret/slow\"\n"
        ),
    )]);
    let out = kz(p.path())
        .args(["run", "--", "sh", "-c", "echo $SLOW"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), VALUE_A);
    let err = stderr(&out);
    assert!(
        err.contains("kz: resolving secrets: 0/1 done, waiting for SLOW"),
        "{err}"
    );
    assert_no_values(&err);
}

/// `kz run` against a real OpenBao: KeyZero's `hashicorp` kind, VAULT_TOKEN from the environment.
#[test]
fn run_with_openbao() {
    let bao = support::servers::Bao::start();
    bao.cli(&[
        "kv",
        "put",
        "-mount=secret",
        "ci/github",
        &format!("token={VALUE_B}"),
    ]);
    let p = project(&[(
        ".keyzero.toml",
        &format!(
            "[resolvers.vault]\ntype = \"hashicorp\"\naddress = \"{}\"\n\n[secrets.GITHUB_TOKEN]\nresolver = \"vault\"\nref = \"secret/ci/github\"\nfield = \"token\"\nhosts = [\"api.github.com\"]\n",
            bao.addr
        ),
    )]);
    let out = kz(p.path())
        .args(["run", "--", "sh", "-c", "echo $GITHUB_TOKEN"])
        .env("VAULT_TOKEN", &bao.root_token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), VALUE_B);
    assert_no_values(&stderr(&out));
    let out = kz(p.path())
        .args(["run", "--", "true"])
        .env("VAULT_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("secret 'GITHUB_TOKEN'") && err.contains("not authorized"),
        "{err}"
    );
    assert_no_values(&err);
}

#[test]
fn blind_flag_is_explained_and_wired() {
    let p = project(&[(".keyzero.toml", TWO_SECRETS)]);
    // Blind mode itself is tested end to end in tests/run_blind.rs; here: it runs, and an
    // unscoped secret with no connection rules gets the loud warning.
    // As root the agent may not be root: it runs as root of its own user namespace (nobody
    // outside), which must be able to enter the project directory.
    std::fs::set_permissions(
        p.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = kz(p.path())
        .args([
            "run",
            "--blind",
            "--allow-root-agent",
            "--",
            "sh",
            "-c",
            "echo $SECRET_A",
        ])
        .env("KZ_CLI_SRC_A", VALUE_A)
        .env("KZ_CLI_SRC_B", VALUE_B)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("kz_masked_"), "{}", stdout(&out));
    assert!(!stdout(&out).contains(VALUE_A) && !stderr(&out).contains(VALUE_A));
    assert!(stderr(&out).contains("ANY host"), "{}", stderr(&out));
    let out = kz(p.path()).args(["run", "--help"]).output().unwrap();
    let help = stdout(&out);
    assert!(
        help.contains("kz run --blind -- node agent.js") && help.contains("masked tokens"),
        "{help}"
    );
    let mut child = kz(p.path())
        .args(["run", "--clean-env", "--blind", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(err.contains("cannot be used with"), "{err}");
}

/// `kz run` against moto (KeyZero's `aws` kind, credentials from the AWS_* environment, a JSON
/// field) and a Kubernetes-style `file` directory, side by side.
#[test]
fn run_with_aws_and_file_resolvers() {
    let moto = support::servers::Moto::start();
    moto.boto3(&format!(
        "sm.create_secret(Name='prod/db', SecretString='{{\"password\": \"{VALUE_A}\"}}')"
    ));
    let p = project(&[
        ("secrets/api-key", &format!("{VALUE_B}\n")),
        (
            ".keyzero.toml",
            &format!(
                "[resolvers.aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n\n[resolvers.mounted]\ntype = \"file\"\npath = \"secrets\"\n\n[secrets.DB_PASSWORD]\nresolver = \"aws\"\nref = \"sm://prod/db\"\nfield = \"password\"\n\n[secrets.API_KEY]\nresolver = \"mounted\"\nref = \"api-key\"\n",
                moto.endpoint
            ),
        ),
    ]);
    let out = kz(p.path())
        .args(["run", "--", "sh", "-c", "echo \"$DB_PASSWORD|$API_KEY\""])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("{VALUE_A}|{VALUE_B}"));
    assert_no_values(&stderr(&out));
    // Without credentials the failure names the secret and what to set, never a value.
    let out = kz(p.path())
        .args(["run", "--", "true"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("secret 'DB_PASSWORD'") && err.contains("no AWS credentials"),
        "{err}"
    );
    assert_no_values(&err);
}
