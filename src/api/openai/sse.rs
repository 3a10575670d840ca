//! Streaming OpenAI chunks over SSE for one or more choices.

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::logprobs::{chat_logprob, completion_logprobs};
use super::tools::{self, Finished, ReplyStream};
use super::{finish_str, usage};
use crate::api::{ApiError, AppState};
use crate::engine::scheduler::{GenEvent, TokenLogprob};

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Completion,
    Chat,
    /// Chat under `tools`: an answer's text streams as it is decoded; a call is sent whole,
    /// once it closes (see `tools::ReplyStream`).
    ChatTools,
}

/// A completion choice's prompt, streamed first under `echo`.
pub(super) struct Echo {
    pub text: String,
    /// The first prompt token: it has no log-probability (null), as OpenAI reports it.
    pub first: Option<u32>,
}

/// Streams OpenAI chunks for `rxs` (one per choice, chunks tagged with its `index`): for chat a
/// first chunk per choice with the assistant role, for completions under `echo` (one [`Echo`]
/// per choice) a first chunk with the prompt — with its log-probabilities once the prompt is
/// read, when asked —, one chunk per piece of text as the choices
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
    echo: Vec<Echo>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let chunk = move |choice: Value, usage_v: Option<Value>| -> Event {
        let object = match kind {
            Kind::Completion => "text_completion",
            Kind::Chat | Kind::ChatTools => "chat.completion.chunk",
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
            Kind::Chat | Kind::ChatTools => {
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
    if kind != Kind::Completion {
        for i in 0..choices {
            let c = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            pending.push_back(chunk(c, None));
        }
    }
    let mut echo: Vec<Option<Echo>> = echo.into_iter().map(Some).collect();
    echo.resize_with(choices, || None);
    if !logprobs {
        // Nothing to wait for: every prompt goes out at once.
        for (i, e) in echo.iter_mut().enumerate() {
            if let Some(e) = e.take() {
                let c =
                    json!({"index": i, "text": e.text, "logprobs": null, "finish_reason": null});
                pending.push_back(chunk(c, None));
            }
        }
    }
    let init = Streaming {
        merged,
        pending,
        echo,
        done: vec![false; choices],
        replies: (0..choices).map(|_| ReplyStream::default()).collect(),
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
        over: false,
    };
    let tok_echo = state.tokenizer.clone();
    let events = stream::unfold(init, move |mut st| {
        let chunk = chunk.clone();
        let piece = piece.clone();
        let tok_echo = tok_echo.clone();
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
                // A prompt to echo goes before anything else of its choice: with its
                // log-probabilities when they come first, without them otherwise.
                if let Some(e) = st.echo[i].take() {
                    let lp = match &ev {
                        Some(GenEvent::PromptLogprobs(lps)) => {
                            let mut entries = Vec::with_capacity(lps.len() + 1);
                            if let Some(first) = e.first {
                                entries.push((first, None, Vec::new()));
                            }
                            for t in lps {
                                entries.push((t.id, Some(t.logprob), t.top.clone()));
                            }
                            completion_logprobs(&tok_echo, &entries)
                        }
                        _ => Value::Null,
                    };
                    let c =
                        json!({"index": i, "text": e.text, "logprobs": lp, "finish_reason": null});
                    st.pending.push_back(chunk(c, None));
                }
                match ev {
                    Some(GenEvent::Token { token, text }) => {
                        let text = st.visible(kind, i, text);
                        if text.is_empty() && !logprobs {
                            continue;
                        }
                        st.pending
                            .push_back(chunk(piece(i, text, Some(&token), None), None));
                    }
                    Some(GenEvent::Text(text)) => {
                        let text = st.visible(kind, i, text);
                        if !text.is_empty() {
                            st.pending
                                .push_back(chunk(piece(i, text, None, None), None));
                        }
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
                        let mut finish = finish_str(Some(finish));
                        if kind == Kind::ChatTools {
                            let delta = match std::mem::take(&mut st.replies[i]).finish() {
                                Finished::Calls(calls) => {
                                    finish = "tool_calls";
                                    json!({"tool_calls": tools::call_entries(&calls)})
                                }
                                Finished::Rest(rest) if !rest.is_empty() => {
                                    json!({"content": rest})
                                }
                                Finished::Rest(_) => Value::Null,
                            };
                            if !delta.is_null() {
                                let c = json!({"index": i, "delta": delta, "logprobs": null, "finish_reason": null});
                                st.pending.push_back(chunk(c, None));
                            }
                        }
                        let c = piece(i, String::new(), None, Some(finish));
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
    /// Each choice's reply reader (used by `Kind::ChatTools`).
    replies: Vec<ReplyStream>,
    /// Each choice's prompt still to echo.
    echo: Vec<Option<Echo>>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    /// `[DONE]` is queued (or every channel closed): nothing more after `pending`.
    over: bool,
}

impl<S> Streaming<S> {
    /// What of choice `i`'s generated `text` the client sees.
    fn visible(&mut self, kind: Kind, i: usize, text: String) -> String {
        match kind {
            Kind::ChatTools => self.replies[i].feed(&text),
            _ => text,
        }
    }

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
