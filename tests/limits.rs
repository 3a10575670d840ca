//! The limits of issue 6 that live in the API layer, through the real app: the per-tenant
//! token rate (429 + Retry-After naming `limits.tokens_per_minute`, other tenants unaffected),
//! the prompt cap (`limits.max_prompt_tokens`), the request timeout for a client that stalls
//! mid-body (408), the stream timeout (a last `error` event, and the slot is free again; a job's
//! event stream ends the same way), and
//! the connection-level header timeout (a client trickling its headers, or a keep-alive
//! connection left idle, is closed).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use helpers::{
    error_code, last_event, spawn_app_with, spawn_app_with_auth_and, spawn_long_context_app_with,
};

/// The smallest generation: once it is answered 200, whatever held the slot or the budget has
/// let go of it.
fn one_token() -> Value {
    json!({"prompt": "hi", "max_new_tokens": 1})
}

#[tokio::test]
async fn a_tenant_over_its_token_rate_gets_429_naming_the_limit_and_others_do_not() {
    let app = spawn_app_with_auth_and(|s| s.limits.tokens_per_minute = 100).await;
    let long = json!({"prompt": "the cat", "max_new_tokens": 150, "ignore_eos": true});
    assert_eq!(
        app.a.post("/v1/generate", &long).await.status(),
        200,
        "admitted: balance was positive"
    );
    let resp = app.a.post("/v1/generate", &one_token()).await;
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    let (code, msg) = error_code(resp, 429).await;
    assert_eq!(code, "limit_exceeded");
    assert!(msg.contains("limits.tokens_per_minute"), "{msg}");
    // The OpenAI routes share the bucket; tenant B has its own.
    let chat =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    error_code(app.a.post("/v1/chat/completions", &chat).await, 429).await;
    assert_eq!(
        app.b.post("/v1/chat/completions", &chat).await.status(),
        200
    );
    // Requests refused before admission cost nothing: tokenizing is not generation.
    assert_eq!(
        app.a
            .post("/v1/tokenize", &json!({"text": "hi"}))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_prompt_over_max_prompt_tokens_is_422_naming_the_setting() {
    let app = spawn_app_with(|s| s.limits.max_prompt_tokens = 5).await;
    let (code, msg) = error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": "the cat sat on the mat and then some", "max_new_tokens": 1}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(code, "invalid_value");
    assert!(msg.contains("limits.max_prompt_tokens"), "{msg}");
    let ok = app.post("/v1/generate", &one_token()).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_gets_408_and_does_not_hold_its_slot() {
    let app = spawn_app_with(|s| {
        s.server.request_timeout_seconds = 1;
        s.limits.max_concurrent_per_tenant = 1;
    })
    .await;
    // Half a JSON body, then nothing for longer than the timeout.
    let body = futures::stream::unfold(0, |step| async move {
        match step {
            0 => Some((Ok::<_, std::io::Error>("{\"prompt\": ".to_owned()), 1)),
            1 => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Some((Ok("\"hi\"}".to_owned()), 2))
            }
            _ => None,
        }
    });
    let started = Instant::now();
    let resp = app
        .client
        .post(format!("{}/v1/generate", app.base))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("answered");
    let (code, msg) = error_code(resp, 408).await;
    assert_eq!(code, "request_timeout");
    assert!(msg.contains("server.request_timeout_seconds"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let ok = app.post("/v1/generate", &one_token()).await;
    assert_eq!(ok.status(), 200, "the slot was given back");
}

#[tokio::test]
async fn a_stream_past_stream_timeout_ends_with_an_error_event_and_frees_its_slot() {
    // A long context, so the stream could run far longer than the limit.
    let app = spawn_long_context_app_with(|s| {
        s.server.stream_timeout_seconds = 1;
        s.engine.max_new_tokens_limit = 65000;
        s.limits.max_concurrent_per_tenant = 1;
    })
    .await;
    let started = Instant::now();
    let resp = app
        .post(
            "/v1/generate",
            &json!({"prompt": "hi", "stream": true, "ignore_eos": true, "max_new_tokens": 64000}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let last = last_event(&mut resp.bytes_stream(), Duration::from_secs(10)).await;
    assert!(
        last.starts_with("event: error") && last.contains("stream_timeout"),
        "{last}"
    );
    assert!(last.contains("server.stream_timeout_seconds"), "{last}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let ok = app.post("/v1/generate", &one_token()).await;
    assert_eq!(ok.status(), 200, "the slot was given back");
}

#[tokio::test]
async fn a_job_event_stream_is_bounded_by_stream_timeout_too() {
    // The job is never run (the test app's job loop is off), so its event stream would wait
    // for it forever.
    let app = spawn_app_with(|s| s.server.stream_timeout_seconds = 1).await;
    let job = json!({
        "method": "sft",
        "adapter_name": "waits",
        "training_data": [{"prompt": "ab", "completion": "xyz"}],
        "hyperparameters": {"rank": 8, "max_steps": 2},
    });
    let resp = app.post("/v1/finetune", &job).await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let started = Instant::now();
    let resp = app
        .get(&format!("/v1/finetune/{id}/events?stream=true"))
        .await;
    assert_eq!(resp.status(), 200);
    let last = last_event(&mut resp.bytes_stream(), Duration::from_secs(10)).await;
    assert!(
        last.starts_with("event: error") && last.contains("stream_timeout"),
        "{last}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Reads until the server closes the connection; `Err` if it is still open after `within`.
async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Err(got),
        }
    }
}

#[tokio::test]
async fn a_client_trickling_headers_or_idling_is_disconnected_at_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|s| s.server.header_timeout_seconds = 1).await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // Half a request line, then nothing: closed after about a second.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    closed_within(&mut slow, Duration::from_secs(10))
        .await
        .expect("a client that never finishes its headers is disconnected");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A finished keep-alive request is answered; then the idle connection is closed.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // A request sent promptly is unaffected by the timer.
    let resp = reqwest::get(format!("{}/health", app.base)).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_tenant_with_too_many_queued_requests_gets_429_naming_the_limit() {
    let app = spawn_long_context_app_with(|s| {
        s.engine.max_running = 1;
        s.engine.max_new_tokens_limit = 65000;
        s.limits.max_queued_per_tenant = 1;
    })
    .await;
    let long = json!({"prompt": "hi", "stream": true, "ignore_eos": true, "max_new_tokens": 64000});
    // The one running slot: a stream that would run for minutes.
    let running = app.post("/v1/generate", &long).await;
    assert_eq!(running.status(), 200);
    let mut running = running.bytes_stream();
    running.next().await.expect("first event").expect("bytes");
    // The tenant's one queue place.
    let queued = app.post("/v1/generate", &long).await;
    assert_eq!(queued.status(), 200);
    let (code, msg) = error_code(app.post("/v1/generate", &one_token()).await, 429).await;
    assert_eq!(code, "limit_exceeded");
    assert!(msg.contains("limits.max_queued_per_tenant"), "{msg}");

    // Both clients go away: the running slot and the queue place are given back.
    drop(running);
    drop(queued);
    let started = Instant::now();
    loop {
        let r = app.post("/v1/generate", &one_token()).await;
        if r.status() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still refused after the others left: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
