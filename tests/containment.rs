//! The sandbox as a boundary: an agent under `kz run --blind` tries, the way an agent would
//! (real processes, real system calls), to get out or to reach a real value, and fails.
//!
//! Each attack runs twice: as the unprivileged user that started kz through `sudo`
//! (SUDO_UID of the test user), and as root with `--allow-root-agent` (root only inside a user
//! namespace of its own). The real value must never appear in what the agent prints.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Output;

use support::blind_env::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    /// `sudo kz run --blind`: the agent is the invoking user.
    Sudo,
    /// `kz run --blind --allow-root-agent` as root.
    Root,
}

const AGENTS: [Agent; 2] = [Agent::Sudo, Agent::Root];

/// The audit chain's key when kz runs as root (docs/audit.md).
const AUDIT_KEY: &str = "/var/lib/kz/audit.key";

fn run_as(env: &Env, agent: Agent, script: &str) -> Output {
    let out = match agent {
        Agent::Sudo => env.kz(&[], script),
        Agent::Root => env.kz_as_root_agent(&["--allow-root-agent"], script),
    }
    .output()
    .unwrap();
    no_leak(&out);
    out
}

/// Runs the attack, requires kz itself to succeed, returns the agent's stdout.
fn attack(env: &Env, agent: Agent, script: &str) -> String {
    let out = run_as(env, agent, script);
    let (o, e) = text(&out);
    assert!(
        out.status.success(),
        "{agent:?}: kz failed: {:?}\nstdout:\n{o}\nstderr:\n{e}",
        out.status
    );
    o
}

/// A Python connect to `ip:port`: prints `CONNECTED` or `REFUSED <errno name>`.
const PY_CONNECT: &str = r#"
import errno, socket, sys
def connect(ip, port, mark=None):
    s = socket.socket()
    s.settimeout(5)
    if mark is not None:
        try:
            s.setsockopt(socket.SOL_SOCKET, 36, mark)
            print("MARK-SET")
        except OSError as e:
            print("MARK-REFUSED", errno.errorcode.get(e.errno, e.errno))
    try:
        s.connect((ip, port))
        s.sendall(b"GET /escaped HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
        print("CONNECTED", s.recv(100)[:12])
    except OSError as e:
        print("REFUSED", errno.errorcode.get(e.errno, e.errno))
"#;

#[test]
fn the_agent_is_an_unprivileged_user_with_no_capabilities_and_seccomp() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let user = support::agent_user();
    for agent in AGENTS {
        let o = attack(
            &env,
            agent,
            r#"
            echo "uid=$(id -u) gid=$(id -g)"
            grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
            echo "home=$HOME user=$USER sudo=[$SUDO_UID]"
            "#,
        );
        for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert!(
                o.contains(&format!("{field}:\t0000000000000000")),
                "{agent:?}: {field} is not empty:\n{o}"
            );
        }
        assert!(o.contains("NoNewPrivs:\t1"), "{agent:?}:\n{o}");
        assert!(o.contains("Seccomp:\t2"), "{agent:?}:\n{o}");
        assert!(o.contains("sudo=[]"), "{agent:?}: SUDO_UID passed on:\n{o}");
        match agent {
            Agent::Sudo => assert!(
                o.contains(&format!("uid={} gid={}", user.uid, user.gid))
                    && o.contains(&format!("user={}", user.name)),
                "{o}"
            ),
            // Root inside its own user namespace only.
            Agent::Root => assert!(o.contains("uid=0 gid=0"), "{o}"),
        }
    }
    // Outside, the root agent's uid 0 is nobody.
    let mut cmd =
        env.kz_as_root_agent(&["--allow-root-agent"], "cat /proc/self/uid_map; sleep 0.1");
    let out = cmd.output().unwrap();
    let (o, _) = text(&out);
    assert!(
        o.split_whitespace().collect::<Vec<_>>() == ["0", "65534", "1"],
        "uid 0 inside maps to: {o}"
    );
}

#[test]
fn a_root_agent_is_refused_unless_asked_for_and_the_error_says_how_to_choose_a_user() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    let out = env
        .kz_as_root_agent(&[], "echo SHOULD-NOT-RUN")
        .output()
        .unwrap();
    no_leak(&out);
    let (o, e) = text(&out);
    assert!(!out.status.success(), "{o}{e}");
    assert!(!o.contains("SHOULD-NOT-RUN"));
    assert!(
        e.contains("--user") && e.contains("--allow-root-agent"),
        "{e}"
    );
    // --user by name works without sudo.
    let user = support::agent_user();
    let out = env
        .kz_as_root_agent(&["--user", user.name], "id -u")
        .output()
        .unwrap();
    let o = assert_ok(&out);
    assert!(o.lines().any(|l| l == user.uid.to_string()), "{o}");
}

#[test]
fn leaving_the_cgroup_through_any_cgroup_procs_fails_and_denied_stays_denied() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    for agent in AGENTS {
        let script = format!(
            r#"
            cat /proc/self/cgroup | sed 's/^/cgroup: /'
            for f in $(find /sys/fs/cgroup -name cgroup.procs 2>/dev/null); do
                if echo $$ > "$f" 2>/dev/null; then echo "MOVED-TO $f"; fi
            done
            # Writing into the host's cgroup hierarchy by the path kz uses.
            for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/unified/cgroup.procs; do
                echo $$ > "$f" 2>/dev/null && echo "MOVED-TO $f"
            done
            python3 - <<'PY'
{PY_CONNECT}
connect("{DENIED}", 80)
PY
            "#
        );
        let o = attack(&env, agent, &script);
        assert!(!o.contains("MOVED-TO"), "{agent:?} left its cgroup:\n{o}");
        // Its own cgroup is the root of its cgroup namespace.
        assert!(o.contains("cgroup: 0::/\n"), "{agent:?}:\n{o}");
        assert!(o.contains("REFUSED EPERM"), "{agent:?}:\n{o}");
    }
    assert!(env.denied.seen().is_empty(), "the denied host was reached");
}

#[test]
fn kz_environ_mem_and_maps_cannot_be_read_and_ptrace_fails() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    for agent in AGENTS {
        let o = attack(
            &env,
            agent,
            r#"
            kz=$PPID
            tr '\0' '\n' < /proc/$kz/environ 2>/dev/null | grep KZ_TEST_REAL_KEY
            cat /proc/$kz/environ > /dev/null 2>&1 && echo "READ environ"
            cat /proc/$kz/maps > /dev/null 2>&1 && echo "READ maps"
            # Every process's environment the agent can see (its own included: masked only).
            cat /proc/*/environ 2>/dev/null | tr '\0' '\n' | grep -c . | sed 's/^/env lines: /'
            python3 - "$kz" <<'PY'
import ctypes, os, sys
kz = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
# PTRACE_ATTACH / PTRACE_SEIZE
for req in (16, 0x4206):
    r = libc.ptrace(req, kz, 0, 0)
    print("ptrace", hex(req), "ATTACHED" if r == 0 else "refused", os.strerror(ctypes.get_errno()))
    if r == 0:
        # PTRACE_DETACH: an attached kz would stay stopped, and the run hang.
        os.waitpid(kz, 0) if req == 16 else None
        libc.ptrace(17, kz, 0, 0)
# process_vm_readv of one byte at the start of kz's heap (any address: the call is the attack)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(64)
local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
remote = iovec(0x400000, 64)
n = libc.process_vm_readv(kz, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
print("process_vm_readv", "READ" if n > 0 else "refused", os.strerror(ctypes.get_errno()))
try:
    with open(f"/proc/{kz}/mem", "rb") as m:
        m.seek(0x400000)
        m.read(16)
        print("READ mem")
except OSError as e:
    print("mem refused", e.strerror)
PY
            "#,
        );
        for what in ["READ environ", "READ maps", "ATTACHED", "READ mem"] {
            assert!(!o.contains(what), "{agent:?}: {what}\n{o}");
        }
        assert!(
            o.contains("process_vm_readv refused Operation not permitted"),
            "{agent:?}: seccomp does not refuse process_vm_readv:\n{o}"
        );
        assert!(o.contains("ptrace 0x10 refused"), "{agent:?}:\n{o}");
    }
}

#[test]
fn bpf_programs_and_pinned_maps_are_out_of_reach() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // A pinned map of the shared program set, by its host path.
    let pinned = std::fs::read_dir("/sys/fs/bpf/kz")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("maps/KZ_POLICY"))
        .find(|p| p.exists());
    for agent in AGENTS {
        let script = format!(
            r#"
            find /sys/fs/bpf -mindepth 1 2>/dev/null | sed 's/^/bpffs: /' | head -5
            python3 - <<'PY'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
SYS_bpf = 321 if os.uname().machine == "x86_64" else 280
# BPF_MAP_CREATE: an array map of one u32.
attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)
fd = libc.syscall(SYS_bpf, 0, attr, 128)
print("map_create", "CREATED" if fd >= 0 else "refused", os.strerror(ctypes.get_errno()))
# BPF_OBJ_GET of a pinned map by its host path.
path = ctypes.create_string_buffer(b"{pinned}")
attr = (ctypes.c_uint64 * 16)(ctypes.addressof(path))
fd = libc.syscall(SYS_bpf, 7, attr, 128)
print("obj_get", "OPENED" if fd >= 0 else "refused", os.strerror(ctypes.get_errno()))
PY
            "#,
            pinned = pinned
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        let o = attack(&env, agent, &script);
        assert!(!o.contains("bpffs: "), "{agent:?} sees bpffs:\n{o}");
        assert!(
            o.contains("map_create refused Operation not permitted"),
            "{agent:?}:\n{o}"
        );
        assert!(o.contains("obj_get refused"), "{agent:?}:\n{o}");
    }
}

#[test]
fn a_socket_mark_opens_nothing() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    for agent in AGENTS {
        let script = format!(
            r#"
            python3 - <<'PY'
{PY_CONNECT}
connect("{DENIED}", 80, mark=0x6b7a0001)
PY
            "#
        );
        let o = attack(&env, agent, &script);
        assert!(o.contains("MARK-REFUSED EPERM"), "{agent:?}:\n{o}");
        assert!(o.contains("REFUSED EPERM"), "{agent:?}:\n{o}");
    }
    assert!(env.denied.seen().is_empty());
}

#[test]
fn packet_netlink_and_icmp_sockets_are_refused() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    for agent in AGENTS {
        let o = attack(
            &env,
            agent,
            r#"
            python3 - <<'PY'
import errno, socket
tries = {
    "packet-raw": (socket.AF_PACKET, socket.SOCK_RAW, 0),
    "packet-dgram": (socket.AF_PACKET, socket.SOCK_DGRAM, 0),
    "icmp": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "icmp6": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6),
    "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
    "netlink-diag": (socket.AF_NETLINK, socket.SOCK_RAW, 4),
    "vsock": (40, socket.SOCK_STREAM, 0),
}
for name, (fam, ty, proto) in tries.items():
    try:
        socket.socket(fam, ty | socket.SOCK_CLOEXEC, proto).close()
        print(name, "OPENED")
    except OSError as e:
        print(name, "refused", errno.errorcode.get(e.errno, e.errno))
# What the agent needs still works: TCP, UDP, unix, netlink route.
for fam, ty, proto in ((socket.AF_INET, socket.SOCK_STREAM, 0), (socket.AF_INET6, socket.SOCK_DGRAM, 0),
                       (socket.AF_UNIX, socket.SOCK_STREAM, 0), (socket.AF_NETLINK, socket.SOCK_RAW, 0)):
    socket.socket(fam, ty, proto).close()
print("ordinary sockets ok")
PY
            ping -c1 -W1 10.77.0.66 >/dev/null 2>&1 && echo "PING-WORKED"
            true
            "#,
        );
        assert!(!o.contains("OPENED"), "{agent:?}:\n{o}");
        assert!(!o.contains("PING-WORKED"), "{agent:?}:\n{o}");
        assert!(o.contains("ordinary sockets ok"), "{agent:?}:\n{o}");
        for name in [
            "packet-raw",
            "packet-dgram",
            "icmp ",
            "icmp6",
            "netlink-diag",
            "vsock",
        ] {
            assert!(
                o.lines()
                    .any(|l| l.starts_with(name.trim()) && l.contains("refused EPERM")),
                "{agent:?}: {name}\n{o}"
            );
        }
    }
}

#[test]
fn hidden_credential_files_read_as_empty() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // A project .env (default list) and a path named in [blind] hide, both readable by anyone.
    std::fs::write(env.dir.join(".env"), format!("API_KEY={REAL}\n")).unwrap();
    let creds = env.dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("token"), REAL).unwrap();
    write_config(
        &env.dir,
        "api.allowed.test",
        &["api.allowed.test", "other.allowed.test"],
        &format!("hide = [\".env\", \"{}\"]\n", creds.display()),
    );
    // A dotenv file kz itself reads a secret from is masked without being listed.
    std::fs::write(env.dir.join("secrets.env"), format!("OTHER_KEY={REAL}\n")).unwrap();
    let mut toml = std::fs::read_to_string(env.dir.join(".keyzero.toml")).unwrap();
    toml.push_str(
        "\n[resolvers.dotenv]\ntype = \"env_file\"\npath = \"secrets.env\"\n\n[secrets.OTHER_KEY]\nresolver = \"dotenv\"\nref = \"OTHER_KEY\"\nhosts = [\"api.allowed.test\"]\n",
    );
    std::fs::write(env.dir.join(".keyzero.toml"), toml).unwrap();
    for agent in AGENTS {
        let o = attack(
            &env,
            agent,
            r#"
            echo "dotenv=[$(cat secrets.env 2>&1)]"
            echo "env=[$(cat .env 2>&1)]"
            ls -A creds | sed 's/^/creds: /'
            cat creds/token 2>/dev/null && echo "READ token"
            : > .env 2>/dev/null && echo "WROTE .env"
            echo done
            "#,
        );
        assert!(o.contains("\nenv=[]"), "{agent:?}:\n{o}");
        assert!(o.contains("dotenv=[]"), "{agent:?}:\n{o}");
        assert!(!o.contains("creds: "), "{agent:?}:\n{o}");
        assert!(
            !o.contains("READ token") && !o.contains("WROTE .env"),
            "{o}"
        );
    }
    // The files are untouched outside.
    assert!(
        std::fs::read_to_string(env.dir.join(".env"))
            .unwrap()
            .contains(REAL)
    );
}

#[test]
fn the_run_directory_audit_log_and_audit_key_are_out_of_reach() {
    use std::os::unix::fs::MetadataExt;
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    for agent in AGENTS {
        let o = attack(
            &env,
            agent,
            r#"
            ls -A /run/kz 2>&1 | sed 's/^/runkz: /'
            ls -A "$(dirname "$SSL_CERT_FILE")" | sed 's/^/rundir: /'
            head -c 27 "$SSL_CERT_FILE"; echo
            echo "audit=[$(cat "$KZ_AUDIT_LOG" 2>/dev/null | head -c 100)]"
            echo "key=[$(cat /var/lib/kz/audit.key 2>/dev/null | head -c 100)]"
            python3 -c '
try:
    print("keyread=", open("/var/lib/kz/audit.key", "rb").read(100))
except OSError as e:
    print("keyread=", type(e).__name__)'
            echo "keymask=$(grep -c " /var/lib/kz/audit.key " /proc/self/mountinfo)"
            "#,
        );
        // The chain's key: root's, 0600 in a 0700 directory, and covered in the agent's view.
        let key = std::fs::read_to_string(AUDIT_KEY)
            .unwrap_or_else(|e| panic!("no audit key at {AUDIT_KEY}: {e}"));
        let meta = std::fs::symlink_metadata(AUDIT_KEY).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600));
        let dir = std::fs::metadata("/var/lib/kz").unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o7777), (0, 0o700));
        assert!(!o.contains(key.trim()), "{agent:?} read the key:\n{o}");
        assert!(o.contains("key=[]"), "{agent:?}:\n{o}");
        assert!(o.contains("keyread= PermissionError"), "{agent:?}:\n{o}");
        assert!(o.contains("keymask=1"), "{agent:?}: key not masked:\n{o}");
        assert!(o.contains("runkz: runs\n"), "{agent:?}:\n{o}");
        assert_eq!(
            o.lines()
                .filter(|l| l.starts_with("rundir: "))
                .collect::<Vec<_>>(),
            ["rundir: ca-bundle.pem"],
            "{agent:?}:\n{o}"
        );
        assert!(o.contains("-----BEGIN CERTIFICATE-----"), "{agent:?}:\n{o}");
        assert!(o.contains("audit=[]"), "{agent:?}:\n{o}");
    }
}

#[test]
fn descriptors_kz_inherited_do_not_reach_the_agent() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // A descriptor whoever started kz left open (no close-on-exec): here, a file holding the
    // real value, as fd 7.
    let leaked = env.dir.join("leaked-secret");
    std::fs::write(&leaked, REAL).unwrap();
    for agent in AGENTS {
        let inner = match agent {
            Agent::Sudo => env.kz(
                &[],
                "cat <&7 && echo READ-FD; ls /proc/self/fd | sed 's/^/fd: /'",
            ),
            Agent::Root => env.kz_as_root_agent(
                &["--allow-root-agent"],
                "cat <&7 && echo READ-FD; ls /proc/self/fd | sed 's/^/fd: /'",
            ),
        };
        let mut cmd = std::process::Command::new("bash");
        cmd.arg("-c")
            .arg(r#"exec 7< "$0"; exec "$@""#)
            .arg(&leaked)
            .arg(inner.get_program())
            .args(inner.get_args())
            .envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .current_dir(&env.dir);
        let out = cmd.output().unwrap();
        no_leak(&out);
        let o = assert_ok(&out);
        assert!(!o.contains("READ-FD"), "{agent:?}:\n{o}");
        // stdio, and the descriptor ls itself opened for /proc/self/fd.
        let fds: Vec<&str> = o.lines().filter_map(|l| l.strip_prefix("fd: ")).collect();
        assert!(fds.len() <= 4 && !fds.contains(&"7"), "{agent:?}: {fds:?}");
    }
}

/// A unix stream server at `addr` that answers "hello" to every connection, until the test
/// process exits.
fn unix_server(listener: std::os::unix::net::UnixListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = std::io::Write::write_all(&mut conn, b"hello");
        }
    });
}

#[test]
fn unix_sockets_outside_the_allow_list_are_refused_and_audited() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    // A docker-like socket anyone may connect to (as docker.sock is for its group), and an
    // allowed one in a directory the agent cannot write.
    let base = support::agent_readable_dir("kzux");
    let docker = base.join("docker.sock");
    let allowed = base.join("allowed.sock");
    for p in [&docker, &allowed] {
        unix_server(UnixListener::bind(p).unwrap());
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    // Abstract names live per network namespace: the server sits in the agent's.
    let abstract_name = support::unique_name("kzab");
    let name = abstract_name.clone();
    env.client.serve_blocking(move |ready| {
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        ready.send(()).unwrap();
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = std::io::Write::write_all(&mut conn, b"hello");
        }
    });
    write_config(
        &env.dir,
        "api.allowed.test",
        &["api.allowed.test"],
        &format!("unix_sockets = [\"{}\"]\n", allowed.display()),
    );
    for agent in AGENTS {
        let script = format!(
            r#"
            python3 - <<'PY'
import errno, socket
def try_connect(name, addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(addr)
        print(name, "CONNECTED", s.recv(5))
    except OSError as e:
        print(name, "refused", errno.errorcode.get(e.errno, e.errno))
try_connect("docker", "{docker}")
try_connect("allowed", "{allowed}")
try_connect("abstract", "\0{abstract_name}")
PY
            "#,
            docker = docker.display(),
            allowed = allowed.display(),
        );
        let o = attack(&env, agent, &script);
        assert!(o.contains("docker refused EPERM"), "{agent:?}:\n{o}");
        assert!(o.contains("abstract refused"), "{agent:?}:\n{o}");
        assert!(o.contains("allowed CONNECTED b'hello'"), "{agent:?}:\n{o}");
    }
    let blocked: Vec<_> = env
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "connect_blocked" && r["path"] == docker.display().to_string())
        .collect();
    assert_eq!(
        blocked.len(),
        2,
        "one audited refusal per agent: {blocked:?}"
    );
    assert!(
        blocked
            .iter()
            .all(|r| r["comm"] == "python3" && r["pid"].as_u64().is_some())
    );
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn the_agent_listens_on_loopback_only() {
    if !support::require_root() {
        return;
    }
    let env = Env::new();
    for agent in AGENTS {
        let o = attack(
            &env,
            agent,
            r#"
            python3 - <<'PY'
import errno, socket
s = socket.socket()
try:
    s.bind(("10.77.0.1", 18080)); s.listen(); print("LISTENING on the veth address")
except OSError as e:
    print("specific refused", errno.errorcode.get(e.errno, e.errno))
w = socket.socket()
w.bind(("0.0.0.0", 0)); w.listen()
print("wildcard became", w.getsockname()[0])
PY
            "#,
        );
        assert!(o.contains("specific refused EPERM"), "{agent:?}:\n{o}");
        assert!(o.contains("wildcard became 127.0.0.1"), "{agent:?}:\n{o}");
    }
    assert!(
        env.audit()
            .iter()
            .any(|r| r["kind"] == "connect_blocked" && r["op"] == "bind"),
        "the refused bind is audited"
    );
}
