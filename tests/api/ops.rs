//! Health, readiness, metrics, tokenize.

use serde_json::{json, Value};

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/health").await.status(), 200);
    let r: Value = app.get("/ready").await.json().await.unwrap();
    assert_eq!(r["status"], "ready");
    if !adapterd::engine::device::cuda_built() {
        // A CPU-only build serves from the CPU, on the native kernels unless told otherwise.
        assert_eq!(r["device"], "cpu", "{r}");
        let want = match std::env::var("ADAPTERD_TEST_KERNELS").as_deref() {
            Ok("portable") => "portable",
            _ => "native",
        };
        assert_eq!(r["kernels"], want, "{r}");
    }
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

#[tokio::test]
async fn invented_methods_do_not_become_metric_labels() {
    let app = spawn_app().await;
    for m in ["XYZZY1", "XYZZY2"] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        let resp = app
            .client
            .request(method, format!("{}/v1/models", app.base))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error(), "{m}: {}", resp.status());
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        !text.contains("XYZZY"),
        "a client-chosen method became a label"
    );
    assert!(text.contains("method=\"other\""));
}

/// The port answers from the moment it is bound: while the model loads (here: a FIFO the
/// loader blocks on) `/health` is 200 and everything else 503, and each answer closes its
/// connection so the next request reaches the real API. A start that then fails frees the port.
#[cfg(unix)]
#[tokio::test]
async fn the_port_answers_while_the_model_loads_and_a_failed_start_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("slow.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = crate::helpers::settings_serving(&fifo, dir.path());
    s.server.bind = format!("127.0.0.1:{port}");
    let build = tokio::spawn(adapterd::app::Application::build(s));

    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut health = None;
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            health = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let health = health.expect("/health answered while the model loads");
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["connection"], "close");
    for path in ["/ready", "/v1/models"] {
        let r = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert_eq!(r.headers()["retry-after"], "1", "{path}");
        let (code, msg) = crate::helpers::error_code(r, 503).await;
        assert_eq!(code, "unavailable");
        assert!(msg.contains("starting"), "{msg}");
    }
    let r = client
        .post(format!("{base}/v1/generate"))
        .json(&json!({"prompt": "the"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        !build.is_finished(),
        "the loader is still waiting on the FIFO"
    );

    // An empty "model" (the writer closes at once) fails the start.
    tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(&fifo))
        .await
        .unwrap()
        .unwrap();
    let failed = build.await.unwrap();
    assert!(
        failed.is_err(),
        "an empty model file cannot start the server"
    );
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free again");
}

/// Asking a CPU-only build for a GPU stops the start with a message naming the setting and
/// the feature, instead of silently serving from the CPU.
#[tokio::test]
async fn a_gpu_device_without_the_cuda_feature_is_a_clear_start_error() {
    if adapterd::engine::device::cuda_built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = crate::helpers::test_settings(dir.path());
    s.model.device = "cuda:0".into();
    let err = match adapterd::app::Application::build(s).await {
        Ok(_) => panic!("a CPU-only build started on model.device = cuda:0"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("model.device = cuda:0"), "{err}");
    assert!(err.contains("`cuda` feature"), "{err}");
}
