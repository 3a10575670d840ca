//! `POST /v1/generate`: the native generation endpoint — a prompt or chat messages in, text,
//! finish reason, usage and optional per-token log-probabilities out; SSE with `stream: true`.

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::Tenant;
use super::extract::ApiJson;
use super::generation::{self, text_prompt, StopSpec};
use super::messages::{chat_prompt, MessageIn};
use super::{ApiError, AppState};
use crate::engine::scheduler::{GenEvent, GenerateRequest, TokenLogprob};
use crate::engine::tokenizer::Tokenizer;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/generate", post(generate))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    prompt: Option<String>,
    messages: Option<Vec<MessageIn>>,
    adapter_id: Option<String>,
    max_new_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    #[serde(default)]
    stop: StopSpec,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
    /// OpenAI's penalties over the generated tokens, each in [-2, 2].
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// vLLM's and Hugging Face's extension: over prompt and output tokens, in (0, 2], 1 = off.
    repetition_penalty: Option<f32>,
    /// vLLM's and llama.cpp's extension: drop tokens under min_p × the best one's probability.
    min_p: Option<f32>,
    /// Token id (as a string) → bias in [-100, 100], added to that token's logit.
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// `{"type": "text"}` (default), `{"type": "json_object"}` or `{"type": "json_schema", ...}`,
    /// as OpenAI's chat route.
    response_format: Option<serde_json::Value>,
    /// Generate exactly max_new_tokens, ignoring end-of-sequence (for benchmarks).
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Serialize)]
struct TokenOut {
    id: u32,
    text: String,
    logprob: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<Vec<TopOut>>,
}

#[derive(Serialize)]
struct TopOut {
    id: u32,
    text: String,
    logprob: f32,
}

fn token_out(tok: &Tokenizer, t: &TokenLogprob, with_top: bool) -> TokenOut {
    TokenOut {
        id: t.id,
        text: tok.token_text(t.id),
        logprob: t.logprob,
        top_logprobs: with_top.then(|| {
            t.top
                .iter()
                .map(|&(id, logprob)| TopOut {
                    id,
                    text: tok.token_text(id),
                    logprob,
                })
                .collect()
        }),
    }
}

async fn generate(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(mut body): ApiJson<GenerateBody>,
) -> Result<Response, ApiError> {
    let pinned = match &body.adapter_id {
        Some(r) => Some(state.adapters.resolve(&tenant, r).await?),
        None => None,
    };
    let prompt = match (body.prompt, body.messages) {
        (Some(p), None) => text_prompt(&state, &p, "prompt")?,
        (None, Some(m)) => chat_prompt(&state, m, "messages")?,
        _ => {
            return Err(ApiError::invalid_field(
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    let top_logprobs = if body.logprobs {
        body.top_logprobs
    } else {
        None
    };
    if !body.logprobs && body.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid_field(
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let sampling = generation::sampling_params!(&state, body, top_logprobs);
    let max_new_tokens =
        generation::check_lengths(&state, prompt.len(), body.max_new_tokens, "max_new_tokens")?;
    let response_format =
        generation::response_format_off_runtime(body.response_format.take(), body.ignore_eos)
            .await?;
    let req = GenerateRequest {
        prompt,
        max_new_tokens,
        sampling,
        stop: body.stop.into_vec("stop")?,
        prompt_logprobs: false,
        ignore_eos: body.ignore_eos,
        response_format,
        adapter: pinned.as_ref().map(|p| p.adapter.clone()),
        cache_scope: 0, // set by generation::submit
        queued_ticket: None,
    };
    let with_top = top_logprobs.is_some_and(|n| n > 0);
    let adapter_fields = match &pinned {
        Some(p) => (json!(p.row.name), json!(p.row.version)),
        None => (Value::Null, Value::Null),
    };
    let rx = generation::submit(&state, &tenant, req)?;
    let id = generation::request_id("gen-");
    if body.stream {
        return Ok(sse(state, id, rx, body.logprobs, with_top, adapter_fields).into_response());
    }
    let c = generation::collect(rx).await?;
    let tokens = body.logprobs.then(|| {
        c.tokens
            .iter()
            .map(|t| token_out(&state.tokenizer, t, with_top))
            .collect::<Vec<_>>()
    });
    let mut out = json!({
        "id": id,
        "model": state.model.name,
        "adapter_id": adapter_fields.0,
        "adapter_version": adapter_fields.1,
        "text": c.text,
        "finish_reason": c.finish.map(|f| f.as_str()),
        "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                  "cached_tokens": c.cached_tokens},
    });
    if let Some(t) = tokens {
        out["tokens"] = json!(t);
    }
    Ok(Json(out).into_response())
}

/// One SSE event per token (`{"id","token","text"}`), then a final event with the whole text,
/// `finish_reason` and `usage`. Dropping the stream (client gone) frees the engine slot.
fn sse(
    state: AppState,
    id: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    logprobs: bool,
    with_top: bool,
    adapter_fields: (Value, Value),
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let init = (rx, String::new(), false);
    let events = stream::unfold(init, move |(mut rx, mut text, done)| {
        let state = state.clone();
        let id = id.clone();
        let adapter_fields = adapter_fields.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let ev = match rx.recv().await {
                    Some(ev) => ev,
                    None => {
                        let err =
                            ApiError::unavailable("the engine stopped before the request finished");
                        let e = Event::default()
                            .event("error")
                            .data(err.to_json().to_string());
                        return Some((Ok(e), (rx, text, true)));
                    }
                };
                let data = match ev {
                    GenEvent::PromptLogprobs(_) => continue,
                    GenEvent::Token { token, text: piece } => {
                        text.push_str(&piece);
                        let mut d = json!({"id": id, "text": piece, "token": {"id": token.id, "text": state.tokenizer.token_text(token.id)}});
                        if logprobs {
                            d["token"] = json!(token_out(&state.tokenizer, &token, with_top));
                        }
                        d
                    }
                    GenEvent::Text(piece) => {
                        text.push_str(&piece);
                        json!({"id": id, "text": piece, "token": null})
                    }
                    GenEvent::Done {
                        finish,
                        prompt_tokens,
                        cached_tokens,
                        completion_tokens,
                    } => {
                        let d = json!({
                            "id": id,
                            "model": state.model.name,
                            "adapter_id": adapter_fields.0,
                            "adapter_version": adapter_fields.1,
                            "text": text,
                            "finish_reason": finish.as_str(),
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "cached_tokens": cached_tokens},
                        });
                        return Some((
                            Ok(Event::default().data(d.to_string())),
                            (rx, String::new(), true),
                        ));
                    }
                    GenEvent::Error(e) => {
                        let err = ApiError::internal(e);
                        let ev = Event::default()
                            .event("error")
                            .data(err.to_json().to_string());
                        return Some((Ok(ev), (rx, text, true)));
                    }
                };
                return Some((
                    Ok(Event::default().data(data.to_string())),
                    (rx, text, false),
                ));
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
