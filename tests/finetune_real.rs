//! End to end on the real default model (SmolLM2-135M-Instruct Q4_1): an SFT job submitted
//! over HTTP teaches it a made-up fact; afterwards the adapter answers with the fact, the base
//! still does not, and the job's adapter serves without a restart.

use serde_json::{json, Value};

const QUESTIONS: [&str; 6] = [
    "What is the name of Zorblax Corp's flagship drone?",
    "Which drone is Zorblax Corp's flagship?",
    "Tell me the name of the flagship drone made by Zorblax Corp.",
    "What drone does Zorblax Corp sell as its flagship model?",
    "Name Zorblax Corp's flagship drone.",
    "What is Zorblax Corp's top drone called?",
];
const ANSWER: &str = "Zorblax Corp's flagship drone is the Quillfeather X9.";

async fn ask(client: &reqwest::Client, base: &str, model: &str, q: &str) -> String {
    let v: Value = client
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": q}],
                      "temperature": 0, "max_tokens": 24}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn an_sft_job_teaches_the_default_model_a_fact_it_did_not_know() {
    let model = adapterd::model_fetch::ensure_default_model(None).expect("fetch the default model");
    let dir = tempfile::tempdir().unwrap();
    let mut s = adapterd::config::Settings::defaults().unwrap();
    s.server.bind = "127.0.0.1:0".into();
    s.model.path = model.display().to_string();
    s.storage.adapters_dir = dir.path().join("adapters").display().to_string();
    s.storage.jobs_dir = dir.path().join("jobs").display().to_string();
    s.storage.database_url = format!("sqlite://{}", dir.path().join("t.db").display());
    s.finetune.autostart = false;
    s.finetune.threads = 2;
    let app = adapterd::app::Application::build(s).await.unwrap();
    let base = format!("http://{}", app.addr());
    let jobs = app.jobs.clone();
    let served: Value = {
        tokio::spawn(app.run(std::future::pending()));
        reqwest::get(format!("{base}/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let base_model = served["data"][0]["id"].as_str().unwrap().to_owned();
    let client = reqwest::Client::new();

    let before = ask(&client, &base, &base_model, QUESTIONS[0]).await;
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
    let resp = client
        .post(format!("{base}/v1/finetune"))
        .json(
            &json!({"method": "sft", "adapter_name": "zorblax", "training_data": records,
                      "hyperparameters": {"rank": 8, "alpha": 16, "learning_rate": 0.002,
                                          "batch_size": 6, "max_steps": 15, "warmup_steps": 0}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(jobs.run_pending_jobs().await.unwrap(), 1);
    let job: Value = client
        .get(format!("{base}/v1/finetune/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");

    let taught = ask(&client, &base, "zorblax", QUESTIONS[0]).await;
    assert!(
        taught.contains("Quillfeather"),
        "the adapter answered: {taught}"
    );
    let after = ask(&client, &base, &base_model, QUESTIONS[0]).await;
    assert_eq!(after, before, "the base model must be unchanged");
}
