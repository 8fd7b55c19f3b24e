//! kz keeps its secrets to itself: its own memory, environment and dumps hold no real value a
//! process beside it could read.
//!
//! Each test starts `kz run --blind -- sleep 30` with an `env` secret (the real value in kz's
//! environment, as a user's shell would put it there), waits until the agent runs (secrets
//! resolved, kz's environment scrubbed), and inspects kz from outside through /proc:
//! - `/proc/<kz>/environ` (the block kz was started with) no longer holds the real value;
//! - `/proc/<kz>/limits`: core file size 0, soft and hard;
//! - kz's memory (read through `/proc/<kz>/mem`, as root may): the real value sits in a mapping
//!   marked `dd` (MADV_DONTDUMP) in `/proc/<kz>/smaps`;
//! - non-dumpable: `/proc/<kz>/*` belongs to root although kz runs as a normal user (fallback
//!   mode), and that user cannot read kz's environ; the agent, exec'ed by kz, is dumpable again
//!   (its /proc files are its own user's).
//!
//! `kz server start`, run as a normal user, is checked the same way (non-dumpable, no core).
//!
//! `KZ_TEST_KZ_BIN` runs the tests against another kz build, e.g. one without the protections
//! to see each assertion fail.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::netns::Netns;

const REAL: &str = "real-selfprot-5e8b21d9c4a7";

fn kz_bin() -> String {
    std::env::var("KZ_TEST_KZ_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kz").to_owned())
}

/// A project whose one secret comes from the `KZ_TEST_REAL_KEY` environment variable.
fn project(prefix: &str) -> PathBuf {
    let dir = support::agent_readable_dir(prefix);
    std::fs::write(
        dir.join(".keyzero.toml"),
        r#"
[secrets.API_KEY]
resolver = "env"
ref = "KZ_TEST_REAL_KEY"
hosts = ["api.allowed.test"]

[blind]
connections = [{ allow = true, host = "api.allowed.test" }]
resolver = "127.0.0.1:53"
"#,
    )
    .unwrap();
    dir
}

/// A running `kz run --blind`, its output read on threads (a full pipe would stall kz).
struct Run {
    child: Child,
    dir: PathBuf,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

fn reader(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = from.read_to_string(&mut text);
        text
    })
}

/// `prlimit --core=unlimited -- <rest> kz run --blind -- sleep 30` inside `ns`: kz starts
/// with core dumps allowed, so a core limit of 0 can only be its own doing. nsenter, prlimit
/// and setpriv exec, so the child's pid is kz's.
fn start(ns: &Netns, rest: &[&str], dir: &Path, configure: impl FnOnce(&mut Command)) -> Run {
    let mut cmd = ns.command("prlimit");
    cmd.arg("--core=unlimited:unlimited")
        .arg("--")
        .args(rest)
        .arg(kz_bin())
        .arg("--dir")
        .arg(dir)
        .args(["run", "--blind", "--", "sleep", "30"])
        .env("KZ_TEST_REAL_KEY", REAL)
        .env("KZ_AUDIT_LOG", dir.join("audit.jsonl"))
        .env("KZ_LOG", "debug")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let stdout = reader(child.stdout.take().unwrap());
    let stderr = reader(child.stderr.take().unwrap());
    Run {
        child,
        dir: dir.to_owned(),
        stdout,
        stderr,
    }
}

impl Run {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid of kz's child (the agent) once it has exec'ed: kz resolved its secrets and
    /// scrubbed its environment before starting it.
    fn agent(&mut self) -> u32 {
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let (o, e) = self.output();
                panic!("kz exited early ({status}):\nstdout:\n{o}\nstderr:\n{e}");
            }
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Some(child) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                    continue;
                };
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let comm =
                    std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if ppid == Some(pid) && comm.trim() == "sleep" {
                    return child;
                }
            }
            assert!(Instant::now() < deadline, "the agent never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything kz printed, once it has exited.
    fn output(&mut self) -> (String, String) {
        let _ = self.child.wait();
        let o = std::mem::replace(&mut self.stdout, std::thread::spawn(String::new));
        let e = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        (o.join().unwrap(), e.join().unwrap())
    }

    /// Ends the run (SIGTERM is forwarded to the agent); no output may carry the value.
    fn stop(mut self, checks: &mut Checks) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let (o, e) = self.output();
        checks.check(!o.contains(REAL), || {
            format!("real value on kz's stdout:\n{o}")
        });
        checks.check(!e.contains(REAL), || "real value on kz's stderr".to_owned());
        let audit = std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default();
        checks.check(audit.contains("run_start"), || {
            "no audit log written".to_owned()
        });
        checks.check(!audit.contains(REAL), || {
            "real value in the audit log".to_owned()
        });
        let tail: String = e.lines().rev().take(15).collect::<Vec<_>>().join("\n");
        eprintln!("kz ended; the last lines of its stderr, newest first:\n{tail}");
    }
}

impl Drop for Run {
    /// A failed test does not leave kz and its agent running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// Every failed property of one run, reported together: a run on a kz without the protections
/// shows each one that is missing, not only the first.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.0.push(why());
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// `/proc/<kz>/environ` no longer carries the real value; its entry is still there, emptied.
fn environ_is_scrubbed(kz: u32, checks: &mut Checks) {
    let environ = std::fs::read(format!("/proc/{kz}/environ")).unwrap();
    let text = String::from_utf8_lossy(&environ);
    checks.check(!text.contains(REAL), || {
        format!("the real value is in /proc/{kz}/environ: kz's original environment block still holds it")
    });
    checks.check(
        environ
            .split(|b| *b == 0)
            .any(|e| e == b"KZ_TEST_REAL_KEY="),
        || "/proc/<kz>/environ: the source variable's entry should remain, its value zeroed".into(),
    );
}

/// `Max core file size` of `/proc/<pid>/limits` is 0, soft and hard.
fn core_limit_is_zero(kz: u32, checks: &mut Checks) {
    let limits = std::fs::read_to_string(format!("/proc/{kz}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .to_owned();
    let values: Vec<&str> = line.split_whitespace().skip(4).take(2).collect();
    checks.check(values == ["0", "0"], || {
        format!("kz's core file size limit (soft, hard) is not 0: {line}")
    });
}

/// Every mapping of kz's memory that holds the real value, and how many times.
fn occurrences(kz: u32) -> Vec<(kz_agent::harden::Mapping, usize)> {
    let maps = kz_agent::harden::read_mappings(Some(kz)).unwrap();
    let mem = std::fs::File::open(format!("/proc/{kz}/mem")).unwrap();
    let mut found = Vec::new();
    for m in maps {
        let len = m.end - m.start;
        if !m.perms.starts_with("rw") || len > 1 << 30 || m.name.starts_with("[v") {
            continue;
        }
        let mut buf = vec![0u8; len];
        if mem.read_exact_at(&mut buf, m.start as u64).is_err() {
            continue;
        }
        let hits = buf
            .windows(REAL.len())
            .filter(|w| *w == REAL.as_bytes())
            .count();
        if hits > 0 {
            found.push((m, hits));
        }
    }
    found
}

/// The resolved value is held in don't-dump memory (the `Secret`'s arena).
fn secret_memory_is_dd(kz: u32, checks: &mut Checks) {
    let found = occurrences(kz);
    for (m, hits) in &found {
        eprintln!(
            "real value x{hits} in {:x}-{:x} {} {:?} flags {:?}",
            m.start, m.end, m.perms, m.name, m.flags
        );
    }
    checks.check(!found.is_empty(), || {
        "the real value is nowhere in kz's memory: did the run resolve it?".into()
    });
    checks.check(
        found.iter().any(|(m, _)| m.flags.iter().any(|f| f == "dd")),
        || {
            format!(
                "no copy of the real value is in a don't-dump (dd) mapping of kz: {:?}",
                found
                    .iter()
                    .map(|(m, n)| (
                        format!("{:x}", m.start),
                        m.name.clone(),
                        m.flags.join(" "),
                        *n
                    ))
                    .collect::<Vec<_>>()
            )
        },
    );
}

/// The uid `/proc/<pid>/status` gives as real uid.
fn uid_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

fn owner_of(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().uid()
}

/// The agent, exec'ed by a non-dumpable kz, is dumpable again: its /proc files are its own
/// user's (a non-dumpable process's are root's), and its environment has no real value.
fn agent_is_dumpable_and_clean(agent: u32, checks: &mut Checks) {
    let (owner, uid) = (owner_of(&format!("/proc/{agent}/environ")), uid_of(agent));
    checks.check(owner == uid, || {
        format!("the agent (uid {uid}) inherited kz's non-dumpable state: its /proc files are uid {owner}'s")
    });
    let environ = std::fs::read(format!("/proc/{agent}/environ")).unwrap();
    let text = String::from_utf8_lossy(&environ);
    checks.check(!text.contains(REAL), || {
        "real value in the agent's environment".into()
    });
    checks.check(text.contains("API_KEY=kz_masked_"), || {
        "no masked token in the agent's environment".into()
    });
    checks.check(!text.contains("KZ_TEST_REAL_KEY"), || {
        "the source variable reached the agent".into()
    });
}

/// What every `kz run --blind` here must show (kz scrubbed, no core, secrets in don't-dump
/// memory, a clean dumpable agent), then the run's end (no output carries the value); every
/// failed check of `checks` and these is reported together.
fn check_and_stop(kz: Run, agent: u32, mut checks: Checks) {
    let pid = kz.pid();
    environ_is_scrubbed(pid, &mut checks);
    core_limit_is_zero(pid, &mut checks);
    secret_memory_is_dd(pid, &mut checks);
    agent_is_dumpable_and_clean(agent, &mut checks);
    let dir = kz.dir.clone();
    kz.stop(&mut checks);
    let _ = std::fs::remove_dir_all(&dir);
    checks.finish();
}

#[test]
fn kernel_mode_kz_scrubs_its_environ_and_keeps_secrets_out_of_dumps() {
    if !support::require_root() {
        return;
    }
    let user = support::agent_user();
    let ns = Netns::new("kzsp");
    let dir = project("kzspk");
    let mut kz = start(&ns, &[], &dir, |cmd| user.sudo_env(cmd));
    let agent = kz.agent();
    let pid = kz.pid();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "kz"
    );
    // kz is root here: its /proc files are root's whether it is dumpable or not (the
    // fallback test below sees the difference).
    check_and_stop(kz, agent, Checks::default());
}

#[test]
fn fallback_mode_kz_as_a_normal_user_is_not_dumpable_and_scrubs_its_environ() {
    if !support::require_root() {
        return;
    }
    let user = support::agent_user();
    let ns = Netns::new("kzsf");
    let dir = project("kzspf");
    // kz runs as the test user: it must be able to write the audit log in the project.
    let chown = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", user.uid, user.gid))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(chown.success());
    let reuid = format!("--reuid={}", user.uid);
    let regid = format!("--regid={}", user.gid);
    let setpriv = ["setpriv", &reuid, &regid, "--clear-groups", "--"];
    let mut kz = start(&ns, &setpriv, &dir, |cmd| {
        cmd.env("HOME", &dir).env_remove("XDG_RUNTIME_DIR");
    });
    let agent = kz.agent();
    let pid = kz.pid();
    assert_eq!(uid_of(pid), user.uid, "kz should run as {}", user.name);

    let mut checks = Checks::default();
    // Non-dumpable: kz's /proc files are root's, and its own user (the agent's, here) cannot
    // read its environment.
    let owner = owner_of(&format!("/proc/{pid}/environ"));
    checks.check(owner == 0, || {
        format!(
            "kz (uid {}) is dumpable: /proc/{pid}/environ belongs to uid {owner}, not root",
            user.uid
        )
    });
    let peek = Command::new("setpriv")
        .args([&reuid, &regid, "--clear-groups", "--", "cat"])
        .arg(format!("/proc/{pid}/environ"))
        .output()
        .unwrap();
    let denied = String::from_utf8_lossy(&peek.stderr).contains("Permission denied");
    checks.check(!peek.status.success() && denied, || {
        format!(
            "kz's own user read /proc/{pid}/environ ({} bytes)",
            peek.stdout.len()
        )
    });

    check_and_stop(kz, agent, checks);
}

#[test]
fn server_start_as_a_normal_user_is_not_dumpable_and_has_no_core() {
    if !support::require_root() {
        return;
    }
    let user = support::agent_user();
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bundles/least-privilege.yaml");
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--core=unlimited:unlimited",
        "--",
        "setpriv",
        &format!("--reuid={}", user.uid),
        &format!("--regid={}", user.gid),
        "--clear-groups",
        "--",
    ])
    .arg(kz_bin())
    .args(["server", "start", "--listen", "127.0.0.1:0", "--bundle"])
    .arg(bundle)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.starts_with("kz: PDP listening on "));
    let pid = child.id();
    let mut checks = Checks::default();
    checks.check(listening, || "kz server start did not start".into());
    checks.check(uid_of(pid) == user.uid, || {
        format!("the server should run as {}", user.name)
    });
    let owner = owner_of(&format!("/proc/{pid}/environ"));
    checks.check(owner == 0, || {
        format!("kz server start is dumpable: /proc/{pid}/environ belongs to uid {owner}, not root")
    });
    core_limit_is_zero(pid, &mut checks);
    let _ = child.kill();
    let _ = child.wait();
    checks.finish();
}
