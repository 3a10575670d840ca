//! Several sequences for one request: `n` choices, `best_of` candidates and batched
//! completion prompts — how many, whether the queue can ever hold them, submitting them and
//! gathering their results.

use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{usage, PromptIn};
use crate::api::generation::{self, text_prompt, Completion};
use crate::api::{ApiError, AppState};
use crate::engine::scheduler::{GenEvent, GenerateRequest};

/// Most prompts one completions request may carry (each × `n` is a sequence in the engine).
pub const MAX_PROMPTS: usize = 64;

/// Most choices one request may ask for. Each choice is its own sequence in the engine (its
/// own prefill, KV cache and token budget), so this bounds what one request can hold.
pub const MAX_CHOICES: i64 = 16;

/// `n`: how many choices to generate (default 1).
pub(super) fn choices_count(n: Option<i64>) -> Result<usize, ApiError> {
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
pub(super) fn check_fits_queue(state: &AppState, sequences: usize) -> Result<(), ApiError> {
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
pub(super) fn submit_choices(
    state: &AppState,
    tenant: &str,
    req: GenerateRequest,
    n: usize,
) -> Result<Vec<UnboundedReceiver<GenEvent>>, ApiError> {
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
pub(super) async fn collect_choices(
    rxs: Vec<UnboundedReceiver<GenEvent>>,
    n: usize,
) -> Result<(Vec<Completion>, Value), ApiError> {
    let done = futures::future::try_join_all(rxs.into_iter().map(generation::collect)).await?;
    let prompt = done.iter().step_by(n.max(1)).map(|c| c.prompt_tokens).sum();
    let cached = done.iter().step_by(n.max(1)).map(|c| c.cached_tokens).sum();
    let completion = done.iter().map(|c| c.completion_tokens).sum();
    Ok((done, usage(prompt, cached, completion)))
}

/// From each prompt's `best_of` completions (consecutive in `done`), the `n` with the highest
/// mean token log-probability, best first; all of them when `best_of == n`, in order.
pub(super) fn keep_best(done: Vec<Completion>, best_of: usize, n: usize) -> Vec<Completion> {
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
pub(super) fn completion_prompts(
    state: &AppState,
    prompt: PromptIn,
) -> Result<Vec<Vec<u32>>, ApiError> {
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
