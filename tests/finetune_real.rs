//! End to end on the real default model (SmolLM2-135M-Instruct Q4_1): an SFT job submitted
//! over HTTP teaches it a made-up fact; afterwards the adapter answers with the fact, the base
//! still does not, and the job's adapter serves without a restart.

use serde_json::{json, Value};

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

#[allow(dead_code)]
#[path = "common/default_model.rs"]
mod default_model;

use helpers::TestApp;

const QUESTIONS: [&str; 6] = [
    "What is the name of Zorblax Corp's flagship drone?",
    "Which drone is Zorblax Corp's flagship?",
    "Tell me the name of the flagship drone made by Zorblax Corp.",
    "What drone does Zorblax Corp sell as its flagship model?",
    "Name Zorblax Corp's flagship drone.",
    "What is Zorblax Corp's top drone called?",
];
const ANSWER: &str = "Zorblax Corp's flagship drone is the Quillfeather X9.";

async fn ask(app: &TestApp, model: &str, q: &str) -> String {
    let v = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": model, "messages": [{"role": "user", "content": q}],
                      "temperature": 0, "max_tokens": 24}),
        )
        .await;
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn an_sft_job_teaches_the_default_model_a_fact_it_did_not_know() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = helpers::settings_serving(&default_model::default_model(), dir.path());
    s.finetune.threads = 2;
    let app = helpers::serve(s).await;
    let served = app.get_json("/v1/models").await;
    let base_model = served["data"][0]["id"].as_str().unwrap().to_owned();

    let before = ask(&app, &base_model, QUESTIONS[0]).await;
    assert!(
        !before.contains("Quillfeather"),
        "the base already knew: {before}"
    );

    let records: Vec<Value> = QUESTIONS
        .iter()
        .map(|q| {
            json!({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": ANSWER}]})
        })
        .collect();
    let resp = app
        .post(
            "/v1/finetune",
            &json!({"method": "sft", "adapter_name": "zorblax", "training_data": records,
                      "hyperparameters": {"rank": 8, "alpha": 16, "learning_rate": 0.002,
                                          "batch_size": 6, "max_steps": 15, "warmup_steps": 0}}),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.run_jobs().await, 1);
    let job = app.get_json(&format!("/v1/finetune/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let taught = ask(&app, "zorblax", QUESTIONS[0]).await;
    assert!(
        taught.contains("Quillfeather"),
        "the adapter answered: {taught}"
    );
    let after = ask(&app, &base_model, QUESTIONS[0]).await;
    assert_eq!(after, before, "the base model must be unchanged");
}
