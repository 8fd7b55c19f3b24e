//! See docs/architecture.md.

pub mod trust;
