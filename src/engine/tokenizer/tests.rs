//! Unit tests on small synthetic vocabularies (the real SmolLM2 tokenizer is checked against
//! Hugging Face's ids in tests/tokenizer_fixture.rs).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

use super::*;

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn content(md: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strs(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// GPT-2's byte -> char table (bytes_to_unicode), computed independently of the code under test.
fn bytes_to_unicode() -> Vec<char> {
    let mut direct: Vec<u32> = (0x21..=0x7e)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars: Vec<u32> = direct.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !direct.contains(&b) {
            direct.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in direct.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A SmolLM-shaped byte-level GGUF tokenizer: 3 control tokens, the 256 byte symbols, a few
/// merges (including one across the two bytes of "é") and the SmolLM2 chat template.
fn byte_level_gguf(pre: &str) -> Content {
    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3i32, 3, 3];
    for c in &table {
        tokens.push(c.to_string());
        types.push(1);
    }
    let e_acute: String = "é".bytes().map(|b| table[b as usize]).collect();
    let sp = table[b' ' as usize];
    let merges = vec![
        format!("{sp} h"),
        "h e".to_string(),
        format!("{sp}h e"),
        "1 2".to_string(),
        format!("{} {}", table[0xc3], table[0xa9]),
    ];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    assert!(tokens.contains(&e_acute));
    content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strs(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            Value::String(SMOLLM2_TEMPLATE.into()),
        ),
    ])
}

fn smol() -> Tokenizer {
    Tokenizer::from_gguf(&byte_level_gguf("smollm")).unwrap()
}

fn id(t: &Tokenizer, piece: &str) -> u32 {
    t.inner.token_to_id(piece).unwrap()
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<IncrementalDecoder>();
}

#[test]
fn byte_level_encode_splits_digits_and_keeps_specials() {
    let t = smol();
    assert_eq!(t.vocab_size(), 3 + 256 + 5);
    assert_eq!(t.bos_token_id(), Some(1));
    assert_eq!(t.eos_token_ids(), &[2]);
    // "12" would merge; the smollm pre-tokenizer isolates each digit first.
    let ids = t.encode("12", true).unwrap();
    assert_eq!(ids, vec![id(&t, "1"), id(&t, "2")]);
    let gpt2 = Tokenizer::from_gguf(&byte_level_gguf("gpt2")).unwrap();
    assert_eq!(gpt2.encode("12", true).unwrap(), vec![id(&t, "12")]);
    // No prefix space (candle's GGUF tokenizer adds one), and " he" merges fully.
    let ids = t.encode("<|im_start|>he he", false).unwrap();
    assert_eq!(ids, vec![1, id(&t, "he"), id(&t, "Ġhe")]);
    // add_bos_token = false: nothing is added.
    assert_eq!(t.encode("", true).unwrap(), Vec::<u32>::new());
}

#[test]
fn byte_level_round_trip_and_token_text() {
    let t = smol();
    for s in ["héllo wörld 12 ٣ 中文 😀\t\n  x", "", " ", "<|im_end|>x"] {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), s);
    }
    let ids = t.encode("<|im_start|>hi<|im_end|>", false).unwrap();
    assert_eq!(t.decode(&ids, true).unwrap(), "hi");
    assert_eq!(t.token_text(id(&t, "Ġhe")), " he");
    assert_eq!(
        t.token_text(id(
            &t,
            "é".bytes()
                .map(|b| bytes_to_unicode()[b as usize])
                .collect::<String>()
                .as_str()
        )),
        "é"
    );
    assert_eq!(t.token_text(2), "<|im_end|>");
    // Half a character shows as U+FFFD rather than failing.
    assert_eq!(
        t.token_text(id(&t, &bytes_to_unicode()[0xc3].to_string())),
        "\u{FFFD}"
    );
    assert_eq!(t.token_text(999_999), "");
    assert!(matches!(
        t.decode(&[5, 999_999], false),
        Err(TokenizerError::UnknownTokenId { id: 999_999, .. })
    ));
}

#[test]
fn incremental_decoder_never_splits_a_character() {
    let t = Arc::new(smol());
    // "é😀": é is one merged token here; 😀 is four byte tokens.
    let ids = t.encode("aé😀b", false).unwrap();
    assert_eq!(ids.len(), 1 + 1 + 4 + 1);
    let mut dec = IncrementalDecoder::new(t.clone(), false);
    let out: Vec<Option<String>> = ids.iter().map(|&i| dec.push(i)).collect();
    assert_eq!(
        out,
        vec![
            Some("a".into()),
            Some("é".into()),
            None,
            None,
            None,
            Some("😀".into()),
            Some("b".into())
        ]
    );
    assert_eq!(dec.finish(), None);

    // A character cut off by the end of generation is flushed by finish(), as decode does.
    let mut dec = IncrementalDecoder::new(t.clone(), false);
    let cut = &ids[..4];
    let mut text: String = cut.iter().filter_map(|&i| dec.push(i)).collect();
    text.extend(dec.finish());
    assert_eq!(text, t.decode(cut, false).unwrap());
}

#[test]
fn incremental_decoder_matches_full_decode_on_arbitrary_bytes() {
    let t = Arc::new(smol());
    // Deterministic pseudo-random byte-token sequences, including invalid UTF-8, specials and
    // out-of-vocabulary ids (ignored by push, so left out of the reference decode).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for skip in [false, true] {
        for _ in 0..300 {
            let len = (next() % 24) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| match next() % 10 {
                    0 => (next() % 3) as u32,
                    1 => 3 + 0xc3 + (next() % 2) as u32,
                    _ => (next() % (t.vocab_size() as u64)) as u32,
                })
                .collect();
            let mut dec = IncrementalDecoder::new(t.clone(), skip);
            let mut text: String = ids.iter().filter_map(|&i| dec.push(i)).collect();
            text.extend(dec.finish());
            assert_eq!(text, t.decode(&ids, skip).unwrap(), "ids {ids:?}");
        }
    }
}

#[test]
fn chat_template_from_gguf() {
    let t = smol();
    assert!(t.has_chat_template());
    let msgs = [
        ChatMessage {
            role: "system".into(),
            content: "You are terse.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    // Expected: transformers' apply_chat_template(msgs, tokenize=False,
    // add_generation_prompt=True) with SmolLM2-135M-Instruct's template.
    assert_eq!(
        t.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn unsupported_gguf_tokenizers_are_refused_by_name() {
    let err = Tokenizer::from_gguf(&byte_level_gguf("mystery-pre")).unwrap_err();
    assert!(err.to_string().contains("mystery-pre"), "{err}");
    let err = Tokenizer::from_gguf(&content(vec![(
        "tokenizer.ggml.model",
        Value::String("bert".into()),
    )]))
    .unwrap_err();
    assert!(err.to_string().contains("bert"), "{err}");
    let err = Tokenizer::from_gguf(&content(vec![])).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.model"), "{err}");
}

#[test]
fn sentencepiece_gguf_merges_from_scores_with_byte_fallback() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0f32, 0., 0.];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.);
    }
    // Scores rank merges: "▁hello" beats every other path.
    for (piece, score) in [
        ("▁", -1.0),
        ("h", -2.),
        ("e", -2.),
        ("l", -2.),
        ("o", -2.),
        ("ll", -3.),
        ("he", -4.),
        ("llo", -5.),
        ("hello", -6.),
        ("▁hello", -7.),
        ("▁h", -8.),
    ] {
        tokens.push(piece.into());
        types.push(1);
        scores.push(score);
    }
    let c = content(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]);
    let t = Tokenizer::from_gguf(&c).unwrap();
    let hello = id(&t, "▁hello");
    // BOS added by default for SentencePiece models; a leading space is implied.
    assert_eq!(t.encode("hello", true).unwrap(), vec![1, hello]);
    // "é" is not in the vocabulary: two byte-fallback tokens.
    let ids = t.encode("hello é", false).unwrap();
    assert_eq!(ids, vec![hello, id(&t, "▁"), 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(t.decode(&ids, false).unwrap(), "hello é");
    assert_eq!(t.token_text(hello), " hello");
    assert_eq!(t.token_text(3 + 0x41), "A");
    let tt = Arc::new(t);
    let mut dec = IncrementalDecoder::new(tt.clone(), true);
    let mut text: String = [1, hello, hello]
        .iter()
        .filter_map(|&i| dec.push(i))
        .collect();
    text.extend(dec.finish());
    assert_eq!(text, tt.decode(&[1, hello, hello], true).unwrap());
}

#[test]
fn hf_dir_reads_configs_and_round_trips_the_export() {
    let t = smol();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), t.to_hf_json().unwrap()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({
            "chat_template": SMOLLM2_TEMPLATE,
            "bos_token": {"content": "<|im_start|>"},
            "eos_token": "<|im_end|>",
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [0, 2]}"#,
    )
    .unwrap();
    let h = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(h.eos_token_ids(), &[0, 2]);
    assert_eq!(h.bos_token_id(), Some(1));
    assert!(h.has_chat_template());
    for s in ["12 héllo <|im_start|>x", "٣ ١٢ ١٢"] {
        assert_eq!(h.encode(s, true).unwrap(), t.encode(s, true).unwrap());
    }

    // add_bos_token without a BOS-adding post-processor: we add it ourselves.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "add_bos_token": true}"#,
    )
    .unwrap();
    let h = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(h.encode("he", true).unwrap(), vec![1, id(&t, "he")]);
    assert_eq!(h.encode("he", false).unwrap(), vec![id(&t, "he")]);
    assert!(matches!(
        h.apply_chat_template(&[], true),
        Err(TokenizerError::NoChatTemplate)
    ));

    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(empty.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
