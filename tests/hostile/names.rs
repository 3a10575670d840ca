//! Names that try to leave the store or pass for another: `..`, `/`, `\`, NUL, Cyrillic and
//! fullwidth look-alikes, very long strings — as adapter names, `name@version` references,
//! path segments and file ids. Invalid ones are 4xx; valid ones behave normally; afterwards
//! the store holds only `<tenant>/<name>/<version>/` with its three files each, and nothing was
//! created outside it.

use std::path::Path;

use adapterd::adapters::validate_name;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::api::check;
use crate::corpus;
use crate::helpers::{spawn_app_in, tiny_adapter_files, TestApp};
use crate::strategies::nasty_string;

/// Every byte but ASCII letters and digits percent-encoded, so the name arrives as one path
/// segment whatever it holds.
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Tries `name` everywhere a name or id goes; returns the upload's status.
async fn try_name(app: &TestApp, name: &str) -> Result<u16, String> {
    let (config, weights) = tiny_adapter_files(3, 2.0);
    let form = reqwest::multipart::Form::new()
        .text("name", name.to_owned())
        .part(
            "adapter_config.json",
            reqwest::multipart::Part::bytes(config).file_name(name.to_owned()),
        )
        .part(
            "adapter_model.safetensors",
            reqwest::multipart::Part::bytes(weights).file_name("adapter_model.safetensors"),
        );
    let c = &app.client;
    let base = &app.base;
    let upload = check(
        "upload",
        c.post(format!("{base}/v1/adapters")).multipart(form),
    )
    .await?;
    // Valid: stored. Invalid: 422 naming the field — or 400 when the name also breaks the
    // multipart headers it is sent in (it is the part's file name too).
    let valid = validate_name("name", name).is_ok();
    if (valid && upload != 201) || (!valid && upload != 422 && upload != 400) {
        return Err(format!("upload of {name:?}: {upload}"));
    }
    let seg = segment(name);
    for (what, req) in [
        ("show", c.get(format!("{base}/v1/adapters/{seg}"))),
        ("file", c.get(format!("{base}/v1/files/{seg}"))),
        ("file content", c.get(format!("{base}/v1/files/{seg}/content"))),
        ("file delete", c.delete(format!("{base}/v1/files/{seg}"))),
        (
            "generate",
            c.post(format!("{base}/v1/generate"))
                .json(&json!({"prompt": "hi", "adapter_id": name, "max_new_tokens": 2})),
        ),
        (
            "generate@",
            c.post(format!("{base}/v1/generate"))
                .json(&json!({"prompt": "hi", "adapter_id": format!("{name}@1"), "max_new_tokens": 2})),
        ),
        (
            "chat",
            c.post(format!("{base}/v1/chat/completions")).json(
                &json!({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            ),
        ),
    ] {
        let status = check(what, req).await?;
        // A valid name was just uploaded, so it is found; an invalid one never names anything
        // (other routes may still answer 200 by coincidence, e.g. `x@1` after an upload of `x`,
        // and `check` has already refused every 5xx and every 4xx without the envelope).
        let found = matches!(what, "show" | "generate" | "generate@" | "chat");
        if valid && found && status != 200 {
            return Err(format!("{what} {name:?}: {status}, expected 200"));
        }
        if !valid && (what == "show" || what.starts_with("file")) && status == 200 {
            return Err(format!("{what} {name:?}: 200 for a name that cannot exist"));
        }
    }
    Ok(upload)
}

/// The temp dir holds the tiny model, the database and the store; the store holds only
/// `<tenant>/<name>/<version>/{adapter_config.json, adapter_model.safetensors}`.
fn assert_store_shape(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("temp dir").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(
            ["tiny", "adapters", "test.db", "test.db-wal", "test.db-shm"].contains(&n.as_str()),
            "unexpected entry in the temp dir: {n}"
        );
    }
    let store = dir.join("adapters");
    let Ok(tenants) = std::fs::read_dir(&store) else {
        return;
    };
    for t in tenants.flatten() {
        let tn = t.file_name().to_string_lossy().into_owned();
        validate_name("tenant", &tn).unwrap_or_else(|e| panic!("tenant dir {tn:?}: {e}"));
        for a in std::fs::read_dir(t.path()).expect("tenant dir").flatten() {
            let an = a.file_name().to_string_lossy().into_owned();
            validate_name("name", &an).unwrap_or_else(|e| panic!("adapter dir {an:?}: {e}"));
            for v in std::fs::read_dir(a.path()).expect("adapter dir").flatten() {
                let vn = v.file_name().to_string_lossy().into_owned();
                assert!(vn.parse::<u64>().is_ok(), "version dir {an}/{vn:?}");
                let mut files: Vec<String> = std::fs::read_dir(v.path())
                    .expect("version dir")
                    .flatten()
                    .map(|f| f.file_name().to_string_lossy().into_owned())
                    .collect();
                files.sort();
                assert_eq!(
                    files,
                    [
                        "adapter_config.json",
                        "adapter_model.safetensors",
                        "serving.safetensors"
                    ],
                    "{an}/{vn}"
                );
            }
        }
    }
}

/// A marker that must never appear as a file outside the store.
fn escapees(marker: &str) -> Vec<String> {
    vec![
        format!("../{marker}"),
        format!("../../{marker}"),
        format!("../../../../../../tmp/{marker}"),
        format!("..\\..\\{marker}"),
        format!("/tmp/{marker}"),
        format!("{marker}/../../x"),
    ]
}

fn run_names(names: Vec<String>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = format!("adapterd-escape-{}", std::process::id());
    rt.block_on(async {
        let app = spawn_app_in(dir.path(), |_| {}).await;
        for name in names.iter().cloned().chain(escapees(&marker)) {
            try_name(&app, &name)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    });
    assert_store_shape(dir.path());
    let tmp = std::env::temp_dir();
    for place in [
        dir.path().join(&marker),
        dir.path()
            .parent()
            .map(|p| p.join(&marker))
            .unwrap_or_default(),
        tmp.join(&marker),
        Path::new("/").join(&marker),
    ] {
        assert!(!place.exists(), "{} was created", place.display());
    }
}

#[test]
fn corpus_names_are_refused_and_nothing_leaves_the_store() {
    let (_, bytes) = corpus::files("names")
        .into_iter()
        .find(|(f, _)| f == "names.json")
        .expect("names.json");
    let names: Vec<String> = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .expect("names.json is a list of strings");
    run_names(names);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_names_are_refused_and_nothing_leaves_the_store(
        names in prop::collection::vec(nasty_string(), 1..12)
    ) {
        run_names(names);
    }
}
