//! Constrained JSON replies: JSON mode (`response_format: {"type": "json_object"}`) and the
//! request-side [`ResponseFormat`]; [`JsonConstraint`], which the sampler asks whether a
//! candidate token keeps the text a prefix of a valid value (it draws, and redraws without
//! refused tokens; see `sampling`); and the lexical pieces of RFC 8259 that the checker in
//! `json_schema` is built from — string bytes (well-formed UTF-8, which a token may cut
//! mid-character, and no unpaired surrogate escapes, as serde_json requires) and numbers.
//! JSON mode is the schema `{"type": "object"}`: one checker serves both.

use std::sync::Arc;

use super::json_schema::{Schema, SchemaPrefix};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Escape {
    None,
    /// After `\`.
    Backslash,
    /// Inside `\uXXXX`: hex digits still due, the value so far, and whether this is the low
    /// half of a surrogate pair.
    Unicode {
        left: u8,
        value: u16,
        low: bool,
    },
    /// After a high surrogate (`\ud83d`): the `\` of its low half is due.
    PairBackslash,
    /// The `u` of the low half is due.
    PairU,
}

/// UTF-8 well-formedness inside strings (RFC 3629's table of valid sequences): how many
/// continuation bytes are still due and the range the next one must fall in. A token may end
/// inside a character; the text may not.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Utf8 {
    left: u8,
    lo: u8,
    hi: u8,
}

impl Utf8 {
    /// Between characters.
    pub(crate) fn at_boundary(self) -> bool {
        self.left == 0
    }

    /// The state after a byte of 0x80 or above, or any byte inside a character; `None` if it
    /// cannot continue valid UTF-8.
    pub(crate) fn step(self, b: u8) -> Option<Utf8> {
        if self.left > 0 {
            return (self.lo..=self.hi).contains(&b).then_some(Utf8 {
                left: self.left - 1,
                lo: 0x80,
                hi: 0xbf,
            });
        }
        let (left, lo, hi) = match b {
            0xc2..=0xdf => (1, 0x80, 0xbf),
            0xe0 => (2, 0xa0, 0xbf),
            0xe1..=0xec | 0xee..=0xef => (2, 0x80, 0xbf),
            0xed => (2, 0x80, 0x9f),
            0xf0 => (3, 0x90, 0xbf),
            0xf1..=0xf3 => (3, 0x80, 0xbf),
            0xf4 => (3, 0x80, 0x8f),
            _ => return None,
        };
        Some(Utf8 { left, lo, hi })
    }
}

/// What one byte inside a JSON string does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum StrByte {
    /// The string goes on; `starts_char` when the byte begins a character (an escape counts
    /// as one, at its `\\`).
    Continue {
        escape: Escape,
        utf8: Utf8,
        starts_char: bool,
    },
    /// The closing quote.
    Close,
}

/// The effect of byte `b` inside a string whose escape and UTF-8 states are given; `None` if it
/// cannot continue a valid string.
pub(crate) fn string_byte(escape: Escape, utf8: Utf8, b: u8) -> Option<StrByte> {
    let go_on = |escape, utf8, starts_char| {
        Some(StrByte::Continue {
            escape,
            utf8,
            starts_char,
        })
    };
    if !utf8.at_boundary() {
        return go_on(escape, utf8.step(b)?, false);
    }
    if escape != Escape::None {
        return go_on(escape.step(b)?, utf8, false);
    }
    match b {
        b'"' => Some(StrByte::Close),
        b'\\' => go_on(Escape::Backslash, utf8, true),
        0..=0x1f => None,
        0x80.. => go_on(escape, utf8.step(b)?, true),
        _ => go_on(escape, utf8, true),
    }
}

/// Number states (RFC 8259 §6); `Zero`, `Int`, `Frac` and `Exp` may end the number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Escape {
    /// The escape state after byte `b` of a string's escape sequence (`self` is not `None`),
    /// or `None` if `b` cannot continue it.
    pub(crate) fn step(self, b: u8) -> Option<Escape> {
        const LOW: std::ops::RangeInclusive<u32> = 0xdc00..=0xdfff;
        match self {
            Escape::None => Some(Escape::None),
            Escape::Backslash => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(Escape::None),
                b'u' => Some(Escape::Unicode {
                    left: 4,
                    value: 0,
                    low: false,
                }),
                _ => None,
            },
            Escape::Unicode { left, value, low } => {
                let digit = (b as char).to_digit(16)?;
                let value = u32::from(value) * 16 + digit;
                // The values the digits still due can reach; refused as soon as none of them
                // is valid (serde_json and most parsers refuse unpaired surrogates).
                let span = 1u32 << (4 * u32::from(left - 1));
                let (first, last) = (value * span, value * span + span - 1);
                let reachable = if low {
                    first <= *LOW.end() && last >= *LOW.start()
                } else {
                    !(first >= *LOW.start() && last <= *LOW.end())
                };
                if !reachable {
                    return None;
                }
                Some(match left {
                    1 if !low && (0xd800..=0xdbff).contains(&value) => Escape::PairBackslash,
                    1 => Escape::None,
                    _ => Escape::Unicode {
                        left: left - 1,
                        value: value as u16,
                        low,
                    },
                })
            }
            Escape::PairBackslash => (b == b'\\').then_some(Escape::PairU),
            Escape::PairU => (b == b'u').then_some(Escape::Unicode {
                left: 4,
                value: 0,
                low: true,
            }),
        }
    }
}

impl Num {
    /// The number state that a value's first byte starts, if it starts a number.
    pub(crate) fn start(b: u8) -> Option<Num> {
        match b {
            b'-' => Some(Num::Minus),
            b'0' => Some(Num::Zero),
            b'1'..=b'9' => Some(Num::Int),
            _ => None,
        }
    }

    /// The state after `b`, or `None` if `b` is not part of the number (see [`Num::can_end`]).
    pub(crate) fn step(self, b: u8) -> Option<Num> {
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
            (Num::E, b'+' | b'-') => Num::ESign,
            (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Num::Exp,
            _ => return None,
        })
    }

    /// Whether the bytes so far are a whole number.
    pub(crate) fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

/// Every token's bytes and the end-of-sequence ids: built once per engine.
#[derive(Debug)]
pub struct Vocabulary {
    pub bytes: Vec<Box<[u8]>>,
    pub eos: Vec<u32>,
}

/// What a request asked its text to be (`response_format`).
#[derive(Clone, Debug, Default)]
pub enum ResponseFormat {
    #[default]
    Text,
    /// One JSON object, any keys and values (`{"type": "object"}`).
    JsonObject,
    /// One JSON value valid under a schema (see `json_schema`).
    JsonSchema(Arc<Schema>),
}

/// One sequence's JSON constraint: JSON mode (any object) or a schema, checked by the same
/// automaton (`json_schema`).
#[derive(Clone, Debug)]
pub struct JsonConstraint {
    text: SchemaPrefix,
    vocab: Arc<Vocabulary>,
}

impl JsonConstraint {
    /// The constraint `format` asks for; `None` for plain text.
    pub fn for_format(
        format: &ResponseFormat,
        vocab: impl FnOnce() -> Arc<Vocabulary>,
    ) -> Option<Self> {
        let schema = match format {
            ResponseFormat::Text => return None,
            ResponseFormat::JsonObject => Arc::new(Schema::any_object()),
            ResponseFormat::JsonSchema(schema) => schema.clone(),
        };
        Some(JsonConstraint {
            text: SchemaPrefix::new(schema),
            vocab: vocab(),
        })
    }

    /// JSON mode.
    pub fn new(vocab: Arc<Vocabulary>) -> Self {
        JsonConstraint {
            text: SchemaPrefix::new(Arc::new(Schema::any_object())),
            vocab,
        }
    }

    /// The value is complete: the sequence should end now.
    pub fn finished(&self) -> bool {
        self.text.is_complete()
    }

    /// An end-of-sequence token to end with, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos.first().copied()
    }

    /// Whether `token` may come next: end-of-sequence only once the text is a whole value;
    /// any other token only if its bytes (at least one) keep the text valid.
    pub fn allows(&self, token: u32) -> bool {
        if self.vocab.eos.contains(&token) {
            return self.text.may_end();
        }
        match self.vocab.bytes.get(token as usize) {
            Some(bytes) if !bytes.is_empty() => self.text.accepts(bytes),
            _ => false,
        }
    }

    /// Records the chosen token (which [`JsonConstraint::allows`] accepted).
    pub fn accept(&mut self, token: u32) {
        if let Some(bytes) = self.vocab.bytes.get(token as usize) {
            self.text.push(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts_bytes(bytes: &[u8]) -> Option<SchemaPrefix> {
        let mut p = SchemaPrefix::new(Arc::new(Schema::any_object()));
        p.push(bytes).then_some(p)
    }

    fn accepts(text: &str) -> Option<SchemaPrefix> {
        accepts_bytes(text.as_bytes())
    }

    #[test]
    fn valid_prefixes_and_complete_objects() {
        for (text, complete) in [
            ("", false),
            (" {", false),
            (r#"{"a": 1}"#, true),
            (
                r#"{"a": [1, -2.5e+3, 0, true, null, "x\"\u00e9"], "b": {}}"#,
                true,
            ),
            (r#"{"a": {"b": [[], {}]}} "#, true),
            (r#"{"a": "naïve"#, false),
            (r#"{"a": "\ud83d\ude00 \uD7FF\uE000"}"#, true),
            ("{\"\u{10FFFF}\u{7FF}\": \"\u{FFFD}\u{E000}\"}", true),
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
            r#"{"a": "\ude00"#,
            r#"{"a": "\udc"#,
            r#"{"a": "\ud83d""#,
            r#"{"a": "\ud83d\n"#,
            r#"{"a": "\ud83d\ud8"#,
            "{\"a\": \"line\nbreak\"}",
            r#"{"a": 1}}"#,
            r#"{"a": 1} x"#,
            // Whitespace is bounded: one space, or a newline and some indentation.
            "  {",
            "{\n\n",
        ] {
            assert!(accepts(text).is_none(), "accepted {text:?}");
        }
    }

    #[test]
    fn strings_must_be_well_formed_utf8() {
        assert!(
            accepts_bytes(b"{\"\xc3\xa9\": \"\xf0\x9f\x98\x80\xe2\x82\xac\"}")
                .unwrap()
                .is_complete()
        );
        // A character may be cut between tokens, not ended early.
        assert!(accepts_bytes(b"{\"a\": \"\xe2\x82").is_some());
        for bad in [
            &b"{\"a\": \"\x80"[..],
            b"{\"a\": \"\xc3\"",
            b"{\"a\": \"\xc3\\n",
            b"{\"a\": \"\xed\xa0\x80",
            b"{\"a\": \"\xc0\xaf",
            b"{\"a\": \"\xf4\x90",
            b"{\"a\": \"\xff",
            b"{\x80",
        ] {
            assert!(accepts_bytes(bad).is_none(), "accepted {bad:?}");
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
}
