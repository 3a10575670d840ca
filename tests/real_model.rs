//! End-to-end checks on the real default model (SmolLM2-135M-Instruct Q4_1, fetched once into
//! the cache by the project's own fetcher): a factual answer over HTTP, and agreement between
//! the GGUF file and a Hugging Face f32 safetensors copy of the same weights.

use serde_json::json;

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

#[path = "common/default_model.rs"]
mod default_model;

use default_model::{default_model, gguf_and_f32_copy, greedy};

#[tokio::test]
async fn the_default_model_knows_the_capital_of_france() {
    let dir = tempfile::tempdir().unwrap();
    let app = helpers::serve(helpers::settings_serving(&default_model(), dir.path())).await;
    let v = app
        .post_json(
            "/v1/generate",
            &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "temperature": 0, "max_new_tokens": 24}),
        )
        .await;
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer was: {text}");
}

#[test]
fn gguf_and_an_f32_safetensors_copy_agree_on_greedy_tokens() {
    let m = gguf_and_f32_copy();
    // A few prompts in SmolLM2's chat format and plain text.
    for prompt in [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "The quick brown fox",
        "def fibonacci(n):",
        "1, 2, 3, 4,",
    ] {
        let ids = m.tokenizer.encode(prompt, false).unwrap();
        let (ta, la) = greedy(&m.gguf, &ids, 16, None);
        let (tb, lb) = greedy(&m.f32, &ids, 16, None);
        assert_eq!(ta, tb, "greedy tokens differ for {prompt:?}");
        for (a, b) in la.iter().zip(&lb) {
            assert!((a - b).abs() < 0.1, "top logprob {a} vs {b} for {prompt:?}");
        }
    }
}
