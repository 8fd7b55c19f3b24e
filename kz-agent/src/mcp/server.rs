//! The MCP handler: KeyZero 0.3's `resolve` and `fetch` tools, served by rmcp.
//!
//! Tool names, parameter names and descriptions follow KeyZero's server so its clients keep
//! working; results are JSON text (what KeyZero clients parse) plus the same value as
//! structured content. Every refusal or failure is a tool error (`isError: true`) whose text
//! says why, and every call leaves one `mcp_call` audit record. If that record cannot be
//! written the call fails: an unaudited access is not handed out.

use super::authority::{Authority, Refusal};
use super::fetch::{self, Credential, FetchConfig, FetchRequest};
use crate::audit::{AuditEvent, AuditSink};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The name MCP clients see; KeyZero's, so configurations written for KeyZero keep working.
pub const SERVER_NAME: &str = "keyzero";

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ResolveParams {
    /// JWT token for authentication
    pub jwt: String,
    /// Resource ref path to resolve
    pub resource: String,
    /// Optional additional context
    #[serde(default)]
    pub context: HashMap<String, Value>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FetchParams {
    /// JWT token for authentication
    pub jwt: String,
    /// Resource ref path to resolve
    pub resource: String,
    /// Target URL to fetch
    pub url: String,
    /// HTTP method (defaults to GET)
    #[serde(default = "default_method")]
    #[schemars(default = "default_method")]
    pub method: String,
    /// Extra headers to send
    #[serde(default)]
    pub headers: HashMap<String, String>,
    /// Optional request body
    pub body: Option<String>,
    /// Optional additional context
    #[serde(default)]
    pub context: HashMap<String, Value>,
}

fn default_method() -> String {
    "GET".to_owned()
}

/// Upstream requests in flight at once across all clients of this server: an agent looping on
/// `fetch` queues instead of opening thousands of connections from kz.
const MAX_CONCURRENT_FETCHES: usize = 32;

struct Inner {
    authority: Arc<dyn Authority>,
    audit: Arc<dyn AuditSink>,
    fetch: FetchConfig,
    fetch_slots: tokio::sync::Semaphore,
    transport: &'static str,
}

#[derive(Clone)]
pub struct KzMcp {
    inner: Arc<Inner>,
    tool_router: ToolRouter<Self>,
}

impl std::fmt::Debug for KzMcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KzMcp")
            .field("transport", &self.inner.transport)
            .finish()
    }
}

#[tool_router]
impl KzMcp {
    /// `transport` (`stdio` or `http`) goes into every audit record.
    pub fn new(
        authority: Arc<dyn Authority>,
        audit: Arc<dyn AuditSink>,
        fetch: FetchConfig,
        transport: &'static str,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                authority,
                audit,
                fetch,
                fetch_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES),
                transport,
            }),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        name = "resolve",
        description = "Resolve a secret reference through the keyzero policy pipeline"
    )]
    async fn resolve(&self, Parameters(p): Parameters<ResolveParams>) -> CallToolResult {
        let context: Map<String, Value> = p.context.into_iter().collect();
        let outcome = self
            .inner
            .authority
            .resolve(&p.jwt, &p.resource, &context)
            .await;
        let event = self.event("resolve", &p.resource);
        match outcome {
            Ok(response) => {
                let allowed = response
                    .get("results")
                    .and_then(|r| r.get(&p.resource))
                    .and_then(|r| r.get("allowed"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let event = event.with("outcome", if allowed { "allowed" } else { "denied" });
                if let Err(e) = self.inner.audit.record(event) {
                    return tool_error(&format!("not answered: {e}"));
                }
                CallToolResult::structured(response)
            }
            Err(refusal) => self.refuse(event, &refusal.to_string(), kind_of(&refusal)),
        }
    }

    #[tool(
        name = "fetch",
        description = "Fetch a URL with credentials injected from the keyzero vault"
    )]
    async fn fetch(&self, Parameters(p): Parameters<FetchParams>) -> CallToolResult {
        let event = self
            .event("fetch", &p.resource)
            .with("method", p.method.to_ascii_uppercase())
            .with("url", url_for_audit(&p.url));
        let context: Map<String, Value> = p.context.into_iter().collect();
        let grant = match self
            .inner
            .authority
            .grant(&p.jwt, &p.resource, &context)
            .await
        {
            Ok(grant) => grant,
            Err(refusal) => return self.refuse(event, &refusal.to_string(), kind_of(&refusal)),
        };
        let event = match &grant.policy {
            Some(policy) => event.with("policy", policy.clone()),
            None => event,
        };
        let location = match fetch::location(grant.credential_location.as_deref()) {
            Ok(l) => l,
            Err(e) => return self.refuse(event, &e.to_string(), "error"),
        };
        let request = FetchRequest {
            url: p.url,
            method: p.method,
            headers: p.headers.into_iter().collect::<BTreeMap<_, _>>(),
            body: p.body,
        };
        let credential = Credential {
            secret: &grant.secret,
            location,
            hosts: &grant.hosts,
        };
        let Ok(_slot) = self.inner.fetch_slots.acquire().await else {
            return self.refuse(event, "the server is shutting down", "error");
        };
        match fetch::fetch(&self.inner.fetch, &request, &credential).await {
            Ok(response) => {
                let event = event
                    .with("outcome", "allowed")
                    .with("status", response.status)
                    .with("truncated", response.truncated)
                    .with("final_url", url_for_audit(&response.url));
                if let Err(e) = self.inner.audit.record(event) {
                    return tool_error(&format!("response withheld: {e}"));
                }
                match serde_json::to_value(&response) {
                    Ok(v) => CallToolResult::structured(v),
                    Err(e) => tool_error(&format!("cannot encode the response: {e}")),
                }
            }
            Err(e) => {
                let kind = match e {
                    fetch::FetchError::Guard(_) | fetch::FetchError::Scope { .. } => "blocked",
                    _ => "error",
                };
                self.refuse(event, &e.to_string(), kind)
            }
        }
    }
}

impl KzMcp {
    fn event(&self, tool: &str, resource: &str) -> AuditEvent {
        AuditEvent::new("mcp_call")
            .with("tool", tool)
            .with("resource", resource)
            .with("transport", self.inner.transport)
    }

    /// Audits a refusal and turns it into a tool error the agent can read.
    fn refuse(&self, event: AuditEvent, reason: &str, outcome: &str) -> CallToolResult {
        tracing::info!(outcome, reason, "mcp call refused");
        let event = event.with("outcome", outcome).with("reason", reason);
        if let Err(e) = self.inner.audit.record(event) {
            return tool_error(&format!("{reason}; and the audit record failed: {e}"));
        }
        tool_error(reason)
    }
}

fn kind_of(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Denied { .. } => "denied",
        Refusal::InvalidToken(_) => "invalid_token",
        Refusal::InvalidRef(_) => "invalid_ref",
        Refusal::Failed(_) => "error",
    }
}

fn tool_error(reason: &str) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(reason.to_owned())])
}

/// Scheme, host, port and path: the query string may carry the agent's own data.
fn url_for_audit(raw: &str) -> Value {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_username("");
            let _ = u.set_password(None);
            json!(u.to_string())
        }
        Err(_) => json!("(unparseable)"),
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for KzMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new(SERVER_NAME, env!("CARGO_PKG_VERSION"))
                    .with_title("kz (KeyZero-compatible) MCP server"),
            )
            .with_instructions(
                "Resolve secret references under policy, or fetch a URL with a credential \
                 injected by kz: the credential never appears in the answer.",
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemorySink;
    use crate::egress::Guard;
    use crate::mcp::authority::Grant;
    use crate::mcp::dns::Dns;
    use futures_util::future::BoxFuture;

    /// Answers like the PDP does for an allowed direct-mode ref.
    struct Allows;

    impl Authority for Allows {
        fn resolve<'a>(
            &'a self,
            _jwt: &'a str,
            reference: &'a str,
            _context: &'a Map<String, Value>,
        ) -> BoxFuture<'a, Result<Value, Refusal>> {
            Box::pin(async move {
                Ok(json!({"results": {reference: {"allowed": true, "value": "sk-unit-secret"}}}))
            })
        }

        fn grant<'a>(
            &'a self,
            _jwt: &'a str,
            _reference: &'a str,
            _context: &'a Map<String, Value>,
        ) -> BoxFuture<'a, Result<Grant, Refusal>> {
            Box::pin(async { Err(Refusal::InvalidToken("token expired".into())) })
        }
    }

    fn server(fail: bool) -> (KzMcp, Arc<MemorySink>) {
        let sink = Arc::new(if fail {
            MemorySink::failing()
        } else {
            MemorySink::new()
        });
        let fetch = FetchConfig::new(Guard::default(), Dns::System, None, 1024).unwrap();
        (
            KzMcp::new(Arc::new(Allows), sink.clone(), fetch, "test"),
            sink,
        )
    }

    fn params(resource: &str) -> Parameters<ResolveParams> {
        Parameters(ResolveParams {
            jwt: "j".into(),
            resource: resource.into(),
            context: HashMap::new(),
        })
    }

    #[tokio::test]
    async fn unaudited_answers_are_withheld() {
        let (ok, sink) = server(false);
        let r = ok.resolve(params("api/x")).await;
        assert_eq!(r.is_error, Some(false));
        assert_eq!(sink.events()[0].fields["outcome"], "allowed");

        let (failing, _) = server(true);
        let r = failing.resolve(params("api/x")).await;
        assert_eq!(r.is_error, Some(true));
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("sk-unit-secret"), "{text}");
        assert!(text.contains("disk full"), "{text}");
    }

    #[tokio::test]
    async fn refusals_are_tool_errors_and_audited() {
        let (srv, sink) = server(false);
        let r = srv
            .fetch(Parameters(FetchParams {
                jwt: "j".into(),
                resource: "api/x".into(),
                url: "https://example.com/?q=private".into(),
                method: "get".into(),
                headers: HashMap::new(),
                body: None,
                context: HashMap::new(),
            }))
            .await;
        assert_eq!(r.is_error, Some(true));
        assert!(
            serde_json::to_string(&r)
                .unwrap()
                .contains("invalid_token: token expired")
        );
        let records = sink.events();
        assert_eq!(records[0].fields["outcome"], "invalid_token");
        assert_eq!(records[0].fields["method"], "GET");
        // The audit keeps scheme, host and path; the query is the agent's own data.
        assert_eq!(records[0].fields["url"], "https://example.com/");
    }
}
