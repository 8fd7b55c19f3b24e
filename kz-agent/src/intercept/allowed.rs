//! The allowed-IP table: which addresses each guarded cgroup may connect to, and until when.
//!
//! kz's DNS resolver opens an entry (cgroup id + address → expiry) for each address of an answer
//! it hands out; under [`super::Policy::require_allow`] the kernel refuses (EPERM) a connect to
//! any other address, and an entry past its expiry no longer counts (checked at each connect).
//! The kernel map, `KZ_ALLOWED_IPS`, is one for the whole machine
//! ([`kz_common::MAX_ALLOWED_IPS`] entries shared by every cgroup of every kz instance), so one
//! agent resolving name after name could fill it and leave every other run unable to resolve
//! anything. User space keeps that from happening:
//! - a quota per cgroup on its live entries ([`AllowMap::open`]): an answer that would take the
//!   cgroup over its quota opens nothing ([`AllowError::OverQuota`]). The cgroup's own expired
//!   entries are deleted before the check, so the quota counts live entries, and addresses it
//!   already holds (a name asked again) are renewed without counting twice;
//! - expired entries are deleted from the kernel map ([`AllowMap::purge_expired`], run by the
//!   node on a timer), and all of a cgroup's when it is removed ([`AllowMap::purge`]);
//! - a full map is a specific error ([`AllowError::MapFull`]): the answer's new entries are taken
//!   back and nothing of another cgroup is evicted.
//!
//! The ledger of what this instance opened (per cgroup: address → expiry) lives in memory next
//! to the map handle, behind the same lock: counting and the timer's purge never walk the
//! shared map, which other kz instances write at the same time.
//!
//! Refusals come in bursts (an agent looping over names). Each refusal says whether it is to be
//! audited ([`AllowError::audit`]): the first of a burst, then at most one per
//! [`REPORT_EVERY`] while it lasts, each record counting the refusals since the previous one.
//! A burst ends when an answer of the cgroup is opened again; [`AllowMap::take_unaudited`] gives
//! the refusals no record counted yet (for a last record when the sandbox closes).

use aya::maps::{HashMap, MapData, MapError};
use kz_common::IpKey;
use std::collections::{BTreeMap, HashMap as StdMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::maps::addr16;

/// Live entries a sandbox may hold when its configuration says nothing
/// (`[blind] max_allowed_ips`). An agent that talks to a few dozen hosts, each answering with up
/// to a few dozen CDN addresses and kept for the 5-minute TTL floor, stays far below it; one that
/// resolves thousands of distinct names in five minutes is scanning, not working. 64 sandboxes
/// at this quota fill the machine's map.
pub const DEFAULT_QUOTA: usize = 4096;

/// Entries of the shared kernel map (every cgroup of every kz instance on the machine).
pub const CAPACITY: usize = kz_common::MAX_ALLOWED_IPS as usize;

/// While a burst of refusals lasts, one audit record per this long at most.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Why addresses were not opened. The DNS resolver answers SERVFAIL to each (see
/// [`crate::intercept::dns::AnswerError`]): the name is allowed, the table is what is exhausted,
/// and handing out addresses the kernel would refuse helps nobody.
#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    #[error(
        "cgroup {cgroup_id} holds {open} of its {quota} allowed addresses and this answer needs {wanted} more: the sandbox is resolving more distinct addresses than its quota; raise `[blind] max_allowed_ips` if that is expected, or wait for earlier answers to expire"
    )]
    OverQuota {
        cgroup_id: u64,
        open: usize,
        wanted: usize,
        quota: usize,
        audit: Option<u64>,
    },
    #[error(
        "the shared allowed-IP map is full ({CAPACITY} entries over every sandbox of every kz instance on this machine): run fewer sandboxes at once or lower their `[blind] max_allowed_ips`"
    )]
    MapFull { cgroup_id: u64, audit: Option<u64> },
    #[error("eBPF map {}: {detail}", kz_common::map_names::ALLOWED_IPS)]
    Map { detail: String, audit: Option<u64> },
}

impl AllowError {
    /// `Some(n)`: audit this refusal; the record stands for `n` refusals of the cgroup (this one
    /// and those not audited since its previous record). `None`: counted for a later record.
    pub fn audit(&self) -> Option<u64> {
        match self {
            AllowError::OverQuota { audit, .. }
            | AllowError::MapFull { audit, .. }
            | AllowError::Map { audit, .. } => *audit,
        }
    }

    /// The audit record's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            AllowError::OverQuota { .. } => "allowed_ip_quota",
            AllowError::MapFull { .. } => "allowed_ip_map_full",
            AllowError::Map { .. } => "allowed_ip_error",
        }
    }

    /// The audit record's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            AllowError::OverQuota { .. } => "over_quota",
            AllowError::MapFull { .. } => "map_full",
            AllowError::Map { .. } => "map_error",
        }
    }
}

/// What [`AllowMap::open`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// New entries.
    pub added: usize,
    /// Entries the cgroup already held, their expiry extended.
    pub renewed: usize,
}

/// IPs the guarded cgroups of this instance may reach, with expiry and a quota per cgroup.
/// Cheap to clone and share between tasks: the clones share one ledger.
#[derive(Clone)]
pub struct AllowMap {
    inner: Arc<Mutex<Inner<HashMap<MapData, IpKey, u64>>>>,
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

fn expiry(now: u64, ttl: Option<Duration>) -> u64 {
    match ttl {
        None => u64::MAX,
        Some(t) => now.saturating_add(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)),
    }
}

impl AllowMap {
    pub(crate) fn new(map: HashMap<MapData, IpKey, u64>) -> AllowMap {
        AllowMap {
            inner: Arc::new(Mutex::new(Inner::new(map))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<HashMap<MapData, IpKey, u64>>> {
        // A panic elsewhere while holding the lock leaves a map handle that is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets `cgroup_id` reach each address for its TTL, all or none: when the cgroup would hold
    /// more than `quota` live entries afterwards, or the kernel map is full, nothing of the
    /// answer is opened.
    pub fn open(
        &self,
        cgroup_id: u64,
        ips: impl IntoIterator<Item = (IpAddr, Duration)>,
        quota: usize,
    ) -> Result<Opened, AllowError> {
        let now = monotonic_ns();
        let wanted: Vec<(IpAddr, u64)> = ips
            .into_iter()
            .map(|(ip, ttl)| (ip, expiry(now, Some(ttl))))
            .collect();
        self.lock().open(cgroup_id, &wanted, quota, now)
    }

    /// Lets `cgroup_id` reach `ip` for `ttl` (None = until revoked or the cgroup is removed),
    /// outside any quota. Only matters under [`super::Policy::require_allow`].
    pub fn allow_ip(
        &self,
        cgroup_id: u64,
        ip: IpAddr,
        ttl: Option<Duration>,
    ) -> Result<(), AllowError> {
        let now = monotonic_ns();
        self.lock()
            .open(cgroup_id, &[(ip, expiry(now, ttl))], usize::MAX, now)
            .map(|_| ())
    }

    pub fn revoke_ip(&self, cgroup_id: u64, ip: IpAddr) {
        self.lock().revoke(cgroup_id, ip);
    }

    /// Entries `cgroup_id` holds (live, or expired and not purged yet).
    pub fn open_count(&self, cgroup_id: u64) -> usize {
        self.lock().open_count(cgroup_id)
    }

    /// Deletes the expired entries of every cgroup of this instance from the kernel map; returns
    /// how many. The node runs it on a timer.
    pub fn purge_expired(&self) -> usize {
        self.lock().purge_expired(monotonic_ns())
    }

    /// Refusals of `cgroup_id` no audit record counted yet (and forgets them), with the audit
    /// kind of the last one ([`AllowError::kind`]).
    pub fn take_unaudited(&self, cgroup_id: u64) -> Option<(u64, &'static str)> {
        self.lock().take_unaudited(cgroup_id)
    }

    /// Removes every entry of `cgroup_id` (a removed cgroup; found by walking the map, so also
    /// entries this ledger does not know, e.g. a dead instance's), and the expired entries of
    /// the cgroups in `expired_of`. Only ever cgroups of the caller: the map is shared with other
    /// kz instances, which may be renewing their own entries at this very moment.
    pub(crate) fn purge(&self, cgroup_id: u64, expired_of: &[u64]) {
        self.lock().purge(cgroup_id, expired_of, monotonic_ns());
    }
}

/// Why the kernel did not take an entry.
#[derive(Debug)]
enum PutError {
    /// E2BIG / ENOSPC: the map holds its maximum.
    Full,
    Other(String),
}

/// The kernel side of the table (the pinned map; a bounded fake in the unit tests).
trait Table {
    fn put(&mut self, key: &IpKey, expiry: u64) -> Result<(), PutError>;
    fn delete(&mut self, key: &IpKey);
    /// Every key of `cgroup_id` in the table, whoever wrote it.
    fn keys_of(&self, cgroup_id: u64) -> Vec<IpKey>;
}

impl Table for HashMap<MapData, IpKey, u64> {
    fn put(&mut self, key: &IpKey, expiry: u64) -> Result<(), PutError> {
        self.insert(key, expiry, 0).map_err(|e| match &e {
            MapError::SyscallError(s)
                if matches!(
                    s.io_error.raw_os_error(),
                    Some(libc::E2BIG) | Some(libc::ENOSPC)
                ) =>
            {
                PutError::Full
            }
            _ => PutError::Other(e.to_string()),
        })
    }

    fn delete(&mut self, key: &IpKey) {
        let _ = self.remove(key);
    }

    fn keys_of(&self, cgroup_id: u64) -> Vec<IpKey> {
        self.keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgroup_id == cgroup_id)
            .collect()
    }
}

/// One cgroup's entries and refusals.
#[derive(Default)]
struct Book {
    /// Address (the kernel's 16-byte form) → expiry.
    entries: StdMap<[u8; 16], u64>,
    burst: Burst,
}

#[derive(Default)]
struct Burst {
    /// A refusal happened since the cgroup last had an answer opened.
    on: bool,
    last_audit: u64,
    unaudited: u64,
    /// [`AllowError::kind`] of the last refusal.
    last_kind: &'static str,
}

impl Burst {
    /// Counts a refusal; `Some(n)` when it is to be audited, standing for `n` refusals.
    fn refused(&mut self, now: u64, kind: &'static str) -> Option<u64> {
        self.unaudited += 1;
        self.last_kind = kind;
        let every = u64::try_from(REPORT_EVERY.as_nanos()).unwrap_or(u64::MAX);
        if self.on && now.saturating_sub(self.last_audit) < every {
            return None;
        }
        self.on = true;
        self.last_audit = now;
        Some(std::mem::take(&mut self.unaudited))
    }
}

struct Inner<T> {
    table: T,
    books: StdMap<u64, Book>,
}

fn key(cgroup_id: u64, addr: [u8; 16]) -> IpKey {
    IpKey { cgroup_id, addr }
}

impl<T: Table> Inner<T> {
    fn new(table: T) -> Inner<T> {
        Inner {
            table,
            books: StdMap::new(),
        }
    }

    fn open(
        &mut self,
        cgroup_id: u64,
        wanted: &[(IpAddr, u64)],
        quota: usize,
        now: u64,
    ) -> Result<Opened, AllowError> {
        // One entry per address, with the latest expiry the answer gives it.
        let mut want: BTreeMap<[u8; 16], u64> = BTreeMap::new();
        for (ip, exp) in wanted {
            let e = want.entry(addr16(*ip)).or_insert(0);
            *e = (*e).max(*exp);
        }
        let Inner { table, books } = self;
        let book = books.entry(cgroup_id).or_default();
        let new_count = |book: &Book| {
            want.keys()
                .filter(|a| !book.entries.contains_key(*a))
                .count()
        };
        if book.entries.len() + new_count(book) > quota {
            // Room from the cgroup's own expired entries first: the quota is on live ones.
            let expired: Vec<[u8; 16]> = book
                .entries
                .iter()
                .filter(|(_, e)| **e <= now)
                .map(|(a, _)| *a)
                .collect();
            for a in expired {
                table.delete(&key(cgroup_id, a));
                book.entries.remove(&a);
            }
        }
        let wanted_new = new_count(book);
        if book.entries.len() + wanted_new > quota {
            return Err(AllowError::OverQuota {
                cgroup_id,
                open: book.entries.len(),
                wanted: wanted_new,
                quota,
                audit: book.burst.refused(now, "allowed_ip_quota"),
            });
        }
        let mut added = Vec::new();
        let mut renewed = 0;
        for (a, exp) in want {
            // Never shorten: a client may still use the address under an earlier answer.
            let exp = book.entries.get(&a).map_or(exp, |old| exp.max(*old));
            match table.put(&key(cgroup_id, a), exp) {
                Ok(()) => {
                    if book.entries.insert(a, exp).is_some() {
                        renewed += 1;
                    } else {
                        added.push(a);
                    }
                }
                Err(e) => {
                    // All or none: the entries this answer added go again. Renewals stay
                    // renewed (those addresses were open already).
                    for a in &added {
                        table.delete(&key(cgroup_id, *a));
                        book.entries.remove(a);
                    }
                    return Err(match e {
                        PutError::Full => AllowError::MapFull {
                            cgroup_id,
                            audit: book.burst.refused(now, "allowed_ip_map_full"),
                        },
                        PutError::Other(detail) => AllowError::Map {
                            detail,
                            audit: book.burst.refused(now, "allowed_ip_error"),
                        },
                    });
                }
            }
        }
        book.burst.on = false;
        Ok(Opened {
            added: added.len(),
            renewed,
        })
    }

    fn revoke(&mut self, cgroup_id: u64, ip: IpAddr) {
        let a = addr16(ip);
        self.table.delete(&key(cgroup_id, a));
        if let Some(book) = self.books.get_mut(&cgroup_id) {
            book.entries.remove(&a);
        }
    }

    fn open_count(&self, cgroup_id: u64) -> usize {
        self.books.get(&cgroup_id).map_or(0, |b| b.entries.len())
    }

    fn purge_expired_of(table: &mut T, cgroup_id: u64, book: &mut Book, now: u64) -> usize {
        let before = book.entries.len();
        book.entries.retain(|a, exp| {
            let keep = *exp > now;
            if !keep {
                table.delete(&key(cgroup_id, *a));
            }
            keep
        });
        before - book.entries.len()
    }

    fn purge_expired(&mut self, now: u64) -> usize {
        let Inner { table, books } = self;
        books
            .iter_mut()
            .map(|(id, book)| Self::purge_expired_of(table, *id, book, now))
            .sum()
    }

    fn take_unaudited(&mut self, cgroup_id: u64) -> Option<(u64, &'static str)> {
        let burst = &mut self.books.get_mut(&cgroup_id)?.burst;
        let n = std::mem::take(&mut burst.unaudited);
        (n > 0).then_some((n, burst.last_kind))
    }

    fn purge(&mut self, cgroup_id: u64, expired_of: &[u64], now: u64) {
        for k in self.table.keys_of(cgroup_id) {
            self.table.delete(&k);
        }
        self.books.remove(&cgroup_id);
        let Inner { table, books } = self;
        for id in expired_of {
            if let Some(book) = books.get_mut(id) {
                Self::purge_expired_of(table, *id, book, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel map of `capacity` entries that answers E2BIG when full, as the kernel does.
    #[derive(Default)]
    struct Fake {
        capacity: usize,
        entries: StdMap<(u64, [u8; 16]), u64>,
    }

    impl Table for Fake {
        fn put(&mut self, key: &IpKey, expiry: u64) -> Result<(), PutError> {
            let k = (key.cgroup_id, key.addr);
            if !self.entries.contains_key(&k) && self.entries.len() >= self.capacity {
                return Err(PutError::Full);
            }
            self.entries.insert(k, expiry);
            Ok(())
        }
        fn delete(&mut self, key: &IpKey) {
            self.entries.remove(&(key.cgroup_id, key.addr));
        }
        fn keys_of(&self, cgroup_id: u64) -> Vec<IpKey> {
            self.entries
                .keys()
                .filter(|(c, _)| *c == cgroup_id)
                .map(|(c, a)| key(*c, *a))
                .collect()
        }
    }

    fn inner(capacity: usize) -> Inner<Fake> {
        Inner::new(Fake {
            capacity,
            ..Fake::default()
        })
    }

    fn ips(from: u32, n: u32) -> Vec<IpAddr> {
        (from..from + n)
            .map(|i| IpAddr::V4((0x0a00_0000 + i).into()))
            .collect()
    }

    /// The answer `ips`, each expiring at `exp`.
    fn answer(ips: &[IpAddr], exp: u64) -> Vec<(IpAddr, u64)> {
        ips.iter().map(|ip| (*ip, exp)).collect()
    }

    fn in_kernel(t: &Inner<Fake>, cgroup_id: u64) -> usize {
        t.table.keys_of(cgroup_id).len()
    }

    #[test]
    fn an_answer_over_quota_opens_nothing_and_renewals_do_not_count_twice() {
        let mut t = inner(1000);
        let first = ips(0, 6);
        assert_eq!(
            t.open(1, &answer(&first, 100), 10, 0).unwrap(),
            Opened {
                added: 6,
                renewed: 0
            }
        );
        // Asked again (and one duplicate in the answer): renewed, nothing new.
        let mut again = answer(&first, 200);
        again.push((first[0], 150));
        assert_eq!(
            t.open(1, &again, 10, 1).unwrap(),
            Opened {
                added: 0,
                renewed: 6
            }
        );
        // 6 + 5 > 10: none of the five is opened.
        let e = t.open(1, &answer(&ips(100, 5), 100), 10, 2).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::OverQuota {
                    cgroup_id: 1,
                    open: 6,
                    wanted: 5,
                    quota: 10,
                    audit: Some(1)
                }
            ),
            "{e:?}"
        );
        assert_eq!((t.open_count(1), in_kernel(&t, 1)), (6, 6));
        // Exactly up to the quota is fine; another cgroup has a quota of its own.
        t.open(1, &answer(&ips(100, 4), 100), 10, 3).unwrap();
        t.open(2, &answer(&ips(100, 10), 100), 10, 3).unwrap();
        assert_eq!((t.open_count(1), t.open_count(2)), (10, 10));
        assert_eq!(e.kind(), "allowed_ip_quota");
        assert_eq!(e.reason(), "over_quota");
        assert!(e.to_string().contains("[blind] max_allowed_ips"), "{e}");
    }

    #[test]
    fn renewal_never_shortens_an_entry() {
        let mut t = inner(10);
        let ip = ips(0, 1);
        t.open(1, &answer(&ip, 500), 10, 0).unwrap();
        t.open(1, &answer(&ip, 300), 10, 1).unwrap();
        assert_eq!(t.table.entries[&(1, addr16(ip[0]))], 500);
    }

    #[test]
    fn expired_entries_make_room_and_the_purge_deletes_them_from_the_kernel() {
        let mut t = inner(1000);
        t.open(1, &answer(&ips(0, 8), 100), 10, 0).unwrap();
        t.open(2, &answer(&ips(0, 3), 1000), 10, 0).unwrap();
        // At 150 cgroup 1's entries are expired: a new answer takes their place.
        t.open(1, &answer(&ips(50, 10), 400), 10, 150).unwrap();
        assert_eq!((t.open_count(1), in_kernel(&t, 1)), (10, 10));
        // The timer's purge: every expired entry of every cgroup, and only those.
        assert_eq!(t.purge_expired(399), 0);
        assert_eq!(t.purge_expired(400), 10);
        assert_eq!((t.open_count(1), in_kernel(&t, 1)), (0, 0));
        assert_eq!((t.open_count(2), in_kernel(&t, 2)), (3, 3));
        assert_eq!(t.purge_expired(1000), 3);
        assert!(t.table.entries.is_empty());
    }

    #[test]
    fn a_full_map_takes_the_answer_back_and_leaves_others_alone() {
        let mut t = inner(10);
        t.open(2, &answer(&ips(0, 4), 100), 100, 0).unwrap();
        t.open(1, &answer(&ips(0, 2), 100), 100, 0).unwrap();
        // Room for 4 more; the answer has 5 new and 1 held: none of the new ones stays.
        let mut big = ips(0, 1);
        big.extend(ips(100, 5));
        let e = t.open(1, &answer(&big, 200), 100, 1).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::MapFull {
                    cgroup_id: 1,
                    audit: Some(1)
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.kind(), "allowed_ip_map_full");
        assert_eq!((t.open_count(1), in_kernel(&t, 1)), (2, 2));
        assert_eq!((t.open_count(2), in_kernel(&t, 2)), (4, 4));
        // What fits still opens.
        t.open(1, &answer(&ips(100, 4), 200), 100, 2).unwrap();
        assert_eq!(t.table.entries.len(), 10);
    }

    #[test]
    fn refusals_are_audited_once_per_burst_and_counted() {
        let mut t = inner(1000);
        t.open(1, &answer(&ips(0, 2), u64::MAX), 2, 0).unwrap();
        let audit = |t: &mut Inner<Fake>, from: u32, now: u64| {
            t.open(1, &answer(&ips(from, 1), u64::MAX), 2, now)
                .unwrap_err()
                .audit()
        };
        let min = u64::try_from(REPORT_EVERY.as_nanos()).unwrap();
        // The first refusal of a burst is audited; the next ones only counted...
        assert_eq!(audit(&mut t, 10, 1), Some(1));
        for i in 0..99 {
            assert_eq!(audit(&mut t, 11 + i, 2 + u64::from(i)), None);
        }
        // ... until a minute has passed: that record counts the 99 and itself.
        assert_eq!(audit(&mut t, 200, 1 + min), Some(100));
        assert_eq!(audit(&mut t, 201, 2 + min), None);
        // An answer opened ends the burst: the next refusal opens a new one, with the left-over.
        t.revoke(1, ips(0, 1)[0]);
        t.open(1, &answer(&ips(300, 1), u64::MAX), 2, 3 + min)
            .unwrap();
        assert_eq!(audit(&mut t, 301, 4 + min), Some(2));
        assert_eq!(audit(&mut t, 302, 5 + min), None);
        assert_eq!(t.take_unaudited(1), Some((1, "allowed_ip_quota")));
        assert_eq!(t.take_unaudited(1), None);
    }

    #[test]
    fn removing_a_cgroup_deletes_all_its_entries_even_unknown_ones() {
        let mut t = inner(100);
        t.open(1, &answer(&ips(0, 3), u64::MAX), 10, 0).unwrap();
        t.open(2, &answer(&ips(0, 3), 50), 10, 0).unwrap();
        t.open(3, &answer(&ips(0, 3), 500), 10, 0).unwrap();
        // Written by someone else (a dead instance of the same cgroup id's owner).
        t.table.put(&key(1, addr16(ips(90, 1)[0])), 7).unwrap();
        t.purge(1, &[2, 3], 100);
        assert_eq!(in_kernel(&t, 1), 0);
        assert_eq!(t.open_count(1), 0);
        assert_eq!((t.open_count(2), in_kernel(&t, 2)), (0, 0));
        assert_eq!((t.open_count(3), in_kernel(&t, 3)), (3, 3));
    }
}
