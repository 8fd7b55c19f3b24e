//! Benchmarks: each prints ratios against the direct path (and peers where they can run).

pub mod mcp;
