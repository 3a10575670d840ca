//! Streaming load generator for adapterd (native `/v1/generate`) or any OpenAI-compatible server
//! (`/v1/completions`, e.g. llama.cpp's `llama-server`) on loopback.
//!
//! For each concurrency level N it runs N streams, each sending K streamed requests one after the
//! other (N×K requests in all, each with a hard timeout), and reports the median time to first
//! token, the median per-request decode rate (tokens after the first / time after the first), the
//! aggregate generated tokens/s (all tokens / wall time of the level) and, at concurrency 1, a
//! prefill estimate (prompt tokens / median TTFT). Every request generates exactly `--max-tokens`
//! tokens (`ignore_eos`), and every prompt starts differently so no server can reuse a cached
//! prefix.
//!
//! ```text
//! cargo run --release --example loadgen -- --api native --concurrency 1,4,8 --max-tokens 128
//! cargo run --release --example loadgen -- --api openai --url http://127.0.0.1:18081 -c 1,4,8
//! cargo run --release --example loadgen -- --compare ours.json peer.json --llama-bench-json lb.json
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Api {
    /// adapterd's `POST /v1/generate` with `stream: true, ignore_eos: true`.
    Native,
    /// `POST /v1/completions` with `stream: true` (plus llama.cpp's `n_predict`/`ignore_eos`).
    Openai,
}

#[derive(Parser, Debug)]
#[command(about = "Streaming load generator: TTFT, decode and aggregate tokens/s per concurrency")]
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Which API to drive.
    #[arg(long, value_enum, default_value = "native")]
    api: Api,
    /// Model name sent with OpenAI requests (omitted if not given).
    #[arg(long)]
    model: Option<String>,
    /// Concurrent streams; a comma-separated list runs one level after another.
    #[arg(short, long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Requests each stream sends one after the other.
    #[arg(short = 'k', long, default_value_t = 2)]
    requests_per_stream: usize,
    /// Approximate prompt length in tokens (built from repeated common words).
    #[arg(short, long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate per request (EOS ignored).
    #[arg(short, long, default_value_t = 128)]
    max_tokens: usize,
    /// Send one untimed request first.
    #[arg(long)]
    warmup: bool,
    /// Hard timeout per request, seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Native API only: adapters to use, request i taking the (i mod n)-th (comma-separated).
    #[arg(long, value_delimiter = ',')]
    adapters: Vec<String>,
    /// Label printed in the table's first column.
    #[arg(long, default_value = "")]
    label: String,
    /// Also write the results as JSON to this file ("-" for stdout).
    #[arg(long)]
    json: Option<String>,
    /// Instead of running load: compare two result files (OURS PEER) written with --json.
    #[arg(long, num_args = 2, value_names = ["OURS", "PEER"])]
    compare: Option<Vec<String>>,
    /// With --compare: llama-bench JSON output (`llama-bench -o json`) for pp/tg reference rates.
    #[arg(long)]
    llama_bench_json: Option<String>,
}

/// What one streamed request measured.
#[derive(Debug, Clone)]
struct Sample {
    ttft: f64,
    e2e: f64,
    /// Token events seen in the stream.
    token_events: usize,
    /// Tokens the server reported (usage), else the events counted.
    completion_tokens: usize,
    prompt_tokens: Option<usize>,
    /// Decode rate of this request: (events - 1) / (last event - first event).
    decode_tps: Option<f64>,
}

const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "then", "runs",
    "back", "to", "the", "old", "farm", "where", "it", "was", "born", "in", "the", "spring", "of",
    "that", "year", "when", "the", "river", "was", "high",
];

/// A prompt of roughly `n` tokens: a unique prefix (so prefix caches cannot help) and common
/// words, each about one token with its leading space.
fn build_prompt(n: usize, id: usize) -> String {
    let mut s = format!("Story {id}:");
    let prefix_tokens = 2 + id.to_string().len(); // digits are split one by one
    let off = id.wrapping_mul(7) % WORDS.len();
    for i in 0..n.saturating_sub(prefix_tokens).max(1) {
        s.push(' ');
        s.push_str(WORDS[(off + i) % WORDS.len()]);
    }
    s
}

fn request_body(a: &Args, id: usize) -> (String, Value) {
    let prompt = build_prompt(a.prompt_tokens, id);
    let base = a.url.trim_end_matches('/');
    match a.api {
        Api::Native => {
            let mut b = json!({
                "prompt": prompt,
                "max_new_tokens": a.max_tokens,
                "temperature": 0.0,
                "stream": true,
                "ignore_eos": true,
            });
            if !a.adapters.is_empty() {
                b["adapter_id"] = json!(a.adapters[id % a.adapters.len()]);
            }
            (format!("{base}/v1/generate"), b)
        }
        Api::Openai => {
            let mut b = json!({
                "prompt": prompt,
                "max_tokens": a.max_tokens,
                "temperature": 0.0,
                "stream": true,
                "stream_options": {"include_usage": true},
                // llama-server extensions: fixed length, no prompt cache reuse.
                "n_predict": a.max_tokens,
                "ignore_eos": true,
                "cache_prompt": false,
            });
            if let Some(m) = &a.model {
                b["model"] = json!(m);
            }
            (format!("{base}/v1/completions"), b)
        }
    }
}

/// Sends one streamed request and times its token events.
async fn one_request(client: &reqwest::Client, a: &Args, id: usize) -> Result<Sample> {
    let (url, body) = request_body(a, id);
    let t0 = Instant::now();
    let resp = client.post(&url).json(&body).send().await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!(
            "HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        );
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut event_name = String::new();
    let mut first: Option<f64> = None;
    let mut last = 0.0f64;
    let mut events = 0usize;
    let mut usage_completion: Option<usize> = None;
    let mut usage_prompt: Option<usize> = None;
    let mut done = false;
    'outer: while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                event_name.clear();
                continue;
            }
            if let Some(e) = line.strip_prefix("event:") {
                event_name = e.trim().to_string();
                continue;
            }
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break 'outer;
            }
            let v: Value = serde_json::from_str(data)
                .with_context(|| format!("bad SSE data: {}", &data[..data.len().min(200)]))?;
            if event_name == "error" || v.get("error").is_some_and(|e| !e.is_null()) {
                bail!("server error event: {data}");
            }
            let is_token = match a.api {
                // One event per token with a `token` object; text-only flushes and the final
                // summary event have a null or no `token`.
                Api::Native => v.get("token").is_some_and(|t| !t.is_null()),
                // llama-server sends one token per chunk; the final chunk(s) carry no text.
                Api::Openai => v["choices"]
                    .get(0)
                    .and_then(|c| c["text"].as_str())
                    .is_some_and(|t| !t.is_empty()),
            };
            if is_token {
                let t = t0.elapsed().as_secs_f64();
                first.get_or_insert(t);
                last = t;
                events += 1;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage_completion = u["completion_tokens"].as_u64().map(|x| x as usize);
                usage_prompt = u["prompt_tokens"].as_u64().map(|x| x as usize);
            }
            if let Some(t) = v.get("timings") {
                usage_prompt = usage_prompt.or(t["prompt_n"].as_u64().map(|x| x as usize));
                usage_completion =
                    usage_completion.or(t["predicted_n"].as_u64().map(|x| x as usize));
            }
            if a.api == Api::Native && v.get("finish_reason").is_some_and(|f| !f.is_null()) {
                done = true;
                break 'outer;
            }
        }
    }
    let e2e = t0.elapsed().as_secs_f64();
    if !done {
        bail!("stream ended without a final event ({events} tokens)");
    }
    let Some(ttft) = first else {
        bail!("no token events");
    };
    let decode_tps = (events > 1 && last > ttft).then(|| (events - 1) as f64 / (last - ttft));
    Ok(Sample {
        ttft,
        e2e,
        token_events: events,
        completion_tokens: usage_completion.unwrap_or(events),
        prompt_tokens: usage_prompt,
        decode_tps,
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[idx.min(v.len() - 1)])
}

async fn run_level(client: &reqwest::Client, a: &Args, n: usize, id0: usize) -> Value {
    let timeout = Duration::from_secs(a.timeout_s);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..n {
        let client = client.clone();
        let a = clone_args(a);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..a.requests_per_stream {
                let id = id0 + s * a.requests_per_stream + k;
                let r = match tokio::time::timeout(timeout, one_request(&client, &a, id)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("timed out after {}s", timeout.as_secs())),
                };
                out.push(r);
            }
            out
        }));
    }
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(rs) => {
                for r in rs {
                    match r {
                        Ok(s) => samples.push(s),
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
            }
            Err(e) => errors.push(format!("task failed: {e}")),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let total_tokens: usize = samples.iter().map(|s| s.completion_tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut ttft99 = ttft.clone();
    let mut dec: Vec<f64> = samples.iter().filter_map(|s| s.decode_tps).collect();
    let mut e2e: Vec<f64> = samples.iter().map(|s| s.e2e).collect();
    let mut ptoks: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.prompt_tokens.map(|p| p as f64))
        .collect();
    let med_ttft = median(&mut ttft);
    let prompt_tokens = median(&mut ptoks).unwrap_or(a.prompt_tokens as f64);
    let prefill = if n == 1 {
        med_ttft.map(|t| prompt_tokens / t)
    } else {
        None
    };
    let short = samples
        .iter()
        .filter(|s| s.token_events != a.max_tokens && s.completion_tokens != a.max_tokens)
        .count();
    for e in errors.iter().take(3) {
        eprintln!("  error at concurrency {n}: {e}");
    }
    json!({
        "concurrency": n,
        "requests": n * a.requests_per_stream,
        "ok": samples.len(),
        "errors": errors.len(),
        "short_requests": short,
        "prompt_tokens": prompt_tokens,
        "max_tokens": a.max_tokens,
        "ttft_ms_p50": med_ttft.map(|t| t * 1e3),
        "ttft_ms_p99": percentile(&mut ttft99, 99.0).map(|t| t * 1e3),
        "decode_tps_per_stream_p50": median(&mut dec),
        "e2e_s_p50": median(&mut e2e),
        "aggregate_tps": if wall > 0.0 { total_tokens as f64 / wall } else { 0.0 },
        "generated_tokens": total_tokens,
        "wall_s": wall,
        "prefill_tps_est": prefill,
    })
}

fn clone_args(a: &Args) -> Args {
    Args {
        url: a.url.clone(),
        api: a.api,
        model: a.model.clone(),
        concurrency: a.concurrency.clone(),
        requests_per_stream: a.requests_per_stream,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        warmup: a.warmup,
        timeout_s: a.timeout_s,
        adapters: a.adapters.clone(),
        label: a.label.clone(),
        json: None,
        compare: None,
        llama_bench_json: None,
    }
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "—".into(),
    }
}

const HEADER: &str = "| server | streams | requests (ok) | prompt tok | TTFT p50 ms | TTFT p99 ms | decode tok/s per stream (p50) | aggregate tok/s | prefill tok/s (est.) |\n|---|---|---|---|---|---|---|---|---|";

fn row(label: &str, r: &Value) -> String {
    format!(
        "| {label} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
        r["concurrency"],
        r["requests"],
        r["ok"],
        f(&r["prompt_tokens"], 0),
        f(&r["ttft_ms_p50"], 0),
        f(&r["ttft_ms_p99"], 0),
        f(&r["decode_tps_per_stream_p50"], 1),
        f(&r["aggregate_tps"], 1),
        f(&r["prefill_tps_est"], 0),
    )
}

fn read_json(path: &str) -> Result<Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {path}"))
}

fn level(results: &Value, n: u64) -> Option<&Value> {
    results["levels"]
        .as_array()?
        .iter()
        .find(|r| r["concurrency"].as_u64() == Some(n))
}

fn ratio(a: &Value, b: &Value) -> Option<f64> {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "—".into())
}

/// Prints ours/peer ratios per concurrency and the issue-2 targets.
fn compare(ours_path: &str, peer_path: &str, lb_path: Option<&str>) -> Result<()> {
    let ours = read_json(ours_path)?;
    let peer = read_json(peer_path)?;
    let on = ours["label"].as_str().unwrap_or("ours").to_string();
    let pn = peer["label"].as_str().unwrap_or("peer").to_string();
    println!("| streams | decode/stream {on}/{pn} | aggregate {on}/{pn} | TTFT p50 {on}/{pn} |");
    println!("|---|---|---|---|");
    for r in ours["levels"].as_array().into_iter().flatten() {
        let n = r["concurrency"].as_u64().unwrap_or(0);
        let Some(p) = level(&peer, n) else { continue };
        println!(
            "| {n} | {} | {} | {} |",
            fmt_ratio(ratio(
                &r["decode_tps_per_stream_p50"],
                &p["decode_tps_per_stream_p50"]
            )),
            fmt_ratio(ratio(&r["aggregate_tps"], &p["aggregate_tps"])),
            fmt_ratio(ratio(&r["ttft_ms_p50"], &p["ttft_ms_p50"])),
        );
    }
    let (mut pp, mut tg) = (None, None);
    if let Some(lb) = lb_path {
        let v = read_json(lb)?;
        for t in v.as_array().into_iter().flatten() {
            let ts = t["avg_ts"].as_f64();
            if t["n_prompt"].as_u64().unwrap_or(0) > 0 && t["n_gen"].as_u64() == Some(0) {
                pp = ts;
            } else if t["n_gen"].as_u64().unwrap_or(0) > 0 && t["n_prompt"].as_u64() == Some(0) {
                tg = ts;
            }
        }
        println!();
        println!(
            "llama-bench: pp {} tok/s, tg {} tok/s",
            pp.map(|x| format!("{x:.1}")).unwrap_or("—".into()),
            tg.map(|x| format!("{x:.1}")).unwrap_or("—".into())
        );
    }
    let o1 = level(&ours, 1);
    let o8 = level(&ours, 8);
    let p1 = level(&peer, 1);
    println!();
    let our_dec = o1.and_then(|r| r["decode_tps_per_stream_p50"].as_f64());
    let our_pre = o1.and_then(|r| r["prefill_tps_est"].as_f64());
    if let (Some(d), Some(t)) = (our_dec, tg) {
        let r = d / t;
        println!(
            "- single-stream decode vs llama-bench tg: {d:.1} / {t:.1} = {r:.2}× (target ≥ 0.5×: {})",
            if r >= 0.5 { "met" } else { "NOT met" }
        );
    }
    if let (Some(d), Some(p)) = (
        our_dec,
        p1.and_then(|r| r["decode_tps_per_stream_p50"].as_f64()),
    ) {
        let r = d / p;
        println!(
            "- single-stream decode vs {pn} (1 stream): {d:.1} / {p:.1} = {r:.2}× (target ≥ 0.5×: {})",
            if r >= 0.5 { "met" } else { "NOT met" }
        );
    }
    if let (Some(a8), Some(a1)) = (
        o8.and_then(|r| r["aggregate_tps"].as_f64()),
        o1.and_then(|r| r["aggregate_tps"].as_f64()),
    ) {
        let r = a8 / a1;
        println!(
            "- {on} 8-stream aggregate vs {on} 1-stream aggregate: {a8:.1} / {a1:.1} = {r:.2}× (target ≥ 2×: {})",
            if r >= 2.0 { "met" } else { "NOT met" }
        );
    }
    if let (Some(o), Some(p)) = (our_pre, pp) {
        println!(
            "- prefill: {on} (prompt/TTFT at 1 stream) {o:.0} vs llama-bench pp {p:.0} tok/s = {:.2}× (TTFT includes HTTP and one decode step)",
            o / p
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(c) = &a.compare {
        return compare(&c[0], &c[1], a.llama_bench_json.as_deref());
    }
    if a.concurrency.is_empty() || a.concurrency.contains(&0) || a.requests_per_stream == 0 {
        bail!("--concurrency values and --requests-per-stream must be ≥ 1");
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(a.timeout_s))
        .pool_max_idle_per_host(64)
        .build()?;
    let label = if a.label.is_empty() {
        format!("{:?}", a.api).to_lowercase()
    } else {
        a.label.clone()
    };
    let mut id0 = 1_000_000 * (std::process::id() as usize % 1000);
    if a.warmup {
        let t = Instant::now();
        let s = tokio::time::timeout(
            Duration::from_secs(a.timeout_s),
            one_request(&client, &a, id0),
        )
        .await
        .map_err(|_| anyhow::anyhow!("warm-up request timed out"))?
        .context("warm-up request failed")?;
        eprintln!(
            "warm-up: {} tokens in {:.2}s (TTFT {:.0} ms)",
            s.completion_tokens,
            t.elapsed().as_secs_f64(),
            s.ttft * 1e3
        );
        id0 += 1;
    }
    println!("{HEADER}");
    let mut levels = Vec::new();
    for &n in &a.concurrency {
        let r = run_level(&client, &a, n, id0).await;
        id0 += n * a.requests_per_stream;
        println!("{}", row(&label, &r));
        if r["short_requests"].as_u64().unwrap_or(0) > 0 {
            eprintln!(
                "  note: {} requests generated a different number of tokens than {}",
                r["short_requests"], a.max_tokens
            );
        }
        levels.push(r);
    }
    let errors: u64 = levels
        .iter()
        .map(|r| r["errors"].as_u64().unwrap_or(0))
        .sum();
    let out = json!({
        "label": label,
        "api": format!("{:?}", a.api).to_lowercase(),
        "url": a.url,
        "requests_per_stream": a.requests_per_stream,
        "prompt_tokens_requested": a.prompt_tokens,
        "max_tokens": a.max_tokens,
        "levels": levels,
    });
    if let Some(p) = &a.json {
        let s = serde_json::to_string_pretty(&out)?;
        if p == "-" {
            println!("{s}");
        } else {
            std::fs::write(p, s + "\n").with_context(|| format!("writing {p}"))?;
        }
    }
    if errors > 0 {
        bail!("{errors} request(s) failed");
    }
    Ok(())
}
