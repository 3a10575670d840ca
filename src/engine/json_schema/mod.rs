//! Structured output (`response_format: {"type": "json_schema", ...}`): generation constrained,
//! byte by byte, to text that can still become one JSON value valid under a schema.
//!
//! [`Schema::compile`] turns a JSON Schema into a graph of nodes; [`SchemaPrefix`] walks it as a
//! pushdown automaton (a stack of open objects/arrays plus the position inside the current
//! value). The subset, chosen to be enforceable token by token with no dead ends:
//! `type` (one or several), `properties` + `required` + `additionalProperties` (absent counts
//! as `false`, as in OpenAI's strict mode) + `minProperties`/`maxProperties`, `items` +
//! `prefixItems` (tuples) + `minItems` + `maxItems` + `uniqueItems` (over an enum), `allOf` of
//! one schema, `minLength` +
//! `maxLength`, `enum` and `const` (matched as compact JSON text), `anyOf`/`oneOf` whose
//! alternatives start with different bytes (`["string", "null"]`, Pydantic's `Optional`),
//! `$ref` into `#/$defs/...` (recursion included), `pattern`/`format` on strings (a DFA, see
//! `pattern`), `minimum`/`maximum`/`exclusive…` on numbers (see `bounds`); annotations are
//! ignored and any other keyword is refused by name. Properties come in schema order (OpenAI's rule): an optional
//! one may be skipped, a required one may not; extra keys (when allowed) may come anywhere.
//! Whitespace between tokens is one space or tab, or one newline and at most [`MAX_INDENT`]
//! spaces or tabs (llama.cpp's JSON grammars use the same bound), so a model cannot spend its
//! tokens on blank lines; strings are well-formed UTF-8.

mod bounds;
mod compile;
mod pattern;
#[cfg(test)]
mod tests;
mod walker;

use std::sync::Arc;

pub use bounds::MAX_BOUNDED_DIGITS;
pub use compile::{SchemaError, MAX_NODES, MAX_PATTERN_STATES_TOTAL, MAX_PROPERTIES};
pub use pattern::{MAX_PATTERN_BYTES, MAX_PATTERN_STATES};

use crate::engine::json_mode::{Escape, Num, Utf8};
use walker::{bits, Overlay, Walker};

type NodeId = u32;
/// Bytes a value may start with (all ASCII).
type ByteSet = u128;

/// Built-in nodes every schema starts with: any value, any object, any array.
const ANY: NodeId = 0;
const ANY_OBJECT: NodeId = 1;
const ANY_ARRAY: NodeId = 2;

/// Deepest nesting of objects and arrays generated.
pub const MAX_DEPTH: usize = 64;
/// Most spaces or tabs of indentation after a newline between JSON tokens.
pub const MAX_INDENT: u8 = 20;
/// Most digits in a number's integer part and in its fraction; in its exponent.
pub const MAX_DIGITS: u8 = 16;
pub const MAX_EXPONENT_DIGITS: u8 = 3;
/// Most containers one token may open (the check of a candidate token sets up this many frames,
/// so it stays small; a token opening more is refused — shorter tokens spell the same text).
const OVERLAY: usize = 8;

#[derive(Debug)]
enum Node {
    Any,
    Null,
    Boolean,
    Number {
        integer: bool,
    },
    /// A number under `minimum`/`maximum`/`exclusive…`.
    Bounded(bounds::Bounds),
    String {
        min_len: u32,
        max_len: Option<u32>,
    },
    /// A string under `pattern` or `format` (its length bounds are in the table).
    Pattern(Arc<pattern::StringPattern>),
    Array {
        /// Items past `prefix`.
        items: NodeId,
        /// `prefixItems`: the first items' own schemas (tuples).
        prefix: Box<[NodeId]>,
        min_items: u32,
        max_items: Option<u32>,
        /// `uniqueItems` (only over an enum of at most 32 literals: see `Frame::keys`).
        unique: bool,
    },
    Object(ObjectSpec),
    /// The compact JSON texts of the allowed values, sorted.
    Enum(Vec<Box<[u8]>>),
    /// Alternatives, each with the bytes it starts with (disjoint).
    Union(Vec<(ByteSet, NodeId)>),
    /// A `$ref` (resolved away when compiling ends).
    Alias(NodeId),
}

#[derive(Debug)]
struct ObjectSpec {
    props: Vec<Prop>,
    /// Schema of keys not declared; `None`: none allowed.
    additional: Option<NodeId>,
    /// `minProperties`, `maxProperties` (`u32::MAX`: no bound).
    min_props: u32,
    max_props: u32,
    /// `windows[next]`: the declared properties that may come next when the earlier ones are
    /// done (up to and including the first required one), as bits.
    windows: Vec<u128>,
    /// `required_from[next]`: how many required properties are still to come.
    required_from: Vec<u32>,
}

impl ObjectSpec {
    fn required_left(&self, next: u32) -> u32 {
        self.required_from.get(next as usize).copied().unwrap_or(0)
    }

    /// The declared properties that may be the next key and still leave a way to complete the
    /// object within `minProperties`/`maxProperties` and `required`.
    fn choosable(&self, f: Frame) -> u128 {
        let mut mask = self.windows.get(f.count as usize).copied().unwrap_or(0);
        if f.keys >= self.max_props {
            return 0;
        }
        let n = self.props.len() as u32;
        for i in bits(mask) {
            let i = i as u32;
            let reaches_min = self.additional.is_some() || f.keys + n - i >= self.min_props;
            let fits_required = f.keys + 1 + self.required_left(i + 1) <= self.max_props;
            if !(reaches_min && fits_required) {
                mask &= !(1 << i);
            }
        }
        mask
    }

    /// Whether an undeclared key may come next.
    fn extra_ok(&self, f: Frame) -> bool {
        self.additional.is_some() && f.keys + 1 + self.required_left(f.count) <= self.max_props
    }

    fn may_close(&self, f: Frame) -> bool {
        f.keys >= self.min_props && self.required_left(f.count) == 0
    }
}

#[derive(Debug)]
struct Prop {
    name: Box<[u8]>,
    node: NodeId,
    required: bool,
}

/// A compiled schema.
#[derive(Debug)]
pub struct Schema {
    nodes: Vec<Node>,
    /// Fewest containers a value of each node opens (`u32::MAX`: none is finite).
    min_depth: Vec<u32>,
    root: NodeId,
}

impl Schema {
    /// Any object (JSON mode; what `{"type": "object"}` compiles to).
    pub fn any_object() -> Schema {
        Schema::compile(&serde_json::json!({"type": "object"}))
            .expect("the built-in object schema compiles")
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// The schema of item `index` of an array node (a tuple's own, or the rest's).
    fn item(&self, array: NodeId, index: u32) -> NodeId {
        match self.node(array) {
            Node::Array { items, prefix, .. } => {
                prefix.get(index as usize).copied().unwrap_or(*items)
            }
            _ => ANY,
        }
    }
}

/// One open object or array.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Frame {
    node: NodeId,
    /// Object: index of the next declared property that may come. Array: items begun.
    count: u32,
    /// Object: keys written so far. Array under `uniqueItems`: the enum literals used, as bits.
    keys: u32,
}

/// Where the text stands inside the innermost value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pos {
    /// A value of the node is due.
    Value(NodeId),
    ArrayFirst,
    ObjectFirst,
    /// After `,` in an object.
    KeyDue,
    /// Inside a key: the declared names (bits) that the bytes so far begin.
    Key {
        cands: u128,
        len: u32,
        escape: Escape,
        utf8: Utf8,
    },
    /// After a key: `:` and then a value of the node.
    Colon(NodeId),
    AfterValue,
    Str {
        len: u32,
        min: u32,
        max: u32,
        escape: Escape,
        utf8: Utf8,
    },
    /// Inside a string of a [`Node::Pattern`]: the pattern's state, the characters so far,
    /// and whether an escape's letter is due.
    Pattern {
        node: NodeId,
        state: u16,
        len: u32,
        backslash: bool,
    },
    Number {
        n: Num,
        integer: bool,
        /// Digits in the current part (integer, fraction or exponent).
        digits: u8,
    },
    /// Inside a number of a [`Node::Bounded`].
    Bounded {
        node: NodeId,
        num: bounds::NumPrefix,
    },
    Literal(&'static [u8]),
    /// Inside an enum value: the literals `lo..hi` begin with the `len` bytes so far.
    Enum {
        node: NodeId,
        lo: u32,
        hi: u32,
        len: u32,
    },
    End,
}

/// An incremental check that the bytes pushed so far begin a value valid under a schema.
#[derive(Clone, Debug)]
pub struct SchemaPrefix {
    schema: Arc<Schema>,
    stack: Vec<Frame>,
    pos: Pos,
    ws: u8,
    /// The bytes that may come next, as bits: most candidate tokens fail on their first byte,
    /// and this answers that without running the automaton.
    first: ByteBits,
    /// The bytes that may follow one space (BPE vocabularies hold many space-led words).
    after_space: ByteBits,
}

/// A set of bytes.
type ByteBits = [u64; 4];

fn has(set: &ByteBits, b: u8) -> bool {
    set[usize::from(b >> 6)] & (1 << (b & 63)) != 0
}

impl SchemaPrefix {
    pub fn new(schema: Arc<Schema>) -> Self {
        let pos = Pos::Value(schema.root);
        let mut p = SchemaPrefix {
            schema,
            stack: Vec::new(),
            pos,
            ws: 0,
            first: [0; 4],
            after_space: [0; 4],
        };
        p.cache_next_bytes();
        p
    }

    fn cache_next_bytes(&mut self) {
        let bytes_after = |prefix: &[u8]| {
            let mut set = [0u64; 4];
            let mut text = prefix.to_vec();
            text.push(0);
            for b in 0..=255u8 {
                *text.last_mut().expect("one byte pushed") = b;
                if self.walk(&text) {
                    set[usize::from(b >> 6)] |= 1 << (b & 63);
                }
            }
            set
        };
        let first = bytes_after(b"");
        let after_space = if has(&first, b' ') {
            bytes_after(b" ")
        } else {
            [0; 4]
        };
        (self.first, self.after_space) = (first, after_space);
    }

    /// Whether `bytes` may come next (the state is unchanged).
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        match bytes {
            [] => return true,
            [b, ..] if !has(&self.first, *b) => return false,
            [b' ', b, ..] if !has(&self.after_space, *b) => return false,
            _ => {}
        }
        if let Some(ok) = self.accepts_as_text(bytes) {
            return ok;
        }
        self.walk(bytes)
    }

    /// The automaton over `bytes`, on a copy-on-write view of the stack.
    fn walk(&self, bytes: &[u8]) -> bool {
        let mut w = Walker {
            schema: &self.schema,
            stack: Overlay::new(&self.stack),
            pos: self.pos,
            ws: self.ws,
        };
        bytes.iter().all(|&b| w.push(b))
    }

    /// Inside a string value, or a key that can only be an undeclared one, most candidate
    /// tokens are plain text: they are checked here in one tight loop (a whole-vocabulary check
    /// is mostly this). `None`: the token holds a quote or a backslash, or the text is elsewhere —
    /// the automaton decides.
    fn accepts_as_text(&self, bytes: &[u8]) -> Option<bool> {
        let (mut len, max, mut utf8) = match self.pos {
            Pos::Str {
                len,
                max,
                escape: Escape::None,
                utf8,
                ..
            } => (len, max, utf8),
            // No declared name fits what the key holds so far: it reached here as an extra key,
            // and goes on as any text.
            Pos::Key {
                cands: 0,
                escape: Escape::None,
                utf8,
                ..
            } => (0, u32::MAX, utf8),
            _ => return None,
        };
        for &b in bytes {
            if !utf8.at_boundary() {
                match utf8.step(b) {
                    Some(u) => utf8 = u,
                    None => return Some(false),
                }
                continue;
            }
            match b {
                b'"' | b'\\' => return None,
                0..=0x1f => return Some(false),
                _ if len >= max => return Some(false),
                0x80.. => match utf8.step(b) {
                    Some(u) => (utf8, len) = (u, len + 1),
                    None => return Some(false),
                },
                _ => len += 1,
            }
        }
        Some(true)
    }

    /// Feeds bytes; false (and the state unspecified) when they cannot continue a valid value.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        let mut w = Walker {
            schema: &self.schema,
            stack: &mut self.stack,
            pos: self.pos,
            ws: self.ws,
        };
        let ok = bytes.iter().all(|&b| w.push(b));
        let (pos, ws) = (w.pos, w.ws);
        self.pos = pos;
        self.ws = ws;
        self.cache_next_bytes();
        ok
    }

    /// The value is complete and nothing but whitespace may follow.
    pub fn is_complete(&self) -> bool {
        self.pos == Pos::End
    }

    /// The text so far is a whole valid value (a top-level number or enum literal may still
    /// go on, so it is not [`SchemaPrefix::is_complete`]).
    pub fn may_end(&self) -> bool {
        match self.pos {
            Pos::End => true,
            Pos::Number { n, .. } => self.stack.is_empty() && n.can_end(),
            Pos::Bounded { node, num } => {
                self.stack.is_empty()
                    && matches!(self.schema.node(node), Node::Bounded(b) if num.in_range(b))
            }
            Pos::Enum { node, lo, len, .. } => {
                self.stack.is_empty()
                    && matches!(self.schema.node(node), Node::Enum(t)
                        if t.get(lo as usize).is_some_and(|t| t.len() == len as usize))
            }
            _ => false,
        }
    }
}
