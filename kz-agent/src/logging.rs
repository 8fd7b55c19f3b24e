//! Diagnostics logging to stderr. Never log a `Secret::expose()` result: the invariant tests scan
//! captured stderr for the test secrets.

use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Crates whose debug/trace events print whole protocol messages: rmcp logs every MCP request
/// and result (agent JWTs, `resolve` values), h2 logs header frames (a query-string credential
/// in `:path`). Their events above INFO are dropped whatever the filter asks for.
const VERBATIM_TARGETS: &[&str] = &["rmcp", "h2"];

pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let no_verbatim = filter_fn(|meta| {
        *meta.level() <= Level::INFO
            || !VERBATIM_TARGETS
                .iter()
                .any(|t| meta.target() == *t || meta.target().starts_with(&format!("{t}::")))
    });
    // A second init (tests calling into the library) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .finish()
        .with(no_verbatim)
        .try_init();
}
