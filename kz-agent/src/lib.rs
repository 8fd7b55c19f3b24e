//! kz: one process that keeps an AI agent's credentials out of its hands.
//!
//! One module per concern (see docs/architecture.md). Modules talk through small typed
//! interfaces: [`resolve::Resolver`], [`audit::AuditSink`], [`secret::Secret`], the proxy's token
//! table. The proxy never knows where a value came from; resolvers never know who asked.

pub mod agent;
pub mod audit;
pub mod bundle;
pub mod cel;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod contain;
pub mod egress;
pub mod harden;
pub mod identity;
pub mod intercept;
pub mod logging;
pub mod mcp;
pub mod pdp;
pub mod policy;
pub mod proxy;
pub mod resolve;
pub mod run;
pub mod sandbox;
pub mod secret;
pub mod suggest;
pub mod tls;
