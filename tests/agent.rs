//! The node daemon `kz agent run` end to end (root): the real binary, its API over a unix
//! socket driven with curl, sandboxes whose processes the test places in the cgroups the API
//! returned, real upstreams in a netns of their own.
//!
//! - `sandboxes_with_the_same_secret_name_stay_apart`: [`N`] sandboxes, each holding `API_KEY`
//!   with its own real value and its own upstream; every upstream receives only its own
//!   sandbox's value, a token used in another sandbox is never swapped, DNS answers open
//!   addresses in the asking sandbox only; after DELETE no cgroup is left and SIGTERM stops the
//!   daemon cleanly.
//! - `users_manage_only_their_own_sandboxes`: SO_PEERCRED authorisation with requests made as
//!   the unprivileged test user (curl and the `kz sandbox` CLI under setpriv), and a user
//!   cannot make the daemon resolve root's secrets; a second daemon on a live socket refuses.
//! - `the_daemon_needs_the_kernel`: without kernel interception it does not start.
//! - `a_user_runs_blind_through_the_daemon`: `kz run --blind` as the unprivileged test user
//!   goes through the daemon: the child runs as that user, contained, in a sandbox made from
//!   the project (secrets resolved as the user), its HTTPS request swapped, a connect to an
//!   address it never resolved refused by the kernel, stdio through the passed descriptors,
//!   the exit code passed back, the sandbox gone afterwards; another user cannot start a
//!   process in the first user's sandbox.
//! - `killing_the_client_kills_the_child_and_its_sandbox`: SIGKILL to `kz run` ends its child
//!   and removes its sandbox.
//! - `pods_are_guarded_in_their_own_cgroups`: Kubernetes pods in a kubelet-like cgroup tree
//!   (systemd and cgroupfs layouts, two QoS classes) registered with projected-SA-style JWTs
//!   whose JWKS an upstream serves: a container cgroup made after registration gets the pod's
//!   sandbox (HTTPS swap, unlisted address refused), pods stay apart, an unregistered sibling
//!   is untouched, bad tokens, pods off the node and pods with their own netns are refused,
//!   removal leaves the kubelet's cgroup in place. A SIGKILL leaves the pods cut off (a container
//!   process reaches nothing directly), the next daemon adopts them (same process, token and
//!   CA; listed again) and drops a pod whose cgroup the kubelet removed meanwhile.
//! - `an_orderly_stop_answers_the_requests_in_flight_first`: SIGTERM drains the proxy first.
//! - `a_killed_daemons_sandboxes_are_adopted_by_the_next`: restart without a gap: SIGKILL leaves
//!   the sandboxes cut off, the next daemon adopts them (same processes, tokens and CA); an
//!   unresolvable secret is adopted unswappable, an emptied sandbox dropped.
//! - `an_adopted_runs_sandbox_goes_with_its_last_process`: a `kz run --blind` sandbox adopted
//!   after a SIGKILL is destroyed once its process ends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::blind_env::host;
use support::dns::{TestDns, Zone};
use support::netns::{Netns, Pair};
use support::tls::TestCa;
use support::upstream::Upstream;

/// Sandboxes at once, as the issue's isolation test asks (about 4 s on 2 cores).
const N: usize = 50;

fn real(k: usize) -> String {
    format!("real-value-of-sandbox-{k:02}-5f1c9e")
}

fn upstream_ip(k: usize) -> String {
    format!("10.77.0.{}", 10 + k)
}

/// A running `kz agent run` and where it keeps things.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    audit: PathBuf,
    /// Its `--state-dir` (one per daemon: parallel tests never share one).
    state: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon (inside `ns` when given) with `env`, its socket open to `group`;
    /// returns once the socket answers.
    fn start(ns: Option<&Netns>, group: &str, env: &[(String, String)]) -> Daemon {
        Daemon::start_with(ns, group, env, &[])
    }

    /// [`Daemon::start`] with more arguments for `kz agent run`.
    fn start_with(
        ns: Option<&Netns>,
        group: &str,
        env: &[(String, String)],
        args: &[&std::ffi::OsStr],
    ) -> Daemon {
        let dir = support::agent_readable_dir("kzag");
        let mut d = Daemon {
            child: None,
            socket: dir.join("run/agent.sock"),
            audit: dir.join("audit.jsonl"),
            state: dir.join("state"),
            dir,
        };
        d.spawn(ns, group, env, args);
        d
    }

    /// Starts the daemon again with the same socket, audit log and state directory (after
    /// the last one was stopped or killed).
    fn restart(
        &mut self,
        ns: Option<&Netns>,
        group: &str,
        env: &[(String, String)],
        args: &[&std::ffi::OsStr],
    ) {
        assert!(self.child.is_none(), "the daemon still runs");
        self.spawn(ns, group, env, args);
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn spawn(
        &mut self,
        ns: Option<&Netns>,
        group: &str,
        env: &[(String, String)],
        args: &[&std::ffi::OsStr],
    ) {
        let mut cmd = match ns {
            Some(ns) => ns.command(env!("CARGO_BIN_EXE_kz")),
            None => Command::new(env!("CARGO_BIN_EXE_kz")),
        };
        cmd.args(["agent", "run", "--socket"])
            .arg(&self.socket)
            .args(["--socket-group", group, "--audit-log"])
            .arg(&self.audit)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            // Root's approvals (the gate of root's sandboxes) stay in the test's directory.
            .env("KZ_STATE_DIR", self.dir.join("approvals"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KZ_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.child = Some(cmd.spawn().unwrap());
        let d = self;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if d.socket.exists() && std::os::unix::net::UnixStream::connect(&d.socket).is_ok() {
                return;
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                let out = d.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "kz agent exited early ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "kz agent did not open its socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `method path` with curl as root, or as `user` (uid, gid) with setpriv.
    fn api(
        &self,
        user: Option<(u32, u32)>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut cmd = match user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--", "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        cmd.args(["-sS", "-m", "60", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd.arg(format!("http://kz{path}")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code: u16 = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {method} {path}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code, serde_json::from_str(json).unwrap_or(Value::Null))
    }

    /// SIGTERM; the daemon's exit status and stderr.
    fn stop(&mut self) -> Output {
        let child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        rx.recv_timeout(Duration::from_secs(30))
            .expect("kz agent did not exit within 30 s of SIGTERM")
            .unwrap()
    }

    /// The daemon's audit records, once the chain verifies.
    fn audit(&self) -> Vec<Value> {
        kz_agent::audit::verify_path(&self.audit)
            .unwrap_or_else(|e| panic!("the daemon's audit log does not verify: {e}"));
        std::fs::read_to_string(&self.audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_project(dir: &Path, toml: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join(".keyzero.toml"), toml).unwrap();
}

/// Sandbox `k`'s project: `API_KEY` from the daemon's `KZ_TEST_REAL_<k>`, scoped to its own
/// host; the agent may also connect to sandbox 0's host.
fn sandbox_project(dir: &Path, k: usize) {
    write_project(
        dir,
        &format!(
            r#"
[secrets.API_KEY]
resolver = "env"
ref = "KZ_TEST_REAL_{k}"
hosts = ["up{k}.test"]
allow_plaintext = true

[blind]
connections = [
  {{ allow = true, host = "up{k}.test" }},
  {{ allow = true, host = "up0.test" }},
]
resolver = "10.77.0.2:53"
"#
        ),
    );
}

/// A shell in the client netns that moves itself into `cgroup` (as the SCM_RIGHTS client of a
/// later slice will have the daemon do) and runs `script` there.
fn in_sandbox(ns: &Netns, cgroup: &str, script: &str) -> Command {
    let mut cmd = ns.command("bash");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > '{cgroup}/cgroup.procs' || exit 90\n{script}"
        ))
        .stdin(Stdio::null());
    cmd
}

fn cgroup_children(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sandboxes_with_the_same_secret_name_stay_apart() {
    if !support::require_root() {
        return;
    }
    let pair = Pair::new("agc", "agu");
    for k in 0..N {
        pair.add_upstream_addr(&format!("{}/24", upstream_ip(k)));
    }
    let ca = TestCa::new("kz agent test upstream CA");
    let upstreams: Vec<Upstream> = (0..N)
        .map(|k| {
            host(
                &pair.upstream,
                upstream_ip(k).parse().unwrap(),
                &ca,
                &format!("up{k}.test"),
            )
        })
        .collect();
    let mut zone = Zone::new(30);
    for k in 0..N {
        zone = zone.host(&format!("up{k}.test"), &[&upstream_ip(k)]);
    }
    let _dns = TestDns::start(&pair.upstream, "10.77.0.2:53".parse().unwrap(), zone);

    let env: Vec<(String, String)> = (0..N)
        .map(|k| (format!("KZ_TEST_REAL_{k}"), real(k)))
        .collect();
    let mut daemon = Daemon::start(Some(&pair.client), "root", &env);
    let (code, status) = daemon.api(None, "GET", "/v1/status", None);
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["kernel"], true);
    let cgroup_dir = PathBuf::from(status["cgroup_dir"].as_str().unwrap());

    // N sandboxes, each from its own project directory.
    let projects = support::agent_readable_dir("kzagp");
    let mut boxes = Vec::new();
    let t0 = Instant::now();
    for k in 0..N {
        let dir = projects.join(format!("p{k}"));
        sandbox_project(&dir, k);
        let (code, v) = daemon.api(
            None,
            "POST",
            "/v1/sandboxes",
            Some(&json!({"name": format!("box{k}"), "project_dir": dir})),
        );
        assert_eq!(code, 201, "create sandbox {k}: {v}");
        assert!(
            !v.to_string().contains(&real(k)),
            "a real value in the API's answer: {v}"
        );
        boxes.push(v);
    }
    let pid = daemon.child.as_ref().unwrap().id();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("{N} sandboxes created in {:?}; daemon {rss}", t0.elapsed());
    let token = |k: usize| {
        boxes[k]["secrets"]["API_KEY"]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let cgroup = |k: usize| boxes[k]["cgroup"].as_str().unwrap().to_owned();
    let ids: Vec<u64> = boxes.iter().map(|b| b["id"].as_u64().unwrap()).collect();
    let tokens: Vec<String> = (0..N).map(token).collect();
    assert_eq!(
        tokens
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        N,
        "every sandbox has a token of its own"
    );
    for (k, b) in boxes.iter().enumerate() {
        assert_eq!(b["id"], b["id"]);
        assert_eq!(b["owner_uid"], 0);
        assert!(cgroup(k).starts_with(cgroup_dir.to_str().unwrap()), "{b}");
        assert!(b["dns"].as_str().unwrap().starts_with("127.0.0.1:"), "{b}");
    }
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(listed.as_array().unwrap().len(), N);

    // Phase 1, all sandboxes at once: each calls its own upstream with its token; every other
    // also calls sandbox 0's upstream with its own token and with sandbox 0's token.
    let mut running = Vec::new();
    for k in 0..N {
        let call = |host: &str, path: &str, tok: &str| {
            format!(
                "curl -sS -m 15 -o /dev/null -w '{path} %{{http_code}}\\n' -H 'X-Sandbox: {k}' -H 'Authorization: Bearer {tok}' http://{host}/{path}\n"
            )
        };
        let mut script = call(&format!("up{k}.test"), "own", &token(k));
        if k > 0 {
            script += &call("up0.test", "foreign-own-token", &token(k));
            script += &call("up0.test", "foreign-stolen-token", &token(0));
        }
        let child = in_sandbox(&pair.client, &cgroup(k), &script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        running.push(child);
    }
    for (k, child) in running.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sandbox {k}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("own 200"), "sandbox {k}: {text}");
    }

    // Every upstream received only its own sandbox's real value, and only from that sandbox.
    let sender =
        |s: &support::upstream::Seen| -> usize { s.header("x-sandbox").unwrap().parse().unwrap() };
    for (u, up) in upstreams.iter().enumerate() {
        let seen = up.seen();
        assert!(
            seen.iter().any(|s| sender(s) == u
                && s.path == "/own"
                && s.header("authorization") == Some(&*format!("Bearer {}", real(u)))),
            "upstream {u} never got its sandbox's real value: {seen:?}"
        );
        for s in &seen {
            let auth = s.header("authorization").unwrap_or_default();
            for m in 0..N {
                if auth.contains(&real(m)) {
                    assert_eq!(
                        (m, sender(s)),
                        (u, u),
                        "upstream {u} got sandbox {m}'s value from sandbox {}: {s:?}",
                        sender(s)
                    );
                }
            }
        }
    }
    // Toward sandbox 0's host, another sandbox's token stays masked, and sandbox 0's token
    // used from another sandbox is never swapped into sandbox 0's value.
    let foreign: Vec<_> = upstreams[0]
        .seen()
        .into_iter()
        .filter(|s| sender(s) != 0)
        .collect();
    for s in &foreign {
        let k = sender(s);
        let expected = match s.path.as_str() {
            "/foreign-own-token" => token(k),
            "/foreign-stolen-token" => token(0),
            other => panic!("unexpected path {other}"),
        };
        assert_eq!(
            s.header("authorization"),
            Some(&*format!("Bearer {expected}")),
            "{s:?}"
        );
    }
    assert!(
        foreign.iter().any(|s| s.path == "/foreign-stolen-token"),
        "no request with sandbox 0's token from another sandbox reached up0: {foreign:?}"
    );

    // Phase 2: DNS answers opened addresses in the sandbox that asked only. Sandbox k never
    // resolved sandbox j's name (j = another sandbox >= 1): connecting to its address is
    // refused by the kernel (EPERM); its own upstream's address stays reachable.
    let mut running = Vec::new();
    for k in 0..N {
        let j = k % (N - 1) + 1;
        assert_ne!(j, k);
        let script = format!(
            "exec 3<>/dev/tcp/{own}/80 && echo own-connected; exec 3>&-\n\
             (exec 4<>/dev/tcp/{other}/80) 2>&1 && echo other-connected\ntrue\n",
            own = upstream_ip(k),
            other = upstream_ip(j),
        );
        let child = in_sandbox(&pair.client, &cgroup(k), &script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        running.push((k, j, child));
    }
    for (k, j, child) in running {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("own-connected"), "sandbox {k}: {text}");
        assert!(
            text.contains("Operation not permitted") && !text.contains("other-connected"),
            "sandbox {k} reached sandbox {j}'s address it never resolved: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Counters: each sandbox swapped in its own request; the refused connects are counted.
    for (k, id) in ids.iter().enumerate() {
        let (code, v) = daemon.api(None, "GET", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(code, 200, "{v}");
        assert!(
            v["counters"]["requests_swapped"].as_u64().unwrap() >= 1,
            "sandbox {k}: {v}"
        );
    }

    // The same counters as Prometheus series, one per sandbox, over the socket.
    let out = Command::new("curl")
        .args(["-sS", "-m", "30", "--unix-socket"])
        .arg(&daemon.socket)
        .arg("http://kz/metrics")
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    for id in &ids {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("kz_sandbox_requests_swapped_total{")
                    && l.contains(&format!("sandbox=\"{id}\""))
            })
            .unwrap_or_else(|| panic!("no series for sandbox {id}:\n{metrics}"));
        let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value >= 1, "{line}");
    }
    assert!(
        metrics.contains(&format!("kz_node_sandboxes {N}")),
        "{metrics}"
    );

    // Destroy them all: nothing is left under the daemon's cgroup directory.
    for id in &ids {
        let (code, v) = daemon.api(None, "DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(code, 200, "{v}");
    }
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(listed, json!([]));
    assert_eq!(
        cgroup_children(&cgroup_dir),
        Vec::<String>::new(),
        "cgroups left behind"
    );
    let (code, v) = daemon.api(None, "GET", &format!("/v1/sandboxes/{}", ids[0]), None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("no_such_sandbox"))
    );

    let out = daemon.stop();
    assert!(
        out.status.success(),
        "kz agent on SIGTERM: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!daemon.socket.exists(), "the socket outlived the daemon");
    assert!(
        !cgroup_dir.exists(),
        "the daemon's cgroup directory outlived it"
    );
    let records = daemon.audit();
    let log = std::fs::read_to_string(&daemon.audit).unwrap();
    for k in 0..N {
        assert!(!log.contains(&real(k)), "a real value in the audit log");
    }
    let kinds: HashMap<&str, usize> = records.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r["kind"].as_str().unwrap()).or_default() += 1;
        m
    });
    assert_eq!(kinds.get("sandbox_created"), Some(&N), "{kinds:?}");
    assert_eq!(kinds.get("sandbox_destroyed"), Some(&N), "{kinds:?}");
    assert!(
        kinds.get("connect_blocked").copied().unwrap_or(0) >= N,
        "{kinds:?}"
    );
    assert!(
        records.iter().any(|r| r["kind"] == "proxy_request"
            && r["sandbox"] == format!("u0-box{}", N - 1)
            && r["owner_uid"] == 0),
        "the proxy's records carry their sandbox"
    );
    let _ = std::fs::remove_dir_all(&projects);
}

#[test]
fn users_manage_only_their_own_sandboxes() {
    if !support::require_root() {
        return;
    }
    let agent = support::agent_user();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(agent.gid))
        .unwrap()
        .expect("the test user's group")
        .name;
    const ROOT_REAL: &str = "root-only-value-93c1d7a2";
    const USER_REAL: &str = "user-value-4b8e0f61";
    let mut daemon = Daemon::start(
        None,
        &group,
        &[("KZ_TEST_ROOT_KEY".into(), ROOT_REAL.into())],
    );
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "the socket is open to its group only");
    let me = Some((agent.uid, agent.gid));
    // A second daemon on a live socket stops at once and says why.
    let second = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["agent", "run", "--socket"])
        .arg(&daemon.socket)
        .arg("--audit-log")
        .arg(daemon.dir.join("second.jsonl"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already serving"),
        "{second:?}"
    );

    let projects = support::agent_readable_dir("kzagu");
    let blind = "[blind]\nconnections = [ { allow = true, host = \"api.test\" } ]\nresolver = \"127.0.0.1:53\"\n";
    // Root's project: a value from the daemon's environment.
    let root_dir = projects.join("root");
    write_project(
        &root_dir,
        &format!(
            "[secrets.API_KEY]\nresolver = \"env\"\nref = \"KZ_TEST_ROOT_KEY\"\nhosts = [\"api.test\"]\n{blind}"
        ),
    );
    // The user's project: a value from a file only the user can read.
    let user_dir = projects.join("user");
    let files = user_dir.join("secrets");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("api-key"), USER_REAL).unwrap();
    let file_project = |dir: &Path, files: &Path| {
        write_project(
            dir,
            &format!(
                "[resolvers.file]\npath = \"{}\"\n[secrets.API_KEY]\nresolver = \"file\"\nref = \"api-key\"\nhosts = [\"api.test\"]\n{blind}",
                files.display()
            ),
        );
    };
    file_project(&user_dir, &files);
    let own = |p: &Path| {
        nix::unistd::chown(p, Some(agent.uid.into()), Some(agent.gid.into())).unwrap();
    };
    own(&files);
    own(&files.join("api-key"));
    std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        files.join("api-key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // A project of the user's that points its file resolver at root's files.
    let root_files = projects.join("root-files");
    std::fs::create_dir_all(&root_files).unwrap();
    std::fs::write(root_files.join("api-key"), ROOT_REAL).unwrap();
    std::fs::set_permissions(&root_files, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sneaky_dir = projects.join("sneaky");
    file_project(&sneaky_dir, &root_files);

    let (code, root_box) = daemon.api(
        None,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"name": "agent", "project_dir": root_dir})),
    );
    assert_eq!(code, 201, "{root_box}");
    let root_id = root_box["id"].as_u64().unwrap();
    // The same name is the user's to take too: names are per owner.
    // The user's approvals (the gate of its sandboxes) in a store of its own.
    let user_state = projects.join("user-state");
    std::fs::create_dir_all(&user_state).unwrap();
    own(&user_state);
    std::fs::set_permissions(&user_state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, user_box) = daemon.api(
        me,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"name": "agent", "project_dir": user_dir, "state_dir": user_state})),
    );
    assert_eq!(code, 201, "{user_box}");
    assert_eq!(user_box["owner_uid"], agent.uid);
    let user_id = user_box["id"].as_u64().unwrap();

    // The user sees its own and nothing of root's.
    let (code, list) = daemon.api(me, "GET", "/v1/sandboxes", None);
    assert_eq!(code, 200);
    let seen: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(seen, [user_id]);
    let (code, v) = daemon.api(me, "GET", &format!("/v1/sandboxes/{user_id}"), None);
    assert_eq!(code, 200, "{v}");
    for (method, path) in [
        ("GET", format!("/v1/sandboxes/{root_id}")),
        ("DELETE", format!("/v1/sandboxes/{root_id}")),
    ] {
        let (code, v) = daemon.api(me, method, &path, None);
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}: {v}"
        );
    }
    let (code, status) = daemon.api(me, "GET", "/v1/status", None);
    assert_eq!(code, 200);
    assert_eq!(
        (
            status["sandboxes"].as_u64(),
            status["caller"]["admin"].as_bool()
        ),
        (Some(1), Some(false))
    );
    assert!(
        status.get("sandboxes_total").is_none(),
        "others' count is for admins: {status}"
    );

    // The user cannot make the daemon resolve what only root can read: resolution runs as the
    // user, so root's file and the daemon's environment are out of its reach.
    for dir in [&sneaky_dir, &root_dir] {
        let (code, v) = daemon.api(
            me,
            "POST",
            "/v1/sandboxes",
            Some(&json!({"name": "sneaky", "project_dir": dir, "state_dir": user_state})),
        );
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (422, Some("resolution_failed")),
            "{}: {v}",
            dir.display()
        );
        assert!(
            !v.to_string().contains(ROOT_REAL),
            "root's value in the answer: {v}"
        );
    }

    // Root sees both.
    let (_, all) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");

    // The CLI over the same API, as the user.
    let kz_as_user = |args: &[&str]| {
        Command::new("setpriv")
            .arg(format!("--reuid={}", agent.uid))
            .arg(format!("--regid={}", agent.gid))
            .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_kz")])
            .args(args)
            .arg("--socket")
            .arg(&daemon.socket)
            .output()
            .unwrap()
    };
    let out = kz_as_user(&["sandbox", "ls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let out = kz_as_user(&["sandbox", "ls"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&user_id.to_string()) && !table.contains(&root_id.to_string()),
        "{table}"
    );
    let out = kz_as_user(&["sandbox", "show", &user_id.to_string()]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(user_box["secrets"]["API_KEY"]["token"].as_str().unwrap()),
        "{shown}"
    );
    assert!(!shown.contains(USER_REAL), "{shown}");
    let out = kz_as_user(&["sandbox", "rm", &root_id.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("forbidden"), "{err}");
    let out = kz_as_user(&["agent", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["agent", "status", "--socket"])
        .arg(daemon.dir.join("nowhere.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no kz agent is listening"),
        "{out:?}"
    );
    let out = kz_as_user(&["sandbox", "rm", &user_id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Root's sandbox is still there; every refusal was audited with its reason.
    let (code, _) = daemon.api(None, "GET", &format!("/v1/sandboxes/{root_id}"), None);
    assert_eq!(code, 200);
    let records = daemon.audit();
    let refused: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "api_refused")
        .collect();
    assert!(
        refused
            .iter()
            .filter(|r| r["reason"] == "forbidden" && r["uid"] == agent.uid)
            .count()
            >= 3,
        "{refused:?}"
    );
    assert!(
        refused.iter().any(|r| r["reason"] == "resolution_failed"),
        "{refused:?}"
    );
    let log = std::fs::read_to_string(&daemon.audit).unwrap();
    assert!(
        !log.contains(ROOT_REAL) && !log.contains(USER_REAL),
        "a real value in the audit log"
    );
    let out = daemon.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&projects);
}

#[test]
fn the_daemon_needs_the_kernel() {
    if !support::require_root() {
        return;
    }
    // As an unprivileged user there is no kernel interception: the daemon refuses to start
    // (there is no explicit-proxy fallback for many sandboxes) and names `kz doctor`.
    let agent = support::agent_user();
    let dir = support::agent_readable_dir("kzagk");
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", agent.uid))
        .arg(format!("--regid={}", agent.gid))
        .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_kz")])
        .args(["agent", "run", "--socket"])
        .arg(dir.join("agent.sock"))
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs kernel interception") && err.contains("kz doctor"),
        "{err}"
    );
    assert!(
        !dir.join("agent.sock").exists(),
        "a socket without a daemon"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A project of the test user's: `API_KEY` from a file only that user can read, scoped to
/// `host`, which the agent may reach; `kz`'s approval store for the user beside it. Returns
/// the project directory and the state directory.
fn user_project(root: &Path, host: &str, value: &str, dns: &str) -> (PathBuf, PathBuf) {
    let agent = support::agent_user();
    let own = |p: &Path, mode: u32| {
        nix::unistd::chown(p, Some(agent.uid.into()), Some(agent.gid.into())).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let dir = root.join("project");
    let files = root.join("secrets");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("api-key"), value).unwrap();
    own(&files, 0o700);
    own(&files.join("api-key"), 0o600);
    write_project(
        &dir,
        &format!(
            "[resolvers.file]\npath = \"{}\"\n[secrets.API_KEY]\nresolver = \"file\"\nref = \"api-key\"\nhosts = [\"{host}\"]\n[blind]\nconnections = [ {{ allow = true, host = \"{host}\" }} ]\nresolver = \"{dns}\"\n",
            files.display()
        ),
    );
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    own(&state, 0o700);
    (dir, state)
}

/// `kz run --blind -- ARGS` as the test user, from `project`, through the daemon at `socket`.
fn kz_run_as_user(socket: &Path, project: &Path, state: &Path, args: &[&str]) -> Command {
    let agent = support::agent_user();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", agent.uid))
        .arg(format!("--regid={}", agent.gid))
        .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_kz")])
        .args(["run", "--blind", "--"])
        .args(args)
        .current_dir(project)
        .env("KZ_AGENT_SOCKET", socket)
        .env("KZ_STATE_DIR", state)
        .env("KZ_LOG", "warn")
        .env("HOME", "/nonexistent");
    cmd
}

#[test]
fn a_user_runs_blind_through_the_daemon() {
    if !support::require_root() {
        return;
    }
    const USER_REAL: &str = "user-run-value-7d0c2e94";
    let agent = support::agent_user();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(agent.gid))
        .unwrap()
        .expect("the test user's group")
        .name;
    let pair = Pair::new("agrc", "agru");
    pair.add_upstream_addr("10.77.0.10/24");
    let ca = TestCa::new("kz agent run test upstream CA");
    let upstream = host(
        &pair.upstream,
        "10.77.0.10".parse().unwrap(),
        &ca,
        "api.allowed.test",
    );
    let _dns = TestDns::start(
        &pair.upstream,
        "10.77.0.2:53".parse().unwrap(),
        Zone::new(30).host("api.allowed.test", &["10.77.0.10"]),
    );
    let root = support::agent_readable_dir("kzagr");
    let ca_pem = ca.write_pem(&root, "upstream-ca.pem");
    let mut daemon = Daemon::start_with(
        Some(&pair.client),
        &group,
        &[],
        &["--upstream-ca".as_ref(), ca_pem.as_os_str()],
    );
    let (_, status) = daemon.api(None, "GET", "/v1/status", None);
    let cgroup_dir = PathBuf::from(status["cgroup_dir"].as_str().unwrap());
    let (project, state) = user_project(&root, "api.allowed.test", USER_REAL, "10.77.0.2:53");

    let script = "id -u\n\
        curl -sS -m 20 https://api.allowed.test/v1/echo -H \"Authorization: Bearer $API_KEY\"; echo\n\
        echo \"token=$API_KEY\"\n\
        echo to-stderr >&2\n\
        echo \"passed=$KZ_TEST_PASSED leaky=${LEAKY_COPY:-unset}\"\n\
        grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status\n\
        (exec 4<>/dev/tcp/10.77.0.99/80) 2>&1 && echo denied-address-connected\n\
        exit 7";
    let t0 = Instant::now();
    let out = kz_run_as_user(&daemon.socket, &project, &state, &["bash", "-c", script])
        .env("KZ_TEST_PASSED", "yes")
        .env("LEAKY_COPY", format!("copy-of-{USER_REAL}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("kz run through the daemon took {:?}", t0.elapsed());
    assert_eq!(
        out.status.code(),
        Some(7),
        "the client exits with the child's code: {stdout} {stderr}"
    );
    // The child's stdout and stderr are the client's own descriptors.
    assert_eq!(
        stdout.lines().next(),
        Some(&*agent.uid.to_string()),
        "the child runs as the caller: {stdout}"
    );
    assert!(stderr.contains("to-stderr"), "{stderr}");
    assert!(
        stdout.contains("Operation not permitted") && !stdout.contains("denied-address-connected"),
        "the kernel refuses an address the sandbox never resolved: {stdout}"
    );
    assert!(stdout.contains("token=kz_masked_"), "{stdout}");
    // The caller's environment, minus a variable holding the real value (said on stderr).
    assert!(stdout.contains("passed=yes leaky=unset"), "{stdout}");
    assert!(stderr.contains("not passing LEAKY_COPY"), "{stderr}");
    // Contained as an in-process blind run contains its agent.
    for want in ["NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000000000000"] {
        assert!(stdout.contains(want), "{want} missing: {stdout}");
    }
    assert!(
        !stdout.contains(USER_REAL) && !stderr.contains(USER_REAL),
        "a real value reached the agent: {stdout} {stderr}"
    );
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .any(|s| s.header("authorization") == Some(&*format!("Bearer {USER_REAL}"))),
        "the upstream never got the real value: {seen:?}"
    );
    // The run's sandbox went with its child.
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(listed, json!([]), "the run's sandbox outlived it");
    assert_eq!(cgroup_children(&cgroup_dir), Vec::<String>::new());

    // Another user cannot start a process in the test user's sandbox.
    let me = Some((agent.uid, agent.gid));
    let (code, sandbox) = daemon.api(
        me,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"name": "mine", "project_dir": project, "state_dir": state})),
    );
    assert_eq!(code, 201, "{sandbox}");
    let id = sandbox["id"].as_u64().unwrap();
    let run_body = json!({"argv": ["id"], "sandbox": id});
    let (code, v) = daemon.api(me, "POST", "/v1/runs", Some(&run_body));
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (426, Some("upgrade_required")),
        "{v}"
    );
    let other_uid = agent.uid + 7919;
    let out = Command::new("setpriv")
        .arg(format!("--reuid={other_uid}"))
        .arg(format!("--regid={}", agent.gid))
        .args(["--clear-groups", "--", "curl", "-sS", "-m", "20"])
        .args(["-w", "\n%{http_code}", "--unix-socket"])
        .arg(&daemon.socket)
        .args(["-H", "Connection: upgrade", "-H", "Upgrade: kz-exec"])
        .args(["-H", "content-type: application/json", "-d"])
        .arg(run_body.to_string())
        .arg("http://kz/v1/runs")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("403") && text.contains("\"forbidden\""),
        "another user's run in the sandbox: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = daemon.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = daemon.audit();
    let started: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "run_started")
        .collect();
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["uid"], agent.uid);
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "run_end" && r["exit_code"] == 7),
        "no run_end with the exit code"
    );
    assert!(
        records.iter().any(|r| r["kind"] == "api_refused"
            && r["reason"] == "forbidden"
            && r["uid"] == other_uid),
        "the refusal is audited"
    );
    let log = std::fs::read_to_string(&daemon.audit).unwrap();
    assert!(!log.contains(USER_REAL), "a real value in the audit log");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn killing_the_client_kills_the_child_and_its_sandbox() {
    if !support::require_root() {
        return;
    }
    use std::io::BufRead;
    let agent = support::agent_user();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(agent.gid))
        .unwrap()
        .expect("the test user's group")
        .name;
    let daemon = Daemon::start(None, &group, &[]);
    let root = support::agent_readable_dir("kzagk");
    let (project, state) =
        user_project(&root, "api.test", "kill-test-value-1f2e3d", "127.0.0.1:53");

    // SIGTERM to the client reaches the child, whose code the client exits with.
    let mut client = kz_run_as_user(
        &daemon.socket,
        &project,
        &state,
        &[
            "bash",
            "-c",
            "trap 'exit 42' TERM; echo ready; sleep 300 & wait",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "ready");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(client.wait().unwrap().code(), Some(42), "SIGTERM forwarded");
    let mut client = kz_run_as_user(
        &daemon.socket,
        &project,
        &state,
        &["bash", "-c", "echo pid $$; exec sleep 300"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let pid: i32 = first
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the child did not start: {first:?}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(1) == Some(&*agent.uid.to_string()),
        "{uid_line}"
    );
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    let boxes = listed.as_array().unwrap();
    assert_eq!(boxes.len(), 1, "{listed}");
    assert_eq!(boxes[0]["owner_uid"], agent.uid);
    let cgroup = PathBuf::from(boxes[0]["cgroup"].as_str().unwrap());
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "the child is in the sandbox: {procs}"
    );

    client.kill().unwrap();
    let _ = client.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let gone = !Path::new(&format!("/proc/{pid}")).exists();
        let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
        if gone && listed == json!([]) && !cgroup.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "15 s after the client died: child alive {}, sandboxes {listed}, cgroup {}",
            !gone,
            cgroup.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let records = daemon.audit();
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "run_end" && r["client_gone"] == true),
        "the end of the run is audited as the client's"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// Orderly stop (SIGTERM): the proxy drains before any sandbox is destroyed, so an agent's
/// request in flight is answered and audited; only then do the sandboxes go.
#[test]
fn an_orderly_stop_answers_the_requests_in_flight_first() {
    if !support::require_root() {
        return;
    }
    let pair = Pair::new("agd", "agv");
    pair.add_upstream_addr(&format!("{}/24", upstream_ip(0)));
    let ca = TestCa::new("kz agent drain test CA");
    let tls = support::tls::server_config(&ca.server_cert(&["up0.test"], &[]));
    let up = Upstream::host(
        &pair.upstream,
        upstream_ip(0).parse().unwrap(),
        tls,
        support::upstream::Routes::echo(&real(0)),
    );
    let _dns = TestDns::start(
        &pair.upstream,
        "10.77.0.2:53".parse().unwrap(),
        Zone::new(30).host("up0.test", &[&upstream_ip(0)]),
    );
    let mut daemon = Daemon::start(
        Some(&pair.client),
        "root",
        &[("KZ_TEST_REAL_0".to_owned(), real(0))],
    );
    let dir = support::agent_readable_dir("kzagd").join("p0");
    sandbox_project(&dir, 0);
    let (code, v) = daemon.api(
        None,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"name": "drain", "project_dir": dir})),
    );
    assert_eq!(code, 201, "{v}");
    let token = v["secrets"]["API_KEY"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let cgroup = v["cgroup"].as_str().unwrap().to_owned();
    let agent = in_sandbox(
        &pair.client,
        &cgroup,
        &format!(
            "curl -sS -m 20 'http://up0.test/slow?ms=2500' -H 'Authorization: Bearer {token}'; echo \"curl exit $?\""
        ),
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.seen().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent's connection is made (redirected to the proxy): its processes leave the
    // sandbox's cgroup, so the stop's destruction of the sandbox, which kills what is in it
    // right after the drain, cannot race curl printing the answer it was given.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 path");
    let own_procs = Path::new("/sys/fs/cgroup")
        .join(own.trim_start_matches('/'))
        .join("cgroup.procs");
    let procs = std::fs::read_to_string(Path::new(&cgroup).join("cgroup.procs")).unwrap();
    for pid in procs.split_whitespace() {
        std::fs::write(&own_procs, pid).unwrap();
    }
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{stopped:?}");
    let out = agent.wait_with_output().unwrap();
    let o = String::from_utf8_lossy(&out.stdout);
    // The whole answer reached the agent (its last line is `body_head=`). The shell's
    // `curl exit` line is not required: once in 441 (clean-clone CI) it was missing although
    // the body had arrived; the cause is not known.
    assert!(
        o.contains("uri=/slow?ms=2500") && o.contains("body_head="),
        "{o}"
    );
    assert_eq!(
        up.last().header("authorization"),
        Some(format!("Bearer {}", real(0)).as_str())
    );
    let records = daemon.audit();
    let pos = |pred: &dyn Fn(&Value) -> bool| records.iter().position(pred);
    let answered = pos(&|r| r["kind"] == "proxy_request" && r["status"] == 200)
        .unwrap_or_else(|| panic!("the request in flight was not audited: {records:?}"));
    let drained = pos(&|r| r["kind"] == "agent_drained").expect("agent_drained");
    let destroyed = pos(&|r| r["kind"] == "sandbox_destroyed").expect("sandbox_destroyed");
    assert!(answered < destroyed && drained < destroyed, "{records:?}");
    assert_eq!(records[drained]["connections_cut"], 0);
}

/// A pod's projected service-account token as the API server mints it (audience `aud`,
/// bound to pod `uid` of `namespace`, service account `sa`), signed with `key` under kid
/// `k8s-1`; `exp` seconds from now.
fn pod_token(key: &str, aud: &str, namespace: &str, sa: &str, uid: &str, exp: i64) -> String {
    let now = support::pdp::now() as i64;
    support::pdp::mint(
        key,
        jsonwebtoken::Algorithm::ES256,
        Some("k8s-1"),
        &json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "aud": [aud],
            "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + exp,
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": "node-1", "uid": "6a1f0c3e-9b2d-4e7f-8a10-b2c3d4e5f607"},
                "pod": {"name": format!("{sa}-7d9f"), "uid": uid},
                "serviceaccount": {"name": sa, "uid": "0d1e2f30-4152-6374-8596-a7b8c9d0e1f2"},
            },
        }),
    )
}

/// A kubelet-like cgroup tree of its own below the cgroup v2 root, removed (deepest first)
/// when dropped; processes left in it are killed first.
struct KubeletTree(PathBuf);

impl KubeletTree {
    fn new() -> KubeletTree {
        let root = kz_agent::intercept::cgroups::cgroup2_root()
            .unwrap()
            .join(support::unique_name("kzpods"));
        std::fs::create_dir(&root).unwrap();
        KubeletTree(root)
    }

    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for KubeletTree {
    fn drop(&mut self) {
        fn dirs(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs(&e.path(), out);
                }
            }
            out.push(d.to_owned());
        }
        let mut all = Vec::new();
        dirs(&self.0, &mut all);
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for d in all {
            for _ in 0..100 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The daemon's link pins of cgroup `id` (`/sys/fs/bpf/kz/<instance>/links/<id>-<program>`).
fn link_pins(id: u64) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for inst in std::fs::read_dir("/sys/fs/bpf/kz")
        .into_iter()
        .flatten()
        .flatten()
    {
        for e in std::fs::read_dir(inst.path().join("links"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{id}-"))
            {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn pods_are_guarded_in_their_own_cgroups() {
    if !support::require_root() {
        return;
    }
    const REAL_A: &str = "pod-a-real-value-3c9e71";
    const REAL_B: &str = "pod-b-real-value-8d20f4";
    // Pod A: systemd driver, Burstable; pod B: cgroupfs driver, Guaranteed; pod C: B's
    // unregistered sibling; pod D: a valid token for a pod this node does not run.
    const UID_A: &str = "5f0c2a7e-1b3d-4c5e-9f80-a1b2c3d4e5f6";
    const UID_B: &str = "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d";
    const UID_C: &str = "c0ffee00-1234-4abc-9def-0123456789ab";
    const UID_D: &str = "d00d0000-0000-4000-8000-000000000000";
    // Pod E: an ordinary pod with a network namespace of its own (its "sandbox container"
    // runs in the upstream's namespace here), which kz cannot serve and refuses.
    const UID_E: &str = "e0e0e0e0-5555-4666-8777-888899990000";
    let pair = Pair::new("kpc", "kpu");
    for ip in ["10.77.0.10/24", "10.77.0.11/24", "10.77.0.12/24"] {
        pair.add_upstream_addr(ip);
    }
    let ca = TestCa::new("kz pods test upstream CA");
    let upstream = host(
        &pair.upstream,
        "10.77.0.10".parse().unwrap(),
        &ca,
        "api.pods.test",
    );
    let unlisted = host(
        &pair.upstream,
        "10.77.0.11".parse().unwrap(),
        &ca,
        "unlisted.test",
    );
    let jwks = Upstream::start(
        Some(&pair.upstream),
        &[("10.77.0.12:8080".parse().unwrap(), None)],
        support::upstream::Routes::fixed(
            200,
            &json!({"keys": [support::pdp::ec_jwk("agent-es256.key", "k8s-1")]}).to_string(),
        ),
    );
    let _dns = TestDns::start(
        &pair.upstream,
        "10.77.0.2:53".parse().unwrap(),
        Zone::new(30)
            .host("api.pods.test", &["10.77.0.10"])
            .host("unlisted.test", &["10.77.0.11"]),
    );

    // The kubelet's tree: pod cgroups in both layouts; B's and C's containers exist before
    // registration, A's is made after it (the runtime starts containers once the pod's
    // sandbox is set up).
    let tree = KubeletTree::new();
    let unit = |uid: &str| uid.replace('-', "_");
    let pod_a = tree.mkdir(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        unit(UID_A)
    ));
    let pod_b = tree.mkdir(&format!("kubepods/pod{UID_B}"));
    let box_b = tree.mkdir(&format!("kubepods/pod{UID_B}/b0b0b0b0b0b0"));
    let box_c = tree.mkdir(&format!("kubepods/pod{UID_C}/c0c0c0c0c0c0"));
    let box_e = tree.mkdir(&format!("kubepods/besteffort/pod{UID_E}/e0e0e0e0e0e0"));
    let mut pause_e = pair.upstream.command("sleep").arg("60").spawn().unwrap();
    std::fs::write(box_e.join("cgroup.procs"), pause_e.id().to_string()).unwrap();

    let root = support::agent_readable_dir("kzpod");
    let ca_pem = ca.write_pem(&root, "upstream-ca.pem");
    for (name, var, hosts) in [
        ("coder", "KZ_TEST_POD_A", "api.pods.test"),
        ("reviewer", "KZ_TEST_POD_B", "api.pods.test"),
    ] {
        write_project(
            &root.join(name),
            &format!(
                r#"
[secrets.API_KEY]
resolver = "env"
ref = "{var}"
hosts = ["{hosts}"]
allow_plaintext = true

[blind]
connections = [{{ allow = true, host = "{hosts}" }}]
resolver = "10.77.0.2:53"
"#
            ),
        );
    }
    let config = root.join("pods.yaml");
    std::fs::write(
        &config,
        format!(
            r#"issuer:
  name: cluster
  type: kubernetes
  issuer_url: https://kubernetes.default.svc.cluster.local
  jwks_url: http://10.77.0.12:8080/openid/v1/jwks
  audience: kz
cgroup_root: {tree}
pods:
  - {{namespace: agents, service_account: coder, project_dir: {root}/coder}}
  - {{namespace: agents, service_account: reviewer, project_dir: {root}/reviewer}}
"#,
            tree = tree.0.display(),
            root = root.display()
        ),
    )
    .unwrap();
    let env = vec![
        ("KZ_TEST_POD_A".to_owned(), REAL_A.to_owned()),
        ("KZ_TEST_POD_B".to_owned(), REAL_B.to_owned()),
    ];
    let mut daemon = Daemon::start_with(
        Some(&pair.client),
        "root",
        &env,
        &[
            "--upstream-ca".as_ref(),
            ca_pem.as_os_str(),
            "--pods".as_ref(),
            config.as_os_str(),
        ],
    );
    let register =
        |token: &str| daemon.api(None, "POST", "/v1/pods", Some(&json!({ "token": token })));

    // Refusals, each with its own code: forged (another key under the JWKS's kid), expired,
    // minted for another audience (the API server's), a pod not on this node, a service
    // account without a spec.
    let key = "agent-es256.key";
    for (token, status, code) in [
        (
            pod_token("kz-signing.key", "kz", "agents", "coder", UID_A, 600),
            401,
            "bad_signature",
        ),
        (
            pod_token(key, "kz", "agents", "coder", UID_A, -3600),
            401,
            "token_expired",
        ),
        (
            pod_token(
                key,
                "https://kubernetes.default.svc",
                "agents",
                "coder",
                UID_A,
                600,
            ),
            401,
            "wrong_audience",
        ),
        (
            pod_token(key, "kz", "agents", "coder", UID_D, 600),
            404,
            "pod_not_on_node",
        ),
        (
            pod_token(key, "kz", "agents", "intruder", UID_C, 600),
            403,
            "no_pod_spec",
        ),
        (
            pod_token(key, "kz", "agents", "coder", UID_E, 600),
            422,
            "pod_network_namespace",
        ),
        ("not.a.jwt".to_owned(), 401, "malformed_token"),
    ] {
        let (got, v) = register(&token);
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
    }
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(listed, json!([]), "a refused registration left a sandbox");

    // Pod A registers with the token in the Authorization header, pod B in the body.
    let out = Command::new("curl")
        .args(["-sS", "-m", "30", "--unix-socket"])
        .arg(&daemon.socket)
        .args(["-X", "POST", "-H"])
        .arg(format!(
            "Authorization: Bearer {}",
            pod_token(key, "kz", "agents", "coder", UID_A, 600)
        ))
        .arg("http://kz/v1/pods")
        .output()
        .unwrap();
    let a: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(a["pod"]["uid"], UID_A, "{a}");
    assert_eq!(
        (a["pod"]["driver"].as_str(), a["pod"]["qos"].as_str()),
        (Some("systemd"), Some("Burstable"))
    );
    assert_eq!(a["pod"]["namespace"], "agents");
    assert_eq!(a["pod"]["name"], "coder-7d9f");
    assert_eq!(
        a["sandbox"]["cgroup"],
        pod_a.to_str().unwrap(),
        "the pod's own cgroup: {a}"
    );
    let (code, b) = register(&pod_token(key, "kz", "agents", "reviewer", UID_B, 600));
    assert_eq!(code, 201, "{b}");
    assert_eq!(
        (b["pod"]["driver"].as_str(), b["pod"]["qos"].as_str()),
        (Some("cgroupfs"), Some("Guaranteed"))
    );
    assert_eq!(b["sandbox"]["cgroup"], pod_b.to_str().unwrap());
    let (code, again) = register(&pod_token(key, "kz", "agents", "reviewer", UID_B, 600));
    assert_eq!(
        (code, again["error"]["code"].as_str()),
        (409, Some("pod_registered"))
    );
    for v in [&a, &b] {
        let text = v.to_string();
        assert!(!text.contains(REAL_A) && !text.contains(REAL_B), "{text}");
        assert!(
            v["sandbox"]["ca_cert_pem"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }
    let token_a = a["sandbox"]["secrets"]["API_KEY"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token_b = b["sandbox"]["secrets"]["API_KEY"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let id_a = a["sandbox"]["id"].as_u64().unwrap();
    assert!(
        !link_pins(id_a).is_empty(),
        "no programs attached to pod A's cgroup"
    );
    let pod_ca = root.join("pod-a-ca.pem");
    std::fs::write(&pod_ca, a["sandbox"]["ca_cert_pem"].as_str().unwrap()).unwrap();
    std::fs::set_permissions(&pod_ca, std::fs::Permissions::from_mode(0o644)).unwrap();

    // A container made after registration is covered: HTTPS through kz with the pod's CA,
    // its token swapped toward its host; an address it never resolved is refused by the kernel.
    let box_a = tree.mkdir(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-a0a0a0a0.scope",
        unit(UID_A)
    ));
    let run = |cgroup: &Path, script: &str| {
        let out = in_sandbox(&pair.client, cgroup.to_str().unwrap(), script)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(REAL_A) && !text.contains(REAL_B), "{text}");
        text
    };
    let text = run(
        &box_a,
        &format!(
            "curl -sS -m 20 --cacert {ca} -o /dev/null -w 'a %{{http_code}}\\n' -H 'Authorization: Bearer {token_a}' https://api.pods.test/pod-a\n\
             (exec 3<>/dev/tcp/10.77.0.11/80) 2>&1 && echo unlisted-connected\ntrue",
            ca = pod_ca.display()
        ),
    );
    assert!(text.contains("a 200"), "{text}");
    assert!(
        text.contains("Operation not permitted") && !text.contains("unlisted-connected"),
        "pod A reached an address it never resolved: {text}"
    );
    let got = |path: &str| {
        upstream
            .seen()
            .into_iter()
            .filter(|s| s.path == path)
            .map(|s| s.header("authorization").unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(got("/pod-a"), vec![format!("Bearer {REAL_A}")]);
    // Pod B's container (made before registration) gets B's sandbox, not A's: its own token
    // is swapped, A's token stays masked.
    let text = run(
        &box_b,
        &format!(
            "curl -sS -m 20 -o /dev/null -w 'b %{{http_code}}\\n' -H 'Authorization: Bearer {token_b}' http://api.pods.test/pod-b\n\
             curl -sS -m 20 -o /dev/null -w 'b %{{http_code}}\\n' -H 'Authorization: Bearer {token_a}' http://api.pods.test/pod-b-stolen"
        ),
    );
    assert_eq!(text.matches("b 200").count(), 2, "{text}");
    assert_eq!(got("/pod-b"), vec![format!("Bearer {REAL_B}")]);
    assert_eq!(got("/pod-b-stolen"), vec![format!("Bearer {token_a}")]);
    // Pod C, B's unregistered sibling, is untouched: it connects anywhere directly and its
    // requests carry what it sent.
    let text = run(
        &box_c,
        &format!(
            "(exec 3<>/dev/tcp/10.77.0.11/80) 2>&1 && echo unlisted-connected\n\
             curl -sS -m 20 -o /dev/null -w 'c %{{http_code}}\\n' -H 'Authorization: Bearer {token_a}' http://10.77.0.10/pod-c"
        ),
    );
    assert!(
        text.contains("unlisted-connected") && text.contains("c 200"),
        "{text}"
    );
    assert_eq!(got("/pod-c"), vec![format!("Bearer {token_a}")]);
    let (code, pods) = daemon.api(None, "GET", "/v1/pods", None);
    assert_eq!(code, 200, "{pods}");
    assert_eq!(pods["registered"].as_array().unwrap().len(), 2, "{pods}");
    assert_eq!(pods["on_node"].as_array().unwrap().len(), 4, "{pods}");
    let _ = pause_e.kill();
    let _ = pause_e.wait();

    // Restart without a gap. Pod A's container has a long-lived process (it outlives the
    // daemon); pod F (coder too) is registered, and the kubelet removes it while no daemon
    // runs. Each pod's state is kept without its real value.
    let mut agent_a = Agent::start_at(
        &pair.client,
        box_a.to_str().unwrap(),
        "api.pods.test",
        "10.77.0.11",
        &token_a,
        &pod_ca,
    );
    assert_eq!(agent_a.ask("https"), "https 200\n");
    assert_eq!(got("/adopted"), vec![format!("Bearer {REAL_A}")]);
    assert_eq!(
        agent_a.ask("tcp"),
        "tcp-failed\n",
        "pod A reached 10.77.0.11"
    );
    let pid_a = agent_a.ask("pid");
    const UID_F: &str = "f0f0f0f0-6666-4777-8888-999900001111";
    let pod_f = tree.mkdir(&format!("kubepods/besteffort/pod{UID_F}"));
    let (code, f) = daemon.api(
        None,
        "POST",
        "/v1/pods",
        Some(&json!({ "token": pod_token(key, "kz", "agents", "coder", UID_F, 600) })),
    );
    assert_eq!(code, 201, "{f}");
    let id_b = b["sandbox"]["id"].as_u64().unwrap();
    let id_f = f["sandbox"]["id"].as_u64().unwrap();
    let files = daemon.state.join("sandboxes");
    for (id, uid) in [(id_a, UID_A), (id_b, UID_B), (id_f, UID_F)] {
        let text = std::fs::read_to_string(files.join(format!("{id}.json"))).unwrap();
        assert!(text.contains(uid), "pod {uid} not in its state: {text}");
        assert!(!text.contains(REAL_A) && !text.contains(REAL_B), "{text}");
    }

    // SIGKILL: the pods stay cut off (fail closed): pod A's process reaches neither the
    // address it never resolved nor the one it did (the dead proxy's port refuses), and a new
    // process in pod B connects nowhere either.
    daemon.kill();
    let seen = upstream.seen().len();
    assert_eq!(
        agent_a.ask("tcp"),
        "tcp-failed\n",
        "pod A open with no daemon"
    );
    assert_eq!(
        agent_a.ask("tcp-to 10.77.0.10"),
        "tcp-failed\n",
        "pod A reached its upstream directly with no daemon"
    );
    assert!(!agent_a.ask("https").contains("https 200"));
    let text = run(
        &box_b,
        "(exec 3<>/dev/tcp/10.77.0.11/80) 2>&1 && echo unlisted-connected\ntrue",
    );
    assert!(
        !text.contains("unlisted-connected"),
        "pod B open with no daemon: {text}"
    );
    assert_eq!(
        upstream.seen().len(),
        seen,
        "an upstream was reached with no daemon"
    );
    assert!(
        !link_pins(id_a).is_empty(),
        "pod A's links went with the daemon"
    );
    std::fs::remove_dir(&pod_f).unwrap();

    // The next daemon adopts pods A and B: the same process, token and CA, swapped again, still
    // refused what it never resolved, listed again; pod F's cgroup is gone: dropped, audited.
    daemon.restart(
        Some(&pair.client),
        "root",
        &env,
        &[
            "--upstream-ca".as_ref(),
            ca_pem.as_os_str(),
            "--pods".as_ref(),
            config.as_os_str(),
        ],
    );
    let (code, pods) = daemon.api(None, "GET", "/v1/pods", None);
    assert_eq!(code, 200, "{pods}");
    let mut listed: Vec<(&str, u64)> = pods["registered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["uid"].as_str().unwrap(),
                p["sandbox_id"].as_u64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    let mut expected = vec![(UID_A, id_a), (UID_B, id_b)];
    expected.sort();
    assert_eq!(listed, expected, "{pods}");
    let (code, again) = daemon.api(None, "GET", &format!("/v1/pods/{UID_A}"), None);
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["pod"]["cgroup"], pod_a.to_str().unwrap());
    assert_eq!(again["pod"]["driver"], "systemd");
    assert_eq!(
        again["sandbox"]["secrets"]["API_KEY"]["token"],
        token_a.as_str()
    );
    assert_eq!(again["sandbox"]["ca_cert_pem"], a["sandbox"]["ca_cert_pem"]);
    assert_eq!(agent_a.ask("pid"), pid_a, "pod A's process is the same");
    assert_eq!(
        agent_a.ask("https"),
        "https 200\n",
        "pod A after the restart"
    );
    assert_eq!(
        got("/adopted"),
        vec![format!("Bearer {REAL_A}"), format!("Bearer {REAL_A}")]
    );
    assert_eq!(
        agent_a.ask("tcp"),
        "tcp-failed\n",
        "pod A open after the restart"
    );
    let text = run(
        &box_b,
        &format!(
            "curl -sS -m 20 -o /dev/null -w 'b %{{http_code}}\\n' -H 'Authorization: Bearer {token_b}' http://api.pods.test/pod-b-adopted"
        ),
    );
    assert!(text.contains("b 200"), "{text}");
    assert_eq!(got("/pod-b-adopted"), vec![format!("Bearer {REAL_B}")]);
    assert!(!files.join(format!("{id_f}.json")).exists());
    assert_eq!(link_pins(id_f), Vec::<PathBuf>::new());
    assert_eq!(map_entries_of(id_f), (0, 0));
    let records = daemon.audit();
    for uid in [UID_A, UID_B] {
        assert!(
            records
                .iter()
                .any(|r| r["kind"] == "sandbox_adopted" && r["pod_uid"] == uid),
            "no sandbox_adopted for pod {uid}"
        );
    }
    assert!(
        records.iter().any(|r| r["kind"] == "sandbox_dropped"
            && r["pod_uid"] == UID_F
            && r["reason"] == "cgroup_gone"),
        "no sandbox_dropped for pod F"
    );

    // Removal gives pod A's cgroup back: programs detached, the cgroup and its container in
    // place, the container now connects directly.
    let (code, gone) = daemon.api(None, "DELETE", &format!("/v1/pods/{UID_A}"), None);
    assert_eq!(code, 200, "{gone}");
    assert!(
        pod_a.is_dir() && box_a.is_dir(),
        "the kubelet's cgroup was removed"
    );
    assert_eq!(link_pins(id_a), Vec::<PathBuf>::new());
    let text = run(
        &box_a,
        "(exec 3<>/dev/tcp/10.77.0.11/80) 2>&1 && echo unlisted-connected",
    );
    assert!(text.contains("unlisted-connected"), "{text}");
    assert_eq!(
        agent_a.ask("tcp"),
        "tcp-connected\n",
        "pod A's process after DELETE"
    );
    assert!(!files.join(format!("{id_a}.json")).exists());
    let Agent {
        mut child, stdin, ..
    } = agent_a;
    drop(stdin);
    child.wait().unwrap();
    let (code, v) = daemon.api(None, "DELETE", &format!("/v1/pods/{UID_A}"), None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("no_such_pod"))
    );

    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(
        pod_b.is_dir() && box_b.is_dir(),
        "stopping the daemon removed pod B's cgroup"
    );
    let records = daemon.audit();
    for code in [
        "bad_signature",
        "token_expired",
        "wrong_audience",
        "pod_not_on_node",
    ] {
        assert!(
            records
                .iter()
                .any(|r| r["kind"] == "api_refused" && r["reason"] == code),
            "refusal {code} not audited"
        );
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r["kind"] == "pod_registered")
            .count(),
        3,
        "A, B and F"
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "pod_removed" && r["pod_uid"] == UID_A)
    );
    let log = std::fs::read_to_string(&daemon.audit).unwrap();
    assert!(!log.contains(REAL_A) && !log.contains(REAL_B));
    drop(unlisted);
    drop(jwks);
}

/// One long-lived shell in a sandbox, driven line by line: the "agent" that must outlive a
/// daemon's death without being restarted.
struct Agent {
    child: Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Agent {
    /// A shell moved into `cgroup` holding `token` in its environment; `k` names its upstream.
    fn start(ns: &Netns, cgroup: &str, k: usize, token: &str, ca: &Path) -> Agent {
        Agent::start_at(
            ns,
            cgroup,
            &format!("up{k}.test"),
            &upstream_ip(k),
            token,
            ca,
        )
    }

    /// [`Agent::start`] with its upstream named `host`; `tcp` connects to `ip` directly
    /// (`tcp-to IP` to another address).
    fn start_at(ns: &Netns, cgroup: &str, host: &str, ip: &str, token: &str, ca: &Path) -> Agent {
        let script = format!(
            r#"export API_KEY='{token}'
while read -r what; do
  case "$what" in
    pid) echo "pid $$ $API_KEY" ;;
    https) curl -sS -m 10 --cacert '{ca}' -o /dev/null -w 'https %{{http_code}}\n' -H "Authorization: Bearer $API_KEY" https://{host}/adopted 2>&1 || echo "https failed" ;;
    tcp) if timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/443' 2>/dev/null; then echo tcp-connected; else echo tcp-failed; fi ;;
    tcp-to\ *) if timeout 5 bash -c "exec 3<>/dev/tcp/${{what#tcp-to }}/443" 2>/dev/null; then echo tcp-connected; else echo tcp-failed; fi ;;
    dns) if [ -n "$(dig +short +time=2 +tries=1 {host} 2>/dev/null | grep -E '^[0-9.]+$')" ]; then echo dns-ok; else echo dns-failed; fi ;;
  esac
  echo end
done"#,
            ca = ca.display()
        );
        let mut child = in_sandbox(ns, cgroup, &script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Agent { child, stdin, out }
    }

    /// Runs one command of the shell's loop; its output lines.
    fn ask(&mut self, what: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{what}").unwrap();
        let mut text = String::new();
        loop {
            let mut line = String::new();
            assert_ne!(
                self.out.read_line(&mut line).unwrap(),
                0,
                "the agent's shell ended: {text}"
            );
            if line.trim() == "end" {
                return text;
            }
            text.push_str(&line);
        }
    }
}

/// The entries keyed by `id` in the policy and allowed-IP maps of this build's program set.
fn map_entries_of(id: u64) -> (usize, usize) {
    use aya::maps::{HashMap, Map, MapData};
    use kz_common::map_names as mn;
    let set = Path::new("/sys/fs/bpf/kz").join(kz_agent::intercept::shared::set_name(false));
    let open = |name: &str| {
        Map::from_map_data(MapData::from_pin(set.join("maps").join(name)).unwrap()).unwrap()
    };
    let policy: HashMap<_, u64, kz_common::CgroupPolicy> =
        HashMap::try_from(open(mn::POLICY)).unwrap();
    let allowed: HashMap<_, kz_common::IpKey, u64> =
        HashMap::try_from(open(mn::ALLOWED_IPS)).unwrap();
    (
        policy
            .keys()
            .filter_map(Result::ok)
            .filter(|k| *k == id)
            .count(),
        allowed
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgroup_id == id)
            .count(),
    )
}

/// Link pins of cgroup `id` under the daemon's pin directory (named as its cgroup directory).
fn links_of(cgroup_dir: &Path, id: u64) -> Vec<String> {
    let pins = Path::new("/sys/fs/bpf/kz")
        .join(cgroup_dir.file_name().unwrap())
        .join("links");
    std::fs::read_dir(pins)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{id}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Restart without a gap: a daemon killed with SIGKILL leaves its sandboxes cut off (their agents
/// reach nothing: no TCP, no DNS), and the next daemon started on the same state directory
/// adopts them: the same shells, never restarted, holding the same masked tokens, get their real
/// values swapped upstream again over HTTPS verified with the same CA; the API lists them with
/// the same ids, owners and names; DELETE and the orderly stop leave no cgroup, link, map entry
/// or state file behind. Sandbox 2's secret no longer resolves at the restart: adopted with its
/// token unswappable. Sandbox 3's agent exits while no daemon runs: dropped, nothing left.
#[test]
fn a_killed_daemons_sandboxes_are_adopted_by_the_next() {
    if !support::require_root() {
        return;
    }
    const K: usize = 4;
    let pair = Pair::new("aga", "agb");
    for k in 0..K {
        pair.add_upstream_addr(&format!("{}/24", upstream_ip(k)));
    }
    let ca = TestCa::new("kz agent adoption test CA");
    let upstreams: Vec<Upstream> = (0..K)
        .map(|k| {
            host(
                &pair.upstream,
                upstream_ip(k).parse().unwrap(),
                &ca,
                &format!("up{k}.test"),
            )
        })
        .collect();
    let mut zone = Zone::new(30);
    for k in 0..K {
        zone = zone.host(&format!("up{k}.test"), &[&upstream_ip(k)]);
    }
    let _dns = TestDns::start(&pair.upstream, "10.77.0.2:53".parse().unwrap(), zone);
    let root = support::agent_readable_dir("kzaga");
    let ca_pem = ca.write_pem(&root, "upstream-ca.pem");
    let env: Vec<(String, String)> = (0..K)
        .map(|k| (format!("KZ_TEST_REAL_{k}"), real(k)))
        .collect();
    let args = ["--upstream-ca".as_ref(), ca_pem.as_os_str()];
    let mut daemon = Daemon::start_with(Some(&pair.client), "root", &env, &args);
    let (_, status) = daemon.api(None, "GET", "/v1/status", None);
    let cgroup_dir = PathBuf::from(status["cgroup_dir"].as_str().unwrap());

    let mut boxes = Vec::new();
    let mut agents = Vec::new();
    for k in 0..K {
        let dir = root.join(format!("p{k}"));
        sandbox_project(&dir, k);
        let (code, v) = daemon.api(
            None,
            "POST",
            "/v1/sandboxes",
            Some(&json!({"name": format!("keep{k}"), "project_dir": dir})),
        );
        assert_eq!(code, 201, "{v}");
        let ca_file = root.join(format!("sandbox-ca-{k}.pem"));
        std::fs::write(&ca_file, v["ca_cert_pem"].as_str().unwrap()).unwrap();
        let token = v["secrets"]["API_KEY"]["token"].as_str().unwrap();
        agents.push(Agent::start(
            &pair.client,
            v["cgroup"].as_str().unwrap(),
            k,
            token,
            &ca_file,
        ));
        boxes.push(v);
    }
    // The state is root's: 0700 directories, 0600 files, no real value in them.
    let files = daemon.state.join("sandboxes");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&daemon.state), mode(&files)), (0o700, 0o700));
    for b in &boxes {
        let file = files.join(format!("{}.json", b["id"]));
        assert_eq!(mode(&file), 0o600, "{}", file.display());
        let text = std::fs::read_to_string(&file).unwrap();
        for k in 0..K {
            assert!(!text.contains(&real(k)), "a real value on disk: {text}");
        }
        assert!(text.contains(b["secrets"]["API_KEY"]["token"].as_str().unwrap()));
    }
    let pids: Vec<String> = agents.iter_mut().map(|a| a.ask("pid")).collect();
    for (k, a) in agents.iter_mut().enumerate() {
        assert_eq!(a.ask("https"), "https 200\n", "sandbox {k} before the kill");
        assert_eq!(
            upstreams[k].last().header("authorization"),
            Some(&*format!("Bearer {}", real(k)))
        );
    }

    // SIGKILL: the sandboxes stay, cut off. Their agents reach nothing.
    daemon.kill();
    let seen_before: Vec<usize> = upstreams.iter().map(|u| u.seen().len()).collect();
    for (k, a) in agents.iter_mut().enumerate() {
        let cgroup = boxes[k]["cgroup"].as_str().unwrap();
        assert!(Path::new(cgroup).is_dir(), "sandbox {k}'s cgroup went");
        assert_eq!(a.ask("tcp"), "tcp-failed\n", "sandbox {k} with no daemon");
        assert_eq!(a.ask("dns"), "dns-failed\n", "sandbox {k} with no daemon");
        let https = a.ask("https");
        assert!(
            !https.contains("https 200"),
            "sandbox {k} with no daemon: {https}"
        );
    }
    let seen_after: Vec<usize> = upstreams.iter().map(|u| u.seen().len()).collect();
    assert_eq!(
        seen_before, seen_after,
        "an upstream was reached with no daemon"
    );

    // Sandbox 3's agent ends while no daemon runs; sandbox 2's value is gone from the next
    // daemon's environment.
    let mut gone = agents.pop().unwrap().child;
    gone.kill().unwrap();
    gone.wait().unwrap();
    let id3 = boxes[3]["id"].as_u64().unwrap();
    let cgroup3 = PathBuf::from(boxes[3]["cgroup"].as_str().unwrap());
    let env_after: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k != "KZ_TEST_REAL_2")
        .cloned()
        .collect();

    // The next daemon adopts them.
    daemon.restart(Some(&pair.client), "root", &env_after, &args);
    let (code, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(code, 200);
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), K - 1, "{listed:?}");
    assert!(
        !cgroup3.exists(),
        "the emptied sandbox's cgroup was not removed"
    );
    assert_eq!(links_of(&cgroup_dir, id3), Vec::<String>::new());
    assert_eq!(map_entries_of(id3), (0, 0));
    assert!(!files.join(format!("{id3}.json")).exists());
    for b in &boxes[..K - 1] {
        let l = listed
            .iter()
            .find(|l| l["id"] == b["id"])
            .unwrap_or_else(|| panic!("sandbox {} not adopted: {listed:?}", b["id"]));
        for field in [
            "name",
            "owner_uid",
            "cgroup",
            "project_dir",
            "created",
            "ca_cert_pem",
        ] {
            assert_eq!(l[field], b[field], "{field}");
        }
        assert_eq!(
            l["secrets"]["API_KEY"]["token"],
            b["secrets"]["API_KEY"]["token"]
        );
        let unresolved = l["secrets"]["API_KEY"].get("unresolved");
        if b["name"] == "keep2" {
            assert_eq!(unresolved, Some(&json!(true)), "{l}");
        } else {
            assert!(unresolved.is_none(), "{l}");
        }
        assert_ne!(l["dns"], b["dns"], "a resolver of the new daemon's");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["sandbox", "ls", "--json", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let via_cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via_cli.as_array().unwrap().len(), K - 1, "{via_cli}");
    for (k, a) in agents.iter_mut().enumerate() {
        assert_eq!(
            a.ask("pid"),
            pids[k],
            "sandbox {k}'s agent is the same process"
        );
        assert_eq!(a.ask("dns"), "dns-ok\n", "sandbox {k} after adoption");
        assert_eq!(a.ask("https"), "https 200\n", "sandbox {k} after adoption");
        let last = upstreams[k].last();
        assert_eq!(last.path, "/adopted");
        // Sandbox 2's token is not swapped: its secret did not resolve this time.
        let expected = match k {
            2 => boxes[k]["secrets"]["API_KEY"]["token"]
                .as_str()
                .unwrap()
                .to_owned(),
            _ => real(k),
        };
        assert_eq!(
            last.header("authorization"),
            Some(&*format!("Bearer {expected}")),
            "sandbox {k}'s masked token after adoption"
        );
    }
    let records = daemon.audit();
    for b in &boxes[..K - 1] {
        let r = records
            .iter()
            .find(|r| r["kind"] == "sandbox_adopted" && r["sandbox_id"] == b["id"])
            .unwrap_or_else(|| panic!("no sandbox_adopted for {}", b["id"]));
        let unswappable = match b["name"].as_str() {
            Some("keep2") => json!(["API_KEY"]),
            _ => json!([]),
        };
        assert_eq!(r["unswappable"], unswappable, "{r}");
    }
    assert!(
        records.iter().any(|r| r["kind"] == "sandbox_dropped"
            && r["sandbox_id"] == id3
            && r["reason"] == "empty"),
        "no sandbox_dropped for the emptied sandbox"
    );

    // DELETE of an adopted sandbox leaves nothing of it.
    let id0 = boxes[0]["id"].as_u64().unwrap();
    let cgroup0 = PathBuf::from(boxes[0]["cgroup"].as_str().unwrap());
    let links = links_of(&cgroup_dir, id0);
    assert!(links.len() >= 12, "its links while adopted: {links:?}");
    assert_eq!(map_entries_of(id0).0, 1, "its policy while adopted");
    let (code, v) = daemon.api(None, "DELETE", &format!("/v1/sandboxes/{id0}"), None);
    assert_eq!(code, 200, "{v}");
    assert!(
        !cgroup0.exists(),
        "the adopted sandbox's cgroup outlived DELETE"
    );
    assert_eq!(links_of(&cgroup_dir, id0), Vec::<String>::new());
    assert_eq!(map_entries_of(id0), (0, 0), "map entries left by DELETE");
    assert!(!files.join(format!("{id0}.json")).exists());
    assert!(agents[0].child.wait().is_ok());

    // The orderly stop destroys the others and their state.
    let out = daemon.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!cgroup_dir.exists(), "cgroups left after the orderly stop");
    for b in &boxes[1..K - 1] {
        let id = b["id"].as_u64().unwrap();
        assert_eq!(links_of(&cgroup_dir, id), Vec::<String>::new());
        assert_eq!(
            map_entries_of(id),
            (0, 0),
            "map entries after the orderly stop"
        );
    }
    assert_eq!(
        std::fs::read_dir(&files).unwrap().count(),
        0,
        "state files left after the orderly stop"
    );
    for a in &mut agents[1..] {
        assert!(a.child.wait().is_ok());
    }
    let log = std::fs::read_to_string(&daemon.audit).unwrap();
    for k in 0..K {
        assert!(!log.contains(&real(k)), "a real value in the audit log");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A sandbox a `kz run --blind` command made through the daemon is adopted with its process
/// after a SIGKILL (the command's client lost its connection with the old daemon), and the new
/// daemon destroys it once that process has ended.
#[test]
fn an_adopted_runs_sandbox_goes_with_its_last_process() {
    if !support::require_root() {
        return;
    }
    use std::io::{BufRead, Write};
    let agent = support::agent_user();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(agent.gid))
        .unwrap()
        .expect("the test user's group")
        .name;
    let mut daemon = Daemon::start(None, &group, &[]);
    let root = support::agent_readable_dir("kzagw");
    let (project, state) =
        user_project(&root, "api.test", "run-adopt-value-2b7c0e", "127.0.0.1:53");
    let mut client = kz_run_as_user(
        &daemon.socket,
        &project,
        &state,
        &["bash", "-c", "echo ready; read -r line; echo \"got $line\""],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut to_child = client.stdin.take().unwrap();
    let mut from_child = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut first = String::new();
    from_child.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "ready");
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    let id = listed[0]["id"].as_u64().unwrap();
    let cgroup = PathBuf::from(listed[0]["cgroup"].as_str().unwrap());

    daemon.kill();
    let _ = client.wait();
    daemon.restart(None, &group, &[], &[]);
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(
        listed[0]["id"], id,
        "the run's sandbox is adopted: {listed}"
    );
    assert!(
        daemon
            .audit()
            .iter()
            .any(|r| r["kind"] == "sandbox_adopted" && r["sandbox_id"] == id && r["run"] == true),
        "no sandbox_adopted for the run's sandbox"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "gone while its process ran"
    );

    // The process ends: its sandbox goes.
    writeln!(to_child, "bye").unwrap();
    let mut last = String::new();
    from_child.read_line(&mut last).unwrap();
    assert_eq!(last.trim(), "got bye");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
        if listed == json!([]) && !cgroup.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after its process ended the adopted run's sandbox is still there: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!daemon.state.join(format!("sandboxes/{id}.json")).exists());
    let out = daemon.stop();
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&root);
}

/// Reads a child's stdout line by line on a thread; the lines arrive on the channel.
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines from `rx` until one satisfies `want` (returned with those before it), or panics
/// after `secs`.
fn until(
    rx: &std::sync::mpsc::Receiver<String>,
    secs: u64,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                let hit = want(&v);
                seen.push(v);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("{what}: none within {secs} s ({e:?}); lines so far: {seen:?}"),
        }
    }
}

/// `curl -N` on an event stream as `uid`:`gid`, its stdout piped.
fn stream_as(socket: &Path, uid: u32, gid: u32, path: &str) -> Child {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "--", "curl", "-sS", "-N", "-m", "120"])
        .args(["-w", "\n{\"http_code\":%{http_code}}\n", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://kz{path}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `GET /v1/sandboxes/{id}/events` streams the sandbox's records live to its owner: the
/// requests and refusals of a process acting in it arrive while it acts; another user gets
/// 403 and nothing, and its `/v1/events` carries nothing of the sandbox; the stream ends with
/// `sandbox_destroyed` on DELETE.
#[test]
fn a_sandbox_streams_its_events_to_its_owner_only() {
    if !support::require_root() {
        return;
    }
    const USER_REAL: &str = "events-test-value-0c9d4e";
    let agent = support::agent_user();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(agent.gid))
        .unwrap()
        .expect("the test user's group")
        .name;
    let other_uid = agent.uid + 7919;
    let pair = Pair::new("agec", "ageu");
    pair.add_upstream_addr("10.77.0.10/24");
    let ca = TestCa::new("kz agent events test CA");
    let upstream = host(
        &pair.upstream,
        "10.77.0.10".parse().unwrap(),
        &ca,
        "api.ev.test",
    );
    let _dns = TestDns::start(
        &pair.upstream,
        "10.77.0.2:53".parse().unwrap(),
        Zone::new(30).host("api.ev.test", &["10.77.0.10"]),
    );
    let root = support::agent_readable_dir("kzage");
    let ca_pem = ca.write_pem(&root, "upstream-ca.pem");
    let daemon = Daemon::start_with(
        Some(&pair.client),
        &group,
        &[],
        &["--upstream-ca".as_ref(), ca_pem.as_os_str()],
    );
    let (project, state) = user_project(&root, "api.ev.test", USER_REAL, "10.77.0.2:53");
    let me = Some((agent.uid, agent.gid));
    let (code, sandbox) = daemon.api(
        me,
        "POST",
        "/v1/sandboxes",
        Some(&json!({"name": "watched", "project_dir": project, "state_dir": state})),
    );
    assert_eq!(code, 201, "{sandbox}");
    let id = sandbox["id"].as_u64().unwrap();
    let token = sandbox["secrets"]["API_KEY"]["token"].as_str().unwrap();
    let cgroup = sandbox["cgroup"].as_str().unwrap();
    let sandbox_ca = root.join("sandbox-ca.pem");
    std::fs::write(&sandbox_ca, sandbox["ca_cert_pem"].as_str().unwrap()).unwrap();

    // The owner's stream, and another user's view of everything it may see.
    let events = format!("/v1/sandboxes/{id}/events");
    let mut owner = stream_as(&daemon.socket, agent.uid, agent.gid, &events);
    let owner_rx = lines_of(&mut owner);
    let mut others = stream_as(&daemon.socket, other_uid, agent.gid, "/v1/events");
    let others_rx = lines_of(&mut others);
    until(&owner_rx, 20, "the owner's subscription", |v| {
        v["kind"] == "events_subscribed"
    });
    until(&others_rx, 20, "the other user's subscription", |v| {
        v["kind"] == "events_subscribed"
    });

    // Another user asking for the sandbox's stream: 403, and no record.
    let out = Command::new("setpriv")
        .arg(format!("--reuid={other_uid}"))
        .arg(format!("--regid={}", agent.gid))
        .args(["--clear-groups", "--", "curl", "-sS", "-N", "-m", "20"])
        .args(["-w", "\n%{http_code}", "--unix-socket"])
        .arg(&daemon.socket)
        .arg(format!("http://kz{events}?since=256"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("403") && text.contains("\"forbidden\""),
        "{text}"
    );
    assert!(
        !text.contains("sandbox_created") && !text.contains("events_subscribed"),
        "{text}"
    );

    // A process in the sandbox acts: an HTTPS request with the token (swapped), and a connect
    // to an address it never resolved (refused by the kernel).
    let script = format!(
        "curl -sS -m 20 --cacert '{}' https://api.ev.test/v1/echo -H 'Authorization: Bearer {token}' -o /dev/null -w 'status %{{http_code}}\\n'\n\
         (exec 4<>/dev/tcp/10.77.0.99/80) 2>&1 && echo denied-address-connected\ntrue\n",
        sandbox_ca.display()
    );
    let acting = in_sandbox(&pair.client, cgroup, &script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Live: the records come while the sandbox stands, as the process acts.
    let seen = until(&owner_rx, 20, "the request's record", |v| {
        v["kind"] == "proxy_request"
    });
    let request = seen.last().unwrap();
    assert_eq!(request["sandbox_id"], id, "{request}");
    assert_eq!(request["swapped"], json!(["API_KEY"]), "{request}");
    let seen = until(&owner_rx, 20, "the refused connect's record", |v| {
        v["kind"] == "connect_blocked"
    });
    assert_eq!(seen.last().unwrap()["sandbox_id"], id);
    let out = acting.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("status 200") && said.contains("Operation not permitted"),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        upstream
            .seen()
            .iter()
            .any(|s| s.header("authorization") == Some(&*format!("Bearer {USER_REAL}"))),
        "the upstream never got the real value"
    );

    // The CLI prints the records kept so far (and exits without -f).
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", agent.uid))
        .arg(format!("--regid={}", agent.gid))
        .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_kz")])
        .args(["sandbox", "events", &id.to_string(), "-n", "50", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("proxy_request") && printed.contains("connect_blocked"),
        "{printed}"
    );

    // DELETE: the owner's stream ends by itself, its last record `sandbox_destroyed`.
    let (code, _) = daemon.api(me, "DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(code, 200);
    let seen = until(&owner_rx, 20, "the stream's end", |v| {
        v["http_code"].is_number()
    });
    assert_eq!(seen.last().unwrap()["http_code"], 200);
    let last = &seen[seen.len() - 2];
    assert_eq!(
        (last["kind"].as_str(), last["sandbox_id"].as_u64()),
        (Some("sandbox_destroyed"), Some(id)),
        "{seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while owner.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "curl did not exit after the end");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The other user's /v1/events got nothing of the sandbox.
    std::thread::sleep(Duration::from_millis(300));
    let _ = others.kill();
    let _ = others.wait();
    let theirs: Vec<String> = others_rx.try_iter().collect();
    assert!(
        theirs.iter().all(|l| !l.contains(&id.to_string())
            && !l.contains("proxy_request")
            && !l.contains("connect_blocked")),
        "another user saw the sandbox's records: {theirs:?}"
    );
    let log = std::fs::read_to_string(&daemon.audit).unwrap();
    assert!(!log.contains(USER_REAL), "a real value in the audit log");
    let _ = std::fs::remove_dir_all(&root);
}

/// Creates racing with one name (same owner): one sandbox, the others `409 name_taken`.
#[test]
fn racing_creates_of_one_name_give_one_sandbox() {
    if !support::require_root() {
        return;
    }
    let daemon = Daemon::start(None, "root", &[("KZ_TEST_REAL_0".into(), real(0))]);
    let dir = support::agent_readable_dir("kzagn").join("p0");
    sandbox_project(&dir, 0);
    let body = json!({"name": "same", "project_dir": dir}).to_string();
    let racers: Vec<Child> = (0..6)
        .map(|_| {
            Command::new("curl")
                .args(["-sS", "-m", "60", "-w", "\n%{http_code}", "--unix-socket"])
                .arg(&daemon.socket)
                .args(["-H", "content-type: application/json", "-d", &body])
                .arg("http://kz/v1/sandboxes")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let answers: Vec<String> = racers
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned())
        .collect();
    let created = answers.iter().filter(|a| a.ends_with("\n201")).count();
    let taken = answers
        .iter()
        .filter(|a| a.ends_with("\n409") && a.contains("\"name_taken\""))
        .count();
    assert_eq!((created, taken), (1, 5), "{answers:#?}");
    let (_, listed) = daemon.api(None, "GET", "/v1/sandboxes", None);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// `kz allow` as `uid`:`gid` (root: `None`) with `state` as its state directory.
fn allow_as(user: Option<(u32, u32)>, project: &Path, state: &Path) -> Output {
    let mut cmd = match user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--", env!("CARGO_BIN_EXE_kz")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_kz")),
    };
    let out = cmd
        .arg("--dir")
        .arg(project)
        .arg("allow")
        .env("KZ_STATE_DIR", state)
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "kz allow: {out:?}");
    out
}

/// The daemon runs `kz run --blind`'s approval gate with the owner's approvals: a project whose
/// secret scopes changed since its owner approved it is refused (`403 not_approved`, the diff
/// and `kz allow` in the message) until the owner approves it; root's approval does not count
/// for a user's project.
#[test]
fn a_changed_config_is_refused_until_its_owner_approves_it() {
    if !support::require_root() {
        return;
    }
    let agent = support::agent_user();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(agent.gid))
        .unwrap()
        .expect("the test user's group")
        .name;
    let daemon = Daemon::start(None, &group, &[("KZ_TEST_REAL_0".into(), real(0))]);
    let root_state = daemon.dir.join("approvals");
    let root = support::agent_readable_dir("kzaga");
    let widen = |dir: &Path| {
        let file = dir.join(".keyzero.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let wider = text.replacen("hosts = [\"", "hosts = [\"exfil.example\", \"", 1);
        assert_ne!(text, wider);
        std::fs::write(&file, wider).unwrap();
    };
    let create = |user: Option<(u32, u32)>, dir: &Path, state: Option<&Path>| {
        let mut body = json!({"name": "gated", "project_dir": dir});
        if let Some(s) = state {
            body["state_dir"] = json!(s);
        }
        daemon.api(user, "POST", "/v1/sandboxes", Some(&body))
    };
    let refused = |(code, v): (u16, Value)| {
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (403, Some("not_approved")),
            "{v}"
        );
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("exfil.example") && message.contains("kz allow"),
            "{message}"
        );
    };
    let created = |(code, v): (u16, Value), user| {
        assert_eq!(code, 201, "{v}");
        let id = v["id"].as_u64().unwrap();
        let (code, _) = daemon.api(user, "DELETE", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(code, 200);
    };

    // Root's project, root's approvals (the daemon's KZ_STATE_DIR).
    let root_project = root.join("root-project");
    sandbox_project(&root_project, 0);
    created(create(None, &root_project, None), None);
    widen(&root_project);
    refused(create(None, &root_project, None));
    allow_as(None, &root_project, &root_state);
    created(create(None, &root_project, None), None);

    // A user's project, the user's approvals.
    let me = Some((agent.uid, agent.gid));
    let (project, state) = user_project(&root, "api.test", "gate-test-value-5a1b", "127.0.0.1:53");
    created(create(me, &project, Some(&state)), me);
    widen(&project);
    refused(create(me, &project, Some(&state)));
    // Root approving the user's project changes nothing for the user.
    allow_as(None, &project, &root_state);
    refused(create(me, &project, Some(&state)));
    allow_as(me, &project, &state);
    created(create(me, &project, Some(&state)), me);

    let records = daemon.audit();
    assert!(
        records
            .iter()
            .filter(|r| r["kind"] == "api_refused" && r["reason"] == "not_approved")
            .count()
            >= 3,
        "the refusals are audited"
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "config_first_use" && r["owner_uid"] == agent.uid),
        "the user's first use is audited"
    );
    let _ = std::fs::remove_dir_all(&root);
}
