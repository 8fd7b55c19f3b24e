//! Policy: ordered CEL rules, first match wins, nothing matched is `implicit-deny`.
//!
//! Every rule is compiled once per bundle. The CEL root context (standard functions plus our
//! glob `matches`) is built once too; a decision only adds the request's variables in a child
//! scope. A CEL error or a non-boolean result denies, naming the policy and the reason: a broken
//! rule must never fail open, nor silently fall through to a later, broader allow.

pub mod glob;

use crate::bundle::{Effect, Policy};
use crate::cel;
use crate::identity::Identity;
use cel_interpreter::{Context, ExecutionError, FunctionContext, Program, Value};
use glob::Glob;
use std::collections::HashMap;
use std::sync::Arc;

/// The name of the decision when no policy matched.
pub const IMPLICIT_DENY: &str = "implicit-deny";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (`implicit-deny` when none matched).
    pub policy: String,
    /// Why it was denied (None when allowed).
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy `{policy}`: the CEL rule does not compile: {message}")]
    Compile { policy: String, message: String },
    #[error("policy `{policy}`: {source}")]
    Glob {
        policy: String,
        source: glob::GlobError,
    },
}

impl PolicyError {
    /// Index of the failing policy in the bundle, for positioned reports.
    pub fn policy_name(&self) -> &str {
        match self {
            PolicyError::Compile { policy, .. } | PolicyError::Glob { policy, .. } => policy,
        }
    }
}

struct Compiled {
    name: String,
    program: Program,
    effect: Effect,
}

pub struct PolicyEngine {
    policies: Vec<Compiled>,
    root: Context<'static>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field(
                "policies",
                &self.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The per-request inputs of a decision.
pub struct Input<'a> {
    pub identity: &'a Identity,
    pub reference: &'a str,
    /// The request's `context` object, already converted (see [`cel::from_json`]).
    pub context: &'a Value,
}

impl PolicyEngine {
    /// Compiles every rule; returns every failure (one per broken policy), not only the first.
    pub fn compile(policies: &[Policy]) -> Result<Self, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::new();
        let mut globs: HashMap<String, Glob> = HashMap::new();
        for p in policies {
            match cel::compile(&p.rule) {
                Ok(program) => compiled.push(Compiled {
                    name: p.name.clone(),
                    program,
                    effect: p.effect,
                }),
                Err(e) => errors.push(PolicyError::Compile {
                    policy: p.name.clone(),
                    message: e.to_string(),
                }),
            }
            for pattern in literal_match_patterns(&p.rule) {
                match Glob::compile(&pattern) {
                    Ok(g) => {
                        globs.insert(pattern, g);
                    }
                    Err(source) => errors.push(PolicyError::Glob {
                        policy: p.name.clone(),
                        source,
                    }),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            policies: compiled,
            root: root_context(Arc::new(globs)),
        })
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn evaluate(&self, input: &Input<'_>) -> Decision {
        let mut ctx = self.root.new_inner_scope();
        let id = input.identity;
        ctx.add_variable_from_value("issuer", id.issuer.clone());
        ctx.add_variable_from_value("org", id.org.clone());
        ctx.add_variable_from_value("service", id.service.clone());
        ctx.add_variable_from_value("env", id.env.clone());
        ctx.add_variable_from_value("action", id.action.clone());
        ctx.add_variable_from_value("branch", id.branch.clone());
        ctx.add_variable_from_value("actor", id.actor.clone());
        ctx.add_variable_from_value("groups", id.groups_value());
        ctx.add_variable_from_value("claims", id.claims_value());
        ctx.add_variable_from_value("ref", input.reference);
        ctx.add_variable_from_value("context", input.context.clone());
        for p in &self.policies {
            match p.program.execute(&ctx) {
                Ok(Value::Bool(true)) => {
                    return match p.effect {
                        Effect::Allow => Decision {
                            allowed: true,
                            policy: p.name.clone(),
                            reason: None,
                        },
                        Effect::Deny => Decision {
                            allowed: false,
                            policy: p.name.clone(),
                            reason: Some(format!("denied by policy `{}`", p.name)),
                        },
                    };
                }
                Ok(Value::Bool(false)) => continue,
                Ok(other) => {
                    return Decision {
                        allowed: false,
                        policy: p.name.clone(),
                        reason: Some(format!(
                            "policy `{}` evaluated to {}, not a bool; denied",
                            p.name,
                            cel::type_name(&other)
                        )),
                    };
                }
                Err(e) => {
                    return Decision {
                        allowed: false,
                        policy: p.name.clone(),
                        reason: Some(format!(
                            "policy `{}` failed to evaluate ({}); denied",
                            p.name,
                            cel::describe_error(&e)
                        )),
                    };
                }
            }
        }
        Decision {
            allowed: false,
            policy: IMPLICIT_DENY.into(),
            reason: Some("no policy matched; denied by default".into()),
        }
    }
}

/// The standard CEL functions, with `matches` replaced by our glob matcher (`**`, `*`, `?`).
fn root_context(globs: Arc<HashMap<String, Glob>>) -> Context<'static> {
    let mut ctx = Context::default();
    ctx.add_function(
        "matches",
        move |ftx: &FunctionContext,
              this: cel_interpreter::extractors::This<Arc<String>>,
              pattern: Arc<String>|
              -> Result<bool, ExecutionError> {
            let text = this.0;
            if let Some(g) = globs.get(pattern.as_str()) {
                return Ok(g.matches(&text));
            }
            // A pattern built at run time: compile it now (rules in bundles are literals).
            Glob::compile(&pattern)
                .map(|g| g.matches(&text))
                .map_err(|e| ftx.error(e.to_string()))
        },
    );
    ctx
}

/// The string literals passed to `.matches(...)` in a rule, so they are compiled (and checked)
/// at bundle load rather than on every decision.
pub fn literal_match_patterns(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = rule;
    while let Some(at) = rest.find(".matches(") {
        rest = &rest[at + ".matches(".len()..];
        let trimmed = rest.trim_start();
        let mut chars = trimmed.chars();
        let Some(quote @ ('\'' | '"')) = chars.next() else {
            continue;
        };
        let body = &trimmed[1..];
        if let Some(end) = body.find(quote) {
            out.push(body[..end].to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn policy(name: &str, rule: &str, effect: Effect) -> Policy {
        Policy {
            name: name.into(),
            description: None,
            rule: rule.into(),
            effect,
        }
    }

    fn identity() -> Identity {
        let claims = serde_json::json!({"agent_name": "billing-bot", "environment": "prod"});
        Identity::new(
            "agents",
            serde_json::from_value(claims).unwrap(),
            [("service", "billing-bot"), ("env", "prod")],
            vec!["payments".into()],
        )
    }

    fn decide(engine: &PolicyEngine, r: &str) -> Decision {
        let id = identity();
        let ctx = cel::from_json(&serde_json::json!({"ticket": "T-1"}));
        engine.evaluate(&Input {
            identity: &id,
            reference: r,
            context: &ctx,
        })
    }

    #[test]
    fn first_match_wins_and_implicit_deny() {
        let e = PolicyEngine::compile(&[
            policy("deny-admin", "ref.matches('secret/admin/**')", Effect::Deny),
            policy(
                "billing",
                "service == 'billing-bot' && ref.matches('secret/*/stripe') && 'payments' in groups",
                Effect::Allow,
            ),
            policy("ctx", "context.ticket == 'T-1' && ref == 'x'", Effect::Allow),
        ])
        .unwrap();
        let d = decide(&e, "secret/admin/root");
        assert_eq!((d.allowed, d.policy.as_str()), (false, "deny-admin"));
        let d = decide(&e, "secret/prod/stripe");
        assert_eq!((d.allowed, d.policy.as_str()), (true, "billing"));
        let d = decide(&e, "x");
        assert_eq!((d.allowed, d.policy.as_str()), (true, "ctx"));
        let d = decide(&e, "secret/prod/deep/stripe");
        assert_eq!((d.allowed, d.policy.as_str()), (false, IMPLICIT_DENY));
    }

    #[test]
    fn errors_and_non_bool_deny_with_reason() {
        let e = PolicyEngine::compile(&[
            policy("broken", "claims.missing == 'x'", Effect::Allow),
            policy("later-allow", "true", Effect::Allow),
        ])
        .unwrap();
        let d = decide(&e, "a");
        assert!(!d.allowed);
        assert_eq!(d.policy, "broken");
        assert!(d.reason.unwrap().contains("no such key `missing`"));

        let e = PolicyEngine::compile(&[policy("str", "'yes'", Effect::Allow)]).unwrap();
        let d = decide(&e, "a");
        assert!(!d.allowed);
        assert!(
            d.reason
                .unwrap()
                .contains("evaluated to a string, not a bool")
        );
    }

    #[test]
    fn compile_errors_are_all_reported() {
        let errs = PolicyEngine::compile(&[
            policy("a", "ref ==", Effect::Allow),
            policy("b", "ref.matches('x/a**')", Effect::Allow),
            policy("c", "true", Effect::Allow),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].policy_name(), "a");
        assert_eq!(errs[1].policy_name(), "b");
    }

    #[test]
    fn literal_patterns_are_found() {
        assert_eq!(
            literal_match_patterns("ref.matches('a/**') || ref.matches( \"b/*\" ) || x.matches(y)"),
            vec!["a/**".to_string(), "b/*".to_string()]
        );
    }
}
