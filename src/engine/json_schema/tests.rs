//! Tests for schema mode: what compiles, which texts are accepted, and — by random walks over
//! the accepted bytes — that the checker never leaves generation without a way on and that
//! every text it calls complete is valid JSON under the schema (a small reference validator
//! here, written from the JSON Schema spec for the supported subset).

use super::*;
use serde_json::{json, Value};

fn compile(schema: Value) -> Arc<Schema> {
    Arc::new(Schema::compile(&schema).unwrap_or_else(|e| panic!("{schema}: {e}")))
}

fn check(schema: &Arc<Schema>, text: &str) -> Option<SchemaPrefix> {
    let mut p = SchemaPrefix::new(schema.clone());
    // Byte by byte through `accepts` (the overlay) and `push` (the committed stack) alike.
    for b in text.bytes() {
        if !p.accepts(&[b]) {
            return None;
        }
        assert!(
            p.push(&[b]),
            "accepts and push disagree at {b:?} in {text:?}"
        );
    }
    assert!(p.accepts(b""));
    Some(p)
}

fn complete(schema: &Arc<Schema>, text: &str) -> bool {
    check(schema, text).is_some_and(|p| p.is_complete() || p.may_end())
}

fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer"},
            "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "ab"]}, "maxItems": 2},
            "role": {"const": "admin"}
        },
        "required": ["name", "age", "role"],
        "additionalProperties": false
    })
}

#[test]
fn objects_follow_the_schema_in_order() {
    let s = compile(person());
    for ok in [
        r#"{"name": "Ann", "age": 41, "role": "admin"}"#,
        r#"{"name":"Ann","age":-3,"nick":null,"tags":["ab","a"],"role":"admin"}"#,
        r#"{ "name" : "Bö", "age": 0, "nick": "x\"y", "tags": [], "role": "admin" } "#,
    ] {
        assert!(complete(&s, ok), "refused {ok}");
        serde_json::from_str::<Value>(ok).expect("serde agrees");
    }
    for bad in [
        r#"{"age": 41"#,                                // out of order
        r#"{"name": "Ann", "role""#,                    // skips required age
        r#"{"name": "Ann", "age": 4.5"#,                // integer
        r#"{"name": "", "#,                             // minLength
        r#"{"name": "123456789""#,                      // maxLength
        r#"{"name": "A", "age": 1, "role": "admin"}x"#, // trailing
        r#"{"name": "A", "age": 1, "role": "user""#,    // const
        r#"{"name": "A", "age": 1, "tags": ["c""#,      // enum
        r#"{"name": "A", "age": 1, "tags": ["a","b","#, // maxItems
        r#"{"name": "A", "age": 1, "extra""#,           // no additional properties
        r#"{"name": "A", "age": 1, "name""#,            // repeated key
        r#"{"name": "A", "age": 1}"#,                   // closes before required role
        r#"{"name": "A", "age": 1, "nick": 3"#,         // anyOf string|null
        r#"["#,
    ] {
        assert!(check(&s, bad).is_none(), "accepted {bad}");
    }
    // A key may stop at a declared name that is a prefix of another ("a" vs "ab").
    let s = compile(json!({"properties": {"a": {}, "ab": {}}}));
    assert!(complete(&s, r#"{"ab": 1}"#) && complete(&s, r#"{"a": [1, {"x": null}]}"#));
    assert!(check(&s, r#"{"abc"#).is_none());
}

#[test]
fn scalars_enums_and_unions() {
    let s = compile(json!({"enum": [1, 12, "x", [1, 2], {"k": true}, null]}));
    for ok in ["1", "12", "\"x\"", "[1,2]", "{\"k\":true}", "null"] {
        assert!(complete(&s, ok), "refused {ok}");
    }
    for bad in ["2", "123", "\"y\"", "[1, 2]", "nul "] {
        assert!(!complete(&s, bad), "accepted {bad}");
    }
    // The literal `1` may still become `12`: a whole value, not yet complete.
    let one = check(&s, "1").unwrap();
    assert!(one.may_end() && !one.is_complete());
    assert!(check(&s, "\"x\"").unwrap().is_complete());

    let s = compile(json!({"type": ["integer", "null", "boolean"]}));
    for ok in ["7", "null", "false", "-0"] {
        assert!(complete(&s, ok), "refused {ok}");
    }
    assert!(check(&s, "1.5").is_none() && check(&s, "\"a\"").is_none());
    // Integer or number: the number stands for both.
    let s = compile(json!({"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "null"}]}));
    assert!(complete(&s, "1.5") && complete(&s, "2") && complete(&s, "null"));
    assert!(Schema::compile(
        &json!({"anyOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]})
    )
    .is_err());
    let s = compile(json!({"type": "number"}));
    assert!(complete(&s, "-1.5e+3") && check(&s, "01").is_none());
    let s = compile(json!({"type": "string", "minLength": 2, "maxLength": 3}));
    assert!(complete(&s, r#""añ""#) && complete(&s, r#""\u00e9\n""#));
    assert!(check(&s, r#""a""#).is_none() && check(&s, r#""abcd"#).is_none());
}

#[test]
fn references_recurse_and_extra_keys_follow_their_schema() {
    let tree = compile(json!({
        "$ref": "#/$defs/node",
        "$defs": {"node": {
            "type": "object",
            "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["v"]
        }}
    }));
    assert!(complete(
        &tree,
        r#"{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}"#
    ));
    assert!(check(&tree, r#"{"v": 1, "kids": [{"kids""#).is_none());

    let s = compile(json!({
        "type": "object",
        "properties": {"id": {"type": "integer"}},
        "additionalProperties": {"type": "string"}
    }));
    assert!(complete(&s, r#"{"x": "1", "id": 2, "y\n": "z"}"#));
    assert!(
        check(&s, r#"{"x": 1"#).is_none(),
        "extra values follow additionalProperties"
    );
    assert!(
        check(&s, r#"{"id": 2, "id""#).is_none(),
        "a declared key is not extra"
    );
    // `{"type": "object"}` alone is any object, as JSON mode.
    let any = compile(json!({"type": "object"}));
    assert!(complete(&any, r#"{"a": [1, {"b": "c"}], "a": null}"#));
}

#[test]
fn property_counts_are_enforced_without_dead_ends() {
    // Exactly one of the keys: the shape tool calls are generated in.
    let one = compile(
        json!({"type": "object", "properties": {"call": {"type": "object"},
        "answer": {"type": "string"}}, "minProperties": 1, "maxProperties": 1}),
    );
    assert!(complete(&one, r#"{"call": {}}"#) && complete(&one, r#"{"answer": "x"}"#));
    for bad in [r#"{}"#, r#"{"call": {}, "#, r#"{"call": {}, "answer""#] {
        assert!(check(&one, bad).is_none(), "accepted {bad}");
    }
    // Two of three optional keys in order: skipping the first two leaves too few.
    let two = compile(json!({"properties": {"a": {}, "b": {}, "c": {}}, "minProperties": 2}));
    assert!(complete(&two, r#"{"b": 1, "c": 2}"#) && complete(&two, r#"{"a": 1, "c": 2}"#));
    assert!(check(&two, r#"{"c""#).is_none() && check(&two, r#"{"a": 1}"#).is_none());
    // At most one key, but `b` is required: `a` would leave no room for it.
    let room =
        compile(json!({"properties": {"a": {}, "b": {}}, "required": ["b"], "maxProperties": 1}));
    assert!(complete(&room, r#"{"b": 1}"#) && check(&room, r#"{"a""#).is_none());
    assert!(Schema::compile(&json!({"properties": {"a": {}}, "minProperties": 2})).is_err());
    assert!(Schema::compile(
        &json!({"properties": {"a": {}, "b": {}}, "required": ["a", "b"],
        "maxProperties": 1})
    )
    .is_err());
}

#[test]
fn unsupported_or_unsatisfiable_schemas_are_refused_by_place() {
    for (schema, at, words) in [
        (
            json!({"type": "string", "allOf": [{}]}),
            "/allOf",
            "only `allOf`",
        ),
        (
            json!({"type": "array", "uniqueItems": true}),
            "/uniqueItems",
            "`enum`",
        ),
        (
            json!({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": true, "minItems": 3}),
            "/uniqueItems",
            "exceeds",
        ),
        (
            json!({"type": "array", "uniqueItems": "yes"}),
            "/uniqueItems",
            "boolean",
        ),
        (
            json!({"properties": {"d": {"type": "string", "format": "iri"}}}),
            "/properties/d/format",
            "`iri` is not supported",
        ),
        (
            json!({"type": "string", "pattern": "^(?=a)"}),
            "/pattern",
            "look-around",
        ),
        (
            json!({"type": "string", "pattern": "(a)\\1"}),
            "/pattern",
            "backreferences",
        ),
        (
            json!({"type": "string", "pattern": "[a-"}),
            "/pattern",
            "not supported",
        ),
        (
            json!({"type": "string", "pattern": 3}),
            "/pattern",
            "must be a string",
        ),
        (
            json!({"type": "string", "pattern": "^a", "format": "date"}),
            "",
            "together",
        ),
        (
            json!({"type": "string", "pattern": "^(ab)*$", "minLength": 3, "maxLength": 3}),
            "/pattern",
            "no string within",
        ),
        (
            json!({"type": "string", "pattern": "^[a-z]{1,3}$", "minLength": 4}),
            "/pattern",
            "no string within",
        ),
        (
            json!({"type": "string", "pattern": "^[\\x00-\\x07]$"}),
            "/pattern",
            "matches no string",
        ),
        (
            json!({"type": "string", "pattern": "a{1000}b{1000}c{1000}"}),
            "/pattern",
            "too complex",
        ),
        (
            json!({"anyOf": [{"type": "string"}, {"enum": ["a"]}]}),
            "",
            "start differently",
        ),
        (
            json!({"type": "object", "required": ["x"], "properties": {}}),
            "/required",
            "`x`",
        ),
        (json!({"$ref": "#/$defs/missing"}), "/$ref", "names nothing"),
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
            "",
            "cycle",
        ),
        (json!({"enum": []}), "/enum", "empty"),
        (
            json!({"type": "array", "minItems": 3, "maxItems": 1}),
            "",
            "maxItems",
        ),
        (json!({"type": "strin"}), "/type", "unknown type"),
        (json!(false), "", "admits no value"),
        (json!(3), "", "must be an object"),
        (json!({"type": "integer", "enum": [1.5]}), "/enum", "`type`"),
        (
            json!({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}}}),
            "",
            "nested",
        ),
        (json!({"properties": {"a\"b": {}}}), "/properties", "quotes"),
    ] {
        let e = Schema::compile(&schema).expect_err(&schema.to_string());
        assert_eq!(e.at, at, "{schema}: {e}");
        assert!(e.message.contains(words), "{schema}: {e}");
    }
    let long = "a".repeat(MAX_PATTERN_BYTES + 1);
    let e = Schema::compile(&json!({"type": "string", "pattern": long})).unwrap_err();
    assert!(e.message.contains("at most"), "{e}");
    let many: serde_json::Map<String, Value> = (0..=MAX_PROPERTIES)
        .map(|i| (format!("p{i}"), json!({})))
        .collect();
    assert!(Schema::compile(&json!({"properties": many})).is_err());
}

#[test]
fn whitespace_is_bounded_and_depth_is_capped() {
    let any = compile(json!({"type": "array"}));
    let indent = " ".repeat(MAX_INDENT as usize);
    assert!(complete(&any, &format!("[\n{indent}1, 2,\n\t3 ]")));
    for bad in [
        format!("[\n{indent} "),
        "[  ".to_string(),
        "[\n\n".to_string(),
        " \n[".to_string(),
        "[\r".to_string(),
    ] {
        assert!(check(&any, &bad).is_none(), "accepted {bad:?}");
    }
    let deep = "[".repeat(MAX_DEPTH);
    assert!(check(&any, &deep).is_some() && check(&any, &format!("{deep}[")).is_none());
    let closed = format!("{deep}{}", "]".repeat(MAX_DEPTH));
    assert!(check(&any, &closed).unwrap().is_complete());
}

#[test]
fn number_parts_have_bounded_digits() {
    let s = compile(json!({"type": "array", "items": {"type": "number"}}));
    let sixteen = "1".repeat(MAX_DIGITS as usize);
    assert!(complete(
        &s,
        &format!("[-{sixteen}.{sixteen}e-123, {sixteen}]")
    ));
    for bad in [
        format!("[{sixteen}1"),
        format!("[0.{sixteen}1"),
        "[1e1234".to_string(),
    ] {
        assert!(check(&s, &bad).is_none(), "accepted {bad}");
    }
    let any = compile(json!({"type": "array"}));
    assert!(
        check(&any, &format!("[{sixteen}1")).is_none(),
        "any value is bounded too"
    );
}

#[test]
fn strings_and_keys_are_well_formed_utf8_counted_in_characters() {
    let s = compile(
        json!({"type": "object", "properties": {"é": {"type": "string", "maxLength": 2}},
        "additionalProperties": {"type": "string"}}),
    );
    let mut p = SchemaPrefix::new(s.clone());
    assert!(p.push("{\"é\": \"€".as_bytes()) && p.accepts("😀\"".as_bytes()));
    assert!(!p.accepts("😀x".as_bytes()), "maxLength counts characters");
    for bad in [
        &b"{\"\xc3\""[..],
        b"{\"x\": \"\x80",
        b"{\"\xe9\xff",
        b"{\"x\": \"\xe2\x82\"",
    ] {
        assert!(
            !SchemaPrefix::new(s.clone()).accepts(bad),
            "accepted {bad:?}"
        );
    }
}

#[test]
fn a_token_may_open_many_containers_and_the_overlay_matches_the_stack() {
    let any = compile(json!({"type": "array"}));
    let mut p = SchemaPrefix::new(any);
    assert!(p.push(b"[[[{\"a\": [1"));
    // Closing below the committed stack and opening past it within one candidate.
    // (the outer array's frame, copied for its item count, and seven opened: OVERLAY frames)
    assert!(p.accepts(b"]}]],[[[[[{\"b\":["));
    // A token needing more is left to shorter ones.
    assert!(!p.accepts(b"]}]],[[[[[[{\"b\":["));
    assert!(!p.accepts(b"]}]]]]"));
    assert!(p.accepts(b"]}]]]") && !p.is_complete());
}

/// The supported subset, validated from the spec (not from the checker's code).
fn valid(schema: &Value, root: &Value, v: &Value) -> bool {
    let Some(s) = schema.as_object() else {
        return schema == &json!(true);
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return valid(root.pointer(&r[1..]).unwrap(), root, v);
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        return all.iter().all(|a| valid(a, root, v));
    }
    if let Some(alts) = s.get("anyOf").and_then(Value::as_array) {
        return alts.iter().any(|a| valid(a, root, v));
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.contains(v);
    }
    if let Some(c) = s.get("const") {
        return c == v;
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let is = |t: &str| types.is_empty() || types.contains(&t);
    let n = |k: &str| s.get(k).and_then(Value::as_u64);
    match v {
        Value::Null => is("null"),
        Value::Bool(_) => is("boolean"),
        // serde_json reads `-0` as a float.
        Value::Number(x) => {
            // Compared as floats, as Pydantic and Python's `jsonschema` compare them.
            let f = x.as_f64().unwrap();
            let bound = |k: &str| s.get(k).and_then(Value::as_f64);
            (is("number") || (is("integer") && f.fract() == 0.0))
                && bound("minimum").is_none_or(|m| f >= m)
                && bound("maximum").is_none_or(|m| f <= m)
                && bound("exclusiveMinimum").is_none_or(|m| f > m)
                && bound("exclusiveMaximum").is_none_or(|m| f < m)
                && bound("multipleOf").is_none_or(|m| {
                    let k = (f / m).round();
                    (k * m - f).abs() <= 1e-9 * f.abs().max(1.0)
                })
        }
        Value::String(t) => {
            let len = t.chars().count() as u64;
            is("string")
                && n("minLength").is_none_or(|m| len >= m)
                && n("maxLength").is_none_or(|m| len <= m)
        }
        Value::Array(items) => {
            let (prefix, rest) = match s.get("items") {
                Some(Value::Array(p)) => (p.clone(), s.get("additionalItems")),
                _ => (
                    s.get("prefixItems")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                    s.get("items"),
                ),
            };
            let rest = rest.cloned().unwrap_or(json!(true));
            let unique = s.get("uniqueItems") == Some(&json!(true));
            is("array")
                && (!unique
                    || items
                        .iter()
                        .enumerate()
                        .all(|(i, x)| !items[..i].contains(x)))
                && n("minItems").is_none_or(|m| items.len() as u64 >= m)
                && n("maxItems").is_none_or(|m| items.len() as u64 <= m)
                && items.iter().enumerate().all(|(i, x)| match prefix.get(i) {
                    Some(p) => valid(p, root, x),
                    None => rest != json!(false) && valid(&rest, root, x),
                })
        }
        Value::Object(o) => {
            let props = s.get("properties").and_then(Value::as_object);
            let required = s
                .get("required")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let extra = s
                .get("additionalProperties")
                .cloned()
                .unwrap_or(json!(props.is_none()));
            is("object")
                && n("minProperties").is_none_or(|m| o.len() as u64 >= m)
                && n("maxProperties").is_none_or(|m| o.len() as u64 <= m)
                && required.iter().all(|r| o.contains_key(r.as_str().unwrap()))
                && o.iter().all(|(k, x)| match props.and_then(|p| p.get(k)) {
                    Some(p) => valid(p, root, x),
                    None => extra != json!(false) && valid(&extra, root, x),
                })
        }
    }
}

fn schemas_bounded(schemas: &mut Vec<Value>) {
    let array = |items: Value| json!({"type": "array", "items": items, "minItems": 1});
    schemas.extend([
        array(json!({"type": "number", "minimum": -1.5, "exclusiveMaximum": 2.25})),
        array(json!({"type": "integer", "minimum": 3, "maximum": 1000})),
        array(json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.001})),
        array(json!({"type": "integer", "minimum": -7, "maximum": -7})),
        array(json!({"type": ["integer", "null"], "exclusiveMinimum": -3.5})),
        json!({"type": "number", "minimum": 0.1, "maximum": 0.3}),
        array(json!({"type": "number", "multipleOf": 0.05, "minimum": -1, "maximum": 2})),
        array(json!({"type": "integer", "multipleOf": 7, "exclusiveMinimum": 10})),
        json!({"type": "array", "items": {"enum": ["x", "y", 1, 12, true]}, "uniqueItems": true, "minItems": 1}),
        // Tuples, both spellings.
        json!({"type": "array", "prefixItems": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 3}, {"type": "boolean"}], "minItems": 2, "items": {"type": "null"}, "maxItems": 5}),
        json!({"type": "array", "items": [{"enum": ["a", "b"]}, {"type": "array", "items": {"type": "integer"}}], "additionalItems": false}),
        json!({"allOf": [{"$ref": "#/$defs/p"}], "description": "wrapped", "$defs": {"p": {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]}}}),
    ]);
}

#[test]
fn unique_items_over_an_enum_never_repeat_a_literal() {
    let s =
        compile(json!({"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": true}));
    assert!(complete(&s, r#"["a", "b"]"#) && complete(&s, r#"["c","a","b"]"#));
    assert!(check(&s, r#"["a", "a"#).is_none());
    assert!(
        check(&s, r#"["a","b","c","#).is_none(),
        "no literal is left"
    );
    // A used literal that begins an unused one: the longer one may still come.
    let s = compile(json!({"type": "array", "items": {"enum": [1, 12]}, "uniqueItems": true}));
    assert!(complete(&s, "[1,12]") && complete(&s, "[12,1]"));
    assert!(check(&s, "[1,1]").is_none() && check(&s, "[1,1").is_some());
    // Pydantic's Set[SomeEnum]: the enum sits behind a reference.
    let s = compile(
        json!({"type": "array", "items": {"$ref": "#/$defs/C"}, "uniqueItems": true,
        "$defs": {"C": {"enum": ["r", "g"]}}}),
    );
    assert!(complete(&s, r#"["g", "r"]"#) && check(&s, r#"["g", "g""#).is_none());
}

#[test]
fn tuples_give_each_place_its_schema() {
    let s = compile(
        json!({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
        "minItems": 2, "maxItems": 2}),
    );
    assert!(complete(&s, r#"[1, "a"]"#));
    assert!(check(&s, r#"["a""#).is_none() && check(&s, "[1, 2").is_none());
    assert!(check(&s, "[1]").is_none() && check(&s, r#"[1, "a","#).is_none());
    // The rest follow `items`; `items: false` (or `additionalItems: false`) ends the tuple.
    let s = compile(
        json!({"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "null"}}),
    );
    assert!(complete(&s, "[true, null, null]") && complete(&s, "[]"));
    assert!(check(&s, "[true, 1").is_none());
    let s =
        compile(json!({"type": "array", "items": [{"type": "boolean"}], "additionalItems": false}));
    assert!(complete(&s, "[true]") && check(&s, "[true,").is_none());
    let e = Schema::compile(
        &json!({"type": "array", "prefixItems": [{}], "items": false, "minItems": 2}),
    )
    .unwrap_err();
    assert!(e.message.contains("minItems"), "{e}");
    // A later tuple place too deep for what is left is not offered by the comma before it.
    let s = compile(
        json!({"type": "array", "prefixItems": [{"$ref": "#"}, {"type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object"}},
        "required": ["b"]}}, "required": ["a"]}]}),
    );
    let inner = "[".repeat(MAX_DEPTH - 2) + "[]";
    let p = check(&s, &inner).expect("62 open arrays and an empty one");
    assert!(!p.accepts(b","), "three more levels do not fit at depth 62");
    let p = check(&s, &(inner + "]")).expect("back at depth 61");
    assert!(p.accepts(b",{\"a\":{\"b\":{}}}"));
    // `allOf` of one schema is that schema; of more, refused.
    let s = compile(json!({"allOf": [{"type": "integer"}], "title": "n"}));
    assert!(complete(&s, "3") && check(&s, "\"").is_none());
    for bad in [
        json!({"allOf": [{}, {}]}),
        json!({"allOf": [{}], "type": "integer"}),
    ] {
        let e = Schema::compile(&bad).unwrap_err();
        assert_eq!(e.at, "/allOf", "{e}");
    }
}

#[test]
fn bounded_numbers_stay_in_range_without_dead_ends() {
    let s = compile(json!({"type": "integer", "minimum": 1, "maximum": 10}));
    for (text, whole) in [
        ("1", true),
        ("7", true),
        ("10", true),
        ("0", false),
        ("11", false),
        ("100", false),
        ("-", false),
        ("1.", false),
        ("1e1", false),
    ] {
        assert_eq!(complete(&s, text), whole, "{text}");
    }
    assert!(check(&s, "0").is_none() && check(&s, "-").is_none() && check(&s, "11").is_none());
    assert!(check(&s, "1").is_some_and(|p| p.may_end() && p.accepts(b"0")));

    let s = compile(json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1}));
    let p = check(&s, "0").expect("0.x is still possible");
    assert!(!p.may_end());
    assert!(complete(&s, "0.5") && complete(&s, "1") && complete(&s, "1.0"));
    assert!(check(&s, "1.5").is_none() && check(&s, "2").is_none() && check(&s, "-").is_none());
    assert!(check(&s, "0.0").is_some() && !complete(&s, "0.000"));

    // The bound as written (0.1), not its binary value.
    let s = compile(json!({"type": "number", "minimum": 0.1}));
    assert!(complete(&s, "0.1") && complete(&s, "0.10") && complete(&s, "3"));
    assert!(check(&s, "0.09").is_none());

    let s = compile(json!({"type": "integer", "minimum": -5, "maximum": -2}));
    assert!(complete(&s, "-3") && complete(&s, "-5"));
    assert!(check(&s, "-1").is_none() && check(&s, "-10").is_none() && check(&s, "3").is_none());

    // At most 15 digits: a float reading of the text agrees with the decimal comparison.
    let s = compile(json!({"type": "number", "exclusiveMinimum": 1}));
    assert!(check(&s, "1.00000000000001").is_some());
    assert!(check(&s, "1.000000000000001").is_none());
    assert!(check(&s, "1234567890123456").is_none());

    let s = compile(json!({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 22}));
    assert!(complete(&s, "5") && complete(&s, "10") && complete(&s, "20"));
    assert!(check(&s, "1").is_some() && check(&s, "12").is_none() && check(&s, "3").is_none());
    let s = compile(json!({"type": "number", "multipleOf": 0.25}));
    assert!(complete(&s, "1.25") && complete(&s, "-0.5") && complete(&s, "3"));
    assert!(check(&s, "1.3").is_none() && !complete(&s, "1.2"));
    let s = compile(json!({"type": "integer", "multipleOf": 0.1}));
    assert!(complete(&s, "7"));

    for (schema, at, words) in [
        (
            json!({"type": "integer", "minimum": 0.5, "maximum": 0.7}),
            "",
            "no integer",
        ),
        (
            json!({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}),
            "",
            "no number",
        ),
        (
            json!({"type": "number", "exclusiveMinimum": true}),
            "/exclusiveMinimum",
            "must be a number",
        ),
        (json!({"enum": [1, 2], "minimum": 2}), "", "`minimum`"),
        (
            json!({"type": "integer", "multipleOf": 0}),
            "/multipleOf",
            "positive",
        ),
        (
            json!({"type": "number", "multipleOf": 1e-20}),
            "/multipleOf",
            "decimals",
        ),
        (
            json!({"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 6}),
            "",
            "multiple",
        ),
    ] {
        let e = Schema::compile(&schema).expect_err(&schema.to_string());
        assert_eq!(e.at, at, "{schema}: {e}");
        assert!(e.message.contains(words), "{schema}: {e}");
    }
}

#[test]
fn random_walks_never_dead_end_and_complete_texts_are_valid() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut schemas = vec![
        person(),
        json!({"type": "array", "items": {"type": ["number", "string", "null"]}, "minItems": 1, "maxItems": 3}),
        json!({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object",
            "properties": {"v": {"enum": [1, 12, true]}, "k": {"type": "array", "items": {"$ref": "#/$defs/n"}, "maxItems": 2}},
            "required": ["v"], "additionalProperties": false}}}),
        json!({"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": {"type": "integer"}}),
        json!({"type": "object"}),
        json!({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "boolean"},
            "c": {"type": "integer"}}, "required": ["c"], "minProperties": 2, "maxProperties": 2,
            "additionalProperties": {"type": "null"}}),
        json!({"type": "object", "properties": {"tool_call": {"type": "object", "properties": {
            "f": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
            "g": {"type": "object"}}, "minProperties": 1, "maxProperties": 1},
            "response": {"type": "string", "maxLength": 5}}, "minProperties": 1, "maxProperties": 1}),
    ];
    schemas_bounded(&mut schemas);
    let alphabet: Vec<u8> =
        b" \n\t_\"{}[],:0123456789-.eE+truefalsnlxyzaAbgimkvrodptc\\u\xc3\xa9\xe2\x82\xac".to_vec();
    let mut rng = StdRng::seed_from_u64(7);
    for schema_value in schemas {
        let schema = compile(schema_value.clone());
        let mut completed = 0;
        for _ in 0..300 {
            let mut p = SchemaPrefix::new(schema.clone());
            let mut text = Vec::new();
            for step in 0..400 {
                if p.is_complete() {
                    break;
                }
                let options: Vec<u8> = alphabet
                    .iter()
                    .copied()
                    .filter(|&b| p.accepts(&[b]))
                    .collect();
                assert!(
                    !options.is_empty() || p.may_end(),
                    "dead end after {:?}",
                    String::from_utf8_lossy(&text)
                );
                if options.is_empty() || (p.may_end() && rng.random_bool(0.3)) {
                    break;
                }
                // Past halfway, prefer bytes that close things, so walks finish.
                let closing: Vec<u8> = options
                    .iter()
                    .copied()
                    .filter(|b| b"\"}]".contains(b))
                    .collect();
                let pool = if step > 200 && !closing.is_empty() {
                    &closing
                } else {
                    &options
                };
                let b = pool[rng.random_range(0..pool.len())];
                assert!(p.push(&[b]));
                text.push(b);
            }
            if p.is_complete() || p.may_end() {
                completed += 1;
                let v: Value = match serde_json::from_slice(&text) {
                    Ok(v) => v,
                    // Valid JSON that serde will not hold as an f64 (`4e691`).
                    Err(e) if e.to_string().starts_with("number out of range") => continue,
                    Err(e) => panic!("{e}: {:?}", String::from_utf8_lossy(&text)),
                };
                assert!(
                    valid(&schema_value, &schema_value, &v),
                    "{schema_value} refuses {v}"
                );
            }
        }
        assert!(
            completed > 30,
            "{schema_value}: only {completed} walks completed"
        );
    }
}

#[test]
fn patterns_match_anywhere_unless_anchored() {
    let s = compile(json!({"type": "string", "pattern": "^[a-z]{2,3}-\\d+$"}));
    assert!(complete(&s, r#""ab-1""#));
    assert!(complete(&s, r#""abc-2024""#));
    assert!(check(&s, r#""a-"#).is_none());
    assert!(check(&s, r#""abcd"#).is_none());
    assert!(check(&s, r#""ab-""#).is_none());
    // ECMA `\d` is ASCII: an Arabic-Indic digit is refused.
    assert!(check(&s, "\"ab-\u{0661}").is_none());

    let s = compile(json!({"type": "string", "pattern": "cat"}));
    assert!(complete(&s, r#""a cat!""#));
    assert!(complete(&s, r#""cat""#));
    assert!(check(&s, r#""dog""#).is_none());
    // `.` does not match a line break (ECMA), `\b` is a word boundary.
    let s = compile(json!({"type": "string", "pattern": "^a.c\\b"}));
    assert!(complete(&s, r#""abc d""#));
    assert!(check(&s, r#""a\nc""#).is_none());
    assert!(check(&s, r#""abcd""#).is_none());
}

#[test]
fn patterned_strings_take_short_escapes_and_utf8_but_no_unicode_escapes() {
    let s = compile(json!({"type": "string", "pattern": "^a\"b\\\\c\\nd/é+$"}));
    assert!(complete(&s, r#""a\"b\\c\nd\/éé""#));
    assert!(complete(&s, "\"a\\\"b\\\\c\\nd/é\""));
    assert!(check(&s, r#""a\u0022"#).is_none());
    // A backslash is offered only where some escape's character may come.
    let s = compile(json!({"type": "string", "pattern": "^[a-z]*$"}));
    assert!(check(&s, r#""ab\"#).is_none());
    assert!(complete(&s, r#""""#));
    // A half-written character is followed only by its continuation bytes.
    let s = compile(json!({"type": "string", "pattern": "^é€$"}));
    let p = check(&s, "\"\u{e9}").expect("é");
    assert!(!p.accepts(b"\"") && p.accepts("€".as_bytes()));
    assert!(!p.accepts(&[0xe2, 0x82]) || p.accepts(&[0xe2, 0x82, 0xac]));
}

#[test]
fn patterns_respect_length_bounds_without_dead_ends() {
    // maxLength: a character is offered only if the match can still end in time.
    let s = compile(json!({"type": "string", "pattern": "^a+b$", "maxLength": 3}));
    assert!(complete(&s, r#""aab""#));
    assert!(check(&s, r#""aaa"#).is_none());
    // minLength: the string may not close early, and only lengths that can still match in
    // range are offered (`(ab)*` has even lengths; 3..=5 leaves 4).
    let s =
        compile(json!({"type": "string", "pattern": "^(ab)*$", "minLength": 3, "maxLength": 5}));
    assert!(check(&s, r#""ab""#).is_none());
    assert!(complete(&s, r#""abab""#));
    assert!(check(&s, r#""ababa"#).is_none());
    // Characters count, not bytes: é is one.
    let s = compile(json!({"type": "string", "pattern": "^.*$", "minLength": 2, "maxLength": 2}));
    assert!(complete(&s, "\"éé\""));
    assert!(check(&s, "\"é\"").is_none());
    assert!(check(&s, "\"ééé").is_none());
}

#[test]
fn formats_generate_their_shapes() {
    let cases = [
        ("date", "2024-02-29", "2024-13-01"),
        ("date", "2000-02-29", "2023-02-29"),
        ("date", "2023-04-30", "2023-04-31"),
        ("date", "0001-01-01", "0000-01-01"),
        ("date", "2024-12-31", "1900-02-29"),
        ("duration", "P1DT2H30M", "P"),
        ("duration", "PT0.5S", "P1DT"),
        ("ipv6", "fe80::1", "fe80:::1"),
        ("ipv6", "2001:db8:0:0:0:0:2:1", "2001:db8::2::1"),
        ("time", "23:59:60Z", "24:00:00Z"),
        (
            "date-time",
            "2024-02-29T10:20:30.5+02:00",
            "2024-02-29 10:20:30Z",
        ),
        (
            "uuid",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950",
        ),
        ("email", "ann.lee+x@mail.example.org", "ann@localhost"),
        ("hostname", "a-1.example.com", "-a.example.com"),
        ("ipv4", "192.168.0.255", "192.168.0.256"),
        (
            "uri",
            "https://example.com:8080/a/b?q=1#top",
            "ftp://example.com",
        ),
    ];
    for (format, good, bad) in cases {
        let s = compile(json!({"type": "string", "format": format}));
        let good_ok = complete(&s, &format!("\"{good}\""));
        let bad_ok = complete(&s, &format!("\"{bad}\""));
        if format == "time" {
            // A leap second is valid RFC 3339 but not generated (a subset is always valid).
            assert!(!good_ok && complete(&s, "\"23:59:59Z\""), "{format}");
        } else {
            assert!(good_ok, "{format}: {good}");
        }
        assert!(!bad_ok, "{format}: {bad}");
    }
    // A format shared by many properties compiles once.
    let props: serde_json::Map<String, Value> = (0..64)
        .map(|i| {
            (
                format!("d{i}"),
                json!({"type": "string", "format": "date-time"}),
            )
        })
        .collect();
    compile(json!({"type": "object", "properties": props}));
}

/// `format`, checked by code written from the RFCs (std's address parser for IPv4).
fn format_valid(format: &str, t: &str) -> bool {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let date = |d: &str| {
        let p: Vec<&str> = d.split('-').collect();
        if !(p.len() == 3 && digits(p[0], 4) && digits(p[1], 2) && digits(p[2], 2)) {
            return false;
        }
        let [y, m, d] = [0, 1, 2].map(|i| p[i].parse::<u32>().unwrap());
        let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let days = match m {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => 0,
        };
        y >= 1 && (1..=days).contains(&d)
    };
    // ISO 8601: P, then date parts in the order Y M D (or weeks alone), then T and H M S in
    // order; at least one part, a T followed by one, a fraction only on the seconds.
    let duration = |t: &str| {
        let Some(rest) = t.strip_prefix('P') else {
            return false;
        };
        let (date, time) = rest.split_once('T').unwrap_or((rest, ""));
        let parts = |s: &str, units: &str| -> Option<usize> {
            let (mut n, mut at, mut s) = (0, 0, s);
            while !s.is_empty() {
                let end = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
                let (num, unit) = (&s[..end], s[end..].chars().next()?);
                let pos = units[at..].find(unit)? + at;
                let fraction_ok = !num.contains('.') || unit == 'S';
                if num.is_empty() || num.starts_with('.') || num.ends_with('.') || !fraction_ok {
                    return None;
                }
                (n, at, s) = (n + 1, pos + 1, &s[end + 1..]);
            }
            Some(n)
        };
        let weeks = date.ends_with('W');
        let date_units = if weeks { "W" } else { "YMD" };
        match (parts(date, date_units), parts(time, "HMS")) {
            (Some(d), Some(h)) => {
                d + h > 0 && (!t.contains('T') || h > 0) && !(weeks && t.contains('T'))
            }
            _ => false,
        }
    };
    let time = |t: &str| {
        let (clock, zone) = match t.find(['Z', '+', '-']) {
            Some(i) => t.split_at(i),
            None => return false,
        };
        let (hms, frac) = clock.split_once('.').unwrap_or((clock, "0"));
        let p: Vec<&str> = hms.split(':').collect();
        let zone_ok = zone == "Z" || {
            let z: Vec<&str> = zone[1..].split(':').collect();
            z.len() == 2
                && digits(z[0], 2)
                && digits(z[1], 2)
                && z[0].parse::<u32>().unwrap() < 24
                && z[1].parse::<u32>().unwrap() < 60
        };
        p.len() == 3
            && p.iter().all(|x| digits(x, 2))
            && p[0].parse::<u32>().unwrap() < 24
            && p[1].parse::<u32>().unwrap() < 60
            && p[2].parse::<u32>().unwrap() <= 60
            && !frac.is_empty()
            && frac.bytes().all(|b| b.is_ascii_digit())
            && zone_ok
    };
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    match format {
        "date" => date(t),
        "time" => time(t),
        "date-time" => t.split_once('T').is_some_and(|(d, c)| date(d) && time(c)),
        "uuid" => {
            let p: Vec<&str> = t.split('-').collect();
            p.iter().map(|x| x.len()).eq([8, 4, 4, 4, 12])
                && p.iter().all(|x| x.bytes().all(|b| b.is_ascii_hexdigit()))
        }
        "email" => t.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !local.starts_with('.')
                && !local.ends_with('.')
                && !local.contains("..")
                && domain.contains('.')
                && domain.split('.').all(label)
        }),
        "hostname" => t.split('.').all(label),
        "ipv4" => t.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => t.parse::<std::net::Ipv6Addr>().is_ok(),
        "duration" => duration(t),
        "uri" => {
            let rest = t.strip_prefix("https://").or(t.strip_prefix("http://"));
            rest.is_some_and(|r| {
                let host = r.split(['/', '?', '#', ':']).next().unwrap_or("");
                host.split('.').all(label) && !r.contains(' ')
            })
        }
        _ => false,
    }
}

#[test]
fn random_walks_under_patterns_never_dead_end_and_match() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let patterns = [
        ("^[a-z]{2,3}-\\d+$", None, None),
        ("^(ab|c)+x?$", Some(2), Some(7)),
        ("[0-9]", None, Some(4)),
        ("^\\w+@\\w+\\.(com|org)$", None, Some(20)),
        ("^(é|€|x)*$", Some(3), None),
        ("^[^\"\\\\]*\"[^\"]*$", None, Some(6)),
    ];
    let formats = [
        "date",
        "time",
        "date-time",
        "duration",
        "uuid",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uri",
    ];
    let mut schemas: Vec<(Value, Option<regex::Regex>, Option<&str>)> = Vec::new();
    for (p, min, max) in patterns {
        let mut s = json!({"type": "string", "pattern": p});
        if let Some(m) = min {
            s["minLength"] = json!(m);
        }
        if let Some(m) = max {
            s["maxLength"] = json!(m);
        }
        schemas.push((s, Some(regex::Regex::new(p).unwrap()), None));
    }
    for f in formats {
        schemas.push((json!({"type": "string", "format": f}), None, Some(f)));
    }
    let mut rng = StdRng::seed_from_u64(11);
    for (schema_value, re, format) in schemas {
        let schema = compile(schema_value.clone());
        let mut completed = 0;
        for _ in 0..60 {
            let mut p = SchemaPrefix::new(schema.clone());
            let mut text = Vec::new();
            for step in 0..300 {
                if p.is_complete() {
                    break;
                }
                let options: Vec<u8> = (0..=255u8).filter(|&b| p.accepts(&[b])).collect();
                assert!(
                    !options.is_empty(),
                    "{schema_value}: dead end after {:?}",
                    String::from_utf8_lossy(&text)
                );
                // Later on, close the string when it may close, and favour punctuation (an
                // address's dot, a time's colon), which moves formats toward their end.
                let punctuation: Vec<u8> = options
                    .iter()
                    .copied()
                    .filter(|b| b.is_ascii_punctuation() && *b != b'\\')
                    .collect();
                let b = if step > 40 && options.contains(&b'"') && text.len() > 1 {
                    b'"'
                } else if step > 40 && !punctuation.is_empty() && rng.random_bool(0.5) {
                    punctuation[rng.random_range(0..punctuation.len())]
                } else {
                    options[rng.random_range(0..options.len())]
                };
                assert!(p.push(&[b]));
                text.push(b);
            }
            assert!(
                p.is_complete(),
                "{schema_value}: ran on: {:?}",
                String::from_utf8_lossy(&text)
            );
            completed += 1;
            let v: Value = serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&text)));
            assert!(
                valid(&schema_value, &schema_value, &v),
                "{schema_value} refuses {v}"
            );
            let t = v.as_str().unwrap();
            if let Some(re) = &re {
                assert!(re.is_match(t), "{schema_value}: {t:?}");
            }
            if let Some(f) = format {
                assert!(format_valid(f, t), "{f}: {t:?}");
            }
        }
        assert_eq!(completed, 60);
    }
}

mod hostile {
    //! Whatever a client writes as a pattern or a bound compiles or is refused, never panics,
    //! and what compiles has a first byte to offer.
    use super::*;
    use proptest::prelude::*;

    fn offers_something(schema: Schema) {
        let p = SchemaPrefix::new(Arc::new(schema));
        assert!((0..=255u8).any(|b| p.accepts(&[b])));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_pattern(pattern in r"[\PC\\^$.*+?()\[\]{}|dwsbDWSB0-9,-]{0,24}", min in 0u32..5,
                       max in proptest::option::of(0u32..40)) {
            let mut s = json!({"type": "string", "pattern": pattern, "minLength": min});
            if let Some(m) = max {
                s["maxLength"] = json!(m);
            }
            if let Ok(schema) = Schema::compile(&s) {
                offers_something(schema);
            }
        }

        #[test]
        fn any_bounds(integer in any::<bool>(),
                      keys in proptest::collection::vec(
                          (prop::sample::select(&["minimum", "maximum", "exclusiveMinimum",
                              "exclusiveMaximum", "multipleOf"][..]),
                           prop_oneof![any::<f64>().prop_map(|f| json!(f)),
                                       any::<i64>().prop_map(|i| json!(i)),
                                       (-1000i64..1000).prop_map(|i| json!(i as f64 / 8.0))]),
                          0..4)) {
            let mut s = json!({"type": if integer { "integer" } else { "number" }});
            for (k, v) in keys {
                s[k] = v;
            }
            if let Ok(schema) = Schema::compile(&s) {
                offers_something(schema);
            }
        }
    }
}
