//! Bad input gets the right 4xx with the error envelope, and the server keeps serving.

use serde_json::{json, Value};

use crate::helpers::{error_code, spawn_app, spawn_app_with};

#[tokio::test]
async fn malformed_json_is_400_with_the_envelope() {
    let app = spawn_app().await;
    let (code, _) = error_code(app.post_raw("/v1/generate", "{\"prompt\": ").await, 400).await;
    assert_eq!(code, "invalid_request");
    let (code, _) = error_code(app.post_raw("/v1/chat/completions", "not json").await, 400).await;
    assert_eq!(code, "invalid_request");
}

#[tokio::test]
async fn wrong_types_and_unknown_fields_are_422_naming_the_field() {
    let app = spawn_app().await;
    let (_, msg) = error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": "x", "max_new_tokens": "ten"}),
        )
        .await,
        422,
    )
    .await;
    assert!(msg.contains("max_new_tokens"), "{msg}");
    let (_, msg) = error_code(
        app.post("/v1/generate", &json!({"prompt": "x", "temprature": 0.5}))
            .await,
        422,
    )
    .await;
    assert!(msg.contains("temprature"), "{msg}");
    let (_, msg) = error_code(
        app.post("/v1/generate", &json!({"prompt": "x", "temperature": 7.0}))
            .await,
        422,
    )
    .await;
    assert!(msg.contains("temperature"), "{msg}");
    let (_, msg) = error_code(
        app.post("/v1/generate", &json!({"prompt": "x", "top_p": 0.0}))
            .await,
        422,
    )
    .await;
    assert!(msg.contains("top_p"), "{msg}");
    let (_, msg) = error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": "x", "max_new_tokens": -1}),
        )
        .await,
        422,
    )
    .await;
    assert!(msg.contains("max_new_tokens"), "{msg}");
    let (_, msg) = error_code(app.post("/v1/generate", &json!({})).await, 422).await;
    assert!(msg.contains("prompt"), "{msg}");
    let (_, msg) = error_code(
        app.post(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
        )
        .await,
        422,
    )
    .await;
    assert!(msg.contains("role"), "{msg}");
}

#[tokio::test]
async fn a_prompt_that_does_not_fit_names_both_numbers() {
    let app = spawn_app().await;
    let prompt = "the ".repeat(100);
    let t: Value = app
        .post("/v1/tokenize", &json!({"text": prompt}))
        .await
        .json()
        .await
        .unwrap();
    let n = t["count"].as_u64().unwrap(); // the tiny model's context is 256
    let max_new = 257 - n;
    let (_, msg) = error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": prompt, "max_new_tokens": max_new}),
        )
        .await,
        422,
    )
    .await;
    assert!(
        msg.contains(&n.to_string()) && msg.contains(&max_new.to_string()) && msg.contains("256"),
        "{msg}"
    );
    // One token less fits.
    let ok = app
        .post(
            "/v1/generate",
            &json!({"prompt": prompt, "max_new_tokens": max_new - 1}),
        )
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn unknown_adapter_and_route_are_404() {
    let app = spawn_app().await;
    let (code, msg) = error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": "x", "adapter_id": "nope"}),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(code, "not_found");
    assert!(msg.contains("nope"));
    let (code, _) = error_code(app.get("/v1/nothing-here").await, 404).await;
    assert_eq!(code, "not_found");
}

#[tokio::test]
async fn an_oversized_body_is_413_and_the_server_keeps_serving() {
    let app = spawn_app_with(|s| s.server.max_body_bytes = 2048).await;
    let big = json!({"prompt": "x".repeat(10_000)}).to_string();
    let (code, msg) = error_code(app.post_raw("/v1/generate", big).await, 413).await;
    assert_eq!(code, "payload_too_large");
    assert!(msg.contains("server.max_body_bytes"), "{msg}");
    let ok: Value = app
        .post(
            "/v1/generate",
            &json!({"prompt": "the", "max_new_tokens": 2}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(ok["text"].is_string());
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let app = spawn_app_with(|s| {
        s.engine.max_running = 1;
        s.engine.max_waiting = 1;
    })
    .await;
    let body = json!({"prompt": "the", "max_new_tokens": 200, "temperature": 1.0});
    let futs: Vec<_> = (0..6).map(|_| app.post("/v1/generate", &body)).collect();
    let resps = futures::future::join_all(futs).await;
    let limited: Vec<_> = resps.into_iter().filter(|r| r.status() == 429).collect();
    assert!(
        !limited.is_empty(),
        "six requests against one slot and one queue place: some must be refused"
    );
    let r = limited.into_iter().next().unwrap();
    assert!(r.headers().get("retry-after").is_some());
    let (code, _) = error_code(r, 429).await;
    assert_eq!(code, "overloaded");
}
