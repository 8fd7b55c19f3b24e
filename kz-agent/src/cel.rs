//! CEL (cel-interpreter 0.10) as kz uses it: compiling an expression from a bundle without letting
//! the parser take the process down, converting request JSON (claims, the `context` object) to
//! CEL values, and describing results and evaluation errors without echoing request values.
//!
//! Used by `policy` (rules) and `identity` (claim maps); it sits below both so neither has to
//! import the other for it.

use cel_interpreter::objects::{Key, Map as CelMap};
use cel_interpreter::{ExecutionError, Program, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Why an expression does not compile. The caller names the rule or map it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CelError {
    /// The parser's own message, on one line.
    #[error("{0}")]
    Parse(String),
    /// The parser panicked (see [`compile`]); its message would say nothing useful.
    #[error("syntax error (the expression is incomplete or malformed)")]
    Malformed,
}

/// `Program::compile` that turns a parser panic into an error. cel-parser's generated ANTLR code
/// hits `unreachable!()` on some malformed input (e.g. a trailing `&&`); bad bundle input must
/// get a clear error, not take the process down. The panic hook is told to stay quiet for
/// panics raised inside the parser crates, so no stack trace is printed for them.
pub fn compile(source: &str) -> Result<Program, CelError> {
    static QUIET_PARSER_PANICS: std::sync::Once = std::sync::Once::new();
    QUIET_PARSER_PANICS.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let from_parser = info.location().is_some_and(|l| {
                l.file().contains("antlr4rust") || l.file().contains("cel-parser")
            });
            if !from_parser {
                default(info);
            }
        }));
    });
    match std::panic::catch_unwind(|| Program::compile(source)) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(CelError::Parse(e.to_string().trim().replace('\n', " "))),
        Err(_) => Err(CelError::Malformed),
    }
}

/// Converts request JSON (the `context` object, claims) to a CEL value.
pub fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::Int(i),
            (None, Some(u), _) => Value::UInt(u),
            (_, _, Some(f)) => Value::Float(f),
            _ => Value::Null,
        },
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.iter().map(from_json).collect()))
        }
        serde_json::Value::Object(map) => from_json_object(map),
    }
}

/// [`from_json`] for an object (a token's claims), without wrapping it in a `serde_json::Value`.
pub fn from_json_object(map: &serde_json::Map<String, serde_json::Value>) -> Value {
    let m: HashMap<Key, Value> = map
        .iter()
        .map(|(k, v)| (Key::String(Arc::new(k.clone())), from_json(v)))
        .collect();
    Value::Map(CelMap { map: Arc::new(m) })
}

/// The type of a result, with its article ("a string"), for "evaluated to …, not a bool".
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::Function(..) => "a function",
        Value::Int(_) => "an int",
        Value::UInt(_) => "a uint",
        Value::Float(_) => "a double",
        Value::String(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "a bool",
        Value::Duration(_) => "a duration",
        Value::Timestamp(_) => "a timestamp",
        Value::Null => "null",
    }
}

/// An evaluation error, for a denial reason. CEL errors name variables and keys, never request
/// values: `NoSuchKey` carries only the key.
pub fn describe_error(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(k) => format!("no such key `{k}`"),
        ExecutionError::UndeclaredReference(r) => format!("undeclared reference `{r}`"),
        ExecutionError::FunctionError { function, message } => {
            format!("function `{function}`: {message}")
        }
        other => {
            let s = other.to_string();
            // Some variants embed operand values; keep the message short and generic then.
            if s.len() > 200 {
                "evaluation error".into()
            } else {
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(compile("ref == 'a' &&").err(), Some(CelError::Malformed));
        let Err(CelError::Parse(message)) = compile("1 +* 2") else {
            panic!("a stray operator is the parser's own error");
        };
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(compile("claims.a == 'x'").is_ok());
    }

    #[test]
    fn json_numbers_keep_their_kind() {
        let v = from_json(&serde_json::json!([1, u64::MAX, 1.5, null]));
        let Value::List(items) = v else {
            panic!("an array converts to a list");
        };
        assert_eq!(
            items.iter().map(type_name).collect::<Vec<_>>(),
            ["an int", "a uint", "a double", "null"]
        );
    }
}
