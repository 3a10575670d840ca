//! Structured output (`response_format: {"type": "json_schema", ...}`): generation constrained,
//! byte by byte, to text that can still become one JSON value valid under a schema.
//!
//! [`Schema::compile`] turns a JSON Schema into a graph of nodes; [`SchemaPrefix`] walks it as a
//! pushdown automaton (a stack of open objects/arrays plus the position inside the current
//! value). The subset, chosen to be enforceable token by token with no dead ends:
//! `type` (one or several), `properties` + `required` + `additionalProperties` (absent counts
//! as `false`, as in OpenAI's strict mode) + `minProperties`/`maxProperties`, `items` + `minItems` + `maxItems`, `minLength` +
//! `maxLength`, `enum` and `const` (matched as compact JSON text), `anyOf`/`oneOf` whose
//! alternatives start with different bytes (`["string", "null"]`, Pydantic's `Optional`),
//! `$ref` into `#/$defs/...` (recursion included); annotations are ignored and any other
//! keyword is refused by name. Properties come in schema order (OpenAI's rule): an optional
//! one may be skipped, a required one may not; extra keys (when allowed) may come anywhere.
//! Whitespace between tokens is one space or tab, or one newline and at most [`MAX_INDENT`]
//! spaces or tabs (llama.cpp's JSON grammars use the same bound), so a model cannot spend its
//! tokens on blank lines; strings are well-formed UTF-8.

mod compile;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use compile::{SchemaError, MAX_NODES, MAX_PROPERTIES};

use crate::engine::json_mode::{string_byte, Escape, Num, StrByte, Utf8};

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
    String {
        min_len: u32,
        max_len: Option<u32>,
    },
    Array {
        items: NodeId,
        min_items: u32,
        max_items: Option<u32>,
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
}

/// One open object or array.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Frame {
    node: NodeId,
    /// Object: index of the next declared property that may come. Array: items begun.
    count: u32,
    /// Object: keys written so far.
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
    Number {
        n: Num,
        integer: bool,
        /// Digits in the current part (integer, fraction or exponent).
        digits: u8,
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

/// The open containers, as the checker needs them.
trait Frames {
    fn depth(&self) -> usize;
    fn top(&self) -> Option<Frame>;
    fn set_top(&mut self, f: Frame);
    fn push(&mut self, f: Frame) -> bool;
    fn pop(&mut self);
}

impl Frames for Vec<Frame> {
    fn depth(&self) -> usize {
        self.len()
    }
    fn top(&self) -> Option<Frame> {
        self.last().copied()
    }
    fn set_top(&mut self, f: Frame) {
        if let Some(t) = self.last_mut() {
            *t = f;
        }
    }
    fn push(&mut self, f: Frame) -> bool {
        Vec::push(self, f);
        true
    }
    fn pop(&mut self) {
        Vec::pop(self);
    }
}

/// A copy-on-write view of a committed stack: checking a candidate token copies only the
/// frames the token changes, never the whole stack.
struct Overlay<'a> {
    base: &'a [Frame],
    /// `base[..live]` is still part of the stack.
    live: usize,
    over: [Frame; OVERLAY],
    n: usize,
}

impl Frames for Overlay<'_> {
    fn depth(&self) -> usize {
        self.live + self.n
    }
    fn top(&self) -> Option<Frame> {
        match self.n {
            0 => self.live.checked_sub(1).map(|i| self.base[i]),
            n => Some(self.over[n - 1]),
        }
    }
    fn set_top(&mut self, f: Frame) {
        if self.n > 0 {
            self.over[self.n - 1] = f;
        } else if self.live > 0 {
            self.live -= 1;
            self.over[0] = f;
            self.n = 1;
        }
    }
    fn push(&mut self, f: Frame) -> bool {
        if self.n == OVERLAY {
            return false;
        }
        self.over[self.n] = f;
        self.n += 1;
        true
    }
    fn pop(&mut self) {
        if self.n > 0 {
            self.n -= 1;
        } else {
            self.live = self.live.saturating_sub(1);
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The automaton over one stack representation.
struct Walker<'s, S> {
    schema: &'s Schema,
    stack: S,
    pos: Pos,
    ws: u8,
}

impl<'s, S: Frames> Walker<'s, S> {
    fn push(&mut self, b: u8) -> bool {
        let ws_ok = matches!(
            self.pos,
            Pos::Value(_)
                | Pos::ArrayFirst
                | Pos::ObjectFirst
                | Pos::KeyDue
                | Pos::Colon(_)
                | Pos::AfterValue
                | Pos::End
        );
        if ws_ok && is_ws(b) {
            // `ws`: 0 none yet, 1 one space or tab, 2 + n a newline and n indentation bytes.
            self.ws = match (self.ws, b) {
                (0, b' ' | b'\t') => 1,
                (0, b'\n') => 2,
                (n @ 2.., b' ' | b'\t') if n - 2 < MAX_INDENT => n + 1,
                _ => return false,
            };
            return true;
        }
        self.ws = 0;
        match self.pos {
            Pos::Value(node) => self.start(node, b),
            Pos::ArrayFirst => self.array_first(b),
            Pos::ObjectFirst => match b {
                b'"' => self.begin_key(),
                b'}' => self.close_object(),
                _ => false,
            },
            Pos::KeyDue => b == b'"' && self.begin_key(),
            Pos::Key {
                cands,
                len,
                escape,
                utf8,
            } => self.in_key(cands, len, escape, utf8, b),
            Pos::Colon(node) => {
                self.pos = Pos::Value(node);
                b == b':'
            }
            Pos::AfterValue => self.after_value(b),
            Pos::Str {
                len,
                min,
                max,
                escape,
                utf8,
            } => self.in_string(len, min, max, escape, utf8, b),
            Pos::Number { n, integer, digits } => {
                if integer && matches!(b, b'.' | b'e' | b'E') {
                    return false;
                }
                match n.step(b) {
                    Some(next) => {
                        // A non-digit (`.`, `e`, a sign) begins the next part.
                        let digits = if b.is_ascii_digit() { digits + 1 } else { 0 };
                        if digits > max_digits(next) {
                            return false;
                        }
                        self.pos = Pos::Number {
                            n: next,
                            integer,
                            digits,
                        };
                        true
                    }
                    None if n.can_end() => {
                        // The number ended; the byte belongs to what follows it.
                        self.complete();
                        self.push(b)
                    }
                    None => false,
                }
            }
            Pos::Literal(rest) => match rest.split_first() {
                Some((&want, tail)) if want == b => {
                    self.pos = Pos::Literal(tail);
                    if tail.is_empty() {
                        self.complete();
                    }
                    true
                }
                _ => false,
            },
            Pos::Enum { node, lo, hi, len } => self.in_enum(node, lo, hi, len, b),
            Pos::End => false,
        }
    }

    /// The first byte of a value of `node`.
    fn start(&mut self, node: NodeId, b: u8) -> bool {
        let schema = self.schema;
        let string = |min, max| Pos::Str {
            len: 0,
            min,
            max,
            escape: Escape::None,
            utf8: Utf8::default(),
        };
        self.pos = match (schema.node(node), b) {
            (Node::Any, b'{') => return self.open(ANY_OBJECT, Pos::ObjectFirst),
            (Node::Any, b'[') => return self.open(ANY_ARRAY, Pos::ArrayFirst),
            (Node::Any, b'"') => string(0, u32::MAX),
            (Node::Any | Node::Boolean, b't') => Pos::Literal(b"rue"),
            (Node::Any | Node::Boolean, b'f') => Pos::Literal(b"alse"),
            (Node::Any | Node::Null, b'n') => Pos::Literal(b"ull"),
            (Node::Any | Node::Number { .. }, _) => match Num::start(b) {
                Some(n) => Pos::Number {
                    n,
                    integer: matches!(schema.node(node), Node::Number { integer: true }),
                    digits: u8::from(b != b'-'),
                },
                None => return false,
            },
            (Node::String { min_len, max_len }, b'"') => {
                string(*min_len, max_len.unwrap_or(u32::MAX))
            }
            (Node::Array { .. }, b'[') => return self.open(node, Pos::ArrayFirst),
            (Node::Object(_), b'{') => return self.open(node, Pos::ObjectFirst),
            (Node::Enum(texts), _) => {
                return self.in_enum(node, 0, texts.len() as u32, 0, b);
            }
            (Node::Union(alts), _) => {
                let alt = alts
                    .iter()
                    .find(|(first, _)| b < 128 && first & (1 << b) != 0);
                return match alt {
                    Some(&(_, a)) => self.start(a, b),
                    None => false,
                };
            }
            _ => return false,
        };
        true
    }

    /// Opens a container, if a value of `node` still fits under [`MAX_DEPTH`].
    fn open(&mut self, node: NodeId, pos: Pos) -> bool {
        let need = self.schema.min_depth[node as usize] as usize;
        if self.stack.depth().saturating_add(need) > MAX_DEPTH
            || !self.stack.push(Frame {
                node,
                count: 0,
                keys: 0,
            })
        {
            return false;
        }
        self.pos = pos;
        true
    }

    /// A value ended: back to its container, or the end.
    fn complete(&mut self) {
        self.pos = if self.stack.depth() == 0 {
            Pos::End
        } else {
            Pos::AfterValue
        };
    }

    fn close(&mut self) -> bool {
        self.stack.pop();
        self.complete();
        true
    }

    fn array_first(&mut self, b: u8) -> bool {
        let Some(frame) = self.stack.top() else {
            return false;
        };
        let Node::Array {
            items,
            min_items,
            max_items,
        } = *self.schema.node(frame.node)
        else {
            return false;
        };
        if b == b']' {
            return min_items == 0 && self.close();
        }
        if max_items == Some(0) {
            return false;
        }
        self.stack.set_top(Frame { count: 1, ..frame });
        self.start(items, b)
    }

    /// The innermost object's frame and spec.
    fn object(&self) -> Option<(Frame, &'s ObjectSpec)> {
        let frame = self.stack.top()?;
        let schema: &'s Schema = self.schema;
        match schema.node(frame.node) {
            Node::Object(spec) => Some((frame, spec)),
            _ => None,
        }
    }

    fn begin_key(&mut self) -> bool {
        let Some((frame, spec)) = self.object() else {
            return false;
        };
        if spec.choosable(frame) == 0 && !spec.extra_ok(frame) {
            return false;
        }
        self.pos = Pos::Key {
            cands: low_bits(spec.props.len()),
            len: 0,
            escape: Escape::None,
            utf8: Utf8::default(),
        };
        true
    }

    fn close_object(&mut self) -> bool {
        match self.object() {
            Some((frame, spec)) => spec.may_close(frame) && self.close(),
            None => false,
        }
    }

    fn in_key(&mut self, cands: u128, len: u32, escape: Escape, utf8: Utf8, b: u8) -> bool {
        let Some((frame, spec)) = self.object() else {
            return false;
        };
        let (props, allowed, extra) = (&spec.props, spec.choosable(frame), spec.extra_ok(frame));
        let (escape, utf8) = match string_byte(escape, utf8, b) {
            None => return false,
            Some(StrByte::Close) => {
                let exact = bits(cands).find(|&i| props[i].name.len() == len as usize);
                let (value, count) = match (exact, spec.additional) {
                    (Some(i), _) if allowed & (1 << i) != 0 => (props[i].node, i as u32 + 1),
                    (None, Some(node)) if extra => (node, frame.count),
                    // A declared name out of its turn (or again) is not an extra key.
                    _ => return false,
                };
                self.stack.set_top(Frame {
                    count,
                    keys: frame.keys + 1,
                    ..frame
                });
                self.pos = Pos::Colon(value);
                return true;
            }
            Some(StrByte::Continue { escape, utf8, .. }) => (escape, utf8),
        };
        if escape == Escape::Backslash {
            // Declared names are matched as written: an escape makes the key an extra one.
            if !extra {
                return false;
            }
            self.pos = Pos::Key {
                cands: 0,
                len: len.saturating_add(1),
                escape,
                utf8,
            };
            return true;
        }
        // Any other byte of the key (part of a character, or an escape's): narrow the names.
        let at = len as usize;
        let next = bits(cands)
            .filter(|&i| props[i].name.get(at) == Some(&b))
            .fold(0u128, |m, i| m | 1 << i);
        if !extra && next & allowed == 0 {
            return false;
        }
        self.pos = Pos::Key {
            cands: next,
            len: len.saturating_add(1),
            escape,
            utf8,
        };
        true
    }

    fn after_value(&mut self, b: u8) -> bool {
        let Some(frame) = self.stack.top() else {
            return false;
        };
        match (self.schema.node(frame.node), b) {
            (Node::Object(spec), b',') => {
                self.pos = Pos::KeyDue;
                spec.choosable(frame) != 0 || spec.extra_ok(frame)
            }
            (Node::Object(_), b'}') => self.close_object(),
            (
                Node::Array {
                    items, max_items, ..
                },
                b',',
            ) => {
                if max_items.is_some_and(|m| frame.count >= m) {
                    return false;
                }
                self.stack.set_top(Frame {
                    count: frame.count + 1,
                    ..frame
                });
                self.pos = Pos::Value(*items);
                true
            }
            (Node::Array { min_items, .. }, b']') => frame.count >= *min_items && self.close(),
            _ => false,
        }
    }

    fn in_string(
        &mut self,
        len: u32,
        min: u32,
        max: u32,
        escape: Escape,
        utf8: Utf8,
        b: u8,
    ) -> bool {
        let (len, escape, utf8) = match string_byte(escape, utf8, b) {
            None => return false,
            Some(StrByte::Close) => {
                if len < min {
                    return false;
                }
                self.complete();
                return true;
            }
            Some(StrByte::Continue {
                escape,
                utf8,
                starts_char,
            }) => match (starts_char, len >= max) {
                (true, true) => return false,
                (true, false) => (len + 1, escape, utf8),
                (false, _) => (len, escape, utf8),
            },
        };
        self.pos = Pos::Str {
            len,
            min,
            max,
            escape,
            utf8,
        };
        true
    }

    fn in_enum(&mut self, node: NodeId, lo: u32, hi: u32, len: u32, b: u8) -> bool {
        let Node::Enum(texts) = self.schema.node(node) else {
            return false;
        };
        let range = &texts[lo as usize..hi as usize];
        let at = len as usize;
        // Literals sharing the first `len` bytes are sorted by their next byte (none first).
        let key = |t: &[u8]| t.get(at).map_or(-1, |&x| i32::from(x));
        let start = range.partition_point(|t| key(t) < i32::from(b));
        let end = range.partition_point(|t| key(t) <= i32::from(b));
        if start == end {
            // No literal goes on with `b`: the value may have ended (a number, `1` of `1, 12`).
            if range.first().is_some_and(|t| t.len() == at) {
                self.complete();
                return self.push(b);
            }
            return false;
        }
        let (lo, hi) = (lo + start as u32, lo + end as u32);
        if hi - lo == 1 && texts[lo as usize].len() == at + 1 {
            // The only candidate is complete: nothing can extend it.
            self.complete();
        } else {
            self.pos = Pos::Enum {
                node,
                lo,
                hi,
                len: len + 1,
            };
        }
        true
    }
}

/// Most digits in each part of a number (llama.cpp's JSON grammars bound them alike): enough
/// for any f64 or 64-bit integer, and a model repeating a digit cannot run on.
fn max_digits(n: Num) -> u8 {
    match n {
        Num::E | Num::ESign | Num::Exp => MAX_EXPONENT_DIGITS,
        _ => MAX_DIGITS,
    }
}

fn low_bits(n: usize) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

/// The indices of the set bits.
fn bits(mut m: u128) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            i
        })
    })
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
            stack: Overlay {
                base: &self.stack,
                live: self.stack.len(),
                over: [Frame::default(); OVERLAY],
                n: 0,
            },
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
            Pos::Enum { node, lo, len, .. } => {
                self.stack.is_empty()
                    && matches!(self.schema.node(node), Node::Enum(t)
                        if t.get(lo as usize).is_some_and(|t| t.len() == len as usize))
            }
            _ => false,
        }
    }
}

impl<T: Frames> Frames for &mut T {
    fn depth(&self) -> usize {
        (**self).depth()
    }
    fn top(&self) -> Option<Frame> {
        (**self).top()
    }
    fn set_top(&mut self, f: Frame) {
        (**self).set_top(f)
    }
    fn push(&mut self, f: Frame) -> bool {
        (**self).push(f)
    }
    fn pop(&mut self) {
        (**self).pop()
    }
}
