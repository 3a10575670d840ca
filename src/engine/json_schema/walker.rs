//! The automaton behind [`super::SchemaPrefix`]: one byte at a time over the schema's node
//! graph, with the open containers on a stack — the committed `Vec`, or, while a candidate token
//! is checked, a copy-on-write [`Overlay`] of it.

use super::bounds::{NumPrefix, NumStep};
use super::{Frame, Node, NodeId, ObjectSpec, Pos, Schema, ANY_ARRAY, ANY_OBJECT, MAX_DEPTH};
use super::{MAX_DIGITS, MAX_EXPONENT_DIGITS, MAX_INDENT, OVERLAY};
use crate::engine::json_mode::{string_byte, Escape, Num, StrByte, Utf8};

/// The open containers, as the checker needs them.
pub(super) trait Frames {
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
pub(super) struct Overlay<'a> {
    base: &'a [Frame],
    /// `base[..live]` is still part of the stack.
    live: usize,
    over: [Frame; OVERLAY],
    n: usize,
}

impl<'a> Overlay<'a> {
    pub(super) fn new(base: &'a [Frame]) -> Self {
        Overlay {
            base,
            live: base.len(),
            over: [Frame::default(); OVERLAY],
            n: 0,
        }
    }
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
pub(super) struct Walker<'s, S> {
    pub(super) schema: &'s Schema,
    pub(super) stack: S,
    pub(super) pos: Pos,
    pub(super) ws: u8,
}

impl<'s, S: Frames> Walker<'s, S> {
    pub(super) fn push(&mut self, b: u8) -> bool {
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
            Pos::Pattern {
                node,
                state,
                len,
                backslash,
            } => self.in_pattern(node, state, len, backslash, b),
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
            Pos::Bounded { node, num } => {
                let Node::Bounded(bounds) = self.schema.node(node) else {
                    return false;
                };
                match num.step(b, bounds) {
                    NumStep::Continue(num) => {
                        self.pos = Pos::Bounded { node, num };
                        true
                    }
                    NumStep::Ended => {
                        self.complete();
                        self.push(b)
                    }
                    NumStep::Refused => false,
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
            (Node::Bounded(bounds), _) => match NumPrefix::start(b, bounds) {
                Some(num) => Pos::Bounded { node, num },
                None => return false,
            },
            (Node::Pattern(p), b'"') => Pos::Pattern {
                node,
                state: p.start(),
                len: 0,
                backslash: false,
            },
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
            min_items,
            max_items,
            ..
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
        self.start(self.schema.item(frame.node, 0), b)
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
            (Node::Array { max_items, .. }, b',') => {
                if max_items.is_some_and(|m| frame.count >= m) {
                    return false;
                }
                // A tuple's next item may need more nesting than is left.
                let next = self.schema.item(frame.node, frame.count);
                let need = self.schema.min_depth[next as usize] as usize;
                if self.stack.depth().saturating_add(need) > MAX_DEPTH {
                    return false;
                }
                self.stack.set_top(Frame {
                    count: frame.count + 1,
                    ..frame
                });
                self.pos = Pos::Value(self.schema.item(frame.node, frame.count));
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

    fn in_pattern(&mut self, node: NodeId, state: u16, len: u32, backslash: bool, b: u8) -> bool {
        let Node::Pattern(p) = self.schema.node(node) else {
            return false;
        };
        let at = |state, len, backslash| Pos::Pattern {
            node,
            state,
            len,
            backslash,
        };
        if backslash {
            return match p.escaped(state, len, b) {
                Some(next) => {
                    self.pos = at(next, len, false);
                    true
                }
                None => false,
            };
        }
        match b {
            b'"' => {
                let ok = p.may_close(state, len);
                if ok {
                    self.complete();
                }
                ok
            }
            b'\\' if p.escape_ok(state, len) => {
                self.pos = at(state, len + 1, true);
                true
            }
            b'\\' | 0..=0x1f => false,
            _ => match p.raw(state, len, b) {
                Some((next, len)) => {
                    self.pos = at(next, len, false);
                    true
                }
                None => false,
            },
        }
    }

    fn in_enum(&mut self, node: NodeId, lo: u32, hi: u32, len: u32, b: u8) -> bool {
        let Node::Enum(texts) = self.schema.node(node) else {
            return false;
        };
        let range = &texts[lo as usize..hi as usize];
        let at = len as usize;
        let used = self.used_literals(node);
        // Literals sharing the first `len` bytes are sorted by their next byte (none first).
        let key = |t: &[u8]| t.get(at).map_or(-1, |&x| i32::from(x));
        let start = range.partition_point(|t| key(t) < i32::from(b));
        let end = range.partition_point(|t| key(t) <= i32::from(b));
        if start == end {
            // No literal goes on with `b`: the value may have ended (a number, `1` of `1, 12`).
            if range.first().is_some_and(|t| t.len() == at) {
                if used.is_some_and(|u| u & (1 << lo) != 0) {
                    return false;
                }
                self.mark_used(used, lo);
                self.complete();
                return self.push(b);
            }
            return false;
        }
        let (lo, hi) = (lo + start as u32, lo + end as u32);
        if used.is_some_and(|u| (low_bits32(hi) & !low_bits32(lo)) & !u == 0) {
            // Only literals the array already holds begin so.
            return false;
        }
        if hi - lo == 1 && texts[lo as usize].len() == at + 1 {
            // The only candidate is complete: nothing can extend it.
            self.mark_used(used, lo);
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

impl<'s, S: Frames> Walker<'s, S> {
    /// Under `uniqueItems`, the literals of enum `node` its array already holds (bits).
    fn used_literals(&self, node: NodeId) -> Option<u32> {
        let frame = self.stack.top()?;
        match self.schema.node(frame.node) {
            Node::Array {
                unique: true,
                items,
                ..
            } if *items == node => Some(frame.keys),
            _ => None,
        }
    }

    fn mark_used(&mut self, used: Option<u32>, literal: u32) {
        if let (Some(u), Some(frame)) = (used, self.stack.top()) {
            self.stack.set_top(Frame {
                keys: u | 1 << literal,
                ..frame
            });
        }
    }
}

fn low_bits32(n: u32) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1 << n) - 1
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

pub(super) fn low_bits(n: usize) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

/// The indices of the set bits.
pub(super) fn bits(mut m: u128) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            i
        })
    })
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
