//! Prometheus text metrics: decisions by effect and policy, token rejections by reason,
//! resolver latency histograms, errors, bundle reloads. Plain counters under short locks; the
//! label sets are bounded by the bundle (policy and backend names) and fixed reason codes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket upper bounds, seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    decisions: Mutex<BTreeMap<(bool, String), u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    resolver: Mutex<BTreeMap<(String, bool), Histogram>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    reload_ok: AtomicU64,
    reload_failed: AtomicU64,
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn decision(&self, allowed: bool, policy: &str) {
        let mut m = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(&(allowed, policy.to_owned())) {
            Some(c) => *c += 1,
            None => {
                m.insert((allowed, policy.to_owned()), 1);
            }
        }
    }

    pub fn token_rejected(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, status))
            .or_default() += 1;
    }

    pub fn reload(&self, ok: bool) {
        if ok {
            self.reload_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reload_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn resolver_latency(&self, backend: &str, took: Duration, ok: bool) {
        let secs = took.as_secs_f64();
        let mut m = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        let h = m
            .entry((backend.to_owned(), ok))
            .or_insert_with(|| Histogram {
                counts: vec![0; BUCKETS.len()],
                ..Histogram::default()
            });
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kz_decisions_total Policy decisions by effect and deciding policy."
        );
        let _ = writeln!(out, "# TYPE kz_decisions_total counter");
        for ((allowed, policy), n) in self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let effect = if *allowed { "allow" } else { "deny" };
            let _ = writeln!(
                out,
                "kz_decisions_total{{effect=\"{effect}\",policy=\"{}\"}} {n}",
                escape(policy)
            );
        }
        let _ = writeln!(
            out,
            "# HELP kz_tokens_rejected_total Rejected agent tokens by reason."
        );
        let _ = writeln!(out, "# TYPE kz_tokens_rejected_total counter");
        for (reason, n) in self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "kz_tokens_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kz_resolver_duration_seconds Resolver latency by backend and outcome."
        );
        let _ = writeln!(out, "# TYPE kz_resolver_duration_seconds histogram");
        for ((backend, ok), h) in self
            .resolver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let labels = format!(
                "backend=\"{}\",outcome=\"{}\"",
                escape(backend),
                if *ok { "ok" } else { "error" }
            );
            for (bound, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    out,
                    "kz_resolver_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {c}"
                );
            }
            let _ = writeln!(
                out,
                "kz_resolver_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "kz_resolver_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "kz_resolver_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        let _ = writeln!(out, "# HELP kz_errors_total Internal errors by kind.");
        let _ = writeln!(out, "# TYPE kz_errors_total counter");
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "kz_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kz_http_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE kz_http_requests_total counter");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "kz_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kz_bundle_reloads_total Bundle reloads by outcome."
        );
        let _ = writeln!(out, "# TYPE kz_bundle_reloads_total counter");
        let _ = writeln!(
            out,
            "kz_bundle_reloads_total{{outcome=\"loaded\"}} {}",
            self.reload_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "kz_bundle_reloads_total{{outcome=\"refused\"}} {}",
            self.reload_failed.load(Ordering::Relaxed)
        );
        out
    }
}
