//! See docs/architecture.md.

pub mod blind;
pub mod trust;
