//! `/v1/adapters`: upload, versions (hot-swap), use in generation, listing, deletion, and
//! refusal of bad uploads before anything is stored.

use serde_json::{json, Value};

use crate::helpers::{error_code, spawn_app, tiny_adapter_files};

/// The first generated token's logprob and the text, greedy, for a given adapter (or none).
pub(crate) async fn first_logprob(
    app: &crate::helpers::TestApp,
    adapter: Option<&str>,
) -> (f64, Value) {
    let mut body =
        json!({"prompt": "the cat", "max_new_tokens": 6, "temperature": 0, "logprobs": true});
    if let Some(a) = adapter {
        body["adapter_id"] = json!(a);
    }
    let v: Value = app.post("/v1/generate", &body).await.json().await.unwrap();
    (v["tokens"][0]["logprob"].as_f64().unwrap(), v)
}

#[tokio::test]
async fn an_uploaded_adapter_is_listed_and_changes_generation() {
    let app = spawn_app().await;
    let (config, weights) = tiny_adapter_files(1, 4.0);
    let resp = app.post_adapter("support", config, weights.clone()).await;
    assert_eq!(resp.status(), 201);
    let a: Value = resp.json().await.unwrap();
    assert_eq!(a["name"], "support");
    assert_eq!(a["version"], 1);
    assert_eq!(a["tenant"], "default");
    assert_eq!(a["rank"], 4);
    assert_eq!(a["source"], "upload");
    assert_eq!(a["target_modules"], json!(["q_proj", "v_proj"]));
    assert_eq!(a["size_bytes"].as_u64().unwrap(), weights.len() as u64);
    assert_eq!(a["sha256"].as_str().unwrap().len(), 64);

    let list: Value = app.get("/v1/adapters").await.json().await.unwrap();
    assert_eq!(list["data"][0]["name"], "support");
    let models: Value = app.get("/v1/models").await.json().await.unwrap();
    let m = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "support")
        .unwrap();
    assert_eq!(m["parent"], "tiny");

    let (base_lp, _) = first_logprob(&app, None).await;
    let (lp, v) = first_logprob(&app, Some("support")).await;
    assert_eq!(v["adapter_id"], "support");
    assert_eq!(v["adapter_version"], 1);
    assert!(
        (lp - base_lp).abs() > 1e-4,
        "the adapter must change the model: {lp} vs {base_lp}"
    );

    // The OpenAI endpoints take the adapter as `model`.
    let c: Value = app
        .post("/v1/chat/completions", &json!({"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["model"], "support@1");
}

#[tokio::test]
async fn uploading_the_same_name_makes_a_new_version_and_old_versions_stay_addressable() {
    let app = spawn_app().await;
    let (c1, w1) = tiny_adapter_files(1, 4.0);
    let (c2, w2) = tiny_adapter_files(2, 4.0);
    assert_eq!(app.post_adapter("x", c1, w1).await.status(), 201);
    let (lp1, _) = first_logprob(&app, Some("x")).await;
    let v2: Value = app.post_adapter("x", c2, w2).await.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    let (lp_new, v) = first_logprob(&app, Some("x")).await;
    assert_eq!(v["adapter_version"], 2);
    let (lp_old, v) = first_logprob(&app, Some("x@1")).await;
    assert_eq!(v["adapter_version"], 1);
    assert_eq!(lp_old, lp1, "a version is immutable");
    assert_ne!(lp_new, lp1);
    let shown: Value = app.get("/v1/adapters/x").await.json().await.unwrap();
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_deleted_adapter_is_gone_everywhere() {
    let app = spawn_app().await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    assert_eq!(app.post_adapter("gone", c, w).await.status(), 201);
    assert_eq!(app.delete("/v1/adapters/gone").await.status(), 200);
    error_code(app.get("/v1/adapters/gone").await, 404).await;
    error_code(app.delete("/v1/adapters/gone").await, 404).await;
    error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": "a", "adapter_id": "gone"}),
        )
        .await,
        404,
    )
    .await;
    let (code, _) = error_code(
        app.post("/v1/completions", &json!({"model": "gone", "prompt": "a"}))
            .await,
        404,
    )
    .await;
    assert_eq!(code, "model_not_found");
    let list: Value = app.get("/v1/adapters").await.json().await.unwrap();
    assert!(list["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn bad_uploads_are_refused_with_a_message_naming_the_problem_and_nothing_is_stored() {
    let app = spawn_app().await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    let (_, msg) = error_code(
        app.post_adapter("Bad/Name", c.clone(), w.clone()).await,
        422,
    )
    .await;
    assert!(msg.contains("name"), "{msg}");
    let (_, msg) = error_code(app.post_adapter("../etc", c.clone(), w.clone()).await, 422).await;
    assert!(msg.contains("name"), "{msg}");
    let (code, msg) = error_code(
        app.post_adapter("ok", c.clone(), b"not safetensors".to_vec())
            .await,
        422,
    )
    .await;
    assert_eq!(code, "invalid_adapter");
    assert!(msg.contains("safetensors"), "{msg}");
    let mut cfg: Value = serde_json::from_slice(&c).unwrap();
    cfg["use_dora"] = json!(true);
    let (_, msg) = error_code(
        app.post_adapter("ok", cfg.to_string().into_bytes(), w.clone())
            .await,
        422,
    )
    .await;
    assert!(msg.contains("use_dora"), "{msg}");
    // An adapter for another model's shapes: every tensor is checked against the base.
    let mut cfg: Value = serde_json::from_slice(&c).unwrap();
    cfg["r"] = json!(8);
    cfg["lora_alpha"] = json!(16);
    let (_, msg) = error_code(
        app.post_adapter("ok", cfg.to_string().into_bytes(), w.clone())
            .await,
        422,
    )
    .await;
    assert!(
        msg.contains("lora_A") || msg.contains("shape") || msg.contains("expected"),
        "{msg}"
    );
    let form = reqwest::multipart::Form::new().text("name", "ok");
    let resp = app
        .client
        .post(format!("{}/v1/adapters", app.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (_, msg) = error_code(resp, 422).await;
    assert!(msg.contains("adapter_config.json"), "{msg}");
    let list: Value = app.get("/v1/adapters").await.json().await.unwrap();
    assert!(
        list["data"].as_array().unwrap().is_empty(),
        "nothing may be stored: {list}"
    );
    let (code, _) = error_code(
        app.post(
            "/v1/generate",
            &json!({"prompt": "a", "adapter_id": "Bad@x"}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(code, "invalid_value");
}

#[tokio::test]
async fn a_stream_that_started_before_an_upload_finishes_on_its_version() {
    use futures::StreamExt;
    let app = spawn_app().await;
    let (c1, w1) = tiny_adapter_files(1, 4.0);
    let (c2, w2) = tiny_adapter_files(2, 4.0);
    assert_eq!(app.post_adapter("hot", c1, w1).await.status(), 201);
    let body = json!({"prompt": "a", "adapter_id": "hot", "max_new_tokens": 250, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    let resp = app.post("/v1/generate", &body).await;
    let mut stream = resp.bytes_stream();
    let mut raw = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    // The stream is running on version 1; version 2 arrives now.
    let v2: Value = app.post_adapter("hot", c2, w2).await.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    while let Some(chunk) = stream.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let last: Value = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .next_back()
        .unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 250);
    assert_eq!(
        last["adapter_version"], 1,
        "a running request keeps its version"
    );
    let (_, after) = first_logprob(&app, Some("hot")).await;
    assert_eq!(
        after["adapter_version"], 2,
        "requests after the upload get the new version"
    );
}

#[tokio::test]
async fn adapters_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    assert_eq!(first.post_adapter("kept", c, w).await.status(), 201);
    let (lp_before, _) = first_logprob(&first, Some("kept")).await;
    // A second process on the same database and store (the first is still serving, which
    // SQLite's WAL mode allows) sees the adapter and loads it from disk.
    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let list: Value = second.get("/v1/adapters").await.json().await.unwrap();
    assert_eq!(list["data"][0]["name"], "kept");
    let (lp_after, v) = first_logprob(&second, Some("kept")).await;
    assert_eq!(v["adapter_version"], 1);
    assert_eq!(lp_after, lp_before);
    let metrics = second.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("adapterd_adapter_loads_total"),
        "a cold load is counted"
    );
}

#[tokio::test]
async fn a_hundred_adapters_round_robin_through_a_cache_that_holds_ten() {
    // Each tiny adapter holds 2 layers × (q: 4×64 + 64×4, v: 4×64 + 32×4) values, resident as
    // f16 on the CPU: 3584 bytes.
    let app = crate::helpers::spawn_app_with(|s| s.adapters.cache_bytes = 10 * 3584).await;
    let mut expected = Vec::new();
    for i in 0..100u64 {
        let (c, w) = tiny_adapter_files(100 + i, 4.0);
        let resp = app.post_adapter(&format!("a{i}"), c, w).await;
        assert_eq!(resp.status(), 201);
    }
    for round in 0..2 {
        for i in 0..100u64 {
            let (lp, v) = first_logprob(&app, Some(&format!("a{i}"))).await;
            assert_eq!(v["adapter_id"], format!("a{i}"));
            if round == 0 {
                expected.push(lp);
            } else {
                assert_eq!(
                    lp, expected[i as usize],
                    "adapter a{i} reloaded from disk must be the same"
                );
            }
        }
    }
    // The recorder is shared by every app in this test process; the budget of the others is
    // large, so these bounds are this app's.
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(value("adapterd_adapters_resident") <= 10.0);
    assert!(value("adapterd_adapter_cache_bytes") <= 35840.0);
    assert!(
        value("adapterd_adapter_cache_evictions_total") >= 180.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn start_up_removes_adapter_directories_no_version_points_at() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    assert_eq!(
        first
            .post_adapter("real", c.clone(), w.clone())
            .await
            .status(),
        201
    );
    // What a crash could leave: a renamed version whose row was never written, and a temp dir.
    let store = dir.path().join("adapters").join("default");
    std::fs::create_dir_all(store.join("ghost").join("1")).unwrap();
    std::fs::write(
        store.join("ghost").join("1").join("adapter_config.json"),
        &c,
    )
    .unwrap();
    std::fs::create_dir_all(store.join("real").join(".tmp-abc")).unwrap();
    // And a serving copy's temp file a crash left inside a live version.
    let stray = store.join("real/1/.serving.safetensors.0123abcd");
    std::fs::write(&stray, b"half a copy").unwrap();
    let stray_int8 = store.join("real/1/.serving-int8.safetensors.4567cdef");
    std::fs::write(&stray_int8, b"half an int8 copy").unwrap();
    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    assert!(!store.join("ghost").join("1").exists());
    assert!(!store.join("real").join(".tmp-abc").exists());
    assert!(!stray.exists());
    assert!(!stray_int8.exists());
    assert!(store.join("real/1/serving.safetensors").exists());
    assert!(store
        .join("real")
        .join("1")
        .join("adapter_model.safetensors")
        .exists());
    error_code(
        second
            .post(
                "/v1/generate",
                &json!({"prompt": "a", "adapter_id": "ghost"}),
            )
            .await,
        404,
    )
    .await;
    let (_, v) = first_logprob(&second, Some("real")).await;
    assert_eq!(v["adapter_version"], 1);
}

#[tokio::test]
async fn a_corrupted_adapter_file_fails_that_adapter_with_a_clear_error_not_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    assert_eq!(first.post_adapter("broken", c, w).await.status(), 201);
    // Both copies of the weights: the upload and the serving copy a cold load reads first.
    let version = dir.path().join("adapters/default/broken/1");
    for file in ["adapter_model.safetensors", "serving.safetensors"] {
        std::fs::write(version.join(file), b"truncated").unwrap();
    }
    // A fresh process has nothing cached, so it must read the damaged file.
    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (code, msg) = error_code(
        second
            .post(
                "/v1/generate",
                &json!({"prompt": "a", "adapter_id": "broken"}),
            )
            .await,
        500,
    )
    .await;
    assert_eq!(code, "adapter_damaged");
    assert!(msg.contains("broken"), "{msg}");
    let ok = second
        .post("/v1/generate", &json!({"prompt": "a", "max_new_tokens": 2}))
        .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_valid_substitute_written_into_the_store_is_refused_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c1, w1) = tiny_adapter_files(1, 4.0);
    let (_, w2) = tiny_adapter_files(2, 4.0);
    assert_eq!(first.post_adapter("victim", c1, w1).await.status(), 201);
    // Someone with write access to the store swaps in other, perfectly valid weights, for
    // both the upload and the serving copy.
    let version = dir.path().join("adapters/default/victim/1");
    for file in ["adapter_model.safetensors", "serving.safetensors"] {
        std::fs::write(version.join(file), &w2).unwrap();
    }
    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (code, msg) = error_code(
        second
            .post(
                "/v1/generate",
                &json!({"prompt": "a", "adapter_id": "victim"}),
            )
            .await,
        500,
    )
    .await;
    assert_eq!(code, "adapter_damaged");
    assert!(msg.contains("victim"), "{msg}");
}

#[tokio::test]
async fn uploads_past_the_tenant_storage_quota_get_403_naming_the_setting() {
    let (c, w) = tiny_adapter_files(1, 4.0);
    let app =
        crate::helpers::spawn_app_with(|s| s.limits.max_adapter_versions_per_tenant = 2).await;
    assert_eq!(
        app.post_adapter("one", c.clone(), w.clone()).await.status(),
        201
    );
    assert_eq!(
        app.post_adapter("two", c.clone(), w.clone()).await.status(),
        201
    );
    let (code, msg) = error_code(app.post_adapter("three", c.clone(), w.clone()).await, 403).await;
    assert_eq!(code, "quota_exceeded");
    assert!(
        msg.contains("limits.max_adapter_versions_per_tenant"),
        "{msg}"
    );
    // Deleting frees quota.
    assert_eq!(app.delete("/v1/adapters/one").await.status(), 200);
    assert_eq!(
        app.post_adapter("three", c.clone(), w.clone())
            .await
            .status(),
        201
    );

    let bytes = w.len() as u64;
    let app = crate::helpers::spawn_app_with(|s| {
        s.limits.max_adapter_bytes_per_tenant = bytes * 3 / 2;
    })
    .await;
    assert_eq!(
        app.post_adapter("one", c.clone(), w.clone()).await.status(),
        201
    );
    let (code, msg) = error_code(app.post_adapter("one", c, w).await, 403).await;
    assert_eq!(code, "quota_exceeded");
    assert!(msg.contains("limits.max_adapter_bytes_per_tenant"), "{msg}");
}

#[tokio::test]
async fn versions_stored_before_blake3_are_checked_against_their_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c1, w1) = tiny_adapter_files(1, 4.0);
    let (_, w2) = tiny_adapter_files(2, 4.0);
    assert_eq!(
        first.post_adapter("old", c1.clone(), w1).await.status(),
        201
    );
    assert_eq!(
        first.post_adapter("older", c1, w2.clone()).await.status(),
        201
    );
    // What a database from before migration 0003 holds: no BLAKE3, no serving copy.
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let db = adapterd::store::connect(&url).await.unwrap();
    sqlx::query("UPDATE adapters SET blake3 = NULL, serving_blake3 = NULL")
        .execute(&db)
        .await
        .unwrap();
    std::fs::write(
        dir.path()
            .join("adapters/default/older/1/adapter_model.safetensors"),
        tiny_adapter_files(3, 4.0).1,
    )
    .unwrap();
    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (_, v) = first_logprob(&second, Some("old")).await;
    assert_eq!(v["adapter_version"], 1, "{v}");
    let (code, _) = error_code(
        second
            .post(
                "/v1/generate",
                &json!({"prompt": "a", "adapter_id": "older"}),
            )
            .await,
        500,
    )
    .await;
    assert_eq!(code, "adapter_damaged");
}

#[tokio::test]
async fn a_cold_load_reads_the_serving_copy_and_falls_back_to_the_upload_when_it_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c1, w1) = tiny_adapter_files(1, 4.0);
    let (_, w2) = tiny_adapter_files(2, 4.0);
    assert_eq!(first.post_adapter("a", c1.clone(), w1).await.status(), 201);
    assert_eq!(first.post_adapter("b", c1, w2).await.status(), 201);
    let (lp_a, _) = first_logprob(&first, Some("a")).await;
    let (lp_b, _) = first_logprob(&first, Some("b")).await;
    assert_ne!(lp_a, lp_b);
    let store = dir.path().join("adapters/default");
    let copy = |n: &str| store.join(n).join("1").join("serving.safetensors");
    let upload = |n: &str| store.join(n).join("1").join("adapter_model.safetensors");
    // The serving copy is what a cold load reads: with the upload gone, `a` still serves.
    std::fs::remove_file(upload("a")).unwrap();
    // `b`'s serving copy is swapped for `a`'s, a valid file: its hash check refuses it and the
    // upload serves instead.
    std::fs::copy(copy("a"), copy("b")).unwrap();
    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(first_logprob(&second, Some("a")).await.0, lp_a);
    assert_eq!(first_logprob(&second, Some("b")).await.0, lp_b);
}

#[tokio::test]
async fn a_version_stored_before_serving_copies_gets_one_at_its_first_load() {
    let dir = tempfile::tempdir().unwrap();
    let first = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    assert_eq!(first.post_adapter("old", c, w).await.status(), 201);
    let (lp, _) = first_logprob(&first, Some("old")).await;
    // What a store from before migration 0004 holds: no copy, no hash for it.
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let db = adapterd::store::connect(&url).await.unwrap();
    sqlx::query("UPDATE adapters SET serving_blake3 = NULL")
        .execute(&db)
        .await
        .unwrap();
    let version = dir.path().join("adapters/default/old/1");
    std::fs::remove_file(version.join("serving.safetensors")).unwrap();

    let second = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(first_logprob(&second, Some("old")).await.0, lp);
    // Written in the background after that load, and recorded.
    let mut recorded = None;
    for _ in 0..100 {
        recorded = sqlx::query_scalar::<_, Option<String>>(
            "SELECT serving_blake3 FROM adapters WHERE name = 'old'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if recorded.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(recorded.is_some(), "the copy's hash was never recorded");
    assert!(version.join("serving.safetensors").exists());
    // The next cold load reads the copy: it serves the same adapter without the upload.
    std::fs::remove_file(version.join("adapter_model.safetensors")).unwrap();
    let third = crate::helpers::spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(first_logprob(&third, Some("old")).await.0, lp);
}
