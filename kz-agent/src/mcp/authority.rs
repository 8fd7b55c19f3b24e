//! What the MCP tools need from the policy decision point, as a small trait.
//!
//! The tools never verify tokens or evaluate policy themselves: `resolve` returns the PDP's
//! `/v1/resolve` answer and `fetch` asks for a [`Grant`], the real credential plus where it
//! may be sent. The PDP implements this trait (see `pdp`), so a decision made through MCP is
//! the same decision, with the same audit record, as one made over HTTP.

use crate::secret::Secret;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

/// Everything `fetch` needs to act on an allowed decision.
#[derive(Debug)]
pub struct Grant {
    pub secret: Secret,
    /// The resource's `credential_location` (`None` = KeyZero's default, a Bearer header).
    pub credential_location: Option<String>,
    /// The resource's `hosts` (kz addition); empty = only the requested URL's host.
    pub hosts: Vec<String>,
    /// The policy that allowed it (for the audit record and the agent's answer).
    pub policy: Option<String>,
}

/// Why the PDP said no. Messages are shown to the agent: they never carry a value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("invalid_token: {0}")]
    InvalidToken(String),
    #[error("invalid_ref: {0}")]
    InvalidRef(String),
    #[error("denied by policy '{policy}': {reason}")]
    Denied { policy: String, reason: String },
    #[error("{0}")]
    Failed(String),
}

pub trait Authority: Send + Sync + 'static {
    /// The `/v1/resolve` response for one ref: `{"results": {"<ref>": {...}}}`.
    fn resolve<'a>(
        &'a self,
        jwt: &'a str,
        reference: &'a str,
        context: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, Refusal>>;

    /// Decides `reference` for the token and, if allowed, hands over the real credential.
    /// Unlike `resolve` this works for any resource mode: the value never leaves kz.
    fn grant<'a>(
        &'a self,
        jwt: &'a str,
        reference: &'a str,
        context: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Grant, Refusal>>;
}
