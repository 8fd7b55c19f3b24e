//! A YAML tree that remembers where every node came from, so bundle problems can be reported as
//! `file:line:col`. serde_yaml gives the typed view; this gives the positions and the raw shape
//! used for unknown-key and type checks that must report every problem at once.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Clone, PartialEq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// An alias (`*name`); bundles do not need them, and they are reported as an error.
    Alias,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar(s) => Some(s),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar(_) => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
            Kind::Alias => "an alias",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Seq(Pos, Vec<Node>),
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    documents: usize,
}

fn pos(mark: Marker) -> Pos {
    Pos {
        line: mark.line(),
        col: mark.col() + 1,
    }
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                Some(key) => entries.push((key, node)),
                None => *pending = Some(node),
            },
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => self.documents += 1,
            Event::Scalar(value, ..) => self.push_node(Node {
                kind: Kind::Scalar(value),
                pos: pos(mark),
            }),
            Event::Alias(_) => self.push_node(Node {
                kind: Kind::Alias,
                pos: pos(mark),
            }),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(pos(mark), Vec::new())),
            Event::MappingStart(..) => self.stack.push(Frame::Map(pos(mark), Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(p, items)) => Node {
                        kind: Kind::Seq(items),
                        pos: p,
                    },
                    Some(Frame::Map(p, entries, _)) => Node {
                        kind: Kind::Map(entries),
                        pos: p,
                    },
                    None => return,
                };
                self.push_node(node);
            }
            _ => {}
        }
    }
}

/// Parses one YAML document into a positioned tree.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, true).map_err(|e| SyntaxError {
        pos: pos(*e.marker()),
        message: format!("YAML syntax: {}", e.info()),
    })?;
    if builder.documents > 1 {
        return Err(SyntaxError {
            pos: Pos { line: 1, col: 1 },
            message: "a bundle is one YAML document; remove the extra '---' documents".into(),
        });
    }
    builder.root.ok_or(SyntaxError {
        pos: Pos { line: 1, col: 1 },
        message: "the bundle is empty; it needs at least `version:`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("version: '1'\npolicies:\n  - name: a\n    rule: 'true'\n").unwrap();
        let p = n.get("policies").unwrap();
        let Kind::Seq(items) = &p.kind else {
            panic!("not a seq")
        };
        let rule = items[0].get("rule").unwrap();
        assert_eq!(rule.pos, Pos { line: 4, col: 11 });
        assert_eq!(rule.as_str(), Some("true"));
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("version: '1'\npolicies: [\n").unwrap_err();
        assert!(e.pos.line >= 2, "{e:?}");
    }
}
