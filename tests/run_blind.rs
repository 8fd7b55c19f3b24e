//! `kz run --blind -- CMD` end to end, as root, with real clients under kz (the agent runs as
//! the unprivileged test user). The network and hosts: tests/support/blind_env.rs.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::blind_env::*;
use support::dns::{TestDns, Zone};
use support::netns::Pair;
use support::tls::TestCa;

#[test]
fn child_sees_only_the_masked_value_and_curl_gets_it_swapped() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env.run(
        r#"
        echo "env=$API_KEY"
        # The whole environment: no_leak() checks the real value is nowhere in it (the env
        # resolver's source variable included).
        env | sort
        # cat's own /proc/self/environ (a redirect would be opened before exec, by bash).
        cat /proc/self/environ | tr '\0' '\n' | grep '^API_KEY='
        env | grep -iE '^(https?|all|no)_proxy=' && echo PROXY_VARS_SET
        echo "ca=$SSL_CERT_FILE node=$NODE_EXTRA_CA_CERTS req=$REQUESTS_CA_BUNDLE"
        curl -sS --max-time 10 https://api.allowed.test/v1 -H "Authorization: Bearer $API_KEY"
        curl -sS --max-time 10 --noproxy '*' http://api.allowed.test/v1 -H "Authorization: Bearer $API_KEY"
        "#,
    );
    let o = assert_ok(&out);
    let tok = masked_token(&o);
    assert!(o.contains(&format!("env={tok}")), "{o}");
    assert!(o.contains(&format!("API_KEY={tok}")), "{o}");
    assert!(
        !o.contains("PROXY_VARS_SET"),
        "blind mode with eBPF sets no proxy vars: {o}"
    );
    // The upstream echoed the real value; the proxy scrubbed it back to the masked token.
    assert_eq!(
        o.matches(&format!("authorization=Bearer {tok}")).count(),
        2,
        "{o}"
    );
    upstream_got_real(&env.api, true);
    upstream_got_real(&env.api, false);
    let ca = o.lines().find(|l| l.starts_with("ca=")).unwrap();
    let bundle = ca
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("ca=");
    assert!(ca.contains(&format!("node={bundle}")) && ca.contains(&format!("req={bundle}")));
    // The run directory (and its CA bundle) is gone after the run.
    assert!(!Path::new(bundle).exists(), "{bundle} left behind");
    let audit = std::fs::read_to_string(env.audit_path()).unwrap_or_default();
    assert!(!audit.contains(REAL), "real value in the audit log");
    // Every swap is audited, with the run that did it.
    let records = env.audit();
    let swaps: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "proxy_request" && r["swapped"] == serde_json::json!(["API_KEY"]))
        .collect();
    assert_eq!(swaps.len(), 2, "{records:?}");
    assert!(
        swaps
            .iter()
            .all(|r| r["run"].as_str().is_some_and(|s| s.starts_with("run-")))
    );
    assert!(
        swaps
            .iter()
            .all(|r| r["program"] == "bash" && r["run_mode"] == "kernel")
    );
    assert_eq!(records.last().unwrap()["kind"], "run_end");
    assert_eq!(records.last().unwrap()["exit_code"], 0);
}

#[test]
fn python_node_openssl_and_bash_dev_tcp_get_swapped() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env.run(
        r#"
        set -e
        python3 - <<'PY'
import os, urllib.request
req = urllib.request.Request("https://api.allowed.test/py", headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
print("py:", urllib.request.urlopen(req, timeout=10).read().decode().strip())
PY
        node -e '
          fetch("https://api.allowed.test/node", {headers: {Authorization: "Bearer " + process.env.API_KEY}})
            .then(r => r.text()).then(t => console.log("node:", t.trim()))
            .catch(e => { console.error("node error", e); process.exit(3); });'
        printf 'GET /openssl HTTP/1.1\r\nHost: api.allowed.test\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n' "$API_KEY" \
          | timeout 10 openssl s_client -quiet -connect api.allowed.test:443 -servername api.allowed.test \
              -verify_return_error -CAfile "$SSL_CERT_FILE" 2>/dev/null | sed 's/^/openssl: /'
        exec 3<>/dev/tcp/api.allowed.test/80
        printf 'GET /devtcp HTTP/1.1\r\nHost: api.allowed.test\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n' "$API_KEY" >&3
        timeout 10 cat <&3 | sed 's/^/devtcp: /'
        "#,
    );
    let o = assert_ok(&out);
    let tok = masked_token(&o);
    for client in ["py:", "node:", "openssl:", "devtcp:"] {
        assert!(
            o.lines().any(
                |l| l.starts_with(client) && l.contains(&format!("authorization=Bearer {tok}"))
            ),
            "{client} did not get an answer:\n{o}"
        );
    }
    let reqs = env.api.seen();
    for path in ["/py", "/node", "/openssl", "/devtcp"] {
        let r = reqs
            .iter()
            .find(|r| r.method == "GET" && r.uri == path)
            .unwrap_or_else(|| panic!("upstream never saw {path}: {reqs:?}"));
        assert_eq!(
            r.header("authorization").unwrap(),
            format!("Bearer {REAL}"),
            "{path}"
        );
    }
}

#[test]
fn out_of_scope_host_receives_the_masked_token() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env.run(
        r#"curl -sS --max-time 10 https://other.allowed.test/x -H "Authorization: Bearer $API_KEY""#,
    );
    let o = assert_ok(&out);
    let tok = masked_token(&o);
    let reqs = env.other.seen();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0].header("authorization").unwrap(),
        format!("Bearer {tok}")
    );
    let audit = env.audit();
    assert!(
        audit.iter().any(|e| e.to_string().contains("out_of_scope")),
        "no scope violation audited: {audit:?}"
    );
}

/// A shell snippet that tries a TCP connection from Python and prints `CONNECTED` or
/// `connect: <errno name>` (EPERM when the kernel refuses it).
fn py_connect(ip: &str, port: u16) -> String {
    format!(
        r#"python3 - <<'PY'
import socket, errno
try:
    socket.create_connection(("{ip}", {port}), timeout=5)
    print("CONNECTED")
except OSError as e:
    print("connect:", errno.errorcode.get(e.errno, e.errno))
PY"#
    )
}

#[test]
fn an_allow_rule_naming_an_address_lets_the_agent_dial_it_without_dns() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // The address is allowed by a rule of its own and is in the secret's scope; nothing
    // resolves it, so the kernel must know it from the start.
    write_config(&env.dir, OTHER, &[OTHER], "");
    let out = env.run(&format!(
        r#"
        curl -sS --max-time 10 http://{OTHER}/x -H "Authorization: Bearer $API_KEY"; echo "curl exit $?"
        {connect}
        "#,
        connect = py_connect(DENIED, 80)
    ));
    let o = assert_ok(&out);
    assert!(o.contains("curl exit 0"), "{o}");
    assert!(o.contains("connect: EPERM"), "{o}");
    upstream_got_real(&env.other, false);
    assert!(env.denied.seen().is_empty(), "the denied host was reached");
}

#[test]
fn a_plain_http_host_claim_is_checked_once_per_connection() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // The agent dials an address it may reach and names the host only in its Host header, a
    // name it never resolved through kz: kz asks the DNS server whether that name has this
    // address before it swaps a token scoped to the name.
    write_config(
        &env.dir,
        "other.allowed.test",
        &[OTHER, "other.allowed.test"],
        "",
    );
    let out = env.run(&format!(
        r#"
        curl -sS --max-time 10 -o /dev/null -o /dev/null -o /dev/null \
          -H "Host: other.allowed.test" -H "Authorization: Bearer $API_KEY" \
          http://{OTHER}/a http://{OTHER}/b http://{OTHER}/c
        echo "curl exit $?"
        "#
    ));
    let o = assert_ok(&out);
    assert!(o.contains("curl exit 0"), "{o}");
    let reqs = env.other.seen();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r.header("authorization").unwrap(), format!("Bearer {REAL}"));
    }
    // Three requests on one keep-alive connection, one question: the answer holds for the
    // connection, as a certificate does for a TLS one.
    let asked: Vec<String> = env
        .dns
        .questions()
        .into_iter()
        .filter(|q| q.starts_with("other.allowed.test "))
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
}

#[test]
fn denied_host_dns_refused_and_literal_ip_gets_eperm() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&format!(
        r#"
        getent hosts denied.test && echo RESOLVED || echo "dns: refused"
        {connect}
        curl -sS --max-time 5 -o /dev/null https://{DENIED}/ ; echo "curl exit $?"
        # UDP other than DNS is refused too, even to an allowed host.
        getent hosts api.allowed.test >/dev/null
        python3 - <<'PY'
import socket, errno
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", ("{API}", 9999))
    print("UDP SENT")
except OSError as e:
    print("udp:", errno.errorcode.get(e.errno, e.errno))
PY
        "#,
        connect = py_connect(DENIED, 443)
    ));
    let o = assert_ok(&out);
    assert!(o.contains("dns: refused") && !o.contains("RESOLVED"), "{o}");
    assert!(o.contains("connect: EPERM"), "{o}");
    assert!(!o.contains("curl exit 0"), "{o}");
    assert!(o.contains("udp: EPERM"), "{o}");
    assert!(env.denied.seen().is_empty(), "the denied host was reached");
    env.assert_never_forwarded("denied");
    let audit = env.audit();
    let refused = audit
        .iter()
        .find(|e| e["kind"] == "dns_refused" || e["event"] == "dns_refused")
        .unwrap_or_else(|| panic!("no dns_refused: {audit:?}"));
    assert_eq!(refused["name"], "denied.test", "{refused}");
    let blocked = audit
        .iter()
        .find(|e| e.to_string().contains("connect_blocked") && e.to_string().contains(DENIED))
        .unwrap_or_else(|| panic!("no connect_blocked for {DENIED}: {audit:?}"));
    // Who tried: the process name and pid of the blocked program.
    let b = blocked.to_string();
    assert!(b.contains("python3") || b.contains("curl"), "{b}");
    assert!(b.contains("pid"), "{b}");
}

#[test]
fn dns_over_tcp_goes_to_kz_resolver_whatever_resolver_the_agent_names() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // The test DNS server itself would answer denied.test; kz's resolver refuses it. Without the
    // TCP/53 redirect, the connection to the resolver's address was refused (it is not on the
    // allow list) or reached the proxy.
    let out = env.run(
        r#"
        echo "allowed: $(dig +tcp +short +time=3 +tries=1 @10.77.0.2 api.allowed.test)"
        dig +tcp +time=3 +tries=1 @10.77.0.2 denied.test | grep -o 'status: [A-Z]*' | sed 's/^/denied: /'
        python3 - <<'PY'
import socket
s = socket.create_connection(("10.77.0.2", 53), timeout=3)
print("peer:", "%s:%d" % s.getpeername())
PY
        "#,
    );
    let o = assert_ok(&out);
    assert!(o.contains(&format!("allowed: {API}")), "{o}");
    assert!(o.contains("denied: status: REFUSED"), "{o}");
    assert!(o.contains("peer: 10.77.0.2:53"), "{o}");
    env.assert_never_forwarded("denied");
    let audit = env.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "dns_refused" && e["transport"] == "tcp"),
        "no dns_refused over tcp: {audit:?}"
    );
}

#[test]
fn grandchildren_stay_inside_and_are_killed_at_the_end() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env.run(
        r#"
        grep '^0::' /proc/self/cgroup | sed 's/^/self: /'
        setsid bash -c 'sleep 300' </dev/null >/dev/null 2>&1 &
        gc=$!
        sleep 0.2
        grep '^0::' /proc/$gc/cgroup | sed 's/^/grandchild: /'
        echo "gcpid=$gc"
        # A grandchild cannot get out either.
        python3 -c 'import socket; socket.create_connection(("10.77.0.66", 80), timeout=5)' 2>&1 | tail -1
        "#,
    );
    let o = assert_ok(&out);
    let me = o
        .lines()
        .find(|l| l.starts_with("self: "))
        .unwrap()
        .trim_start_matches("self: ");
    let gc = o
        .lines()
        .find(|l| l.starts_with("grandchild: "))
        .unwrap()
        .trim_start_matches("grandchild: ");
    assert_eq!(me, gc, "{o}");
    // Both see the root of the agent's cgroup namespace: the run's cgroup.
    assert_eq!(me, "0::/", "{o}");
    assert!(
        o.contains("PermissionError") || o.contains("Operation not permitted"),
        "{o}"
    );
    // From outside, the grandchild's refused connect names the run's cgroup.
    let blocked = env
        .audit()
        .into_iter()
        .find(|r| r["kind"] == "connect_blocked")
        .expect("the grandchild's refused connect is audited");
    let cgroup_dir = blocked["cgroup"].as_str().unwrap().to_owned();
    assert!(
        cgroup_dir.contains("/kz/"),
        "child not in a kz cgroup: {cgroup_dir}"
    );
    let pid: u32 = o
        .lines()
        .find_map(|l| l.strip_prefix("gcpid="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(!running(pid), "grandchild {pid} survived the run");
    // The cgroup is gone.
    assert!(
        !Path::new(&cgroup_dir).exists(),
        "cgroup {cgroup_dir} left behind"
    );
}

#[test]
fn exit_codes_and_signals_propagate() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env.kz(&[], "exit 7").output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{:?}", text(&out));
    let out = env.kz(&[], "kill -TERM $$").output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{:?}", text(&out));

    // SIGTERM to kz reaches the child, which exits with its own code.
    let mut child = env
        .kz(
            &[],
            "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(&mut child);
    let kz_pid = find_kz_pid(&child);
    signal(kz_pid, "TERM");
    let out = child.wait_with_output().unwrap();
    let (o, _) = text(&out);
    assert!(o.contains("got-term"), "{o}");
    assert_eq!(out.status.code(), Some(42));
}

/// `pid` exists and is not a zombie (a killed orphan stays a zombie until init reaps it).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The cgroup v2 directory `cg` (a `0::` path) exists, on a pure or a hybrid layout.
fn cgroup_exists(cg: &str) -> bool {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|root| Path::new(&format!("{root}{cg}/cgroup.procs")).exists())
}

/// Blocks until the child printed "ready" on its stdout.
fn wait_ready(child: &mut Child) {
    use std::io::Read;
    let stdout = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("ready") {
        assert!(Instant::now() < deadline, "child never got ready");
        if stdout.read(&mut b).unwrap() == 0 {
            panic!(
                "child exited before ready: {}",
                String::from_utf8_lossy(&seen)
            );
        }
        seen.push(b[0]);
    }
}

/// The kz process under nsenter: nsenter execs kz in place, so it is the spawned pid.
fn find_kz_pid(child: &Child) -> u32 {
    child.id()
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn sigkill_of_kz_leaves_the_child_cut_off_and_the_next_run_cleans_up() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // The agent (the unprivileged test user) writes its results into a directory of its own:
    // a project directory it can write would not be trusted on first use.
    let work = support::agent_readable_dir("kzsk");
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let flag = work.join("after-kill");
    let mut child = env
        .kz(
            &[],
            &format!(
                r#"echo ready
                echo $$ > {dir}/childpid
                while [ ! -e {flag} ]; do sleep 0.05; done
                python3 - > {dir}/result 2>&1 <<'PY'
import socket
for target in [("{API}", 443), ("{API}", 80), ("10.77.0.2", 53)]:
    try:
        socket.create_connection(target, timeout=3)
        print("REACHED", target)
    except OSError as e:
        print("cut off", target, e.errno)
PY
                sleep 300"#,
                dir = work.display(),
                flag = flag.display()
            ),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&mut child);
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), "KILL");
    let _ = child.wait();
    std::fs::write(&flag, "").unwrap();
    let result = work.join("result");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&result)
        .map(|r| r.lines().count() < 3)
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "orphaned child produced no result"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = std::fs::read_to_string(&result).unwrap();
    assert!(
        !r.contains("REACHED"),
        "orphaned child reached the network:\n{r}"
    );
    assert!(env.api.seen().is_empty());

    // The next run removes what the dead one left: its processes and its cgroup.
    let orphan: u32 = std::fs::read_to_string(work.join("childpid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if !running(orphan) {
        // Every kz start removes dead runs' leftovers: a kz started by a test running in
        // parallel got there first (its cleanup is what the rest of this test checks).
        eprintln!("orphan {orphan} was already cleaned up by another kz process");
        assert_ok(&env.run("true"));
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    // Its cgroup as the host sees it (the agent's own view is its cgroup namespace's root).
    let cg = std::fs::read_to_string(format!("/proc/{orphan}/cgroup")).unwrap();
    let cg = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let out = env.run("true");
    assert_ok(&out);
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(orphan) {
        assert!(
            Instant::now() < deadline,
            "orphan {orphan} still alive after the next run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cg.contains("kz"), "{cg}");
    assert!(!cgroup_exists(&cg), "stale cgroup {cg} left");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn fallback_as_non_root_uses_an_explicit_proxy_and_require_kernel_refuses() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // Let the unprivileged user read the config and write the audit log.
    let _ = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(&env.dir)
        .status();
    let as_nobody = |extra: &[&str], script: &str| {
        let mut cmd = env.client.command("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_kz"))
            .arg("--dir")
            .arg(&env.dir)
            .args(["run", "--blind"])
            .args(extra)
            .args(["--", "bash", "-c", script])
            .env("KZ_TEST_REAL_KEY", REAL)
            .env("KZ_AUDIT_LOG", env.audit_path())
            .env("HOME", &env.dir)
            .env_remove("XDG_RUNTIME_DIR")
            .current_dir(&env.dir);
        cmd.output().unwrap()
    };
    let out = as_nobody(
        &[],
        r#"
        echo "proxy=$HTTPS_PROXY lower=$https_proxy no=[$NO_PROXY][$no_proxy]"
        curl -sS --max-time 10 https://api.allowed.test/fb -H "Authorization: Bearer $API_KEY"
        "#,
    );
    no_leak(&out);
    let o = assert_ok(&out);
    let (_, e) = text(&out);
    assert!(
        e.to_lowercase().contains("cooperative"),
        "no fallback warning: {e}"
    );
    assert!(
        e.contains("root") || e.contains("CAP_"),
        "warning does not say what is missing: {e}"
    );
    assert!(o.contains("proxy=http://127.0.0.1:"), "{o}");
    assert!(o.contains("no=[][]"), "{o}");
    let tok = masked_token(&o);
    assert!(o.contains(&format!("authorization=Bearer {tok}")), "{o}");
    upstream_got_real(&env.api, true);

    let out = as_nobody(&["--require-kernel"], "echo SHOULD-NOT-RUN");
    no_leak(&out);
    let (o, e) = text(&out);
    assert!(!out.status.success());
    assert!(!o.contains("SHOULD-NOT-RUN"), "{o}");
    assert!(
        e.contains("--require-kernel") || e.contains("kernel"),
        "{e}"
    );
}

#[test]
fn native_ipv6_is_intercepted_when_the_config_allows_it() {
    if !support::require_root() {
        return;
    }
    let pair = Pair::new("rb6c", "rb6u");
    pair.add_client_addr("fd77::1/64");
    pair.add_upstream_addr("fd77::10/64");
    pair.add_upstream_addr("fd77::66/64");
    let Pair {
        client,
        upstream: upstream_ns,
        ..
    } = pair;
    let ca = TestCa::new("kz test upstream CA");
    let api6 = host(
        &upstream_ns,
        "fd77::10".parse().unwrap(),
        &ca,
        "api6.allowed.test",
    );
    let zone = Zone::new(30).host("api6.allowed.test", &["fd77::10"]);
    let _dns = TestDns::start(&upstream_ns, "10.77.0.2:53".parse().unwrap(), zone);
    support::agent_user();
    let dir = support::agent_readable_dir("kzr6");
    ca.write_pem(&dir, "upstream-ca.pem");
    write_config(
        &dir,
        "api6.allowed.test",
        &["api6.allowed.test"],
        "ipv6 = true\n",
    );
    let out = client
        .command(env!("CARGO_BIN_EXE_kz"))
        .arg("--dir")
        .arg(&dir)
        .args(["run", "--blind", "--user", support::AGENT_USER])
        .args(["--", "bash", "-c"])
        .arg(
            r#"
            curl -sS -6 --max-time 10 https://api6.allowed.test/v6 -H "Authorization: Bearer $API_KEY"
            python3 -c '
import socket, errno
try:
    socket.create_connection(("fd77::66", 443), timeout=5); print("CONNECTED")
except OSError as e:
    print("connect6:", errno.errorcode.get(e.errno, e.errno))'
            "#,
        )
        .env("KZ_TEST_REAL_KEY", REAL)
        .env("KZ_AUDIT_LOG", dir.join("audit.jsonl"))
        .env("KZ_STATE_DIR", dir.join("kz-state"))
        .current_dir(&dir)
        .output()
        .unwrap();
    no_leak(&out);
    let o = assert_ok(&out);
    let tok = masked_token(&o);
    assert!(o.contains(&format!("authorization=Bearer {tok}")), "{o}");
    assert!(o.contains("connect6: EPERM"), "{o}");
    let reqs = api6.seen();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(
        reqs[0].header("authorization").unwrap(),
        format!("Bearer {REAL}")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn git_over_https_runs_as_the_unprivileged_user_and_gets_the_real_value_swapped() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // The upstream is no git server: what counts is that git (as the agent's user, trusting
    // the CA bundle through GIT_SSL_CAINFO) reached it with the real value swapped in.
    let out = env.run(
        r#"
        echo "user=$(id -un)"
        HOME=$(mktemp -d) git -c http.extraHeader="Authorization: Bearer $API_KEY" \
            ls-remote https://api.allowed.test/acme/repo.git 2>&1 | head -3 | sed 's/^/git: /'
        true
        "#,
    );
    let o = assert_ok(&out);
    assert!(o.contains(&format!("user={}", support::AGENT_USER)), "{o}");
    assert!(!o.contains("SSL certificate problem"), "{o}");
    let reqs = env.api.seen();
    let r = reqs
        .iter()
        .find(|r| r.method == "GET" && r.uri.starts_with("/acme/repo.git/info/refs"))
        .unwrap_or_else(|| panic!("git never reached the upstream:\n{o}\n{reqs:?}"));
    assert_eq!(
        r.header("authorization"),
        Some(&*format!("Bearer {REAL}")),
        "{r:?}"
    );
}

/// The records of one audit log file of `kind`.
fn audit_records(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn chown(path: &Path, user: support::AgentUser) {
    let status = Command::new("chown")
        .arg(format!("{}:{}", user.uid, user.gid))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown {}", path.display());
}

/// Issue 14, policy files the agent can write: the developer is the agent's user (kz runs
/// unprivileged, as that user), so the project's `.keyzero.toml` is the agent's to write. The
/// agent of a first run widens its secret's scope in the file, as an agent would; the next
/// run stops with the diff before it resolves the secret or starts its child (exit 77), and
/// goes on only after `kz allow`.
#[test]
fn an_agent_that_widens_its_secrets_scope_in_the_config_is_stopped_until_kz_allow() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let agent = support::agent_user();
    let config = env.dir.join(".keyzero.toml");
    chown(&config, agent);
    // The agent user's home: kz's state (approvals) and the audit log live there.
    let home = support::agent_readable_dir("kzah");
    chown(&home, agent);
    let audit_log = home.join("audit.jsonl");
    let kz = |args: &[&str], real_key: bool| -> std::process::Output {
        let mut cmd = env.client.command("setpriv");
        cmd.arg(format!("--reuid={}", agent.uid))
            .arg(format!("--regid={}", agent.gid))
            .args(["--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_kz"))
            .arg("--dir")
            .arg(&env.dir)
            .args(args)
            .env("KZ_AUDIT_LOG", &audit_log)
            .env("HOME", &home)
            .env_remove("XDG_STATE_HOME")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("KZ_STATE_DIR")
            .current_dir(&env.dir);
        if real_key {
            cmd.env("KZ_TEST_REAL_KEY", REAL);
        } else {
            cmd.env_remove("KZ_TEST_REAL_KEY");
        }
        let out = cmd.output().unwrap();
        no_leak(&out);
        out
    };
    // 1: first use; the agent edits the file in place, the way a coding agent rewrites a file.
    let out = kz(
        &[
            "run",
            "--blind",
            "--",
            "python3",
            "-c",
            r#"
p = ".keyzero.toml"
s = open(p).read()
s = s.replace('hosts = ["api.allowed.test"]', 'hosts = ["api.allowed.test", "evil.example"]')
open(p, "w").write(s)
print("EDITED")
"#,
        ],
        true,
    );
    let o = assert_ok(&out);
    assert!(o.contains("EDITED"), "{o}");
    let (_, first_use) = text(&out);
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("evil.example"),
        "the agent's edit did not land"
    );

    // 2: the widened scope is not trusted: no child, the diff and the approving command.
    let out = kz(&["run", "--blind", "--", "echo", "SHOULD-NOT-RUN"], true);
    let (o, e) = text(&out);
    assert!(!o.contains("SHOULD-NOT-RUN"), "the child ran:\n{o}\n{e}");
    assert_eq!(out.status.code(), Some(77), "{e}");
    assert!(
        e.contains(r#"+ secrets.API_KEY.hosts: "evil.example""#),
        "no diff: {e}"
    );
    assert!(
        e.contains(&format!("kz allow --dir {}", env.dir.display())),
        "no approving command: {e}"
    );
    assert!(
        first_use.contains("first blind run"),
        "no first-use line: {first_use}"
    );
    // The stop comes before resolution: with the secret's source gone, the error is still the
    // approval's, not a resolution failure.
    let out = kz(&["run", "--blind", "--", "echo", "SHOULD-NOT-RUN"], false);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(77), "{e}");
    assert!(
        !o.contains("SHOULD-NOT-RUN") && !e.contains("resolve"),
        "{e}"
    );
    let refused = audit_records(&audit_log, "config_refused");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|r| r["reason"] == "config_changed"));

    // `kz allow --show` shows the same diff and records nothing; `kz allow` approves.
    let out = kz(&["allow", "--show"], true);
    let (o, _) = text(&out);
    assert_eq!(out.status.code(), Some(77), "{o}");
    assert!(
        o.contains(r#"+ secrets.API_KEY.hosts: "evil.example""#),
        "{o}"
    );
    let out = kz(&["allow"], true);
    let o = assert_ok(&out);
    assert!(
        o.contains(r#"+ secrets.API_KEY.hosts: "evil.example""#),
        "{o}"
    );

    // 3: approved, the run goes on.
    let out = kz(
        &["run", "--blind", "--", "sh", "-c", "echo RAN $API_KEY"],
        true,
    );
    let o = assert_ok(&out);
    assert!(o.contains("RAN kz_masked_"), "{o}");
    let _ = std::fs::remove_dir_all(&home);
}

/// With kz as root started through sudo, a config file the agent's user owns is not a source
/// of `[blind]` and scopes, not even on first use: refused with the file, its owner and mode and
/// `sudo kz allow`; accepted once the developer has approved it.
#[test]
fn an_agent_owned_config_is_refused_under_sudo_until_approved() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let agent = support::agent_user();
    let config = env.dir.join(".keyzero.toml");
    chown(&config, agent);
    let out = env.run("echo SHOULD-NOT-RUN");
    let (o, e) = text(&out);
    assert!(!o.contains("SHOULD-NOT-RUN"), "the child ran:\n{o}\n{e}");
    assert_eq!(out.status.code(), Some(77), "{e}");
    for want in [
        format!(
            "{}: owner uid {} ({}), mode 0644: owned by the agent's user",
            config.display(),
            agent.uid,
            agent.name
        ),
        format!("sudo kz allow --dir {}", env.dir.display()),
    ] {
        assert!(e.contains(&want), "{want:?} not in:\n{e}");
    }
    let refused = audit_records(&env.audit_path(), "config_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["reason"], "config_agent_writable");

    // The developer approves it (root's store, as `sudo kz allow` would write it).
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .arg("--dir")
        .arg(&env.dir)
        .arg("allow")
        .env("KZ_STATE_DIR", env.state_dir())
        .output()
        .unwrap();
    let o = assert_ok(&out);
    assert!(
        o.contains(r#"secrets.API_KEY.hosts: "api.allowed.test""#),
        "{o}"
    );
    let out = env.run("echo RAN $API_KEY");
    let o = assert_ok(&out);
    assert!(o.contains("RAN kz_masked_"), "{o}");
    assert!(audit_records(&env.audit_path(), "config_first_use").is_empty());
}

/// A `.keyzero.toml` like [`write_config`]'s, with the secret's own keys in `secret` (no
/// `allow_plaintext` unless given) and `[blind]` keys in `blind`.
fn write_secret_config(dir: &Path, secret: &str, blind: &str) {
    let toml = format!(
        r#"
[secrets.API_KEY]
resolver = "env"
ref = "KZ_TEST_REAL_KEY"
hosts = ["api.allowed.test"]
{secret}

[blind]
connections = [
  {{ allow = true, host = "api.allowed.test" }},
  {{ allow = true, host = "other.allowed.test" }},
  {{ allow = true, host = "{API}" }},
]
{blind}
resolver = "10.77.0.2:53"
upstream_ca = "upstream-ca.pem"
"#
    );
    std::fs::write(dir.join(".keyzero.toml"), toml).unwrap();
}

/// `kz allow` for the project, as its developer would after changing its config.
fn approve(env: &Env) {
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .arg("--dir")
        .arg(&env.dir)
        .arg("allow")
        .env("KZ_STATE_DIR", env.state_dir())
        .output()
        .unwrap();
    assert_ok(&out);
}

/// The proxy's request records with `error` set to `error`.
fn errors(env: &Env, error: &str) -> Vec<serde_json::Value> {
    env.audit()
        .into_iter()
        .filter(|r| r["kind"] == "proxy_request" && r["error"] == error)
        .collect()
}

#[test]
fn by_default_a_masked_token_is_swapped_in_headers_only() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    write_secret_config(&env.dir, "", "");
    // The agent writes its token into a query string and a body (an issue comment, a gist:
    // what the upstream will store and show back) besides the Authorization header.
    let out = env.run(
        r#"
        curl -sS --max-time 10 "https://api.allowed.test/v1?api_key=$API_KEY" \
          -H "Authorization: Bearer $API_KEY" --data "comment=$API_KEY"; echo "curl exit $?"
        "#,
    );
    let o = assert_ok(&out);
    assert!(o.contains("curl exit 0"), "{o}");
    let tok = masked_token(&o);
    let seen = env.api.last();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {REAL}").as_str())
    );
    assert_eq!(seen.query(), format!("api_key={tok}"), "{seen:?}");
    assert_eq!(
        String::from_utf8_lossy(&seen.body),
        format!("comment={tok}"),
        "the body must keep the masked token"
    );
    let misplaced: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "token_misplaced")
        .collect();
    assert_eq!(misplaced.len(), 1, "one record per request");
    assert_eq!(misplaced[0]["refused"], false);
}

#[test]
fn a_credential_location_list_decides_where_the_token_goes_and_refusal_is_specific() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    write_secret_config(
        &env.dir,
        r#"credential_location = ["header:X-Api-Key", "query:key", "basic"]"#,
        "refuse_out_of_scope = true",
    );
    let out = env.run(
        r#"
        code() { curl -sS --max-time 10 -o /dev/null -w "%{http_code}" "$@"; echo; }
        echo "key-header $(code https://api.allowed.test/a -H "X-Api-Key: $API_KEY")"
        echo "query $(code "https://api.allowed.test/b?key=$API_KEY")"
        echo "basic $(code -u "x-token:$API_KEY" https://api.allowed.test/c)"
        echo "bearer $(code https://api.allowed.test/d -H "Authorization: Bearer $API_KEY")"
        echo "other-param $(code "https://api.allowed.test/e?q=$API_KEY")"
        "#,
    );
    let o = assert_ok(&out);
    for (what, code) in [
        ("key-header", 200),
        ("query", 200),
        ("basic", 200),
        ("bearer", 403),
        ("other-param", 403),
    ] {
        assert!(o.contains(&format!("{what} {code}")), "{what}: {o}");
    }
    let paths = env.api.paths();
    assert_eq!(paths, vec!["/a", "/b", "/c"], "refused requests never left");
    let seen = env.api.seen();
    assert_eq!(seen[0].header("x-api-key"), Some(REAL));
    assert_eq!(seen[1].query(), format!("key={REAL}"));
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-token:{REAL}"));
    assert_eq!(
        seen[2].header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(errors(&env, "token_misplaced").len(), 2);
}

#[test]
fn a_host_header_naming_another_host_than_the_verified_one_is_misdirected() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // TLS verified for api.allowed.test; the request says it is for other.allowed.test (a
    // shared front end would route it there, with the swapped value).
    let out = env.run(
        r#"
        curl -sS --max-time 10 -o /dev/null -w "code %{http_code}\n" https://api.allowed.test/x \
          -H "Host: other.allowed.test" -H "Authorization: Bearer $API_KEY"
        curl -sS --max-time 10 --http2 -o /dev/null -w "h2 %{http_code}\n" https://api.allowed.test/y \
          -H "Host: other.allowed.test" -H "Authorization: Bearer $API_KEY"
        "#,
    );
    let o = assert_ok(&out);
    assert!(o.contains("code 421") && o.contains("h2 421"), "{o}");
    assert!(env.api.seen().is_empty(), "{:?}", env.api.seen());
    assert!(!errors(&env, "host_mismatch").is_empty());
}

#[test]
fn no_swap_into_cleartext_http_unless_the_secret_allows_it() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    write_secret_config(&env.dir, "", "");
    let out = env.run(
        r#"
        curl -sS --max-time 10 http://api.allowed.test/v1 -H "Authorization: Bearer $API_KEY"; echo "curl exit $?"
        "#,
    );
    let o = assert_ok(&out);
    let tok = masked_token(&o);
    assert_eq!(
        env.api.last().header("authorization"),
        Some(format!("Bearer {tok}").as_str()),
        "cleartext HTTP must carry the masked token only"
    );
    let plain: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "token_plaintext")
        .collect();
    assert_eq!(plain.len(), 1);

    write_secret_config(&env.dir, "", "refuse_out_of_scope = true");
    approve(&env);
    let out = env.run(
        r#"
        curl -sS --max-time 10 -w "\ncode %{http_code}\n" http://api.allowed.test/v2 -H "Authorization: Bearer $API_KEY"
        "#,
    );
    let o = assert_ok(&out);
    assert!(
        o.contains("code 403") && o.contains("allow_plaintext"),
        "{o}"
    );
    assert_eq!(env.api.paths(), vec!["/v1"]);
}

#[test]
fn a_real_key_smuggled_into_the_agent_cannot_be_used_on_a_required_host() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    write_secret_config(&env.dir, "require = true", "");
    let out = env.run(
        r#"
        curl -sS --max-time 10 -w "\nsmuggled %{http_code}\n" https://api.allowed.test/a \
          -H "Authorization: Bearer sk-smuggled-real-key"
        curl -sS --max-time 10 -o /dev/null -w "masked %{http_code}\n" https://api.allowed.test/b \
          -H "Authorization: Bearer $API_KEY"
        curl -sS --max-time 10 -o /dev/null -w "other-host %{http_code}\n" https://other.allowed.test/c
        "#,
    );
    let o = assert_ok(&out);
    assert!(o.contains("smuggled 403") && o.contains("require"), "{o}");
    assert!(o.contains("masked 200"), "{o}");
    assert!(o.contains("other-host 200"), "{o}");
    assert_eq!(env.api.paths(), vec!["/b"]);
    assert_eq!(errors(&env, "token_required").len(), 1);
}

#[test]
fn a_plain_http_host_claim_of_a_denied_name_is_never_looked_up() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    write_secret_config(&env.dir, "", "");
    // The agent dials an address it may reach and puts data into the Host name: asking the
    // upstream DNS server about that name would carry the data off the machine.
    let out = env.run(&format!(
        r#"
        curl -sS --max-time 10 -o /dev/null -w "code %{{http_code}}\n" http://{API}/x \
          -H "Host: leak-c2VjcmV0.denied.test" -H "Authorization: Bearer $API_KEY"
        "#
    ));
    let o = assert_ok(&out);
    assert!(o.contains("code 403"), "{o}");
    env.assert_never_forwarded("leak-c2VjcmV0");
    assert!(env.api.seen().is_empty());
    assert!(!errors(&env, "connection_denied").is_empty());
}

/// Issue 14, DNS rebinding under the kernel: the rules allow `*.allowed.test`, and the name
/// rebind.allowed.test answers 127.0.0.1, where a service of the host listens (kz's proxy runs
/// in the same network namespace and would dial it for the agent). The agent's lookup finds no
/// address, the kernel's allow map never learns 127.0.0.1 (a connect there with the address
/// given by hand is EPERM), nothing reaches the service, and the drop is audited.
#[test]
fn a_rebinding_answer_opens_no_loopback_service() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    write_config(&env.dir, "api.allowed.test", &["*.allowed.test"], "");
    let service = support::upstream::Upstream::start(
        Some(&env.client),
        &[("127.0.0.1:0".parse().unwrap(), None)],
        support::upstream::Routes::EchoAuth,
    );
    let port = service.addrs[0].port();
    let out = env.run(&format!(
        r#"
        getent ahostsv4 rebind.allowed.test; echo "getent exit $?"
        curl -sS --max-time 10 http://rebind.allowed.test:{port}/x; echo "curl exit $?"
        curl -sS --max-time 10 --resolve rebind.allowed.test:{port}:127.0.0.1 http://rebind.allowed.test:{port}/x; echo "curl exit $?"
        {connect}
        "#,
        connect = py_connect("127.0.0.1", port)
    ));
    let o = assert_ok(&out);
    assert!(o.contains("getent exit 2"), "{o}");
    assert!(!o.contains("curl exit 0"), "{o}");
    assert!(o.contains("connect: EPERM"), "{o}");
    assert!(
        service.seen().is_empty(),
        "the loopback service was reached"
    );
    let audit = env.audit();
    assert!(
        audit.iter().any(|r| r["kind"] == "dns_answer_dropped"
            && r["name"] == "rebind.allowed.test"
            && r["address"] == "127.0.0.1"),
        "no dns_answer_dropped record: {audit:?}"
    );
}

/// The attacker of issue 14: it can write the audit log (or a copy an operator will verify),
/// edits one record (the swap of API_KEY disappears from it) and recomputes the chain from
/// there on with plain SHA-256, exactly as kz's sink hashed records before the chain was keyed:
/// SHA-256(prev ‖ "\n" ‖ the line without its digest key). Python, as an agent would do it.
const REHASH: &str = r#"
import hashlib, json, re, sys
path, k = sys.argv[1], int(sys.argv[2])
lines = open(path, encoding="utf-8").read().splitlines()
out, prev = lines[:k], None
for i, line in enumerate(lines[k:], k):
    # kz appends the record's digest as the last key; the body is the line without it.
    body = re.match(r'^(.*),"(?:hash|mac)":"[0-9a-f]+"\}$', line).group(1) + "}"
    if i == k:
        body = body.replace('"swapped":["API_KEY"]', '"swapped":[]')
    if prev is not None:
        body = re.sub(r'"prev":"[0-9a-f]+"', '"prev":"%s"' % prev, body, count=1)
    p = json.loads(body)["prev"]
    prev = hashlib.sha256((p + "\n" + body).encode()).hexdigest()
    out.append(body[:-1] + ',"hash":"%s"}' % prev)
open(path, "w", encoding="utf-8").write("\n".join(out) + "\n")
"#;

#[test]
fn a_rewritten_and_rehashed_audit_record_fails_verify_which_names_it() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    assert_ok(&env.run(
        r#"curl -sS --max-time 10 https://api.allowed.test/v1 -H "Authorization: Bearer $API_KEY""#,
    ));
    let records = env.audit();
    let k = records
        .iter()
        .position(|r| {
            r["kind"] == "proxy_request" && r["swapped"] == serde_json::json!(["API_KEY"])
        })
        .unwrap_or_else(|| panic!("no swap recorded: {records:?}"));
    assert!(k + 1 < records.len(), "records after the swap: {records:?}");
    let rehash = Command::new("python3")
        .args(["-c", REHASH])
        .arg(env.audit_path())
        .arg(k.to_string())
        .status()
        .unwrap();
    assert!(rehash.success());
    let rewritten = std::fs::read_to_string(env.audit_path()).unwrap();
    assert!(
        !rewritten.contains("\"swapped\":[\"API_KEY\"]"),
        "the attacker removed the swap"
    );
    let v = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["audit", "verify"])
        .arg(env.audit_path())
        .output()
        .unwrap();
    let (o, e) = text(&v);
    assert_eq!(
        v.status.code(),
        Some(1),
        "a rewritten log must fail verify:\nstdout:\n{o}\nstderr:\n{e}"
    );
    assert!(
        e.contains(&format!(":{}: record seq {k}", k + 1)) && e.contains(&format!("(record {k})")),
        "verify names the rewritten record (line {}, record {k}):\n{e}",
        k + 1
    );
    // The whole log rewritten from its first record: it would pass for a log from before kz
    // keyed its chains, but kz's ledger knows this one was keyed from seq 0.
    let rehash = Command::new("python3")
        .args(["-c", REHASH, &env.audit_path().display().to_string(), "0"])
        .status()
        .unwrap();
    assert!(rehash.success());
    let v = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["audit", "verify"])
        .arg(env.audit_path())
        .output()
        .unwrap();
    let (o, e) = text(&v);
    assert_eq!(v.status.code(), Some(1), "stdout:\n{o}\nstderr:\n{e}");
    assert!(
        e.contains(":1: record seq 0 is unkeyed, but kz has keyed this log"),
        "{e}"
    );
}

/// A directory owned by the agent's user (its project, say): it can create names there.
fn agent_owned_dir(env: &Env, name: &str) -> std::path::PathBuf {
    let user = support::agent_user();
    let d = env.dir.join(name);
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(user.uid), Some(user.gid)).unwrap();
    d
}

/// `cmd` run as the agent's user, outside any sandbox (what it does between runs).
fn as_agent_user(cmd: &str) {
    let user = support::agent_user();
    let st = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--clear-groups", "--", "sh", "-c", cmd])
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn a_symlink_planted_at_the_audit_log_path_is_refused_and_its_target_untouched() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // What the attacker wants kz (root) to create and write: a file in a root-only directory
    // that it cannot create itself (think /etc/ld.so.preload or a cron.d entry).
    let root_only = env.dir.join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    let victim = root_only.join("ld.so.preload");
    let logs = agent_owned_dir(&env, "logs");
    as_agent_user(&format!(
        "ln -s {} {}/audit.jsonl",
        victim.display(),
        logs.display()
    ));
    let out = env
        .kz(&[], "echo AGENT-RAN")
        .env("KZ_AUDIT_LOG", logs.join("audit.jsonl"))
        .output()
        .unwrap();
    no_leak(&out);
    let (o, e) = text(&out);
    assert!(
        !victim.exists(),
        "kz created the link's target:\nstdout:\n{o}\nstderr:\n{e}"
    );
    assert!(!out.status.success(), "{o}\n{e}");
    assert!(!o.contains("AGENT-RAN"), "{o}");
    assert!(e.contains("symbolic link"), "{e}");
}

#[test]
fn an_audit_log_in_a_directory_the_agent_can_write_is_refused() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let logs = agent_owned_dir(&env, "logs");
    let out = env
        .kz(&[], "echo AGENT-RAN")
        .env("KZ_AUDIT_LOG", logs.join("audit.jsonl"))
        .output()
        .unwrap();
    no_leak(&out);
    let (o, e) = text(&out);
    assert!(
        !out.status.success(),
        "kz used a log the agent's user could replace:\nstdout:\n{o}\nstderr:\n{e}"
    );
    assert!(!o.contains("AGENT-RAN"), "{o}");
    assert!(e.contains(&logs.display().to_string()), "{e}");
    assert!(
        e.contains("/var/lib/kz"),
        "the error names a safe place: {e}"
    );
}

#[test]
fn through_sudo_the_default_audit_log_is_in_a_root_owned_directory() {
    if !support::require_root() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    // sudo -E keeps the invoking user's HOME and XDG_STATE_HOME: both point at the agent's.
    let home = agent_owned_dir(&env, "home");
    let out = env
        .kz(&[], "echo AGENT-RAN")
        .env_remove("KZ_AUDIT_LOG")
        .env("HOME", &home)
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .output()
        .unwrap();
    let o = assert_ok(&out);
    assert!(o.contains("AGENT-RAN"), "{o}");
    assert!(
        !home.join(".local/state/kz/audit.jsonl").exists(),
        "the log went to the agent's home"
    );
    let dir = std::fs::metadata("/var/lib/kz").unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o700));
    let log = std::fs::symlink_metadata("/var/lib/kz/audit.jsonl").unwrap();
    assert!(log.file_type().is_file());
    assert_eq!((log.uid(), log.mode() & 0o777), (0, 0o600));
}
