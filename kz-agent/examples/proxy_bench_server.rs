//! The kz swapping proxy as a standalone process, for `cargo xtask bench proxy`.
//!
//! `proxy_bench_server --dst IP:PORT --upstream-ca FILE --ca-out FILE --masked TOKEN \
//!     --real-env VAR --host NAME [--plain-dst IP:PORT]`
//!
//! Listens on 127.0.0.1 (random ports) transparently (every connection is treated as redirected
//! to `--dst`, or to `--plain-dst` when the client's source address is 127.0.0.2) and
//! explicitly, prints `READY <transparent> <explicit>` and serves until stdin closes. The real
//! value is read from the environment variable named by `--real-env`, never from argv.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use kz_agent::audit::{AuditError, AuditEvent, AuditSink};
use kz_agent::proxy::{self, CertAuthority, TokenTable};
use kz_agent::secret::Secret;

/// Counts records instead of writing them: the bench measures the data plane.
struct Count(std::sync::atomic::AtomicU64);

impl AuditSink for Count {
    fn record(&self, _e: AuditEvent) -> Result<(), AuditError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// jemalloc: the proxy allocates and frees small buffers on every request from several
/// threads; it measured cheaper than glibc's malloc there (see `cargo xtask bench proxy`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn arg(name: &str) -> Option<String> {
    let mut it = std::env::args();
    while let Some(a) = it.next() {
        if a == name {
            return it.next();
        }
    }
    None
}

/// The bench's one session (a node would use the sandbox's cgroup id).
const SESSION: proxy::SessionId = 1;

fn main() {
    let dst: SocketAddr = arg("--dst").expect("--dst").parse().unwrap();
    let plain_dst: Option<SocketAddr> = arg("--plain-dst").map(|s| s.parse().unwrap());
    let masked = arg("--masked").expect("--masked");
    let real = std::env::var(arg("--real-env").expect("--real-env")).expect("real value env");
    let host = arg("--host").expect("--host");
    // 0: the proxy's default worker count.
    let threads: usize = arg("--threads").map_or(0, |t| t.parse().unwrap());
    // The proxy serves on its own worker threads; this runtime only starts and stops it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ca = Arc::new(CertAuthority::generate(1024).unwrap());
        std::fs::write(arg("--ca-out").expect("--ca-out"), ca.cert_pem()).unwrap();
        let tokens = TokenTable::new();
        tokens
            .insert_named("BENCH", &masked, Secret::new(real), vec![host.clone()])
            .unwrap();
        let audit = Arc::new(Count(Default::default()));
        let mut session = proxy::Session::new(SESSION, ca, tokens, audit.clone());
        let host2 = host.clone();
        session.resolve = Some(proxy::known_hosts(move |h, port| {
            (h == host2).then(|| SocketAddr::new(dst.ip(), port))
        }));
        let mut cfg = proxy::Config::new(audit);
        cfg.sessions = vec![session];
        cfg.explicit_session = Some(SESSION);
        cfg.transparent_listen = vec!["127.0.0.1:0".parse().unwrap()];
        cfg.explicit_listen = vec!["127.0.0.1:0".parse().unwrap()];
        cfg.upstream_ca = arg("--upstream-ca").map(Into::into);
        cfg.limits.max_connections = 20_000;
        cfg.limits.workers = threads;
        cfg.orig_dst = Some(Arc::new(move |peer: SocketAddr| {
            // Only the peer address is passed (as from the interception map), so the bench
            // marks plain-HTTP clients by their source address: 127.0.0.2.
            let dest = if peer.ip() == std::net::IpAddr::from([127, 0, 0, 2]) {
                plain_dst.unwrap_or(dst)
            } else {
                dst
            };
            Some(proxy::Redirected {
                dest,
                session: SESSION,
            })
        }));
        let h = proxy::start(cfg).await.unwrap();
        println!("READY {} {}", h.transparent_addrs[0], h.explicit_addrs[0]);
        // Serve until stdin closes (the bench holds the pipe).
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            while std::io::stdin()
                .read_line(&mut s)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                s.clear();
            }
        })
        .await
        .ok();
        h.shutdown().await;
    });
}
