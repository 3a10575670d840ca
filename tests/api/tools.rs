//! Tool calling through the chat route: calls come back as OpenAI's `tool_calls` whose
//! arguments parse and follow the tool's parameters, streamed or not; the model may answer
//! instead only when `tool_choice` allows it; earlier calls and their results can be sent
//! back; bad tools are refused naming the field.

use serde_json::{json, Value};

use crate::helpers::{error_code, openai_chunks, spawn_long_context_app_with, TestApp};

/// The tool descriptions alone outgrow the tiny model's 256-token context.
async fn spawn_app() -> TestApp {
    spawn_long_context_app_with(|_| {}).await
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "now"}}
    ])
}

fn chat(choice: Value, seed: u64) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "weather in Oslo?"}],
        "tools": tools(), "tool_choice": choice, "max_tokens": 120, "temperature": 1, "seed": seed})
}

/// Checks one call against `tools()`; returns its name.
fn check_call(call: &Value) -> String {
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["type"], "function");
    let name = call["function"]["name"].as_str().unwrap().to_owned();
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match name.as_str() {
        "get_weather" => {
            let args = args.as_object().unwrap();
            assert_eq!(args.keys().collect::<Vec<_>>(), ["city", "unit"], "{call}");
            assert!(args["city"].as_str().unwrap().chars().count() <= 8);
            assert!(args["unit"] == "c" || args["unit"] == "f");
        }
        "now" => assert_eq!(args, json!({})),
        other => panic!("unknown tool {other}"),
    }
    name
}

#[tokio::test]
async fn a_named_or_required_tool_choice_always_calls() {
    let app = spawn_app().await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let mut called = 0;
    for (choice, seed) in [
        (named.clone(), 1),
        (named, 2),
        (json!("required"), 3),
        (json!("required"), 4),
    ] {
        let v = app
            .post_json("/v1/chat/completions", &chat(choice.clone(), seed))
            .await;
        let c = &v["choices"][0];
        if c["finish_reason"] == "length" {
            continue; // cut mid-call: the raw text, no call
        }
        called += 1;
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let name = check_call(&c["message"]["tool_calls"][0]);
        if choice != json!("required") {
            assert_eq!(name, "get_weather");
        }
    }
    assert!(called >= 2, "only {called} of 4 replies completed");
}

#[tokio::test]
async fn auto_answers_or_calls_and_a_streamed_call_comes_in_one_piece() {
    let app = spawn_app().await;
    let mut shapes = std::collections::BTreeSet::new();
    for seed in 1..=8 {
        let v = app
            .post_json("/v1/chat/completions", &chat(json!("auto"), seed))
            .await;
        let c = &v["choices"][0];
        match c["finish_reason"].as_str().unwrap() {
            "tool_calls" => {
                check_call(&c["message"]["tool_calls"][0]);
                shapes.insert("call");
            }
            "stop" => {
                assert!(
                    c["message"]["content"].is_string() && c["message"]["tool_calls"].is_null()
                );
                shapes.insert("answer");
            }
            _ => {}
        }
    }
    assert!(!shapes.is_empty(), "no reply completed");
    let mut body = chat(json!({"type": "function", "function": {"name": "now"}}), 1);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let raw = app.post_text("/v1/chat/completions", &body).await;
    let chunks = openai_chunks(&raw);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let call = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(check_call(call), "now");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "tool_calls");
    assert!(chunks[3]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_streamed_answer_arrives_piece_by_piece_as_the_whole_one_reads() {
    let app = spawn_app().await;
    let mut compared = 0;
    for seed in 1..=12 {
        let whole = app
            .post_json("/v1/chat/completions", &chat(json!("auto"), seed))
            .await;
        if whole["choices"][0]["finish_reason"] != "stop" {
            continue; // a call (or cut): covered elsewhere
        }
        let mut body = chat(json!("auto"), seed);
        body["stream"] = json!(true);
        let raw = app.post_text("/v1/chat/completions", &body).await;
        let chunks = openai_chunks(&raw);
        let pieces: Vec<&str> = chunks[1..]
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            pieces.concat(),
            whole["choices"][0]["message"]["content"].as_str().unwrap()
        );
        let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            pieces.len() > 1 || content.chars().count() <= 1,
            "not streamed: {pieces:?}"
        );
        assert!(
            !pieces.concat().contains("\"response\""),
            "the JSON wrapper leaked: {pieces:?}"
        );
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        compared += 1;
    }
    assert!(compared > 0, "no seed answered instead of calling");
}

#[tokio::test]
async fn earlier_calls_and_results_can_be_sent_back() {
    let app = spawn_app().await;
    let body = json!({"model": "tiny", "tools": tools(), "max_tokens": 4, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]});
    let v = app.post_json("/v1/chat/completions", &body).await;
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
    let mut bad = body.clone();
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = json!("{oops");
    let (_, msg) = error_code(app.post("/v1/chat/completions", &bad).await, 422).await;
    assert!(
        msg.contains("messages[2].tool_calls[0].function.arguments"),
        "{msg}"
    );
    let mut bad = body;
    bad["messages"][3]["content"] = Value::Null;
    let (_, msg) = error_code(app.post("/v1/chat/completions", &bad).await, 422).await;
    assert!(msg.contains("messages[3].content"), "{msg}");
}

#[tokio::test]
async fn parallel_tool_calls_come_back_as_a_list_streamed_or_not() {
    let app = spawn_app().await;
    let mut completed = 0;
    for seed in 1..=4 {
        let mut body = chat(json!("required"), seed);
        body["parallel_tool_calls"] = json!(true);
        body["max_tokens"] = json!(160);
        let v = app.post_json("/v1/chat/completions", &body).await;
        let c = &v["choices"][0];
        if c["finish_reason"] == "length" {
            continue;
        }
        completed += 1;
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!((1..=8).contains(&calls.len()), "{v}");
        for (i, call) in calls.iter().enumerate() {
            check_call(call);
            assert_eq!(call["index"], i, "{v}");
        }

        // Streamed: the same calls (greedy or seeded alike), each with its index, in one delta.
        body["stream"] = json!(true);
        let raw = app.post_text("/v1/chat/completions", &body).await;
        let events = openai_chunks(&raw);
        let streamed: Vec<&Value> = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array())
            .flatten()
            .collect();
        assert_eq!(streamed.len(), calls.len(), "{raw}");
        for (s, call) in streamed.iter().zip(calls) {
            assert_eq!(s["function"], call["function"]);
            assert_eq!(s["index"], call["index"]);
        }
    }
    assert!(completed >= 2, "only {completed} of 4 replies completed");
}

#[tokio::test]
async fn several_earlier_calls_go_back_to_the_model_as_a_list() {
    let app = spawn_app().await;
    let body = json!({"model": "tiny", "tools": tools(), "max_tokens": 8, "messages": [
        {"role": "user", "content": "weather in Oslo and the time?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"c\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}],
        "parallel_tool_calls": true});
    let v = app.post_json("/v1/chat/completions", &body).await;
    assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
    let mut bad = body;
    bad["parallel_tool_calls"] = json!(1);
    let (_, msg) = error_code(app.post("/v1/chat/completions", &bad).await, 422).await;
    assert!(msg.contains("parallel_tool_calls"), "{msg}");
}

#[tokio::test]
async fn bad_tools_are_refused_naming_the_field_and_none_ignores_them() {
    let app = spawn_app().await;
    for (patch, words) in [
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)"}}}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "nope",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"tools": "get_weather"}), "`tools`"),
    ] {
        let mut body = chat(json!("auto"), 1);
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (_, msg) = error_code(app.post("/v1/chat/completions", &body).await, 422).await;
        assert!(msg.contains(words), "{words}: {msg}");
    }
    // "none": answered as plain text, as if there were no tools.
    let mut body = chat(json!("none"), 1);
    body["max_tokens"] = json!(5);
    let v = app.post_json("/v1/chat/completions", &body).await;
    assert!(v["choices"][0]["message"]["tool_calls"].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
}
