//! OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`: the request and
//! response shapes the official client sends and parses, streaming (`data: {...}` chunks, then
//! `data: [DONE]`), usage, finish_reason, logprobs, echo (prompt scoring, streamed too), seed,
//! stop, `n` choices, presence/frequency penalties and `logit_bias`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Tenant;
use super::extract::ApiJson;
use super::generation::{self, StopSpec};
use super::messages::{chat_messages, render_chat, MessageIn};
use super::{ApiError, AppState};
use crate::adapters::{AdapterError, Resolved};
use crate::engine::json_mode::ResponseFormat;
use crate::engine::scheduler::{FinishReason, GenerateRequest};

mod choices;
mod logprobs;
mod sse;
mod tools;

use choices::{
    check_fits_queue, choices_count, collect_choices, completion_prompts, keep_best,
    submit_choices, MAX_CHOICES,
};
use logprobs::{chat_logprob, completion_logprobs};
use sse::{stream_chunks, Kind};

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
    /// vLLM's extension (OpenAI's completions have none): JSON mode or a JSON schema, as chat.
    response_format: Option<Value>,
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
    parallel_tool_calls: Option<Value>,
    functions: Option<Value>,
    response_format: Option<Value>,
    /// As in [`CompletionBody`].
    #[serde(default, deserialize_with = "null_is_false")]
    ignore_eos: bool,
}

/// The fields that shape a chat reply (`tools` and their choice, `response_format`), taken out
/// of the body so their schemas compile off the async workers.
struct ReplyShape {
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
    functions: Option<Value>,
    response_format: Option<Value>,
    ignore_eos: bool,
}

impl ReplyShape {
    fn take(body: &mut ChatBody) -> Self {
        ReplyShape {
            tools: body.tools.take(),
            tool_choice: body.tool_choice.take(),
            parallel_tool_calls: body.parallel_tool_calls.take(),
            functions: body.functions.take(),
            response_format: body.response_format.take(),
            ignore_eos: body.ignore_eos,
        }
    }

    /// The tools (`functions`, their deprecated form, is refused rather than ignored) and the
    /// reply's constraint: the tools' reply schema, or `response_format` — not both.
    fn compile(self) -> Result<(Option<tools::Tools>, ResponseFormat), ApiError> {
        if self.functions.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid_field(
                "`functions` is deprecated and not supported; send `tools`",
            ));
        }
        let tools = tools::parse(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls.as_ref(),
        )?;
        let format = generation::response_format(self.response_format.as_ref(), self.ignore_eos)?;
        let format = match (&tools, format) {
            (None, format) => format,
            (Some(t), ResponseFormat::Text) if !self.ignore_eos => t.response_format()?,
            (Some(_), _) => {
                return Err(ApiError::invalid_field(
                    "`tools` cannot be combined with a `response_format` other than text, nor \
                     with `ignore_eos`",
                ))
            }
        };
        Ok((tools, format))
    }
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

/// OpenAI's usage object; `cached` (prompt tokens from the prefix cache) goes where OpenAI
/// reports its own prompt caching.
fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

async fn completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(mut body): ApiJson<CompletionBody>,
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
    let sampling = generation::sampling_params!(&state, body, logprobs);
    let stop = body.stop.into_vec("stop")?;
    let format =
        generation::response_format_off_runtime(body.response_format.take(), body.ignore_eos)
            .await?;
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
            response_format: format.clone(),
            adapter: pinned.as_ref().map(|p| p.adapter.clone()),
            cache_scope: 0, // set by generation::submit
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
        // Choice c is a sample of prompt c / n.
        let mut echo = Vec::new();
        if body.echo {
            for c in 0..prompts.len() * n {
                let ids = &prompts[c / n];
                let text = state
                    .tokenizer
                    .decode(ids, false)
                    .map_err(ApiError::internal)?;
                echo.push(sse::Echo {
                    text,
                    first: ids.first().copied(),
                });
            }
        }
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
            echo,
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

async fn chat_completions(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(mut body): ApiJson<ChatBody>,
) -> Result<Response, ApiError> {
    let pinned = resolve_model(&state, &tenant, &body.model).await?;
    let n = choices_count(body.n)?;
    let shape = ReplyShape::take(&mut body);
    let (tools, format) = generation::off_runtime(move || shape.compile()).await?;
    let mut messages = chat_messages(body.messages, "messages")?;
    if let Some(t) = &tools {
        t.instruct(&mut messages);
    }
    let prompt = render_chat(&state, &messages, "messages")?;
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
    let sampling = generation::sampling_params!(&state, body, top);
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
        response_format: format,
        adapter: pinned.as_ref().map(|p| p.adapter.clone()),
        cache_scope: 0, // set by generation::submit
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
            if tools.is_some() {
                Kind::ChatTools
            } else {
                Kind::Chat
            },
            n,
            body.logprobs,
            include_usage,
            Vec::new(),
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
            let (message, finish) = match &tools {
                Some(_) => tools::choice_message(&c.text, finish_str(c.finish)),
                None => (
                    json!({"role": "assistant", "content": c.text}),
                    finish_str(c.finish),
                ),
            };
            json!({
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
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
