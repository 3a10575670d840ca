//! The OpenAI wire format: the exact fields the official client reads, SSE chunks and `[DONE]`.

use serde_json::{json, Value};

use crate::helpers::{error_code, openai_chunks, spawn_app, spawn_app_with, sse_data};

#[tokio::test]
async fn chat_completion_has_the_openai_shape() {
    let app = spawn_app().await;
    let body = json!({"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 5, "temperature": 0,
        "logprobs": true, "top_logprobs": 2});
    let v: Value = app.post_json("/v1/chat/completions", &body).await;
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "tiny");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array());
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn chat_streaming_sends_role_deltas_finish_usage_and_done() {
    let app = spawn_app().await;
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let plain = app
        .post_json("/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0})).await;
    let raw = app.post_text("/v1/chat/completions", &body).await;
    let chunks = openai_chunks(&raw);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    // The same counts; the stream came second, so it read its prompt's first whole block
    // from the prefix cache.
    let (got, want) = (&usage_chunk["usage"], &plain["usage"]);
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    assert_eq!(want["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(
        got["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0),
        "{got}"
    );
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(
        finish_chunk["choices"][0]["finish_reason"],
        plain["choices"][0]["finish_reason"]
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn completions_stream_and_plain_agree() {
    let app = spawn_app().await;
    let body = json!({"model": "tiny", "prompt": "the", "max_tokens": 7, "temperature": 0});
    let plain: Value = app.post_json("/v1/completions", &body).await;
    assert_eq!(plain["object"], "text_completion");
    assert!(plain["id"].as_str().unwrap().starts_with("cmpl-"));
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let raw = app.post_text("/v1/completions", &sb).await;
    let data = sse_data(&raw);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt() {
    let app = spawn_app().await;
    let body =
        json!({"model": "tiny", "prompt": "the cat", "max_tokens": 0, "echo": true, "logprobs": 1});
    let v: Value = app.post_json("/v1/completions", &body).await;
    let c = &v["choices"][0];
    assert_eq!(c["text"], "the cat");
    let lp = &c["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6); // t, he, Ġ, c, a, t
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    for i in 1..6 {
        assert!(lp["token_logprobs"][i].as_f64().unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 1);
    }
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(v["usage"]["completion_tokens"], 0);
}

#[tokio::test]
async fn echo_streams_the_prompt_first_with_its_logprobs_when_asked() {
    let app = spawn_app().await;
    for logprobs in [None, Some(1)] {
        let mut body = json!({"model": "tiny", "prompt": ["the cat", "a dog"], "max_tokens": 5,
            "temperature": 0, "echo": true, "n": 2});
        if let Some(k) = logprobs {
            body["logprobs"] = json!(k);
        }
        let whole: Value = app.post_json("/v1/completions", &body).await;
        body["stream"] = json!(true);
        let raw = app.post_text("/v1/completions", &body).await;
        let chunks = openai_chunks(&raw);
        for (i, want) in whole["choices"].as_array().unwrap().iter().enumerate() {
            let mine: Vec<&Value> = chunks
                .iter()
                .map(|c| &c["choices"][0])
                .filter(|c| c["index"] == i)
                .collect();
            let prompt = if i < 2 { "the cat" } else { "a dog" };
            assert_eq!(mine[0]["text"], prompt, "{raw}");
            let text: String = mine.iter().map(|c| c["text"].as_str().unwrap()).collect();
            assert_eq!(text, want["text"].as_str().unwrap(), "choice {i}");
            if logprobs.is_some() {
                // The prompt's tokens (the first one null), then one per generated token: as
                // the whole response lists them.
                let tokens: Vec<&Value> = mine
                    .iter()
                    .filter_map(|c| c["logprobs"]["tokens"].as_array())
                    .flatten()
                    .collect();
                let want_tokens: Vec<&Value> = want["logprobs"]["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .collect();
                assert_eq!(tokens, want_tokens, "choice {i}");
                assert_eq!(mine[0]["logprobs"]["token_logprobs"][0], Value::Null);
            } else {
                assert!(mine[0]["logprobs"].is_null());
            }
        }
    }
}

#[tokio::test]
async fn models_lists_the_base_model_and_an_unknown_model_is_404() {
    let app = spawn_app().await;
    let v = app.get_json("/v1/models").await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["object"], "model");
    let (code, msg) = error_code(
        app.post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(code, "model_not_found");
    assert!(msg.contains("gpt-4"));
}

#[tokio::test]
async fn a_single_model_can_be_retrieved_by_id() {
    let app = spawn_app().await;
    let v = app.get_json("/v1/models/tiny").await;
    assert_eq!(v["id"], "tiny");
    assert_eq!(v["object"], "model");
    let (code, _) = error_code(app.get("/v1/models/other").await, 404).await;
    assert_eq!(code, "model_not_found");
}

#[tokio::test]
async fn tokens_that_split_a_character_report_their_raw_bytes() {
    let app = spawn_app().await;
    // The tiny byte-level vocabulary has no merges for "é" (0xC3 0xA9): two byte tokens.
    let body =
        json!({"model": "tiny", "prompt": "é", "max_tokens": 0, "echo": true, "logprobs": 0});
    let v: Value = app.post_json("/v1/completions", &body).await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["bytes:\\xc3", "bytes:\\xa9"]));
    assert_eq!(lp["text_offset"], json!([0, 0]));
    assert_eq!(v["choices"][0]["text"], "é");
}

#[tokio::test]
async fn chat_logprob_bytes_join_back_into_the_text() {
    let app = spawn_app().await;
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
        "temperature": 0, "logprobs": true});
    let v: Value = app.post_json("/v1/chat/completions", &body).await;
    let bytes: Vec<u8> = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| {
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    // Special tokens (EOS) are not part of the content; everything else is, byte for byte.
    assert!(
        String::from_utf8_lossy(&bytes).starts_with(content),
        "{bytes:?} vs {content:?}"
    );
}

#[tokio::test]
async fn features_we_do_not_implement_are_refused_by_name() {
    let app = spawn_app().await;
    let msgs = json!([{"role": "user", "content": "x"}]);
    for (field, value) in [
        ("functions", json!([{"name": "f"}])),
        ("response_format", json!({"type": "json_schema"})),
        ("n", json!(0)),
    ] {
        let mut body = json!({"model": "tiny", "messages": msgs});
        body[field] = value;
        let (_, msg) = error_code(app.post("/v1/chat/completions", &body).await, 422).await;
        assert!(msg.contains(field), "{field}: {msg}");
    }
}

#[tokio::test]
async fn ignore_eos_makes_completions_and_chat_generate_exactly_max_tokens() {
    let app = spawn_app().await;
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "the", "max_tokens": 40, "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 40, "ignore_eos": true}),
        ),
    ] {
        let v = app.post_json(path, &body).await;
        assert_eq!(v["usage"]["completion_tokens"], 40, "{path}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{path}: {v}");
    }
}

#[tokio::test]
async fn null_flags_mean_unset_as_in_openai() {
    let app = spawn_app().await;
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "stream": null, "logprobs": null, "ignore_eos": null});
    let resp = app.post("/v1/chat/completions", &chat).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "not streamed");
    assert!(v["choices"][0]["logprobs"].is_null());
    let completion = json!({"model": "tiny", "prompt": "the", "max_tokens": 2,
        "stream": null, "echo": null, "ignore_eos": null});
    let v: Value = app.post_json("/v1/completions", &completion).await;
    assert_eq!(v["object"], "text_completion");
    // A wrong type is still refused, naming the field.
    let bad = json!({"model": "tiny", "prompt": "the", "stream": "yes"});
    let (_, msg) = error_code(app.post("/v1/completions", &bad).await, 422).await;
    assert!(msg.contains("stream"), "{msg}");
}

#[tokio::test]
async fn logit_bias_and_penalties_steer_the_choice_with_openai_semantics() {
    let app = spawn_app().await;
    let base = json!({"model": "tiny", "prompt": "the", "max_tokens": 6, "temperature": 0});
    // +100 on one token forces it at every step (token 40 is a single byte of the tiny
    // byte-level vocabulary).
    let tok: Value = app
        .post_json("/v1/detokenize", &json!({"tokens": [40]}))
        .await;
    let piece = tok["text"].as_str().unwrap().to_owned();
    let mut forced = base.clone();
    forced["logit_bias"] = json!({"40": 100});
    let v: Value = app.post_json("/v1/completions", &forced).await;
    assert_eq!(v["choices"][0]["text"], piece.repeat(6), "{v}");

    // Penalties (native route, which reports token ids): at every step the chosen token must
    // beat each reported alternative once both are penalized by what was generated before —
    // reported logprobs are the raw ones, and log-softmax keeps the logits' differences.
    let body = json!({"prompt": "the", "max_new_tokens": 12, "temperature": 0, "logprobs": true,
        "top_logprobs": 5, "frequency_penalty": 1.5, "presence_penalty": 0.5});
    let v: Value = app.post_json("/v1/generate", &body).await;
    let tokens = v["tokens"].as_array().unwrap();
    let mut counts = std::collections::HashMap::<u64, f64>::new();
    let mut steered = 0;
    for t in tokens {
        let pen = |id: u64| counts.get(&id).map_or(0.0, |c| 1.5 * c + 0.5);
        let chosen = t["id"].as_u64().unwrap();
        let score = t["logprob"].as_f64().unwrap() - pen(chosen);
        let top = t["top_logprobs"].as_array().unwrap();
        for alt in top {
            let alt_score = alt["logprob"].as_f64().unwrap() - pen(alt["id"].as_u64().unwrap());
            assert!(
                alt_score <= score + 1e-4,
                "{t} lost to {alt} under the penalties"
            );
        }
        steered += usize::from(top[0]["id"].as_u64() != Some(chosen));
        *counts.entry(chosen).or_default() += 1.0;
    }
    assert!(steered > 0, "the penalties never changed a choice: {v}");
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "logit_bias": {"40": 100}, "temperature": 0});
    let v: Value = app.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(v["choices"][0]["message"]["content"], piece.repeat(3));

    // Bad values are 422 naming the field.
    for (field, value) in [
        ("logit_bias", json!({"not-a-token": 1})),
        ("logit_bias", json!({"40": 500})),
        ("logit_bias", json!({"99999999": 1})),
        ("logit_bias", json!({"40": "high"})),
        ("presence_penalty", json!(3.0)),
        ("frequency_penalty", json!(-2.5)),
    ] {
        let mut body = base.clone();
        body[field] = value.clone();
        let (_, msg) = error_code(app.post("/v1/completions", &body).await, 422).await;
        assert!(msg.contains(field), "{field}={value}: {msg}");
    }
}

#[tokio::test]
async fn n_choices_each_get_an_index_and_the_usage_counts_the_prompt_once() {
    let app = spawn_app().await;
    let one: Value = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "the", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    // Greedy: every choice is the same text.
    let v: Value = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "the", "max_tokens": 5, "temperature": 0, "n": 3}),
        )
        .await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], one["choices"][0]["text"]);
    }
    let (p, c) = (
        &v["usage"]["prompt_tokens"],
        &v["usage"]["completion_tokens"],
    );
    assert_eq!(p, &one["usage"]["prompt_tokens"]);
    assert_eq!(
        c.as_u64().unwrap(),
        3 * one["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // Sampled with a seed: choices draw from seed + i, so they differ and repeat exactly.
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8, "temperature": 1, "seed": 11, "n": 4});
    let a: Value = app.post_json("/v1/chat/completions", &body).await;
    let b: Value = app.post_json("/v1/chat/completions", &body).await;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b));
    let mut distinct = texts(&a);
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 1, "{:?}", texts(&a));

    // Streamed: a role chunk and a finish chunk per choice, the text of each choice equal to
    // the non-streamed one, usage summed, one [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let raw = app.post_text("/v1/chat/completions", &streamed).await;
    let data = sse_data(&raw);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    let mut text = vec![String::new(); 4];
    let mut roles = 0;
    let mut finishes = 0;
    let mut usage = Value::Null;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(c) = v["choices"].as_array().and_then(|c| c.first()) {
            let i = c["index"].as_u64().unwrap() as usize;
            roles += usize::from(c["delta"]["role"] == "assistant");
            finishes += usize::from(!c["finish_reason"].is_null());
            text[i] += c["delta"]["content"].as_str().unwrap_or_default();
        } else {
            usage = v["usage"].clone();
        }
    }
    assert_eq!((roles, finishes), (4, 4));
    assert_eq!(text, texts(&a));
    assert_eq!(usage["completion_tokens"], a["usage"]["completion_tokens"]);
    assert_eq!(usage["prompt_tokens"], a["usage"]["prompt_tokens"]);

    let (_, msg) = error_code(
        app.post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "x", "n": 17}),
        )
        .await,
        422,
    )
    .await;
    assert!(msg.contains("`n`"), "{msg}");
}

#[tokio::test]
async fn a_list_of_prompts_gives_n_choices_per_prompt_in_order() {
    let app = spawn_app().await;
    let single = |prompt: &str| json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0});
    let a: Value = app.post_json("/v1/completions", &single("the")).await;
    let b: Value = app.post_json("/v1/completions", &single("a cat")).await;
    let ids: Value = app
        .post_json("/v1/tokenize", &json!({"text": "a cat"}))
        .await;
    for prompt in [
        json!(["the", "a cat"]),
        json!(["the", ids["tokens"].clone()]),
    ] {
        if prompt[1].is_array() {
            // Token-id lists: both entries as ids.
            let the: Value = app.post_json("/v1/tokenize", &json!({"text": "the"})).await;
            let mut lists = prompt.clone();
            lists[0] = the["tokens"].clone();
            let body = json!({"model": "tiny", "prompt": lists, "max_tokens": 4,
                "temperature": 0, "n": 2});
            let v: Value = app.post_json("/v1/completions", &body).await;
            check_batch(&v, &a, &b);
            continue;
        }
        let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "n": 2});
        let v: Value = app.post_json("/v1/completions", &body).await;
        check_batch(&v, &a, &b);
        // Echo puts each choice's own prompt in front.
        let mut echo = body.clone();
        echo["echo"] = json!(true);
        let v: Value = app.post_json("/v1/completions", &echo).await;
        assert!(v["choices"][0]["text"].as_str().unwrap().starts_with("the"));
        assert!(v["choices"][3]["text"]
            .as_str()
            .unwrap()
            .starts_with("a cat"));
        // Streamed: every index, and the usage counts each prompt once.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let raw = app.post_text("/v1/completions", &streamed).await;
        let mut text = vec![String::new(); 4];
        let mut usage = Value::Null;
        for d in sse_data(&raw).iter().filter(|d| *d != "[DONE]") {
            let v: Value = serde_json::from_str(d).unwrap();
            match v["choices"].as_array().and_then(|c| c.first()) {
                Some(c) => {
                    text[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap()
                }
                None => usage = v["usage"].clone(),
            }
        }
        let want: Vec<&str> = [&a, &a, &b, &b]
            .iter()
            .map(|r| r["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, want);
        assert_eq!(usage["prompt_tokens"], v["usage"]["prompt_tokens"]);
    }
    for bad in [json!([]), json!(vec!["x"; 65]), json!([[1, 2], [99999999]])] {
        let body = json!({"model": "tiny", "prompt": bad});
        let (_, msg) = error_code(app.post("/v1/completions", &body).await, 422).await;
        assert!(msg.contains("prompt"), "{msg}");
    }
}

/// Choices 0–1 are prompt 0's (`a`), 2–3 prompt 1's (`b`); greedy, so each equals the single
/// request's text; the usage counts each prompt once and every completion.
fn check_batch(v: &Value, a: &Value, b: &Value) {
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let want = if i < 2 { a } else { b };
        assert_eq!(c["text"], want["choices"][0]["text"], "choice {i}");
    }
    let sum = |key: &str| a["usage"][key].as_u64().unwrap() + b["usage"][key].as_u64().unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        sum("prompt_tokens")
    );
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        2 * sum("completion_tokens")
    );
}

#[tokio::test]
async fn more_sequences_than_the_queue_can_ever_hold_is_422_not_429() {
    let app = spawn_app_with(|s| s.limits.max_queued_per_tenant = 4).await;
    let body = json!({"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1});
    let (_, msg) = error_code(app.post("/v1/completions", &body).await, 422).await;
    assert!(msg.contains("limits.max_queued_per_tenant = 4"), "{msg}");
    let body = json!({"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 1});
    assert_eq!(app.post("/v1/completions", &body).await.status(), 200);
}

#[tokio::test]
async fn best_of_returns_the_samples_with_the_highest_mean_logprob() {
    let app = spawn_app().await;
    // n = 4 with a seed yields exactly the candidates best_of = 4 draws (seed + i).
    let all: Value = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "the", "max_tokens": 6, "temperature": 1,
                "seed": 3, "n": 4, "logprobs": 0}),
        )
        .await;
    let mut ranked: Vec<(f64, String)> = all["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
            let mean = lps.iter().map(|l| l.as_f64().unwrap()).sum::<f64>() / lps.len() as f64;
            (mean, c["text"].as_str().unwrap().to_owned())
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let best: Value = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "the", "max_tokens": 6, "temperature": 1,
                "seed": 3, "n": 2, "best_of": 4}),
        )
        .await;
    let texts: Vec<&str> = best["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec![ranked[0].1.as_str(), ranked[1].1.as_str()]);
    assert_eq!(best["choices"][1]["index"], 1);
    // Every candidate's tokens are counted, as OpenAI bills them.
    assert_eq!(
        best["usage"]["completion_tokens"],
        all["usage"]["completion_tokens"]
    );
    for body in [
        json!({"model": "tiny", "prompt": "x", "n": 3, "best_of": 2}),
        json!({"model": "tiny", "prompt": "x", "best_of": 2, "stream": true}),
    ] {
        let (_, msg) = error_code(app.post("/v1/completions", &body).await, 422).await;
        assert!(msg.contains("best_of"), "{msg}");
    }
}

#[tokio::test]
async fn repetition_penalty_is_accepted_everywhere_and_bounded() {
    let app = spawn_app().await;
    let greedy = json!({"prompt": "the", "max_new_tokens": 12, "temperature": 0});
    let plain: Value = app.post_json("/v1/generate", &greedy).await;
    let mut penalized = greedy.clone();
    penalized["repetition_penalty"] = json!(2.0);
    let v: Value = app.post_json("/v1/generate", &penalized).await;
    assert_ne!(v["text"], plain["text"], "a strong penalty changed nothing");
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "repetition_penalty": 1.2});
    assert_eq!(app.post("/v1/chat/completions", &chat).await.status(), 200);
    for bad in [json!(0), json!(2.5), json!(-1)] {
        let body = json!({"model": "tiny", "prompt": "x", "repetition_penalty": bad});
        let (_, msg) = error_code(app.post("/v1/completions", &body).await, 422).await;
        assert!(msg.contains("repetition_penalty"), "{msg}");
    }
}

#[tokio::test]
async fn min_p_of_one_is_greedy_and_out_of_range_is_422() {
    let app = spawn_app().await;
    // min_p = 1 keeps only the most likely token: any seed at any temperature gives the
    // greedy text.
    let greedy: Value = app
        .post_json(
            "/v1/generate",
            &json!({"prompt": "the", "max_new_tokens": 8, "temperature": 0}),
        )
        .await;
    for seed in [1, 2, 3] {
        let v: Value = app
            .post_json(
                "/v1/generate",
                &json!({"prompt": "the", "max_new_tokens": 8, "temperature": 1.5,
                    "seed": seed, "min_p": 1.0}),
            )
            .await;
        assert_eq!(v["text"], greedy["text"], "seed {seed}");
    }
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "min_p": 0.1});
    assert_eq!(app.post("/v1/chat/completions", &chat).await.status(), 200);
    let bad = json!({"model": "tiny", "prompt": "x", "min_p": 1.5});
    let (_, msg) = error_code(app.post("/v1/completions", &bad).await, 422).await;
    assert!(msg.contains("min_p"), "{msg}");
}

#[tokio::test]
async fn json_object_mode_yields_a_json_object_prefix_and_ends_when_it_closes() {
    use adapterd::engine::json_schema::{Schema, SchemaPrefix};
    let app = spawn_app().await;
    for seed in [1, 2, 3, 4] {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "json"}],
            "max_tokens": 40, "temperature": 1, "seed": seed,
            "response_format": {"type": "json_object"}});
        let v: Value = app.post_json("/v1/chat/completions", &body).await;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let mut p = SchemaPrefix::new(std::sync::Arc::new(Schema::any_object()));
        assert!(p.push(text.as_bytes()), "not a JSON prefix: {text:?}");
        if v["choices"][0]["finish_reason"] == "stop" {
            let parsed: Value = serde_json::from_str(text).expect("a complete object parses");
            assert!(parsed.is_object());
        } else {
            assert!(
                !p.is_complete(),
                "a complete object must end the generation: {text:?}"
            );
        }
    }
    // The native route takes the same field.
    let v: Value = app
        .post_json(
            "/v1/generate",
            &json!({"prompt": "x", "max_new_tokens": 5, "response_format": {"type": "json_object"}}),
        )
        .await;
    assert!(
        v["text"].as_str().unwrap().trim_start().starts_with('{'),
        "{v}"
    );
    for (format, extra) in [
        (json!({"type": "json_schema", "json_schema": {}}), json!({})),
        (json!({"type": "json_object"}), json!({"ignore_eos": true})),
    ] {
        let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
            "response_format": format});
        if let Some(o) = extra.as_object() {
            for (k, val) in o {
                body[k] = val.clone();
            }
        }
        let (_, msg) = error_code(app.post("/v1/chat/completions", &body).await, 422).await;
        assert!(msg.contains("response_format"), "{msg}");
    }
}
