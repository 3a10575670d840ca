//! OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`: the request and
//! response shapes the official client sends and parses, streaming (`data: {...}` chunks, then
//! `data: [DONE]`), usage, finish_reason, logprobs, echo (prompt scoring), seed, stop, `n`
//! choices, presence/frequency penalties and `logit_bias`.

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Tenant;
use super::extract::ApiJson;
use super::generation::{self, chat_prompt, text_prompt, Completion, MessageIn, StopSpec};
use super::{ApiError, AppState};
use crate::adapters::{AdapterError, Resolved};
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{FinishReason, GenEvent, GenerateRequest, TokenLogprob};
use crate::engine::tokenizer::Tokenizer;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
}

/// Fields of the OpenAI request we accept but ignore (metadata, not behaviour).
#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// OpenAI's API takes `null` for an optional flag as leaving it unset, and some clients send it.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    model: String,
    prompt: PromptIn,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<i64>,
    #[serde(default, deserialize_with = "null_is_false")]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<i64>,
    #[serde(default, deserialize_with = "null_is_false")]
    echo: bool,
    #[serde(default)]
    stop: StopSpec,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// vLLM's and Hugging Face's extension: over prompt and output tokens, in (0, 2], 1 = off.
    repetition_penalty: Option<f32>,
    /// vLLM's and llama.cpp's extension: drop tokens under min_p × the best one's probability.
    min_p: Option<f32>,
    best_of: Option<i64>,
    suffix: Option<String>,
    #[serde(rename = "user")]
    _user: Option<String>,
    top_k: Option<i64>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's and llama.cpp's extension: generate past end-of-sequence tokens (benchmarks
    /// with fixed output lengths).
    #[serde(default, deserialize_with = "null_is_false")]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Most prompts one completions request may carry (each × `n` is a sequence in the engine).
pub const MAX_PROMPTS: usize = 64;

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<MessageIn>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<i64>,
    #[serde(default, deserialize_with = "null_is_false")]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "null_is_false")]
    logprobs: bool,
    top_logprobs: Option<i64>,
    #[serde(default)]
    stop: StopSpec,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// vLLM's and Hugging Face's extension: over prompt and output tokens, in (0, 2], 1 = off.
    repetition_penalty: Option<f32>,
    /// vLLM's and llama.cpp's extension: drop tokens under min_p × the best one's probability.
    min_p: Option<f32>,
    #[serde(rename = "user")]
    _user: Option<String>,
    top_k: Option<i64>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    response_format: Option<Value>,
    /// As in [`CompletionBody`].
    #[serde(default, deserialize_with = "null_is_false")]
    ignore_eos: bool,
}

/// Refuses chat features this server does not implement, naming the field, rather than
/// answering as if they had been honoured.
fn refuse_unsupported_chat(body: &ChatBody) -> Result<(), ApiError> {
    if body.tools.as_ref().is_some_and(|t| !t.is_null())
        || body.functions.as_ref().is_some_and(|t| !t.is_null())
        || body
            .tool_choice
            .as_ref()
            .is_some_and(|t| !t.is_null() && t != "none")
    {
        return Err(ApiError::invalid_field(
            "`tools`/`functions`: tool calling is not supported",
        ));
    }
    let text_format = body
        .response_format
        .as_ref()
        .is_none_or(|f| f.is_null() || f.get("type").and_then(Value::as_str) == Some("text"));
    if !text_format {
        return Err(ApiError::invalid_field(
            "`response_format`: only {\"type\": \"text\"} is supported",
        ));
    }
    Ok(())
}

/// Most choices one request may ask for. Each choice is its own sequence in the engine (its
/// own prefill, KV cache and token budget), so this bounds what one request can hold.
pub const MAX_CHOICES: i64 = 16;

/// `n`: how many choices to generate (default 1).
fn choices_count(n: Option<i64>) -> Result<usize, ApiError> {
    match n {
        None => Ok(1),
        Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid_field(format!(
            "`n` is {n}; allowed 1 to {MAX_CHOICES}"
        ))),
    }
}

/// Refuses (422) a request whose `sequences` (prompts × `n`) could never all be queued at once —
/// a 429 would tell the client to retry what can never succeed.
fn check_fits_queue(state: &AppState, sequences: usize) -> Result<(), ApiError> {
    let (tenant_cap, engine_cap) = (state.limits.max_queued(), state.engine.max_waiting());
    if sequences > tenant_cap.min(engine_cap) {
        return Err(ApiError::invalid_field(format!(
            "`n` × the number of prompts is {sequences}; this server queues at most {} \
             sequences for one request (limits.max_queued_per_tenant = {tenant_cap}, \
             engine.max_waiting = {engine_cap})",
            tenant_cap.min(engine_cap)
        )));
    }
    Ok(())
}

/// Submits `n` copies of `req`, one per choice. With a `seed`, choice `i` draws from
/// `seed + i`, so the choices differ yet the response is reproducible. If one cannot be
/// queued, the ones already submitted are dropped (the engine frees them at its next step).
fn submit_choices(
    state: &AppState,
    tenant: &str,
    req: GenerateRequest,
    n: usize,
) -> Result<Vec<tokio::sync::mpsc::UnboundedReceiver<GenEvent>>, ApiError> {
    (0..n)
        .map(|i| {
            let mut r = req.clone();
            r.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i as u64));
            generation::submit(state, tenant, r)
        })
        .collect()
}

/// Waits for every choice (`n` per prompt, prompt after prompt); the usage counts each prompt
/// once, as OpenAI does.
async fn collect_choices(
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<GenEvent>>,
    n: usize,
) -> Result<(Vec<Completion>, Value), ApiError> {
    let done = futures::future::try_join_all(rxs.into_iter().map(generation::collect)).await?;
    let prompt = done.iter().step_by(n.max(1)).map(|c| c.prompt_tokens).sum();
    let completion = done.iter().map(|c| c.completion_tokens).sum();
    Ok((done, usage(prompt, completion)))
}

/// From each prompt's `best_of` completions (consecutive in `done`), the `n` with the highest
/// mean token log-probability, best first; all of them when `best_of == n`, in order.
fn keep_best(done: Vec<Completion>, best_of: usize, n: usize) -> Vec<Completion> {
    if best_of == n {
        return done;
    }
    let mean = |c: &Completion| {
        let sum: f64 = c.tokens.iter().map(|t| f64::from(t.logprob)).sum();
        if c.tokens.is_empty() {
            f64::NEG_INFINITY
        } else {
            sum / c.tokens.len() as f64
        }
    };
    let mut kept = Vec::with_capacity(done.len() / best_of * n);
    let mut it = done.into_iter().peekable();
    while it.peek().is_some() {
        let mut group: Vec<Completion> = it.by_ref().take(best_of).collect();
        group.sort_by(|a, b| mean(b).total_cmp(&mean(a)));
        kept.extend(group.into_iter().take(n));
    }
    kept
}

/// The completions `prompt`: a string, a list of strings, token ids, or a list of token-id
/// lists (the batched forms evaluation harnesses send), at most [`MAX_PROMPTS`].
fn completion_prompts(state: &AppState, prompt: PromptIn) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab = state.tokenizer.vocab_size() as u32;
    let ids = |ids: Vec<u32>| -> Result<Vec<u32>, ApiError> {
        match ids.iter().find(|&&id| id >= vocab) {
            Some(bad) => Err(ApiError::invalid_field(format!(
                "`prompt`: token id {bad} is outside the vocabulary of {vocab}"
            ))),
            None => Ok(ids),
        }
    };
    let prompts = match prompt {
        PromptIn::Text(t) => vec![text_prompt(state, &t, "prompt")?],
        PromptIn::Texts(v) => v
            .iter()
            .map(|t| text_prompt(state, t, "prompt"))
            .collect::<Result<_, _>>()?,
        PromptIn::Tokens(t) => vec![ids(t)?],
        PromptIn::TokenLists(v) => v.into_iter().map(ids).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid_field(format!(
            "`prompt`: a list of {} prompts; allowed 1 to {MAX_PROMPTS}",
            prompts.len()
        )));
    }
    Ok(prompts)
}

/// `model` is the base model's name or one of the caller's adapters (`name` or
/// `name@version`); returns the pinned adapter, if any. Unknown names (another tenant's
/// included) are 404 model_not_found.
async fn resolve_model(
    state: &AppState,
    tenant: &str,
    model: &str,
) -> Result<Option<Resolved>, ApiError> {
    if model == state.model.name {
        return Ok(None);
    }
    match state.adapters.resolve(tenant, model).await {
        Ok(r) => Ok(Some(r)),
        Err(AdapterError::NotFound(_)) | Err(AdapterError::InvalidName(_)) => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{model}` does not exist; GET /v1/models lists what is served"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The `model` field of responses: the adapter reference when one is used.
fn model_name(state: &AppState, pinned: &Option<Resolved>) -> String {
    match pinned {
        Some(p) => format!("{}@{}", p.row.name, p.row.version),
        None => state.model.name.clone(),
    }
}

fn finish_str(f: Option<FinishReason>) -> &'static str {
    match f {
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(body): ApiJson<CompletionBody>,
) -> Result<Response, ApiError> {
    let pinned = resolve_model(&state, &tenant, &body.model).await?;
    let n = choices_count(body.n)?;
    // best_of: generate this many per prompt, return the n with the highest mean token
    // log-probability (OpenAI's "best").
    let best_of = match body.best_of {
        None => n,
        Some(b) if b >= n as i64 && b <= MAX_CHOICES => b as usize,
        Some(b) => {
            return Err(ApiError::invalid_field(format!(
                "`best_of` is {b}; allowed `n` ({n}) to {MAX_CHOICES}"
            )))
        }
    };
    if body.stream && best_of > n {
        return Err(ApiError::invalid_field(
            "`best_of` greater than `n` cannot be streamed: the best are known only at the end",
        ));
    }
    if body.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_field("`suffix` is not supported"));
    }
    let prompts = completion_prompts(&state, body.prompt)?;
    let logprobs = match body.logprobs {
        None => None,
        Some(n) if (0..=5).contains(&n) => Some(n),
        Some(n) => {
            return Err(ApiError::invalid_field(format!(
                "`logprobs` is {n}; allowed 0 to 5"
            )))
        }
    };
    let mut sampling = SamplingParams::validate(
        body.temperature,
        body.top_p,
        body.top_k,
        body.seed,
        logprobs,
        1.0,
    )?
    .with_min_p(body.min_p)?;
    sampling.adjust = generation::logit_adjust(
        &state,
        body.presence_penalty,
        body.frequency_penalty,
        body.repetition_penalty,
        body.logit_bias.as_ref(),
    )?;
    if body.stream && body.echo {
        return Err(ApiError::invalid_field(
            "`echo` is not supported with `stream`",
        ));
    }
    let stop = body.stop.into_vec("stop")?;
    let mut reqs = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        // OpenAI's default max_tokens for completions is 16.
        let max_new = generation::check_lengths(
            &state,
            prompt.len(),
            Some(body.max_tokens.unwrap_or(16)),
            "max_tokens",
        )?;
        reqs.push(GenerateRequest {
            prompt: prompt.clone(),
            max_new_tokens: max_new,
            sampling: sampling.clone(),
            stop: stop.clone(),
            prompt_logprobs: body.echo && logprobs.is_some(),
            ignore_eos: body.ignore_eos,
            adapter: pinned.as_ref().map(|p| p.adapter.clone()),
            queued_ticket: None,
        });
    }
    check_fits_queue(&state, prompts.len() * best_of)?;
    // Choice `p * n + i` is the i-th sample of prompt p, OpenAI's order.
    let mut rxs = Vec::with_capacity(reqs.len() * best_of);
    for req in reqs {
        rxs.extend(submit_choices(&state, &tenant, req, best_of)?);
    }
    let id = generation::request_id("cmpl-");
    let created = generation::unix_now();
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        let s = stream_chunks(
            state.clone(),
            model_name(&state, &pinned),
            rxs,
            id,
            created,
            Kind::Completion,
            n,
            logprobs.is_some(),
            include_usage,
        );
        return Ok(s.into_response());
    }
    let (done, usage_v) = collect_choices(rxs, best_of).await?;
    let done = keep_best(done, best_of, n);
    let mut choices = Vec::with_capacity(done.len());
    for (index, c) in done.iter().enumerate() {
        let echo_ids = body.echo.then(|| &prompts[index / n]);
        let echoed = match echo_ids {
            Some(ids) => state
                .tokenizer
                .decode(ids, false)
                .map_err(ApiError::internal)?,
            None => String::new(),
        };
        let mut lp = Value::Null;
        if logprobs.is_some() {
            let mut entries = Vec::new();
            if let Some(ids) = echo_ids {
                // The first prompt token has no context, hence no log-probability (null), as
                // OpenAI.
                if let Some(&first) = ids.first() {
                    entries.push((first, None, Vec::new()));
                }
                for t in c.prompt_logprobs.iter().flatten() {
                    entries.push((t.id, Some(t.logprob), t.top.clone()));
                }
            }
            for t in &c.tokens {
                entries.push((t.id, Some(t.logprob), t.top.clone()));
            }
            lp = completion_logprobs(&state.tokenizer, &entries);
        }
        choices.push(
            json!({"index": index, "text": format!("{echoed}{}", c.text), "logprobs": lp,
            "finish_reason": finish_str(c.finish)}),
        );
    }
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model_name(&state, &pinned),
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage_v,
    }))
    .into_response())
}

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
fn completion_logprobs(tok: &Tokenizer, entries: &[LegacyEntry]) -> Value {
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

async fn chat_completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(body): ApiJson<ChatBody>,
) -> Result<Response, ApiError> {
    let pinned = resolve_model(&state, &tenant, &body.model).await?;
    let n = choices_count(body.n)?;
    refuse_unsupported_chat(&body)?;
    let prompt = chat_prompt(&state, body.messages, "messages")?;
    if !body.logprobs && body.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid_field(
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let top = if body.logprobs {
        Some(body.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let mut sampling = SamplingParams::validate(
        body.temperature,
        body.top_p,
        body.top_k,
        body.seed,
        top,
        1.0,
    )?
    .with_min_p(body.min_p)?;
    sampling.adjust = generation::logit_adjust(
        &state,
        body.presence_penalty,
        body.frequency_penalty,
        body.repetition_penalty,
        body.logit_bias.as_ref(),
    )?;
    let (field, max) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    let max_new = generation::check_lengths(&state, prompt.len(), max, field)?;
    let req = GenerateRequest {
        prompt,
        max_new_tokens: max_new,
        sampling,
        stop: body.stop.into_vec("stop")?,
        prompt_logprobs: false,
        ignore_eos: body.ignore_eos,
        adapter: pinned.as_ref().map(|p| p.adapter.clone()),
        queued_ticket: None,
    };
    check_fits_queue(&state, n)?;
    let rxs = submit_choices(&state, &tenant, req, n)?;
    let id = generation::request_id("chatcmpl-");
    let created = generation::unix_now();
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        let s = stream_chunks(
            state.clone(),
            model_name(&state, &pinned),
            rxs,
            id,
            created,
            Kind::Chat,
            n,
            body.logprobs,
            include_usage,
        );
        return Ok(s.into_response());
    }
    let (done, usage_v) = collect_choices(rxs, n).await?;
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = if body.logprobs {
                json!({"content": c.tokens.iter().map(|t| chat_logprob(&state.tokenizer, t)).collect::<Vec<_>>()})
            } else {
                Value::Null
            };
            json!({
                "index": index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs,
                "finish_reason": finish_str(c.finish),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model_name(&state, &pinned),
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage_v,
    }))
    .into_response())
}

fn chat_logprob(tok: &Tokenizer, t: &TokenLogprob) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = tok.token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
    };
    let mut v = entry(t.id, t.logprob);
    v["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
    v
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

/// Streams OpenAI chunks for `rxs` (one per choice, chunks tagged with its `index`): for chat a
/// first chunk per choice with the assistant role, one chunk per piece of text as the choices
/// produce them, a chunk with `finish_reason` as each ends, then — once all have ended — a
/// usage chunk when asked (prompt counted once) and `[DONE]`. An error in any choice ends the
/// stream with an error event and `[DONE]`.
#[allow(clippy::too_many_arguments)]
fn stream_chunks(
    state: AppState,
    model: String,
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<GenEvent>>,
    id: String,
    created: u64,
    kind: Kind,
    n: usize,
    logprobs: bool,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let chunk = move |choice: Value, usage_v: Option<Value>| -> Event {
        let object = match kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "system_fingerprint": null,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) }});
        if include_usage {
            v["usage"] = usage_v.unwrap_or(Value::Null);
        }
        Event::default().data(v.to_string())
    };
    let tok = state.tokenizer.clone();
    let piece = move |index: usize,
                      text: String,
                      token: Option<&TokenLogprob>,
                      finish: Option<&str>|
          -> Value {
        match kind {
            Kind::Completion => {
                let lp = match (logprobs, token) {
                    (true, Some(t)) => {
                        completion_logprobs(&tok, &[(t.id, Some(t.logprob), t.top.clone())])
                    }
                    _ => Value::Null,
                };
                json!({"index": index, "text": text, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                let lp = match (logprobs, token) {
                    (true, Some(t)) => json!({"content": [chat_logprob(&tok, t)]}),
                    _ => Value::Null,
                };
                json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
        }
    };
    let choices = rxs.len();
    // Each choice's events, tagged with its index, then `None` when its channel closes.
    let merged = futures::stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(move |ev| (i, Some(ev)))
            .chain(stream::once(async move { (i, None) }))
            .boxed()
    }));
    let mut pending = std::collections::VecDeque::new();
    if let Kind::Chat = kind {
        for i in 0..choices {
            let c = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            pending.push_back(chunk(c, None));
        }
    }
    let init = Streaming {
        merged,
        pending,
        done: vec![false; choices],
        prompt_tokens: 0,
        completion_tokens: 0,
        over: false,
    };
    let events = stream::unfold(init, move |mut st| {
        let chunk = chunk.clone();
        let piece = piece.clone();
        async move {
            loop {
                if let Some(ev) = st.pending.pop_front() {
                    return Some((Ok(ev), st));
                }
                if st.over {
                    return None;
                }
                if st.done.iter().all(|&d| d) {
                    if include_usage {
                        let u = usage(st.prompt_tokens, st.completion_tokens);
                        st.pending.push_back(chunk(Value::Null, Some(u)));
                    }
                    st.end(None);
                    continue;
                }
                let Some((i, ev)) = st.merged.next().await else {
                    st.over = true;
                    continue;
                };
                match ev {
                    Some(GenEvent::Token { token, text }) => {
                        if text.is_empty() && !logprobs {
                            continue;
                        }
                        st.pending
                            .push_back(chunk(piece(i, text, Some(&token), None), None));
                    }
                    Some(GenEvent::Text(text)) => {
                        st.pending
                            .push_back(chunk(piece(i, text, None, None), None));
                    }
                    Some(GenEvent::PromptLogprobs(_)) => {}
                    Some(GenEvent::Done {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        st.done[i] = true;
                        // Each prompt once: choice i is sample i % n of prompt i / n.
                        if i % n.max(1) == 0 {
                            st.prompt_tokens += prompt_tokens;
                        }
                        st.completion_tokens += completion_tokens;
                        let c = piece(i, String::new(), None, Some(finish_str(Some(finish))));
                        st.pending.push_back(chunk(c, None));
                    }
                    Some(GenEvent::Error(e)) => st.end(Some(ApiError::internal(e))),
                    None if !st.done[i] => st.end(Some(ApiError::unavailable(
                        "the engine stopped before the request finished",
                    ))),
                    None => {}
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Where a stream of choices stands.
struct Streaming<S> {
    merged: S,
    /// Events ready to send, in order.
    pending: std::collections::VecDeque<Event>,
    /// Which choices have sent their `finish_reason`.
    done: Vec<bool>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// `[DONE]` is queued (or every channel closed): nothing more after `pending`.
    over: bool,
}

impl<S> Streaming<S> {
    /// Queues the error (if any) as OpenAI streams it — a `data: {"error": …}` event — then
    /// `[DONE]`, and ends the stream after them.
    fn end(&mut self, error: Option<ApiError>) {
        if let Some(err) = error {
            self.pending
                .push_back(Event::default().data(err.to_json().to_string()));
        }
        self.pending.push_back(Event::default().data("[DONE]"));
        self.over = true;
    }
}
