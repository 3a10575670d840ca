//! Driving load: one streamed request timed token by token (`one_request`), a scenario's N
//! concurrent streams (`run_streams`), and the cold-adapter pairs. Every way a request can go
//! wrong — connection refused, a 4xx/5xx, an error event or malformed data mid-stream, a stream
//! that ends early, a timeout — becomes a failed request with its reason, never a panic and
//! never an aborted run.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use super::scenario::build_prompt;
use super::sse::{interpret, Api, SseParser};
use super::stats::Sample;

/// What every request of a run shares.
#[derive(Debug, Clone)]
pub struct Target {
    pub client: reqwest::Client,
    /// Base URL without a trailing slash.
    pub url: String,
    pub api: Api,
    /// `model` for OpenAI requests on the base (None: omitted; llama-server does not need it).
    pub base_model: Option<String>,
    pub timeout: Duration,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Unique per request: the prompt starts with it.
    pub id: u64,
    pub prompt_tokens: usize,
    /// Leading words every prompt of the run shares (`--shared-prefix-tokens`).
    pub shared_prefix: usize,
    pub max_tokens: usize,
    /// The adapter to use, None for the base.
    pub adapter: Option<String>,
}

/// The URL and JSON body of a request. Both APIs are asked to ignore EOS so every request
/// does the same work; the OpenAI body carries llama.cpp's `n_predict`/`ignore_eos`/
/// `cache_prompt` extensions (other OpenAI-compatible servers ignore unknown fields).
pub fn request_body(t: &Target, r: &RequestSpec) -> (String, Value) {
    let prompt = build_prompt(r.prompt_tokens, r.id, r.shared_prefix);
    match t.api {
        Api::Native => {
            let mut b = json!({
                "prompt": prompt,
                "max_new_tokens": r.max_tokens,
                "temperature": 0.0,
                "stream": true,
                "ignore_eos": true,
            });
            if let Some(a) = &r.adapter {
                b["adapter_id"] = json!(a);
            }
            (format!("{}/v1/generate", t.url), b)
        }
        Api::Openai => {
            let mut b = json!({
                "prompt": prompt,
                "max_tokens": r.max_tokens,
                "temperature": 0.0,
                "stream": true,
                "stream_options": {"include_usage": true},
                "n_predict": r.max_tokens,
                "ignore_eos": true,
                // llama.cpp reuses a slot's previous prompt only when asked; with a shared
                // prefix both servers may reuse it (adapterd's cache is on by default).
                "cache_prompt": r.shared_prefix > 0,
            });
            if let Some(m) = r.adapter.as_ref().or(t.base_model.as_ref()) {
                b["model"] = json!(m);
            }
            (format!("{}/v1/completions", t.url), b)
        }
    }
}

/// Sends one streamed request and times its token events; `Err` is the failure reason.
pub async fn one_request(t: &Target, r: &RequestSpec) -> Result<Sample, String> {
    match tokio::time::timeout(t.timeout, stream_request(t, r)).await {
        Ok(res) => res,
        Err(_) => Err(format!("timed out after {} s", t.timeout.as_secs())),
    }
}

async fn stream_request(t: &Target, r: &RequestSpec) -> Result<Sample, String> {
    let (url, body) = request_body(t, r);
    let t0 = Instant::now();
    let resp = t
        .client
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| transport_reason(&e))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            error_summary(&text)
        ));
    }
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::default();
    let (mut first, mut last) = (None::<f64>, 0.0f64);
    let (mut events, mut usage_c, mut usage_p) = (0usize, None, None);
    let (mut finished, mut done) = (false, false);
    let mut eof = false;
    'read: while !eof {
        // A stream is never polled again after it ended (some streams panic if they are).
        let evs = match stream.next().await {
            Some(Ok(bytes)) => parser.push(&bytes),
            Some(Err(e)) => return Err(transport_reason(&e)),
            None => {
                eof = true;
                parser.finish().into_iter().collect()
            }
        };
        for ev in &evs {
            let u = interpret(t.api, ev)?;
            if u.token {
                let now = t0.elapsed().as_secs_f64();
                first.get_or_insert(now);
                last = now;
                events += 1;
            }
            usage_c = u.completion_tokens.or(usage_c);
            usage_p = u.prompt_tokens.or(usage_p);
            finished |= u.finished;
            if u.done {
                done = true;
                break 'read;
            }
        }
    }
    let e2e = t0.elapsed().as_secs_f64();
    if !done && !finished {
        return Err(format!(
            "stream ended before the final event (after {events} tokens)"
        ));
    }
    let Some(ttft) = first else {
        return Err("stream finished without a token".into());
    };
    Ok(Sample {
        ttft,
        last_token: last,
        e2e,
        token_events: events,
        completion_tokens: usage_c.unwrap_or(events),
        prompt_tokens: usage_p,
    })
}

/// A short reason for a transport error, with the cause chain reqwest hides in `source()`
/// ("connection refused" is what a reader needs, not "error sending request").
fn transport_reason(e: &reqwest::Error) -> String {
    let mut s = if e.is_connect() {
        "connect failed".to_owned()
    } else if e.is_body() || e.is_decode() {
        "response body failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut src = std::error::Error::source(e);
    let mut last = None;
    while let Some(c) = src {
        last = Some(c.to_string());
        src = c.source();
    }
    if let Some(c) = last {
        s.push_str(": ");
        s.push_str(&c);
    }
    s
}

/// An error body as one short line: the envelope's `code: message` when it is one.
fn error_summary(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let e = v.get("error").unwrap_or(&v);
        if let Some(m) = e.get("message").and_then(Value::as_str) {
            let code = e.get("code").and_then(Value::as_str).unwrap_or("error");
            return format!("{code}: {}", m.chars().take(160).collect::<String>());
        }
    }
    text.chars().take(160).collect()
}

/// Runs `streams` concurrent streams, stream s sending `per_stream` requests back to back built
/// by `spec(s, k)`. Returns every outcome and the wall time from the first send to the last end.
pub async fn run_streams(
    t: &Target,
    streams: usize,
    per_stream: usize,
    spec: impl Fn(usize, usize) -> RequestSpec,
) -> (Vec<Result<Sample, String>>, f64) {
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for s in 0..streams {
        let target = t.clone();
        let specs: Vec<RequestSpec> = (0..per_stream).map(|k| spec(s, k)).collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(specs.len());
            for r in &specs {
                out.push(one_request(&target, r).await);
            }
            out
        }));
    }
    let mut outcomes = Vec::with_capacity(streams * per_stream);
    for task in tasks {
        match task.await {
            Ok(rs) => outcomes.extend(rs),
            Err(e) => outcomes.extend((0..per_stream).map(|_| Err(format!("stream task: {e}")))),
        }
    }
    (outcomes, t0.elapsed().as_secs_f64())
}

/// Asks `GET /v1/models` for the base model's name: the first entry without a `parent` (an
/// adapterd adapter has one), else the first entry. None when the server has no such route.
pub async fn detect_base_model(client: &reqwest::Client, url: &str) -> Option<String> {
    let resp = client.get(format!("{url}/v1/models")).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: Value = resp.json().await.ok()?;
    let data = v.get("data")?.as_array()?;
    let base = data
        .iter()
        .find(|m| m.get("parent").is_none_or(Value::is_null))
        .or(data.first())?;
    base.get("id")?.as_str().map(str::to_owned)
}
