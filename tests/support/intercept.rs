//! Helpers for the interception tests: a client/upstream netns pair, servers inside them and
//! clients run inside a cgroup. (Their DNS server is the shared one, [`super::dns::TestDns`].)

use super::netns::{Netns, Pair};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

pub const CLIENT_IP: &str = "10.231.0.1";
pub const UPSTREAM_IP: &str = "10.231.0.2";
pub const UPSTREAM_PORT: u16 = 8080;

/// A client namespace and an upstream namespace joined by a veth (10.231.0.0/24).
pub struct Topo {
    pub client: Netns,
    pub upstream: Netns,
}

impl Topo {
    pub fn new() -> Topo {
        let Pair {
            client, upstream, ..
        } = Pair::with_addrs(
            "kc",
            &format!("{CLIENT_IP}/24"),
            "ku",
            &format!("{UPSTREAM_IP}/24"),
        );
        Topo { client, upstream }
    }

    /// An upstream TCP server at UPSTREAM_IP:UPSTREAM_PORT answering "upstream\n"; every
    /// accepted connection is reported on the returned channel.
    pub fn serve_upstream(&self) -> mpsc::Receiver<SocketAddr> {
        let (tx, rx) = mpsc::channel();
        self.upstream.serve_blocking(move |ready| {
            let l = TcpListener::bind((UPSTREAM_IP, UPSTREAM_PORT)).expect("bind upstream");
            ready.send(()).unwrap();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = tx.send(s.peer_addr().unwrap());
                let _ = s.write_all(b"upstream\n");
            }
        });
        rx
    }

    /// A TCP listener on 127.0.0.1:<port> in the CLIENT namespace (where redirected connects
    /// land). Each accepted connection is answered with `reply(peer)` + "\n".
    pub fn serve_redirect_target<F>(&self, reply: F) -> u16
    where
        F: Fn(SocketAddr) -> String + Send + 'static,
    {
        self.client.serve_blocking(move |port| {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind listener");
            port.send(l.local_addr().unwrap().port()).unwrap();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let peer = s.peer_addr().unwrap();
                let _ = s.write_all(format!("{}\n", reply(peer)).as_bytes());
            }
        })
    }
}

/// Runs `program args` inside the client namespace, in `cgroup` when given (entered before
/// exec), with a timeout.
pub fn run_in(
    ns: &Netns,
    cgroup: Option<&kz_agent::intercept::Cgroup>,
    program: &str,
    args: &[&str],
) -> Output {
    let mut cmd = ns.command(program);
    cmd.args(args);
    if let Some(cg) = cgroup {
        cg.place_child(&mut cmd).expect("place child");
    }
    output_with_timeout(cmd, Duration::from_secs(20))
}

pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} timed out after {timeout:?}");
        }
    }
}

/// Python client snippets; each prints one line.
pub fn python() -> String {
    std::env::var("KZ_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Connects (family "4", "6" for v4-mapped/native IPv6), optionally with an SO_MARK, and prints
/// the first line received, or "ERR <errno>".
pub const PY_CONNECT: &str = r#"
import socket, sys, os
fam, host, port, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET if fam == "4" else socket.AF_INET6, socket.SOCK_STREAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.settimeout(5)
try:
    s.connect((host, port))
    line = s.makefile().readline().strip()
    if len(sys.argv) > 5:
        print(line, "peer", s.getpeername()[0], s.getpeername()[1])
    else:
        print(line)
except OSError as e:
    print("ERR", e.errno)
"#;

/// Sends a DNS query for example.test to (host, 53) and prints the reply's source and answer
/// (an AF_INET6 socket when host has a ':', e.g. a v4-mapped address).
pub const PY_DNS: &str = r#"
import socket, sys
host = sys.argv[1]
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x07example\x04test\x00" + b"\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
try:
    s.sendto(q, (host, 53))
    data, src = s.recvfrom(1500)
    print(src[0], src[1], ".".join(str(b) for b in data[-4:]))
except OSError as e:
    print("ERR", e.errno)
"#;

/// Sends one UDP datagram to (host, port) and prints "SENT" or "ERR <errno>".
pub const PY_UDP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    print("SENT")
except OSError as e:
    print("ERR", e.errno)
"#;

pub fn stdout_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Reads one line from a child's stdout.
pub fn read_line(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read line");
    line
}

pub fn reader<R: std::io::Read>(r: R) -> BufReader<R> {
    BufReader::new(r)
}

/// Creates a raw ICMP socket; prints "CREATED" or "ERR <errno>".
pub const PY_RAW: &str = r#"
import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    print("CREATED")
except OSError as e:
    print("ERR", e.errno)
"#;

/// Like [`PY_CONNECT`] (family "4" only), but the socket is made first and the script prints
/// "FD <pid> <fd>" and waits for a line on stdin before it connects: the test can take the
/// socket with pidfd_getfd and mark it as kz's in between.
pub const PY_CONNECT_HELD: &str = r#"
import socket, sys, os
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
print("FD", os.getpid(), s.fileno(), flush=True)
sys.stdin.readline()
s.settimeout(5)
try:
    s.connect((host, port))
    print(s.makefile().readline().strip())
except OSError as e:
    print("ERR", e.errno)
"#;

/// A duplicate of file descriptor `fd` of process `pid` (pidfd_getfd; needs ptrace rights over
/// it, which root has).
pub fn take_fd(pid: i32, fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; the returned descriptors are checked and owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `pidfd` is a descriptor this process just opened.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    let dup = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        )
    };
    assert!(
        dup >= 0,
        "pidfd_getfd({pid}, {fd}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(dup as i32) }
}

/// Binds a socket (family "4"/"6", proto "tcp"/"udp") to (host, port) and prints
/// "BOUND <host> <port>" as getsockname() reports it, or "ERR <errno>".
pub const PY_BIND: &str = r#"
import socket, sys
fam, proto, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET if fam == "4" else socket.AF_INET6,
                  socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
try:
    s.bind((host, port))
    a = s.getsockname()
    print("BOUND", a[0], a[1])
except OSError as e:
    print("ERR", e.errno)
"#;

/// Listens (family "4"/"6") on (host, port), or without bind() when host is "-" (the kernel
/// picks the address and port), prints "LISTEN <host> <port>" (getsockname) or "ERR <errno>",
/// then answers every connection with "hello" until stdin closes.
pub const PY_LISTEN: &str = r#"
import socket, sys, threading
fam, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET if fam == "4" else socket.AF_INET6, socket.SOCK_STREAM)
try:
    if host != "-":
        s.bind((host, port))
    s.listen(8)
except OSError as e:
    print("ERR", e.errno, flush=True)
    sys.exit(0)
a = s.getsockname()
print("LISTEN", a[0], a[1], flush=True)
def serve():
    while True:
        c, _ = s.accept()
        c.sendall(b"hello\n")
        c.close()
threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"#;

/// Talks to a unix socket: argv kind ("stream"/"dgram"), address (a path, or "@name" for an
/// abstract one), optional directory to chdir to first (relative paths). Prints the first line
/// a stream server sends, "SENT" for a datagram, or "ERR <errno>".
pub const PY_UNIX: &str = r#"
import socket, sys, os
kind, addr = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    os.chdir(sys.argv[3])
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if kind == "stream" else socket.SOCK_DGRAM)
s.settimeout(5)
try:
    if kind == "stream":
        s.connect(addr)
        print(s.makefile().readline().strip())
    else:
        s.sendto(b"x", addr)
        print("SENT")
except OSError as e:
    print("ERR", e.errno)
"#;

/// The agent's own unix socket: binds a server at argv[1] ("@name" = abstract) in this process
/// (so inside the cgroup), connects to it and prints what it answered, or "ERR <errno>".
pub const PY_UNIX_SELF: &str = r#"
import socket, sys, threading
addr = sys.argv[1]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(addr)
srv.listen(1)
def serve():
    c, _ = srv.accept()
    c.sendall(b"own\n")
    c.close()
threading.Thread(target=serve, daemon=True).start()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(addr)
    print(s.makefile().readline().strip())
except OSError as e:
    print("ERR", e.errno)
"#;

/// A unix stream server at `addr` (a path, or "@name" for an abstract socket in the current
/// network namespace) answering every connection with `reply`, on its own thread.
pub fn serve_unix_stream(addr: &str, reply: &'static str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
    let listener = match addr.strip_prefix('@') {
        Some(name) => UnixListener::bind_addr(&UnixAddr::from_abstract_name(name).unwrap()),
        None => UnixListener::bind(addr),
    }
    .unwrap_or_else(|e| panic!("bind unix {addr}: {e}"));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(format!("{reply}\n").as_bytes());
        }
    });
}
