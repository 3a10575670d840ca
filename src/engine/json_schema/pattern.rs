//! `pattern` and `format` on strings: the regular expression becomes a byte DFA (regex-automata),
//! copied into a flat table together with, per state, the fewest characters that still reach a
//! match — so the checker offers a character only when the string can still end matching
//! within `minLength`/`maxLength` (no dead ends, as everywhere in the checker).
//!
//! The DFA reads the string's *decoded* bytes: raw UTF-8 as written, and the character a
//! short escape (`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`) stands for. `\u` escapes are
//! not offered inside a patterned string: while one is half written the checker could not tell
//! whether it ends in an allowed character (every character but control ones can be written
//! raw, so nothing is lost).

use std::collections::{HashMap, VecDeque};

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::{primitives::StateID, start, syntax};
use regex_automata::{Anchored, MatchKind};

/// Longest `pattern` accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Most DFA states one pattern may compile to (each holds a 512-byte row of transitions).
pub const MAX_PATTERN_STATES: usize = 2048;
/// Most (state, count below `minLength`) cells a patterned string may need.
const MAX_LAYER_CELLS: usize = 1 << 16;
/// regex-automata's own bounds on building (bytes), well above what the state cap admits.
const BUILD_LIMIT: usize = 2 << 20;

const DEAD: u16 = u16::MAX;
const UNREACHABLE: u32 = u32::MAX;

/// The escapes a patterned string may use: the escape letter and the byte it stands for.
const ESCAPES: [(u8, u8); 8] = [
    (b'"', b'"'),
    (b'\\', b'\\'),
    (b'/', b'/'),
    (b'b', 0x08),
    (b'f', 0x0c),
    (b'n', b'\n'),
    (b'r', b'\r'),
    (b't', b'\t'),
];

/// Bytes a JSON string can hold once decoded: everything but the control characters that
/// only a `\u` escape could write.
fn writable(b: u8) -> bool {
    b >= 0x20 || matches!(b, 0x08 | b'\t' | b'\n' | 0x0c | b'\r')
}

/// Whether a decoded byte begins a character (and so counts toward the length).
fn starts_char(b: u8) -> bool {
    !(0x80..0xc0).contains(&b)
}

/// One compiled pattern under one pair of length bounds.
pub(super) struct StringPattern {
    /// `next[state * 256 + byte]`, or [`DEAD`].
    next: Box<[u16]>,
    /// Whether the string may end in this state (a match ends at the end).
    accept: Box<[bool]>,
    /// Fewest characters from this state to a state that may end ([`UNREACHABLE`]: none).
    shortest: Box<[u32]>,
    /// Bit `k * states + s`: with `k < min` characters written and in state `s`, a match of a
    /// total length in `min..=max` is still reachable.
    below_min: Box<[u64]>,
    states: usize,
    start: u16,
    min: u32,
    max: Option<u32>,
}

/// The sizes, not the tables (tens of kilobytes a pattern).
impl std::fmt::Debug for StringPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StringPattern")
            .field("states", &self.states)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl StringPattern {
    pub(super) fn start(&self) -> u16 {
        self.start
    }

    pub(super) fn states(&self) -> usize {
        self.states
    }

    fn step(&self, state: u16, b: u8) -> u16 {
        self.next[usize::from(state) * 256 + usize::from(b)]
    }

    /// A match is reachable from `state` with `len` characters written.
    fn live(&self, state: u16, len: u32) -> bool {
        if state == DEAD || self.max.is_some_and(|m| len > m) {
            return false;
        }
        let s = usize::from(state);
        if len >= self.min {
            let d = self.shortest[s];
            d != UNREACHABLE
                && self
                    .max
                    .is_none_or(|m| u64::from(len) + u64::from(d) <= u64::from(m))
        } else {
            let bit = len as usize * self.states + s;
            self.below_min[bit / 64] & (1 << (bit % 64)) != 0
        }
    }

    /// A raw byte of the string (not a quote, backslash or control byte): the next state and
    /// length, if a match stays reachable.
    pub(super) fn raw(&self, state: u16, len: u32, b: u8) -> Option<(u16, u32)> {
        let next = self.step(state, b);
        let len = len + u32::from(starts_char(b));
        self.live(next, len).then_some((next, len))
    }

    /// Whether a backslash may begin an escape here (some escape's character keeps a match
    /// reachable); the escape counts one character.
    pub(super) fn escape_ok(&self, state: u16, len: u32) -> bool {
        ESCAPES
            .iter()
            .any(|&(_, byte)| self.live(self.step(state, byte), len + 1))
    }

    /// The letter after a backslash (`len` already counts the escape).
    pub(super) fn escaped(&self, state: u16, len: u32, letter: u8) -> Option<u16> {
        let &(_, byte) = ESCAPES.iter().find(|(l, _)| *l == letter)?;
        let next = self.step(state, byte);
        self.live(next, len).then_some(next)
    }

    /// Whether the string may close here.
    pub(super) fn may_close(&self, state: u16, len: u32) -> bool {
        self.accept[usize::from(state)] && len >= self.min
    }
}

/// ECMA-262 (JSON Schema's regex dialect) to regex-automata's syntax, for what differs in
/// meaning: `\d`, `\w` (and their negations) are ASCII, `\b` is an ASCII word boundary (a
/// backspace inside a class), `.` stops at every line terminator, `[` inside a class is a
/// literal, `\/` is a slash. What regex-automata cannot do (look-around, back-references) it
/// refuses, and the message says so.
fn translate(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(e) = chars.next() else {
                    out.push('\\');
                    break;
                };
                let replacement = match (in_class, e) {
                    (false, 'd') => "[0-9]",
                    (false, 'D') => "[^0-9]",
                    (false, 'w') => "[0-9A-Za-z_]",
                    (false, 'W') => "[^0-9A-Za-z_]",
                    (false, 'b') => r"(?-u:\b)",
                    (false, 'B') => r"(?-u:\B)",
                    (true, 'd') => "0-9",
                    (true, 'w') => "0-9A-Za-z_",
                    (true, 'D') => "[:^digit:]",
                    (true, 'W') => "[:^word:]",
                    (true, 'b') => r"\x08",
                    (_, '/') => "/",
                    _ => {
                        out.push('\\');
                        out.push(e);
                        continue;
                    }
                };
                out.push_str(replacement);
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            // Literal inside an ECMA class; set syntax in regex-automata's.
            '[' | '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            '.' if !in_class => out.push_str(r"[^\n\r\u{2028}\u{2029}]"),
            c => out.push(c),
        }
    }
    out
}

/// Why a pattern could not be compiled (the caller adds the place).
fn build_error(pattern: &str, e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    format!("pattern {pattern:?} is not supported: {message}")
}

/// Compiles `pattern` (matched anywhere in the string, as JSON Schema says) under the length
/// bounds.
pub(super) fn compile(pattern: &str, min: u32, max: Option<u32>) -> Result<StringPattern, String> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "a pattern may be at most {MAX_PATTERN_BYTES} bytes long"
        ));
    }
    // The string must match as a whole: anything, the pattern, anything.
    let whole = format!("(?s:.)*(?:{})(?s:.)*", translate(pattern));
    let dfa = dense::Builder::new()
        .syntax(
            syntax::Config::new()
                .utf8(true)
                .unicode(true)
                .nest_limit(64),
        )
        .thompson(thompson::Config::new().nfa_size_limit(Some(BUILD_LIMIT)))
        .configure(
            dense::Config::new()
                .match_kind(MatchKind::All)
                .start_kind(StartKind::Anchored)
                .minimize(false)
                .determinize_size_limit(Some(BUILD_LIMIT))
                .dfa_size_limit(Some(BUILD_LIMIT)),
        )
        .build(&whole)
        .map_err(|e| build_error(pattern, &e))?;
    let start = dfa
        .start_state(&start::Config::new().anchored(Anchored::Yes))
        .map_err(|e| build_error(pattern, &e))?;

    // Number the states reachable from the start, breadth first.
    let too_many = || {
        format!("pattern {pattern:?} is too complex (over {MAX_PATTERN_STATES} automaton states)")
    };
    let mut ids: HashMap<StateID, u16> = HashMap::from([(start, 0)]);
    let mut order = vec![start];
    let mut next = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let sid = order[i];
        for b in 0..=255u8 {
            let t = dfa.next_state(sid, b);
            if dfa.is_dead_state(t) || dfa.is_quit_state(t) {
                next.push(DEAD);
                continue;
            }
            let id = match ids.get(&t) {
                Some(&id) => id,
                None => {
                    if order.len() >= MAX_PATTERN_STATES {
                        return Err(too_many());
                    }
                    let id = order.len() as u16;
                    ids.insert(t, id);
                    order.push(t);
                    id
                }
            };
            next.push(id);
        }
        i += 1;
    }
    let states = order.len();
    let accept: Box<[bool]> = order
        .iter()
        .map(|&s| dfa.is_match_state(dfa.next_eoi_state(s)))
        .collect();

    // Edges backwards over the bytes a string can hold, with whether each counts a character.
    let mut back: Vec<Vec<(u16, bool)>> = vec![Vec::new(); states];
    for s in 0..states {
        for b in (0..=255u8).filter(|&b| writable(b)) {
            let t = next[s * 256 + usize::from(b)];
            if t != DEAD {
                back[usize::from(t)].push((s as u16, starts_char(b)));
            }
        }
    }
    for edges in back.iter_mut() {
        edges.sort_unstable();
        edges.dedup();
    }

    // Fewest characters to a match: breadth first backwards, 0-1 weights.
    let mut shortest = vec![UNREACHABLE; states];
    let mut queue: VecDeque<usize> = VecDeque::new();
    for (s, &a) in accept.iter().enumerate() {
        if a {
            shortest[s] = 0;
            queue.push_back(s);
        }
    }
    while let Some(t) = queue.pop_front() {
        for &(s, counts) in &back[t] {
            let d = shortest[t] + u32::from(counts);
            let s = usize::from(s);
            if d < shortest[s] {
                shortest[s] = d;
                if counts {
                    queue.push_back(s);
                } else {
                    queue.push_front(s);
                }
            }
        }
    }

    let cells = (min as usize).saturating_mul(states);
    if cells > MAX_LAYER_CELLS {
        return Err(format!(
            "pattern {pattern:?} with minLength {min} needs too large a table \
             ({states} automaton states × {min}); lower minLength or simplify the pattern"
        ));
    }
    let mut table = StringPattern {
        next: next.into_boxed_slice(),
        accept,
        shortest: shortest.into_boxed_slice(),
        below_min: vec![0u64; cells.div_ceil(64)].into_boxed_slice(),
        states,
        start: 0,
        min,
        max,
    };
    // Below minLength, layer by layer from the top: live if a character leads to a live state
    // one layer up, or a continuation byte to a live state of the same layer.
    for k in (0..min).rev() {
        let mut work: Vec<usize> = Vec::new();
        let set = |table: &mut StringPattern, s: usize, work: &mut Vec<usize>| {
            let bit = k as usize * states + s;
            if table.below_min[bit / 64] & (1 << (bit % 64)) == 0 {
                table.below_min[bit / 64] |= 1 << (bit % 64);
                work.push(s);
            }
        };
        for (t, edges) in back.iter().enumerate() {
            if table.live(t as u16, k + 1) {
                for &(s, counts) in edges {
                    if counts {
                        set(&mut table, usize::from(s), &mut work);
                    }
                }
            }
        }
        while let Some(t) = work.pop() {
            for &(s, counts) in &back[t] {
                if !counts {
                    set(&mut table, usize::from(s), &mut work);
                }
            }
        }
    }
    if !table.live(0, 0) {
        return Err(match (min, max) {
            (0, None) => format!("pattern {pattern:?} matches no string"),
            _ => format!("pattern {pattern:?} matches no string within minLength/maxLength"),
        });
    }
    Ok(table)
}

/// The `format`s generation can enforce, as patterns: RFC 3339 dates (real ones: each month's
/// length, February 29th in leap years, years 0001–9999 as Python's `datetime` takes them),
/// times and date-times, ISO 8601 durations, UUIDs, e-mail addresses, host names, IPv4 and IPv6
/// addresses and http(s) URIs. Each generates only valid text of its format — a subset where the
/// format is wider: upper-case `T`/`Z`, no leap second, lower-case hex in UUIDs and IPv6 (no
/// embedded IPv4), `http`/`https` URIs.
pub(super) fn format_pattern(format: &str) -> Option<String> {
    const YEAR: &str = r"([1-9]\d{3}|0[1-9]\d\d|00[1-9]\d|000[1-9])";
    const MONTH_DAY: &str = r"((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|02-(0[1-9]|1\d|2[0-8]))";
    // Divisible by 4 and not by 100 (the last two digits), or by 400 (the first two, then 00).
    const LEAP_YEAR: &str =
        r"(\d\d(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)";
    const TIME: &str =
        r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)";
    const LABEL: &str = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
    const OCTET: &str = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)";
    const URI_HOST: &str =
        r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*";
    const URI_CHARS: &str = r"[A-Za-z0-9._~%!$&'()*+,;=:@-]";
    const H16: &str = "[0-9a-f]{1,4}";
    const DUR_DATE: &str = r"(\d{1,9}Y(\d{1,9}M)?(\d{1,9}D)?|\d{1,9}M(\d{1,9}D)?|\d{1,9}D)";
    const DUR_TIME: &str = r"T(\d{1,9}H(\d{1,9}M)?(\d{1,9}(\.\d{1,9})?S)?|\d{1,9}M(\d{1,9}(\.\d{1,9})?S)?|\d{1,9}(\.\d{1,9})?S)";
    let date = format!("({YEAR}-{MONTH_DAY}|{LEAP_YEAR}-02-29)");
    Some(match format {
        "date" => format!("^{date}$"),
        "time" => format!("^{TIME}$"),
        "date-time" => format!("^{date}T{TIME}$"),
        "duration" => format!(r"^P({DUR_DATE}({DUR_TIME})?|{DUR_TIME}|\d{{1,9}}W)$"),
        "uuid" => r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$".to_string(),
        "email" => format!(r"^[A-Za-z0-9_%+-]+(\.[A-Za-z0-9_%+-]+)*@{LABEL}(\.{LABEL})+$"),
        "hostname" => format!(r"^{LABEL}(\.{LABEL})*$"),
        "ipv4" => format!(r"^({OCTET}\.){{3}}{OCTET}$"),
        "ipv6" => format!(
            "^(({H16}:){{7}}{H16}|({H16}:){{1,7}}:|({H16}:){{1,6}}:{H16}|({H16}:){{1,5}}(:{H16}){{1,2}}\
             |({H16}:){{1,4}}(:{H16}){{1,3}}|({H16}:){{1,3}}(:{H16}){{1,4}}|({H16}:){{1,2}}(:{H16}){{1,5}}\
             |{H16}:(:{H16}){{1,6}}|:((:{H16}){{1,7}}|:))$"
        ),
        "uri" => format!(
            r"^https?://{URI_HOST}(:\d{{1,5}})?(/{URI_CHARS}*)*(\?({URI_CHARS}|[/?])*)?(#({URI_CHARS}|[/?])*)?$"
        ),
        _ => return None,
    })
}

/// The formats [`format_pattern`] knows, for error messages.
pub(super) const FORMATS: &str =
    "date, time, date-time, duration, uuid, email, hostname, ipv4, ipv6, uri";
