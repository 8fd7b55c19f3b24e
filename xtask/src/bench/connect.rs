//! `cargo xtask bench connect`: what kernel interception adds to a TCP connect.
//!
//! In a private network namespace (only `lo`: nothing can leave the machine)
//! one accept-and-close server listens on 127.0.0.1:<port>. Three clients each do N
//! connect()+close() loops to it, in alternating rounds:
//! - direct: connect to 127.0.0.1:<port>, no cgroup;
//! - kz: connect to 10.99.1.2:80 from inside a cgroup guarded by `kz intercept hold`
//!   (connect4 rewrites it to the server, sock_ops re-keys the original destination);
//! - iptables: connect to 10.99.1.3:80 redirected by an `iptables -t nat OUTPUT REDIRECT` rule,
//!   the classic transparent-proxy way (skipped when iptables is not installed).
//!
//! Reports per-connect latency (the connect() call), per-iteration latency (connect + close
//! handshake) and connections/s, with ratios and µs added relative to direct. Target: kz adds
//! < 5 µs per connect.

use crate::setup;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

// Many short alternating rounds: the machine is shared, so load drifts during a run.
const ROUNDS: usize = 15;
const PER_ROUND: usize = 1500;
const WARMUP: usize = 300;

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        // Closing stdin is `kz intercept hold`'s orderly stop; the server just gets killed.
        drop(self.0.stdin.take());
        if self.0.stdin.is_none() && self.0.try_wait().ok().flatten().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    connect_ns: f64,
    iter_ns: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run() -> Result<()> {
    let path = setup::path_with_tools();
    eprintln!("bench connect: building kz");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "kz-agent", "--bin", "kz"])
        .env("PATH", &path)
        .current_dir(workspace())
        .status()?;
    if !status.success() {
        bail!("building kz failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let kz = target.join("debug/kz");
    let me = std::env::current_exe()?;

    let ns = Netns(format!("kzbench{}", std::process::id()));
    sh("ip", &["netns", "add", &ns.0])?;
    sh("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
    // 10.99.1.0/24 on lo gives the benchmark's "remote" addresses a route (iptables needs one);
    // the namespace has no other device, so nothing can leave it.
    sh(
        "ip",
        &["-n", &ns.0, "addr", "add", "10.99.1.1/24", "dev", "lo"],
    )?;
    let netns_arg = format!("--net=/run/netns/{}", ns.0);

    let mut server = Kill(
        Command::new("nsenter")
            .arg(&netns_arg)
            .arg("--")
            .arg(&me)
            .args(["bench-helper", "serve"])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let port: u16 = first_line(&mut server.0)?
        .trim()
        .parse()
        .context("server port")?;

    let mut hold = Kill(
        Command::new(&kz)
            .args([
                "intercept",
                "hold",
                "--name",
                &format!("bench-{}", std::process::id()),
            ])
            .args(["--proxy-port", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start kz intercept hold")?,
    );
    let desc: serde_json::Value = serde_json::from_str(&first_line(&mut hold.0)?)?;
    let procs =
        PathBuf::from(desc["cgroup_path"].as_str().unwrap_or_default()).join("cgroup.procs");

    let iptables = sh(
        "nsenter",
        &[
            &netns_arg,
            "--",
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.99.1.3",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port.to_string(),
        ],
    );
    if let Err(e) = &iptables {
        eprintln!("bench connect: iptables peer skipped: {e}");
    }

    let client = |addr: &str, in_cgroup: bool, n: usize| -> Result<Sample> {
        let script = format!(
            "{} exec \"$0\" bench-helper connect {addr} {n}",
            if in_cgroup {
                format!("echo $$ > '{}' &&", procs.display())
            } else {
                String::new()
            }
        );
        let out = Command::new("nsenter")
            .arg(&netns_arg)
            .args(["--", "sh", "-c", &script])
            .arg(&me)
            .output()?;
        if !out.status.success() {
            bail!(
                "client for {addr} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|v| v.parse::<f64>());
        Ok(Sample {
            connect_ns: it.next().context("connect_ns")??,
            iter_ns: it.next().context("iter_ns")??,
        })
    };

    let direct_addr = format!("127.0.0.1:{port}");
    let mut modes: Vec<(&str, String, bool)> = vec![
        ("direct", direct_addr, false),
        ("kz (eBPF)", "10.99.1.2:80".into(), true),
    ];
    if iptables.is_ok() {
        modes.push(("iptables REDIRECT", "10.99.1.3:80".into(), false));
    }
    for (_, addr, cg) in &modes {
        client(addr, *cg, WARMUP)?;
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for round in 0..ROUNDS {
        for (i, (_, addr, cg)) in modes.iter().enumerate() {
            samples[i].push(client(addr, *cg, PER_ROUND)?);
        }
        eprintln!("bench connect: round {}/{ROUNDS} done", round + 1);
    }

    let stats: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| {
            (
                median(s.iter().map(|x| x.connect_ns).collect()),
                median(s.iter().map(|x| x.iter_ns).collect()),
            )
        })
        .collect();
    let (base_c, base_i) = stats[0];
    println!(
        "connect()+close() over loopback, {ROUNDS} alternating rounds x {PER_ROUND} connections;\n\
         connect µs = median over rounds of each round's median connect(); conns/s from mean iteration"
    );
    println!(
        "{:<18} {:>12} {:>9} {:>10} {:>14} {:>9} {:>10}",
        "path", "connect µs", "ratio", "added µs", "connect+close", "conns/s", "ratio"
    );
    for ((name, _, _), (c, i)) in modes.iter().zip(&stats) {
        println!(
            "{:<18} {:>12.2} {:>8.2}x {:>10.2} {:>12.2}µs {:>9.0} {:>9.2}x",
            name,
            c / 1e3,
            c / base_c,
            (c - base_c) / 1e3,
            i / 1e3,
            1e9 / i,
            base_i / i,
        );
    }
    let kz_added = (stats[1].0 - base_c) / 1e3;
    println!(
        "kz adds {kz_added:.2} µs per connect (target < 5 µs): {}",
        if kz_added < 5.0 { "met" } else { "NOT met" }
    );
    drop(hold);
    drop(server);
    Ok(())
}

fn first_line(child: &mut Child) -> Result<String> {
    let out = child.stdout.take().context("no stdout")?;
    let mut r = BufReader::new(out);
    let mut line = String::new();
    r.read_line(&mut line)?;
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    if line.is_empty() {
        bail!("child exited before printing its first line");
    }
    Ok(line)
}

/// `xtask bench-helper serve`: accept and close, forever; prints the port first.
pub fn serve() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    for s in l.incoming() {
        drop(s);
    }
    Ok(())
}

/// `xtask bench-helper connect ADDR N`: N connect()+close() loops; prints the median ns of the
/// connect() call and the mean ns of the whole iteration.
pub fn connect(addr: &str, n: usize) -> Result<()> {
    let mut connects = Vec::with_capacity(n);
    let start = Instant::now();
    let mut buf = [0u8; 16];
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        connects.push(t.elapsed().as_nanos() as f64);
        // The server closes first; waiting for its FIN keeps TIME_WAIT on the server side so
        // the client never runs out of ports.
        while s.read(&mut buf).map(|k| k > 0).unwrap_or(false) {}
    }
    let total = start.elapsed().as_nanos() as f64;
    let n = n.max(1) as f64;
    // The median connect() is robust against a busy machine's scheduling hiccups.
    println!("{} {}", median(connects), total / n);
    Ok(())
}
