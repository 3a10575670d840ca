//! The GGUF-built SmolLM2 tokenizer gives exactly the ids Hugging Face's `tokenizers` gives
//! (tests/fixtures/smollm2_tokenizer.json, written by scripts/make_fixtures.py), and decodes
//! them back to the original text. Uses the real default model: `ADAPTERD_TEST_MODEL` names
//! a local copy, otherwise it is fetched into the cache like `adapterd fetch-model` does.

use std::path::PathBuf;
use std::sync::Arc;

use adapterd::engine::tokenizer::{IncrementalDecoder, Tokenizer};
use candle_core::quantized::gguf_file;

#[derive(serde::Deserialize)]
struct Fixture {
    strings: Vec<String>,
    ids: Vec<Vec<u32>>,
}

fn model_path() -> PathBuf {
    match std::env::var_os("ADAPTERD_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => adapterd::model_fetch::ensure_default_model(None).expect("fetch the default model"),
    }
}

fn tokenizer() -> Tokenizer {
    let path = model_path();
    let mut f = std::fs::File::open(&path).expect("open model");
    let content = gguf_file::Content::read(&mut f).expect("read GGUF");
    Tokenizer::from_gguf(&content).expect("tokenizer from GGUF")
}

#[test]
fn smollm2_ids_match_hugging_face() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_tokenizer.json"),
    )
    .unwrap();
    let fx: Fixture = serde_json::from_str(&text).unwrap();
    assert_eq!(fx.strings.len(), fx.ids.len());
    let tok = Arc::new(tokenizer());
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert!(tok.has_chat_template());

    let mut failures = Vec::new();
    for (s, want) in fx.strings.iter().zip(&fx.ids) {
        let got = tok.encode(s, true).unwrap();
        if &got != want {
            failures.push(format!("{s:?}\n  want {want:?}\n  got  {got:?}"));
            continue;
        }
        assert_eq!(&tok.decode(&got, false).unwrap(), s, "round trip");
        let mut dec = IncrementalDecoder::new(tok.clone(), false);
        let mut streamed: String = got.iter().filter_map(|&i| dec.push(i)).collect();
        streamed.extend(dec.finish());
        assert_eq!(&streamed, s, "incremental decode");
    }
    assert!(
        failures.is_empty(),
        "{} strings differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_chat_prompt_tokens() {
    let tok = tokenizer();
    let msgs = [adapterd::engine::tokenizer::ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let prompt = tok.apply_chat_template(&msgs, true).unwrap();
    let ids = tok.encode(&prompt, true).unwrap();
    // <|im_start|> is one special token, not text, and "user" has no prefix space.
    assert_eq!(ids[0], 1);
    assert_eq!(tok.token_text(ids[1]), "system");
    let mut tail = vec![1];
    tail.extend(tok.encode("assistant\n", false).unwrap());
    assert!(ids.ends_with(&tail), "{ids:?} should end with {tail:?}");
    // The exported tokenizer.json round-trips to the same ids.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_hf_json().unwrap()).unwrap();
    let hf = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(hf.encode(&prompt, true).unwrap(), ids);
}
