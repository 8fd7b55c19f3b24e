//! Policy and table types, and their translation into kernel map entries (`kz_common`).

use super::InterceptError;
use aya::maps::{HashMap, MapData};
use kz_common::{
    AF_INET6, Lpm4, Lpm6, PeerKey, UNIX_ALLOW, UNIX_DENY, UNIX_KEY_PATH, UNIX_PATH_MAX,
    UnixAbstractKey, UnixPathKey, flags,
};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which TCP connections go to the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TcpRedirect {
    /// Every TCP connect (the `kz run --blind` setting).
    #[default]
    All,
    /// Only these destination ports; other ports connect directly (after the allow/deny checks).
    Ports(Vec<u16>),
}

/// What happens to native IPv6 destinations (v4-mapped ones always take the IPv4 path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// Redirected to `[::1]:<proxy_port>` (the proxy must listen there too).
    Intercept,
    /// Refused with EPERM.
    #[default]
    Deny,
}

/// Where the cgroup's processes may accept connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Listen {
    /// From this machine only: a TCP bind to the wildcard address is rewritten to loopback
    /// (127.0.0.1 / ::1; `::` loses its IPv4 half), a TCP bind to another non-loopback address
    /// and a UDP bind of a non-zero port outside loopback fail with EPERM, and a listener the
    /// kernel bound itself (listen() without bind()) is bound to the loopback device.
    #[default]
    Loopback,
    /// Anywhere (`[blind] listen = "any"`).
    Any,
}

/// One unix-socket allow rule: `/path/to.sock` (exactly that path), `/dir/` (every path below
/// the directory) or `@name` (an abstract socket). Rules are absolute paths without empty, `.`
/// or `..` components, matched against the address the agent passes to connect()/sendto()
/// (the kernel's unix hooks run before it resolves the path): the agent's relative paths and
/// paths with such components are refused whatever the rules say. A path rule is sound only
/// for a location the agent cannot write: in a directory it can write it could plant a symlink
/// to any socket under an allowed name (kz warns about world-writable directories).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UnixRule {
    Path(PathBuf),
    Dir(PathBuf),
    /// The name without the leading NUL.
    Abstract(Vec<u8>),
}

impl FromStr for UnixRule {
    type Err = InterceptError;
    fn from_str(s: &str) -> Result<UnixRule, InterceptError> {
        let bad = |why: &'static str| InterceptError::BadUnixRule {
            rule: s.to_owned(),
            why,
        };
        if let Some(name) = s.strip_prefix('@') {
            if name.is_empty() {
                return Err(bad("an abstract socket needs a name after `@`"));
            }
            if name.len() > UNIX_PATH_MAX - 1 {
                return Err(bad("an abstract name has at most 107 bytes"));
            }
            return Ok(UnixRule::Abstract(name.as_bytes().to_vec()));
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Err(bad(
                "write an absolute path (`/run/app.sock`), a directory (`/run/app/`) or an abstract name (`@name`)",
            ));
        };
        if s.contains('*') {
            return Err(bad(
                "globs are not supported: name each socket or directory",
            ));
        }
        let dir = s.ends_with('/');
        let parts: Vec<&str> = rest.split('/').collect();
        let named = if dir {
            &parts[..parts.len() - 1]
        } else {
            &parts[..]
        };
        if named
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == "..")
        {
            return Err(bad(
                "no empty, `.` or `..` components: write the path plainly",
            ));
        }
        if dir {
            let trimmed = s.trim_end_matches('/');
            Ok(UnixRule::Dir(PathBuf::from(if trimmed.is_empty() {
                "/"
            } else {
                trimmed
            })))
        } else {
            if s.len() > UNIX_PATH_MAX - 1 {
                return Err(bad("a socket path has at most 107 bytes"));
            }
            Ok(UnixRule::Path(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for UnixRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixRule::Path(p) => write!(f, "{}", p.display()),
            UnixRule::Dir(p) if p == Path::new("/") => write!(f, "/"),
            UnixRule::Dir(p) => write!(f, "{}/", p.display()),
            UnixRule::Abstract(n) => write!(f, "@{}", String::from_utf8_lossy(n)),
        }
    }
}

/// Which unix sockets the cgroup may connect or send to (by address). Socket pairs
/// (socketpair(2)) and inherited descriptors are never affected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixSockets {
    /// Every one (no unix-socket check).
    Any,
    /// Only addresses matching a rule; and never, through a directory rule, the container
    /// runtime and init sockets of [`RUNTIME_SOCKETS`] (name one exactly to allow it).
    Only(Vec<UnixRule>),
}

impl Default for UnixSockets {
    fn default() -> UnixSockets {
        UnixSockets::Only(Vec::new())
    }
}

/// Sockets that hand out root (container runtimes, init, the system bus) or the user's session
/// (its bus reaches the keyring's Secret Service): a directory rule never opens them, only an
/// exact rule does. `*` stands for each directory present under `/run/user`.
pub const RUNTIME_SOCKETS: &[&str] = &[
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/containerd/containerd.sock.ttrpc",
    "/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/run/buildkit/buildkitd.sock",
    "/run/snapd.socket",
    "/run/snapd-snap.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/incus/unix.socket",
    "/run/systemd/private",
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/user/*/podman/podman.sock",
    "/run/user/*/docker.sock",
    "/run/user/*/systemd/private",
    "/run/user/*/bus",
];

/// A cgroup's unix rules as kernel map keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct UnixKeys {
    /// (LPM prefix length in bits, key data, verdict).
    pub paths: Vec<(u32, UnixPathKey, u8)>,
    pub abstracts: Vec<UnixAbstractKey>,
}

/// An LPM entry for `path`: a directory (`dir`: the prefix ends with its `/`) or exactly the
/// path (the prefix covers its terminating NUL). None when too long for `sun_path`.
fn path_key(cgroup_id: u64, path: &[u8], dir: bool) -> Option<(u32, UnixPathKey)> {
    let mut bytes = path.to_vec();
    if dir && bytes.last() != Some(&b'/') {
        bytes.push(b'/');
    }
    if bytes.len() >= UNIX_PATH_MAX || bytes.len() >= UNIX_KEY_PATH {
        return None;
    }
    let mut key = UnixPathKey {
        cgroup_id: cgroup_id.to_be_bytes(),
        ..UnixPathKey::default()
    };
    key.path[..bytes.len()].copy_from_slice(&bytes);
    let matched = bytes.len() + usize::from(!dir);
    Some((64 + 8 * matched as u32, key))
}

/// `path` and, when symlinks make it differ, its canonical form (e.g. /var/run/x and /run/x):
/// two names for the same object, so allowing one allows the other.
fn with_canonical(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let canonical = std::fs::canonicalize(path).ok().or_else(|| {
        let dir = std::fs::canonicalize(path.parent()?).ok()?;
        Some(dir.join(path.file_name()?))
    });
    if let Some(c) = canonical
        && c != path
    {
        out.push(c);
    }
    out
}

/// Warns when the agent could plant a symlink under a rule: the directory (a directory rule)
/// or the socket's directory (a path rule) is writable by everyone.
fn warn_if_writable(rule: &UnixRule, dir: &Path) {
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o002 != 0
    {
        tracing::warn!(
            rule = %rule,
            dir = %dir.display(),
            "unix-socket rule in a world-writable directory: an agent can create a symlink there to any socket and reach it under the allowed name; allow only locations the agent cannot write"
        );
    }
}

/// Every path [`RUNTIME_SOCKETS`] names on this machine (`*` expanded).
fn runtime_socket_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for pattern in RUNTIME_SOCKETS {
        match pattern.split_once("/*/") {
            None => out.push(PathBuf::from(pattern)),
            Some((base, rest)) => {
                for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
                    out.push(e.path().join(rest));
                }
            }
        }
    }
    out
}

impl UnixSockets {
    /// The kernel keys for `cgroup_id`.
    pub(crate) fn keys(&self, cgroup_id: u64) -> UnixKeys {
        let mut keys = UnixKeys::default();
        let UnixSockets::Only(rules) = self else {
            return keys;
        };
        let mut any_dir = false;
        for rule in rules {
            match rule {
                UnixRule::Path(p) => {
                    if let Some(dir) = p.parent() {
                        warn_if_writable(rule, dir);
                    }
                    for name in with_canonical(p) {
                        if let Some((len, k)) =
                            path_key(cgroup_id, name.as_os_str().as_bytes(), false)
                        {
                            keys.paths.push((len, k, UNIX_ALLOW));
                        }
                    }
                }
                UnixRule::Dir(d) => {
                    any_dir = true;
                    warn_if_writable(rule, d);
                    for name in with_canonical(d) {
                        if let Some((len, k)) =
                            path_key(cgroup_id, name.as_os_str().as_bytes(), true)
                        {
                            keys.paths.push((len, k, UNIX_ALLOW));
                        }
                    }
                }
                UnixRule::Abstract(name) => {
                    let mut k = UnixAbstractKey {
                        cgroup_id,
                        len: name.len() as u32,
                        ..UnixAbstractKey::default()
                    };
                    let n = name.len().min(UNIX_PATH_MAX);
                    k.name[..n].copy_from_slice(&name[..n]);
                    keys.abstracts.push(k);
                }
            }
        }
        // Below an allowed directory the runtime sockets get a deny entry (longer, so it wins)
        // unless an exact rule allows them.
        if any_dir {
            for path in runtime_socket_paths() {
                for name in with_canonical(&path) {
                    let Some((len, k)) = path_key(cgroup_id, name.as_os_str().as_bytes(), false)
                    else {
                        continue;
                    };
                    if !keys.paths.iter().any(|(l, p, _)| *l == len && *p == k) {
                        keys.paths.push((len, k, UNIX_DENY));
                    }
                }
            }
        }
        keys
    }
}

/// One cgroup's policy. The default refuses everything: no proxy, no DNS port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// TCP redirect target `127.0.0.1:<proxy_port>`; 0 = none (redirected connects fail).
    pub proxy_port: u16,
    /// UDP/53 redirect target `127.0.0.1:<dns_port>`; 0 = none (DNS fails).
    pub dns_port: u16,
    pub tcp: TcpRedirect,
    pub ipv6: Ipv6Mode,
    /// Destinations must match [`Policy::allow`] or an [`super::AllowMap`] entry, else EPERM.
    pub require_allow: bool,
    /// UDP to ports other than 53 is let through (after the checks) instead of refused.
    pub allow_udp: bool,
    /// Loopback destinations connect directly instead of being redirected.
    pub loopback_direct: bool,
    pub allow: Vec<Cidr>,
    /// Always refused with EPERM, before anything else (except DNS, which always goes to kz).
    pub deny: Vec<Cidr>,
    /// Where servers of the cgroup may listen (default: loopback only).
    pub listen: Listen,
    /// Which unix sockets it may reach (default: only its own). Needs the BPF LSM; see
    /// [`super::Interceptor::unix_guard`].
    pub unix: UnixSockets,
}

impl Policy {
    /// The kernel form; `ring` is the guarding instance's slot in `KZ_EVENT_RINGS`.
    pub(crate) fn kernel(&self, ring: u32) -> kz_common::CgroupPolicy {
        let mut f = 0;
        if self.tcp == TcpRedirect::All {
            f |= flags::ALL_TCP;
        }
        if self.ipv6 == Ipv6Mode::Intercept {
            f |= flags::V6_INTERCEPT;
        }
        if self.require_allow {
            f |= flags::REQUIRE_ALLOW;
        }
        if self.allow_udp {
            f |= flags::ALLOW_UDP;
        }
        if self.loopback_direct {
            f |= flags::LOOPBACK_DIRECT;
        }
        if self.listen == Listen::Any {
            f |= flags::LISTEN_ANY;
        }
        if self.unix == UnixSockets::Any {
            f |= flags::UNIX_ANY;
        }
        kz_common::CgroupPolicy {
            proxy_port: self.proxy_port,
            dns_port: self.dns_port,
            flags: f,
            ring,
            _pad: 0,
        }
    }

    pub(crate) fn ports(&self) -> &[u16] {
        match &self.tcp {
            TcpRedirect::All => &[],
            TcpRedirect::Ports(p) => p,
        }
    }
}

/// An IP network. Host bits are cleared; v4-mapped IPv6 networks become IPv4 ones (the kernel
/// checks v4-mapped destinations on the IPv4 path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, InterceptError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
                prefix - 96,
            ),
            other => (other, prefix),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(InterceptError::BadCidr(format!("{addr}/{prefix}")));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr::new(addr, prefix).unwrap_or(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(ip, self.prefix)
            .map(|c| c.addr == self.addr)
            .unwrap_or(false)
    }
}

impl FromStr for Cidr {
    type Err = InterceptError;
    fn from_str(s: &str) -> Result<Cidr, InterceptError> {
        let bad = || InterceptError::BadCidr(s.to_owned());
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        match p {
            None => Ok(Cidr::host(addr)),
            Some(p) => {
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                Cidr::new(addr, prefix).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A kernel LPM-trie key for a cidr within a cgroup.
pub(crate) enum LpmKey {
    V4(u32, Lpm4),
    V6(u32, Lpm6),
}

pub(crate) fn lpm_key(cgroup_id: u64, cidr: &Cidr) -> LpmKey {
    let cg = cgroup_id.to_be_bytes();
    match cidr.addr {
        IpAddr::V4(a) => LpmKey::V4(
            64 + u32::from(cidr.prefix),
            Lpm4 {
                cgroup_id: cg,
                addr: a.octets(),
            },
        ),
        IpAddr::V6(a) => LpmKey::V6(
            64 + u32::from(cidr.prefix),
            Lpm6 {
                cgroup_id: cg,
                addr: a.octets(),
            },
        ),
    }
}

/// 16 bytes, v4-mapped for IPv4: the kernel's address form in every key.
pub(crate) fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn ip_from16(bytes: [u8; 16], family: u16) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) if family != AF_INET6 => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

/// The destination a process asked for before it was redirected to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 for v4 destinations, also when the client used a v4-mapped IPv6 address.
    pub dest: SocketAddr,
    /// Process id that called connect().
    pub tgid: u32,
    /// Its cgroup id.
    pub cgroup_id: u64,
}

impl From<kz_common::OrigDst> for OrigDst {
    fn from(o: kz_common::OrigDst) -> OrigDst {
        OrigDst {
            dest: SocketAddr::new(ip_from16(o.addr, o.family), o.port),
            tgid: o.tgid,
            cgroup_id: o.cgroup_id,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves a map handle that is still valid.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The proxy's view of redirected connections: original destination by client address.
/// Cheap to clone and share between tasks.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<Mutex<HashMap<MapData, PeerKey, kz_common::OrigDst>>>,
}

impl OrigDstTable {
    pub(crate) fn new(map: HashMap<MapData, PeerKey, kz_common::OrigDst>) -> OrigDstTable {
        OrigDstTable {
            map: Arc::new(Mutex::new(map)),
        }
    }

    fn key(peer: SocketAddr) -> PeerKey {
        PeerKey {
            addr: addr16(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        }
    }

    /// The original destination of the connection whose client end is `peer` (the accepted
    /// socket's `peer_addr()`), if it was redirected by kz.
    pub fn lookup(&self, peer: SocketAddr) -> Option<OrigDst> {
        lock(&self.map)
            .get(&Self::key(peer), 0)
            .ok()
            .map(OrigDst::from)
    }

    /// Like [`OrigDstTable::lookup`] and removes the entry (the client port may be reused).
    pub fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        let key = Self::key(peer);
        let mut map = lock(&self.map);
        let found = map.get(&key, 0).ok().map(OrigDst::from);
        if found.is_some() {
            let _ = map.remove(&key);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_normalise_and_reject_garbage() {
        let c: Cidr = "10.1.2.3/8".parse().expect("cidr");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.200.0.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let h: Cidr = "192.0.2.7".parse().expect("host");
        assert_eq!(h.to_string(), "192.0.2.7/32");
        let m: Cidr = "::ffff:10.0.0.0/104".parse().expect("mapped");
        assert_eq!(m.to_string(), "10.0.0.0/8");
        let v6: Cidr = "fd00::1/8".parse().expect("v6");
        assert_eq!(v6.to_string(), "fd00::/8");
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains("1.2.3.4".parse().expect("ip")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/-1",
            "1.2.3.4/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn policy_flags_follow_the_fields() {
        let p = Policy {
            proxy_port: 1,
            dns_port: 2,
            tcp: TcpRedirect::Ports(vec![443]),
            ipv6: Ipv6Mode::Intercept,
            require_allow: true,
            ..Policy::default()
        };
        let k = p.kernel(7);
        assert_eq!((k.proxy_port, k.dns_port, k.ring), (1, 2, 7));
        assert_eq!(k.flags, flags::V6_INTERCEPT | flags::REQUIRE_ALLOW);
        assert_eq!(Policy::default().kernel(0).flags, flags::ALL_TCP);
        let open = Policy {
            listen: Listen::Any,
            unix: UnixSockets::Any,
            ..Policy::default()
        };
        assert_eq!(
            open.kernel(0).flags,
            flags::ALL_TCP | flags::LISTEN_ANY | flags::UNIX_ANY
        );
    }

    #[test]
    fn unix_rules_parse_and_refuse_what_could_be_misread() {
        let r = |s: &str| s.parse::<UnixRule>();
        assert_eq!(
            r("/run/app.sock").unwrap(),
            UnixRule::Path("/run/app.sock".into())
        );
        assert_eq!(r("/run/app/").unwrap(), UnixRule::Dir("/run/app".into()));
        assert_eq!(r("/").unwrap(), UnixRule::Dir("/".into()));
        assert_eq!(
            r("@my-name").unwrap(),
            UnixRule::Abstract(b"my-name".to_vec())
        );
        for s in ["/run/app.sock", "/run/app/", "/", "@x"] {
            assert_eq!(r(s).unwrap().to_string(), s);
        }
        for bad in [
            "",
            "run/app.sock",
            "./app.sock",
            "/run/../etc/x",
            "/run/./x",
            "/run//x",
            "/run/x/../",
            "@",
            "/run/user/*/bus",
            &format!("/{}", "a".repeat(120)),
            &format!("@{}", "a".repeat(108)),
        ] {
            let e = r(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn unix_keys_are_exact_paths_directory_prefixes_and_runtime_denials() {
        let keys = UnixSockets::Only(vec![
            UnixRule::Path("/nonexistent-kz/app.sock".into()),
            UnixRule::Dir("/nonexistent-kz/dir".into()),
            UnixRule::Abstract(b"ab".to_vec()),
        ])
        .keys(7);
        let (len, k, v) = keys.paths[0];
        // An exact path matches through its NUL; a directory through its slash.
        assert_eq!((len, v), (64 + 8 * 25, UNIX_ALLOW));
        assert_eq!(&k.path[..25], b"/nonexistent-kz/app.sock\0");
        assert_eq!(k.cgroup_id, 7u64.to_be_bytes());
        let (len, k, _) = keys.paths[1];
        assert_eq!(len, 64 + 8 * 20);
        assert_eq!(&k.path[..20], b"/nonexistent-kz/dir/");
        // With a directory rule every runtime socket gets a deny entry.
        let denied: Vec<&[u8]> = keys
            .paths
            .iter()
            .filter(|(_, _, v)| *v == UNIX_DENY)
            .map(|(l, k, _)| &k.path[..(*l as usize - 64) / 8 - 1])
            .collect();
        assert!(denied.contains(&&b"/run/docker.sock"[..]), "{denied:?}");
        assert!(denied.contains(&&b"/var/run/docker.sock"[..]), "{denied:?}");
        assert_eq!(
            (keys.abstracts[0].len, &keys.abstracts[0].name[..3]),
            (2, &b"ab\0"[..])
        );
        // An exact rule for a runtime socket is not overridden by its deny entry.
        let keys = UnixSockets::Only(vec![
            UnixRule::Path("/run/docker.sock".into()),
            UnixRule::Dir("/run".into()),
        ])
        .keys(7);
        let docker: Vec<u8> = keys
            .paths
            .iter()
            .filter(|(l, k, _)| *l == 64 + 8 * 17 && &k.path[..17] == b"/run/docker.sock\0")
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(docker, vec![UNIX_ALLOW]);
        assert_eq!(UnixSockets::Any.keys(7), UnixKeys::default());
        // Without a directory rule nothing needs denying: everything else is refused anyway.
        let only = UnixSockets::Only(vec![UnixRule::Path("/x/y.sock".into())]).keys(7);
        assert!(only.paths.iter().all(|(_, _, v)| *v == UNIX_ALLOW));
    }

    #[test]
    fn unix_keys_add_the_canonical_name_of_a_symlinked_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let real = std::fs::canonicalize(&real).expect("canonical");
        let keys = UnixSockets::Only(vec![UnixRule::Path(link.join("s.sock"))]).keys(7);
        let names: Vec<PathBuf> = keys
            .paths
            .iter()
            .map(|(l, k, _)| {
                let n = (*l as usize - 64) / 8 - 1;
                PathBuf::from(std::ffi::OsStr::from_bytes(&k.path[..n]))
            })
            .collect();
        assert_eq!(names, vec![link.join("s.sock"), real.join("s.sock")]);
    }

    #[test]
    fn orig_dst_maps_v4_mapped_back_to_v4() {
        let o = kz_common::OrigDst {
            addr: addr16("10.9.8.7".parse().expect("ip")),
            port: 443,
            family: kz_common::AF_INET,
            tgid: 5,
            cgroup_id: 6,
        };
        assert_eq!(OrigDst::from(o).dest, "10.9.8.7:443".parse().expect("sa"));
    }
}
