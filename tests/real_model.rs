//! End-to-end checks on the real default model (SmolLM2-135M-Instruct Q4_1, fetched once into
//! the cache by the project's own fetcher): a factual answer over HTTP, and agreement between
//! the GGUF file and a Hugging Face f32 safetensors copy of the same weights.

use std::path::PathBuf;

use adapterd::engine::model::{Llama, SeqCache, SeqInput};
use candle_core::Device;
use serde_json::{json, Value};

fn default_model() -> PathBuf {
    adapterd::model_fetch::ensure_default_model(None).expect("fetch the default model")
}

#[tokio::test]
async fn the_default_model_knows_the_capital_of_france() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = adapterd::config::Settings::defaults().unwrap();
    s.server.bind = "127.0.0.1:0".into();
    s.model.path = default_model().display().to_string();
    s.storage.adapters_dir = dir.path().join("adapters").display().to_string();
    s.storage.database_url = format!("sqlite://{}", dir.path().join("t.db").display());
    let app = adapterd::app::Application::build(s).await.unwrap();
    let base = format!("http://{}", app.addr());
    tokio::spawn(app.run(std::future::pending()));
    let v: Value = reqwest::Client::new()
        .post(format!("{base}/v1/generate"))
        .json(
            &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "temperature": 0, "max_new_tokens": 24}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer was: {text}");
}

/// Greedy decoding straight on the model: the tokens and each step's top log-probability.
fn greedy(model: &Llama, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let mut input = prompt.to_vec();
    let (mut toks, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let logits = model
            .forward(&mut [SeqInput {
                tokens: &input,
                cache: &mut cache,
                all_logits: false,
                adapter: None,
            }])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        let (best, max) =
            logits
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (i, v)| if v > a.1 { (i, v) } else { a },
                );
        let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        toks.push(best as u32);
        lps.push(max - lse);
        input = vec![best as u32];
    }
    (toks, lps)
}

#[test]
fn gguf_and_an_f32_safetensors_copy_agree_on_greedy_tokens() {
    let gguf = default_model();
    let dir = tempfile::tempdir().unwrap();
    // The exporter un-permutes q/k with tensor reshapes, independently of the loader's byte
    // moves, so this also checks one against the other.
    adapterd::engine::model::export::export_hf_dir(&gguf, dir.path()).unwrap();
    let dev = Device::Cpu;
    let (ct, mut f) = adapterd::engine::model::load::read_gguf_header(&gguf).unwrap();
    let q = adapterd::engine::model::load::load_gguf(&gguf, &ct, &mut f, &dev).unwrap();
    let hf = adapterd::engine::model::load::load_hf_dir(dir.path(), &dev).unwrap();
    // Token ids of a few prompts in SmolLM2's chat format and plain text (ids from its tokenizer).
    let tok = adapterd::engine::tokenizer::Tokenizer::from_gguf(&ct).unwrap();
    for prompt in [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox",
        "def fibonacci(n):",
        "1, 2, 3, 4,",
    ] {
        let ids = tok.encode(prompt, false).unwrap();
        let (ta, la) = greedy(&q, &ids, 16);
        let (tb, lb) = greedy(&hf, &ids, 16);
        assert_eq!(ta, tb, "greedy tokens differ for {prompt:?}");
        for (a, b) in la.iter().zip(&lb) {
            assert!((a - b).abs() < 0.1, "top logprob {a} vs {b} for {prompt:?}");
        }
    }
}
