//! A server with `adapters.precision = "int8"` stores each adapter's int8 copy
//! (`serving-int8.safetensors`) and serves its cold loads from it; a missing or damaged copy
//! costs one slower load (the int8 copy made from the f16 form, the same numbers) and is
//! written again.

use std::path::Path;
use std::time::Duration;

use adapterd::config::Settings;

use crate::adapters::first_logprob;
use crate::helpers::{spawn_app_in, tiny_adapter_files};

const INT8_COPY: &str = "serving-int8.safetensors";

fn int8(s: &mut Settings) {
    s.adapters.precision = "int8".into();
}

fn version(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join("adapters/default").join(name).join("1")
}

/// Waits until `name`'s row records an int8 copy and returns that copy's bytes.
async fn recorded_copy(dir: &Path, name: &str) -> Vec<u8> {
    let url = format!("sqlite://{}", dir.join("test.db").display());
    let db = adapterd::store::connect(&url).await.unwrap();
    for _ in 0..200 {
        let hash: Option<String> =
            sqlx::query_scalar("SELECT serving_int8_blake3 FROM adapters WHERE name = ?")
                .bind(name)
                .fetch_one(&db)
                .await
                .unwrap();
        if let Some(hash) = hash {
            let bytes = std::fs::read(version(dir, name).join(INT8_COPY)).unwrap();
            let config = std::fs::read(version(dir, name).join("adapter_config.json")).unwrap();
            let mut h = blake3::Hasher::new();
            h.update(&config);
            h.update(&bytes);
            assert_eq!(h.finalize().to_hex().to_string(), hash, "recorded hash");
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no int8 copy was recorded for {name}");
}

#[tokio::test]
async fn an_int8_server_stores_the_int8_copy_at_upload_and_serves_cold_loads_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_app_in(dir.path(), int8).await;
    let (c, w) = tiny_adapter_files(1, 4.0);
    assert_eq!(first.post_adapter("a", c, w).await.status(), 201);
    let (lp, _) = first_logprob(&first, Some("a")).await;
    // Written with the upload, not later.
    let copy = recorded_copy(dir.path(), "a").await;
    assert!(!copy.is_empty());
    // With the upload and the f16 copy gone, a fresh int8 server serves the adapter from the
    // int8 copy alone, with the numbers the uploading server served.
    for file in ["adapter_model.safetensors", "serving.safetensors"] {
        std::fs::remove_file(version(dir.path(), "a").join(file)).unwrap();
    }
    let second = spawn_app_in(dir.path(), int8).await;
    assert_eq!(first_logprob(&second, Some("a")).await.0, lp);
}

#[tokio::test]
async fn a_damaged_int8_copy_is_refused_remade_from_the_f16_copy_and_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_app_in(dir.path(), int8).await;
    let (c, w1) = tiny_adapter_files(1, 4.0);
    let (_, w2) = tiny_adapter_files(2, 4.0);
    assert_eq!(first.post_adapter("a", c.clone(), w1).await.status(), 201);
    assert_eq!(first.post_adapter("b", c, w2).await.status(), 201);
    let (lp_b, _) = first_logprob(&first, Some("b")).await;
    assert_ne!(first_logprob(&first, Some("a")).await.0, lp_b);
    let copy_b = recorded_copy(dir.path(), "b").await;
    // `a`'s int8 copy put in `b`'s place: a valid file, refused by its hash.
    let (a, b) = (version(dir.path(), "a"), version(dir.path(), "b"));
    std::fs::copy(a.join(INT8_COPY), b.join(INT8_COPY)).unwrap();
    let second = spawn_app_in(dir.path(), int8).await;
    assert_eq!(first_logprob(&second, Some("b")).await.0, lp_b);
    // Written again in the background: the same bytes as at upload.
    let mut rewritten = Vec::new();
    for _ in 0..200 {
        rewritten = std::fs::read(b.join(INT8_COPY)).unwrap();
        if rewritten == copy_b {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rewritten == copy_b, "the int8 copy was not written again");
}

#[tokio::test]
async fn a_version_uploaded_to_an_f16_server_gets_its_int8_copy_at_its_first_int8_load() {
    let dir = tempfile::tempdir().unwrap();
    let f16 = spawn_app_in(dir.path(), |_| {}).await;
    let (c, w) = tiny_adapter_files(3, 4.0);
    assert_eq!(f16.post_adapter("old", c, w).await.status(), 201);
    let version = version(dir.path(), "old");
    // An f16 server writes no int8 copy.
    assert!(!version.join(INT8_COPY).exists());
    let second = spawn_app_in(dir.path(), int8).await;
    let (lp, _) = first_logprob(&second, Some("old")).await;
    recorded_copy(dir.path(), "old").await;
    // The next cold load reads the int8 copy: the same numbers without the f16 files.
    for file in ["adapter_model.safetensors", "serving.safetensors"] {
        std::fs::remove_file(version.join(file)).unwrap();
    }
    let third = spawn_app_in(dir.path(), int8).await;
    assert_eq!(first_logprob(&third, Some("old")).await.0, lp);
}
