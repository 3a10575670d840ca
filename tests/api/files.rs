//! `/v1/files`: the upload -> show -> download -> list -> delete round trip, and refusals of
//! bad uploads (purpose, a line that is not a JSON object, size and record limits, missing
//! parts) before anything is stored.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{error_code, spawn_app, spawn_app_with, TestApp};

const DATA: &str = "{\"prompt\": \"Q\", \"completion\": \"A\"}\n\n{\"text\": \"hello\"}\n";

async fn upload(app: &TestApp, form: Form) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/files", app.base))
        .multipart(form)
        .send()
        .await
        .expect("request failed")
}

fn form(purpose: &str, content: impl Into<Vec<u8>>) -> Form {
    Form::new()
        .text("purpose", purpose.to_owned())
        .part("file", Part::bytes(content.into()).file_name("train.jsonl"))
}

#[tokio::test]
async fn an_uploaded_file_can_be_shown_downloaded_listed_and_deleted() {
    let app = spawn_app().await;
    let resp = upload(&app, form("fine-tune", DATA)).await;
    assert_eq!(resp.status(), 200);
    let f: Value = resp.json().await.unwrap();
    let id = f["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("file-") && id.len() == 5 + 32, "{id}");
    assert_eq!(f["object"], "file");
    assert_eq!(f["bytes"], DATA.len());
    assert_eq!(f["records"], 2);
    assert_eq!(f["filename"], "train.jsonl");
    assert_eq!(f["purpose"], "fine-tune");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let created = f["created_at"].as_i64().unwrap();
    assert!((now - created).abs() < 60, "{created} vs {now}");

    let shown: Value = app
        .get(&format!("/v1/files/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown, f);
    let resp = app.get(&format!("/v1/files/{id}/content")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), DATA.as_bytes());

    let second: Value = upload(&app, form("fine-tune", "{\"text\": \"x\"}"))
        .await
        .json()
        .await
        .unwrap();
    let list: Value = app.get("/v1/files").await.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&id.as_str()) && ids.contains(&second["id"].as_str().unwrap()));

    let resp = app.delete(&format!("/v1/files/{id}")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"id": id, "object": "file", "deleted": true})
    );
    for path in [format!("/v1/files/{id}"), format!("/v1/files/{id}/content")] {
        let (code, _) = error_code(app.get(&path).await, 404).await;
        assert_eq!(code, "not_found");
    }
    error_code(app.delete(&format!("/v1/files/{id}")).await, 404).await;
    let list: Value = app.get("/v1/files").await.json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_ids_answer_404_in_the_error_envelope() {
    let app = spawn_app().await;
    let (code, msg) = error_code(app.get("/v1/files/file-nope").await, 404).await;
    assert_eq!(code, "not_found");
    assert!(msg.contains("file-nope"), "{msg}");
    error_code(app.get("/v1/files/file-nope/content").await, 404).await;
    error_code(app.delete("/v1/files/file-nope").await, 404).await;
}

#[tokio::test]
async fn a_purpose_other_than_fine_tune_is_refused() {
    let app = spawn_app().await;
    let (code, msg) = error_code(upload(&app, form("assistants", DATA)).await, 422).await;
    assert_eq!(code, "invalid_value");
    assert!(
        msg.contains("purpose") && msg.contains("fine-tune"),
        "{msg}"
    );
    let only_file = Form::new().part(
        "file",
        Part::bytes(DATA.as_bytes().to_vec()).file_name("a.jsonl"),
    );
    let (_, msg) = error_code(upload(&app, only_file).await, 422).await;
    assert!(msg.contains("purpose"), "{msg}");
    let list: Value = app.get("/v1/files").await.json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing stored");
}

#[tokio::test]
async fn a_line_that_is_not_a_json_object_is_refused_naming_the_line() {
    let app = spawn_app().await;
    let bad = "{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n";
    let (code, msg) = error_code(upload(&app, form("fine-tune", bad)).await, 422).await;
    assert_eq!(code, "invalid_dataset");
    assert!(msg.starts_with("line 3: not valid JSON"), "{msg}");
    let (_, msg) = error_code(upload(&app, form("fine-tune", "{}\n[1]\n")).await, 422).await;
    assert!(
        msg.starts_with("line 2:") && msg.contains("JSON object"),
        "{msg}"
    );
    let (_, msg) = error_code(
        upload(&app, form("fine-tune", vec![b'{', 0xff, b'}'])).await,
        422,
    )
    .await;
    assert!(msg.starts_with("line 1:") && msg.contains("UTF-8"), "{msg}");
    let (_, msg) = error_code(upload(&app, form("fine-tune", "\n\n")).await, 422).await;
    assert!(msg.contains("no records"), "{msg}");
}

#[tokio::test]
async fn files_past_the_size_or_record_limits_are_refused_naming_the_limit() {
    let app = spawn_app_with(|s| {
        s.datasets.max_file_bytes = 1000;
        s.datasets.max_records = 3;
    })
    .await;
    let big =
        "{\"text\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}\n"
            .repeat(14);
    assert!(big.len() > 1000);
    let (code, msg) = error_code(upload(&app, form("fine-tune", big)).await, 413).await;
    assert_eq!(code, "payload_too_large");
    assert!(msg.contains("datasets.max_file_bytes = 1000"), "{msg}");
    // Past the multipart body limit too (file limit + overhead): still 413 in the envelope.
    let huge = vec![b' '; 200_000];
    let (code, _) = error_code(upload(&app, form("fine-tune", huge)).await, 413).await;
    assert_eq!(code, "payload_too_large");

    let four = "{\"text\": \"a\"}\n".repeat(4);
    let (code, msg) = error_code(upload(&app, form("fine-tune", four)).await, 422).await;
    assert_eq!(code, "invalid_dataset");
    assert!(msg.contains("3 records"), "{msg}");
    let three = "{\"text\": \"a\"}\n".repeat(3);
    assert_eq!(upload(&app, form("fine-tune", three)).await.status(), 200);
}

#[tokio::test]
async fn the_upload_limit_follows_max_file_bytes_not_the_json_body_limit() {
    let app = spawn_app_with(|s| {
        s.server.max_body_bytes = 2048;
        s.datasets.max_file_bytes = 100_000;
    })
    .await;
    let data = "{\"text\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}\n".repeat(200);
    assert!(data.len() > 2048 && data.len() < 100_000);
    let resp = upload(&app, form("fine-tune", data)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn missing_or_unexpected_parts_are_refused() {
    let app = spawn_app().await;
    let no_file = Form::new().text("purpose", "fine-tune");
    let (code, msg) = error_code(upload(&app, no_file).await, 422).await;
    assert_eq!(code, "invalid_value");
    assert!(msg.contains("`file`"), "{msg}");
    let extra = form("fine-tune", DATA).text("model", "x");
    let (_, msg) = error_code(upload(&app, extra).await, 422).await;
    assert!(msg.contains("`model`"), "{msg}");
    // Not multipart at all: 400 in the error envelope.
    let resp = app.post_raw("/v1/files", "{\"file\": \"x\"}").await;
    let (code, _) = error_code(resp, 400).await;
    assert_eq!(code, "invalid_request");
}

#[tokio::test]
async fn files_past_the_tenant_quota_get_403_naming_the_setting_and_store_nothing() {
    let app = spawn_app_with(|s| s.limits.max_files_per_tenant = 2).await;
    assert_eq!(upload(&app, form("fine-tune", DATA)).await.status(), 200);
    let second: Value = upload(&app, form("fine-tune", DATA))
        .await
        .json()
        .await
        .unwrap();
    let (code, msg) = error_code(upload(&app, form("fine-tune", DATA)).await, 403).await;
    assert_eq!(code, "quota_exceeded");
    assert!(msg.contains("limits.max_files_per_tenant"), "{msg}");
    let listed: Value = app.get("/v1/files").await.json().await.unwrap();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2));
    // Deleting one frees a place.
    let id = second["id"].as_str().unwrap();
    assert_eq!(app.delete(&format!("/v1/files/{id}")).await.status(), 200);
    assert_eq!(upload(&app, form("fine-tune", DATA)).await.status(), 200);

    let bytes = DATA.len() as u64;
    let app = spawn_app_with(|s| s.limits.max_file_bytes_per_tenant = bytes * 3 / 2).await;
    assert_eq!(upload(&app, form("fine-tune", DATA)).await.status(), 200);
    let (code, msg) = error_code(upload(&app, form("fine-tune", DATA)).await, 403).await;
    assert_eq!(code, "quota_exceeded");
    assert!(msg.contains("limits.max_file_bytes_per_tenant"), "{msg}");
}
