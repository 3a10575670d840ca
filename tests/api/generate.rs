//! `POST /v1/generate`, JSON and SSE.

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, sse_data, TestApp};

#[tokio::test]
async fn greedy_generation_is_deterministic_and_reports_usage() {
    let app = spawn_app().await;
    let body = json!({"prompt": "the cat", "max_new_tokens": 8, "temperature": 0});
    let a = app.post_json("/v1/generate", &body).await;
    let b = app.post_json("/v1/generate", &body).await;
    assert_eq!(a["text"], b["text"]);
    assert_eq!(a["model"], "tiny");
    assert!(a["id"].as_str().unwrap().starts_with("gen-"));
    assert_eq!(a["usage"]["prompt_tokens"], 6, "{a}"); // "the cat" -> t, he, Ġ, c, a, t
    let completion = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion));
    let finish = a["finish_reason"].as_str().unwrap();
    assert!(finish == "length" || finish == "eos", "{finish}");
    if finish == "length" {
        assert_eq!(completion, 8);
    }
}

#[tokio::test]
async fn same_seed_gives_same_text_and_logprobs_are_reported() {
    let app = spawn_app().await;
    let body = json!({"prompt": "in an", "max_new_tokens": 12, "temperature": 1.0, "seed": 42,
                      "logprobs": true, "top_logprobs": 3});
    let a = app.post_json("/v1/generate", &body).await;
    let b = app.post_json("/v1/generate", &body).await;
    assert_eq!(a["text"], b["text"]);
    let tokens = a["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.len() as u64,
        a["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in tokens {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
        // The chosen token is at most as likely as the most likely one.
        assert!(lp <= top[0]["logprob"].as_f64().unwrap() + 1e-5);
    }
}

#[tokio::test]
async fn chat_messages_use_the_chat_template() {
    let app = spawn_app().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4, "temperature": 0});
    let v = app.post_json("/v1/generate", &body).await;
    // <|im_start|> u s e r \n h i <|im_end|> \n <|im_start|> a s s i s t an t \n
    assert_eq!(v["usage"]["prompt_tokens"], 20, "{v}");
}

#[tokio::test]
async fn streaming_sends_one_event_per_token_then_a_final_event() {
    let app = spawn_app().await;
    let body = json!({"prompt": "the", "max_new_tokens": 6, "temperature": 0, "stream": true});
    let plain = app
        .post_json(
            "/v1/generate",
            &json!({"prompt": "the", "max_new_tokens": 6, "temperature": 0}),
        )
        .await;
    let resp = app.post("/v1/generate", &body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let raw = resp.text().await.unwrap();
    let events: Vec<Value> = sse_data(&raw)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["text"], plain["text"]);
    assert_eq!(last["finish_reason"], plain["finish_reason"]);
    // Text held back to the end (an incomplete character) comes in an event with a null token.
    let token_events = events.iter().filter(|e| e["token"].is_object()).count() as u64;
    assert_eq!(
        token_events,
        last["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, plain["text"].as_str().unwrap());
}

#[tokio::test]
async fn stop_strings_end_generation_and_are_excluded() {
    let app = spawn_app().await;
    let base = json!({"prompt": "the", "max_new_tokens": 24, "temperature": 0});
    let full = app.post_json("/v1/generate", &base).await;
    let text = full["text"].as_str().unwrap().to_owned();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() < 4 {
        return; // the seeded model hit EOS at once; nothing to cut
    }
    let stop: String = chars[2..4].iter().collect();
    let cut_at = text.find(&stop).unwrap();
    let mut body = base.clone();
    body["stop"] = json!([stop]);
    let v = app.post_json("/v1/generate", &body).await;
    assert_eq!(v["text"].as_str().unwrap(), &text[..cut_at]);
    assert_eq!(v["finish_reason"], "stop");
}

#[tokio::test]
async fn concurrent_requests_are_all_served_and_match_serial_results() {
    let app = spawn_app().await;
    let prompts = [
        "the",
        "in",
        "an the",
        "hello there",
        "t",
        "abc",
        "xyz",
        "the the the",
    ];
    let mut serial = Vec::new();
    for p in prompts {
        serial.push(greedy_text(&app, p).await);
    }
    let futs = prompts.iter().map(|p| greedy_text(&app, p));
    let batched: Vec<Value> = futures::future::join_all(futs).await;
    assert_eq!(
        batched, serial,
        "batched decoding must give the same greedy text"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_slot() {
    let app = spawn_app_one_slot().await;
    let body = json!({"prompt": "the", "max_new_tokens": 200, "temperature": 1.0, "stream": true});
    let resp = app.post("/v1/generate", &body).await;
    let mut stream = resp.bytes_stream();
    let _ = stream.next().await; // one event arrives, then the client goes away
    drop(stream);
    // With a single running slot, this only completes if the dropped stream's slot was freed.
    let v: Value = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        app.post_json("/v1/generate", &json!({"prompt": "a", "max_new_tokens": 2}))
            .await
    })
    .await
    .expect("the slot was not freed");
    assert!(v["text"].is_string());
}

/// The serial and the batched side must send the very same request.
async fn greedy_text(app: &TestApp, prompt: &str) -> Value {
    app.post_json(
        "/v1/generate",
        &json!({"prompt": prompt, "max_new_tokens": 10, "temperature": 0}),
    )
    .await["text"]
        .clone()
}

async fn spawn_app_one_slot() -> TestApp {
    crate::helpers::spawn_app_with(|s| s.engine.max_running = 1).await
}
