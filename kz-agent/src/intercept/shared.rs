//! The shared program set: kz's eBPF programs and their maps, loaded and verified once per kz
//! build and pinned in bpffs, then opened by every kz instance. Opening pins is a few syscalls;
//! loading is the verifier, map creation and kernel-BTF parsing (tens of milliseconds), which
//! used to be most of `kz run --blind`'s start-up.
//!
//! ```text
//! /sys/fs/bpf/<scope>/shared-<build>/progs/<PROGRAM>
//! /sys/fs/bpf/<scope>/shared-<build>/maps/<MAP>
//! ```
//! `<build>` is the first 16 hex digits of the SHA-256 of the eBPF object (computed by build.rs),
//! with `-debug` appended when the programs were loaded with their debug logging on: a kz built
//! from other eBPF code, whose maps may be laid out differently, never opens this set.
//!
//! The maps are keyed by cgroup id, so one set serves every instance; an instance writes and
//! removes only the entries of its own cgroups, and [`cleanup_stale`] removes those of dead
//! instances. Block events are the exception: a ring buffer has one reader, so each running
//! instance claims a ring of its own ([`claim_ring`]): slot `n` of `KZ_EVENT_RINGS`, locked by an
//! `flock` on `rings/<n>` in the set's directory for as long as the instance lives (the kernel
//! drops the lock when the process dies, however it dies). Its cgroups' policies name the slot.
//! Rings stay in their slots for the next instances: filling a slot of a map-of-maps costs an RCU
//! grace period (~10 ms), paid once per slot instead of twice per run.
//!
//! A set is created under an exclusive `flock` on `/sys/fs/bpf/<scope>`, in a temporary
//! directory renamed into place when complete: a set directory that exists is whole. Instances
//! open the set and make their own directories under a shared lock, so [`unload`] (exclusive,
//! and only when no live instance exists) never removes a set between an instance's check and
//! its use. Once open, an instance holds file descriptors: removing the pins later does not
//! disturb it (the kernel frees programs and maps when the last reference goes).

use super::InterceptError;
use super::allowed::AllowMap;
use super::kbtf;
use super::maps::OrigDstTable;
use super::pins::{self, Scope, StaleReport};
use super::rawbpf;
use aya::maps::{ArrayOfMaps, HashMap, LpmTrie, Map, MapData, MapError, RingBuf, SkStorage};
use aya::programs::{
    CgroupSock, CgroupSockAddr, CgroupSockAddrAttachType, CgroupSockAttachType, ProgramError,
    SockOps,
};
use kz_common::{
    CgroupPolicy, Lpm4, Lpm6, PortKey, UnixAbstractKey, UnixPathKey, map_names as mn,
    prog_names as pn,
};
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// kz's eBPF programs, built by kz-agent/build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kz-ebpf"));

/// SHA-256 of [`OBJECT`] in hex, computed by build.rs.
const OBJECT_SHA256: &str = include_str!(concat!(env!("OUT_DIR"), "/kz-ebpf.sha256"));

/// Directory names of program sets start with this.
pub const SET_PREFIX: &str = "shared-";

/// The cgroup sock_addr programs with their attach types, in attach order.
pub(crate) const SOCK_ADDR_PROGS: [(&str, CgroupSockAddrAttachType); 10] = [
    (pn::CONNECT4, CgroupSockAddrAttachType::Connect4),
    (pn::CONNECT6, CgroupSockAddrAttachType::Connect6),
    (pn::SENDMSG4, CgroupSockAddrAttachType::UDPSendMsg4),
    (pn::SENDMSG6, CgroupSockAddrAttachType::UDPSendMsg6),
    (pn::RECVMSG4, CgroupSockAddrAttachType::UDPRecvMsg4),
    (pn::RECVMSG6, CgroupSockAddrAttachType::UDPRecvMsg6),
    (pn::GETPEERNAME4, CgroupSockAddrAttachType::GetPeerName4),
    (pn::GETPEERNAME6, CgroupSockAddrAttachType::GetPeerName6),
    (pn::BIND4, CgroupSockAddrAttachType::Bind4),
    (pn::BIND6, CgroupSockAddrAttachType::Bind6),
];

/// The unix-socket programs with their attach types (cgroup/connect_unix and
/// cgroup/sendmsg_unix). aya 0.14 cannot load these attach types: they are loaded by hand
/// ([`rawbpf`]) and attached per cgroup like the others.
pub(crate) const UNIX_PROGS: [(&str, u32); 2] = [
    (pn::UNIX_CONNECT, rawbpf::ATTACH_UNIX_CONNECT),
    (pn::UNIX_SENDMSG, rawbpf::ATTACH_UNIX_SENDMSG),
];

/// Whether unix-socket rules are enforced by a program set, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixGuard {
    /// The cgroup/connect_unix and cgroup/sendmsg_unix programs are loaded and attached to
    /// every guarded cgroup.
    Enforced,
    /// They are not; the reason says what to do about it.
    Unavailable(String),
}

/// This build's id: 16 hex digits of the eBPF object's SHA-256.
pub fn build_id() -> &'static str {
    OBJECT_SHA256.get(..16).unwrap_or(OBJECT_SHA256)
}

/// The directory name of this build's set (`debug`: programs log at debug level).
pub fn set_name(debug: bool) -> String {
    format!(
        "{SET_PREFIX}{}{}",
        build_id(),
        if debug { "-debug" } else { "" }
    )
}

/// Directory names of sets being created start with this (bpffs refuses names with a dot).
const TMP_PREFIX: &str = "tmp-";

/// Whether a directory name is a set (of any build) or a set being created.
fn is_set_dir(name: &str) -> bool {
    name.starts_with(SET_PREFIX) || name.starts_with(&format!("{TMP_PREFIX}{SET_PREFIX}"))
}

pub(crate) fn program_err(name: &'static str, e: ProgramError) -> InterceptError {
    let detail = match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // The verifier's conclusion is at the end of its log.
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("{io_error}; verifier: {}", tail.join(" | "))
        }
        other => error_chain(&other),
    };
    InterceptError::Program { name, detail }
}

/// An error with its sources (the syscall's errno is in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(MapError) -> InterceptError {
    move |e| InterceptError::Map {
        name,
        detail: error_chain(&e),
    }
}

fn pin_err(path: &Path) -> impl Fn(aya::pin::PinError) -> InterceptError + '_ {
    move |e| InterceptError::Pin {
        path: path.to_path_buf(),
        detail: error_chain(&e),
    }
}

/// An `flock` on `/sys/fs/bpf/<scope>` (bpffs holds no plain files, but a directory can be
/// locked). Released when dropped.
pub(crate) struct ScopeLock(#[allow(dead_code)] Flock<std::fs::File>);

impl ScopeLock {
    fn take(root: &Path, arg: FlockArg) -> Result<ScopeLock, InterceptError> {
        let dir = std::fs::File::open(root).map_err(|e| InterceptError::io("open", root, e))?;
        Flock::lock(dir, arg)
            .map(ScopeLock)
            .map_err(|(_, errno)| InterceptError::io("lock", root, errno.into()))
    }

    pub(crate) fn shared(root: &Path) -> Result<ScopeLock, InterceptError> {
        ScopeLock::take(root, FlockArg::LockShared)
    }

    pub(crate) fn exclusive(root: &Path) -> Result<ScopeLock, InterceptError> {
        ScopeLock::take(root, FlockArg::LockExclusive)
    }
}

/// The programs of a set, ready to attach.
pub(crate) struct Programs {
    pub sock_addr: Vec<(&'static str, CgroupSockAddr)>,
    pub sock_ops: SockOps,
    pub sock_create: CgroupSock,
    /// The unix-socket programs with their attach types (empty where unavailable).
    pub unix: Vec<(&'static str, OwnedFd, u32)>,
}

/// The maps of a set that user space writes or reads.
pub(crate) struct SharedMaps {
    pub policy: HashMap<MapData, u64, CgroupPolicy>,
    pub ports: HashMap<MapData, PortKey, u8>,
    pub allow4: LpmTrie<MapData, Lpm4, u8>,
    pub deny4: LpmTrie<MapData, Lpm4, u8>,
    pub allow6: LpmTrie<MapData, Lpm6, u8>,
    pub deny6: LpmTrie<MapData, Lpm6, u8>,
    pub allowed: AllowMap,
    pub orig: OrigDstTable,
    /// Block-event rings by slot (see [`claim_ring`]).
    pub rings: ArrayOfMaps<MapData, MapData>,
    /// kz's own sockets (see [`super::mark_as_kz`]).
    pub own_sockets: SkStorage<MapData, u32>,
    pub unix_paths: LpmTrie<MapData, UnixPathKey, u8>,
    pub unix_abstract: HashMap<MapData, UnixAbstractKey, u8>,
    /// Ids of every pinned map (for [`super::loader::KernelIds`]).
    pub ids: Vec<u32>,
}

fn open_map(dir: &Path, name: &'static str, ids: &mut Vec<u32>) -> Result<Map, InterceptError> {
    let data = MapData::from_pin(dir.join("maps").join(name)).map_err(map_err(name))?;
    if let Ok(info) = data.info() {
        ids.push(info.id());
    }
    Map::from_map_data(data).map_err(map_err(name))
}

impl SharedMaps {
    /// Opens the pinned maps of the set in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<SharedMaps, InterceptError> {
        let mut ids = Vec::new();
        let mut open = |name| open_map(dir, name, &mut ids);
        let policy = HashMap::try_from(open(mn::POLICY)?).map_err(map_err(mn::POLICY))?;
        let ports = HashMap::try_from(open(mn::PORTS)?).map_err(map_err(mn::PORTS))?;
        let allow4 = LpmTrie::try_from(open(mn::ALLOW4)?).map_err(map_err(mn::ALLOW4))?;
        let deny4 = LpmTrie::try_from(open(mn::DENY4)?).map_err(map_err(mn::DENY4))?;
        let allow6 = LpmTrie::try_from(open(mn::ALLOW6)?).map_err(map_err(mn::ALLOW6))?;
        let deny6 = LpmTrie::try_from(open(mn::DENY6)?).map_err(map_err(mn::DENY6))?;
        let allowed = AllowMap::new(
            HashMap::try_from(open(mn::ALLOWED_IPS)?).map_err(map_err(mn::ALLOWED_IPS))?,
        );
        let orig = OrigDstTable::new(
            HashMap::try_from(open(mn::ORIG_BY_PEER)?).map_err(map_err(mn::ORIG_BY_PEER))?,
        );
        let rings =
            ArrayOfMaps::try_from(open(mn::EVENT_RINGS)?).map_err(map_err(mn::EVENT_RINGS))?;
        let own_sockets =
            SkStorage::try_from(open(mn::OWN_SOCKETS)?).map_err(map_err(mn::OWN_SOCKETS))?;
        let unix_paths =
            LpmTrie::try_from(open(mn::UNIX_PATHS)?).map_err(map_err(mn::UNIX_PATHS))?;
        let unix_abstract =
            HashMap::try_from(open(mn::UNIX_ABSTRACT)?).map_err(map_err(mn::UNIX_ABSTRACT))?;
        // Opened for their ids only: the programs alone use them.
        for name in [mn::ORIG_BY_COOKIE, mn::DNS_ORIG] {
            open(name)?;
        }
        Ok(SharedMaps {
            policy,
            ports,
            allow4,
            deny4,
            allow6,
            deny6,
            allowed,
            orig,
            rings,
            own_sockets,
            unix_paths,
            unix_abstract,
            ids,
        })
    }

    /// Removes every entry keyed by one of `ids` (cgroups of dead instances) from the per-cgroup
    /// maps. Best effort: an entry left behind names a cgroup id the kernel never reuses.
    pub(crate) fn purge_cgroups(&mut self, ids: &BTreeSet<u64>) {
        fn doomed<K: Copy>(
            keys: impl Iterator<Item = Result<K, MapError>>,
            hit: impl Fn(&K) -> bool,
        ) -> Vec<K> {
            keys.filter_map(Result::ok).filter(|k| hit(k)).collect()
        }
        for k in doomed(self.policy.keys(), |k| ids.contains(k)) {
            let _ = self.policy.remove(&k);
        }
        for k in doomed(self.ports.keys(), |k| ids.contains(&k.cgroup_id)) {
            let _ = self.ports.remove(&k);
        }
        for trie in [&mut self.allow4, &mut self.deny4] {
            for k in doomed(trie.keys(), |k| {
                ids.contains(&u64::from_be_bytes(k.data().cgroup_id))
            }) {
                let _ = trie.remove(&k);
            }
        }
        for trie in [&mut self.allow6, &mut self.deny6] {
            for k in doomed(trie.keys(), |k| {
                ids.contains(&u64::from_be_bytes(k.data().cgroup_id))
            }) {
                let _ = trie.remove(&k);
            }
        }
        for id in ids {
            self.allowed.purge(*id, &[]);
        }
        for k in doomed(self.unix_paths.keys(), |k| {
            ids.contains(&u64::from_be_bytes(k.data().cgroup_id))
        }) {
            let _ = self.unix_paths.remove(&k);
        }
        for k in doomed(self.unix_abstract.keys(), |k| ids.contains(&k.cgroup_id)) {
            let _ = self.unix_abstract.remove(&k);
        }
    }
}

/// An opened set.
pub(crate) struct SharedSet {
    pub dir: PathBuf,
    pub progs: Programs,
    pub maps: SharedMaps,
    pub program_ids: Vec<u32>,
    pub unix: UnixGuard,
}

impl SharedSet {
    /// Opens the set pinned in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<SharedSet, InterceptError> {
        let path = |name: &str| dir.join("progs").join(name);
        let mut program_ids = Vec::with_capacity(10);
        let mut sock_addr = Vec::with_capacity(SOCK_ADDR_PROGS.len());
        for (name, attach) in SOCK_ADDR_PROGS {
            let prog =
                CgroupSockAddr::from_pin(path(name), attach).map_err(|e| program_err(name, e))?;
            program_ids.push(prog.info().map_err(|e| program_err(name, e))?.id());
            sock_addr.push((name, prog));
        }
        let sock_ops =
            SockOps::from_pin(path(pn::SOCK_OPS)).map_err(|e| program_err(pn::SOCK_OPS, e))?;
        program_ids.push(
            sock_ops
                .info()
                .map_err(|e| program_err(pn::SOCK_OPS, e))?
                .id(),
        );
        let sock_create =
            CgroupSock::from_pin(path(pn::SOCK_CREATE), CgroupSockAttachType::SockCreate)
                .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        program_ids.push(
            sock_create
                .info()
                .map_err(|e| program_err(pn::SOCK_CREATE, e))?
                .id(),
        );
        // The unix programs exist where the kernel has the hooks (they are made with the set).
        let mut unix_progs = Vec::new();
        let mut unix = UnixGuard::Enforced;
        for (name, attach) in UNIX_PROGS {
            match rawbpf::obj_get(&path(name)) {
                Ok(fd) => {
                    if let Some(id) = rawbpf::obj_id(fd.as_fd()) {
                        program_ids.push(id);
                    }
                    unix_progs.push((name, fd, attach));
                }
                Err(_) => {
                    unix = UnixGuard::Unavailable(unix_unavailable().unwrap_or_else(|| {
                        format!(
                            "the program set {} was made without its unix-socket programs (see kz's log from when it was loaded; `kz intercept unload` lets the next run retry)",
                            dir.display()
                        )
                    }));
                    unix_progs.clear();
                    break;
                }
            }
        }
        Ok(SharedSet {
            dir: dir.to_path_buf(),
            progs: Programs {
                sock_addr,
                sock_ops,
                sock_create,
                unix: unix_progs,
            },
            maps: SharedMaps::open(dir)?,
            program_ids,
            unix,
        })
    }
}

/// Opens this build's set in `scope`, loading and pinning it first when it does not exist yet,
/// and runs `setup` on it (the instance makes its own directories and claims its event ring)
/// while the scope is locked, so no [`unload`] runs in between.
pub(crate) fn acquire<T>(
    scope: &Scope,
    debug: bool,
    setup: impl FnOnce(&mut SharedSet) -> Result<T, InterceptError>,
) -> Result<(SharedSet, T), InterceptError> {
    let root = scope.pin_root();
    std::fs::create_dir_all(&root).map_err(|e| InterceptError::io("create", &root, e))?;
    let name = set_name(debug);
    let dir = root.join(&name);
    let lock = ScopeLock::shared(&root)?;
    let (mut set, _lock) = match SharedSet::open(&dir) {
        Ok(set) => (set, lock),
        Err(first) => {
            drop(lock);
            let lock = ScopeLock::exclusive(&root)?;
            // Another instance may have made it while this one waited for the lock.
            let set = match SharedSet::open(&dir) {
                Ok(set) => set,
                Err(_) => {
                    if dir.exists() {
                        tracing::warn!(
                            "replacing the unusable eBPF program set {}: {first}",
                            dir.display()
                        );
                    }
                    create(&root, &name, debug)?;
                    SharedSet::open(&dir)?
                }
            };
            (set, lock)
        }
    };
    let extra = setup(&mut set)?;
    Ok((set, extra))
}

/// A claimed event ring: its slot, the ring, and the lock that keeps other instances off it
/// (shared with the reader, so it is held until both the interceptor and its
/// [`super::BlockEvents`] are gone).
pub(crate) struct RingSlot {
    pub index: u32,
    pub ring: MapData,
    pub lock: Arc<Flock<std::fs::File>>,
}

impl RingSlot {
    /// A reader on the ring, after discarding what a previous owner left unread.
    pub(crate) fn reader(&self) -> Result<RingBuf<MapData>, InterceptError> {
        let dup = self
            .ring
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| InterceptError::io("duplicate", "the event ring's fd", e))?;
        let data = MapData::from_fd(dup).map_err(map_err(RING_NAME))?;
        let mut reader = RingBuf::try_from(Map::RingBuf(data)).map_err(map_err(RING_NAME))?;
        while reader.next().is_some() {}
        Ok(reader)
    }
}

/// Kernel name of the event rings (at most 15 characters).
const RING_NAME: &str = "kz_events";

/// Claims the first free slot of `KZ_EVENT_RINGS` (free = nobody holds the `flock` on
/// `<set>/rings/<n>`), creating its ring when the slot is still empty.
pub(crate) fn claim_ring(set: &mut SharedSet) -> Result<RingSlot, InterceptError> {
    let rings = set.dir.join("rings");
    std::fs::create_dir_all(&rings).map_err(|e| InterceptError::io("create", &rings, e))?;
    for index in 0..kz_common::MAX_EVENT_RINGS {
        let dir = rings.join(index.to_string());
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(InterceptError::io("create", &dir, e)),
        }
        let file = std::fs::File::open(&dir).map_err(|e| InterceptError::io("open", &dir, e))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
            Err((_, errno)) => return Err(InterceptError::io("lock", &dir, errno.into())),
        };
        let ring = match set.maps.rings.get(&index, 0) {
            Ok(ring) => ring,
            Err(MapError::KeyNotFound) => {
                let def = aya_obj::Map::new_from_params(
                    aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
                    0,
                    0,
                    kz_common::EVENT_RING_BYTES,
                    0,
                );
                let ring = MapData::create(def, RING_NAME, None).map_err(map_err(RING_NAME))?;
                set.maps
                    .rings
                    .set(index, &ring, 0)
                    .map_err(map_err(mn::EVENT_RINGS))?;
                ring
            }
            Err(e) => return Err(map_err(mn::EVENT_RINGS)(e)),
        };
        return Ok(RingSlot {
            index,
            ring,
            lock: Arc::new(lock),
        });
    }
    Err(InterceptError::NoEventRing(kz_common::MAX_EVENT_RINGS))
}

/// Loads the programs and pins them with their maps as `<root>/<name>`. Called with the scope
/// locked exclusively. Also removes the sets of other builds: their users hold file descriptors
/// and do not need the pins, and a set holds kernel memory for as long as it is pinned.
fn create(root: &Path, name: &str, debug: bool) -> Result<(), InterceptError> {
    let started = std::time::Instant::now();
    let dir = root.join(name);
    let tmp = root.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = pin_new_set(&tmp, debug).and_then(|()| {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| InterceptError::io("remove", &dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| InterceptError::io("rename into place", &tmp, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    tracing::info!(
        set = %dir.display(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "loaded and pinned kz's eBPF programs (once per build)"
    );
    let keep = [set_name(false), set_name(true)];
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let Some(other) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Under the exclusive lock nobody is creating a set: a temporary directory is left over
        // from a loader that died.
        if is_set_dir(&other) && !keep.contains(&other) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(set = %other, "removed another kz build's eBPF program set")
                }
                Err(e) => {
                    tracing::warn!(set = %other, "cannot remove an old eBPF program set: {e}")
                }
            }
        }
    }
    Ok(())
}

fn pin_new_set(dir: &Path, debug: bool) -> Result<(), InterceptError> {
    let progs = dir.join("progs");
    let maps = dir.join("maps");
    for d in [&progs, &maps] {
        std::fs::create_dir_all(d).map_err(|e| InterceptError::io("create", d, e))?;
    }
    // The programs' aya-log statements are debug level: only enabled (and only cost more than a
    // compare) in the debug set.
    let level: u8 = if debug {
        aya_log::Level::Debug as u8
    } else {
        aya_log::Level::Warn as u8
    };
    let mut ebpf = aya::EbpfLoader::new()
        .override_global(aya_log::LEVEL, &level, true)
        .load(OBJECT)
        .map_err(InterceptError::Object)?;
    // Each program type has its own inherent `load`; the steps around it are the same.
    macro_rules! load_and_pin {
        ($name:expr, $ty:ty) => {{
            let name = $name;
            let prog: &mut $ty = ebpf
                .program_mut(name)
                .ok_or(InterceptError::Missing(name))?
                .try_into()
                .map_err(|e| program_err(name, e))?;
            prog.load().map_err(|e| program_err(name, e))?;
            let path = progs.join(name);
            prog.pin(&path).map_err(pin_err(&path))?;
        }};
    }
    for (name, _) in SOCK_ADDR_PROGS {
        load_and_pin!(name, CgroupSockAddr);
    }
    load_and_pin!(pn::SOCK_OPS, SockOps);
    load_and_pin!(pn::SOCK_CREATE, CgroupSock);
    for name in mn::ALL {
        let map = ebpf.map(name).ok_or(InterceptError::Missing(name))?;
        let path = maps.join(name);
        map.pin(&path).map_err(pin_err(&path))?;
    }
    // Unix-socket rules need the unix hooks (Linux >= 6.7). Without them the set works for
    // everything else and says so (`kz doctor`, this warning and one per guarded cgroup with
    // unix rules); the other containment layers (the agent's mount namespace) remain.
    if let Err(why) = load_unix_progs(&ebpf, dir) {
        tracing::warn!("unix-socket rules are not enforced by the kernel here: {why}");
    }
    // Dropping `ebpf` closes this process's references; the pins keep everything loaded.
    Ok(())
}

/// Why this kernel cannot run the unix-socket programs, if it cannot (before trying).
pub fn unix_unavailable() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if let Some(v) = super::doctor::kernel_version(release.trim())
        && v < (6, 7)
    {
        return Some(format!(
            "Linux {} has no cgroup/connect_unix hook (6.7 and later do): upgrade the kernel",
            release.trim()
        ));
    }
    let btf = match kbtf::Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(e) => return Some(e.to_string()),
    };
    kbtf::check_sock_addr_kern(&btf)
        .err()
        .map(|e| e.to_string())
}

/// Loads the unix-socket programs (by hand: aya has no such attach types) against the maps of
/// the set being made in `dir`, and pins them in its `progs/`.
fn load_unix_progs(ebpf: &aya::Ebpf, dir: &Path) -> Result<(), String> {
    if let Some(why) = unix_unavailable() {
        return Err(why);
    }
    // Every map of the object, by name, as a descriptor: pinned for a moment under names bpffs
    // takes (it refuses dots, as in `.rodata`), opened, and unpinned again.
    let scratch = dir.join("maps-all");
    std::fs::create_dir_all(&scratch).map_err(|e| format!("create {}: {e}", scratch.display()))?;
    let opened = (|| {
        let mut fds: Vec<(String, MapData)> = Vec::new();
        for (name, map) in ebpf.maps() {
            let pin: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let path = scratch.join(format!("{}-{pin}", fds.len()));
            map.pin(&path).map_err(|e| format!("pin map {name}: {e}"))?;
            let data = MapData::from_pin(&path).map_err(|e| format!("open map {name}: {e}"))?;
            fds.push((name.to_owned(), data));
        }
        Ok::<_, String>(fds)
    })();
    // Gone whatever happened: the descriptors (or the maps' other users) keep the maps alive.
    let _ = std::fs::remove_dir_all(&scratch);
    let fds = opened?;
    let fd_of = |name: &str| -> Option<RawFd> {
        fds.iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.fd().as_fd().as_raw_fd())
    };
    let names: Vec<&str> = UNIX_PROGS.iter().map(|(n, _)| *n).collect();
    let code = rawbpf::relocated(OBJECT, &names, fd_of).map_err(|e| e.to_string())?;
    for ((name, attach), (insns, license)) in UNIX_PROGS.iter().zip(code) {
        let fd = rawbpf::prog_load(name, &insns, &license, *attach).map_err(|e| e.to_string())?;
        let path = dir.join("progs").join(name);
        rawbpf::obj_pin(fd.as_fd(), &path).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The `OWN_SOCKETS` storage of every set of this build in `scope` (normal and debug): where
/// [`super::mark_as_kz`] registers a socket, since either set may guard the cgroup it is used in.
pub(crate) fn own_socket_maps(scope: &Scope) -> Vec<SkStorage<MapData, u32>> {
    [false, true]
        .into_iter()
        .map(|debug| {
            scope
                .pin_root()
                .join(set_name(debug))
                .join("maps")
                .join(mn::OWN_SOCKETS)
        })
        .filter_map(|p| MapData::from_pin(p).ok())
        .filter_map(|data| Map::from_map_data(data).ok())
        .filter_map(|map| SkStorage::try_from(map).ok())
        .collect()
}

/// Opens the maps of this build's sets present in `scope` (normal and debug), for cleanup.
/// Cleans up after instances that died without an orderly exit ([`pins::cleanup_dead`]),
/// removing their entries from this build's shared maps. Only this build's sets: another
/// build's maps may have other key layouts (and the next set that build or this one creates
/// removes them anyway).
pub fn cleanup_stale(scope: &Scope) -> Result<StaleReport, InterceptError> {
    let mut sets: Option<Vec<SharedMaps>> = None;
    pins::cleanup_dead(scope, &mut |ids| {
        for set in sets.get_or_insert_with(|| open_build_maps(scope)) {
            set.purge_cgroups(ids);
        }
    })
}

fn open_build_maps(scope: &Scope) -> Vec<SharedMaps> {
    [false, true]
        .into_iter()
        .map(|debug| scope.pin_root().join(set_name(debug)))
        .filter(|d| d.is_dir())
        .filter_map(|d| match SharedMaps::open(&d) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("cannot open {} to clean it: {e}", d.display());
                None
            }
        })
        .collect()
}

/// What [`unload`] did.
#[derive(Debug, Default)]
pub struct UnloadReport {
    /// Program sets removed (directory names).
    pub removed: Vec<String>,
    /// Dead instances cleaned up first.
    pub stale: StaleReport,
}

/// Removes every program set of `scope` (all builds) once no live kz instance uses the scope,
/// after cleaning up dead instances. Programs still attached somewhere stay in the kernel until
/// detached; what is unpinned here is only the means for new instances to reuse them.
pub fn unload(scope: &Scope) -> Result<UnloadReport, InterceptError> {
    let root = scope.pin_root();
    if !root.is_dir() {
        return Ok(UnloadReport::default());
    }
    let _lock = ScopeLock::exclusive(&root)?;
    let stale = cleanup_stale(scope)?;
    let live = pins::live_instances(scope);
    if !live.is_empty() {
        return Err(InterceptError::InUse(live));
    }
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(&root)
        .map_err(|e| InterceptError::io("read", &root, e))?
        .flatten()
    {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if is_set_dir(&name) {
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| InterceptError::io("remove", entry.path(), e))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(UnloadReport { removed, stale })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_carry_the_build_and_the_log_level() {
        assert_eq!(build_id().len(), 16);
        assert!(build_id().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(set_name(false), format!("shared-{}", build_id()));
        assert_eq!(set_name(true), format!("shared-{}-debug", build_id()));
        assert!(is_set_dir(&set_name(false)) && is_set_dir("tmp-shared-0123-1"));
        assert!(!is_set_dir("123-456-0"));
        // A set name is never taken for an instance (cleanup only judges instance names).
        assert!(pins::Instance::parse(&set_name(false)).is_none());
    }
}
