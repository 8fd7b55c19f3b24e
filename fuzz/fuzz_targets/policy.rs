//! Policy globs (`policy::glob`) and CEL rules (`policy::PolicyEngine`, `cel`): compile any
//! pattern or rule, then match or evaluate it, never a panic (cel-parser panics on some input;
//! `cel::compile` must turn that into an error).
//!
//! Input: byte 0 picks glob (even) or CEL (odd); then the pattern/rule up to the first `\n`;
//! the rest is the text the glob is matched against, or the reference asked for (also bound,
//! if it is a JSON object, as the request's `context`).

#![no_main]

use kz_agent::bundle::{Effect, Policy};
use kz_agent::identity::Identity;
use kz_agent::policy::glob::Glob;
use kz_agent::policy::{Input, PolicyEngine};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return;
    };
    let (source, arg) = rest.split_once('\n').unwrap_or((rest, ""));
    if mode % 2 == 0 {
        let Ok(g) = Glob::compile(source) else {
            return;
        };
        let m = g.matches(arg);
        assert!(g.literal_prefix_len() <= source.len());
        if g.is_literal() {
            assert_eq!(m, source == arg, "literal glob {source:?} on {arg:?}");
        }
        return;
    }
    let policy = Policy {
        name: "fuzz".into(),
        description: None,
        rule: source.to_owned(),
        effect: if mode & 2 == 0 {
            Effect::Allow
        } else {
            Effect::Deny
        },
    };
    let Ok(engine) = PolicyEngine::compile(&[policy]) else {
        return;
    };
    let identity = Identity::new(
        "https://token.actions.githubusercontent.com",
        serde_json::Map::new(),
        [
            ("org", "acme"),
            ("service", "acme/api"),
            ("branch", "refs/heads/main"),
        ],
        vec!["admins".into()],
    );
    let context = match serde_json::from_str::<serde_json::Value>(arg) {
        Ok(serde_json::Value::Object(m)) => kz_agent::cel::from_json_object(&m),
        _ => kz_agent::cel::from_json_object(&serde_json::Map::new()),
    };
    let d = engine.evaluate(&Input {
        identity: &identity,
        reference: arg,
        context: &context,
    });
    // Evaluation is deterministic.
    let again = engine.evaluate(&Input {
        identity: &identity,
        reference: arg,
        context: &context,
    });
    assert_eq!(d, again);
    assert!(
        d.allowed == d.reason.is_none(),
        "allowed with a reason, or denied without"
    );
});
