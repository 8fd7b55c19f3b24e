//! The PDP as the MCP tools' [`Authority`]: the same verification, policy and audit record as
//! `/v1/resolve`.

use super::authority::{Authority, Grant, Refusal};
use crate::pdp::{Pdp, PdpError, secret_request};
use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

fn refusal(e: PdpError) -> Refusal {
    match e {
        PdpError::InvalidToken(t) => Refusal::InvalidToken(t.to_string()),
        e @ PdpError::InvalidRef { .. } => Refusal::InvalidRef(e.to_string()),
        other => Refusal::Failed(other.to_string()),
    }
}

impl Authority for Pdp {
    fn resolve<'a>(
        &'a self,
        jwt: &'a str,
        reference: &'a str,
        context: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Value, Refusal>> {
        Box::pin(async move {
            let response = Pdp::resolve(
                self,
                jwt,
                &[reference.to_owned()],
                Value::Object(context.clone()),
            )
            .await
            .map_err(refusal)?;
            serde_json::to_value(&response)
                .map_err(|e| Refusal::Failed(format!("encoding the result: {e}")))
        })
    }

    fn grant<'a>(
        &'a self,
        jwt: &'a str,
        reference: &'a str,
        context: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Grant, Refusal>> {
        Box::pin(async move {
            // The decision (and its audit record) is the PDP's own resolve.
            let mut response = Pdp::resolve(
                self,
                jwt,
                &[reference.to_owned()],
                Value::Object(context.clone()),
            )
            .await
            .map_err(refusal)?;
            let result = response
                .results
                .remove(reference)
                .ok_or_else(|| Refusal::Failed("the PDP returned no result for the ref".into()))?;
            if !result.allowed {
                return Err(Refusal::Denied {
                    policy: result.policy.unwrap_or_else(|| "implicit-deny".into()),
                    reason: result.reason.unwrap_or_else(|| "not allowed".into()),
                });
            }
            if let Some(error) = result.error {
                return Err(Refusal::Failed(error));
            }
            let compiled = self.current();
            let resource = compiled
                .match_resource(reference)
                .ok_or_else(|| Refusal::Failed("no resource matches ref".into()))?;
            let spec = &resource.spec;
            let secret = match result.value {
                Some(secret) => secret,
                // short_lived: the agent got no token here (it never sees the answer); fetch
                // needs the real value, which the allowed decision above covers.
                None => {
                    let resolver = compiled.resolvers.get(&spec.resolver).ok_or_else(|| {
                        Refusal::Failed(format!("backend `{}` is not available", spec.resolver))
                    })?;
                    resolver
                        .resolve(&secret_request(reference, spec, resolver.kind()))
                        .await
                        .map_err(|e| Refusal::Failed(e.to_string()))?
                }
            };
            Ok(Grant {
                secret,
                credential_location: spec.credential_location.clone(),
                hosts: spec.hosts.clone(),
                policy: result.policy,
            })
        })
    }
}
