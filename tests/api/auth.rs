//! Auth and tenant isolation: 401s with the envelope, open routes, and "tenant B cannot …" for
//! every route that touches adapters; the per-tenant concurrency cap; the refusal to serve a
//! public address without auth.

use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with_auth, spawn_app_with_auth_and, tiny_adapter_files, TestApp};

/// Status and body, for comparing two answers byte for byte.
async fn answer(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

async fn expect_401(resp: reqwest::Response, code: &str) {
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp
        .headers()
        .get(WWW_AUTHENTICATE)
        .expect("WWW-Authenticate")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let v: Value = resp.json().await.expect("envelope");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn requests_without_a_usable_key_get_401_with_the_envelope() {
    let app = spawn_app_with_auth().await;
    let anon = &app.anon;
    let url = |p: &str| format!("{}{p}", anon.base);
    let gen = json!({"prompt": "the", "max_new_tokens": 2});
    // Missing, on every kind of /v1 route (an unknown one included: no route is revealed).
    expect_401(anon.get("/v1/adapters").await, "missing_api_key").await;
    expect_401(anon.get("/v1/models").await, "missing_api_key").await;
    expect_401(anon.get("/v1/models/tiny").await, "missing_api_key").await;
    expect_401(anon.post("/v1/generate", &gen).await, "missing_api_key").await;
    expect_401(
        anon.post("/v1/tokenize", &json!({"text": "x"})).await,
        "missing_api_key",
    )
    .await;
    expect_401(anon.get("/v1/no-such-route").await, "missing_api_key").await;
    // Wrong scheme, no key, two words.
    for value in [
        "Basic dGVuYW50LWE6eA==".to_owned(),
        "Bearer".to_owned(),
        format!("Token {}", app.a_key.key),
        format!("Bearer {} extra", app.a_key.key),
    ] {
        let resp = anon
            .client
            .get(url("/v1/models"))
            .header(AUTHORIZATION, value)
            .send()
            .await
            .unwrap();
        expect_401(resp, "invalid_api_key").await;
    }
    // Unknown: well-formed but never issued, and a real key with one character changed.
    let mut altered = app.a_key.key.clone();
    let last = if altered.ends_with('0') { "1" } else { "0" };
    altered.replace_range(altered.len() - 1.., last);
    for key in ["sk-adapterd-0000".to_owned(), altered] {
        let resp = anon
            .client
            .post(url("/v1/generate"))
            .header(AUTHORIZATION, format!("Bearer {key}"))
            .json(&gen)
            .send()
            .await
            .unwrap();
        expect_401(resp, "invalid_api_key").await;
    }
    // The real key works, with the scheme in any case.
    let resp = anon
        .client
        .get(url("/v1/models"))
        .header(AUTHORIZATION, format!("bearer {}", app.a_key.key))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_its_next_request() {
    let app = spawn_app_with_auth().await;
    assert_eq!(app.a.get("/v1/adapters").await.status(), 200);
    adapterd::keys::revoke(&app.db, &app.a_key.id)
        .await
        .expect("revoke");
    expect_401(app.a.get("/v1/adapters").await, "invalid_api_key").await;
    expect_401(
        app.a.post("/v1/tokenize", &json!({"text": "x"})).await,
        "invalid_api_key",
    )
    .await;
    assert_eq!(
        app.b.get("/v1/adapters").await.status(),
        200,
        "other keys are untouched"
    );
    let listed = adapterd::keys::list(&app.db).await.unwrap();
    let b = listed.iter().find(|k| k.id == app.b_key.id).unwrap();
    assert_eq!(
        (b.tenant.as_str(), b.revoked_at.as_deref()),
        ("tenant-b", None)
    );
    // A new key for the same tenant works and sees the same tenant.
    let fresh = adapterd::keys::create(&app.db, "tenant-a").await.unwrap();
    let resp = app
        .anon
        .client
        .get(format!("{}/v1/adapters", app.anon.base))
        .bearer_auth(&fresh.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn operations_and_the_planner_stay_open() {
    let app = spawn_app_with_auth().await;
    for path in [
        "/health",
        "/ready",
        "/metrics",
        "/chinchilla",
        "/v1/chinchilla?flops=1e21",
    ] {
        assert_eq!(app.anon.get(path).await.status(), 200, "{path}");
    }
    // The metrics page counts refused requests under their route, never a tenant or key.
    expect_401(app.anon.get("/v1/adapters").await, "missing_api_key").await;
    let text = app.anon.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("status=\"401\""), "401s are counted");
    assert!(!text.contains("tenant-a") && !text.contains(&app.a_key.key));
}

/// Every way tenant B could name tenant A's adapter `private`, as (label, request).
async fn probes(b: &TestApp) -> Vec<(&'static str, (u16, String))> {
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    vec![
        ("show", answer(b.get("/v1/adapters/private").await).await),
        (
            "model",
            answer(b.get("/v1/models/private").await).await,
        ),
        (
            "model@1",
            answer(b.get("/v1/models/private@1").await).await,
        ),
        (
            "generate",
            answer(
                b.post(
                    "/v1/generate",
                    &json!({"prompt": "the", "max_new_tokens": 2, "adapter_id": "private"}),
                )
                .await,
            )
            .await,
        ),
        (
            "generate@1",
            answer(
                b.post(
                    "/v1/generate",
                    &json!({"prompt": "the", "max_new_tokens": 2, "adapter_id": "private@1", "stream": true}),
                )
                .await,
            )
            .await,
        ),
        (
            "completions",
            answer(
                b.post(
                    "/v1/completions",
                    &json!({"model": "private", "prompt": "the", "max_tokens": 2}),
                )
                .await,
            )
            .await,
        ),
        (
            "chat",
            answer(b.post("/v1/chat/completions", &chat("private@1")).await).await,
        ),
        ("delete", answer(b.delete("/v1/adapters/private").await).await),
    ]
}

#[tokio::test]
async fn tenant_b_cannot_list_see_use_or_delete_tenant_a_adapters() {
    let app = spawn_app_with_auth().await;
    // What B gets for `private` while no one has it ...
    let before = probes(&app.b).await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    let created: Value = app
        .a
        .post_adapter("private", c, w)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(created["tenant"], "tenant-a");
    // ... is byte for byte what B gets once A owns it.
    let after = probes(&app.b).await;
    for ((label, was), (_, now)) in before.iter().zip(&after) {
        assert_eq!(was.0, 404, "{label}: {}", was.1);
        assert_eq!(
            was, now,
            "{label}: another tenant's adapter must look missing"
        );
    }
    // B's listings never show it.
    let list: Value = app.b.get("/v1/adapters").await.json().await.unwrap();
    assert_eq!(list["data"], json!([]));
    let models: Value = app.b.get("/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["tiny"]);
    // A still has it after B's delete attempt, and can use it.
    let shown: Value = app
        .a
        .get("/v1/adapters/private")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["version"], 1);
    let m: Value = app.a.get("/v1/models/private").await.json().await.unwrap();
    assert_eq!(
        (m["id"].as_str(), m["parent"].as_str()),
        (Some("private"), Some("tiny"))
    );
    let g: Value = app
        .a
        .post(
            "/v1/generate",
            &json!({"prompt": "the", "max_new_tokens": 2, "adapter_id": "private"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(g["adapter_id"], "private");
    let models: Value = app.a.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
}

/// The first generated token's logprob with `adapter`, greedy.
async fn first_logprob(app: &TestApp, adapter: &str) -> f64 {
    let body = json!({"prompt": "the cat", "max_new_tokens": 2, "temperature": 0,
                      "logprobs": true, "adapter_id": adapter});
    let v: Value = app.post("/v1/generate", &body).await.json().await.unwrap();
    v["tokens"][0]["logprob"].as_f64().expect("logprob")
}

#[tokio::test]
async fn two_tenants_each_own_an_adapter_named_support_and_b_cannot_replace_a_s() {
    let app = spawn_app_with_auth().await;
    let (ca, wa) = tiny_adapter_files(1, 4.0);
    let (cb, wb) = tiny_adapter_files(2, 4.0);
    let a1: Value = app
        .a
        .post_adapter("support", ca, wa)
        .await
        .json()
        .await
        .unwrap();
    let lp_a = first_logprob(&app.a, "support").await;
    // B uploading the same name makes B's own version 1, not A's version 2.
    let resp = app.b.post_adapter("support", cb, wb).await;
    assert_eq!(resp.status(), 201);
    let b1: Value = resp.json().await.unwrap();
    assert_eq!(
        (b1["tenant"].as_str(), b1["version"].as_i64()),
        (Some("tenant-b"), Some(1))
    );
    assert_ne!(a1["sha256"], b1["sha256"]);
    let a_now: Value = app
        .a
        .get("/v1/adapters/support")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(a_now["sha256"], a1["sha256"]);
    assert_eq!(a_now["versions"].as_array().unwrap().len(), 1);
    // Each tenant's requests use its own weights.
    assert_eq!(first_logprob(&app.a, "support").await, lp_a);
    let lp_b = first_logprob(&app.b, "support").await;
    assert_ne!(lp_a, lp_b);
    let c: Value = app
        .b
        .post(
            "/v1/completions",
            &json!({"model": "support", "prompt": "the", "max_tokens": 2}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["model"], "support@1");
    // On disk each lives under its tenant.
    for t in ["tenant-a", "tenant-b"] {
        let f = app.adapters_dir.join(t).join("support").join("1");
        assert!(
            f.join("adapter_model.safetensors").is_file(),
            "{}",
            f.display()
        );
    }
    // B deleting its `support` leaves A's alone.
    assert_eq!(app.b.delete("/v1/adapters/support").await.status(), 200);
    assert_eq!(app.b.get("/v1/adapters/support").await.status(), 404);
    assert_eq!(first_logprob(&app.a, "support").await, lp_a);
    assert!(app
        .adapters_dir
        .join("tenant-a/support/1/adapter_model.safetensors")
        .is_file());
}

#[tokio::test]
async fn the_per_tenant_cap_answers_429_while_a_stream_is_held_and_spares_other_tenants() {
    let app = spawn_app_with_auth_and(|s| s.limits.max_concurrent_per_tenant = 1).await;
    let long = json!({"prompt": "a", "max_new_tokens": 250, "ignore_eos": true, "stream": true});
    let short = json!({"prompt": "a", "max_new_tokens": 2});
    // The held stream may, on a fast machine, finish before the second request lands; then it
    // proves nothing, so try again (each try is a few hundred milliseconds at most).
    let mut refused = None;
    for _ in 0..5 {
        let held = app.a.post("/v1/generate", &long).await;
        assert_eq!(held.status(), 200);
        let mut stream = held.bytes_stream();
        let _first = stream.next().await.expect("first event").expect("chunk");
        let second = app.a.post("/v1/generate", &short).await;
        if second.status() == 429 {
            // Meanwhile tenant B is not held back by A's stream.
            let other = app.b.post("/v1/generate", &short).await;
            assert_eq!(other.status(), 200, "tenant B has its own cap");
            refused = Some(second);
            while let Some(chunk) = stream.next().await {
                chunk.expect("stream chunk");
            }
            break;
        }
        assert_eq!(second.status(), 200);
        drop(stream);
    }
    let refused = refused.expect("a second concurrent request of tenant A was never refused");
    let retry = refused.headers().get("retry-after").expect("Retry-After");
    assert_eq!(retry.to_str().unwrap(), "1");
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "limit_exceeded");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("limits.max_concurrent_per_tenant"), "{msg}");
    // Once the stream has ended the slot is free again (the permit goes when the body is
    // dropped, a moment after its last byte).
    let mut ok = false;
    for _ in 0..50 {
        let resp = app
            .a
            .post(
                "/v1/completions",
                &json!({"model": "tiny", "prompt": "a", "max_tokens": 2}),
            )
            .await;
        if resp.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the finished stream's slot was not released");
    // A stream the client drops also frees its slot.
    let held = app.a.post("/v1/generate", &long).await;
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        if app.a.post("/v1/generate", &short).await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "a dropped stream's slot was not released");
}

#[tokio::test]
async fn a_public_bind_is_refused_without_auth_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = crate::helpers::test_settings(dir.path());
    s.server.bind = "0.0.0.0:0".into();
    let err = match adapterd::app::Application::build(s.clone()).await {
        Ok(_) => panic!("a public bind with auth off must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("--insecure") && err.contains("--auth"),
        "{err}"
    );
    s.auth.insecure = true;
    let app = adapterd::app::Application::build(s.clone())
        .await
        .expect("--insecure accepts the risk");
    drop(app);
    s.auth.insecure = false;
    s.auth.enabled = true;
    adapterd::app::Application::build(s)
        .await
        .expect("auth on may bind anywhere");
}
