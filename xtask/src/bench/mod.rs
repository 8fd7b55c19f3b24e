//! `cargo xtask bench NAME`: benchmarks that compare, in one run, kz with the direct path and
//! with its peers, and print ratios (never timed unit tests).

pub mod proxy;
