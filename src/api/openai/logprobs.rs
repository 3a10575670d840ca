//! Log-probabilities in OpenAI's two shapes: the legacy completions object (parallel arrays,
//! text offsets, `bytes:` tokens) and chat's `content` entries.

use serde_json::{json, Value};

use crate::engine::scheduler::TokenLogprob;
use crate::engine::tokenizer::Tokenizer;

/// One entry of the legacy completions logprobs: token id, its logprob (None for the first
/// prompt token, which has no context) and the top alternatives.
type LegacyEntry = (u32, Option<f32>, Vec<(u32, f32)>);

/// A token as the legacy completions format shows it: its text, or `bytes:\xNN…` when the
/// token is only part of a UTF-8 character (as OpenAI does).
fn legacy_token(tok: &Tokenizer, id: u32) -> String {
    let bytes = tok.token_bytes(id);
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let hex: String = e.as_bytes().iter().map(|b| format!("\\x{b:02x}")).collect();
            format!("bytes:{hex}")
        }
    }
}

/// The legacy completions `logprobs` object: parallel arrays plus character offsets into the
/// returned text.
pub(super) fn completion_logprobs(tok: &Tokenizer, entries: &[LegacyEntry]) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut offsets = Vec::new();
    let mut text_bytes: Vec<u8> = Vec::new();
    for (id, lp, top) in entries {
        // Offset in characters of the complete characters before this token.
        let valid = match std::str::from_utf8(&text_bytes) {
            Ok(s) => s.chars().count(),
            Err(e) => String::from_utf8_lossy(&text_bytes[..e.valid_up_to()])
                .chars()
                .count(),
        };
        offsets.push(valid);
        text_bytes.extend(tok.token_bytes(*id));
        tokens.push(legacy_token(tok, *id));
        token_logprobs.push(*lp);
        if lp.is_none() {
            top_logprobs.push(Value::Null);
        } else {
            let map: serde_json::Map<String, Value> = top
                .iter()
                .map(|(t, l)| (legacy_token(tok, *t), json!(l)))
                .collect();
            top_logprobs.push(Value::Object(map));
        }
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets})
}

pub(super) fn chat_logprob(tok: &Tokenizer, t: &TokenLogprob) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = tok.token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
    };
    let mut v = entry(t.id, t.logprob);
    v["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
    v
}
