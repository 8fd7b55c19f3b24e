//! A small closed-loop HTTP/1.1 load generator (hyper): N connections, each sending the same
//! request back to back for a fixed time after a warm-up; latencies of every request are kept
//! for exact percentiles. It runs on ONE thread so it takes the same share of the machine
//! whichever server it measures.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub struct Spec {
    pub addr: SocketAddr,
    pub path: String,
    pub token: String,
    pub body: String,
    /// A response body must contain this to count as a success.
    pub expect: String,
}

async fn client(
    spec: &Spec,
    warm_until: Instant,
    stop_at: Instant,
) -> anyhow::Result<(Vec<u32>, u64)> {
    let stream = tokio::net::TcpStream::connect(spec.addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let body = Bytes::from(spec.body.clone());
    let auth = format!("Bearer {}", spec.token);
    let mut lat = Vec::with_capacity(4096);
    let mut errors = 0;
    loop {
        let start = Instant::now();
        if start >= stop_at {
            break;
        }
        let req = Request::post(spec.path.as_str())
            .header("host", "bench")
            .header("content-type", "application/json")
            .header("authorization", auth.as_str())
            .body(Full::new(body.clone()))?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let ok = resp.status().is_success();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let good = ok
            && bytes
                .windows(spec.expect.len())
                .any(|w| w == spec.expect.as_bytes());
        if start >= warm_until {
            if good {
                lat.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            } else {
                errors += 1;
            }
        }
    }
    Ok((lat, errors))
}

pub fn run(
    spec: Spec,
    clients: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let spec = std::rc::Rc::new(spec);
    local.block_on(&rt, async move {
        let warm_until = Instant::now() + warmup;
        let stop_at = warm_until + measure;
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            let spec = spec.clone();
            tasks.push(tokio::task::spawn_local(async move {
                client(&spec, warm_until, stop_at).await
            }));
        }
        let mut all = Vec::new();
        let mut errors = 0u64;
        for t in tasks {
            match t.await? {
                Ok((lat, e)) => {
                    all.extend(lat);
                    errors += e;
                }
                Err(_) => errors += 1,
            }
        }
        all.sort_unstable();
        let pct = |p: f64| -> f64 {
            if all.is_empty() {
                return f64::NAN;
            }
            let i = ((all.len() as f64 - 1.0) * p).round() as usize;
            f64::from(all[i])
        };
        Ok(Outcome {
            ok: all.len() as u64,
            errors,
            per_sec: all.len() as f64 / measure.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
        })
    })
}
