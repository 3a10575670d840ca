//! Reading a streamed response: an incremental Server-Sent Events parser (bytes in, events
//! out, whatever the chunk boundaries) and the interpretation of each event for the two APIs the
//! harness drives — OpenAI-style `/v1/completions` chunks (`data: {...}` … `data: [DONE]`, as
//! adapterd, llama.cpp's llama-server and vLLM send them) and adapterd's native `/v1/generate`
//! events. Pure; the HTTP side is in `client`.

use serde_json::Value;

/// Which request/response shape a server speaks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/completions` with `stream: true`; the adapter is chosen by `model`.
    Openai,
    /// adapterd's `POST /v1/generate` with `stream: true`; the adapter by `adapter_id`. Its
    /// `ignore_eos` makes every request generate exactly `max_new_tokens`.
    Native,
}

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, empty when none was sent (the default "message").
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Incremental SSE parser (the WHATWG event-stream rules the harness needs: `\n`, `\r\n` or
/// `\r` line ends, `:` comments, multi-line data, dispatch on a blank line).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
    /// A `\r` ended the last line; a `\n` right after it belongs to the same line end.
    after_cr: bool,
}

impl SseParser {
    /// Feeds bytes and returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.buf);
                    self.line(&String::from_utf8_lossy(&line), &mut out);
                }
                _ => self.buf.push(b),
            }
        }
        out
    }

    /// The event left pending when the stream ends without a final blank line (servers that
    /// close right after the last `data:` line).
    pub fn finish(&mut self) -> Option<SseEvent> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&String::from_utf8_lossy(&line), &mut out);
        }
        self.line("", &mut out);
        out.pop()
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data).join("\n"),
                });
            }
            self.event.clear();
            return;
        }
        if line.starts_with(':') {
            return; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => self.data.push(value.to_owned()),
            _ => {} // id, retry, unknown fields: not needed here
        }
    }
}

/// What one event means for the request it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// The event carried generated text (one token for the servers measured here).
    pub token: bool,
    /// The server said generation ended (`finish_reason`), so a stream end after it is normal.
    pub finished: bool,
    /// The stream's terminator (`[DONE]`, or the native final event): stop reading.
    pub done: bool,
    /// Counts the server reported (`usage`, or llama.cpp's `timings`).
    pub completion_tokens: Option<usize>,
    pub prompt_tokens: Option<usize>,
}

/// Interprets one event; `Err` is the reason the request failed (a server error event, or data
/// that is not the JSON the API promises).
pub fn interpret(api: Api, ev: &SseEvent) -> Result<Update, String> {
    let data = ev.data.trim();
    if api == Api::Openai && data == "[DONE]" {
        return Ok(Update {
            done: true,
            finished: true,
            ..Update::default()
        });
    }
    let v: Value = serde_json::from_str(data).map_err(|e| {
        format!(
            "malformed stream data ({e}): {}",
            data.chars().take(120).collect::<String>()
        )
    })?;
    if ev.event == "error" || v.get("error").is_some_and(|e| !e.is_null()) {
        return Err(format!("error event from the server: {}", error_text(&v)));
    }
    let mut u = Update::default();
    let count = |x: &Value| x.as_u64().and_then(|n| usize::try_from(n).ok());
    if let Some(usage) = v.get("usage").filter(|x| !x.is_null()) {
        u.completion_tokens = usage.get("completion_tokens").and_then(count);
        u.prompt_tokens = usage.get("prompt_tokens").and_then(count);
    }
    if let Some(t) = v.get("timings").filter(|x| !x.is_null()) {
        u.completion_tokens = u.completion_tokens.or(t.get("predicted_n").and_then(count));
        u.prompt_tokens = u.prompt_tokens.or(t.get("prompt_n").and_then(count));
    }
    match api {
        Api::Openai => {
            let choice = v.get("choices").and_then(|c| c.get(0));
            let text = choice.and_then(|c| {
                c.get("text")
                    .or_else(|| c.get("delta").and_then(|d| d.get("content")))
                    .and_then(Value::as_str)
            });
            u.token = text.is_some_and(|t| !t.is_empty());
            u.finished = choice
                .and_then(|c| c.get("finish_reason"))
                .is_some_and(|f| !f.is_null());
        }
        Api::Native => {
            // One event per token with a `token` object; text-only flushes have `token: null`;
            // the final event has `finish_reason` and `usage` and ends the stream.
            u.token = v.get("token").is_some_and(|t| !t.is_null());
            u.finished = v.get("finish_reason").is_some_and(|f| !f.is_null());
            u.done = u.finished;
        }
    }
    Ok(u)
}

/// The human part of an error object: `error.message`, `error` as a string, or the JSON.
fn error_text(v: &Value) -> String {
    let e = v.get("error").unwrap_or(v);
    let text = e
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| e.as_str().map(str::to_owned))
        .unwrap_or_else(|| e.to_string());
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&str]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c.as_bytes()));
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn events_are_found_whatever_the_chunk_boundaries() {
        let whole =
            "data: {\"a\":1}\n\n: keep-alive\n\nevent: error\ndata: x\r\n\r\ndata: [DONE]\n\n";
        let expected = vec![
            SseEvent {
                event: String::new(),
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                event: "error".into(),
                data: "x".into(),
            },
            SseEvent {
                event: String::new(),
                data: "[DONE]".into(),
            },
        ];
        assert_eq!(events(&[whole]), expected);
        // Byte by byte, including a \r\n split across two reads.
        let bytes: Vec<String> = whole.chars().map(|c| c.to_string()).collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(events(&refs), expected);
    }

    #[test]
    fn multi_line_data_is_joined_and_a_last_event_without_blank_line_is_kept() {
        let e = events(&["data: one\ndata:two\n\ndata: tail"]);
        assert_eq!(e[0].data, "one\ntwo");
        assert_eq!(e[1].data, "tail");
        assert_eq!(e.len(), 2);
    }

    fn ev(data: &str) -> SseEvent {
        SseEvent {
            event: String::new(),
            data: data.into(),
        }
    }

    #[test]
    fn openai_chunks_give_tokens_usage_and_done() {
        let tok = interpret(
            Api::Openai,
            &ev(r#"{"choices":[{"index":0,"text":" fox","finish_reason":null}]}"#),
        )
        .unwrap();
        assert!(tok.token && !tok.finished && !tok.done);
        // adapterd's last chunk: empty text and a finish_reason; then usage; then [DONE].
        let last = interpret(
            Api::Openai,
            &ev(r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#),
        )
        .unwrap();
        assert!(!last.token && last.finished && !last.done);
        let usage = interpret(
            Api::Openai,
            &ev(r#"{"choices":[],"usage":{"prompt_tokens":17,"completion_tokens":128}}"#),
        )
        .unwrap();
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (Some(17), Some(128))
        );
        assert!(interpret(Api::Openai, &ev("[DONE]")).unwrap().done);
        // llama-server's final chunk reports counts in `timings`.
        let ll = interpret(
            Api::Openai,
            &ev(r#"{"choices":[{"text":"","finish_reason":"length"}],"timings":{"prompt_n":500,"predicted_n":128}}"#),
        )
        .unwrap();
        assert_eq!(
            (ll.prompt_tokens, ll.completion_tokens),
            (Some(500), Some(128))
        );
        // Chat chunks carry text in delta.content.
        let chat = interpret(
            Api::Openai,
            &ev(r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#),
        )
        .unwrap();
        assert!(chat.token);
    }

    #[test]
    fn errors_mid_stream_and_malformed_data_are_failures_with_a_reason() {
        let e = interpret(
            Api::Openai,
            &ev(r#"{"error":{"code":"internal","message":"engine stopped"}}"#),
        )
        .unwrap_err();
        assert!(e.contains("engine stopped"), "{e}");
        let e = interpret(
            Api::Native,
            &SseEvent {
                event: "error".into(),
                data: r#"{"error":{"code":"stream_timeout","message":"too long"}}"#.into(),
            },
        )
        .unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let e = interpret(Api::Openai, &ev("{\"choices\": [")).unwrap_err();
        assert!(e.starts_with("malformed stream data"), "{e}");
        // `[DONE]` is only a terminator for the OpenAI API.
        assert!(interpret(Api::Native, &ev("[DONE]")).is_err());
        // A null error field is not an error (some servers send `"error": null`).
        assert!(interpret(Api::Openai, &ev(r#"{"error":null,"choices":[]}"#)).is_ok());
    }

    #[test]
    fn native_events_give_tokens_and_the_final_event_ends_the_stream() {
        let t = interpret(
            Api::Native,
            &ev(r#"{"id":"gen-1","text":" a","token":{"id":5,"text":" a"}}"#),
        )
        .unwrap();
        assert!(t.token && !t.done);
        let flush = interpret(
            Api::Native,
            &ev(r#"{"id":"gen-1","text":"é","token":null}"#),
        )
        .unwrap();
        assert!(!flush.token);
        let done = interpret(
            Api::Native,
            &ev(r#"{"id":"gen-1","text":"…","finish_reason":"length","usage":{"prompt_tokens":9,"completion_tokens":8}}"#),
        )
        .unwrap();
        assert!(done.done && done.finished && !done.token);
        assert_eq!(done.completion_tokens, Some(8));
    }
}
