//! `/v1/finetune` end to end on the tiny model: an SFT job trains and its adapter serves at
//! once; a DPO job reports rewards; bad submissions are refused before anything is stored;
//! cancel; tenant isolation; and a job interrupted by a restart resumes from its checkpoint and
//! produces exactly the adapter an uninterrupted run produces.

use serde_json::{json, Value};

use crate::helpers::{error_code, spawn_app, spawn_app_in, spawn_app_with_auth, TestApp};

fn sft_records() -> Value {
    json!([
        {"prompt": "ab", "completion": "xyz"},
        {"prompt": "cd", "completion": "uvw"},
    ])
}

pub(crate) fn sft_job(name: &str, steps: usize) -> Value {
    json!({
        "method": "sft",
        "adapter_name": name,
        "training_data": sft_records(),
        "hyperparameters": {"rank": 8, "alpha": 16, "learning_rate": 0.01, "batch_size": 2,
                            "max_steps": steps, "warmup_steps": 0, "lr_scheduler": "constant",
                            "seed": 3, "checkpoint_every": 2},
    })
}

pub(crate) async fn submit(app: &TestApp, body: &Value) -> Value {
    let resp = app.post("/v1/finetune", body).await;
    assert_eq!(resp.status().as_u16(), 202);
    resp.json().await.unwrap()
}

pub(crate) async fn job(app: &TestApp, id: &str) -> Value {
    let resp = app.get(&format!("/v1/finetune/{id}")).await;
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

async fn generate(app: &TestApp, prompt: &str, adapter: Option<&str>) -> String {
    let mut body = json!({"prompt": prompt, "temperature": 0, "max_new_tokens": 6});
    if let Some(a) = adapter {
        body["adapter_id"] = json!(a);
    }
    let v = app.post_json("/v1/generate", &body).await;
    v["text"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_sft_job_trains_and_its_adapter_serves_immediately() {
    let app = spawn_app().await;
    let before = generate(&app, "ab", None).await;
    assert_ne!(before, "xyz");
    let queued = submit(&app, &sft_job("learned", 40)).await;
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["progress"]["total_steps"], 40);
    let id = queued["id"].as_str().unwrap().to_owned();

    assert_eq!(app.run_jobs().await, 1);
    let done = job(&app, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["adapter_version"], 1);
    assert_eq!(done["adapter_id"], "learned@1");
    assert_eq!(done["progress"]["step"], 40);
    assert!(done["metrics"]["loss"].as_f64().unwrap() < 0.05, "{done}");
    assert_eq!(done["dataset_sha256"].as_str().unwrap().len(), 64);

    // The adapter is registered with its lineage and answers with what it was taught.
    let a = app.get_json("/v1/adapters/learned").await;
    assert_eq!(a["source"], "finetune", "{a}");
    assert_eq!(a["job_id"], id.as_str());
    assert_eq!(a["lineage"]["dataset_sha256"], done["dataset_sha256"]);
    assert_eq!(a["lineage"]["hyperparameters"]["rank"], 8);
    assert_eq!(generate(&app, "ab", Some("learned")).await, "xyz");
    assert_eq!(generate(&app, "cd", Some("learned")).await, "uvw");
    assert_eq!(
        generate(&app, "ab", None).await,
        before,
        "the base is untouched"
    );

    // Events: queued, started, one metrics event per step with falling loss, success.
    let ev: Value = app.get_json(&format!("/v1/finetune/{id}/events")).await;
    let events = ev["data"].as_array().unwrap();
    let losses: Vec<f64> = events
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["data"]["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 40);
    assert!(losses[39] < losses[0] / 10.0, "{losses:?}");
    let metrics = &events.iter().find(|e| e["type"] == "metrics").unwrap()["data"];
    for key in ["learning_rate", "tokens_per_s", "grad_norm", "eta_seconds"] {
        assert!(metrics[key].is_number(), "{key} in {metrics}");
    }
    assert!(events.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("learned@1 is live"));

    // The SSE form replays the same events and ends.
    let text = app
        .get_text(&format!("/v1/finetune/{id}/events?stream=true"))
        .await;
    assert_eq!(text.matches("event: finetune.event").count(), events.len());
    assert!(text.contains("[DONE]"));

    let list = app.get_json("/v1/finetune").await;
    assert_eq!(list["data"][0]["id"], id.as_str());
}

#[tokio::test]
async fn a_dpo_job_reports_rewards_and_registers_its_adapter() {
    let app = spawn_app().await;
    let body = json!({
        "method": "dpo",
        "adapter_name": "prefers",
        "training_data": [
            {"prompt": "ab", "chosen": "yes", "rejected": "no"},
            {"input": {"messages": [{"role": "user", "content": "cd"}]},
             "preferred_output": [{"role": "assistant", "content": "good"}],
             "non_preferred_output": [{"role": "assistant", "content": "bad"}]},
        ],
        "hyperparameters": {"rank": 4, "learning_rate": 0.01, "batch_size": 2, "max_steps": 15,
                            "beta": 0.5, "warmup_steps": 0},
    });
    let id = submit(&app, &body).await["id"].as_str().unwrap().to_owned();
    app.run_jobs().await;
    let done = job(&app, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let m = &done["metrics"];
    assert!(m["reward_margin"].as_f64().unwrap() > 0.0, "{m}");
    assert_eq!(m["reward_accuracy"], 1.0);
    assert!(m["chosen_reward"].is_number() && m["rejected_reward"].is_number());
    let a = app.get_json("/v1/adapters/prefers").await;
    assert_eq!(a["source"], "finetune");
}

#[tokio::test]
async fn bad_submissions_are_refused_naming_the_problem_and_store_nothing() {
    let app = spawn_app().await;
    let cases = vec![
        (
            json!({"method": "sft", "adapter_name": "x"}),
            422,
            "training_data",
        ),
        (
            json!({"method": "sft", "adapter_name": "x", "training_data": [], "training_file": "file-1"}),
            422,
            "not both",
        ),
        (
            json!({"method": "sft", "adapter_name": "X/..", "training_data": sft_records()}),
            422,
            "adapter_name",
        ),
        (
            json!({"method": "sft", "adapter_name": "x",
                   "training_data": [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completon": "b"}]}),
            422,
            "training_data[1]",
        ),
        (
            json!({"method": "dpo", "adapter_name": "x", "training_data": sft_records()}),
            422,
            "training_data[0]",
        ),
        (
            json!({"method": "sft", "adapter_name": "x", "training_file": "file-nope"}),
            422,
            "training_file",
        ),
        (
            json!({"method": "sft", "adapter_name": "x", "training_data": sft_records(),
                   "hyperparameters": {"rank": 0}}),
            422,
            "hyperparameters.rank",
        ),
        (
            json!({"method": "sft", "adapter_name": "x", "training_data": sft_records(),
                   "hyperparameters": {"learning_rat": 0.1}}),
            422,
            "learning_rat",
        ),
        (
            json!({"method": "ppo", "adapter_name": "x", "training_data": sft_records()}),
            422,
            "method",
        ),
    ];
    for (body, status, needle) in cases {
        let resp = app.post("/v1/finetune", &body).await;
        let (_, msg) = error_code(resp, status).await;
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let resp = app.post_raw("/v1/finetune", "{not json").await;
    error_code(resp, 400).await;
    let list = app.get_json("/v1/finetune").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let (code, _) = error_code(app.get("/v1/finetune/ftjob-missing").await, 404).await;
    assert_eq!(code, "job_not_found");
}

#[tokio::test]
async fn a_training_file_can_be_named_and_deleting_it_later_strands_nothing() {
    let app = spawn_app().await;
    let jsonl = "{\"prompt\": \"ab\", \"completion\": \"xyz\"}\n{\"prompt\": \"cd\", \"completion\": \"uvw\"}\n";
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part(
            "file",
            reqwest::multipart::Part::bytes(jsonl.as_bytes().to_vec()).file_name("train.jsonl"),
        );
    let f: Value = app.post_form("/v1/files", form).await.json().await.unwrap();
    let file_id = f["id"].as_str().unwrap().to_owned();
    let mut body = sft_job("fromfile", 4);
    body.as_object_mut().unwrap().remove("training_data");
    body["training_file"] = json!(file_id);
    let queued = submit(&app, &body).await;
    assert_eq!(queued["training_file"], file_id.as_str());
    let resp = app.delete(&format!("/v1/files/{file_id}")).await;
    assert_eq!(resp.status().as_u16(), 200);
    app.run_jobs().await;
    let done = job(&app, queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

#[tokio::test]
async fn a_cancelled_job_never_runs_and_cannot_be_cancelled_twice() {
    let app = spawn_app().await;
    let id = submit(&app, &sft_job("never", 5)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = app
        .post(&format!("/v1/finetune/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    assert_eq!(app.run_jobs().await, 0);
    assert_eq!(job(&app, &id).await["status"], "cancelled");
    let (code, _) = error_code(
        app.post(&format!("/v1/finetune/{id}/cancel"), &json!({}))
            .await,
        409,
    )
    .await;
    assert_eq!(code, "job_finished");
    let (code, _) = error_code(app.get("/v1/adapters/never").await, 404).await;
    assert_eq!(code, "not_found");
}

#[tokio::test]
async fn tenant_b_cannot_see_cancel_or_follow_tenant_a_jobs() {
    let app = spawn_app_with_auth().await;
    let id = submit(&app.a, &sft_job("mine", 2)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let missing = app.b.get("/v1/finetune/ftjob-0000").await;
    let missing_body = {
        let (_, msg) = error_code(missing, 404).await;
        msg.replace("ftjob-0000", "")
    };
    for path in [
        format!("/v1/finetune/{id}"),
        format!("/v1/finetune/{id}/events"),
    ] {
        let (code, msg) = error_code(app.b.get(&path).await, 404).await;
        assert_eq!(code, "job_not_found");
        assert_eq!(msg.replace(&id, ""), missing_body);
    }
    let (code, _) = error_code(
        app.b
            .post(&format!("/v1/finetune/{id}/cancel"), &json!({}))
            .await,
        404,
    )
    .await;
    assert_eq!(code, "job_not_found");
    let list = app.b.get_json("/v1/finetune").await;
    assert!(list["data"].as_array().unwrap().is_empty());
    // The job still belongs to A and is untouched.
    assert_eq!(job(&app.a, &id).await["status"], "queued");
    app.a.run_jobs().await;
    assert_eq!(job(&app.a, &id).await["status"], "succeeded");
    let (code, _) = error_code(app.b.get("/v1/adapters/mine").await, 404).await;
    assert_eq!(code, "not_found");
}

#[tokio::test]
async fn a_tenant_with_too_many_active_jobs_gets_429() {
    let app = crate::helpers::spawn_app_with(|s| s.finetune.max_active_per_tenant = 1).await;
    submit(&app, &sft_job("one", 2)).await;
    let resp = app.post("/v1/finetune", &sft_job("two", 2)).await;
    let (code, msg) = error_code(resp, 429).await;
    assert_eq!(code, "limit_exceeded");
    assert!(msg.contains("finetune.max_active_per_tenant"), "{msg}");
}

/// sha256 of the adapter version the API reports.
async fn adapter_sha(app: &TestApp, name: &str) -> String {
    let a: Value = app.get_json(&format!("/v1/adapters/{name}")).await;
    a["sha256"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_job_interrupted_by_a_restart_resumes_from_its_checkpoint_exactly() {
    use adapterd::engine::train::checkpoint::Checkpoint;
    use adapterd::engine::train::data::DatasetLimits;
    use adapterd::jobs::{prepare_examples, JobSpec};

    let dir = tempfile::tempdir().unwrap();
    // The reference: the same job run without interruption.
    let app = spawn_app_in(dir.path(), |_| {}).await;
    submit(&app, &sft_job("straight", 6)).await;
    app.run_jobs().await;
    let want = adapter_sha(&app, "straight").await;

    // The twin job, "killed" after 4 of 6 steps: its row is left `running` with the
    // checkpoint the runner would have written at step 4.
    let id = submit(&app, &sft_job("resumed", 6)).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("test.db").display()
    ))
    .await
    .unwrap();
    let request: String = sqlx::query_scalar("SELECT request FROM finetune_jobs WHERE id = ?")
        .bind(&id)
        .fetch_one(&db)
        .await
        .unwrap();
    let spec: JobSpec = serde_json::from_str(&request).unwrap();
    // The same device and kernels the servers use, or the steps would not match bit for bit.
    let s = crate::helpers::test_settings(dir.path());
    let device = s.device_spec().unwrap().resolve().unwrap();
    let kernels = s.kernels_for(&device).unwrap();
    let loaded =
        adapterd::engine::load_model_with(&dir.path().join("tiny"), &device, kernels).unwrap();
    let mut jsonl = Vec::new();
    for r in sft_records().as_array().unwrap() {
        jsonl.extend(serde_json::to_vec(r).unwrap());
        jsonl.push(b'\n');
    }
    let limits = DatasetLimits {
        max_records: 100,
        max_bytes: 1 << 20,
    };
    let examples =
        prepare_examples(&jsonl, &spec.hyperparameters, &loaded.tokenizer, &limits).unwrap();
    let mut t = adapterd::engine::train::Trainer::new(
        std::sync::Arc::new(loaded.model),
        spec.hyperparameters.clone(),
        examples,
    )
    .unwrap();
    for _ in 0..4 {
        t.step().unwrap();
    }
    let ck = dir
        .path()
        .join("jobs")
        .join(&id)
        .join("checkpoint.safetensors");
    std::fs::create_dir_all(ck.parent().unwrap()).unwrap();
    t.checkpoint().unwrap().save(&ck).unwrap();
    assert_eq!(Checkpoint::load(&ck).unwrap().step, 4);
    sqlx::query(
        "UPDATE finetune_jobs SET status = 'running', step = 4, checkpoint_path = ? WHERE id = ?",
    )
    .bind(ck.display().to_string())
    .bind(&id)
    .execute(&db)
    .await
    .unwrap();

    // Restart on the same directory: the job is requeued, resumes at step 4, and finishes
    // with the very adapter the uninterrupted run made.
    let app = spawn_app_in(dir.path(), |_| {}).await;
    assert_eq!(job(&app, &id).await["status"], "queued");
    assert_eq!(app.run_jobs().await, 1);
    let done = job(&app, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let ev: Value = app.get_json(&format!("/v1/finetune/{id}/events")).await;
    let messages: Vec<String> = ev["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("resumed from the checkpoint at step 4")),
        "{messages:?}"
    );
    assert_eq!(
        messages.iter().filter(|m| m.starts_with("step ")).count(),
        2,
        "only steps 5 and 6 ran after the restart: {messages:?}"
    );
    assert_eq!(adapter_sha(&app, "resumed").await, want);
}
