//! Test helpers: a tiny seeded llama model written as a Hugging Face directory (config.json,
//! model.safetensors, byte-level BPE tokenizer.json, tokenizer_config.json with a chat
//! template), and `spawn_app()` that serves it on 127.0.0.1:0 with a temp database;
//! `spawn_app_with_auth()` serves it with auth on and keys for two tenants.

use std::collections::HashMap;
use std::path::Path;

use adapterd::app::Application;
use adapterd::config::Settings;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

pub const TINY_MODEL_NAME: &str = "tiny";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    /// The job runner (the background loop is off in tests: run jobs with `run_jobs`).
    pub jobs: Option<std::sync::Arc<adapterd::jobs::JobRunner>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestApp {
    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("request failed")
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request failed")
    }

    /// Runs every queued fine-tuning job to its end; returns how many ran.
    pub async fn run_jobs(&self) -> usize {
        self.jobs
            .as_ref()
            .expect("app has a job runner")
            .run_pending_jobs()
            .await
            .expect("jobs run")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request failed")
    }

    /// The body of `post` as JSON, whatever the status (callers that care assert it).
    pub async fn post_json(&self, path: &str, body: &Value) -> Value {
        self.post(path, body).await.json().await.expect("JSON body")
    }

    /// The body of `get` as JSON, whatever the status.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.expect("JSON body")
    }

    /// The body of `post` as text: an event stream, read to its end.
    pub async fn post_text(&self, path: &str, body: &Value) -> String {
        self.post(path, body).await.text().await.expect("text body")
    }

    /// The body of `get` as text.
    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.expect("text body")
    }
}

/// The `data:` payloads of an event stream, in order.
pub fn sse_data(raw: &str) -> Vec<String> {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// An OpenAI stream's chunks, parsed; the stream must end with one `[DONE]`.
#[allow(dead_code)]
pub fn openai_chunks(raw: &str) -> Vec<Value> {
    let data = sse_data(raw);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{raw}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// Reads what is left of an event stream, which must end cleanly (not be reset) with no gap
/// longer than `within`, and returns its last event.
#[allow(dead_code)]
pub async fn last_event<B: AsRef<[u8]>>(
    body: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    within: std::time::Duration,
) -> String {
    use futures::StreamExt;
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(within, body.next())
        .await
        .expect("the stream ended within the deadline")
    {
        text.extend_from_slice(
            chunk
                .expect("the stream was ended cleanly, not reset")
                .as_ref(),
        );
    }
    let text = String::from_utf8_lossy(&text);
    text.trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Checks the error envelope and returns its code.
pub async fn error_code(resp: reqwest::Response, status: u16) -> (String, String) {
    assert_eq!(resp.status().as_u16(), status, "unexpected status");
    let v: Value = resp.json().await.expect("error body is JSON");
    let code = v["error"]["code"].as_str().expect("error.code").to_owned();
    let msg = v["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_owned();
    (code, msg)
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_in_tempdir(|_| {}, tweak).await
}

/// `spawn_app_with` on the tiny model with a 65536-token context (`write_long_context_model`).
#[allow(dead_code)]
pub async fn spawn_long_context_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_in_tempdir(
        |dir| write_long_context_model(&dir.join(TINY_MODEL_NAME)),
        tweak,
    )
    .await
}

/// Serves from a fresh temp directory, after `prepare` has written into it; the app owns it.
async fn spawn_app_in_tempdir(
    prepare: impl FnOnce(&Path),
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let mut app = spawn_app_in(dir.path(), tweak).await;
    app._dir = Some(dir);
    app
}

/// Serves the tiny model with its database and adapter store under `dir` (which the caller
/// keeps), so a second app on the same `dir` sees what the first stored: a restart.
pub async fn spawn_app_in(dir: &Path, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut s = test_settings(dir);
    tweak(&mut s);
    serve(s).await
}

/// Builds the app from `s` and serves it in the background; the caller keeps the directories
/// `s` names.
pub async fn serve(s: Settings) -> TestApp {
    let app = Application::build(s).await.expect("app builds");
    let base = format!("http://{}", app.addr());
    let jobs = Some(app.jobs.clone());
    tokio::spawn(app.run(std::future::pending()));
    TestApp {
        base,
        client: reqwest::Client::new(),
        jobs,
        _dir: None,
    }
}

/// Settings serving the tiny model (written under `dir` if missing) on 127.0.0.1:0, with the
/// database and adapter store under `dir`.
pub fn test_settings(dir: &Path) -> Settings {
    let model_dir = dir.join(TINY_MODEL_NAME);
    if !model_dir.join("model.safetensors").exists() {
        write_tiny_model(&model_dir, 7);
    }
    settings_serving(&model_dir, dir)
}

/// Settings serving the model at `model` (a GGUF file or a Hugging Face directory) on
/// 127.0.0.1:0, with the database, adapter store and job files under `dir`.
pub fn settings_serving(model: &Path, dir: &Path) -> Settings {
    let mut s = Settings::defaults().expect("defaults");
    s.server.bind = "127.0.0.1:0".into();
    s.model.path = model.display().to_string();
    s.storage.adapters_dir = dir.join("adapters").display().to_string();
    s.storage.database_url = format!("sqlite://{}", dir.join("test.db").display());
    s.storage.jobs_dir = dir.join("jobs").display().to_string();
    // The suite runs where the product would: a `--features cuda` build on a machine with a GPU
    // serves from it ("auto"), any other from the CPU. ADAPTERD_TEST_DEVICE pins it;
    // ADAPTERD_TEST_KERNELS=portable runs the GPU code path on the CPU.
    s.model.device = std::env::var("ADAPTERD_TEST_DEVICE").unwrap_or_else(|_| "auto".into());
    if let Ok(k) = std::env::var("ADAPTERD_TEST_KERNELS") {
        s.model.kernels = k;
    }
    // Tests run jobs deterministically with `TestApp::run_jobs`.
    s.finetune.autostart = false;
    s
}

/// One app with auth on, seen by two tenants and by a caller without a key.
pub struct AuthApp {
    /// Sends no Authorization header; owns the temp directory.
    pub anon: TestApp,
    /// Sends tenant `tenant-a`'s key on every request.
    pub a: TestApp,
    /// Sends tenant `tenant-b`'s key on every request.
    pub b: TestApp,
    pub a_key: adapterd::keys::NewKey,
    pub b_key: adapterd::keys::NewKey,
    pub db: sqlx::SqlitePool,
    /// The adapter store.
    pub adapters_dir: std::path::PathBuf,
}

pub async fn spawn_app_with_auth() -> AuthApp {
    spawn_app_with_auth_and(|_| {}).await
}

/// Auth on, keys for `tenant-a` and `tenant-b` created through the library's key API.
pub async fn spawn_app_with_auth_and(tweak: impl FnOnce(&mut Settings)) -> AuthApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = test_settings(dir.path());
    s.auth.enabled = true;
    tweak(&mut s);
    let adapters_dir = std::path::PathBuf::from(&s.storage.adapters_dir);
    let app = Application::build(s).await.expect("app builds");
    let db = app.db.clone();
    let a_key = adapterd::keys::create(&db, "tenant-a")
        .await
        .expect("key a");
    let b_key = adapterd::keys::create(&db, "tenant-b")
        .await
        .expect("key b");
    let base = format!("http://{}", app.addr());
    let jobs = app.jobs.clone();
    tokio::spawn(app.run(std::future::pending()));
    let as_tenant = |key: &str| {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = format!("Bearer {key}").parse().expect("header value");
        headers.insert(reqwest::header::AUTHORIZATION, value);
        TestApp {
            base: base.clone(),
            client: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .expect("client"),
            jobs: Some(jobs.clone()),
            _dir: None,
        }
    };
    AuthApp {
        a: as_tenant(&a_key.key),
        b: as_tenant(&b_key.key),
        anon: TestApp {
            base: base.clone(),
            client: reqwest::Client::new(),
            jobs: Some(jobs.clone()),
            _dir: Some(dir),
        },
        a_key,
        b_key,
        db,
        adapters_dir,
    }
}

/// The tiny model's shape; small enough that a forward takes well under a millisecond.
pub fn tiny_config(vocab: usize) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "tie_word_embeddings": true
    })
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes a complete Hugging Face model directory with weights drawn from a seeded RNG.
/// The tiny model with a 65536-token context, so a stream can run far longer than any limit a
/// test sets. (Used by tests/limits.rs and tests/faults.rs, which include this file.)
#[allow(dead_code)]
pub fn write_long_context_model(dir: &Path) {
    write_tiny_model(dir, 7);
    let path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config.json")).expect("json");
    cfg["max_position_embeddings"] = json!(65536);
    std::fs::write(&path, cfg.to_string()).expect("config.json");
}

pub fn write_tiny_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).expect("model dir");
    let vocab = write_tiny_tokenizer(dir);
    let cfg = tiny_config(vocab);
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("config.json");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "chat_template": CHAT_TEMPLATE,
            "bos_token": null,
            "eos_token": "<|im_end|>",
        })
        .to_string(),
    )
    .expect("tokenizer_config.json");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).expect("ones");
    let (h, ffn, hd, nh, nkv) = (64, 128, 16, 4, 2);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), t(&[vocab, h], 1.0));
    w.insert("model.norm.weight".into(), ones(h));
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        w.insert(format!("{p}.input_layernorm.weight"), ones(h));
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones(h));
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            t(&[nh * hd, h], 0.3),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            t(&[nkv * hd, h], 0.3),
        );
        w.insert(
            format!("{p}.self_attn.v_proj.weight"),
            t(&[nkv * hd, h], 0.3),
        );
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            t(&[h, nh * hd], 0.3),
        );
        w.insert(format!("{p}.mlp.gate_proj.weight"), t(&[ffn, h], 0.3));
        w.insert(format!("{p}.mlp.up_proj.weight"), t(&[ffn, h], 0.3));
        w.insert(format!("{p}.mlp.down_proj.weight"), t(&[h, ffn], 0.3));
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).expect("safetensors");
}

/// A byte-level BPE tokenizer: the 256 byte symbols, a few merges, three special tokens,
/// written as tokenizer.json. Returns the vocabulary size.
fn write_tiny_tokenizer(dir: &Path) -> usize {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab = serde_json::Map::new();
    for c in &alphabet {
        let n = vocab.len();
        vocab.insert(c.to_string(), json!(n));
    }
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")];
    for (a, b) in merges {
        let n = vocab.len();
        vocab.insert(format!("{a}{b}"), json!(n));
    }
    let mut added = Vec::new();
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        let n = vocab.len();
        vocab.insert(special.to_owned(), json!(n));
        added.push(
            json!({"id": n, "content": special, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}),
        );
    }
    let size = vocab.len();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab,
                  "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("tokenizer.json");
    size
}

/// A PEFT adapter for the tiny model (q_proj and v_proj of both layers, rank 4), written with
/// the project's own PEFT writer; returns (adapter_config.json, adapter_model.safetensors).
pub fn tiny_adapter_files(seed: u64, scale: f64) -> (Vec<u8>, Vec<u8>) {
    use adapterd::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize]| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    };
    let r = 4;
    let mut layers = Vec::new();
    for _ in 0..2 {
        let mut l = LayerLora::default();
        l.modules[Module::Q.index()] = Some(LoraPair {
            a: t(&[r, 64]),
            b: t(&[64, r]),
            scale,
            int8: None,
        });
        l.modules[Module::V.index()] = Some(LoraPair {
            a: t(&[r, 64]),
            b: t(&[32, r]),
            scale,
            int8: None,
        });
        layers.push(l);
    }
    let adapter = LoraAdapter {
        layers,
        rank: r,
        alpha: scale * r as f64,
        use_rslora: false,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        size_bytes: 0,
        packed: Default::default(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    adapterd::engine::lora::peft::save_peft(&adapter, TINY_MODEL_NAME, dir.path())
        .expect("save_peft");
    (
        std::fs::read(dir.path().join("adapter_config.json")).expect("config"),
        std::fs::read(dir.path().join("adapter_model.safetensors")).expect("weights"),
    )
}

/// The multipart body of `POST /v1/adapters`.
pub fn adapter_form(name: &str, config: Vec<u8>, weights: Vec<u8>) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .text("name", name.to_owned())
        .part(
            "adapter_config.json",
            reqwest::multipart::Part::bytes(config).file_name("adapter_config.json"),
        )
        .part(
            "adapter_model.safetensors",
            reqwest::multipart::Part::bytes(weights).file_name("adapter_model.safetensors"),
        )
}

impl TestApp {
    /// Uploads an adapter through the multipart endpoint.
    pub async fn post_adapter(
        &self,
        name: &str,
        config: Vec<u8>,
        weights: Vec<u8>,
    ) -> reqwest::Response {
        self.post_form("/v1/adapters", adapter_form(name, config, weights))
            .await
    }

    pub async fn post_form(&self, path: &str, form: reqwest::multipart::Form) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .multipart(form)
            .send()
            .await
            .expect("request failed")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request failed")
    }
}
