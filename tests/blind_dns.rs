//! The blind-mode DNS resolver (kz_agent::intercept::dns) against a real authoritative test
//! server in its own network namespace, queried by real clients (`dig`, Python's getaddrinfo
//! through glibc with a resolv.conf we control) from a client namespace.
//!
//! Layout per test: client netns (kz resolver on 127.0.0.1:53, clients) ── veth ── upstream netns
//! (test DNS server on 10.77.0.2:53). Nothing can leave the machine.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kz_agent::audit::{Fields, MemorySink, WithContext};
use kz_agent::intercept::dns::{DnsConfig, DnsHooks, DnsServer, ResolvedIp};
use support::dns::{TestDns, Zone};
use support::netns::{Netns, Pair};

type Answers = Arc<Mutex<Vec<(String, Vec<ResolvedIp>)>>>;

struct Env {
    client: Netns,
    _upstream: Netns,
    dns: TestDns,
    answers: Answers,
    audit: Arc<MemorySink>,
}

fn zone() -> Zone {
    let big: Vec<String> = (0..150)
        .map(|i| format!("10.78.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    Zone::new(5)
        .host(
            "api.allowed.test",
            &["10.77.0.10", "10.77.0.11", "fd00::10"],
        )
        .cname("www.allowed.test", "api.allowed.test")
        .host("big.allowed.test", &big)
        .host("secret.denied.test", &["10.77.0.66"])
        // Rebinding: allowed names whose answers point at this machine, its link, a metadata
        // service or no unicast host at all (`*.nip.io` style), mixed with a good address.
        .host("127-0-0-1.allowed.test", &["127.0.0.1"])
        .host(
            "metadata.allowed.test",
            &["169.254.169.254", "fd00:ec2::254"],
        )
        .host(
            "mixed.allowed.test",
            &[
                "127.0.0.1",
                "169.254.169.254",
                "169.254.1.1",
                "168.63.129.16",
                "224.0.0.1",
                "0.0.0.0",
                "255.255.255.255",
                "10.77.0.10",
                "fd00:ec2::254",
                "::1",
                "fe80::1",
                "ff02::1",
                "::",
                "::ffff:127.0.0.1",
                "fd00::10",
            ],
        )
        .cname("alias.allowed.test", "127-0-0-1.allowed.test")
}

fn setup(ipv6: bool) -> Env {
    setup_with(ipv6, None)
}

/// `guard`: the address guard of a run's rules (None: the resolver's default).
fn setup_with(ipv6: bool, guard: Option<kz_agent::egress::Guard>) -> Env {
    let Pair {
        client, upstream, ..
    } = Pair::new("dnc", "dnu");
    let dns = TestDns::start(&upstream, "10.77.0.2:53".parse().unwrap(), zone());

    let answers: Answers = Arc::default();
    let audit = Arc::new(MemorySink::new());
    let mut config = DnsConfig::new("127.0.0.1:53".parse().unwrap(), dns.addr);
    config.upstream_timeout = Duration::from_millis(800);
    config.ttl_floor = Duration::from_secs(300);
    config.ipv6 = ipv6;
    if let Some(g) = guard {
        config.guard = g;
    }
    let mut context = Fields::default();
    context.insert("run", "test-run-1".into());
    let sink = answers.clone();
    let hooks = DnsHooks {
        allow: Arc::new(|name: &str| name == "allowed.test" || name.ends_with(".allowed.test")),
        on_answer: Arc::new(move |name: &str, ips: &[ResolvedIp]| {
            sink.lock().unwrap().push((name.to_owned(), ips.to_vec()));
            Ok(())
        }),
        audit: Arc::new(WithContext {
            inner: audit.clone(),
            context,
        }),
    };
    let addr = client.serve(move |ready| async move {
        let server = DnsServer::start(config, hooks).await.unwrap();
        ready.send(server.local_addr()).unwrap();
        std::future::pending::<()>().await;
    });
    assert_eq!(addr.port(), 53);
    Env {
        client,
        _upstream: upstream,
        dns,
        answers,
        audit,
    }
}

fn dig(env: &Env, args: &[&str]) -> String {
    let out = env
        .client
        .command("dig")
        .args(["@127.0.0.1", "+time=3", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[test]
fn allowed_names_resolve_and_feed_the_allow_map_with_a_ttl_floor() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    let out = dig(&env, &["+short", "api.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["10.77.0.10", "10.77.0.11"], "{out}");
    // Case is not a way around the predicate, and the answer keeps the client's case.
    let out = dig(&env, &["API.Allowed.TEST"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("API.Allowed.TEST."), "{out}");

    // A CNAME chain: the target's addresses are allowed for the queried name.
    let out = dig(&env, &["+short", "www.allowed.test"]);
    assert!(
        out.contains("10.77.0.10") && out.contains("api.allowed.test."),
        "{out}"
    );

    let answers = env.answers.lock().unwrap().clone();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert_eq!(answers[0].0, "api.allowed.test");
    assert_eq!(answers[1].0, "api.allowed.test");
    assert_eq!(answers[2].0, "www.allowed.test");
    for (_, ips) in &answers {
        let mut got: Vec<String> = ips.iter().map(|r| r.ip.to_string()).collect();
        got.sort();
        assert_eq!(got, ["10.77.0.10", "10.77.0.11"]);
        // The record says 5 s; the floor keeps it 300 s.
        assert!(ips.iter().all(|r| r.ttl == Duration::from_secs(300)));
    }
    assert!(env.audit.events().is_empty());
}

#[test]
fn denied_names_are_refused_never_forwarded_and_audited() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    for extra in [None, Some("+tcp")] {
        let mut args = vec!["secret.denied.test"];
        args.extend(extra);
        let out = dig(&env, &args);
        assert!(out.contains("status: REFUSED"), "{out}");
        assert!(!out.contains("10.77.0.66"), "{out}");
    }
    // Exfiltration through a long name under a foreign zone: refused too.
    let out = dig(&env, &["c2VjcmV0.exfil.example", "TXT"]);
    assert!(out.contains("status: REFUSED"), "{out}");

    let questions = env.dns.questions();
    assert!(
        questions
            .iter()
            .all(|q| !q.contains("denied") && !q.contains("exfil")),
        "a denied name reached the upstream: {questions:?}"
    );
    assert!(env.answers.lock().unwrap().is_empty());

    let events = env.audit.events();
    assert_eq!(events.len(), 3, "{events:?}");
    for (event, (name, transport)) in events.iter().zip([
        ("secret.denied.test", "udp"),
        ("secret.denied.test", "tcp"),
        ("c2vjcmv0.exfil.example", "udp"),
    ]) {
        assert_eq!(event.kind, "dns_refused");
        assert_eq!(event.fields["name"], name);
        assert_eq!(event.fields["transport"], transport);
        assert_eq!(event.fields["run"], "test-run-1");
        assert_eq!(event.fields["reason"], "name not allowed");
        let client: SocketAddr = event.fields["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(client.ip().to_string(), "127.0.0.1");
    }
    assert_eq!(events[2].fields["qtype"], "TXT");
}

#[test]
fn big_answers_are_truncated_over_udp_and_complete_over_tcp() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    // dig retries over TCP on TC, like glibc and every other stub resolver.
    let out = dig(&env, &["+short", "big.allowed.test"]);
    assert_eq!(sorted_lines(&out).len(), 150, "{out}");
    // Without the retry the truncation is visible.
    let out = dig(&env, &["+ignore", "+notcp", "big.allowed.test"]);
    assert!(out.contains(" tc"), "{out}");
    // Without EDNS the client's limit is 512 bytes.
    let out = dig(&env, &["+ignore", "+noedns", "+notcp", "big.allowed.test"]);
    assert!(out.contains(" tc"), "{out}");

    // Upstream truncated our UDP query too: kz asked again over TCP and allowed all 150.
    let questions = env.dns.questions();
    assert!(
        questions
            .iter()
            .filter(|q| *q == "big.allowed.test A")
            .count()
            >= 2
    );
    let answers = env.answers.lock().unwrap().clone();
    assert!(!answers.is_empty());
    assert!(
        answers.iter().all(|(_, ips)| ips.len() == 150),
        "{answers:?}"
    );
}

#[test]
fn upstream_timeouts_and_garbage_become_servfail() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    let started = Instant::now();
    let out = dig(&env, &["slow.allowed.test"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let out = dig(&env, &["garbage.allowed.test"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    // Still serving.
    let out = dig(&env, &["+short", "api.allowed.test"]);
    assert_eq!(sorted_lines(&out).len(), 2, "{out}");
}

#[test]
fn malformed_client_packets_never_stop_the_resolver() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    let (tx, rx) = std::sync::mpsc::channel();
    env.client.spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        sock.connect("127.0.0.1:53").unwrap();
        let mut buf = [0u8; 2048];
        // Too short to carry an id: dropped.
        sock.send(&[1, 2, 3, 4, 5]).unwrap();
        let short = sock.recv(&mut buf).is_err();
        // A header claiming one question followed by junk: FORMERR to that id.
        sock.send(&[0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f, b'x'])
            .unwrap();
        let n = sock.recv(&mut buf).unwrap();
        let formerr = buf[..2] == [0xab, 0xcd] && n >= 12 && buf[3] & 0x0f == 1;
        // A response (QR set) sent to us: never answered (no reflection loops).
        sock.send(&[0xab, 0xce, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let response_ignored = sock.recv(&mut buf).is_err();
        // A TCP client that announces 100 bytes and stalls must not block others.
        let mut stalled = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
        std::io::Write::write_all(&mut stalled, &[0, 100, 1, 2, 3]).unwrap();
        // An oversize QDCOUNT over TCP: FORMERR, not a hang.
        let mut tcp = std::net::TcpStream::connect("127.0.0.1:53").unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let q = [0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        std::io::Write::write_all(&mut tcp, &[0, 12]).unwrap();
        std::io::Write::write_all(&mut tcp, &q).unwrap();
        let mut reply = [0u8; 14];
        std::io::Read::read_exact(&mut tcp, &mut reply).unwrap();
        let tcp_formerr = reply[2..4] == [0x12, 0x34] && reply[5] & 0x0f == 1;
        tx.send((short, formerr, response_ignored, tcp_formerr, stalled))
            .unwrap();
    });
    let (short, formerr, response_ignored, tcp_formerr, _stalled) =
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(short, "a 5-byte packet got a reply");
    assert!(formerr, "junk after a header did not get FORMERR");
    assert!(response_ignored, "a response packet was answered");
    assert!(tcp_formerr, "junk over TCP did not get FORMERR");
    let out = dig(&env, &["+tcp", "+short", "api.allowed.test"]);
    assert_eq!(sorted_lines(&out).len(), 2, "{out}");
    let out = dig(&env, &["+short", "api.allowed.test"]);
    assert_eq!(sorted_lines(&out).len(), 2, "{out}");
}

/// Runs `script` with python3 in the client netns, in a private mount namespace whose
/// /etc/resolv.conf points at the kz resolver: glibc's real stub resolver does the work.
fn python(env: &Env, script: &str) -> Output {
    let dir = std::env::temp_dir().join(support::unique_name("kzdns"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("resolv.conf");
    std::fs::write(
        &conf,
        "nameserver 127.0.0.1\noptions timeout:2 attempts:1\n",
    )
    .unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", env.client.path().display()))
        .args(["--", "unshare", "-m", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && exec python3 -c \"$0\"",
            conf.display()
        ))
        .arg(script)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn python_getaddrinfo_resolves_allowed_and_fails_denied() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    let out = python(
        &env,
        "import socket\n\
         print(sorted({a[4][0] for a in socket.getaddrinfo('api.allowed.test', 443)}))\n\
         try:\n    socket.getaddrinfo('secret.denied.test', 443)\n    print('RESOLVED')\n\
         except socket.gaierror as e:\n    print('DENIED', e.errno)\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No IPv6 in this run's policy: AAAA is answered empty, so only IPv4 comes back.
    assert!(stdout.contains("['10.77.0.10', '10.77.0.11']"), "{stdout}");
    assert!(stdout.contains("DENIED"), "{stdout}");
    let questions = env.dns.questions();
    assert!(
        !questions.iter().any(|q| q.ends_with("AAAA")),
        "{questions:?}"
    );
    assert!(
        !questions.iter().any(|q| q.contains("denied")),
        "{questions:?}"
    );
}

#[test]
fn aaaa_is_forwarded_only_when_ipv6_is_allowed() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    let out = dig(&env, &["AAAA", "api.allowed.test"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );

    let env6 = setup(true);
    let out = dig(&env6, &["+short", "AAAA", "api.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["fd00::10"], "{out}");
    let answers = env6.answers.lock().unwrap().clone();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].1[0].ip.to_string(), "fd00::10");
}

/// The addresses the resolver handed to the allow-map hook, over all answers so far.
fn fed(env: &Env) -> Vec<String> {
    let answers = env.answers.lock().unwrap().clone();
    let mut ips: Vec<String> = answers
        .iter()
        .flat_map(|(_, ips)| ips.iter().map(|r| r.ip.to_string()))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// DNS rebinding: an allowed wildcard name answered with loopback, link-local, metadata,
/// multicast, broadcast or unspecified addresses. The agent's `dig` gets none of them, the
/// allow map is never fed them, and each drop is audited with the name and the address.
#[test]
fn answers_pointing_an_allowed_name_at_dangerous_addresses_are_dropped() {
    if !support::require_root() {
        return;
    }
    let env = setup(true);
    let out = dig(&env, &["+short", "127-0-0-1.allowed.test"]);
    assert_eq!(sorted_lines(&out), Vec::<String>::new(), "{out}");
    let out = dig(&env, &["127-0-0-1.allowed.test"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    let out = dig(&env, &["+short", "metadata.allowed.test"]);
    assert_eq!(sorted_lines(&out), Vec::<String>::new(), "{out}");
    let out = dig(&env, &["+short", "AAAA", "metadata.allowed.test"]);
    assert_eq!(sorted_lines(&out), Vec::<String>::new(), "{out}");
    // A mixed answer keeps its good addresses only.
    let out = dig(&env, &["+short", "mixed.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["10.77.0.10"], "{out}");
    let out = dig(&env, &["+short", "AAAA", "mixed.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["fd00::10"], "{out}");
    // Over TCP too, and through a CNAME.
    let out = dig(&env, &["+tcp", "+short", "mixed.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["10.77.0.10"], "{out}");
    let out = dig(&env, &["+short", "alias.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["127-0-0-1.allowed.test."], "{out}");

    assert_eq!(fed(&env), ["10.77.0.10", "fd00::10"]);
    let dropped = env.audit.of_kind("dns_answer_dropped");
    let mut pairs: Vec<(String, String)> = dropped
        .iter()
        .map(|e| {
            assert_eq!(e.fields["run"], "test-run-1");
            assert!(e.fields["reason"].as_str().is_some_and(|r| !r.is_empty()));
            (
                e.fields["name"].as_str().unwrap().to_owned(),
                e.fields["address"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    for (name, addr) in [
        ("127-0-0-1.allowed.test", "127.0.0.1"),
        ("alias.allowed.test", "127.0.0.1"),
        ("metadata.allowed.test", "169.254.169.254"),
        ("metadata.allowed.test", "fd00:ec2::254"),
        ("mixed.allowed.test", "0.0.0.0"),
        ("mixed.allowed.test", "168.63.129.16"),
        ("mixed.allowed.test", "169.254.1.1"),
        ("mixed.allowed.test", "224.0.0.1"),
        ("mixed.allowed.test", "255.255.255.255"),
        ("mixed.allowed.test", "::"),
        ("mixed.allowed.test", "::1"),
        ("mixed.allowed.test", "::ffff:127.0.0.1"),
        ("mixed.allowed.test", "fe80::1"),
        ("mixed.allowed.test", "ff02::1"),
    ] {
        assert!(
            pairs.contains(&(name.to_owned(), addr.to_owned())),
            "no dns_answer_dropped for {name} {addr}: {pairs:?}"
        );
    }
}

/// Python's getaddrinfo (glibc's stub resolver) on a rebinding name: it does not resolve.
#[test]
fn getaddrinfo_of_a_rebinding_name_fails() {
    if !support::require_root() {
        return;
    }
    let env = setup(false);
    let out = python(
        &env,
        "import socket\n\
         try:\n    print(socket.getaddrinfo('127-0-0-1.allowed.test', 80))\n    print('RESOLVED')\n\
         except socket.gaierror as e:\n    print('NOADDR', e.errno)\n\
         print(sorted({a[4][0] for a in socket.getaddrinfo('mixed.allowed.test', 80)}))\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("NOADDR"), "{stdout}");
    assert!(stdout.contains("['10.77.0.10']"), "{stdout}");
    assert!(
        !fed(&env).iter().any(|ip| ip == "127.0.0.1"),
        "{:?}",
        fed(&env)
    );
}

/// An explicit `cidr` rule is the way to let an allowed name resolve to loopback: the loopback
/// answer then passes (and feeds the allow map); metadata stays dropped inside any range.
#[test]
fn an_allow_cidr_rule_lets_its_range_through() {
    if !support::require_root() {
        return;
    }
    use kz_agent::proxy::{ConnectionRule, ConnectionRules, HostPattern};
    let rules = ConnectionRules(vec![
        ConnectionRule::allow(HostPattern::cidr("127.0.0.0/8").unwrap()),
        ConnectionRule::allow(HostPattern::cidr("169.254.0.0/16").unwrap()),
        ConnectionRule::allow(HostPattern::host("*.allowed.test").unwrap()),
    ]);
    let env = setup_with(false, Some(rules.address_guard()));
    let out = dig(&env, &["+short", "127-0-0-1.allowed.test"]);
    assert_eq!(sorted_lines(&out), ["127.0.0.1"], "{out}");
    let out = dig(&env, &["+short", "mixed.allowed.test"]);
    assert_eq!(
        sorted_lines(&out),
        ["10.77.0.10", "127.0.0.1", "169.254.1.1"],
        "{out}"
    );
    let out = dig(&env, &["+short", "metadata.allowed.test"]);
    assert_eq!(sorted_lines(&out), Vec::<String>::new(), "{out}");
    assert_eq!(fed(&env), ["10.77.0.10", "127.0.0.1", "169.254.1.1"]);
    let dropped: Vec<String> = env
        .audit
        .of_kind("dns_answer_dropped")
        .iter()
        .map(|e| e.fields["address"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        dropped.iter().any(|a| a == "169.254.169.254"),
        "{dropped:?}"
    );
    assert!(!dropped.iter().any(|a| a == "127.0.0.1"), "{dropped:?}");
}
