//! Structured output through the API (`response_format` `json_schema`): sampled text stays a
//! prefix of a value valid under the schema, ends as soon as the value is complete, and
//! schemas the checker cannot enforce are refused with a 422 naming the place.

use std::sync::Arc;

use adapterd::engine::json_schema::{Schema, SchemaPrefix};
use serde_json::{json, Value};

use crate::helpers::{error_code, spawn_app, sse_data};

fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer"},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
            "note": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}
        },
        "required": ["name", "age", "note"],
        "additionalProperties": false
    })
}

fn format(schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}})
}

fn is_prefix(schema: &Value, text: &str) -> SchemaPrefix {
    let mut p = SchemaPrefix::new(Arc::new(Schema::compile(schema).unwrap()));
    assert!(
        p.push(text.as_bytes()),
        "not a prefix under the schema: {text:?}"
    );
    p
}

#[tokio::test]
async fn sampled_chat_replies_follow_the_schema_and_end_when_complete() {
    let app = spawn_app().await;
    let schema = person();
    let mut complete = 0;
    for seed in 1..=6 {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "a person"}],
            "max_tokens": 120, "temperature": 1, "seed": seed, "response_format": format(&schema)});
        let v: Value = app.post_json("/v1/chat/completions", &body).await;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let p = is_prefix(&schema, text);
        if v["choices"][0]["finish_reason"] == "stop" {
            complete += 1;
            assert!(p.is_complete(), "ended early: {text:?}");
            let person: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
            let keys: Vec<&str> = person.keys().map(String::as_str).collect();
            assert!(
                keys.starts_with(&["name", "age"]) && keys.last() == Some(&"note"),
                "{text}"
            );
            assert!(person["name"].as_str().unwrap().chars().count() <= 6);
            assert!(person["age"].is_i64() || person["age"].is_u64(), "{text}");
            assert!(
                person["note"].is_null() || person["note"].is_boolean(),
                "{text}"
            );
            if let Some(pets) = person.get("pets") {
                let pets = pets.as_array().unwrap();
                assert!(pets.len() <= 3 && pets.iter().all(|p| p == "cat" || p == "dog"));
            }
        } else {
            assert_eq!(v["choices"][0]["finish_reason"], "length");
            assert!(
                !p.is_complete(),
                "a complete value must end generation: {text:?}"
            );
        }
    }
    assert!(complete >= 3, "only {complete} of 6 replies completed");
}

#[tokio::test]
async fn a_top_level_enum_is_one_of_its_values_and_the_native_route_streams_it() {
    let app = spawn_app().await;
    let schema = json!({"enum": ["yes", "no", 42]});
    for seed in 1..=4 {
        let body = json!({"prompt": "answer", "max_new_tokens": 20, "temperature": 1,
            "seed": seed, "response_format": format(&schema)});
        let v: Value = app.post_json("/v1/generate", &body).await;
        let value: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
        assert!(
            ["yes", "no"].iter().any(|s| value == *s) || value == 42,
            "{v}"
        );
    }
    let body = json!({"prompt": "answer", "max_new_tokens": 80, "temperature": 0, "stream": true,
        "response_format": format(&json!({"type": "object", "properties": {"ok": {"const": true}},
            "required": ["ok"]}))});
    let raw = app.post_text("/v1/generate", &body).await;
    let events: Vec<Value> = sse_data(&raw)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, tokens) = events.split_last().unwrap();
    assert_eq!(last["finish_reason"], "eos", "{last}");
    let text: String = tokens.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(last["text"].as_str(), Some(text.as_str()));
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(value, json!({"ok": true}));
}

#[tokio::test]
async fn completions_take_the_same_response_format_as_vllm_does() {
    let app = spawn_app().await;
    let schema =
        json!({"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2});
    let body = json!({"model": "tiny", "prompt": ["two flags:", "one flag:"], "max_tokens": 60,
        "temperature": 1, "seed": 3, "response_format": format(&schema)});
    let v: Value = app.post_json("/v1/completions", &body).await;
    let choices = v["choices"].as_array().unwrap();
    assert!(choices.iter().any(|c| c["finish_reason"] == "stop"), "{v}");
    for c in choices {
        let text = c["text"].as_str().unwrap();
        let p = is_prefix(&schema, text);
        if c["finish_reason"] == "stop" {
            assert!(p.is_complete(), "{text:?}");
        }
    }
}

#[tokio::test]
async fn patterns_formats_and_bounds_hold_in_sampled_replies() {
    let app = spawn_app().await;
    let schema = json!({
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2}$"},
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "nights": {"type": "integer", "minimum": 1, "maximum": 14},
            "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 500},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": true}
        },
        "required": ["code", "day", "id", "nights", "price", "tags"]
    });
    let code = regex::Regex::new(r"^[A-Z]{3}-\d{2}$").unwrap();
    let mut complete = 0;
    for seed in 1..=4 {
        let body = json!({"prompt": "a record", "max_new_tokens": 200, "temperature": 1,
            "seed": seed, "response_format": format(&schema)});
        let v: Value = app.post_json("/v1/generate", &body).await;
        let text = v["text"].as_str().unwrap();
        let p = is_prefix(&schema, text);
        if v["finish_reason"] == "eos" {
            complete += 1;
            assert!(p.is_complete(), "{text:?}");
            let r: Value = serde_json::from_str(text).unwrap();
            assert!(code.is_match(r["code"].as_str().unwrap()), "{text}");
            let day: Vec<u32> = r["day"]
                .as_str()
                .unwrap()
                .split('-')
                .map(|x| x.parse().unwrap())
                .collect();
            assert!(day.len() == 3 && (1..=12).contains(&day[1]) && (1..=31).contains(&day[2]));
            let id = r["id"].as_str().unwrap();
            assert_eq!(id.len(), 36, "{id}");
            assert!(
                id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
                "{id}"
            );
            let nights = r["nights"].as_i64().unwrap();
            assert!((1..=14).contains(&nights), "{text}");
            let price = r["price"].as_f64().unwrap();
            assert!(price > 0.0 && price <= 500.0, "{text}");
            let tags = r["tags"].as_array().unwrap();
            for (i, t) in tags.iter().enumerate() {
                assert!(!tags[..i].contains(t), "a repeated tag: {text}");
            }
        }
    }
    assert!(complete >= 2, "only {complete} of 4 replies completed");
}

#[tokio::test]
async fn schemas_that_cannot_be_enforced_are_refused_naming_the_place() {
    let app = spawn_app().await;
    let chat = |format: Value| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
               "response_format": format})
    };
    for (format, words) in [
        (
            format(&json!({"type": "string", "pattern": "^(?=a)"})),
            "look-around",
        ),
        (
            format(&json!({"properties": {"when": {"type": "string", "format": "iri"}}})),
            "/properties/when/format",
        ),
        (
            format(&json!({"type": "array", "uniqueItems": true})),
            "`uniqueItems`",
        ),
        (
            format(&json!({"anyOf": [{"type": "string"}, {"enum": ["a"]}]})),
            "start differently",
        ),
        (format(&json!({"$ref": "#/$defs/nope"})), "/$ref"),
        (format(&json!({"required": ["a"], "properties": {}})), "`a`"),
        (json!({"type": "json_schema"}), "json_schema"),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            "schema` is required",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}),
            "name",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
            "strict",
        ),
        (json!({"type": "yaml"}), "response_format.type"),
    ] {
        let (code, msg) =
            error_code(app.post("/v1/chat/completions", &chat(format)).await, 422).await;
        assert_eq!(code, "invalid_value", "{msg}");
        assert!(
            msg.contains("response_format") && msg.contains(words),
            "{words}: {msg}"
        );
    }
    let body = json!({"prompt": "x", "ignore_eos": true, "response_format": format(&person())});
    let (_, msg) = error_code(app.post("/v1/generate", &body).await, 422).await;
    assert!(msg.contains("ignore_eos"), "{msg}");
}
