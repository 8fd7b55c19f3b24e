//! `cargo xtask bench audit`: what one proxy audit record costs through the hash-chained file
//! sink (HMAC-SHA-256 chain), against the plain path (the same event as one JSON line appended to a file, no chain).
//! The proxy writes one per request on its worker thread, so this is per-request overhead.

use kz_agent::audit::{AuditEvent, AuditKey, AuditSink, ChainSink, Fsync, Rotation, SinkTarget};
use std::io::Write;
use std::time::Instant;

/// A record shaped like the proxy's `proxy_request` with a run's context fields.
fn event(i: u64) -> AuditEvent {
    AuditEvent::new("proxy_request")
        .with("host", "api.example.com")
        .with("port", 443u16)
        .with("method", "POST")
        .with("path", "/v1/chat/completions?stream=")
        .with("status", 200u16)
        .with("mode", "transparent")
        .with("protocol", "HTTP/1.1")
        .with("swapped", serde_json::json!(["OPENAI_API_KEY"]))
        .with("out_of_scope", serde_json::json!([]))
        .with("scrubbed", serde_json::json!([]))
        .with("bytes_up", 1200u64)
        .with("bytes_down", 3400u64)
        .with("duration_ms", 0.123)
        .with("run", "r-7f3a")
        .with("agent", "coder")
        .with("n", i)
}

fn main() -> std::io::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile_dir()?;
    let chained = dir.join("audit.jsonl");
    let key = std::sync::Arc::new(AuditKey::generate().map_err(std::io::Error::other)?);
    let sink = ChainSink::open_with_key(
        SinkTarget::File {
            path: chained.clone(),
            fsync: Fsync::Interval,
            rotation: Rotation::size(None),
        },
        key.clone(),
    )
    .map_err(std::io::Error::other)?;
    let plain_path = dir.join("plain.jsonl");
    let mut plain = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plain_path)?;
    // Alternate rounds so drift on a shared machine hits both alike.
    let (mut t_chain, mut t_plain) = (0.0, 0.0);
    for round in 0..4 {
        let t = Instant::now();
        for i in 0..n / 4 {
            sink.record(event(round * n + i))
                .map_err(std::io::Error::other)?;
        }
        t_chain += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n / 4 {
            let ev = event(round * n + i);
            let mut line = serde_json::to_vec(&ev.fields)?;
            line.push(b'\n');
            plain.write_all(&line)?;
        }
        t_plain += t.elapsed().as_secs_f64();
    }
    let per = |t: f64| t * 1e6 / n as f64;
    println!("audit record, {n} records each (4 alternating rounds)");
    println!("  plain JSON line     {:>6.2} µs/record", per(t_plain));
    println!(
        "  kz chained sink     {:>6.2} µs/record  {:.2}x plain",
        per(t_chain),
        t_chain / t_plain
    );
    let report =
        kz_agent::audit::verify_path_with(&chained, Ok(&key)).map_err(std::io::Error::other)?;
    println!("  chain verified: {} records", report.records);
    std::fs::remove_dir_all(&dir)
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kz-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
