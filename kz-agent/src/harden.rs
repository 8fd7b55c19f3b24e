//! kz keeps its secrets to itself: what a process beside kz (the agent, running as the same
//! user in the explicit-proxy fallback; anyone reading `/proc`) could otherwise read of kz.
//!
//! - [`set_not_dumpable`]: `PR_SET_DUMPABLE 0`. No core dump, no `ptrace` attach and no
//!   `/proc/<pid>/{mem,environ,maps,fd,…}` for processes of kz's own user (they become root's);
//!   only root (CAP_SYS_PTRACE) still can. `execve` gives a normal program its dumpability back,
//!   so children kz starts are not affected.
//! - [`set_no_core_dumps`]: `RLIMIT_CORE` 0, soft and hard (nothing re-enables dumps later).
//! - [`crate::secret::Secret`] keeps values in don't-dump, wipe-on-fork, locked pages.
//! - [`scrub_own_environ`]: `/proc/<pid>/environ` shows the environment block kz was started
//!   with, which `std::env::remove_var` does not touch: the values of variables that held a
//!   real value or a resolver's login are zeroed there, and the variables removed.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use zeroize::Zeroizing;

/// Values shorter than this are not looked for in other variables: they would match nearly
/// everything (`kz run` has always used this bound for the child's environment).
pub const MIN_VALUE_MATCH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error(
        "cannot make kz non-dumpable (prctl PR_SET_DUMPABLE): {0}; a seccomp or LSM policy may forbid prctl: allow it for kz"
    )]
    Dumpable(nix::Error),
    #[error(
        "cannot set kz's core file size limit to 0 (setrlimit RLIMIT_CORE): {0}; check `ulimit -c` and the sandbox kz runs in"
    )]
    CoreLimit(std::io::Error),
    #[error(
        "cannot read {path}: {source}; mount /proc (kz reads its own /proc/self to find its environment and memory maps)"
    )]
    Proc {
        path: &'static str,
        source: std::io::Error,
    },
    #[error(
        "/proc/self/stat has no usable env_start/env_end fields (Linux 3.5+ shows them); kz cannot clean /proc/<pid>/environ on this kernel"
    )]
    NoEnvBlock,
    #[error(
        "kz's environment block {start:#x}..{end:#x} is not in one writable mapping of /proc/self/maps (moved by PR_SET_MM?); it is left as it is"
    )]
    EnvBlockNotWritable { start: usize, end: usize },
}

/// `PR_SET_DUMPABLE 0` for kz (the whole process: it is a property of the address space).
pub fn set_not_dumpable() -> Result<(), HardenError> {
    nix::sys::prctl::set_dumpable(false).map_err(HardenError::Dumpable)
}

/// Whether kz is dumpable (`PR_GET_DUMPABLE`).
pub fn is_dumpable() -> Result<bool, HardenError> {
    nix::sys::prctl::get_dumpable().map_err(HardenError::Dumpable)
}

/// `RLIMIT_CORE` 0, soft and hard. Children inherit it (the hard limit cannot be raised back
/// without CAP_SYS_RESOURCE): a blind agent holds masked tokens only, so that costs it nothing
/// but its own core files.
pub fn set_no_core_dumps() -> Result<(), HardenError> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit struct from a live stack value.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(HardenError::CoreLimit(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// True when `value` contains one of `real` (each at least [`MIN_VALUE_MATCH`] bytes).
pub fn holds_value(value: &[u8], real: &[&str]) -> bool {
    real.iter().map(|r| r.as_bytes()).any(|r| {
        r.len() >= MIN_VALUE_MATCH
            && value.len() >= r.len()
            && value.windows(r.len()).any(|w| w == r)
    })
}

/// Variables of kz's environment that must not outlive resolution: those named in `logins`
/// (resolver credentials, `env` resolvers' sources) and those whose value contains a resolved
/// value. Names only, sorted.
pub fn env_vars_to_scrub(logins: &BTreeSet<String>, real: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = env_names_where(|k, v| {
        k.to_str().is_some_and(|k| logins.contains(k)) || holds_value(v, real)
    })
    .into_iter()
    .map(|k| k.to_string_lossy().into_owned())
    .collect();
    out.sort();
    out.dedup();
    out
}

/// Names of kz's environment variables for which `keep(name, value)` holds. Each value copy
/// `std::env::vars_os` makes is zeroed once looked at: some hold the values being scrubbed, and
/// freed heap memory keeps what was in it.
fn env_names_where(keep: impl Fn(&OsStr, &[u8]) -> bool) -> Vec<OsString> {
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let v = Zeroizing::new(v.into_vec());
            keep(&k, &v).then_some(k)
        })
        .collect()
}

/// What [`scrub_own_environ`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EnvScrub {
    /// Variables removed from kz's environment (sorted).
    pub removed: Vec<String>,
    /// Entries of the original environment block whose value was zeroed.
    pub overwritten: usize,
}

/// Removes `names`, and every variable whose value contains one of `real`, from kz's
/// environment, and zeroes their values in the environment block kz was started with (what
/// `/proc/<pid>/environ` shows, found from `/proc/self/stat`). The removal happens even when
/// the block cannot be located or written; the error then says why.
///
/// Call it once resolution is over: resolvers read their credentials from the environment.
pub fn scrub_own_environ(names: &[String], real: &[&str]) -> Result<EnvScrub, HardenError> {
    let mut remove: BTreeSet<OsString> = env_names_where(|k, v| {
        k.to_str().is_some_and(|k| names.iter().any(|n| n == k)) || holds_value(v, real)
    })
    .into_iter()
    .collect();
    let block = env_block();
    // Entries to zero: (offset of the value in the block, its length). Found on a copy.
    let mut targets = Vec::new();
    if let Ok((start, len)) = &block {
        let copy = read_block(*start, *len);
        let mut offset = 0;
        for entry in copy.split(|b| *b == 0) {
            if let Some(eq) = entry.iter().position(|b| *b == b'=') {
                let (name, value) = (&entry[..eq], &entry[eq + 1..]);
                let named = std::str::from_utf8(name).is_ok_and(|n| names.iter().any(|x| x == n));
                if !value.is_empty() && (named || holds_value(value, real)) {
                    remove.insert(OsString::from_vec(name.to_vec()));
                    targets.push((offset + eq + 1, value.len()));
                }
            }
            offset += entry.len() + 1;
        }
    }
    for name in &remove {
        // SAFETY: `remove_var` races with threads reading the environment. kz is
        // multi-threaded here (tokio workers, the blocking pool, the eBPF loader), so:
        // - Rust readers (`std::env::var*`, `Command` spawning) take std's environment lock,
        //   which `remove_var` holds for writing: they see the variable or not, never half.
        // - C code calling `getenv` directly (glibc's resolver reading RES_OPTIONS, tzset
        //   reading TZ) takes no lock. glibc's `unsetenv` removes an entry by shifting the
        //   pointers of the same `environ` array down, under its own lock; it never frees or
        //   reallocates the array, and the strings of the original block are never freed. A
        //   concurrent `getenv` therefore only reads valid memory; at worst it misses one entry
        //   during the shift. kz itself never calls `setenv` (the one call that reallocates),
        //   and what is removed here (credentials, variables holding secret values) is nothing
        //   a C library looks up.
        unsafe { std::env::remove_var(name) };
    }
    let mut removed: Vec<String> = remove
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    removed.sort();
    let (start, _) = block?;
    for (offset, len) in &targets {
        zero_in_place(start + offset, *len);
    }
    Ok(EnvScrub {
        removed,
        overwritten: targets.len(),
    })
}

/// A copy of the environment block (zeroed when dropped: it holds the values being removed).
fn read_block(start: usize, len: usize) -> Zeroizing<Vec<u8>> {
    let mut copy = Zeroizing::new(vec![0u8; len]);
    let src = std::ptr::with_exposed_provenance::<u8>(start);
    // SAFETY: [start, start+len) lies inside one readable and writable mapping of kz
    // (checked by `env_block` against /proc/self/maps); it is the initial stack's environment
    // strings, which nothing but `zero_in_place` writes.
    unsafe { std::ptr::copy_nonoverlapping(src, copy.as_mut_ptr(), len) };
    copy
}

/// Zeroes `len` bytes at `addr` inside the environment block, first byte first.
fn zero_in_place(addr: usize, len: usize) {
    let p = std::ptr::with_exposed_provenance_mut::<u8>(addr);
    for i in 0..len {
        // SAFETY: the value bytes of one entry of the block (see `read_block` for why the
        // memory is valid and writable). No `environ` pointer refers to the entry any more:
        // its name was removed from the environment first. A C caller that took a `getenv`
        // pointer to it earlier and still reads it sees the value shrink (first byte first) to
        // a shorter, still NUL-terminated string: never invalid memory.
        unsafe { std::ptr::write_volatile(p.add(i), 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// `(start, len)` of kz's original environment block: `env_start`/`env_end` of
/// /proc/self/stat (fields 50 and 51), checked to lie in one writable mapping.
fn env_block() -> Result<(usize, usize), HardenError> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|source| HardenError::Proc {
        path: "/proc/self/stat",
        source,
    })?;
    let (start, end) = parse_env_range(&stat).ok_or(HardenError::NoEnvBlock)?;
    // /proc/self/maps, not smaps: the same headers without the page accounting smaps computes
    // for every mapping.
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|source| HardenError::Proc {
        path: "/proc/self/maps",
        source,
    })?;
    let writable = parse_smaps(&maps)
        .iter()
        .any(|m| m.start <= start && end <= m.end && m.perms.starts_with("rw"));
    if !writable {
        return Err(HardenError::EnvBlockNotWritable { start, end });
    }
    Ok((start, end - start))
}

/// `env_start` and `env_end` from the text of `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from its closing parenthesis.
fn parse_env_range(stat: &str) -> Option<(usize, usize)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let start: usize = fields.get(50 - 3)?.parse().ok()?;
    let end: usize = fields.get(51 - 3)?.parse().ok()?;
    (start > 0 && end > start).then_some((start, end))
}

/// One mapping of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
    /// `rw-p` and the like.
    pub perms: String,
    /// The path or `[heap]`, `[stack]`, …; empty for anonymous memory.
    pub name: String,
    /// `VmFlags`: `dd` don't dump, `lo` locked, `wf` wipe on fork, …
    pub flags: Vec<String>,
}

/// The mappings of `pid` (kz itself for `None`), with their flags, from `/proc/<pid>/smaps`.
pub fn read_mappings(pid: Option<u32>) -> Result<Vec<Mapping>, HardenError> {
    let text = match pid {
        None => std::fs::read_to_string("/proc/self/smaps"),
        Some(p) => std::fs::read_to_string(format!("/proc/{p}/smaps")),
    }
    .map_err(|source| HardenError::Proc {
        path: "/proc/<pid>/smaps",
        source,
    })?;
    Ok(parse_smaps(&text))
}

/// Mappings of `/proc/<pid>/smaps` text (or `maps`, the same headers without attributes).
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(m) = out.last_mut() {
                m.flags = flags.split_whitespace().map(str::to_owned).collect();
            }
            continue;
        }
        // A mapping's header: `start-end perms offset dev inode [name]`; attribute lines
        // (`Rss:   4 kB`) have a key ending in ':' instead.
        let mut parts = line.split_whitespace();
        let Some((start, end)) = parts.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let perms = parts.next().unwrap_or_default().to_owned();
        let name = parts.skip(3).collect::<Vec<_>>().join(" ");
        out.push(Mapping {
            start,
            end,
            perms,
            name,
            flags: Vec::new(),
        });
    }
    out
}

/// The `VmFlags` of kz's mapping that holds `addr`, if any.
pub fn mapping_flags(addr: usize) -> Result<Option<Vec<String>>, HardenError> {
    Ok(read_mappings(None)?
        .into_iter()
        .find(|m| m.start <= addr && addr < m.end)
        .map(|m| m.flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    /// Marks the lines a helper child prints for its parent test.
    const MARK: &str = "KZ-HARDEN-HELPER ";
    const HELPER: &str = "harden::tests::helper_child";
    const REAL: &str = "real-value-4f1c9a77e2";
    const LOGIN: &str = "login-token-8b2d0c";

    /// A re-executed copy of this test binary running [`helper_child`] in `mode`: the tests
    /// never change the test runner's own environment, dumpability or limits.
    fn helper(mode: &str) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", HELPER, "--nocapture", "--test-threads=1"])
            .env("KZ_HARDEN_HELPER", mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        cmd
    }

    /// The helper's message on `line` (libtest may have printed the test's name before it).
    fn marked(line: &str) -> Option<&str> {
        line.find(MARK).map(|i| &line[i + MARK.len()..])
    }

    /// Not a test of its own: the body of the re-executed helpers (does nothing without
    /// KZ_HARDEN_HELPER).
    #[test]
    fn helper_child() {
        let Ok(mode) = std::env::var("KZ_HARDEN_HELPER") else {
            return;
        };
        let say = |s: String| {
            println!("{MARK}{s}");
            std::io::stdout().flush().unwrap();
        };
        match mode.as_str() {
            "scrub" => {
                // Background threads reading the environment the whole time, as kz's are.
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let readers: Vec<_> = (0..2)
                    .map(|_| {
                        let stop = stop.clone();
                        std::thread::spawn(move || {
                            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                                let _ = std::env::var("PATH").unwrap();
                                let _ = std::env::vars_os().count();
                            }
                        })
                    })
                    .collect();
                let names = vec!["KZH_LOGIN".to_owned(), "KZH_UNSET".to_owned()];
                let r = scrub_own_environ(&names, &[REAL, "ab"]).unwrap();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                for t in readers {
                    t.join().unwrap();
                }
                say(format!("removed={}", r.removed.join(",")));
                say(format!("overwritten={}", r.overwritten));
                for v in [
                    "KZH_SOURCE",
                    "KZH_LOGIN",
                    "KZH_URL",
                    "KZH_KEEP",
                    "KZH_SHORT",
                ] {
                    say(format!("{v}={:?}", std::env::var(v).ok()));
                }
                // The parent reads /proc/<pid>/environ now; EOF on stdin ends the helper.
                say("ready".into());
                let mut sink = String::new();
                let _ = std::io::stdin().read_line(&mut sink);
            }
            "protect" => {
                say(format!("dumpable_before={}", is_dumpable().unwrap()));
                set_not_dumpable().unwrap();
                set_no_core_dumps().unwrap();
                say(format!("dumpable_after={}", is_dumpable().unwrap()));
                let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
                let core = limits
                    .lines()
                    .find(|l| l.starts_with("Max core file size"))
                    .unwrap()
                    .split_whitespace()
                    .skip(4)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                say(format!("core={core}"));
                // A program this process executes is dumpable again (execve resets it).
                let out = helper("report").stdin(Stdio::null()).output().unwrap();
                for l in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some(m) = marked(l) {
                        say(format!("child_{m}"));
                    }
                }
            }
            "report" => say(format!("dumpable={}", is_dumpable().unwrap())),
            other => panic!("unknown helper mode {other}"),
        }
    }

    #[test]
    fn scrub_clears_the_original_block_and_the_environment() {
        let mut child = helper("scrub")
            .env("KZH_SOURCE", REAL)
            .env("KZH_LOGIN", LOGIN)
            .env("KZH_URL", format!("https://u:{REAL}@db.example"))
            .env("KZH_KEEP", "harmless")
            // Shorter than MIN_VALUE_MATCH: "ab" is not looked for.
            .env("KZH_SHORT", "xaby")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut said = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(m) = marked(&line) {
                if m == "ready" {
                    break;
                }
                said.push(m.to_owned());
            }
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        drop(child.stdin.take());
        for _ in lines {}
        let status = child.wait().unwrap();
        assert!(status.success(), "{said:?}");

        assert!(
            said.contains(&"removed=KZH_LOGIN,KZH_SOURCE,KZH_URL".to_owned()),
            "{said:?}"
        );
        assert!(said.contains(&"overwritten=3".to_owned()), "{said:?}");
        assert!(said.contains(&"KZH_SOURCE=None".to_owned()), "{said:?}");
        assert!(said.contains(&"KZH_LOGIN=None".to_owned()), "{said:?}");
        assert!(said.contains(&"KZH_URL=None".to_owned()), "{said:?}");
        assert!(
            said.contains(&r#"KZH_KEEP=Some("harmless")"#.to_owned()),
            "{said:?}"
        );
        assert!(
            said.contains(&r#"KZH_SHORT=Some("xaby")"#.to_owned()),
            "{said:?}"
        );

        let text = String::from_utf8_lossy(&environ);
        assert!(!text.contains(REAL), "real value in /proc/<pid>/environ");
        assert!(!text.contains(LOGIN), "login in /proc/<pid>/environ");
        // The entries stay (with their values zeroed); the others are untouched.
        let entries: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        for name in ["KZH_SOURCE=", "KZH_LOGIN=", "KZH_URL="] {
            assert!(entries.contains(&name.as_bytes()), "{name} entry gone");
        }
        assert!(entries.contains(&&b"KZH_KEEP=harmless"[..]));
        assert!(entries.contains(&&b"KZH_SHORT=xaby"[..]));
        assert!(entries.iter().any(|e| e.starts_with(b"PATH=/")));
    }

    #[test]
    fn protection_makes_kz_undumpable_without_core_and_exec_restores_dumpability() {
        let out = helper("protect").stdin(Stdio::null()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let said: Vec<&str> = text.lines().filter_map(marked).collect();
        assert!(out.status.success(), "{text}");
        assert_eq!(
            said,
            [
                "dumpable_before=true",
                "dumpable_after=false",
                "core=0 0",
                "child_dumpable=true"
            ],
            "{text}"
        );
    }

    #[test]
    fn env_range_is_read_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[50 - 3] = "140737488347000".into();
        fields[51 - 3] = "140737488349000".into();
        let stat = format!("4242 (a b) c) {}\n", fields.join(" "));
        assert_eq!(
            parse_env_range(&stat),
            Some((140_737_488_347_000, 140_737_488_349_000))
        );
        assert_eq!(parse_env_range("4242 (kz) S 1 2 3"), None);
        // Zeroed fields (a process we may not inspect) are no block.
        let zeros = format!("1 (x) {}", vec!["0"; 60].join(" "));
        assert_eq!(parse_env_range(&zeros), None);
    }

    #[test]
    fn smaps_headers_and_flags_are_parsed() {
        let text = "\
7f00000000-7f00001000 rw-p 00000000 00:00 0 \n\
Size:                  4 kB\n\
VmFlags: rd wr mr mw me dd lo wf \n\
7ffd000000-7ffd021000 rw-p 00000000 00:00 0                          [stack]\n\
Rss:                  12 kB\n\
VmFlags: rd wr mr mw me gd ac \n";
        let maps = parse_smaps(text);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[0].start, 0x7f_0000_0000);
        assert_eq!(
            maps[0].flags,
            ["rd", "wr", "mr", "mw", "me", "dd", "lo", "wf"]
        );
        assert_eq!(maps[1].name, "[stack]");
        assert!(!maps[1].flags.contains(&"dd".to_owned()));
    }

    #[test]
    fn values_are_matched_inside_other_variables_but_not_short_ones() {
        assert!(holds_value(b"postgres://u:sekret@db", &["sekret"]));
        assert!(!holds_value(b"abc", &["abcd"]));
        assert!(!holds_value(b"xaby", &["ab"]));
        assert!(!holds_value(b"anything", &[]));
    }
}
