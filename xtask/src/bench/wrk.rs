//! wrk (Debian's, C, epoll) as the load generator when it is installed: it needs far less CPU
//! per request than a Rust HTTP client, which matters on a 2-core machine where the generator
//! and the server under test share the cores. Correctness is checked separately (load.rs).

use super::load::{Outcome, Spec};
use anyhow::{Context, bail};
use std::process::Command;
use std::time::Duration;

pub fn available() -> bool {
    Command::new("wrk").arg("--version").output().is_ok()
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1_000.0)
    } else if let Some(v) = s.strip_suffix("m") {
        (v, 60_000_000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

pub fn run(
    spec: &Spec,
    clients: usize,
    measure: Duration,
    dir: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let script = dir.join(format!("wrk-{}.lua", spec.method));
    let lua = if spec.method == "GET" {
        "wrk.method = \"GET\"\n".to_owned()
    } else {
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {}\"\n",
            spec.body, spec.token
        )
    };
    std::fs::write(&script, lua)?;
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c",
            &clients.to_string(),
            "-d",
            &format!("{}s", measure.as_secs()),
        ])
        .args(["--latency", "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(format!("http://{}{}", spec.addr, spec.path))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut o = Outcome {
        ok: 0,
        errors: 0,
        per_sec: 0.0,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
    };
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("50%") {
            o.p50_us = parse_duration_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            o.p99_us = parse_duration_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            o.per_sec = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            o.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if t.contains("requests in") {
            o.ok = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            o.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    o.ok = o.ok.saturating_sub(o.errors);
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_us("250.00us"), Some(250.0));
        assert_eq!(parse_duration_us("1.50ms"), Some(1500.0));
        assert_eq!(parse_duration_us("2.00s"), Some(2_000_000.0));
    }
}
