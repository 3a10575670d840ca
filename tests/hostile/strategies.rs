//! Shared generators: arbitrary JSON values biased toward edge cases, hostile strings, and
//! deeply nested JSON text.

use proptest::prelude::*;
use serde_json::Value;

/// Strings that tend to break things: path tricks, control and format characters, look-alikes
/// (Cyrillic `а`, fullwidth `ｓ`), a right-to-left override, lone-surrogate escapes' text,
/// numbers-as-text, and names that are valid.
pub const NASTY: &[&str] = &[
    "",
    " ",
    "..",
    "../",
    "../../etc/passwd",
    "/",
    "\\",
    "..\\..\\",
    "\0",
    "a\0b",
    "\u{430}",
    "ѕupport",
    "\u{ff53}upport",
    "\u{202e}",
    "\u{feff}",
    "\n",
    "\r\n",
    "%2e%2e%2f",
    "@",
    "@1",
    "x@0",
    "x@-1",
    "x@99999999999999999999",
    "x@1@2",
    "support",
    "tiny",
    "default",
    "a.b",
    "CON",
    "NaN",
    "1e999",
    "<|im_start|>",
    "<|im_end|>",
    "{{ 7*7 }}",
    "{% for x in range(99999999) %}{% endfor %}",
];

pub fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(NASTY).prop_map(str::to_owned),
        2 => prop::collection::vec(prop::sample::select(NASTY), 1..4).prop_map(|v| v.concat()),
        2 => ".{0,24}",
        1 => (prop::sample::select(&["a", "..", "/", "\u{430}"][..]), 60usize..300)
            .prop_map(|(s, n)| s.repeat(n)),
    ]
}

const EDGE_INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    8,
    16,
    20,
    21,
    64,
    65,
    255,
    256,
    4096,
    4097,
    i32::MAX as i64,
    u32::MAX as i64,
    i64::MAX,
    i64::MIN,
];

/// Numbers around the edges of every type a field might be read as.
pub fn nasty_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(EDGE_INTS).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::sample::select(
            &[0.0f64, -0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -1.0, 1e-300, 1e300, 3.4e38, 3.5e38][..]
        )
        .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
    ]
}

/// Arbitrary JSON, a few levels deep, with the values above at the leaves.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        nasty_number(),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((nasty_string(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An object whose keys come mostly from `fields` (so decoding gets past unknown-field checks
/// and into the handler) and whose values are arbitrary or plausible.
pub fn object_with(
    fields: &'static [&'static str],
    plausible: impl Strategy<Value = Value> + Clone + 'static,
) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        9 => prop::sample::select(fields).prop_map(str::to_owned),
        1 => nasty_string(),
    ];
    let value = prop_oneof![2 => plausible, 1 => json_value()];
    prop::collection::vec((key, value), 0..7).prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// `depth` nested arrays around `inner`: `[[[…inner…]]]`.
pub fn nested_arrays(depth: usize, inner: &str) -> String {
    let mut s = String::with_capacity(depth * 2 + inner.len());
    s.extend(std::iter::repeat_n('[', depth));
    s.push_str(inner);
    s.extend(std::iter::repeat_n(']', depth));
    s
}

/// `depth` nested objects: `{"a":{"a":…}}`.
pub fn nested_objects(depth: usize) -> String {
    let mut s = "{\"a\":".repeat(depth);
    s.push('1');
    s.extend(std::iter::repeat_n('}', depth));
    s
}
