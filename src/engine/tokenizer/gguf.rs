//! Builds a Hugging Face `tokenizer.json` document from GGUF metadata (`tokenizer.ggml.*`), so
//! a GGUF file alone gives the same token ids as the model's original tokenizer.
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizers
//! llama.cpp knows as smollm (and its relatives starcoder/refact/...), gpt2/default,
//! llama-bpe (Llama 3) and qwen2; and SentencePiece-style BPE (`"llama"`), whose merges are
//! rebuilt from the token scores as `transformers` does. Anything else is refused by name:
//! a tokenizer that silently splits text differently would make the model quietly worse.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Value as Json};

use super::TokenizerError;

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_UNUSED: i64 = 5;
const TYPE_BYTE: i64 = 6;

/// Llama 3's (`llama-bpe`): numbers in groups of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: like Llama 3 but every digit on its own.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What `from_gguf` needs besides the tokenizer.json document.
pub(crate) struct GgufTokenizer {
    pub json: Json,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub chat_template: Option<String>,
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn bad(key: &str, what: &str) -> TokenizerError {
    TokenizerError::Gguf(format!("metadata `{key}` {what}"))
}

fn get_str<'a>(content: &'a Content, key: &str) -> Result<Option<&'a str>, TokenizerError> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_string()
            .map(|s| Some(s.as_str()))
            .map_err(|_| bad(key, "is not a string")),
    }
}

/// Integer metadata of any width; GGUF writers disagree on u32 vs i32 for ids.
fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

fn get_id(content: &Content, key: &str, vocab: usize) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = meta(content, key) else {
        return Ok(None);
    };
    let id = as_i64(v).ok_or_else(|| bad(key, "is not an integer"))?;
    // -1 is how some converters write "none".
    if id < 0 {
        return Ok(None);
    }
    match u32::try_from(id) {
        Ok(id) if (id as usize) < vocab => Ok(Some(id)),
        _ => Err(bad(
            key,
            &format!("= {id} is outside the vocabulary of {vocab} tokens"),
        )),
    }
}

fn get_bool(content: &Content, key: &str) -> Result<Option<bool>, TokenizerError> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_bool()
            .map(Some)
            .map_err(|_| bad(key, "is not a boolean")),
    }
}

fn get_array<'a>(
    content: &'a Content,
    key: &str,
) -> Result<Option<&'a Vec<Value>>, TokenizerError> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => v
            .to_vec()
            .map(Some)
            .map_err(|_| bad(key, "is not an array")),
    }
}

fn get_str_array(content: &Content, key: &str) -> Result<Option<Vec<String>>, TokenizerError> {
    let Some(arr) = get_array(content, key)? else {
        return Ok(None);
    };
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| bad(key, "has a non-string element"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The pre-tokenizer families we reproduce, named after llama.cpp's `tokenizer.ggml.pre`.
enum Pre {
    /// GPT-2's regex (applied by `ByteLevel { use_regex: true }`), digits grouped.
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex (SmolLM2, StarCoder, ...).
    DigitsGpt2,
    /// A single regex split, then byte-level mapping without its own regex.
    Regex(&'static str),
}

fn pre_for(name: Option<&str>) -> Result<Pre, TokenizerError> {
    Ok(match name {
        // Files converted before llama.cpp recorded the pre-tokenizer used GPT-2's.
        None | Some("default" | "gpt2" | "gpt-2") => Pre::Gpt2,
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b",
        ) => Pre::DigitsGpt2,
        Some("llama-bpe" | "llama3" | "falcon3" | "smaug-bpe") => Pre::Regex(LLAMA3_REGEX),
        Some("qwen2" | "deepseek-r1-qwen") => Pre::Regex(QWEN2_REGEX),
        Some(other) => {
            return Err(TokenizerError::Unsupported(format!(
            "GGUF pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported; serve the model \
                 from a Hugging Face directory with its tokenizer.json instead"
        )))
        }
    })
}

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn pre_tokenizer_json(pre: &Pre) -> Json {
    match pre {
        Pre::Gpt2 => byte_level(false, true),
        // SmolLM2's own tokenizer.json, verbatim.
        Pre::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(false, true),
        ]}),
        Pre::Regex(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false, false),
        ]}),
    }
}

/// Adds BOS in front of every sequence, as `add_bos_token` asks. Expressed as the post-processor
/// (not prepended by hand) so an exported tokenizer.json behaves the same.
fn bos_post_processor(bos: &str, bos_id: u32) -> Json {
    let special = json!({"SpecialToken": {"id": bos, "type_id": 0}});
    json!({
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    })
}

pub(crate) fn build(content: &Content) -> Result<GgufTokenizer, TokenizerError> {
    let model = get_str(content, "tokenizer.ggml.model")?.ok_or_else(|| {
        TokenizerError::Gguf(
            "the GGUF file has no tokenizer (metadata `tokenizer.ggml.model` is missing)".into(),
        )
    })?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(TokenizerError::Unsupported(format!(
            "GGUF tokenizer model `{other}` (tokenizer.ggml.model) is not supported (only `gpt2` \
                 byte-level BPE and `llama` SentencePiece); serve the model from a Hugging Face \
                 directory with its tokenizer.json instead"
        )))
        }
    };
    let tokens = get_str_array(content, "tokenizer.ggml.tokens")?
        .ok_or_else(|| bad("tokenizer.ggml.tokens", "is missing"))?;
    let n = tokens.len();
    let types: Vec<i64> = match get_array(content, "tokenizer.ggml.token_type")? {
        None => vec![TYPE_NORMAL; n],
        Some(arr) => {
            let t = arr
                .iter()
                .map(|v| {
                    as_i64(v).ok_or_else(|| {
                        bad("tokenizer.ggml.token_type", "has a non-integer element")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if t.len() != n {
                return Err(bad(
                    "tokenizer.ggml.token_type",
                    &format!("has {} entries for {n} tokens", t.len()),
                ));
            }
            t
        }
    };

    let bos = get_id(content, "tokenizer.ggml.bos_token_id", n)?;
    let mut eos = Vec::new();
    // EOT/EOM end a turn in chat models (Llama 3's <|eot_id|>); generation stops on any of them.
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = get_id(content, key, n)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let unk = get_id(content, "tokenizer.ggml.unknown_token_id", n)?;
    let chat_template = get_str(content, "tokenizer.chat_template")?.map(str::to_owned);

    let mut vocab = serde_json::Map::with_capacity(n);
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(tok.clone(), json!(id));
        // Control and unknown tokens are special (matched whole, dropped by
        // skip_special_tokens); user-defined ones are matched whole but are ordinary text, as
        // Hugging Face marks them. Byte tokens (<0x0A>) stay in the model for byte fallback.
        let special = match *ty {
            TYPE_CONTROL | TYPE_UNKNOWN => true,
            TYPE_USER_DEFINED => false,
            TYPE_NORMAL | TYPE_UNUSED | TYPE_BYTE => continue,
            // Unknown future types: treat as special rather than let them be merged into text.
            _ => true,
        };
        added.push(
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special}),
        );
    }

    let (merges, normalizer, pre_tokenizer, decoder, default_add_bos, byte_fallback, unk_token) =
        if spm {
            let scores = match get_array(content, "tokenizer.ggml.scores")? {
                Some(arr) if arr.len() == n => arr
                    .iter()
                    .map(|v| {
                        v.to_f32()
                            .map_err(|_| bad("tokenizer.ggml.scores", "has a non-float element"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => {
                    return Err(bad(
                        "tokenizer.ggml.scores",
                        "is missing or has the wrong length",
                    ))
                }
            };
            let add_space = get_bool(content, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let prepend = if add_space { "first" } else { "never" };
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                spm_merges(&tokens, &types, &scores),
                Json::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": prepend, "split": false}),
                json!({"type": "Sequence", "decoders": dec}),
                true,
                true,
                unk.map(|id| tokens[id as usize].clone()),
            )
        } else {
            let merges = get_str_array(content, "tokenizer.ggml.merges")?
                .ok_or_else(|| bad("tokenizer.ggml.merges", "is missing"))?;
            let merges = merges
                .into_iter()
                .map(|m| match m.split_once(' ') {
                    Some((a, b)) => Ok(json!([a, b])),
                    None => Err(bad(
                        "tokenizer.ggml.merges",
                        &format!("has an entry without a space: {m:?}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let pre = pre_for(get_str(content, "tokenizer.ggml.pre")?)?;
            // llama.cpp adds BOS by default only for Llama 3 among the byte-level tokenizers.
            let default_bos = matches!(pre, Pre::Regex(r) if r == LLAMA3_REGEX);
            (
                merges,
                Json::Null,
                pre_tokenizer_json(&pre),
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                default_bos,
                false,
                None,
            )
        };

    let add_bos = get_bool(content, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
    let post_processor = match bos {
        Some(id) if add_bos => bos_post_processor(&tokens[id as usize], id),
        _ if spm => Json::Null,
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };

    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk_token,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": spm,
            "byte_fallback": byte_fallback,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    Ok(GgufTokenizer {
        json,
        bos,
        eos,
        chat_template,
    })
}

/// SentencePiece GGUFs carry scores, not merges. A BPE that merges the pair whose result has
/// the highest score first is what SentencePiece's BPE does; this is how `transformers`
/// (GGUFTokenizerSkeleton) derives the merge list, so the ranks match its tokenizer.
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f32]) -> Vec<Json> {
    let normal: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TYPE_NORMAL)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, f32, f32, &str, &str)> = Vec::new();
    for (i, tok) in tokens.iter().enumerate() {
        if types[i] != TYPE_NORMAL {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (normal.get(l), normal.get(r)) {
                merges.push((scores[i], scores[li], scores[ri], l, r));
            }
        }
    }
    // Highest merged score first; ties broken by the pieces' scores, as transformers does.
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.total_cmp(&a.1))
            .then(b.2.total_cmp(&a.2))
    });
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect()
}
