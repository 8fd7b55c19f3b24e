//! The one type that holds a real credential.
//!
//! `Secret` cannot be printed: `Debug` and `Display` write `[redacted]`, so a secret that slips
//! into a log line, an error or a panic message shows nothing. Reading the value takes an
//! explicit [`Secret::expose`] call, which is easy to grep for.
//!
//! The bytes do not live on the heap. They are copied into kz's own page-backed arena
//! ([`arena`]): anonymous mappings marked
//! - `MADV_DONTDUMP`: left out of any core dump, even one taken despite kz being non-dumpable
//!   (`fs.suid_dumpable = 2`, a `gcore` by root);
//! - `MADV_WIPEONFORK`: a child forked by kz sees zeros there, from the fork on (the agent's
//!   containment runs between fork and exec, partly as the agent's user);
//! - `mlock`ed where `RLIMIT_MEMLOCK` allows, so a value is never written to swap.
//!
//! Clones share one copy (the value never changes), which is zeroed when the last clone is
//! dropped. The `String` a value arrives in is zeroed as soon as it has been copied.

use std::fmt;
use std::sync::Arc;

#[derive(Clone)]
pub struct Secret(Arc<arena::Block>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        let mut value: String = value.into();
        let block = arena::Block::copy_of(value.as_bytes());
        // The caller's heap copy would otherwise stay in freed memory until it is reused.
        zeroize::Zeroize::zeroize(&mut value);
        Self(Arc::new(block))
    }

    /// The real value. Every call site is a place where a credential leaves kz's custody.
    pub fn expose(&self) -> &str {
        // SAFETY: the block holds a copy of a `String`'s bytes (valid UTF-8, see `new`) and is
        // never written until it is dropped, which cannot happen while `self` is borrowed.
        unsafe { std::str::from_utf8_unchecked(self.0.bytes()) }
    }

    pub fn is_empty(&self) -> bool {
        self.0.bytes().is_empty()
    }

    /// Where the value's bytes live (for tests that check the mapping's flags).
    #[cfg(test)]
    pub(crate) fn address(&self) -> usize {
        self.0.bytes().as_ptr() as usize
    }
}

impl PartialEq for Secret {
    /// Compares every byte whatever the first difference: how long a comparison took must not
    /// tell how much of a guess was right.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.bytes(), other.0.bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Page-backed storage for secret bytes.
///
/// Why an arena rather than one mapping per value: the PDP creates a `Secret` per resolution
/// (thousands a second under load) and caches many; a mapping each would cost five system
/// calls per value, a TLB shoot-down on every core at each `munmap`, a 4 KiB page per value,
/// and would run into `vm.max_map_count`. Values up to [`CLASSES`]' largest share pages, in
/// slots of a fixed size per class; longer ones get whole pages of their own, unmapped on drop.
/// Slot pages are kept for reuse (kz's peak number of secrets bounds them); a freed slot is
/// zeroed before it goes back on its class's free list.
mod arena {
    use std::ptr::NonNull;
    use std::sync::{Mutex, OnceLock};

    /// Slot sizes in bytes. A value longer than the last gets whole pages of its own.
    const CLASSES: [usize; 8] = [16, 32, 64, 128, 256, 512, 1024, 2048];

    /// Where a block's bytes came from, which says how to give them back.
    #[derive(Debug, Clone, Copy)]
    enum Home {
        /// Zero bytes: nothing allocated, the pointer is dangling.
        Empty,
        /// A slot of class `CLASSES[i]`.
        Slot(usize),
        /// A mapping of its own of this many bytes.
        Own(usize),
        /// The heap, when no mapping could be made (out of memory or address space). kz is
        /// non-dumpable anyway; only the dump and swap exclusions are lost.
        Heap,
    }

    /// One secret's bytes: `len` bytes at `ptr`, written once by [`Block::copy_of`].
    #[derive(Debug)]
    pub struct Block {
        ptr: NonNull<u8>,
        len: usize,
        home: Home,
    }

    // SAFETY: a block owns its bytes exclusively (no other block and no free list refers to
    // them until `drop`) and never writes them after `copy_of`, so moving it to another thread
    // and reading it from several threads at once are both fine.
    unsafe impl Send for Block {}
    // SAFETY: see `Send`: shared access is read-only.
    unsafe impl Sync for Block {}

    /// A free slot's address; only the arena (under its lock) holds these.
    struct FreeSlot(NonNull<u8>);

    // SAFETY: a free slot is memory no block refers to; handing its address from one thread to
    // another (through the arena's mutex) is what a free list does.
    unsafe impl Send for FreeSlot {}

    static FREE: Mutex<[Vec<FreeSlot>; CLASSES.len()]> =
        Mutex::new([const { Vec::new() }; CLASSES.len()]);

    fn page_size() -> usize {
        static PAGE: OnceLock<usize> = OnceLock::new();
        *PAGE.get_or_init(|| {
            // SAFETY: sysconf only reads a system constant.
            let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
        })
    }

    /// A fresh anonymous read-write mapping of `len` bytes (a multiple of the page size),
    /// zero-filled by the kernel, marked don't-dump and wipe-on-fork, locked where allowed.
    fn map(len: usize) -> Option<NonNull<u8>> {
        // SAFETY: asks for a new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot map memory for a secret; keeping it on the heap (still zeroed on drop)"
            );
            return None;
        }
        // SAFETY (the three calls): they change attributes of the mapping made just above,
        // which nothing else refers to yet.
        if unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) } != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot exclude secret memory from core dumps (MADV_DONTDUMP)"
            );
        }
        if unsafe { libc::madvise(p, len, libc::MADV_WIPEONFORK) } != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot wipe secret memory in forked children (MADV_WIPEONFORK, Linux 4.14+)"
            );
        }
        if unsafe { libc::mlock(p, len) } != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                bytes = len,
                "cannot lock secret memory (RLIMIT_MEMLOCK); it may be swapped out: raise `ulimit -l` to keep it in RAM"
            );
        }
        NonNull::new(p.cast())
    }

    /// Storage for `len` (> 0) bytes: a slot, pages of its own, or the heap as a last resort.
    fn alloc(len: usize) -> (NonNull<u8>, Home) {
        let page = page_size();
        match CLASSES.iter().position(|&c| c >= len) {
            Some(class) => {
                let size = CLASSES[class];
                let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = free[class].pop() {
                    return (slot.0, Home::Slot(class));
                }
                if let Some(base) = map(page) {
                    // Slot 0 is returned, the rest of the page goes on the free list.
                    for i in (1..page / size).rev() {
                        // SAFETY: `i * size < page`: the address is inside the new mapping.
                        let p = unsafe { base.add(i * size) };
                        free[class].push(FreeSlot(p));
                    }
                    return (base, Home::Slot(class));
                }
            }
            None => {
                let size = len.div_ceil(page) * page;
                if let Some(base) = map(size) {
                    return (base, Home::Own(size));
                }
            }
        }
        let heap = Box::into_raw(vec![0u8; len].into_boxed_slice());
        let ptr = NonNull::new(heap.cast::<u8>()).unwrap_or(NonNull::dangling());
        (ptr, Home::Heap)
    }

    impl Block {
        pub fn copy_of(bytes: &[u8]) -> Block {
            if bytes.is_empty() {
                return Block {
                    ptr: NonNull::dangling(),
                    len: 0,
                    home: Home::Empty,
                };
            }
            let (ptr, home) = alloc(bytes.len());
            // SAFETY: `ptr` has room for `bytes.len()` bytes (a slot at least that large, whole
            // pages, or a heap slice of exactly that length) and is owned by this block alone.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
            Block {
                ptr,
                len: bytes.len(),
                home,
            }
        }

        pub fn bytes(&self) -> &[u8] {
            // SAFETY: `len` initialised bytes at `ptr` (or a dangling, aligned pointer with
            // length 0), alive and unchanged for as long as the block.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }
    }

    impl Drop for Block {
        fn drop(&mut self) {
            if self.len == 0 {
                return;
            }
            // SAFETY: the block's own `len` bytes; no borrow of them outlives `&self`.
            let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) };
            // Volatile writes and a fence: the compiler cannot drop the stores as dead.
            zeroize::Zeroize::zeroize(bytes);
            match self.home {
                Home::Empty => {}
                Home::Slot(class) => {
                    let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(list) = free.get_mut(class) {
                        list.push(FreeSlot(self.ptr));
                    }
                }
                Home::Own(size) => {
                    // SAFETY: the whole mapping made for this block in `alloc`; nothing else
                    // points into it.
                    if unsafe { libc::munmap(self.ptr.as_ptr().cast(), size) } != 0 {
                        tracing::debug!(
                            error = %std::io::Error::last_os_error(),
                            "cannot unmap a dropped secret's pages (they are zeroed)"
                        );
                    }
                }
                Home::Heap => {
                    let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
                    // SAFETY: the pointer came from `Box::into_raw` of a slice of `len` bytes
                    // in `alloc` and is given back exactly once, here.
                    drop(unsafe { Box::from_raw(slice) });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_the_value() {
        let s = Secret::new("sk-live-123");
        assert_eq!(
            format!("{s} {s:?} {s:#?}"),
            "[redacted] Secret([redacted]) Secret([redacted])"
        );
        assert_eq!(s.expose(), "sk-live-123");
    }

    #[test]
    fn values_of_every_size_round_trip() {
        // Empty, each class boundary and either side of it, and several pages.
        let mut lens = vec![0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 70_000];
        for c in [16, 32, 64, 128, 256, 512, 1024, 2048] {
            lens.extend([c - 1, c, c + 1]);
        }
        let secrets: Vec<(String, Secret)> = lens
            .iter()
            .map(|&n| {
                let v: String = "0123456789abcdef".chars().cycle().take(n).collect();
                (v.clone(), Secret::new(v))
            })
            .chain(std::iter::once_with(|| {
                // Multi-byte characters: the bytes come back as the same &str.
                let v = "héllo wörld ✓ 秘密".to_owned();
                (v.clone(), Secret::new(v))
            }))
            .collect();
        for (v, s) in &secrets {
            assert_eq!(s.expose(), v);
            assert_eq!(s.is_empty(), v.is_empty());
            let c = s.clone();
            assert_eq!(&c, s);
            assert_eq!(c.expose(), v);
        }
        assert_ne!(Secret::new("abc"), Secret::new("abd"));
        assert_ne!(Secret::new("abc"), Secret::new("abcd"));
        assert_eq!(Secret::new(""), Secret::new(String::new()));
    }

    #[test]
    fn slots_are_reused_zeroed_and_shared_safely_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let v = format!("thread-{t}-value-{i}-{}", "x".repeat(i % 300));
                        let s = Secret::new(v.clone());
                        let c = s.clone();
                        drop(s);
                        assert_eq!(c.expose(), v);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn secret_memory_is_excluded_from_core_dumps_and_locked() {
        let small = Secret::new("sk-live-small-1234");
        let large = Secret::new("L".repeat(10_000));
        for s in [&small, &large] {
            let flags = crate::harden::mapping_flags(s.address())
                .unwrap()
                .expect("the secret's address is in /proc/self/smaps");
            assert!(flags.contains(&"dd".to_owned()), "VmFlags: {flags:?}");
            assert!(flags.contains(&"wf".to_owned()), "VmFlags: {flags:?}");
            // Locking is best effort (RLIMIT_MEMLOCK); root has CAP_IPC_LOCK, so it must work.
            if nix::unistd::geteuid().is_root() {
                assert!(flags.contains(&"lo".to_owned()), "VmFlags: {flags:?}");
            }
        }
        // A heap String for comparison: no `dd`.
        let heap = String::from("plain heap value");
        let flags = crate::harden::mapping_flags(heap.as_ptr() as usize)
            .unwrap()
            .unwrap();
        assert!(!flags.contains(&"dd".to_owned()), "VmFlags: {flags:?}");
    }
}
