//! Kernel interception end to end (root): each test has its own cgroup, a client netns and an
//! upstream netns; clients are real programs (curl, dig, python) placed in the cgroup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use kz_agent::intercept::loader::KernelIds;
use kz_agent::intercept::{BlockReason, Cgroup, Cidr, Interceptor, Policy, UnixSockets};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::intercept::*;

fn py(ns: &support::netns::Netns, cg: Option<&Cgroup>, script: &str, args: &[&str]) -> String {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    let out = run_in(ns, cg, &python(), &all);
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_line(&out)
}

fn connect(
    ns: &support::netns::Netns,
    cg: Option<&Cgroup>,
    fam: &str,
    host: &str,
    mark: u32,
) -> String {
    py(
        ns,
        cg,
        PY_CONNECT,
        &[fam, host, &UPSTREAM_PORT.to_string(), &mark.to_string()],
    )
}

fn still_loaded(ids: &KernelIds) -> Vec<String> {
    let progs: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect();
    let maps: Vec<u32> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .map(|m| m.id())
        .collect();
    let links: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect();
    let mut left = Vec::new();
    left.extend(
        ids.programs
            .iter()
            .filter(|i| progs.contains(i))
            .map(|i| format!("program {i}")),
    );
    left.extend(
        ids.maps
            .iter()
            .filter(|i| maps.contains(i))
            .map(|i| format!("map {i}")),
    );
    left.extend(
        ids.links
            .iter()
            .filter(|i| links.contains(i))
            .map(|i| format!("link {i}")),
    );
    left
}

/// The kernel frees programs and maps after an RCU grace period: poll.
fn wait_all_gone(ids: &KernelIds) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = still_loaded(ids);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still in the kernel: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redirected_connect_reveals_original_destination_v4_and_v4_mapped() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let upstream_hits = topo.serve_upstream();
    let mut icpt = Interceptor::load().expect("load");
    let table = icpt.orig_dst_table();
    let port = topo.serve_redirect_target(move |peer| match table.take(peer) {
        Some(o) => format!("orig {} tgid {} cg {}", o.dest, o.tgid, o.cgroup_id),
        None => format!("no record for {peer}"),
    });
    let cg = icpt
        .create_cgroup(
            &support::unique_name("od"),
            &Policy {
                proxy_port: port,
                ..Policy::default()
            },
        )
        .expect("cgroup");

    let v4 = connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0);
    assert!(
        v4.starts_with(&format!("orig {UPSTREAM_IP}:{UPSTREAM_PORT} tgid ")),
        "v4 connect must land on the listener with its original destination, got {v4:?}"
    );
    assert!(v4.ends_with(&format!("cg {}", cg.id)), "{v4}");
    let mapped = connect(
        &topo.client,
        Some(&cg),
        "6",
        &format!("::ffff:{UPSTREAM_IP}"),
        0,
    );
    assert!(
        mapped.starts_with(&format!("orig {UPSTREAM_IP}:{UPSTREAM_PORT} tgid ")),
        "v4-mapped connect must take the v4 path, got {mapped:?}"
    );
    // getpeername() names what the process asked for, not kz's loopback port.
    let peer = py(
        &topo.client,
        Some(&cg),
        PY_CONNECT,
        &["4", UPSTREAM_IP, &UPSTREAM_PORT.to_string(), "0", "peer"],
    );
    assert!(
        peer.ends_with(&format!("peer {UPSTREAM_IP} {UPSTREAM_PORT}")),
        "{peer}"
    );
    let peer = py(
        &topo.client,
        Some(&cg),
        PY_CONNECT,
        &[
            "6",
            &format!("::ffff:{UPSTREAM_IP}"),
            &UPSTREAM_PORT.to_string(),
            "0",
            "peer",
        ],
    );
    assert!(
        peer.ends_with(&format!("peer ::ffff:{UPSTREAM_IP} {UPSTREAM_PORT}")),
        "{peer}"
    );
    assert!(
        upstream_hits.try_recv().is_err(),
        "nothing may reach the upstream directly"
    );
}

#[test]
fn denied_cidr_fails_with_eperm_at_once_and_reports_pid_and_comm() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let upstream_hits = topo.serve_upstream();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut icpt = Interceptor::load().expect("load");
    let mut events = icpt.block_events().expect("events");
    let cg = icpt
        .create_cgroup(
            &support::unique_name("dn"),
            &Policy {
                proxy_port: 1,
                deny: vec!["10.231.0.0/24".parse::<Cidr>().unwrap()],
                ..Policy::default()
            },
        )
        .expect("cgroup");

    let mut cmd = topo.client.command("curl");
    cmd.args([
        "-sS",
        "--connect-timeout",
        "5",
        &format!("http://{UPSTREAM_IP}:{UPSTREAM_PORT}/"),
    ]);
    cg.place_child(&mut cmd).unwrap();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl must fail to connect: {stderr}"
    );
    // curl reports how long the failed connect took ("... after N ms: ..."): measured inside
    // curl, so a slow process start on a busy machine does not count.
    let ms: u64 = stderr
        .split("after ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no elapsed time in curl's error: {stderr}"));
    assert!(ms < 1000, "EPERM must be immediate, took {ms} ms: {stderr}");
    // (glibc first asks nscd over its unix socket, refused too: skip that event.)
    let block = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let b = events.next().await.expect("event");
                    if b.proto != "unix" {
                        return b;
                    }
                }
            })
            .await
        })
        .expect("a block event within 5s");
    assert_eq!(block.tgid, pid, "event carries curl's pid");
    assert_eq!(block.comm, "curl");
    assert_eq!(block.cgroup_id, cg.id);
    assert_eq!(
        block.dest,
        format!("{UPSTREAM_IP}:{UPSTREAM_PORT}")
            .parse::<SocketAddr>()
            .unwrap()
    );
    assert_eq!(block.reason, BlockReason::DenyCidr);
    assert_eq!(block.proto, "tcp");

    // Python's errno is the kernel's: EPERM (1). Native IPv6 is denied by default policy.
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    assert_eq!(connect(&topo.client, Some(&cg), "6", "fd00::2", 0), "ERR 1");
    let v6 = rt.block_on(async {
        loop {
            let b = events.next().await.unwrap();
            if b.reason == BlockReason::Ipv6Denied {
                return b;
            }
        }
    });
    assert_eq!(v6.dest, "[fd00::2]:8080".parse::<SocketAddr>().unwrap());

    // Raw sockets would bypass the hooks: refused at creation inside, fine outside.
    assert_eq!(py(&topo.client, Some(&cg), PY_RAW, &[]), "ERR 1");
    assert_eq!(py(&topo.client, None, PY_RAW, &[]), "CREATED");
    let raw = rt.block_on(async {
        loop {
            let b = events.next().await.unwrap();
            if b.reason == BlockReason::RawSocketDenied {
                return b;
            }
        }
    });
    assert_eq!(raw.proto, "icmp");
    assert!(
        upstream_hits.try_recv().is_err(),
        "nothing may reach the upstream"
    );
}

#[test]
fn dns_to_any_resolver_is_answered_by_kz_and_other_udp_is_refused() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let dns = support::dns::TestDns::loopback(
        &topo.client,
        support::dns::Zone::new(60).host("example.test", &["10.231.0.77"]),
    );
    let dns_port = dns.addr.port();
    let mut icpt = Interceptor::load().expect("load");
    let cg = icpt
        .create_cgroup(
            &support::unique_name("dns"),
            &Policy {
                proxy_port: 1,
                dns_port,
                ..Policy::default()
            },
        )
        .expect("cgroup");
    // 10.231.0.53 is an address nobody has (inside the test topology): only kz can answer.
    let resolver = "10.231.0.53";

    // Python: the reply must appear to come from the resolver it asked.
    let line = py(&topo.client, Some(&cg), PY_DNS, &[resolver]);
    assert_eq!(line, format!("{resolver} 53 10.231.0.77"));
    let (name, from) = dns.first_question(Duration::from_secs(5)).unwrap();
    assert_eq!(name, "example.test A");
    assert!(
        from.ip().is_loopback(),
        "query reached the test resolver via loopback: {from}"
    );

    // The same through an AF_INET6 socket with a v4-mapped resolver (sendmsg6/recvmsg6).
    let line = py(
        &topo.client,
        Some(&cg),
        PY_DNS,
        &[&format!("::ffff:{resolver}")],
    );
    assert_eq!(line, format!("::ffff:{resolver} 53 10.231.0.77"));

    // dig: a real resolver client that checks the reply's source.
    let out = run_in(
        &topo.client,
        Some(&cg),
        "dig",
        &[
            &format!("@{resolver}"),
            "+tries=1",
            "+time=3",
            "example.test",
            "A",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dig failed: {text}");
    assert!(text.contains("status: NOERROR"), "{text}");
    assert!(
        text.contains("10.231.0.77"),
        "dig accepted the answer: {text}"
    );
    assert!(text.contains(&format!("SERVER: {resolver}#53")), "{text}");
    assert!(!text.contains("unexpected source"), "{text}");

    // A native IPv6 resolver is refused by default, and answered via [::1] when IPv6 is
    // intercepted.
    assert_eq!(py(&topo.client, Some(&cg), PY_DNS, &["fd00::53"]), "ERR 1");
    let v6_policy = Policy {
        ipv6: kz_agent::intercept::Ipv6Mode::Intercept,
        ..icpt.policy(cg.id).unwrap().clone()
    };
    icpt.set_policy(cg.id, &v6_policy).unwrap();
    assert_eq!(
        py(&topo.client, Some(&cg), PY_DNS, &["fd00::53"]),
        "fd00::53 53 10.231.0.77"
    );

    // Other UDP (e.g. QUIC) is refused with EPERM; outside the cgroup it is not.
    assert_eq!(
        py(&topo.client, Some(&cg), PY_UDP, &[UPSTREAM_IP, "443"]),
        "ERR 1"
    );
    assert_eq!(
        py(&topo.client, None, PY_UDP, &[UPSTREAM_IP, "443"]),
        "SENT"
    );
}

#[test]
fn processes_outside_the_cgroup_and_kz_marked_sockets_are_untouched() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let upstream_hits = topo.serve_upstream();
    let mut icpt = Interceptor::load().expect("load");
    let port = topo.serve_redirect_target(|_| "redirected".into());
    let cg = icpt
        .create_cgroup(
            &support::unique_name("ot"),
            &Policy {
                proxy_port: port,
                ..Policy::default()
            },
        )
        .expect("cgroup");
    // Control: inside the cgroup, interception is active.
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "redirected"
    );
    // Outside the cgroup: direct.
    assert_eq!(connect(&topo.client, None, "4", UPSTREAM_IP, 0), "upstream");
    upstream_hits.recv_timeout(Duration::from_secs(5)).unwrap();
    // The mark alone is not kz's: a (root) agent that sets KZ_SO_MARK itself is redirected
    // like any other socket. (Before sockets had to be registered this went out direct.)
    let mark = kz_common::KZ_SO_MARK;
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, mark),
        "redirected",
        "a socket with kz's mark set by plain setsockopt must not bypass interception"
    );
    assert!(upstream_hits.try_recv().is_err());
    // kz's own socket (mark_as_kz: the mark and a registration in the socket's storage),
    // used inside the cgroup: direct.
    assert_eq!(
        connect_held(&topo.client, &cg, |sock| {
            kz_agent::intercept::mark_as_kz(&sock).expect("mark_as_kz");
            let got = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::Mark).unwrap();
            assert_eq!(got, mark);
        }),
        "upstream"
    );
    upstream_hits.recv_timeout(Duration::from_secs(5)).unwrap();
    // A registered socket without the mark (someone cleared it) is not exempt either.
    assert_eq!(
        connect_held(&topo.client, &cg, |sock| {
            kz_agent::intercept::mark_as_kz(&sock).expect("mark_as_kz");
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &0).unwrap();
        }),
        "redirected"
    );
    // Any other mark is not kz's.
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 7),
        "redirected"
    );
}

/// Runs [`PY_CONNECT_HELD`] in `cg`: the socket is made inside the cgroup, handed to `prepare`
/// (a duplicate taken with pidfd_getfd, the same kernel socket), then connected to the upstream.
fn connect_held(
    ns: &support::netns::Netns,
    cg: &Cgroup,
    prepare: impl FnOnce(std::os::fd::OwnedFd),
) -> String {
    let mut cmd = ns.command(&python());
    cmd.args([
        "-c",
        PY_CONNECT_HELD,
        UPSTREAM_IP,
        &UPSTREAM_PORT.to_string(),
    ]);
    cg.place_child(&mut cmd).unwrap();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = reader(child.stdout.take().unwrap());
    let line = read_line(&mut out);
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"FD"), "{line:?}");
    prepare(take_fd(
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    ));
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let result = read_line(&mut out).trim().to_owned();
    assert!(child.wait().unwrap().success());
    result
}

fn spawn_hold(name: &str, extra: &[&str]) -> (std::process::Child, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["intercept", "hold", "--name", name])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kz intercept hold");
    let mut out = reader(child.stdout.take().unwrap());
    let line = read_line(&mut out);
    let desc: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("hold printed {line:?}: {e}"));
    // Keep reading (and discarding) so the holder never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::BufRead::read_line(&mut out, &mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
    });
    (child, desc)
}

fn cgroup_of(desc: &serde_json::Value) -> Cgroup {
    let path = std::path::PathBuf::from(desc["cgroup_path"].as_str().unwrap());
    Cgroup {
        id: desc["cgroup_id"].as_u64().unwrap(),
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        path,
    }
}

#[test]
fn sigkill_of_loader_leaves_cgroup_cut_off_and_restart_cleans_up() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let upstream_hits = topo.serve_upstream();
    // A scope of its own: other tests' loaders clean up dead instances of the default scope,
    // and this one must stay dead-but-pinned until the test's own cleanup.
    let scope = format!("kz-test-{}", support::unique_name("s"));
    // Nothing listens on the proxy port once kz is gone.
    let (mut holder, desc) = spawn_hold(
        &support::unique_name("sk"),
        &[
            "--proxy-port",
            "15999",
            "--scope",
            &scope,
            "--ports",
            "8080,443",
            "--allow",
            "10.231.0.0/24",
            "--deny",
            "fd00:dead::/32",
            "--unix-allow",
            "/run/kz-test.sock",
            "--unix-allow",
            "/run/kz-test/",
            "--unix-allow",
            "@kz-test",
        ],
    );
    let cg = cgroup_of(&desc);
    let pin_dir = std::path::PathBuf::from(desc["pin_dir"].as_str().unwrap());
    let shared_dir = std::path::PathBuf::from(desc["shared_dir"].as_str().unwrap());
    let ids: KernelIds = serde_json::from_value(desc["ids"].clone()).unwrap();
    assert_eq!(
        ids.links.len(),
        14,
        "ten sock_addr programs, sock_ops, sock_create and the two unix ones attached: {ids:?}"
    );
    assert!(
        !cgroup_entries(&shared_dir, cg.id).is_empty(),
        "the holder wrote its policy"
    );

    holder.kill().unwrap(); // SIGKILL
    holder.wait().unwrap();

    assert!(
        pin_dir.join("links").read_dir().unwrap().count() >= 14,
        "links stay pinned"
    );
    assert_eq!(
        still_loaded(&ids).len(),
        ids.programs.len() + ids.maps.len() + ids.links.len(),
        "programs, maps and links stay in the kernel"
    );
    // Every way out stays shut: the redirected connect finds no proxy, denied paths stay denied.
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "ERR 111"
    );
    let curl = run_in(
        &topo.client,
        Some(&cg),
        "curl",
        &[
            "-sS",
            "--connect-timeout",
            "3",
            &format!("http://{UPSTREAM_IP}:{UPSTREAM_PORT}/"),
        ],
    );
    assert!(!curl.status.success());
    assert_eq!(
        py(&topo.client, Some(&cg), PY_UDP, &[UPSTREAM_IP, "443"]),
        "ERR 1"
    );
    assert!(
        upstream_hits.try_recv().is_err(),
        "no direct connection may succeed"
    );

    // An orphan left in the cut-off cgroup.
    let mut orphan_cmd = topo.client.command("sleep");
    orphan_cmd.arg("60");
    cg.place_child(&mut orphan_cmd).unwrap();
    let mut orphan = orphan_cmd.spawn().unwrap();

    // A restarted kz (same scope) cleans up first: kills the orphan, then unpins and removes
    // everything the dead instance left.
    let (mut restarted, _) = spawn_hold(
        &support::unique_name("sk"),
        &["--proxy-port", "15999", "--scope", &scope],
    );
    let status = orphan.wait().unwrap();
    assert!(!status.success(), "the orphan was killed");
    assert!(!pin_dir.exists(), "links unpinned");
    assert!(!cg.path.exists(), "cgroup removed");
    wait_all_gone(&ids.own());
    assert_eq!(
        cgroup_entries(&shared_dir, cg.id),
        Vec::<String>::new(),
        "the dead instance's entries are gone from the shared maps"
    );
    assert!(
        still_loaded(&ids).len() >= ids.programs.len(),
        "the shared programs stay loaded for the next instance"
    );
    drop(restarted.stdin.take());
    assert!(restarted.wait().unwrap().success());
    unload_scope(&scope, cg.path.parent().unwrap().parent().unwrap());
}

/// Removes a test scope: its shared program set (`kz intercept unload`), then its directories.
fn unload_scope(scope: &str, cgroup_parent: &std::path::Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["intercept", "unload", "--scope", scope])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kz intercept unload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !report["removed"].as_array().unwrap().is_empty(),
        "the scope's set was removed: {report}"
    );
    std::fs::remove_dir(format!("/sys/fs/bpf/{scope}")).unwrap();
    let _ = std::fs::remove_dir(cgroup_parent);
}

/// Entries keyed by `cgroup_id` in the shared per-cgroup maps of the set in `shared_dir`, named
/// by map.
fn cgroup_entries(shared_dir: &std::path::Path, cgroup_id: u64) -> Vec<String> {
    use aya::maps::{HashMap, LpmTrie, Map, MapData};
    let open = |name: &str| {
        let data = MapData::from_pin(shared_dir.join("maps").join(name)).unwrap();
        Map::from_map_data(data).unwrap()
    };
    let mut found = Vec::new();
    let policy: HashMap<_, u64, kz_common::CgroupPolicy> =
        HashMap::try_from(open("KZ_POLICY")).unwrap();
    if policy.get(&cgroup_id, 0).is_ok() {
        found.push("KZ_POLICY".to_owned());
    }
    let ports: HashMap<_, kz_common::PortKey, u8> = HashMap::try_from(open("KZ_PORTS")).unwrap();
    if ports
        .keys()
        .filter_map(Result::ok)
        .any(|k| k.cgroup_id == cgroup_id)
    {
        found.push("KZ_PORTS".to_owned());
    }
    // Whether an LPM trie holds a key of this cgroup (`id` reads a key's cgroup id).
    fn trie_has<K: aya::Pod>(map: Map, cgroup_id: u64, id: impl Fn(&K) -> [u8; 8]) -> bool {
        let trie: LpmTrie<_, K, u8> = LpmTrie::try_from(map).unwrap();
        trie.keys()
            .filter_map(Result::ok)
            .any(|k| u64::from_be_bytes(id(&k.data())) == cgroup_id)
    }
    for name in ["KZ_ALLOW4", "KZ_DENY4"] {
        if trie_has(open(name), cgroup_id, |k: &kz_common::Lpm4| k.cgroup_id) {
            found.push(name.to_owned());
        }
    }
    for name in ["KZ_ALLOW6", "KZ_DENY6"] {
        if trie_has(open(name), cgroup_id, |k: &kz_common::Lpm6| k.cgroup_id) {
            found.push(name.to_owned());
        }
    }
    if trie_has(
        open("KZ_UNIX_PATHS"),
        cgroup_id,
        |k: &kz_common::UnixPathKey| k.cgroup_id,
    ) {
        found.push("KZ_UNIX_PATHS".to_owned());
    }
    // Whether a hash map holds a key of this cgroup (`id` reads a key's cgroup id).
    fn hash_has<K: aya::Pod, V: aya::Pod>(
        map: Map,
        cgroup_id: u64,
        id: impl Fn(&K) -> u64,
    ) -> bool {
        let hash: HashMap<_, K, V> = HashMap::try_from(map).unwrap();
        hash.keys()
            .filter_map(Result::ok)
            .any(|k| id(&k) == cgroup_id)
    }
    if hash_has::<_, u8>(
        open("KZ_UNIX_ABSTRACT"),
        cgroup_id,
        |k: &kz_common::UnixAbstractKey| k.cgroup_id,
    ) {
        found.push("KZ_UNIX_ABSTRACT".to_owned());
    }
    if hash_has::<_, u64>(open("KZ_ALLOWED_IPS"), cgroup_id, |k: &kz_common::IpKey| {
        k.cgroup_id
    }) {
        found.push("KZ_ALLOWED_IPS".to_owned());
    }
    found
}

#[test]
fn orderly_exit_leaves_no_links_maps_pins_or_cgroups() {
    if !support::require_root() {
        return;
    }
    // In process: drop the interceptor.
    let mut icpt = Interceptor::load().expect("load");
    let cg = icpt
        .create_cgroup(
            &support::unique_name("or"),
            &Policy {
                unix: UnixSockets::Only(vec![
                    "/run/kz-test.sock".parse().unwrap(),
                    "@kz-test".parse().unwrap(),
                ]),
                ..Policy::default()
            },
        )
        .expect("cgroup");
    let mut sleeper = Command::new("sleep");
    sleeper.arg("60");
    cg.place_child(&mut sleeper).unwrap();
    let mut sleeper = sleeper.spawn().unwrap();
    let ids = icpt.kernel_ids();
    assert_eq!(ids.programs.len(), 14);
    assert_eq!(
        ids.maps.len(),
        15,
        "the 14 kz maps and the event ring: {ids:?}"
    );
    assert_eq!(ids.links.len(), 14);
    let pin_dir = icpt.pin_dir().to_path_buf();
    let shared_dir = icpt.shared_dir().to_path_buf();
    let instance_cgroups = icpt.cgroup_dir().to_path_buf();
    assert!(pin_dir.join("links").exists());
    assert!(shared_dir.join("maps/KZ_POLICY").exists());
    let entries = cgroup_entries(&shared_dir, cg.id);
    assert!(
        entries.contains(&"KZ_UNIX_PATHS".to_owned())
            && entries.contains(&"KZ_UNIX_ABSTRACT".to_owned()),
        "{entries:?}"
    );
    drop(icpt);
    assert!(
        !sleeper.wait().unwrap().success(),
        "what was left in the cgroup is killed"
    );
    assert!(!pin_dir.exists(), "the instance's pins removed");
    assert!(
        !cg.path.exists() && !instance_cgroups.exists(),
        "cgroups removed"
    );
    wait_all_gone(&ids.own());
    assert_eq!(cgroup_entries(&shared_dir, cg.id), Vec::<String>::new());
    assert!(
        shared_dir.join("maps/KZ_POLICY").exists() && still_loaded(&ids).len() >= 14,
        "the shared set stays for the next instance"
    );

    // As its own process: closing stdin is the orderly stop.
    let (mut holder, desc) = spawn_hold(&support::unique_name("oh"), &["--proxy-port", "1"]);
    let ids: KernelIds = serde_json::from_value(desc["ids"].clone()).unwrap();
    let cg = cgroup_of(&desc);
    let pin_dir = std::path::PathBuf::from(desc["pin_dir"].as_str().unwrap());
    holder.stdin.take().unwrap().flush().unwrap(); // dropped here: EOF
    assert!(holder.wait().unwrap().success());
    assert!(!pin_dir.exists() && !cg.path.exists());
    wait_all_gone(&ids.own());
    assert_eq!(cgroup_entries(&shared_dir, cg.id), Vec::<String>::new());
}

#[test]
fn allow_map_entries_expire_and_policy_updates_apply_at_once() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let _upstream = topo.serve_upstream();
    let mut icpt = Interceptor::load().expect("load");
    let port = topo.serve_redirect_target(|_| "redirected".into());
    let upstream_ip: std::net::IpAddr = UPSTREAM_IP.parse().unwrap();
    let base = Policy {
        proxy_port: port,
        require_allow: true,
        ..Policy::default()
    };
    let cg = icpt
        .create_cgroup(&support::unique_name("al"), &base)
        .expect("cgroup");
    // `kz run --blind`'s setting: an IP kz's DNS did not hand out is unreachable.
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );

    let allow = icpt.allow_map();
    allow
        .allow_ip(cg.id, upstream_ip, Some(Duration::from_secs(4)))
        .unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "redirected"
    );
    std::thread::sleep(Duration::from_millis(4300));
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "ERR 1",
        "an expired entry no longer allows"
    );
    allow.allow_ip(cg.id, upstream_ip, None).unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "redirected"
    );
    allow.revoke_ip(cg.id, upstream_ip);
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );

    // The allow trie does the same for whole networks; deny wins over allow.
    let subnet: Cidr = "10.231.0.0/24".parse().unwrap();
    let allowed = Policy {
        allow: vec![subnet],
        ..base.clone()
    };
    icpt.set_policy(cg.id, &allowed).unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "redirected"
    );
    let denied = Policy {
        deny: vec![Cidr::host(upstream_ip)],
        ..allowed.clone()
    };
    icpt.set_policy(cg.id, &denied).unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );

    // Listed-ports mode: other ports connect directly.
    let listed = Policy {
        proxy_port: port,
        tcp: kz_agent::intercept::TcpRedirect::Ports(vec![9999]),
        ..Policy::default()
    };
    icpt.set_policy(cg.id, &listed).unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "upstream"
    );
    let listed = Policy {
        tcp: kz_agent::intercept::TcpRedirect::Ports(vec![UPSTREAM_PORT]),
        ..listed
    };
    icpt.set_policy(cg.id, &listed).unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        "redirected"
    );
}

#[test]
fn native_ipv6_is_intercepted_when_configured() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let _upstream = topo.serve_upstream();
    let mut icpt = Interceptor::load().expect("load");
    let table = icpt.orig_dst_table();
    // One dual-stack listener serves 127.0.0.1 and ::1 on the same port.
    let port = topo.client.serve_blocking(move |ready| {
        let l = std::net::TcpListener::bind("[::]:0").unwrap();
        ready.send(l.local_addr().unwrap().port()).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s.peer_addr().unwrap();
            let line = match table.take(peer) {
                Some(o) => format!("orig {}\n", o.dest),
                None => format!("no record for {peer}\n"),
            };
            let _ = s.write_all(line.as_bytes());
        }
    });
    let cg = icpt
        .create_cgroup(
            &support::unique_name("v6"),
            &Policy {
                proxy_port: port,
                ipv6: kz_agent::intercept::Ipv6Mode::Intercept,
                deny: vec!["fd00:dead::/32".parse().unwrap()],
                ..Policy::default()
            },
        )
        .expect("cgroup");
    assert_eq!(
        connect(&topo.client, Some(&cg), "6", "fd00::2", 0),
        "orig [fd00::2]:8080"
    );
    assert_eq!(
        connect(&topo.client, Some(&cg), "4", UPSTREAM_IP, 0),
        format!("orig {UPSTREAM_IP}:{UPSTREAM_PORT}"),
        "a v4 client seen by a dual-stack proxy as ::ffff:127.0.0.1 is found too"
    );
    assert_eq!(
        connect(&topo.client, Some(&cg), "6", "fd00:dead::1", 0),
        "ERR 1"
    );
}

#[test]
fn doctor_reports_every_check_and_passes_here() {
    if !support::require_root() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for row in [
        "kernel",
        "cgroup v2",
        "bpffs",
        "capabilities",
        "eBPF programs",
        "redirect+allow",
        "mark ownership",
        "inbound (bind)",
        "unix sockets",
        "build toolchain",
    ] {
        assert!(text.contains(row), "row {row} missing:\n{text}");
    }
    // This kernel (>= 6.7) enforces unix-socket rules, and says so.
    let unix = text
        .lines()
        .find(|l| l.starts_with("unix sockets"))
        .unwrap();
    assert!(
        unix.contains(" ok ") && unix.contains("connect_unix"),
        "{unix}"
    );
    assert!(
        out.status.success(),
        "kz doctor must pass on the CI machine:\n{text}"
    );
    assert!(text.contains("interception can work here"));
}

#[test]
fn a_nested_cgroup_is_refused_and_cleaned_up_with_its_parent() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let _upstream = topo.serve_upstream();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut icpt = Interceptor::load().expect("load");
    let mut events = icpt.block_events().unwrap();
    let port = topo.serve_redirect_target(|_| "redirected".into());
    let cg = icpt
        .create_cgroup(
            &support::unique_name("ne"),
            &Policy {
                proxy_port: port,
                ..Policy::default()
            },
        )
        .expect("cgroup");
    // A (root) agent makes itself a child cgroup: the programs still run there, and a cgroup
    // without a policy of its own gets nothing.
    let nested_path = cg.path.join("escape");
    std::fs::create_dir(&nested_path).unwrap();
    let nested = Cgroup {
        id: std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&nested_path).unwrap()),
        path: nested_path.clone(),
        name: "escape".into(),
    };
    assert_eq!(
        connect(&topo.client, Some(&nested), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    let block = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), events.next()).await })
        .expect("block event")
        .unwrap();
    assert_eq!(block.reason, BlockReason::NoPolicy);
    assert_eq!(block.cgroup_id, nested.id);

    // Orderly removal kills what hides in the child too, before anything is detached.
    let mut hidden = Command::new("sleep");
    hidden.arg("60");
    nested.place_child(&mut hidden).unwrap();
    let mut hidden = hidden.spawn().unwrap();
    drop(events);
    drop(icpt);
    assert!(
        !hidden.wait().unwrap().success(),
        "the hidden process was killed"
    );
    assert!(!nested_path.exists() && !cg.path.exists());
}

#[test]
fn one_loader_serves_many_cgroups_each_with_its_own_policy() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let _upstream = topo.serve_upstream();
    let mut icpt = Interceptor::load().expect("load");
    let port = topo.serve_redirect_target(|_| "redirected".into());
    let redirecting = icpt
        .create_cgroup(
            &support::unique_name("ma"),
            &Policy {
                proxy_port: port,
                ..Policy::default()
            },
        )
        .expect("cgroup a");
    let denying = icpt
        .create_cgroup(
            &support::unique_name("mb"),
            &Policy {
                proxy_port: port,
                deny: vec![Cidr::host(UPSTREAM_IP.parse().unwrap())],
                ..Policy::default()
            },
        )
        .expect("cgroup b");
    assert_eq!(icpt.cgroups().count(), 2);
    assert_eq!(
        connect(&topo.client, Some(&redirecting), "4", UPSTREAM_IP, 0),
        "redirected"
    );
    assert_eq!(
        connect(&topo.client, Some(&denying), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );

    // Removing one leaves the other guarded.
    icpt.remove_cgroup(redirecting.id).unwrap();
    assert!(!redirecting.path.exists());
    assert_eq!(
        connect(&topo.client, Some(&denying), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    assert!(matches!(
        icpt.remove_cgroup(redirecting.id),
        Err(kz_agent::intercept::InterceptError::UnknownCgroup(_))
    ));
    assert!(matches!(
        icpt.create_cgroup("../escape", &Policy::default()),
        Err(kz_agent::intercept::InterceptError::BadName(_))
    ));
}

#[test]
fn doctor_fails_and_says_what_to_do_without_privileges() {
    if !support::require_root() {
        return;
    }
    // The same binary as an unprivileged user (setpriv from util-linux).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_kz"))
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let caps = text
        .lines()
        .find(|l| l.starts_with("capabilities"))
        .unwrap();
    assert!(
        caps.contains("FAIL") && caps.contains("run kz as root"),
        "{caps}"
    );
    let progs = text
        .lines()
        .find(|l| l.starts_with("eBPF programs"))
        .unwrap();
    assert!(progs.contains("FAIL"), "{progs}");
    assert!(text.contains("interception cannot work here"));
}

#[test]
fn two_interceptors_in_one_process_keep_apart() {
    if !support::require_root() {
        return;
    }
    let mut a = Interceptor::load().expect("load a");
    let mut b = Interceptor::load().expect("load b");
    assert_ne!(a.pin_dir(), b.pin_dir());
    let ca = a.create_cgroup("same-name", &Policy::default()).unwrap();
    let cb = b.create_cgroup("same-name", &Policy::default()).unwrap();
    assert_ne!(ca.id, cb.id);
    assert_eq!(
        a.shared_dir(),
        b.shared_dir(),
        "one program set serves both"
    );
    assert_eq!(a.kernel_ids().programs, b.kernel_ids().programs);
    let a_pins = a.pin_dir().to_path_buf();
    drop(a);
    assert!(!a_pins.exists() && !ca.path.exists());
    assert!(
        b.pin_dir().join("links").exists()
            && b.shared_dir().join("maps/KZ_POLICY").exists()
            && cb.path.exists(),
        "b untouched"
    );
    assert_eq!(cgroup_entries(b.shared_dir(), cb.id), vec!["KZ_POLICY"]);
}

#[test]
fn later_instances_reuse_the_shared_set_and_each_hears_only_its_own_blocks() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let _upstream = topo.serve_upstream();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let deny = Policy {
        proxy_port: 1,
        deny: vec![Cidr::host(UPSTREAM_IP.parse().unwrap())],
        ..Policy::default()
    };
    let next = |events: &mut kz_agent::intercept::BlockEvents| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), events.next()).await })
            .expect("a block event within 5s")
            .expect("event")
    };

    let mut a = Interceptor::load().expect("load a");
    let mut b = Interceptor::load().expect("load b");
    assert_eq!(a.shared_dir(), b.shared_dir());
    assert_eq!(
        a.kernel_ids().programs,
        b.kernel_ids().programs,
        "the second instance opens the first one's programs"
    );
    let mut ea = a.block_events().unwrap();
    let mut eb = b.block_events().unwrap();
    let ca = a.create_cgroup(&support::unique_name("ra"), &deny).unwrap();
    let cb = b.create_cgroup(&support::unique_name("rb"), &deny).unwrap();

    assert_eq!(
        connect(&topo.client, Some(&ca), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    assert_eq!(next(&mut ea).cgroup_id, ca.id);
    assert_eq!(
        connect(&topo.client, Some(&cb), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    assert_eq!(next(&mut eb).cgroup_id, cb.id);
    // The kernel writes the event before the refused call returns: nothing else is coming.
    assert_eq!(ea.try_next(), None, "a hears nothing of b's cgroup");
    assert_eq!(eb.try_next(), None, "b hears nothing of a's cgroup");

    // A block a never reads, then a goes away: its ring is reused by a later instance, which
    // must not report a's leftovers as its own.
    assert_eq!(
        connect(&topo.client, Some(&ca), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    let programs = a.kernel_ids().programs;
    drop(ea);
    drop(a);
    let mut c = Interceptor::load().expect("load c");
    assert_eq!(
        c.kernel_ids().programs,
        programs,
        "the set outlives its users"
    );
    let mut ec = c.block_events().unwrap();
    let cc = c.create_cgroup(&support::unique_name("rc"), &deny).unwrap();
    assert_eq!(
        connect(&topo.client, Some(&cc), "4", UPSTREAM_IP, 0),
        "ERR 1"
    );
    assert_eq!(next(&mut ec).cgroup_id, cc.id);
    assert_eq!(ec.try_next(), None);
}

#[test]
fn a_program_set_of_another_build_is_never_used() {
    if !support::require_root() {
        return;
    }
    let root = kz_agent::intercept::cgroups::cgroup2_root().unwrap();
    let scope_name = format!("kz-test-{}", support::unique_name("b"));
    let scope = kz_agent::intercept::Scope::new(&root, &scope_name).unwrap();
    let first = Interceptor::load_in(&scope).expect("load");
    let first_programs = first.kernel_ids().programs;
    let ours = first.shared_dir().to_path_buf();
    drop(first);
    // Disguise this build's set as another build's (same layout, other name).
    let other = scope.pin_root().join("shared-0123456789abcdef");
    std::fs::rename(&ours, &other).unwrap();

    let second = Interceptor::load_in(&scope).expect("load again");
    assert_eq!(second.shared_dir(), ours, "this build's own set name");
    let second_programs = second.kernel_ids().programs;
    assert!(
        first_programs.iter().all(|p| !second_programs.contains(p)),
        "the other build's programs are not reused: {first_programs:?} vs {second_programs:?}"
    );
    assert!(
        !other.exists(),
        "another build's set is removed when this one loads its own"
    );
    drop(second);
    unload_scope(&scope_name, &scope.cgroup_parent());
}

#[test]
fn concurrent_first_starts_share_one_program_set_and_unload_waits_for_them() {
    if !support::require_root() {
        return;
    }
    let scope = format!("kz-test-{}", support::unique_name("c"));
    // Started together in a scope with no program set yet: every one of them wants to create it.
    let mut holders: Vec<std::process::Child> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_kz"))
                .args(["intercept", "hold", "--scope", &scope, "--name"])
                .arg(support::unique_name("cc"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn kz intercept hold")
        })
        .collect();
    // The readers stay open until the holders exit (they print a last line on the way out).
    let mut outs: Vec<_> = holders
        .iter_mut()
        .map(|h| reader(h.stdout.take().unwrap()))
        .collect();
    let descs: Vec<serde_json::Value> = outs
        .iter_mut()
        .map(|out| {
            let line = read_line(out);
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("hold printed {line:?}: {e}"))
        })
        .collect();
    let programs: Vec<KernelIds> = descs
        .iter()
        .map(|d| serde_json::from_value(d["ids"].clone()).unwrap())
        .collect();
    for (d, ids) in descs.iter().zip(&programs) {
        assert_eq!(d["shared_dir"], descs[0]["shared_dir"]);
        assert_eq!(ids.programs, programs[0].programs, "one loaded set for all");
        assert_eq!(ids.links.len(), 14);
    }
    let sets: Vec<String> = std::fs::read_dir(format!("/sys/fs/bpf/{scope}"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.contains("shared-"))
        .collect();
    assert_eq!(
        sets.len(),
        1,
        "exactly one set, no half-made ones: {sets:?}"
    );

    // The set is in use: unload refuses and names the users.
    let out = Command::new(env!("CARGO_BIN_EXE_kz"))
        .args(["intercept", "unload", "--scope", &scope])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("are running"), "{err}");
    assert!(std::path::Path::new(descs[0]["shared_dir"].as_str().unwrap()).exists());

    for mut h in holders {
        drop(h.stdin.take());
        assert!(h.wait().unwrap().success());
    }
    drop(outs);
    for ids in &programs {
        wait_all_gone(&ids.own());
    }
    let cg = cgroup_of(&descs[0]);
    unload_scope(&scope, cg.path.parent().unwrap().parent().unwrap());
    // Nothing of the set is left in the kernel once it is unpinned and unused.
    wait_all_gone(&KernelIds {
        programs: programs[0].programs.clone(),
        ..KernelIds::default()
    });
}

#[test]
fn a_child_spawned_into_the_cgroup_is_there_from_its_first_instruction() {
    if !support::require_root() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut icpt = Interceptor::load().expect("load");
    let cg = icpt
        .create_cgroup(&support::unique_name("sp"), &Policy::default())
        .expect("cgroup");
    let out = tempfile::NamedTempFile::new().unwrap();
    // What the program sees of its cgroup as its very first action, and its exit code.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"cat /proc/self/cgroup > "$OUT"; exit 7"#)
        .env("OUT", out.path());
    let mut child = cg
        .spawn(&cmd, None)
        .expect("clone3 into the cgroup works on this kernel");
    let status = rt.block_on(child.wait()).unwrap();
    assert_eq!(status.code(), Some(7));
    let seen = std::fs::read_to_string(out.path()).unwrap();
    let rel = cg.path.strip_prefix(icpt.cgroup_root()).unwrap();
    assert!(
        seen.lines().any(|l| l == format!("0::/{}", rel.display())),
        "the child was in {} from the start: {seen}",
        cg.path.display()
    );
    // Errors are Command::spawn's: a missing program is NotFound (kz run exits 127 on it).
    let err = cg
        .spawn(&Command::new("kz-no-such-program"), None)
        .err()
        .expect("no such program");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(cg.pids().unwrap().is_empty(), "nothing left behind");
}

/// Starts [`PY_LISTEN`] in `cg`; returns the child and its "LISTEN <addr> <port>" or "ERR" line.
fn listen_in(
    ns: &support::netns::Netns,
    cg: &Cgroup,
    fam: &str,
    host: &str,
) -> (std::process::Child, String) {
    let mut cmd = ns.command(&python());
    cmd.args(["-c", PY_LISTEN, fam, host, "0"]);
    cg.place_child(&mut cmd).unwrap();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let line = read_line(&mut reader(child.stdout.take().unwrap()))
        .trim()
        .to_owned();
    (child, line)
}

/// Connects to `addr` from the network namespace `ns` (a thread of this process there) and
/// returns the first line read, or the error kind.
fn reach_from(ns: &support::netns::Netns, addr: SocketAddr) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let got = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => {
                let mut line = String::new();
                let _ = std::io::BufRead::read_line(&mut reader(s), &mut line);
                line.trim().to_owned()
            }
            Err(e) => format!("{:?}", e.kind()),
        };
        let _ = tx.send(got);
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

fn port_of(line: &str) -> u16 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn an_agent_listens_on_loopback_only() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut icpt = Interceptor::load().expect("load");
    let mut events = icpt.block_events().expect("events");
    let cg = icpt
        .create_cgroup(
            &support::unique_name("li"),
            &Policy {
                proxy_port: 1,
                ..Policy::default()
            },
        )
        .expect("cgroup");
    let bind = |fam: &str, proto: &str, host: &str, port: &str| {
        py(&topo.client, Some(&cg), PY_BIND, &[fam, proto, host, port])
    };

    // A server on a specific outside address: EPERM, reported with pid, comm, address, port.
    let mut cmd = topo.client.command(&python());
    cmd.args(["-c", PY_BIND, "4", "tcp", CLIENT_IP, "18080"]);
    cg.place_child(&mut cmd).unwrap();
    let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        stdout_line(&out),
        "ERR 1",
        "bind to {CLIENT_IP} must be refused"
    );
    let block = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), events.next()).await })
        .expect("a block event within 5s")
        .unwrap();
    assert_eq!(block.reason, BlockReason::BindDenied);
    assert_eq!((block.tgid, block.comm.as_str()), (pid, "python3"));
    assert_eq!(
        block.dest,
        format!("{CLIENT_IP}:18080").parse::<SocketAddr>().unwrap()
    );
    assert_eq!(block.proto, "tcp");

    // The wildcard address is rewritten to loopback: dev servers keep working on this machine.
    assert_eq!(
        bind("4", "tcp", "0.0.0.0", "0").split(' ').nth(1),
        Some("127.0.0.1")
    );
    assert_eq!(bind("6", "tcp", "::", "0").split(' ').nth(1), Some("::1"));
    assert_eq!(
        bind("6", "tcp", "::ffff:0.0.0.0", "0").split(' ').nth(1),
        Some("::ffff:127.0.0.1"),
        "v4-mapped takes the v4 rules"
    );
    assert_eq!(
        bind("6", "tcp", &format!("::ffff:{CLIENT_IP}"), "0"),
        "ERR 1"
    );
    assert_eq!(bind("6", "tcp", "fd00::1", "0"), "ERR 1");
    assert!(bind("4", "tcp", "127.0.0.1", "0").starts_with("BOUND 127.0.0.1 "));
    // UDP: a client's source port anywhere is fine; a server port outside loopback is not.
    assert!(bind("4", "udp", "0.0.0.0", "0").starts_with("BOUND 0.0.0.0 "));
    assert!(bind("4", "udp", CLIENT_IP, "0").starts_with(&format!("BOUND {CLIENT_IP} ")));
    assert_eq!(bind("4", "udp", CLIENT_IP, "15353"), "ERR 1");
    assert_eq!(bind("4", "udp", "0.0.0.0", "15353"), "ERR 1");
    assert_eq!(
        bind("6", "udp", &format!("::ffff:{CLIENT_IP}"), "15353"),
        "ERR 1"
    );
    assert_eq!(
        bind("4", "udp", "127.0.0.1", "15353"),
        "BOUND 127.0.0.1 15353"
    );

    // A real listener on the wildcard address: reachable from this machine, not from another.
    let (mut server, line) = listen_in(&topo.client, &cg, "4", "0.0.0.0");
    assert!(line.starts_with("LISTEN 127.0.0.1 "), "{line}");
    let port = port_of(&line);
    let outside: SocketAddr = format!("{CLIENT_IP}:{port}").parse().unwrap();
    assert_eq!(reach_from(&topo.upstream, outside), "ConnectionRefused");
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(reach_from(&topo.client, local), "hello");
    drop(server.stdin.take());
    server.wait().unwrap();

    // listen() without bind() lets the kernel bind the wildcard address (no bind hook runs):
    // the listener is confined to the loopback device instead.
    for fam in ["4", "6"] {
        let (mut server, line) = listen_in(&topo.client, &cg, fam, "-");
        assert!(line.starts_with("LISTEN "), "{line}");
        let port = port_of(&line);
        let outside: SocketAddr = format!("{CLIENT_IP}:{port}").parse().unwrap();
        assert_ne!(reach_from(&topo.upstream, outside), "hello", "family {fam}");
        let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(reach_from(&topo.client, local), "hello", "family {fam}");
        drop(server.stdin.take());
        server.wait().unwrap();
    }
}

/// The next event about a unix socket, within 5 s.
fn next_unix(
    rt: &tokio::runtime::Runtime,
    events: &mut kz_agent::intercept::BlockEvents,
) -> kz_agent::intercept::Block {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let b = events.next().await.expect("event");
                if b.proto == "unix" {
                    return b;
                }
            }
        })
        .await
    })
    .expect("a unix block event within 5s")
}

#[test]
fn unix_sockets_outside_the_allow_list_are_refused() {
    if !support::require_root() {
        return;
    }
    let topo = Topo::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut icpt = Interceptor::load().expect("load");
    assert_eq!(
        icpt.unix_guard(),
        &kz_agent::intercept::UnixGuard::Enforced,
        "this kernel has the unix hooks"
    );
    let mut events = icpt.block_events().expect("events");
    // A docker-like daemon socket (a real listening server outside the cgroup) and an allowed
    // one, in directories of their own; an abstract one in the agent's network namespace.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let allowed_dir = dir.path().join("allowed");
    std::fs::create_dir(&run).unwrap();
    std::fs::create_dir(&allowed_dir).unwrap();
    let docker = run.join("docker.sock");
    let app = run.join("app.sock");
    let in_dir = allowed_dir.join("svc.sock");
    for (path, reply) in [(&docker, "docker"), (&app, "app"), (&in_dir, "svc")] {
        serve_unix_stream(path.to_str().unwrap(), reply);
    }
    let dgram = run.join("log.sock");
    let _dgram_server = std::os::unix::net::UnixDatagram::bind(&dgram).unwrap();
    let abstract_name = format!("@kz-test-{}", support::unique_name("ab"));
    let allowed_abstract = format!("{abstract_name}-ok");
    let (a, b) = (abstract_name.clone(), allowed_abstract.clone());
    topo.client.serve_blocking(move |ready| {
        serve_unix_stream(&a, "abstract");
        serve_unix_stream(&b, "abstract-ok");
        ready.send(()).unwrap();
        std::thread::park();
    });
    let docker_s = docker.to_str().unwrap();
    // Control: outside the cgroup everything answers.
    assert_eq!(
        py(&topo.client, None, PY_UNIX, &["stream", docker_s]),
        "docker"
    );
    assert_eq!(
        py(&topo.client, None, PY_UNIX, &["stream", &abstract_name]),
        "abstract"
    );

    let cg = icpt
        .create_cgroup(
            &support::unique_name("ux"),
            &Policy {
                proxy_port: 1,
                unix: UnixSockets::Only(vec![
                    app.to_str().unwrap().parse().unwrap(),
                    format!("{}/", allowed_dir.display()).parse().unwrap(),
                    allowed_abstract.parse().unwrap(),
                ]),
                ..Policy::default()
            },
        )
        .expect("cgroup");
    let unix = |args: &[&str]| py(&topo.client, Some(&cg), PY_UNIX, args);

    // The daemon socket: EPERM, reported with pid, comm and the path.
    let mut cmd = topo.client.command(&python());
    cmd.args(["-c", PY_UNIX, "stream", docker_s]);
    cg.place_child(&mut cmd).unwrap();
    let child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        stdout_line(&out),
        "ERR 1",
        "the daemon socket must be refused"
    );
    let block = next_unix(&rt, &mut events);
    assert_eq!(block.reason, BlockReason::UnixDenied);
    assert_eq!((block.tgid, block.comm.as_str()), (pid, "python3"));
    assert_eq!(block.path.as_deref(), Some(docker_s));
    assert_eq!((block.op, block.cgroup_id), ("unix_connect", cg.id));

    // What the rules allow still connects: an exact path, a socket below an allowed directory,
    // an allowed abstract name.
    assert_eq!(unix(&["stream", app.to_str().unwrap()]), "app");
    assert_eq!(unix(&["stream", in_dir.to_str().unwrap()]), "svc");
    assert_eq!(unix(&["stream", &allowed_abstract]), "abstract-ok");

    // Another abstract name: refused, and named in the event.
    assert_eq!(unix(&["stream", &abstract_name]), "ERR 1");
    assert_eq!(
        next_unix(&rt, &mut events).path.as_deref(),
        Some(abstract_name.as_str())
    );
    // Datagrams: an addressed send and a connect() of a datagram socket are checked too.
    assert_eq!(unix(&["dgram", dgram.to_str().unwrap()]), "ERR 1");
    assert_eq!(next_unix(&rt, &mut events).op, "unix_send");

    // Other names for sockets: a relative path and `..` are refused even for an allowed socket
    // (they could name anything), and so is a symlink the agent plants outside the rules.
    let run_s = run.to_str().unwrap();
    assert_eq!(unix(&["stream", "app.sock", run_s]), "ERR 1");
    assert_eq!(
        next_unix(&rt, &mut events).path.as_deref(),
        Some("app.sock")
    );
    let dotdot = format!("{}/../allowed/svc.sock", run.display());
    assert_eq!(unix(&["stream", &dotdot]), "ERR 1");
    let twice = format!("{}//app.sock", run.display());
    assert_eq!(unix(&["stream", &twice]), "ERR 1");
    let planted = dir.path().join("innocent.sock");
    std::os::unix::fs::symlink(&docker, &planted).unwrap();
    assert_eq!(unix(&["stream", planted.to_str().unwrap()]), "ERR 1");
    // The agent's own server is reached like any other: refused outside the rules, fine inside
    // (an allowed directory must be one the agent cannot write, see docs/architecture.md).
    let own = run.join("own.sock");
    assert_eq!(
        py(
            &topo.client,
            Some(&cg),
            PY_UNIX_SELF,
            &[own.to_str().unwrap()]
        ),
        "ERR 1"
    );
    let own_ok = allowed_dir.join("own.sock");
    assert_eq!(
        py(
            &topo.client,
            Some(&cg),
            PY_UNIX_SELF,
            &[own_ok.to_str().unwrap()]
        ),
        "own"
    );

    // Removing the rules closes the allowed paths too; UnixSockets::Any opens everything.
    let mut policy = icpt.policy(cg.id).unwrap().clone();
    policy.unix = UnixSockets::Only(Vec::new());
    icpt.set_policy(cg.id, &policy).unwrap();
    assert_eq!(unix(&["stream", app.to_str().unwrap()]), "ERR 1");
    policy.unix = UnixSockets::Any;
    icpt.set_policy(cg.id, &policy).unwrap();
    assert_eq!(unix(&["stream", docker_s]), "docker");
}

// ---- The shared allowed-IP map under a sandbox that resolves without end (issue 14) ----

/// Sends one DNS A query per name `h<i>.<suffix>` (i in 0..n) to argv[3]:53, with EDNS so a
/// big answer fits one datagram, and prints how many answers came back with each rcode
/// (`0:…` NOERROR, `2:…` SERVFAIL, `T:…` no answer in time), e.g. "0:64 2:1036".
const PY_FLOOD: &str = r#"
import socket, struct, sys
n, suffix, server = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
counts = {}
for i in range(n):
    name = "h%d.%s" % (i, suffix)
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q = struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 1) + qname + b"\x00\x01\x00\x01"
    q += b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    s.sendto(q, (server, 53))
    try:
        while True:
            data, _ = s.recvfrom(65535)
            if data[:2] == q[:2]:
                break
        key = str(data[3] & 0x0f)
    except socket.timeout:
        key = "T"
    counts[key] = counts.get(key, 0) + 1
print(" ".join("%s:%d" % kv for kv in sorted(counts.items())))
"#;

/// What an agent does: getaddrinfo (glibc's stub resolver, whatever /etc/resolv.conf names:
/// the kernel sends it to the sandbox's resolver), connect, one HTTP request. Prints the status
/// line, "RESOLVE_FAILED <errno>" or "ERR <errno>".
const PY_RESOLVE_AND_GET: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
except socket.gaierror as e:
    print("RESOLVE_FAILED", e.errno)
    sys.exit(0)
try:
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(("GET / HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (host, port)).encode())
    print(s.makefile("rb").readline().decode().strip())
except OSError as e:
    print("ERR", e.errno)
"#;

/// A program run in `cgroup`, inside the network namespace at `netns` (with a timeout).
fn run_in_cgroup(netns: &std::path::Path, cgroup: &Cgroup, script: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(["--", &python(), "-c", script])
        .args(args);
    cgroup.place_child(&mut cmd).expect("place child");
    let out = output_with_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_line(&out)
}

/// Entries of the allowed-IP map of the set in `shared_dir`: (those of `cgroup_id`, all).
fn allowed_entries(shared_dir: &std::path::Path, cgroup_id: u64) -> (usize, usize) {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(shared_dir.join("maps").join("KZ_ALLOWED_IPS")).unwrap();
    let map: HashMap<_, kz_common::IpKey, u64> =
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let keys: Vec<kz_common::IpKey> = map.keys().filter_map(Result::ok).collect();
    let own = keys.iter().filter(|k| k.cgroup_id == cgroup_id).count();
    (own, keys.len())
}

/// A sandbox spec for the quota tests: `allow` is its one connection rule.
fn quota_spec(
    allow: &str,
    dns: SocketAddr,
    quota: usize,
    ttl_floor: Duration,
) -> (
    kz_agent::sandbox::SandboxSpec,
    std::sync::Arc<kz_agent::audit::MemorySink>,
) {
    use kz_agent::proxy::{
        CertAuthority, ConnectionRule, ConnectionRules, HostPattern, TokenTable,
    };
    let audit = std::sync::Arc::new(kz_agent::audit::MemorySink::new());
    let spec = kz_agent::sandbox::SandboxSpec {
        name: support::unique_name("q"),
        ca: std::sync::Arc::new(CertAuthority::generate(16).unwrap()),
        tokens: TokenTable::new(),
        rules: ConnectionRules(vec![ConnectionRule::allow(
            HostPattern::host(allow).unwrap(),
        )]),
        refuse_out_of_scope: false,
        dns_upstream: dns,
        ipv6: false,
        udp: false,
        listen: kz_agent::intercept::Listen::Loopback,
        unix: UnixSockets::Any,
        audit: audit.clone(),
        echo_blocks: false,
        max_allowed_ips: quota,
        dns_ttl_floor: ttl_floor,
        existing_cgroup: None,
    };
    (spec, audit)
}

/// The quota tests' layout: a test DNS server answering `*.flood.test` with 64 new addresses per
/// name and `b.ok.test` with the upstream, whose HTTP server answers 200 on UPSTREAM_PORT.
struct FloodTopo {
    topo: Topo,
    dns: support::dns::TestDns,
    _web: support::upstream::Upstream,
}

fn flood_topo(ttl: u32) -> FloodTopo {
    use support::dns::{TestDns, Zone};
    use support::upstream::{Routes, Upstream};
    let topo = Topo::new();
    let zone = Zone::new(ttl)
        .wildcard("flood.test", 64)
        .host("b.ok.test", &[UPSTREAM_IP]);
    let dns = TestDns::start(
        &topo.upstream,
        format!("{UPSTREAM_IP}:53").parse().unwrap(),
        zone,
    );
    let web = Upstream::start(
        Some(&topo.upstream),
        &[(
            format!("{UPSTREAM_IP}:{UPSTREAM_PORT}").parse().unwrap(),
            None,
        )],
        Routes::fixed(200, "b reached the upstream\n"),
    );
    FloodTopo {
        topo,
        dns,
        _web: web,
    }
}

/// Runs `body` on a thread in the client namespace, inside a tokio runtime, with a node started
/// on an interceptor of a scope of its own (the map a test fills is not the one other tests and
/// kz runs use; the scope is removed afterwards, whatever happened). `body` gets the node, the
/// shared set's directory and the netns path, and must close what it admits.
fn on_own_node<R: Send + 'static>(
    topo: &Topo,
    purge: Duration,
    body: impl AsyncFnOnce(&kz_agent::sandbox::Node, std::path::PathBuf, std::path::PathBuf) -> R
    + Send
    + 'static,
) -> R {
    use kz_agent::sandbox::{Node, NodeOptions};
    let root = kz_agent::intercept::cgroups::cgroup2_root().unwrap();
    let scope_name = format!("kz-test-{}", support::unique_name("q"));
    let scope = kz_agent::intercept::Scope::new(&root, &scope_name).unwrap();
    let icpt = Interceptor::load_in(&scope).expect("load");
    let shared_dir = icpt.shared_dir().to_path_buf();
    let netns = topo.client.path();
    let outcome = topo
        .client
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let node = Node::start(NodeOptions {
                    kernel: Some(icpt),
                    ipv6: false,
                    upstream_ca: None,
                    limits: kz_agent::proxy::Limits::default(),
                    audit: std::sync::Arc::new(kz_agent::audit::MemorySink::new()),
                    allowed_ip_purge: purge,
                })
                .await
                .unwrap();
                let r = body(&node, shared_dir, netns).await;
                node.shutdown().await;
                r
            })
        })
        .join();
    unload_scope(&scope_name, &scope.cgroup_parent());
    outcome.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// What the flood test saw, gathered inside the client namespace and checked outside it (so
/// the node and the scope are cleaned up whatever the outcome).
#[derive(Debug)]
struct FloodSeen {
    flood: String,
    a_entries: usize,
    map_entries: usize,
    b_get: String,
    a_audit: Vec<kz_agent::audit::AuditEvent>,
}

#[test]
fn a_sandbox_resolving_endless_names_cannot_fill_the_allowed_ip_map_for_others() {
    if !support::require_root() {
        return;
    }
    use kz_agent::intercept::allowed::DEFAULT_QUOTA;
    use kz_agent::sandbox::TTL_FLOOR;
    // 1100 names of 64 new addresses each offer 70400, more than the whole map held before the
    // quota (65536).
    let t = flood_topo(300);
    let dns = t.dns.addr;
    let seen = on_own_node(
        &t.topo,
        Duration::from_secs(30),
        async move |node, shared, netns| {
            let (spec_a, audit_a) = quota_spec("*.flood.test", dns, DEFAULT_QUOTA, TTL_FLOOR);
            let a = node.admit(spec_a).await.unwrap();
            let b = node
                .admit(quota_spec("b.ok.test", dns, DEFAULT_QUOTA, TTL_FLOOR).0)
                .await
                .unwrap();
            let cg_a = a.cgroup().unwrap().clone();
            let cg_b = b.cgroup().unwrap().clone();
            // The attacker: a real process in A resolving name after name.
            let flood = run_in_cgroup(
                &netns,
                &cg_a,
                PY_FLOOD,
                &["1100", "flood.test", UPSTREAM_IP],
            );
            let (a_entries, map_entries) = allowed_entries(&shared, cg_a.id);
            // Another run on the node, afterwards: resolves its one name and connects.
            let b_get = run_in_cgroup(
                &netns,
                &cg_b,
                PY_RESOLVE_AND_GET,
                &["b.ok.test", &UPSTREAM_PORT.to_string()],
            );
            node.close(a).await;
            node.close(b).await;
            FloodSeen {
                flood,
                a_entries,
                map_entries,
                b_get,
                a_audit: audit_a.events(),
            }
        },
    );
    eprintln!("{seen:?}");

    assert_eq!(
        seen.b_get, "HTTP/1.1 200 OK",
        "sandbox B could not resolve and reach its allowed host after A's flood ({seen:?})"
    );
    assert!(
        seen.a_entries <= DEFAULT_QUOTA,
        "A holds {} allowed-IP entries, more than its quota ({seen:?})",
        seen.a_entries
    );
    // Exactly the answers that fit the quota were opened; every later one got SERVFAIL.
    assert_eq!(seen.flood, "0:64 2:1036");
    assert_eq!((seen.a_entries, seen.map_entries), (4096, 4096));
    // 1036 refusals, one burst: one record when it began, one when the sandbox closed with the
    // count of the rest.
    let records: Vec<_> = seen
        .a_audit
        .iter()
        .filter(|e| e.kind == "allowed_ip_quota")
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    let first = &records[0].fields;
    assert_eq!(first["name"], "h64.flood.test");
    assert_eq!(first["reason"], "over_quota");
    assert_eq!(first["refused"], 1);
    assert_eq!(first["open"], 4096);
    assert_eq!(first["wanted"], 64);
    assert_eq!(first["quota"], 4096);
    assert!(first["sandbox"].as_str().unwrap().starts_with('q'));
    let last = &records[1].fields;
    assert_eq!(last["reason"], "refusals_since_last_record");
    assert_eq!(last["refused"], 1035);
}

#[test]
fn expired_allowed_ips_are_purged_from_the_kernel_map_on_the_nodes_timer() {
    if !support::require_root() {
        return;
    }
    // Records live 1 s; A's floor is 1 s, B's the usual 300 s. The node purges every second.
    let t = flood_topo(1);
    let dns = t.dns.addr;
    let seen = on_own_node(
        &t.topo,
        Duration::from_secs(1),
        async move |node, shared, netns| {
            let a = node
                .admit(quota_spec("*.flood.test", dns, 64, Duration::from_secs(1)).0)
                .await
                .unwrap();
            let b = node
                .admit(quota_spec("b.ok.test", dns, 64, Duration::from_secs(300)).0)
                .await
                .unwrap();
            let cg_a = a.cgroup().unwrap().clone();
            let cg_b = b.cgroup().unwrap().clone();
            let first = run_in_cgroup(&netns, &cg_a, PY_FLOOD, &["1", "flood.test", UPSTREAM_IP]);
            let b_get = run_in_cgroup(
                &netns,
                &cg_b,
                PY_RESOLVE_AND_GET,
                &["b.ok.test", &UPSTREAM_PORT.to_string()],
            );
            let before = (
                allowed_entries(&shared, cg_a.id).0,
                allowed_entries(&shared, cg_b.id).0,
            );
            // Expired after 1 s, deleted by the next tick: nothing of A asks for it meanwhile.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut waited = Duration::ZERO;
            while allowed_entries(&shared, cg_a.id).0 > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                waited += Duration::from_millis(100);
            }
            let after = (
                allowed_entries(&shared, cg_a.id).0,
                allowed_entries(&shared, cg_b.id).0,
            );
            // A's quota is free again: a new name of 64 addresses opens.
            let again = run_in_cgroup(
                &netns,
                &cg_a,
                PY_FLOOD,
                &["1", "again.flood.test", UPSTREAM_IP],
            );
            let a_after_again = allowed_entries(&shared, cg_a.id).0;
            node.close(a).await;
            let (b_after_a_closed, total) = allowed_entries(&shared, cg_b.id);
            node.close(b).await;
            let (_, total_after) = allowed_entries(&shared, cg_b.id);
            (
                first,
                b_get,
                before,
                after,
                waited,
                again,
                a_after_again,
                (b_after_a_closed, total, total_after),
            )
        },
    );
    eprintln!("{seen:?}");
    let (first, b_get, before, after, waited, again, a_after_again, closed) = seen;
    assert_eq!(first, "0:1");
    assert_eq!(b_get, "HTTP/1.1 200 OK");
    assert_eq!(before, (64, 1));
    assert_eq!(
        after,
        (0, 1),
        "A's expired entries are still in the kernel map"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "gone too early: {waited:?}"
    );
    assert_eq!((again.as_str(), a_after_again), ("0:1", 64));
    // Closing a sandbox removes all of its entries (and only its).
    assert_eq!(closed, (1, 1, 0));
}

#[test]
fn a_full_allowed_ip_map_refuses_new_answers_and_other_sandboxes_keep_theirs() {
    if !support::require_root() {
        return;
    }
    use kz_agent::intercept::allowed::{CAPACITY, DEFAULT_QUOTA};
    use kz_agent::sandbox::TTL_FLOOR;
    // A's quota is the whole map (a misconfiguration, or many sandboxes at once): the map itself
    // fills. 4200 names of 64 addresses: 268800 > 262144.
    let t = flood_topo(300);
    let dns = t.dns.addr;
    let seen = on_own_node(
        &t.topo,
        Duration::from_secs(30),
        async move |node, shared, netns| {
            let (spec_a, audit_a) = quota_spec("*.flood.test", dns, CAPACITY, TTL_FLOOR);
            let a = node.admit(spec_a).await.unwrap();
            let b = node
                .admit(quota_spec("b.ok.test", dns, DEFAULT_QUOTA, TTL_FLOOR).0)
                .await
                .unwrap();
            let cg_a = a.cgroup().unwrap().clone();
            let cg_b = b.cgroup().unwrap().clone();
            let get = || {
                run_in_cgroup(
                    &netns,
                    &cg_b,
                    PY_RESOLVE_AND_GET,
                    &["b.ok.test", &UPSTREAM_PORT.to_string()],
                )
            };
            let b_before = get();
            let flood = run_in_cgroup(
                &netns,
                &cg_a,
                PY_FLOOD,
                &["4200", "flood.test", UPSTREAM_IP],
            );
            let counts = (
                allowed_entries(&shared, cg_a.id).0,
                allowed_entries(&shared, cg_b.id),
            );
            // B's entry stays, and asking for its name again renews it in the full map.
            let b_after = get();
            node.close(a).await;
            node.close(b).await;
            (b_before, flood, counts, b_after, audit_a.events())
        },
    );
    let (b_before, flood, counts, b_after, audit_a) = seen;
    eprintln!("{b_before} | {flood} | {counts:?} | {b_after}");
    assert_eq!(b_before, "HTTP/1.1 200 OK");
    // 4095 answers fit beside B's one entry; the 4096th (63 free slots for 64) is taken back.
    assert_eq!(flood, "0:4095 2:105");
    assert_eq!(counts, (4095 * 64, (1, 4095 * 64 + 1)));
    assert_eq!(b_after, "HTTP/1.1 200 OK");
    let kinds: Vec<(&str, &serde_json::Value)> = audit_a
        .iter()
        .filter(|e| e.kind.starts_with("allowed_ip_"))
        .map(|e| (e.kind, &e.fields["refused"]))
        .collect();
    assert_eq!(
        kinds,
        [
            ("allowed_ip_map_full", &serde_json::json!(1)),
            ("allowed_ip_map_full", &serde_json::json!(104)),
        ]
    );
    let first = &audit_a[0].fields;
    assert_eq!(first["reason"], "map_full");
    assert_eq!(first["name"], "h4095.flood.test");
}
