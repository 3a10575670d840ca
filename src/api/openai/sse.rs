//! Streaming OpenAI chunks over SSE for one or more choices.

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::logprobs::{chat_logprob, completion_logprobs};
use super::{finish_str, usage};
use crate::api::{ApiError, AppState};
use crate::engine::scheduler::{GenEvent, TokenLogprob};

#[derive(Clone, Copy)]
pub(super) enum Kind {
    Completion,
    Chat,
}

/// Streams OpenAI chunks for `rxs` (one per choice, chunks tagged with its `index`): for chat a
/// first chunk per choice with the assistant role, one chunk per piece of text as the choices
/// produce them, a chunk with `finish_reason` as each ends, then — once all have ended — a
/// usage chunk when asked (prompt counted once) and `[DONE]`. An error in any choice ends the
/// stream with an error event and `[DONE]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn stream_chunks(
    state: AppState,
    model: String,
    rxs: Vec<UnboundedReceiver<GenEvent>>,
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
        cached_tokens: 0,
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
                        let u = usage(st.prompt_tokens, st.cached_tokens, st.completion_tokens);
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
                        cached_tokens,
                        completion_tokens,
                    }) => {
                        st.done[i] = true;
                        // Each prompt once: choice i is sample i % n of prompt i / n.
                        if i % n.max(1) == 0 {
                            st.prompt_tokens += prompt_tokens;
                            st.cached_tokens += cached_tokens;
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
    cached_tokens: usize,
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

/// A chat stream of replies already complete (tool calling, where a call is known only once
/// its JSON closes): per choice the role chunk, the content or the `tool_calls` delta (the
/// whole arguments in one piece — OpenAI's clients concatenate pieces), the `finish_reason`
/// chunk; then usage when asked, and `[DONE]`.
pub(super) fn replay_chat(
    model: String,
    id: String,
    created: u64,
    replies: Vec<(Value, &'static str)>,
    usage_v: Option<Value>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let chunk = |choices: Value, usage_v: Option<&Value>| {
        let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": null, "choices": choices});
        if let Some(u) = usage_v {
            v["usage"] = u.clone();
        }
        Event::default().data(v.to_string())
    };
    let mut events = Vec::new();
    for (index, (message, finish)) in replies.iter().enumerate() {
        let c = |delta: Value, finish: Option<&str>| json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]);
        events.push(chunk(
            c(json!({"role": "assistant", "content": ""}), None),
            None,
        ));
        let delta = match message["tool_calls"].as_array() {
            Some(calls) => {
                let calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, call)| {
                        let mut call = call.clone();
                        call["index"] = json!(i);
                        call
                    })
                    .collect();
                json!({"tool_calls": calls})
            }
            None => json!({"content": message["content"]}),
        };
        events.push(chunk(c(delta, None), None));
        events.push(chunk(c(json!({}), Some(finish)), None));
    }
    if let Some(u) = &usage_v {
        events.push(chunk(json!([]), Some(u)));
    }
    events.push(Event::default().data("[DONE]"));
    Sse::new(stream::iter(events.into_iter().map(Ok))).keep_alive(KeepAlive::default())
}
