//! Health, readiness, metrics, tokenize.

use serde_json::{json, Value};

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health").await.status(), 200);
    let r: Value = app.get("/ready").await.json().await.unwrap();
    assert_eq!(r["status"], "ready");
    let _ = app
        .post(
            "/v1/generate",
            &json!({"prompt": "the", "max_new_tokens": 3}),
        )
        .await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for name in [
        "adapterd_http_requests_total",
        "adapterd_http_request_duration_seconds",
        "adapterd_time_to_first_token_seconds",
        "adapterd_e2e_request_latency_seconds",
        "adapterd_request_queue_seconds",
        "adapterd_prompt_tokens_total",
        "adapterd_generation_tokens_total",
        "adapterd_batch_size",
    ] {
        assert!(text.contains(name), "missing {name} in /metrics");
    }
    assert!(text.contains("route=\"/v1/generate\""));
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let app = spawn_app().await;
    let v: Value = app
        .post("/v1/tokenize", &json!({"text": "the cat"}))
        .await
        .json()
        .await
        .unwrap();
    let ids = v["tokens"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 6); // t, he, Ġ, c, a, t
    let d: Value = app
        .post("/v1/detokenize", &json!({"tokens": ids}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["text"], "the cat");
}

#[tokio::test]
async fn metrics_bind_moves_metrics_to_its_own_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = crate::helpers::test_settings(dir.path());
    s.server.metrics_bind = "127.0.0.1:0".into();
    let app = adapterd::app::Application::build(s).await.unwrap();
    let api = format!("http://{}", app.addr());
    let metrics = format!("http://{}", app.metrics_addr().expect("a metrics listener"));
    tokio::spawn(app.run(std::future::pending()));

    let scraped = reqwest::get(format!("{metrics}/metrics")).await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("adapterd_"));
    // The API port no longer serves it, and the metrics port serves nothing else.
    assert_eq!(
        reqwest::get(format!("{api}/metrics"))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        reqwest::get(format!("{metrics}/v1/models"))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        reqwest::get(format!("{api}/health"))
            .await
            .unwrap()
            .status(),
        200
    );
}
