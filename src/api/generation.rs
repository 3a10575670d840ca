//! What the native and OpenAI endpoints share: length checks against the context, stop-string
//! parsing, submission to the engine (429 when the queue is full) and collecting a stream of
//! engine events into one completion.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{ApiError, AppState};
use crate::engine::json_mode::ResponseFormat;
use crate::engine::json_schema::Schema;
use crate::engine::logit_adjust::LogitAdjust;
use crate::engine::sampling::SamplingError;
use crate::engine::scheduler::{
    FinishReason, GenEvent, GenerateRequest, SubmitError, TokenLogprob,
};

/// Stop strings as clients send them: one string or a list.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(untagged)]
pub enum StopSpec {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// Longest stop string accepted, in bytes, and how many.
const MAX_STOP_LEN: usize = 256;
const MAX_STOPS: usize = 16;

impl StopSpec {
    pub fn into_vec(self, field: &str) -> Result<Vec<String>, ApiError> {
        let v = match self {
            Self::None => Vec::new(),
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        };
        if v.len() > MAX_STOPS {
            return Err(ApiError::invalid_field(format!(
                "`{field}` has {} entries; at most {MAX_STOPS} are allowed",
                v.len()
            )));
        }
        if v.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
            return Err(ApiError::invalid_field(format!(
                "every `{field}` entry must be 1 to {MAX_STOP_LEN} bytes long"
            )));
        }
        Ok(v)
    }
}

impl From<SamplingError> for ApiError {
    fn from(e: SamplingError) -> Self {
        ApiError::invalid_field(e.to_string())
    }
}

/// Validates the sampling fields of a request body — every generation route names them alike
/// (`temperature`, `top_p`, `top_k`, `seed`, `min_p`, `presence_penalty`, `frequency_penalty`,
/// `repetition_penalty`, `logit_bias`) — in one order for all of them; `?` returns the 422.
macro_rules! sampling_params {
    ($state:expr, $body:expr, $top_logprobs:expr) => {{
        let mut params = $crate::engine::sampling::SamplingParams::validate(
            $body.temperature,
            $body.top_p,
            $body.top_k,
            $body.seed,
            $top_logprobs,
            1.0,
        )?
        .with_min_p($body.min_p)?;
        params.adjust = $crate::api::generation::logit_adjust(
            $state,
            $body.presence_penalty,
            $body.frequency_penalty,
            $body.repetition_penalty,
            $body.logit_bias.as_ref(),
        )?;
        params
    }};
}
pub(crate) use sampling_params;

/// `response_format`: absent, null or `{"type": "text"}` → plain text; `{"type":
/// "json_object"}` → JSON mode; `{"type": "json_schema", "json_schema": {"name", "schema",
/// "strict"?, "description"?}}` → the schema, compiled here so a refused one is a 422 naming
/// the place in it. Neither constrained form goes with `ignore_eos`, which would keep
/// generating past the complete value.
pub fn response_format(
    format: Option<&serde_json::Value>,
    ignore_eos: bool,
) -> Result<ResponseFormat, ApiError> {
    let kind = match format {
        None | Some(serde_json::Value::Null) => return Ok(ResponseFormat::Text),
        Some(f) => f.get("type").and_then(serde_json::Value::as_str),
    };
    let format = match kind {
        Some("text") => return Ok(ResponseFormat::Text),
        Some("json_object") => ResponseFormat::JsonObject,
        Some("json_schema") => json_schema(format.and_then(|f| f.get("json_schema")))?,
        _ => {
            return Err(ApiError::invalid_field(
                "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
            ))
        }
    };
    if ignore_eos {
        return Err(ApiError::invalid_field(
            "`response_format` json_object and json_schema end at the complete value; they \
             cannot be combined with `ignore_eos`",
        ));
    }
    Ok(format)
}

/// Runs `f` on tokio's blocking pool: compiling a JSON schema's patterns can take a good part of
/// a second in the worst case the limits allow, which must not stall the async workers that
/// stream other requests.
pub async fn off_runtime<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("compiling the reply's constraint: {e}")))?
}

/// [`response_format`] off the async workers when there is a schema to compile.
pub async fn response_format_off_runtime(
    format: Option<serde_json::Value>,
    ignore_eos: bool,
) -> Result<ResponseFormat, ApiError> {
    match format {
        None | Some(serde_json::Value::Null) => Ok(ResponseFormat::Text),
        Some(f) => off_runtime(move || response_format(Some(&f), ignore_eos)).await,
    }
}

/// OpenAI's rule for the names of schemas and tools: 1 to 64 letters, digits, `_` or `-`.
pub fn is_openai_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn json_schema(spec: Option<&serde_json::Value>) -> Result<ResponseFormat, ApiError> {
    let Some(spec) = spec.and_then(serde_json::Value::as_object) else {
        return Err(ApiError::invalid_field(
            "`response_format.json_schema` must be an object with a `schema`",
        ));
    };
    if let Some(name) = spec.get("name") {
        if !name.as_str().is_some_and(is_openai_name) {
            return Err(ApiError::invalid_field(
                "`response_format.json_schema.name` must be 1-64 letters, digits, `_` or `-`",
            ));
        }
    }
    if spec
        .get("strict")
        .is_some_and(|s| !s.is_boolean() && !s.is_null())
    {
        return Err(ApiError::invalid_field(
            "`response_format.json_schema.strict` must be a boolean",
        ));
    }
    let Some(schema) = spec.get("schema") else {
        return Err(ApiError::invalid_field(
            "`response_format.json_schema.schema` is required",
        ));
    };
    let schema = Schema::compile(schema).map_err(|e| {
        ApiError::invalid_field(format!("`response_format.json_schema.schema` {e}"))
    })?;
    Ok(ResponseFormat::JsonSchema(Arc::new(schema)))
}

/// `presence_penalty`, `frequency_penalty`, `repetition_penalty` (vLLM's extension) and
/// `logit_bias` (an object of token ids, as strings, to numbers — OpenAI's form), validated
/// against the tokenizer's vocabulary.
pub fn logit_adjust(
    state: &AppState,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    logit_bias: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<LogitAdjust, ApiError> {
    let mut bias = Vec::new();
    for (key, value) in logit_bias.into_iter().flatten() {
        let token: u32 = key.trim().parse().map_err(|_| {
            ApiError::invalid_field(format!("`logit_bias`: keys must be token ids, got {key:?}"))
        })?;
        let b = value.as_f64().ok_or_else(|| {
            ApiError::invalid_field(format!(
                "`logit_bias`: the bias for token {token} must be a number, got {value}"
            ))
        })?;
        bias.push((token, b as f32));
    }
    Ok(LogitAdjust::validate(
        presence_penalty,
        frequency_penalty,
        bias,
        state.tokenizer.vocab_size(),
    )?
    .with_repetition_penalty(repetition_penalty)?)
}

/// Resolves `max_new_tokens` and checks that prompt and generation fit the context.
pub fn check_lengths(
    state: &AppState,
    prompt_len: usize,
    max_new_tokens: Option<i64>,
    field: &str,
) -> Result<usize, ApiError> {
    let m = &state.model;
    let max_new = match max_new_tokens {
        None => m
            .default_max_new_tokens
            .min(m.context_len.saturating_sub(prompt_len)),
        Some(n) if n < 0 => {
            return Err(ApiError::invalid_field(format!(
                "`{field}` must not be negative"
            )));
        }
        Some(n) if n as u64 > m.max_new_tokens_limit as u64 => {
            return Err(ApiError::invalid_field(format!(
                "`{field}` is {n}; this server allows at most {}",
                m.max_new_tokens_limit
            )));
        }
        Some(n) => n as usize,
    };
    if prompt_len == 0 {
        return Err(ApiError::invalid_field(
            "the prompt is empty after tokenization",
        ));
    }
    if let Some(max) = state
        .limits
        .max_prompt_tokens
        .filter(|&max| prompt_len > max)
    {
        return Err(ApiError::invalid_field(format!(
            "the prompt has {prompt_len} tokens; this server allows at most {max} \
             (limits.max_prompt_tokens)"
        )));
    }
    if prompt_len + max_new > m.context_len {
        return Err(ApiError::invalid_field(format!(
            "the prompt has {prompt_len} tokens and `{field}` is {max_new}: together they exceed \
             the model's context of {} tokens",
            m.context_len
        )));
    }
    Ok(max_new)
}

/// The engine reuses cached prompt prefixes only between requests of one tenant.
fn cache_scope(tenant: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tenant.hash(&mut h);
    h.finish()
}

/// Hands a checked request to the engine for `tenant`: charges its prompt tokens plus
/// `max_new_tokens` to the tenant's `limits.tokens_per_minute` first (429 when spent), and
/// gives back what was not generated when the request ends, however it ends.
pub fn submit(
    state: &AppState,
    tenant: &str,
    req: GenerateRequest,
) -> Result<UnboundedReceiver<GenEvent>, ApiError> {
    let limits = &state.limits;
    let (reserved, max_new) = (req.prompt.len() + req.max_new_tokens, req.max_new_tokens);
    let mut req = req;
    req.cache_scope = cache_scope(tenant);
    req.queued_ticket = Some(Arc::new(limits.try_queue(tenant)?));
    limits.charge_tokens(tenant, reserved)?;
    let rx = state.engine.submit(req).map_err(|e| {
        limits.refund_tokens(tenant, reserved);
        match e {
            SubmitError::QueueFull(_) => ApiError::overloaded(e.to_string(), 1),
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
        }
    })?;
    if !limits.token_rate_enabled() {
        return Ok(rx);
    }
    Ok(refund_unused(
        rx,
        state.limits.clone(),
        tenant.to_owned(),
        max_new,
    ))
}

/// Forwards the engine's events, counting generated tokens; when the request ends (done, or
/// the receiver dropped: client gone) refunds `max_new` minus what was generated. A dropped
/// receiver drops the engine's channel at once, so the engine still frees the slot at its
/// next step.
fn refund_unused(
    mut rx: UnboundedReceiver<GenEvent>,
    limits: std::sync::Arc<crate::api::limits::TenantLimits>,
    tenant: String,
    max_new: usize,
) -> UnboundedReceiver<GenEvent> {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut generated = 0usize;
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => None,
            };
            let Some(ev) = ev else { break };
            match &ev {
                GenEvent::Token { .. } => generated += 1,
                GenEvent::Done {
                    completion_tokens, ..
                } => generated = *completion_tokens,
                _ => {}
            }
            if tx.send(ev).is_err() {
                break;
            }
        }
        limits.refund_tokens(&tenant, max_new.saturating_sub(generated));
    });
    out
}

/// A finished generation.
#[derive(Debug, Default)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<TokenLogprob>,
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// Drains the engine's events for one request.
pub async fn collect(mut rx: UnboundedReceiver<GenEvent>) -> Result<Completion, ApiError> {
    let mut c = Completion::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::PromptLogprobs(lp) => c.prompt_logprobs = Some(lp),
            GenEvent::Token { token, text } => {
                c.tokens.push(token);
                c.text.push_str(&text);
            }
            GenEvent::Text(text) => c.text.push_str(&text),
            GenEvent::Done {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                c.finish = Some(finish);
                c.prompt_tokens = prompt_tokens;
                c.cached_tokens = cached_tokens;
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
            GenEvent::Error(e) => return Err(ApiError::internal(e)),
        }
    }
    Err(ApiError::unavailable(
        "the engine stopped before the request finished",
    ))
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random request id with a prefix (`gen-`, `cmpl-`, `chatcmpl-`).
pub fn request_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Tokenizes a plain prompt (special tokens such as BOS added as the model expects).
pub fn text_prompt(state: &AppState, prompt: &str, field: &str) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(prompt, true)
        .map_err(|e| ApiError::invalid_field(format!("`{field}` could not be tokenized: {e}")))
}
