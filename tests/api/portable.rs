//! `model.kernels = "portable"`: the server on candle's generic ops, the code a GPU runs, gives
//! what the native CPU kernels give through the API — greedy text and logprobs with and without
//! adapters, concurrent mixed-adapter batches — and trains an adapter that serves at once.

use serde_json::{json, Value};

use crate::finetune::{job, sft_job, submit};
use crate::helpers::{spawn_app, spawn_app_with, tiny_adapter_files, TestApp};

async fn portable_app() -> TestApp {
    spawn_app_with(|s| s.model.kernels = "portable".into()).await
}

/// Greedy text and the logprob of each generated token.
async fn greedy(app: &TestApp, prompt: &str, adapter: Option<&str>) -> (String, Vec<f64>) {
    let mut body = json!({"prompt": prompt, "temperature": 0, "max_new_tokens": 8,
                          "logprobs": true, "ignore_eos": true});
    if let Some(a) = adapter {
        body["adapter_id"] = json!(a);
    }
    let v: Value = app.post_json("/v1/generate", &body).await;
    let logprobs = v["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {v}"))
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    (v["text"].as_str().unwrap().to_owned(), logprobs)
}

/// Same text, logprobs within 2e-2: the portable path holds the tiny model's matrices in f16
/// (as a GPU does; measured differences ~2e-3), and candle's f16 matmul rounds differently
/// for different row counts, so a batched step differs from a lone one by as much.
fn assert_close(what: &str, a: &(String, Vec<f64>), b: &(String, Vec<f64>)) {
    assert_eq!(a.0, b.0, "{what}: text");
    assert_eq!(a.1.len(), b.1.len(), "{what}: token count");
    for (x, y) in a.1.iter().zip(&b.1) {
        assert!((x - y).abs() < 2e-2, "{what}: logprob {x} vs {y}");
    }
}

#[tokio::test]
async fn the_portable_kernels_serve_what_the_native_ones_serve() {
    let (native, portable) = (spawn_app().await, portable_app().await);
    for app in [&native, &portable] {
        for (name, seed) in [("one", 1), ("two", 2)] {
            let (config, weights) = tiny_adapter_files(seed, 2.0);
            let resp = app.post_adapter(name, config, weights).await;
            assert_eq!(resp.status().as_u16(), 201);
        }
    }
    let cases = [
        ("ab", None),
        ("the quick", Some("one")),
        ("hello", Some("two")),
        ("ab", Some("one")),
    ];
    let mut want = Vec::new();
    for (prompt, adapter) in cases {
        let n = greedy(&native, prompt, adapter).await;
        let p = greedy(&portable, prompt, adapter).await;
        assert_close(&format!("{prompt:?} with {adapter:?}"), &n, &p);
        want.push(n);
    }
    assert_ne!(want[0].0, want[3].0, "the adapter changes the answer");

    // The same requests at once: one mixed batch of base and two adapters per step.
    let together = futures::future::join_all(
        cases
            .iter()
            .map(|(prompt, adapter)| greedy(&portable, prompt, *adapter)),
    )
    .await;
    for ((case, w), t) in cases.iter().zip(&want).zip(&together) {
        assert_close(&format!("batched {case:?}"), w, t);
    }
}

#[tokio::test]
async fn a_portable_server_trains_an_adapter_that_serves() {
    let app = portable_app().await;
    let id = submit(&app, &sft_job("learned", 40)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.run_jobs().await, 1);
    let done = job(&app, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    for (prompt, want) in [("ab", "xyz"), ("cd", "uvw")] {
        let v = app
            .post_json(
                "/v1/generate",
                &json!({"prompt": prompt, "adapter_id": "learned", "temperature": 0,
                        "max_new_tokens": 6}),
            )
            .await;
        assert_eq!(v["text"], want, "{v}");
    }
}
