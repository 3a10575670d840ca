//! Request decoding through the real router: arbitrary and JSON-ish bodies to every JSON
//! endpoint, arbitrary multipart bodies to /v1/adapters and /v1/files. Every answer is a 2xx or
//! a deliberate 4xx carrying the error envelope — never a 5xx, never a dropped connection —
//! and a streamed 2xx is read to its end.

use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::corpus;
use crate::helpers::{spawn_app_in, TestApp};
use crate::peft::{valid_config, valid_weights};
use crate::strategies::{json_value, nasty_number, nasty_string, nested_arrays, object_with};

/// One server for every test of this file, on its own runtime.
pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub app: TestApp,
    _dir: tempfile::TempDir,
}

pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let app = rt.block_on(spawn_app_in(dir.path(), |_| {}));
        Harness { rt, app, _dir: dir }
    })
}

/// Sends `req` and checks the answer; returns the status.
pub async fn check(what: &str, req: reqwest::RequestBuilder) -> Result<u16, String> {
    let resp = tokio::time::timeout(Duration::from_secs(30), req.send())
        .await
        .map_err(|_| format!("{what}: no answer in 30 s"))?
        .map_err(|e| format!("{what}: the request failed (connection dropped?): {e}"))?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.bytes())
        .await
        .map_err(|_| format!("{what}: the body did not end in 30 s"))?
        .map_err(|e| format!("{what}: reading the body failed (connection dropped?): {e}"))?;
    if status >= 500 {
        return Err(format!(
            "{what}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    if status >= 400 {
        let v: Value = serde_json::from_slice(&body).map_err(|_| {
            format!(
                "{what}: {status} without the JSON envelope: {:?}",
                String::from_utf8_lossy(&body)
            )
        })?;
        let ok = v["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
            && v["error"]["message"].is_string();
        if !ok {
            return Err(format!(
                "{what}: {status} with a body that is not the envelope: {v}"
            ));
        }
    } else if !(200..300).contains(&status) {
        return Err(format!("{what}: unexpected status {status}"));
    }
    Ok(status)
}

fn post_raw(path: &str, body: Vec<u8>) -> Result<u16, String> {
    let h = harness();
    let req = h
        .app
        .client
        .post(format!("{}{path}", h.app.base))
        .header("content-type", "application/json")
        .body(body);
    h.rt.block_on(check(path, req))
}

const GENERATE: &[&str] = &[
    "prompt",
    "messages",
    "adapter_id",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "response_format",
    "ignore_eos",
];
const COMPLETIONS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "suffix",
    "user",
    "top_k",
    "logit_bias",
];
const CHAT: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "stop",
    "seed",
    "user",
    "top_k",
    "logit_bias",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
];
const TOKENIZE: &[&str] = &[
    "text",
    "add_special_tokens",
    "tokens",
    "skip_special_tokens",
];

/// Values a field could plausibly hold: short token counts (so generation stays quick),
/// messages, the model's name, token id lists, stop lists, stream options.
fn plausible() -> impl Strategy<Value = Value> + Clone {
    let message = (
        prop::sample::select(&["system", "user", "assistant", "developer", "tool", "x"][..]),
        prop_oneof![
            nasty_string().prop_map(Value::from),
            prop::collection::vec(
                (
                    prop::sample::select(&["text", "image_url"][..]),
                    nasty_string()
                )
                    .prop_map(|(t, s)| json!({"type": t, "text": s})),
                0..3
            )
            .prop_map(Value::Array),
        ],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    prop_oneof![
        (0i64..12).prop_map(Value::from),
        nasty_number(),
        any::<bool>().prop_map(Value::from),
        Just(Value::from("tiny")),
        nasty_string().prop_map(Value::from),
        prop::collection::vec(message, 0..3).prop_map(Value::Array),
        prop::collection::vec(0u32..300, 0..8).prop_map(|v| json!(v)),
        prop::collection::vec(nasty_string(), 0..3).prop_map(|v| json!(v)),
        Just(json!({"include_usage": true})),
        Just(json!({"type": "json_object"})),
        Just(
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}])
        ),
        Just(json!({"type": "function", "function": {"name": "f"}})),
        Just(
            json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {
                "d": {"type": "string", "format": "date"},
                "n": {"type": "number", "minimum": -1, "maximum": 9, "multipleOf": 0.5},
                "t": {"type": "array", "prefixItems": [{"type": "string", "pattern": "^[a-c]+$"}]}},
            "required": ["d", "n", "t"]}}})
        ),
        nasty_string().prop_map(
            |p| json!({"type": "json_schema", "json_schema": {"name": "p",
            "schema": {"type": "string", "pattern": p}}})
        ),
        nasty_number().prop_map(
            |n| json!({"type": "json_schema", "json_schema": {"name": "n",
            "schema": {"type": "number", "minimum": n, "multipleOf": n}}})
        ),
        Just(json!("required")),
    ]
}

/// A body: arbitrary bytes, arbitrary JSON, or (mostly) an object of the endpoint's fields.
fn body(fields: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        6 => object_with(fields, plausible()).prop_map(|v| v.to_string().into_bytes()),
    ]
}

#[test]
fn corpus_request_bodies_get_2xx_or_an_enveloped_4xx() {
    for route in [
        "generate",
        "completions",
        "chat_completions",
        "tokenize",
        "detokenize",
    ] {
        let path = format!("/v1/{}", route.replace('_', "/"));
        for (file, bytes) in corpus::files(&format!("requests/{route}")) {
            post_raw(&path, bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
}

#[test]
fn deeply_nested_request_bodies_are_refused() {
    let deep = nested_arrays(100_000, "1");
    for path in [
        "/v1/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/tokenize",
    ] {
        // A string field meets the first `[` and stops (422); the whole body nested is 400/422.
        for body in [format!("{{\"prompt\": {deep}}}"), deep.clone()] {
            let status = post_raw(path, body.into_bytes()).expect("answered");
            assert!(status == 400 || status == 422, "{path}: {status}");
        }
    }
    // `tools` takes any JSON, so the parser itself must stop at its depth limit: 400.
    let body = format!("{{\"model\": \"tiny\", \"messages\": [], \"tools\": {deep}}}");
    let status = post_raw("/v1/chat/completions", body.into_bytes()).expect("answered");
    assert_eq!(status, 400);
}

#[test]
fn non_multipart_uploads_get_the_envelope() {
    let h = harness();
    for path in ["/v1/adapters", "/v1/files"] {
        for (ct, body) in [
            ("application/json", "{}"),
            ("multipart/form-data", "x"),
            ("multipart/form-data; boundary=zz", "--zz\r\nbroken"),
            ("text/plain", ""),
        ] {
            let req = h
                .app
                .client
                .post(format!("{}{path}", h.app.base))
                .header("content-type", ct)
                .body(body);
            let status = h.rt.block_on(check(path, req)).expect("envelope");
            assert!((400..500).contains(&status), "{path} {ct}: {status}");
        }
    }
}

/// A multipart part: a name from those the upload reads (or not), an optional file name, and
/// content that is valid, mutated or arbitrary.
fn part() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    let name = prop_oneof![
        3 => prop::sample::select(&["name", "adapter_config.json", "adapter_model.safetensors",
            "file", "purpose"][..]).prop_map(str::to_owned),
        1 => nasty_string(),
    ];
    let file_name = prop::option::of(prop_oneof![
        prop::sample::select(
            &[
                "adapter_config.json",
                "adapter_model.safetensors",
                "adapter_model.bin",
                "train.jsonl",
                "../../x.pt"
            ][..]
        )
        .prop_map(str::to_owned),
        nasty_string(),
    ]);
    let content = prop_oneof![
        Just(valid_config()),
        Just(valid_weights()),
        prop::collection::vec(any::<u8>(), 0..200),
        nasty_string().prop_map(String::into_bytes),
        Just(b"fine-tune".to_vec()),
        Just(b"{\"text\": \"hello\"}\n".to_vec()),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| {
            let mut w = valid_weights();
            let at = i.index(w.len());
            w[at] = b;
            w
        }),
    ];
    (name, file_name, content)
}

fn send_multipart(
    path: &str,
    parts: Vec<(String, Option<String>, Vec<u8>)>,
) -> Result<u16, String> {
    let h = harness();
    let mut form = reqwest::multipart::Form::new();
    for (name, file_name, content) in parts {
        let mut p = reqwest::multipart::Part::bytes(content);
        if let Some(f) = file_name {
            p = p.file_name(f);
        }
        form = form.part(name, p);
    }
    let req = h
        .app
        .client
        .post(format!("{}{path}", h.app.base))
        .multipart(form);
    h.rt.block_on(check(path, req))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generate_bodies(b in body(GENERATE)) {
        post_raw("/v1/generate", b).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn completions_bodies(b in body(COMPLETIONS)) {
        post_raw("/v1/completions", b).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn chat_completions_bodies(b in body(CHAT)) {
        post_raw("/v1/chat/completions", b).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn tokenize_and_detokenize_bodies(b in body(TOKENIZE)) {
        post_raw("/v1/tokenize", b.clone()).map_err(TestCaseError::fail)?;
        post_raw("/v1/detokenize", b).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn multipart_uploads(parts in prop::collection::vec(part(), 0..5)) {
        send_multipart("/v1/adapters", parts.clone()).map_err(TestCaseError::fail)?;
        send_multipart("/v1/files", parts).map_err(TestCaseError::fail)?;
    }
}
