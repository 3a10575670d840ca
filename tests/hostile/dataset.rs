//! The dataset parser (`validate_jsonl`, `parse_jsonl`, `parse_values`) on arbitrary bytes and
//! JSON, and on deeply nested JSON (100k nested arrays): an error naming the line, never a
//! panic or a stack overflow.

use adapterd::engine::train::data::{
    parse_jsonl, parse_values, validate_jsonl, DatasetLimits, Method,
};
use proptest::prelude::*;
use serde_json::Value;

use crate::corpus;
use crate::strategies::{json_value, nasty_string, nested_arrays, nested_objects};

const LIMITS: DatasetLimits = DatasetLimits {
    max_records: 1000,
    max_bytes: 1 << 20,
};

fn all_parsers(bytes: &[u8]) {
    let _ = validate_jsonl(bytes, &LIMITS);
    for method in [Method::Sft, Method::Dpo] {
        let _ = parse_jsonl(bytes, method, &LIMITS);
    }
}

#[test]
fn corpus_datasets_are_refused_with_a_line() {
    for (file, bytes) in corpus::files("jsonl") {
        all_parsers(&bytes);
        let err = validate_jsonl(&bytes, &LIMITS).expect_err(&file);
        assert!(!err.to_string().is_empty(), "{file}");
    }
}

#[test]
fn a_hundred_thousand_nested_arrays_are_an_error_not_a_stack_overflow() {
    for deep in [
        nested_arrays(100_000, ""),
        format!("{{\"text\": {}}}", nested_arrays(100_000, "\"x\"")),
        nested_objects(100_000),
        format!("{{\"messages\": {}}}", nested_arrays(100_000, "{}")),
    ] {
        let bytes = format!("{{\"text\": \"ok\"}}\n{deep}\n");
        let err = validate_jsonl(bytes.as_bytes(), &LIMITS).expect_err("deep line refused");
        assert_eq!(err.line, 2, "{err}");
        for method in [Method::Sft, Method::Dpo] {
            let err = parse_jsonl(bytes.as_bytes(), method, &LIMITS).expect_err("refused");
            assert!(err.line <= 2, "{err}");
        }
    }
}

#[test]
fn inline_records_nested_as_deep_as_json_allows_are_refused() {
    // serde_json stops at 128 levels, so no deeper Value can come from a request.
    let v: Value = serde_json::from_str(&nested_arrays(120, "1")).expect("120 levels parse");
    let obj: Value = serde_json::from_str(&format!(
        "{{\"prompt\": {}, \"completion\": \"x\"}}",
        nested_arrays(120, "\"p\"")
    ))
    .expect("parses");
    for method in [Method::Sft, Method::Dpo] {
        assert!(parse_values(std::slice::from_ref(&v), method, &LIMITS).is_err());
        assert!(parse_values(std::slice::from_ref(&obj), method, &LIMITS).is_err());
    }
}

/// A record of plausible shape: the fields SFT and DPO read, with arbitrary values.
fn record() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(
        &[
            "prompt",
            "completion",
            "text",
            "messages",
            "chosen",
            "rejected",
            "input",
            "preferred_output",
            "non_preferred_output",
        ][..],
    );
    let message = (
        prop::sample::select(&["system", "user", "assistant", "tool", "", "USER"][..]),
        prop_oneof![nasty_string().prop_map(Value::from), json_value()],
    )
        .prop_map(|(role, content)| serde_json::json!({"role": role, "content": content}));
    let value = prop_oneof![
        nasty_string().prop_map(Value::from),
        prop::collection::vec(message, 0..4).prop_map(Value::Array),
        json_value(),
    ];
    prop::collection::vec((field, value), 0..5)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        all_parsers(&bytes);
    }

    #[test]
    fn arbitrary_lines_never_panic(lines in prop::collection::vec(
        prop_oneof![record(), json_value()], 0..8)) {
        let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
        all_parsers(text.as_bytes());
        for method in [Method::Sft, Method::Dpo] {
            let _ = parse_values(&lines, method, &LIMITS);
        }
    }
}
