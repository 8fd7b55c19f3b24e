//! [`Interceptor`]: one kz instance's view of the shared program set, and the cgroups it guards.

use super::InterceptError;
use super::allowed::AllowMap;
use super::cgroups::{self, Cgroup};
use super::events::{BlockEvents, Guards};
use super::logs;
use super::maps::{LpmKey, OrigDstTable, Policy, UnixKeys, UnixSockets, lpm_key};
use super::pins::{self, Instance, Scope};
use super::rawbpf;
use super::shared::{self, RingSlot, SharedSet, UnixGuard, map_err, program_err};
use aya::maps::{MapData, RingBuf, lpm_trie::Key};
use aya::programs::CgroupAttachMode;
use aya::programs::links::{FdLink, PinnedLink};
use kz_common::{PortKey, map_names as mn, prog_names as pn};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// aya attaches through bpf_link_create on Linux >= 5.7; that syscall rejects any attach flag
/// (EINVAL) and bpf_links always coexist with other programs, so "Single" (= no flag) is the
/// mode that works and it still composes with other programs in the subtree.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// How long removal waits for killed processes to leave a cgroup.
const KILL_WAIT: Duration = Duration::from_secs(3);

struct CgroupState {
    cgroup: Cgroup,
    policy: Policy,
    /// The policy's unix rules as written to the maps (resolved to inodes at that time).
    unix_keys: UnixKeys,
    links: Vec<PinnedLink>,
    link_ids: Vec<u32>,
    /// A cgroup someone else made and owns (a Kubernetes pod's,
    /// [`Interceptor::guard_existing_cgroup`]): its policy covers its subtree (`INHERIT`), and
    /// removal detaches and forgets it but neither kills its processes nor removes the directory.
    existing: bool,
}

/// Kernel object ids of an interceptor, for checking what is left after it is dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelIds {
    /// The shared program set: stays loaded (pinned) for the next instance.
    pub programs: Vec<u32>,
    /// The shared set's maps and the instance's event ring: stay too (the ring is reused).
    pub maps: Vec<u32>,
    /// Links of the instance's live cgroups: the instance's own, gone with their cgroups.
    pub links: Vec<u32>,
}

impl KernelIds {
    /// Only what belongs to the instance itself (its links): what must be gone after an orderly
    /// exit or a stale cleanup.
    pub fn own(&self) -> KernelIds {
        KernelIds {
            links: self.links.clone(),
            ..KernelIds::default()
        }
    }
}

/// One kz instance: the shared programs and maps (opened, or loaded and pinned by the first
/// instance of this build), its own event ring, and the cgroups it guards. See the module docs.
pub struct Interceptor {
    set: SharedSet,
    cgroup_root: PathBuf,
    /// `/sys/fs/bpf/<scope>/<instance>`
    pin_dir: PathBuf,
    /// `<cgroup root>/<scope>/<instance>`
    cgroup_dir: PathBuf,
    /// This instance's event ring: its slot is written into each cgroup's policy.
    slot: RingSlot,
    events: Option<RingBuf<MapData>>,
    /// Ids of every cgroup this instance made (the event reader keeps only theirs).
    guards: Guards,
    cgroups: BTreeMap<u64, CgroupState>,
    /// Forwards the programs' aya-log records to tracing; stops when dropped.
    _log_thread: Option<logs::LogThread>,
    /// A held owner's `flock` on its pin directory: tells `kz intercept unload` it is alive
    /// ([`pins::live_instances`]).
    _held: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Interceptor {
    /// Opens kz's programs on the detected cgroup v2 hierarchy (loading and pinning them when
    /// this is the first kz instance of this build), after cleaning up what dead kz instances
    /// left behind. Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    pub fn load() -> Result<Interceptor, InterceptError> {
        Interceptor::load_in(&Scope::detect()?)
    }

    /// [`Interceptor::load`] in an explicit [`Scope`] (cgroup v2 mount point and state name).
    pub fn load_in(scope: &Scope) -> Result<Interceptor, InterceptError> {
        pins::ensure_bpffs()?;
        clean_dead(scope);
        let instance = Instance::current()?;
        let pin_dir = scope.pin_root().join(instance.name());
        let cgroup_dir = scope.cgroup_parent().join(instance.name());
        let result = Self::load_inner(scope, &pin_dir, &cgroup_dir);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&pin_dir);
            let _ = cgroups::remove_tree(&cgroup_dir);
        }
        result
    }

    /// [`Interceptor::load_in`] for an owner whose cgroups are to outlive its process (the node
    /// daemon): its directories are `/sys/fs/bpf/<scope>/<name>` and `<cgroup2>/<scope>/<name>`,
    /// under a name that is not an instance's, so no other kz ever judges them stale
    /// ([`pins::cleanup_dead`] only removes dead *instances*). What a previous process of the
    /// same owner left there (killed: cgroups with their links and map entries, cut off since)
    /// stays for [`Interceptor::adopt_cgroup`], and [`Interceptor::sweep_held`] removes the rest.
    /// The caller makes sure one process at a time uses `name` (the daemon locks its state
    /// directory). An orderly drop removes the directories as for an instance.
    pub fn load_held(scope: &Scope, name: &str) -> Result<Interceptor, InterceptError> {
        let held = name.starts_with(pins::HELD_PREFIX) && Instance::parse(name).is_none();
        if !cgroups::valid_name(name) || !held {
            return Err(InterceptError::BadName(name.to_owned()));
        }
        pins::ensure_bpffs()?;
        clean_dead(scope);
        let pin_dir = scope.pin_root().join(name);
        let cgroup_dir = scope.cgroup_parent().join(name);
        // Locked before anything else: a second process on the same name stops here, before it
        // could touch (or, dropped, remove) the first one's directories.
        std::fs::create_dir_all(&pin_dir).map_err(|e| InterceptError::io("create", &pin_dir, e))?;
        let lock = pins::lock_held(&pin_dir)?;
        // On failure the directories stay: they may hold a previous process's sandboxes, which
        // stay cut off until a later start adopts or removes them.
        let mut icpt = Self::load_inner(scope, &pin_dir, &cgroup_dir)?;
        icpt._held = Some(lock);
        Ok(icpt)
    }

    fn load_inner(
        scope: &Scope,
        pin_dir: &Path,
        cgroup_dir: &Path,
    ) -> Result<Interceptor, InterceptError> {
        // The programs log refusals at debug level, only in the set loaded for debugging (a
        // separate set, so a debug run does not make every other run log).
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        let (set, slot) = shared::acquire(scope, debug, |set| {
            let links = pin_dir.join("links");
            std::fs::create_dir_all(&links).map_err(|e| InterceptError::io("create", &links, e))?;
            std::fs::create_dir_all(cgroup_dir)
                .map_err(|e| InterceptError::io("create cgroup", cgroup_dir, e))?;
            shared::claim_ring(set)
        })?;
        let reader = slot.reader()?;
        let log_thread = if debug {
            set.program_ids.first().and_then(|id| logs::spawn(*id))
        } else {
            None
        };
        Ok(Interceptor {
            set,
            cgroup_root: scope.cgroup_root.clone(),
            pin_dir: pin_dir.to_path_buf(),
            cgroup_dir: cgroup_dir.to_path_buf(),
            slot,
            events: Some(reader),
            guards: Guards::default(),
            cgroups: BTreeMap::new(),
            _log_thread: log_thread,
            _held: None,
        })
    }

    /// The shared program set in use, `/sys/fs/bpf/<scope>/shared-<build>`.
    pub fn shared_dir(&self) -> &Path {
        &self.set.dir
    }

    /// Whether the kernel enforces [`Policy::unix`] (the BPF LSM programs of the shared set are
    /// attached), and why not if it does not.
    pub fn unix_guard(&self) -> &UnixGuard {
        &self.set.unix
    }

    /// [`super::mark_as_kz`] against this instance's program set: sets the mark and registers
    /// the socket in the set's `KZ_OWN_SOCKETS` storage.
    pub fn mark_as_kz(&mut self, socket: &impl std::os::fd::AsFd) -> Result<(), InterceptError> {
        super::set_kz_mark(socket)?;
        self.set
            .maps
            .own_sockets
            .insert(&socket.as_fd(), kz_common::OWN_SOCKET, 0)
            .map_err(map_err(mn::OWN_SOCKETS))
    }

    /// The cgroup v2 mount point in use.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// This instance's pin directory, `/sys/fs/bpf/<scope>/<instance>` (its links).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The parent of this instance's cgroups, `<cgroup root>/<scope>/<instance>`.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// Creates `<cgroup root>/<scope>/<instance>/<name>`, writes its policy and attaches the programs (links pinned). Processes placed in it afterwards are intercepted.
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
        self.guard(cgroup, policy, false)
    }

    /// Guards a cgroup that exists already and is not kz's (a Kubernetes pod's, made by the
    /// kubelet): writes `policy` for it, marked to cover its whole subtree (the pod's
    /// containers are child cgroups the runtime makes, before or after this), and attaches the
    /// programs (links pinned). [`Interceptor::remove_cgroup`] later detaches the programs and
    /// removes the policy but leaves the directory and its processes alone: its owner manages
    /// them. `name` only names it in kz's records.
    pub fn guard_existing_cgroup(
        &mut self,
        path: &Path,
        name: &str,
        policy: &Policy,
    ) -> Result<Cgroup, InterceptError> {
        if !cgroups::valid_name(name) {
            return Err(InterceptError::BadName(name.to_owned()));
        }
        if !path.starts_with(&self.cgroup_root) || !path.join("cgroup.procs").is_file() {
            return Err(InterceptError::NotACgroup(path.to_owned()));
        }
        let id = cgroups::cgroup_id(path)?;
        if self.cgroups.contains_key(&id) {
            return Err(InterceptError::AlreadyGuarded(path.to_owned()));
        }
        let cgroup = Cgroup {
            id,
            path: path.to_owned(),
            name: name.to_owned(),
        };
        self.guard(cgroup, policy, true)
    }

    /// Policy, then programs, for a cgroup this instance now guards; undone on failure.
    fn guard(
        &mut self,
        cgroup: Cgroup,
        policy: &Policy,
        existing: bool,
    ) -> Result<Cgroup, InterceptError> {
        let id = cgroup.id;
        let path = cgroup.path.clone();
        self.cgroups.insert(
            id,
            CgroupState {
                cgroup: cgroup.clone(),
                policy: Policy::default(),
                unix_keys: UnixKeys::default(),
                links: Vec::new(),
                link_ids: Vec::new(),
                existing,
            },
        );
        if let Ok(mut g) = self.guards.lock() {
            g.insert(id);
        }
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

    /// Whether the cgroup is one this instance guards but did not make
    /// ([`Self::guard_existing_cgroup`]).
    pub fn is_existing(&self, id: u64) -> bool {
        self.cgroups.get(&id).is_some_and(|s| s.existing)
    }

    /// Takes over `<cgroup dir>/<name>`, made by a previous process of this held owner
    /// ([`Interceptor::load_held`]) with id `id`. Refused ([`InterceptError::NotAdoptable`],
    /// nothing changed) unless the cgroup still has that id and processes in it, and every
    /// program of this set has its link pinned for it, attached to this very program (a set
    /// reloaded since, by `kz intercept unload` or another kz build, runs other programs over
    /// other maps: entries written here would not reach them). Then its map entries are replaced
    /// by `policy`: the old ones named the dead process's proxy and DNS ports and event ring,
    /// and its allowed IPs are dropped too (opened under rules that may have changed since, and
    /// unknown to this process's quota ledger: the agent resolves again, through the new
    /// resolver). Between the purge and the new policy the cgroup has no policy, so it is refused
    /// everything, as while its owner was down.
    pub fn adopt_cgroup(
        &mut self,
        name: &str,
        id: u64,
        policy: &Policy,
    ) -> Result<Cgroup, InterceptError> {
        if !cgroups::valid_name(name) {
            return Err(InterceptError::BadName(name.to_owned()));
        }
        let path = self.cgroup_dir.join(name);
        self.take_over(path, name, id, policy, false)
    }

    /// [`Interceptor::adopt_cgroup`] for an existing cgroup a previous process of this held
    /// owner guarded ([`Interceptor::guard_existing_cgroup`], a Kubernetes pod's): the same
    /// checks of its id and links, except that it need not hold processes (a pod between
    /// containers still is one); its policy is written with `INHERIT` again, and a failure
    /// gives it back (detached) instead of removing it. A cgroup that is gone, or was made
    /// again, is refused with `cgroup_gone`.
    pub fn adopt_existing_cgroup(
        &mut self,
        path: &Path,
        name: &str,
        id: u64,
        policy: &Policy,
    ) -> Result<Cgroup, InterceptError> {
        if !cgroups::valid_name(name) {
            return Err(InterceptError::BadName(name.to_owned()));
        }
        if !path.starts_with(&self.cgroup_root) {
            return Err(InterceptError::NotACgroup(path.to_owned()));
        }
        self.take_over(path.to_owned(), name, id, policy, true)
    }

    /// The checks and the takeover of [`Interceptor::adopt_cgroup`] and
    /// [`Interceptor::adopt_existing_cgroup`].
    fn take_over(
        &mut self,
        path: PathBuf,
        name: &str,
        id: u64,
        policy: &Policy,
        existing: bool,
    ) -> Result<Cgroup, InterceptError> {
        let refuse = |reason: &'static str, detail: String| InterceptError::NotAdoptable {
            path: path.clone(),
            reason,
            detail,
        };
        if self.cgroups.contains_key(&id) {
            return Err(refuse("duplicate", "it is adopted already".into()));
        }
        match cgroups::cgroup_id(&path) {
            Ok(found) if found == id => {}
            Ok(found) => {
                return Err(refuse(
                    "cgroup_gone",
                    format!("it has id {found}, not {id}: it was made again since"),
                ));
            }
            Err(_) => return Err(refuse("cgroup_gone", "it no longer exists".into())),
        }
        if !existing && cgroups::populated(&path) != Some(true) {
            return Err(refuse("empty", "no process is left in it".into()));
        }
        let expected = self.program_ids()?;
        let links_dir = self.pin_dir.join("links");
        let prefix = format!("{id}-");
        for e in std::fs::read_dir(&links_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let file = e.file_name();
            let Some(prog) = file.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if !expected.iter().any(|(n, _)| *n == prog) {
                return Err(refuse(
                    "program_set_changed",
                    format!("its link {prog} is of no program of the loaded set"),
                ));
            }
        }
        let mut links = Vec::with_capacity(expected.len());
        let mut link_ids = Vec::with_capacity(expected.len());
        for (prog, prog_id) in expected {
            let pin = links_dir.join(format!("{id}-{prog}"));
            let Ok(fd) = rawbpf::obj_get(&pin) else {
                return Err(refuse(
                    "links_missing",
                    format!("its link {} is not pinned", pin.display()),
                ));
            };
            if rawbpf::link_prog_id(fd.as_fd()) != Some(prog_id) {
                return Err(refuse(
                    "program_set_changed",
                    format!(
                        "its link {} runs another program than the loaded set's {prog} (the set was reloaded since, or made by another kz build)",
                        pin.display()
                    ),
                ));
            }
            if let Some(link_id) = rawbpf::obj_id(fd.as_fd()) {
                link_ids.push(link_id);
            }
            drop(fd);
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| InterceptError::Pin {
                path: pin.clone(),
                detail: e.to_string(),
            })?;
            links.push(pinned);
        }
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
                unix_keys: UnixKeys::default(),
                links,
                link_ids,
                existing,
            },
        );
        if let Ok(mut g) = self.guards.lock() {
            g.insert(id);
        }
        self.set.maps.purge_cgroups(&BTreeSet::from([id]));
        if let Err(e) = self.set_policy(id, policy) {
            let _ = self.remove_cgroup(id);
            return Err(e);
        }
        Ok(cgroup)
    }

    /// Removes what a held owner's previous process left in its directories and was not adopted
    /// ([`Interceptor::adopt_cgroup`]): as [`pins::cleanup_dead`] does for a dead instance, each
    /// such cgroup's processes are killed first, then its links unpinned, its map entries purged
    /// and the cgroup removed; a cgroup that cannot be emptied keeps its links (fail closed).
    /// Links pinned for a cgroup that no longer exists go too, and so do those of an existing
    /// cgroup not adopted ([`Interceptor::adopt_existing_cgroup`]): such a cgroup is someone
    /// else's (the kubelet's), so it is only detached, never emptied or removed.
    pub fn sweep_held(&mut self) -> Vec<Swept> {
        let mut swept = Vec::new();
        let mut purge = BTreeSet::new();
        let dirs = std::fs::read_dir(&self.cgroup_dir)
            .into_iter()
            .flatten()
            .flatten();
        for e in dirs.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            let path = e.path();
            let Ok(id) = cgroups::cgroup_id(&path) else {
                continue;
            };
            if self.cgroups.contains_key(&id) {
                continue;
            }
            let killed = cgroups::pids(&path).map(|p| p.len()).unwrap_or(0);
            let mut s = Swept {
                name: Some(e.file_name().to_string_lossy().into_owned()),
                id,
                killed,
                error: None,
            };
            if !cgroups::kill_all(&path, KILL_WAIT) {
                s.error = Some(InterceptError::CgroupBusy(path).to_string());
                swept.push(s);
                continue;
            }
            self.unpin_links_of(id);
            purge.insert(id);
            if let Err(e) = cgroups::remove_tree(&path) {
                s.error = Some(e.to_string());
            }
            swept.push(s);
        }
        // Links of a cgroup that is gone (removed by hand, or its removal was cut short).
        let links_dir = self.pin_dir.join("links");
        let mut orphans = BTreeSet::new();
        for e in std::fs::read_dir(&links_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = e
                .file_name()
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|id| id.parse::<u64>().ok());
            if let Some(id) = id
                && !self.cgroups.contains_key(&id)
                && !purge.contains(&id)
                && !swept.iter().any(|s| s.id == id)
            {
                orphans.insert(id);
            }
        }
        for id in orphans {
            self.unpin_links_of(id);
            purge.insert(id);
            swept.push(Swept {
                name: None,
                id,
                killed: 0,
                error: None,
            });
        }
        if !purge.is_empty() {
            self.set.maps.purge_cgroups(&purge);
        }
        swept
    }

    /// Unpins every link pinned for cgroup `id` (unlinking the last reference detaches it).
    fn unpin_links_of(&self, id: u64) {
        let links_dir = self.pin_dir.join("links");
        let prefix = format!("{id}-");
        for e in std::fs::read_dir(&links_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Each program of the set this instance attaches to a cgroup, with its kernel id (the
    /// names its links are pinned under).
    fn program_ids(&self) -> Result<Vec<(&'static str, u32)>, InterceptError> {
        let p = &self.set.progs;
        let mut out = Vec::with_capacity(p.sock_addr.len() + 2 + p.unix.len());
        for (name, prog) in &p.sock_addr {
            let name: &'static str = name;
            out.push((name, prog.info().map_err(|e| program_err(name, e))?.id()));
        }
        let ops = p.sock_ops.info();
        out.push((
            pn::SOCK_OPS,
            ops.map_err(|e| program_err(pn::SOCK_OPS, e))?.id(),
        ));
        let create = p.sock_create.info();
        out.push((
            pn::SOCK_CREATE,
            create.map_err(|e| program_err(pn::SOCK_CREATE, e))?.id(),
        ));
        for (name, fd, _) in &p.unix {
            let name: &'static str = name;
            let id = rawbpf::obj_id(fd.as_fd()).ok_or_else(|| InterceptError::Program {
                name,
                detail: "the kernel gave no id for it".into(),
            })?;
            out.push((name, id));
        }
        Ok(out)
    }

    fn attach(&mut self, id: u64, path: &Path) -> Result<(), InterceptError> {
        let file =
            std::fs::File::open(path).map_err(|e| InterceptError::io("open cgroup", path, e))?;
        let links_dir = self.pin_dir.join("links");
        let not_a_bpf_link = |name: &'static str| {
            move |e: aya::programs::links::LinkError| InterceptError::Program {
                name,
                detail: format!("not a bpf_link (kernel too old for pinning?): {e}"),
            }
        };
        let mut fd_links: Vec<(&'static str, FdLink)> = Vec::new();
        let progs = &mut self.set.progs;
        for (name, prog) in &mut progs.sock_addr {
            let name: &'static str = name;
            let link_id = prog
                .attach(&file, LINK_MODE)
                .map_err(|e| program_err(name, e))?;
            let link = prog.take_link(link_id).map_err(|e| program_err(name, e))?;
            fd_links.push((name, link.try_into().map_err(not_a_bpf_link(name))?));
        }
        let ops = &mut progs.sock_ops;
        let link_id = ops
            .attach(&file, LINK_MODE)
            .map_err(|e| program_err(pn::SOCK_OPS, e))?;
        let link = ops
            .take_link(link_id)
            .map_err(|e| program_err(pn::SOCK_OPS, e))?;
        fd_links.push((
            pn::SOCK_OPS,
            link.try_into().map_err(not_a_bpf_link(pn::SOCK_OPS))?,
        ));
        let create = &mut progs.sock_create;
        let link_id = create
            .attach(&file, LINK_MODE)
            .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        let link = create
            .take_link(link_id)
            .map_err(|e| program_err(pn::SOCK_CREATE, e))?;
        fd_links.push((
            pn::SOCK_CREATE,
            link.try_into().map_err(not_a_bpf_link(pn::SOCK_CREATE))?,
        ));

        // The unix-socket programs, attached by hand (aya has no such attach types) and pinned
        // like the rest; they come back as PinnedLinks, so removal is the same for all.
        let mut raw_links = Vec::with_capacity(progs.unix.len());
        for (name, prog, attach) in &progs.unix {
            let name: &'static str = name;
            let link = rawbpf::link_create(prog.as_fd(), file.as_fd(), *attach).map_err(|e| {
                InterceptError::Program {
                    name,
                    detail: e.to_string(),
                }
            })?;
            raw_links.push((name, link));
        }

        let state = self
            .cgroups
            .get_mut(&id)
            .ok_or(InterceptError::UnknownCgroup(id))?;
        for (name, link) in raw_links {
            if let Some(link_id) = rawbpf::obj_id(link.as_fd()) {
                state.link_ids.push(link_id);
            }
            let pin = links_dir.join(format!("{id}-{name}"));
            let pin_err = |detail: String| InterceptError::Pin {
                path: pin.clone(),
                detail,
            };
            rawbpf::obj_pin(link.as_fd(), &pin).map_err(|e| pin_err(e.to_string()))?;
            // The pin holds the link now; dropping `link` closes only this descriptor.
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| pin_err(e.to_string()))?;
            state.links.push(pinned);
        }
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
        let state = self
            .cgroups
            .get(&id)
            .ok_or(InterceptError::UnknownCgroup(id))?;
        let old = state.policy.clone();
        let old_unix = state.unix_keys.clone();
        let mut kernel = policy.kernel(self.slot.index);
        if state.existing {
            kernel.flags |= kz_common::flags::INHERIT;
        }
        if let (UnixSockets::Only(_), UnixGuard::Unavailable(why)) = (&policy.unix, &self.set.unix)
        {
            tracing::warn!(
                cgroup = id,
                "unix-socket rules are not enforced by the kernel here: {why}"
            );
        }
        let unix = policy.unix.keys(id);
        for (len, key, verdict) in &unix.paths {
            self.set
                .maps
                .unix_paths
                .insert(&Key::new(*len, *key), verdict, 0)
                .map_err(map_err(mn::UNIX_PATHS))?;
        }
        for key in &unix.abstracts {
            self.set
                .maps
                .unix_abstract
                .insert(key, 1, 0)
                .map_err(map_err(mn::UNIX_ABSTRACT))?;
        }
        for port in policy.ports() {
            self.set
                .maps
                .ports
                .insert(port_key(id, *port), 1, 0)
                .map_err(map_err(mn::PORTS))?;
        }
        for (list, allow) in [(&policy.allow, true), (&policy.deny, false)] {
            for cidr in list {
                self.trie_insert(id, cidr, allow)?;
            }
        }
        self.set
            .maps
            .policy
            .insert(id, kernel, 0)
            .map_err(map_err(mn::POLICY))?;
        for port in old.ports() {
            if !policy.ports().contains(port) {
                let _ = self.set.maps.ports.remove(&port_key(id, *port));
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
        self.remove_unix_keys(&old_unix, Some(&unix));
        if let Some(state) = self.cgroups.get_mut(&id) {
            state.policy = policy.clone();
            state.unix_keys = unix;
        }
        Ok(())
    }

    /// Removes the entries of `old` that `keep` does not have.
    fn remove_unix_keys(&mut self, old: &UnixKeys, keep: Option<&UnixKeys>) {
        let maps = &mut self.set.maps;
        for (len, key, _) in &old.paths {
            // A key that stays (maybe with another verdict) was overwritten: it must not go.
            if !keep.is_some_and(|k| k.paths.iter().any(|(l, p, _)| l == len && p == key)) {
                let _ = maps.unix_paths.remove(&Key::new(*len, *key));
            }
        }
        for key in &old.abstracts {
            if !keep.is_some_and(|k| k.abstracts.contains(key)) {
                let _ = maps.unix_abstract.remove(key);
            }
        }
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
                    (&mut self.set.maps.allow4, mn::ALLOW4)
                } else {
                    (&mut self.set.maps.deny4, mn::DENY4)
                };
                t.insert(&Key::new(p, data), 1, 0).map_err(map_err(n))
            }
            LpmKey::V6(p, data) => {
                let (t, n) = if allow {
                    (&mut self.set.maps.allow6, mn::ALLOW6)
                } else {
                    (&mut self.set.maps.deny6, mn::DENY6)
                };
                t.insert(&Key::new(p, data), 1, 0).map_err(map_err(n))
            }
        }
    }

    fn trie_remove(&mut self, id: u64, cidr: &super::Cidr, allow: bool) {
        match lpm_key(id, cidr) {
            LpmKey::V4(p, data) => {
                let t = if allow {
                    &mut self.set.maps.allow4
                } else {
                    &mut self.set.maps.deny4
                };
                let _ = t.remove(&Key::new(p, data));
            }
            LpmKey::V6(p, data) => {
                let t = if allow {
                    &mut self.set.maps.allow6
                } else {
                    &mut self.set.maps.deny6
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
        self.set.maps.allowed.clone()
    }

    /// Handle for the proxy: original destination by client address.
    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.set.maps.orig.clone()
    }

    /// The stream of connects/sendmsgs the kernel refused in this instance's cgroups (and in
    /// cgroups nested below them), once (one consumer). Call inside Tokio.
    pub fn block_events(&mut self) -> Result<BlockEvents, InterceptError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(InterceptError::NoRuntime);
        }
        let ring = self.events.take().ok_or(InterceptError::EventsTaken)?;
        BlockEvents::new(ring, self.guards.clone(), self.slot.lock.clone())
    }

    /// Ids of the kernel objects in use: the shared programs and maps (with this instance's event
    /// ring), and this instance's own links of live cgroups.
    pub fn kernel_ids(&self) -> KernelIds {
        KernelIds {
            programs: self.set.program_ids.clone(),
            maps: self
                .set
                .maps
                .ids
                .iter()
                .copied()
                .chain(self.slot.ring.info().map(|i| i.id()))
                .collect(),
            links: self
                .cgroups
                .values()
                .flat_map(|s| s.link_ids.clone())
                .collect(),
        }
    }

    /// Kills what is left in the cgroup, detaches and unpins its programs, drops its policy
    /// entries and removes the directory. If the cgroup cannot be emptied nothing is detached
    /// (fail closed) and [`InterceptError::CgroupBusy`] is returned. An existing cgroup
    /// ([`Self::guard_existing_cgroup`]) is only given back: programs detached, entries dropped, the
    /// directory and its processes left to their owner (they hold masked tokens only).
    pub fn remove_cgroup(&mut self, id: u64) -> Result<(), InterceptError> {
        let state = self
            .cgroups
            .remove(&id)
            .ok_or(InterceptError::UnknownCgroup(id))?;
        if !state.existing && !cgroups::kill_all(&state.cgroup.path, KILL_WAIT) {
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
        let _ = self.set.maps.policy.remove(&id);
        for port in state.policy.ports() {
            let _ = self.set.maps.ports.remove(&port_key(id, *port));
        }
        for cidr in &state.policy.allow {
            self.trie_remove(id, cidr, true);
        }
        for cidr in &state.policy.deny {
            self.trie_remove(id, cidr, false);
        }
        self.remove_unix_keys(&state.unix_keys, None);
        let others: Vec<u64> = self.cgroups.keys().copied().collect();
        self.set.maps.allowed.purge(id, &others);
        if state.existing {
            return Ok(());
        }
        cgroups::remove_tree(&state.cgroup.path)
    }
}

/// Cleans up after dead instances of `scope` before a new one starts.
fn clean_dead(scope: &Scope) {
    match shared::cleanup_stale(scope) {
        Ok(r) if !r.instances.is_empty() => {
            tracing::warn!(instances = ?r.instances, killed = r.killed, "cleaned up after dead kz instances");
        }
        Ok(_) => {}
        // A busy stale cgroup stays cut off; it does not stop this instance.
        Err(e) => tracing::warn!("stale kz state not fully cleaned: {e}"),
    }
}

/// What [`Interceptor::sweep_held`] removed: a cgroup (by name) or the links of one that was
/// gone already (no name).
#[derive(Debug, Clone)]
pub struct Swept {
    pub name: Option<String>,
    pub id: u64,
    /// Processes that were still in it (killed).
    pub killed: usize,
    /// Why it could not be removed entirely (a cgroup that cannot be emptied keeps its links).
    pub error: Option<String>,
}

fn port_key(cgroup_id: u64, port: u16) -> PortKey {
    PortKey {
        cgroup_id,
        port,
        _pad: [0; 6],
    }
}

impl Drop for Interceptor {
    /// Orderly exit: removes every cgroup (see [`Interceptor::remove_cgroup`]), then the instance
    /// directories. A cgroup that cannot be emptied keeps its links. The shared program set stays
    /// pinned for the next instance (`kz intercept unload` removes it).
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
        // The shared parents (`<root>/<scope>`, `/sys/fs/bpf/<scope>`) stay: removing them would
        // race with another instance creating its directories there.
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
