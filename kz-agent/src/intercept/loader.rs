//! [`Interceptor`]: loads kz's eBPF object once and attaches it to the cgroups it creates.

use super::InterceptError;
use super::cgroups::{self, Cgroup};
use super::events::BlockEvents;
use super::logs;
use super::maps::{AllowMap, LpmKey, OrigDstTable, Policy, lpm_key};
use super::pins::{self, Instance, Scope};
use aya::Ebpf;
use aya::maps::{HashMap, LpmTrie, MapData, RingBuf, lpm_trie::Key};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps};
use kz_common::{CgroupPolicy, Lpm4, Lpm6, PortKey, map_names as mn, prog_names as pn};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// kz's eBPF programs, built by kz-agent/build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kz-ebpf"));

/// The cgroup sock_addr programs, attached to every cgroup, in attach order.
const SOCK_ADDR_PROGS: [&str; 8] = [
    pn::CONNECT4,
    pn::CONNECT6,
    pn::SENDMSG4,
    pn::SENDMSG6,
    pn::RECVMSG4,
    pn::RECVMSG6,
    pn::GETPEERNAME4,
    pn::GETPEERNAME6,
];

/// aya attaches through bpf_link_create on Linux >= 5.7; that syscall rejects any attach flag
/// (EINVAL) and bpf_links always coexist with other programs, so "Single" (= no flag) is the
/// mode that works and it still composes with other programs in the subtree.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// How long removal waits for killed processes to leave a cgroup.
const KILL_WAIT: Duration = Duration::from_secs(3);

struct CgroupState {
    cgroup: Cgroup,
    policy: Policy,
    links: Vec<PinnedLink>,
    link_ids: Vec<u32>,
}

/// Kernel object ids of an interceptor, for checking that they are gone after it is dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelIds {
    pub programs: Vec<u32>,
    pub maps: Vec<u32>,
    pub links: Vec<u32>,
}

/// The loaded programs and the cgroups they guard. See the module docs for the model.
pub struct Interceptor {
    ebpf: Ebpf,
    cgroup_root: PathBuf,
    /// `/sys/fs/bpf/kz/<instance>`
    pin_dir: PathBuf,
    /// `<cgroup root>/kz/<instance>`
    cgroup_dir: PathBuf,
    policy: HashMap<MapData, u64, CgroupPolicy>,
    ports: HashMap<MapData, PortKey, u8>,
    allow4: LpmTrie<MapData, Lpm4, u8>,
    deny4: LpmTrie<MapData, Lpm4, u8>,
    allow6: LpmTrie<MapData, Lpm6, u8>,
    deny6: LpmTrie<MapData, Lpm6, u8>,
    allowed: AllowMap,
    orig: OrigDstTable,
    events: Option<RingBuf<MapData>>,
    cgroups: BTreeMap<u64, CgroupState>,
    program_ids: Vec<u32>,
    map_ids: Vec<u32>,
    /// Forwards the programs' aya-log records to tracing; stops when dropped.
    _log_thread: Option<logs::LogThread>,
}

fn program_err(name: &'static str, e: ProgramError) -> InterceptError {
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
        other => {
            // Include the source chain: the syscall's errno is in the source.
            let mut msg = other.to_string();
            let mut src = std::error::Error::source(&other);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        }
    };
    InterceptError::Program { name, detail }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> InterceptError {
    move |e| InterceptError::Map {
        name,
        detail: e.to_string(),
    }
}

impl Interceptor {
    /// Loads the programs on the detected cgroup v2 hierarchy, after cleaning up what dead kz
    /// instances left behind. Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    pub fn load() -> Result<Interceptor, InterceptError> {
        Interceptor::load_in(&Scope::detect()?)
    }

    /// [`Interceptor::load`] in an explicit [`Scope`] (cgroup v2 mount point and state name).
    pub fn load_in(scope: &Scope) -> Result<Interceptor, InterceptError> {
        pins::ensure_bpffs()?;
        let cgroup_root = scope.cgroup_root.as_path();
        match pins::cleanup_stale(scope) {
            Ok(r) if !r.instances.is_empty() => {
                tracing::warn!(instances = ?r.instances, killed = r.killed, "cleaned up after dead kz instances");
            }
            Ok(_) => {}
            // A busy stale cgroup stays cut off; it does not stop this instance.
            Err(e) => tracing::warn!("stale kz state not fully cleaned: {e}"),
        }
        let instance = Instance::current()?;
        let pin_dir = scope.pin_root().join(instance.name());
        let cgroup_dir = scope.cgroup_parent().join(instance.name());
        let result = Self::load_inner(cgroup_root, &pin_dir, &cgroup_dir);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&pin_dir);
            let _ = cgroups::remove_tree(&cgroup_dir);
        }
        result
    }

    fn load_inner(
        cgroup_root: &Path,
        pin_dir: &Path,
        cgroup_dir: &Path,
    ) -> Result<Interceptor, InterceptError> {
        for d in [pin_dir.join("maps"), pin_dir.join("links")] {
            std::fs::create_dir_all(&d).map_err(|e| InterceptError::io("create", &d, e))?;
        }
        std::fs::create_dir_all(cgroup_dir)
            .map_err(|e| InterceptError::io("create cgroup", cgroup_dir, e))?;
        // The programs' aya-log statements are debug level: only enabled (and only cost more than
        // a compare) when kz itself logs at debug.
        let level: u8 = if tracing::enabled!(tracing::Level::DEBUG) {
            aya_log::Level::Debug as u8
        } else {
            aya_log::Level::Warn as u8
        };
        let mut ebpf = aya::EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)
            .map_err(InterceptError::Object)?;
        let mut program_ids = Vec::new();
        for name in SOCK_ADDR_PROGS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(InterceptError::Missing(name))?
                .try_into()
                .map_err(|e| program_err(name, e))?;
            prog.load().map_err(|e| program_err(name, e))?;
            program_ids.push(prog.info().map_err(|e| program_err(name, e))?.id());
        }
        let ops: &mut SockOps = ebpf
            .program_mut(pn::SOCK_OPS)
            .ok_or(InterceptError::Missing(pn::SOCK_OPS))?
            .try_into()
            .map_err(|e| program_err(pn::SOCK_OPS, e))?;
        ops.load().map_err(|e| program_err(pn::SOCK_OPS, e))?;
        program_ids.push(ops.info().map_err(|e| program_err(pn::SOCK_OPS, e))?.id());
        let create: &mut CgroupSock = ebpf
            .program_mut(pn::SOCK_CREATE)
            .ok_or(InterceptError::Missing(pn::SOCK_CREATE))?
            .try_into()
            .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        create.load().map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        program_ids.push(
            create
                .info()
                .map_err(|e| program_err(pn::SOCK_CREATE, e))?
                .id(),
        );

        let mut map_ids = Vec::new();
        for name in mn::ALL {
            let map = ebpf.map(name).ok_or(InterceptError::Missing(name))?;
            let path = pin_dir.join("maps").join(name);
            map.pin(&path).map_err(|e| InterceptError::Pin {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            if let Ok(info) = aya::maps::MapInfo::from_pin(&path) {
                map_ids.push(info.id());
            }
        }
        // The log ring and the .data section (AYA_LOG_LEVEL) are not pinned: the programs hold
        // them. Their ids are still ours to account for.
        for (name, map) in ebpf.maps() {
            if !mn::ALL.contains(&name)
                && let Ok(id) = map_info(map)
            {
                map_ids.push(id);
            }
        }
        let log_thread = logs::spawn(&mut ebpf);
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(InterceptError::Missing(name));
        let policy = HashMap::try_from(take(mn::POLICY)?).map_err(map_err(mn::POLICY))?;
        let ports = HashMap::try_from(take(mn::PORTS)?).map_err(map_err(mn::PORTS))?;
        let allow4 = LpmTrie::try_from(take(mn::ALLOW4)?).map_err(map_err(mn::ALLOW4))?;
        let deny4 = LpmTrie::try_from(take(mn::DENY4)?).map_err(map_err(mn::DENY4))?;
        let allow6 = LpmTrie::try_from(take(mn::ALLOW6)?).map_err(map_err(mn::ALLOW6))?;
        let deny6 = LpmTrie::try_from(take(mn::DENY6)?).map_err(map_err(mn::DENY6))?;
        let allowed = AllowMap::new(
            HashMap::try_from(take(mn::ALLOWED_IPS)?).map_err(map_err(mn::ALLOWED_IPS))?,
        );
        let orig = OrigDstTable::new(
            HashMap::try_from(take(mn::ORIG_BY_PEER)?).map_err(map_err(mn::ORIG_BY_PEER))?,
        );
        let events = RingBuf::try_from(take(mn::EVENTS)?).map_err(map_err(mn::EVENTS))?;
        Ok(Interceptor {
            ebpf,
            cgroup_root: cgroup_root.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            cgroup_dir: cgroup_dir.to_path_buf(),
            policy,
            ports,
            allow4,
            deny4,
            allow6,
            deny6,
            allowed,
            orig,
            events: Some(events),
            cgroups: BTreeMap::new(),
            program_ids,
            map_ids,
            _log_thread: log_thread,
        })
    }

    /// The cgroup v2 mount point in use.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// This instance's pin directory, `/sys/fs/bpf/kz/<instance>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The parent of this instance's cgroups, `<cgroup root>/kz/<instance>`.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// Creates `<cgroup root>/kz/<instance>/<name>`, writes its policy and attaches the programs
    /// (links pinned). Processes placed in it afterwards are intercepted.
    pub fn create_cgroup(&mut self, name: &str, policy: &Policy) -> Result<Cgroup, InterceptError> {
        if !cgroups::valid_name(name) {
            return Err(InterceptError::BadName(name.to_owned()));
        }
        let path = self.cgroup_dir.join(name);
        let id = cgroups::create(&path)?;
        let cgroup = Cgroup {
            id,
            path: path.clone(),
            name: name.to_owned(),
        };
        self.cgroups.insert(
            id,
            CgroupState {
                cgroup: cgroup.clone(),
                policy: Policy::default(),
                links: Vec::new(),
                link_ids: Vec::new(),
            },
        );
        // Policy first: an attached cgroup never runs without one (and none means deny anyway).
        let result = self
            .set_policy(id, policy)
            .and_then(|()| self.attach(id, &path));
        if let Err(e) = result {
            let _ = self.remove_cgroup(id);
            return Err(e);
        }
        Ok(cgroup)
    }

    fn attach(&mut self, id: u64, path: &Path) -> Result<(), InterceptError> {
        let file =
            std::fs::File::open(path).map_err(|e| InterceptError::io("open cgroup", path, e))?;
        let links_dir = self.pin_dir.join("links");
        let mut fd_links: Vec<(&'static str, FdLink)> = Vec::new();
        for name in SOCK_ADDR_PROGS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(InterceptError::Missing(name))?
                .try_into()
                .map_err(|e| program_err(name, e))?;
            let link_id = prog
                .attach(&file, LINK_MODE)
                .map_err(|e| program_err(name, e))?;
            let link = prog.take_link(link_id).map_err(|e| program_err(name, e))?;
            let fd: FdLink = link
                .try_into()
                .map_err(
                    |e: aya::programs::links::LinkError| InterceptError::Program {
                        name,
                        detail: format!("not a bpf_link (kernel too old for pinning?): {e}"),
                    },
                )?;
            fd_links.push((name, fd));
        }
        let ops: &mut SockOps = self
            .ebpf
            .program_mut(pn::SOCK_OPS)
            .ok_or(InterceptError::Missing(pn::SOCK_OPS))?
            .try_into()
            .map_err(|e| program_err(pn::SOCK_OPS, e))?;
        let link_id = ops
            .attach(&file, LINK_MODE)
            .map_err(|e| program_err(pn::SOCK_OPS, e))?;
        let link = ops
            .take_link(link_id)
            .map_err(|e| program_err(pn::SOCK_OPS, e))?;
        let fd: FdLink = link
            .try_into()
            .map_err(
                |e: aya::programs::links::LinkError| InterceptError::Program {
                    name: pn::SOCK_OPS,
                    detail: format!("not a bpf_link: {e}"),
                },
            )?;
        fd_links.push((pn::SOCK_OPS, fd));
        let create: &mut CgroupSock = self
            .ebpf
            .program_mut(pn::SOCK_CREATE)
            .ok_or(InterceptError::Missing(pn::SOCK_CREATE))?
            .try_into()
            .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        let link_id = create
            .attach(&file, LINK_MODE)
            .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        let link = create
            .take_link(link_id)
            .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        let fd: FdLink = link
            .try_into()
            .map_err(
                |e: aya::programs::links::LinkError| InterceptError::Program {
                    name: pn::SOCK_CREATE,
                    detail: format!("not a bpf_link: {e}"),
                },
            )?;
        fd_links.push((pn::SOCK_CREATE, fd));

        let state = self
            .cgroups
            .get_mut(&id)
            .ok_or(InterceptError::UnknownCgroup(id))?;
        for (name, fd) in fd_links {
            if let Ok(info) = fd.info() {
                state.link_ids.push(info.id());
            }
            let pin = links_dir.join(format!("{id}-{name}"));
            // On error the FdLink is dropped (detached); the cgroup is rolled back by the caller.
            let pinned = fd.pin(&pin).map_err(|e| InterceptError::Pin {
                path: pin.clone(),
                detail: e.to_string(),
            })?;
            state.links.push(pinned);
        }
        Ok(())
    }

    /// Replaces a cgroup's policy. New entries are written before old ones are removed, so a
    /// deny entry present in both is never absent in between.
    pub fn set_policy(&mut self, id: u64, policy: &Policy) -> Result<(), InterceptError> {
        let old = self
            .cgroups
            .get(&id)
            .ok_or(InterceptError::UnknownCgroup(id))?
            .policy
            .clone();
        for port in policy.ports() {
            self.ports
                .insert(port_key(id, *port), 1, 0)
                .map_err(map_err(mn::PORTS))?;
        }
        for (list, allow) in [(&policy.allow, true), (&policy.deny, false)] {
            for cidr in list {
                self.trie_insert(id, cidr, allow)?;
            }
        }
        self.policy
            .insert(id, policy.kernel(), 0)
            .map_err(map_err(mn::POLICY))?;
        for port in old.ports() {
            if !policy.ports().contains(port) {
                let _ = self.ports.remove(&port_key(id, *port));
            }
        }
        for (old_list, new_list, allow) in [
            (&old.allow, &policy.allow, true),
            (&old.deny, &policy.deny, false),
        ] {
            for cidr in old_list.iter().filter(|c| !new_list.contains(c)) {
                self.trie_remove(id, cidr, allow);
            }
        }
        if let Some(state) = self.cgroups.get_mut(&id) {
            state.policy = policy.clone();
        }
        Ok(())
    }

    fn trie_insert(
        &mut self,
        id: u64,
        cidr: &super::Cidr,
        allow: bool,
    ) -> Result<(), InterceptError> {
        match lpm_key(id, cidr) {
            LpmKey::V4(p, data) => {
                let (t, n) = if allow {
                    (&mut self.allow4, mn::ALLOW4)
                } else {
                    (&mut self.deny4, mn::DENY4)
                };
                t.insert(&Key::new(p, data), 1, 0).map_err(map_err(n))
            }
            LpmKey::V6(p, data) => {
                let (t, n) = if allow {
                    (&mut self.allow6, mn::ALLOW6)
                } else {
                    (&mut self.deny6, mn::DENY6)
                };
                t.insert(&Key::new(p, data), 1, 0).map_err(map_err(n))
            }
        }
    }

    fn trie_remove(&mut self, id: u64, cidr: &super::Cidr, allow: bool) {
        match lpm_key(id, cidr) {
            LpmKey::V4(p, data) => {
                let t = if allow {
                    &mut self.allow4
                } else {
                    &mut self.deny4
                };
                let _ = t.remove(&Key::new(p, data));
            }
            LpmKey::V6(p, data) => {
                let t = if allow {
                    &mut self.allow6
                } else {
                    &mut self.deny6
                };
                let _ = t.remove(&Key::new(p, data));
            }
        }
    }

    /// The policy currently applied to a cgroup.
    pub fn policy(&self, id: u64) -> Option<&Policy> {
        self.cgroups.get(&id).map(|s| &s.policy)
    }

    /// The cgroups this interceptor guards.
    pub fn cgroups(&self) -> impl Iterator<Item = &Cgroup> {
        self.cgroups.values().map(|s| &s.cgroup)
    }

    /// Handle for kz's DNS resolver to let a cgroup reach resolved IPs.
    pub fn allow_map(&self) -> AllowMap {
        self.allowed.clone()
    }

    /// Handle for the proxy: original destination by client address.
    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.orig.clone()
    }

    /// The stream of refused connects/sendmsgs, once (one consumer). Call inside Tokio.
    pub fn block_events(&mut self) -> Result<BlockEvents, InterceptError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(InterceptError::NoRuntime);
        }
        let ring = self.events.take().ok_or(InterceptError::EventsTaken)?;
        BlockEvents::new(ring)
    }

    /// Ids of this interceptor's kernel objects (programs, maps, and links of live cgroups).
    pub fn kernel_ids(&self) -> KernelIds {
        KernelIds {
            programs: self.program_ids.clone(),
            maps: self.map_ids.clone(),
            links: self
                .cgroups
                .values()
                .flat_map(|s| s.link_ids.clone())
                .collect(),
        }
    }

    /// Kills what is left in the cgroup, detaches and unpins its programs, drops its policy
    /// entries and removes the directory. If the cgroup cannot be emptied nothing is detached
    /// (fail closed) and [`InterceptError::CgroupBusy`] is returned.
    pub fn remove_cgroup(&mut self, id: u64) -> Result<(), InterceptError> {
        let state = self
            .cgroups
            .remove(&id)
            .ok_or(InterceptError::UnknownCgroup(id))?;
        if !cgroups::kill_all(&state.cgroup.path, KILL_WAIT) {
            let path = state.cgroup.path.clone();
            self.cgroups.insert(id, state);
            return Err(InterceptError::CgroupBusy(path));
        }
        for link in state.links {
            // Unpinning returns the last reference; dropping it detaches the program.
            if let Ok(fd) = link.unpin() {
                drop(fd);
            }
        }
        let _ = self.policy.remove(&id);
        for port in state.policy.ports() {
            let _ = self.ports.remove(&port_key(id, *port));
        }
        for cidr in &state.policy.allow {
            self.trie_remove(id, cidr, true);
        }
        for cidr in &state.policy.deny {
            self.trie_remove(id, cidr, false);
        }
        self.allowed.purge(id);
        cgroups::remove_tree(&state.cgroup.path)
    }
}

fn map_info(map: &aya::maps::Map) -> Result<u32, aya::maps::MapError> {
    use aya::maps::Map;
    let data = match map {
        Map::RingBuf(m) | Map::Array(m) | Map::HashMap(m) | Map::LruHashMap(m) => m,
        Map::LpmTrie(m) => m,
        _ => {
            return Err(aya::maps::MapError::InvalidName {
                name: String::new(),
            });
        }
    };
    data.info().map(|i| i.id())
}

fn port_key(cgroup_id: u64, port: u16) -> PortKey {
    PortKey {
        cgroup_id,
        port,
        _pad: [0; 6],
    }
}

impl Drop for Interceptor {
    /// Orderly exit: removes every cgroup (see [`Interceptor::remove_cgroup`]), then the map pins
    /// and the instance directories. A cgroup that cannot be emptied keeps its pins.
    fn drop(&mut self) {
        let ids: Vec<u64> = self.cgroups.keys().copied().collect();
        let mut busy = false;
        for id in ids {
            if let Err(e) = self.remove_cgroup(id) {
                tracing::error!("leaving cgroup {id} cut off: {e}");
                busy = true;
            }
        }
        if busy {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
            tracing::warn!("cannot remove {}: {e}", self.pin_dir.display());
        }
        if let Err(e) = cgroups::remove_tree(&self.cgroup_dir) {
            tracing::warn!("{e}");
        }
        // The shared parents (`<root>/kz`, `/sys/fs/bpf/kz`) stay: removing them would race with
        // another instance creating its directories there.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other modules keep these in tasks and behind locks.
    #[test]
    fn handles_can_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<Interceptor>();
        send::<BlockEvents>();
        send_sync::<OrigDstTable>();
        send_sync::<AllowMap>();
        send_sync::<Cgroup>();
    }
}
