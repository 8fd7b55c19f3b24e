//! See docs/architecture.md.

pub mod dns;
