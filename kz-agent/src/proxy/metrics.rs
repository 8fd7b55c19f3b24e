//! Prometheus text-format counters. Plain atomics: the hot path pays one relaxed add per event.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($name:ident: $kind:literal, $help:literal;)*) => {
        /// Proxy counters and gauges (see [`Metrics::render`]).
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// The Prometheus text exposition (version 0.0.4).
            pub fn render(&self, cached_leaves: usize, idle_upstreams: usize) -> String {
                let mut out = String::with_capacity(2048);
                $(
                    let _ = writeln!(out, "# HELP kz_proxy_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE kz_proxy_{} {}", stringify!($name), $kind);
                    let _ = writeln!(out, "kz_proxy_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                let _ = writeln!(out, "# HELP kz_proxy_leaf_cache_entries Minted leaf certificates in the cache.");
                let _ = writeln!(out, "# TYPE kz_proxy_leaf_cache_entries gauge");
                let _ = writeln!(out, "kz_proxy_leaf_cache_entries {cached_leaves}");
                let _ = writeln!(out, "# HELP kz_proxy_upstream_idle_connections Pooled idle upstream connections.");
                let _ = writeln!(out, "# TYPE kz_proxy_upstream_idle_connections gauge");
                let _ = writeln!(out, "kz_proxy_upstream_idle_connections {idle_upstreams}");
                out
            }
        }
    };
}

metrics! {
    connections_total: "counter", "Accepted client connections.";
    connections_active: "gauge", "Client connections being served.";
    connections_rejected_total: "counter", "Connections closed at accept because max_connections was reached.";
    connections_denied_total: "counter", "Connections whose destination the connection rules deny.";
    connections_spliced_total: "counter", "Non-HTTP connections spliced through without swapping.";
    handshake_failures_total: "counter", "Client TLS handshakes or first reads that failed or timed out (garbage TLS, slowloris).";
    requests_total: "counter", "HTTP requests proxied.";
    upstream_errors_total: "counter", "Requests answered 502/504 because the upstream failed (connect, TLS verification, protocol).";
    tokens_swapped_total: "counter", "Masked tokens replaced by their real value.";
    tokens_out_of_scope_total: "counter", "Masked tokens seen on a host outside their scope (left masked).";
    secrets_scrubbed_total: "counter", "Real values replaced by their masked token in responses.";
    bytes_upstream_total: "counter", "Request body bytes sent upstream.";
    bytes_downstream_total: "counter", "Response body bytes sent to clients.";
    audit_errors_total: "counter", "Audit records the sink failed to write.";
    request_body_timeouts_total: "counter", "Request bodies cut off by the body read timeout (body_read_timeout, body_min_rate).";
    buffered_bodies_full_total: "counter", "Request bodies refused (503) because max_buffered_total was held by other bodies.";
    buffered_responses_streamed_total: "counter", "Response bodies streamed instead of read whole because max_buffered_total was held.";
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
