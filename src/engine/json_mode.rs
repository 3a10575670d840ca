//! JSON mode (`response_format: {"type": "json_object"}`): generation constrained, token by
//! token, to text that can still become one JSON object, ended as soon as the object closes.
//!
//! [`JsonPrefix`] checks bytes incrementally (a pushdown automaton over RFC 8259's grammar;
//! bytes of 0x80 and above are taken as string content, so a token holding part of a UTF-8
//! character is fine inside a string and refused outside one). [`JsonConstraint`] asks it, for a
//! candidate token, whether the token's bytes keep the text valid; the sampler draws, and redraws
//! without a refused token until one passes (see `sampling`).

use std::sync::Arc;

/// Where the checker stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Before the top-level value: whitespace, then `{`.
    Start,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// A value is due (after `:`, or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// Inside a string; `key` says whether it is an object key.
    Str {
        key: bool,
        escape: Escape,
    },
    /// After a complete value inside a container: `,` or the container's close.
    AfterValue,
    Number(Num),
    /// Inside `true`, `false` or `null`: the bytes still due.
    Literal(&'static [u8]),
    /// The top-level object is closed: only whitespace may follow.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Escape {
    None,
    /// After `\`.
    Backslash,
    /// Inside `\uXXXX`: hex digits still due.
    Unicode(u8),
}

/// Number states (RFC 8259 §6); `Zero`, `Int`, `Frac` and `Exp` may end the number.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Container {
    Object,
    Array,
}

/// Deepest nesting accepted (serde_json's default recursion limit is 128 too).
pub const MAX_DEPTH: u32 = 128;

/// The open containers as bits (1 = object), innermost lowest: a `Copy` stack, so checking a
/// candidate token clones no heap memory — a step may check the whole vocabulary.
#[derive(Clone, Copy, Debug, Default)]
struct Stack {
    bits: u128,
    depth: u32,
}

impl Stack {
    fn push(&mut self, c: Container) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        self.bits = (self.bits << 1) | u128::from(c == Container::Object);
        self.depth += 1;
        true
    }

    fn last(&self) -> Option<Container> {
        let top = if self.bits & 1 == 1 {
            Container::Object
        } else {
            Container::Array
        };
        (self.depth > 0).then_some(top)
    }

    fn pop(&mut self) {
        self.bits >>= 1;
        self.depth -= 1;
    }

    fn is_empty(&self) -> bool {
        self.depth == 0
    }
}

/// An incremental check that the bytes pushed so far are a prefix of one JSON object.
#[derive(Clone, Copy, Debug)]
pub struct JsonPrefix {
    stack: Stack,
    state: State,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            stack: Stack::default(),
            state: State::Start,
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonPrefix {
    /// Whether the top-level object is complete.
    pub fn is_complete(&self) -> bool {
        self.state == State::End
    }

    /// Feeds one byte; false (and the state unspecified) when it cannot continue valid JSON.
    pub fn push(&mut self, b: u8) -> bool {
        match self.state {
            State::Start => {
                if is_ws(b) {
                    return true;
                }
                if b == b'{' {
                    self.stack.push(Container::Object);
                    self.state = State::ObjectFirst;
                    return true;
                }
                false
            }
            State::ObjectFirst | State::Key => {
                if is_ws(b) {
                    return true;
                }
                match b {
                    b'"' => {
                        self.state = State::Str {
                            key: true,
                            escape: Escape::None,
                        };
                        true
                    }
                    b'}' if self.state == State::ObjectFirst => self.close(Container::Object),
                    _ => false,
                }
            }
            State::Colon => {
                if is_ws(b) {
                    return true;
                }
                if b == b':' {
                    self.state = State::Value;
                    return true;
                }
                false
            }
            State::Value => is_ws(b) || self.start_value(b),
            State::ArrayFirst => {
                if is_ws(b) {
                    return true;
                }
                if b == b']' {
                    return self.close(Container::Array);
                }
                self.start_value(b)
            }
            State::Str { key, escape } => self.in_string(key, escape, b),
            State::AfterValue => {
                if is_ws(b) {
                    return true;
                }
                match (b, self.stack.last()) {
                    (b',', Some(Container::Object)) => {
                        self.state = State::Key;
                        true
                    }
                    (b',', Some(Container::Array)) => {
                        self.state = State::Value;
                        true
                    }
                    (b'}', _) => self.close(Container::Object),
                    (b']', _) => self.close(Container::Array),
                    _ => false,
                }
            }
            State::Number(n) => self.in_number(n, b),
            State::Literal(rest) => match rest.split_first() {
                Some((&want, tail)) if want == b => {
                    self.state = State::Literal(tail);
                    if tail.is_empty() {
                        self.state = State::AfterValue;
                    }
                    true
                }
                _ => false,
            },
            State::End => is_ws(b),
        }
    }

    fn start_value(&mut self, b: u8) -> bool {
        self.state = match b {
            b'{' if self.stack.push(Container::Object) => State::ObjectFirst,
            b'[' if self.stack.push(Container::Array) => State::ArrayFirst,
            b'"' => State::Str {
                key: false,
                escape: Escape::None,
            },
            b'-' => State::Number(Num::Minus),
            b'0' => State::Number(Num::Zero),
            b'1'..=b'9' => State::Number(Num::Int),
            b't' => State::Literal(b"rue"),
            b'f' => State::Literal(b"alse"),
            b'n' => State::Literal(b"ull"),
            _ => return false,
        };
        true
    }

    /// Closes the innermost container if it is `which`.
    fn close(&mut self, which: Container) -> bool {
        if self.stack.last() != Some(which) {
            return false;
        }
        self.stack.pop();
        self.state = if self.stack.is_empty() {
            State::End
        } else {
            State::AfterValue
        };
        true
    }

    fn in_string(&mut self, key: bool, escape: Escape, b: u8) -> bool {
        let escape = match escape {
            Escape::None => match b {
                b'"' => {
                    self.state = if key { State::Colon } else { State::AfterValue };
                    return true;
                }
                b'\\' => Escape::Backslash,
                0..=0x1f => return false,
                _ => Escape::None,
            },
            Escape::Backslash => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Escape::None,
                b'u' => Escape::Unicode(4),
                _ => return false,
            },
            Escape::Unicode(left) => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                if left == 1 {
                    Escape::None
                } else {
                    Escape::Unicode(left - 1)
                }
            }
        };
        self.state = State::Str { key, escape };
        true
    }

    fn in_number(&mut self, n: Num, b: u8) -> bool {
        let next = match (n, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
            (Num::E, b'+' | b'-') => Num::ESign,
            (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Num::Exp,
            (Num::Zero | Num::Int | Num::Frac | Num::Exp, _) => {
                // The number ended; the byte belongs to what follows it.
                self.state = State::AfterValue;
                return self.push(b);
            }
            _ => return false,
        };
        self.state = State::Number(next);
        true
    }
}

/// Every token's bytes and the end-of-sequence ids: built once per engine.
#[derive(Debug)]
pub struct Vocabulary {
    pub bytes: Vec<Box<[u8]>>,
    pub eos: Vec<u32>,
}

/// One sequence's JSON constraint.
#[derive(Clone, Debug)]
pub struct JsonConstraint {
    text: JsonPrefix,
    vocab: Arc<Vocabulary>,
}

impl JsonConstraint {
    pub fn new(vocab: Arc<Vocabulary>) -> Self {
        JsonConstraint {
            text: JsonPrefix::default(),
            vocab,
        }
    }

    /// The object is complete: the sequence should end now.
    pub fn finished(&self) -> bool {
        self.text.is_complete()
    }

    /// An end-of-sequence token to end with, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos.first().copied()
    }

    /// Whether `token` may come next: end-of-sequence only once the object is complete;
    /// any other token only if its bytes (at least one) keep the text valid.
    pub fn allows(&self, token: u32) -> bool {
        if self.vocab.eos.contains(&token) {
            return self.text.is_complete();
        }
        let Some(bytes) = self.vocab.bytes.get(token as usize) else {
            return false;
        };
        if bytes.is_empty() {
            return false;
        }
        let mut text = self.text;
        bytes.iter().all(|&b| text.push(b))
    }

    /// Records the chosen token (which [`JsonConstraint::allows`] accepted).
    pub fn accept(&mut self, token: u32) {
        if let Some(bytes) = self.vocab.bytes.get(token as usize) {
            for &b in bytes.iter() {
                self.text.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(text: &str) -> Option<JsonPrefix> {
        let mut p = JsonPrefix::default();
        text.bytes().all(|b| p.push(b)).then_some(p)
    }

    #[test]
    fn valid_prefixes_and_complete_objects() {
        for (text, complete) in [
            ("", false),
            ("  {", false),
            (r#"{"a": 1}"#, true),
            (
                r#"{"a": [1, -2.5e+3, 0, true, null, "x\"\u00e9"], "b": {}}"#,
                true,
            ),
            (r#"{"a": {"b": [[], {}]}}  "#, true),
            (r#"{"a": "naïve"#, false),
            (r#"{"a": 12"#, false),
            (r#"{"a": tr"#, false),
            ("{\"a\":\n[\n]\n}", true),
        ] {
            let p = accepts(text).unwrap_or_else(|| panic!("refused {text:?}"));
            assert_eq!(p.is_complete(), complete, "{text:?}");
            if complete {
                serde_json::from_str::<serde_json::Value>(text).expect("serde agrees");
            }
        }
    }

    #[test]
    fn invalid_bytes_are_refused() {
        for text in [
            "[1]",
            "1",
            r#""a""#,
            "{a",
            r#"{"a" 1}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1.}"#,
            r#"{"a": -}"#,
            r#"{"a": tru}"#,
            r#"{"a": 1,}"#,
            r#"{"a": [1,]}"#,
            r#"{"a": [1}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\u12g4"}"#,
            "{\"a\": \"line\nbreak\"}",
            r#"{"a": 1}}"#,
            r#"{"a": 1} x"#,
        ] {
            assert!(accepts(text).is_none(), "accepted {text:?}");
        }
    }

    #[test]
    fn tokens_are_checked_whole_and_eos_only_at_the_end() {
        let vocab = Arc::new(Vocabulary {
            bytes: ["{", "\"a\"", ":", " 1", "}", "x", ""]
                .iter()
                .map(|t| t.as_bytes().into())
                .collect(),
            eos: vec![6],
        });
        let mut c = JsonConstraint::new(vocab);
        assert!(c.allows(0) && !c.allows(5) && !c.allows(6) && !c.allows(99));
        for t in [0, 1, 2, 3] {
            assert!(c.allows(t), "token {t}");
            c.accept(t);
        }
        assert!(!c.allows(6), "no end before the object closes");
        c.accept(4);
        assert!(c.finished() && c.allows(6) && c.eos() == Some(6));
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        let deep = format!("{{\"a\":{}", "[".repeat(MAX_DEPTH as usize - 1));
        assert!(accepts(&deep).is_some());
        assert!(accepts(&format!("{deep}[")).is_none());
        let closed = format!("{deep}{}}}", "]".repeat(MAX_DEPTH as usize - 1));
        assert!(accepts(&closed).unwrap().is_complete());
    }
}
