//! `adapterd bench`: the benchmark harness. It drives any OpenAI-compatible server (adapterd,
//! llama.cpp's `llama-server`, …) over loopback with streamed requests through a scenario matrix
//! — concurrent streams × prompt length × adapter mode, plus a cold-adapter scenario — and
//! reports per scenario TTFT p50/p99, decode tokens/s per stream, aggregate tokens/s, requests
//! ok/failed and the server's peak RSS; `adapterd bench compare` sets two runs side by side
//! (ratios, llama-bench, issue 7's targets) and draws the SVG plot. `scripts/bench.sh` runs
//! adapterd and llama.cpp through it one after the other; docs/benchmarking.md is the manual.
//!
//! - [`scenario`]: the matrix and the prompts; [`client`]: sending and timing requests;
//!   [`sse`]: parsing streamed responses; [`stats`]: percentiles and summaries; [`rss`]: peak
//!   memory from /proc; [`adapters`]: random PEFT adapters and their upload; [`report`]:
//!   JSON, tables, comparison; [`plot`]: the SVG chart.
//!
//! A client, not part of the server: it never touches the engine except to build adapter files.

pub mod adapters;
pub mod client;
pub mod plot;
pub mod report;
pub mod rss;
pub mod scenario;
pub mod sse;
pub mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use adapters::AdapterSet;
use client::{RequestSpec, Target};
use report::{ColdPair, ColdReport, RunReport, ScenarioReport};
use scenario::{Matrix, Mode, Scenario};
pub use sse::Api;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Compare two run reports (ours, then the peer): ratio table, llama-bench rates, issue 7's
    /// targets; optionally a combined JSON file and the SVG plot.
    Compare(CompareArgs),
}

/// Drive a server through the scenario matrix.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Base URL of the server under test.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Request shape: `openai` (/v1/completions, any OpenAI-compatible server) or `native`
    /// (adapterd's /v1/generate, whose `ignore_eos` guarantees exactly --max-tokens tokens).
    #[arg(long, value_enum, default_value = "openai")]
    pub api: Api,
    /// `model` for base requests (OpenAI API). Default: the first model of GET /v1/models
    /// that has no `parent`, or none.
    #[arg(long)]
    pub model: Option<String>,
    /// Name of this server in tables and files (default: the model name).
    #[arg(long)]
    pub label: Option<String>,
    /// Adapter modes to run (comma-separated): base, one-adapter, n-adapters, cold.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "base,one-adapter,n-adapters,cold"
    )]
    pub modes: Vec<Mode>,
    /// Concurrent streams (comma-separated levels).
    #[arg(short, long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub concurrency: Vec<usize>,
    /// Approximate prompt lengths in tokens (comma-separated).
    #[arg(short, long, value_delimiter = ',', default_value = "16,500")]
    pub prompt_tokens: Vec<usize>,
    /// New tokens per request (EOS ignored where the server allows it).
    #[arg(short, long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Every prompt starts with the same this many words (~tokens), a shared system prompt,
    /// before its own id: measures prefix reuse (llama.cpp is then sent `cache_prompt: true`).
    /// 0: every prompt differs from its first token.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Requests each stream sends back to back, at least.
    #[arg(long, default_value_t = 1)]
    pub requests_per_stream: usize,
    /// Requests each scenario sends at least, spread over its streams (8 at 1 stream, 2 per
    /// stream at 4, 1 per stream at 8 and 16 by default).
    #[arg(long, default_value_t = 8)]
    pub min_requests: usize,
    /// Rounds (requests per stream) at least for the base and n-adapters scenarios at 8
    /// streams when both run: the 8-adapters-against-base ratio divides their aggregates, and
    /// from one round each it moves ±10% between runs. The two run their rounds in turn.
    #[arg(long, default_value_t = 5)]
    pub ratio_rounds: usize,
    /// Fresh adapters the cold scenario uploads and measures.
    #[arg(long, default_value_t = 8)]
    pub cold_adapters: usize,
    /// Prompt length of the cold scenario's 1-token requests.
    #[arg(long, default_value_t = 16)]
    pub cold_prompt_tokens: usize,
    /// LoRA rank of the generated adapters (all seven projections of every layer).
    #[arg(long, default_value_t = 16)]
    pub adapter_rank: usize,
    /// The served model (.gguf or HF directory): its shapes are needed to make adapters.
    #[arg(long)]
    pub model_file: Option<PathBuf>,
    /// Only upload the adapters the selected modes need, write their names to this file, exit.
    /// Restart the server, then run with --adapters-from: the cold scenario is then truly cold.
    #[arg(long, conflicts_with = "adapters_from")]
    pub prepare_adapters: Option<PathBuf>,
    /// Use the adapters a --prepare-adapters run uploaded instead of uploading new ones.
    #[arg(long)]
    pub adapters_from: Option<PathBuf>,
    /// Pid of the server process, for its peak RSS (Linux /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Per-request time limit in seconds; a request past it is a failure.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Skip the untimed warm-up request.
    #[arg(long)]
    pub no_warmup: bool,
    /// Bearer key for servers with auth on.
    #[arg(long, env = "ADAPTERD_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Write the run report (JSON) here; `bench compare` reads it.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Our run's JSON report.
    pub ours: PathBuf,
    /// The peer's run's JSON report.
    pub peer: PathBuf,
    /// llama-bench's `-o json` output, for its pp/tg reference rates.
    #[arg(long)]
    pub llama_bench: Option<PathBuf>,
    /// Write the SVG plot (aggregate tokens/s against streams) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write both runs and the comparison as one JSON file here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Entry point of `adapterd bench`.
pub fn run_cli(args: BenchArgs) -> Result<()> {
    if let Some(BenchCommand::Compare(c)) = args.command {
        return compare_cli(&c);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let a = args.run;
        if let Some(path) = &a.prepare_adapters {
            let set = prepare_adapters(&a).await?;
            set.write(path)?;
            eprintln!(
                "uploaded {} adapters; names in {}",
                set.mix.len() + set.cold.len(),
                path.display()
            );
            return Ok(());
        }
        let report = run(&a).await?;
        if let Some(c) = &report.cold {
            println!("\n{}", report::render_cold(&report.label, c));
        }
        let failed: usize = report.scenarios.iter().map(|s| s.summary.failed).sum();
        let failed = failed + report.cold.as_ref().map_or(0, |c| c.failed);
        if let Some(path) = &a.json {
            let text = serde_json::to_string_pretty(&report)? + "\n";
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        eprintln!(
            "bench: {} scenarios in {:.0} s, {failed} failed requests{}",
            report.scenarios.len(),
            report.wall_s,
            a.json
                .as_ref()
                .map(|p| format!("; report in {}", p.display()))
                .unwrap_or_default()
        );
        Ok(())
    })
}

fn compare_cli(c: &CompareArgs) -> Result<()> {
    let read = |p: &PathBuf| -> Result<RunReport> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let (ours, peer) = (read(&c.ours)?, read(&c.peer)?);
    let lb: Option<serde_json::Value> = match &c.llama_bench {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?)
        }
        None => None,
    };
    print!("{}", report::render_run(&ours));
    for s in &peer.scenarios {
        println!("{}", report::table_row(&peer.label, s));
    }
    let cmp = report::compare(&ours, &peer, lb.as_ref());
    println!("\n{}", report::render_comparison(&cmp));
    if let Some(p) = &c.plot {
        let title = format!(
            "Aggregate tokens/s, {} new tokens per request: {} vs {}",
            ours.max_tokens, ours.label, peer.label
        );
        let svg = plot::render_svg(&title, &plot::series_from(&ours, Some(&peer)));
        std::fs::write(p, svg).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &c.json {
        let all = serde_json::json!({"ours": ours, "peer": peer, "comparison": cmp, "llama_bench_raw": lb});
        std::fs::write(p, serde_json::to_string_pretty(&all)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn matrix(a: &RunArgs) -> Matrix {
    Matrix {
        modes: a.modes.clone(),
        prompt_tokens: a.prompt_tokens.clone(),
        concurrency: a.concurrency.clone(),
        requests_per_stream: a.requests_per_stream,
        min_requests: a.min_requests,
        ratio_rounds: a.ratio_rounds,
    }
}

fn http_client(a: &RunArgs) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = &a.api_key {
        let v = format!("Bearer {k}")
            .parse()
            .context("--api-key is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    // A fresh connection per request: llama-server closes kept-alive connections after a few
    // requests, and a request sent on one it has just closed fails ("connection closed before
    // message completed") and would drop out of its row. A loopback connect costs ~0.1 ms.
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()?)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Uploads the adapters the selected modes need.
async fn upload_set(a: &RunArgs, client: &reqwest::Client, url: &str) -> Result<AdapterSet> {
    let m = matrix(a);
    let mix_n = m.mix_adapters_needed();
    let cold_n = if a.modes.contains(&Mode::Cold) {
        a.cold_adapters
    } else {
        0
    };
    let mut set = AdapterSet {
        rank: a.adapter_rank,
        ..AdapterSet::default()
    };
    if mix_n + cold_n == 0 {
        return Ok(set);
    }
    let Some(model) = &a.model_file else {
        bail!("the adapter modes need --model-file (the served model, for its shapes) or --adapters-from");
    };
    let cfg = adapters::model_config(model)?;
    let scratch = std::env::temp_dir().join(format!("adapterd-bench-{}", std::process::id()));
    let run = unix_secs();
    let t = Instant::now();
    let upload = |prefix: String, n: usize, seed: u64| {
        let (cfg, scratch) = (cfg.clone(), scratch.clone());
        async move {
            adapters::upload_random(
                client,
                url,
                &cfg,
                a.adapter_rank,
                &prefix,
                n,
                seed,
                &scratch,
            )
            .await
        }
    };
    set.mix = upload(format!("bench-{run}-m"), mix_n, 1000).await?;
    set.cold = upload(format!("bench-{run}-c"), cold_n, 2000).await?;
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "uploaded {} rank-{} adapters in {:.1} s",
        mix_n + cold_n,
        a.adapter_rank,
        t.elapsed().as_secs_f64()
    );
    Ok(set)
}

async fn prepare_adapters(a: &RunArgs) -> Result<AdapterSet> {
    let client = http_client(a)?;
    upload_set(a, &client, a.url.trim_end_matches('/')).await
}

/// Runs the selected scenarios against one server and returns the report; failures inside are
/// counted in it. Errors only for what makes a run impossible (bad flags, adapters that cannot
/// be made or uploaded).
pub async fn run(a: &RunArgs) -> Result<RunReport> {
    let m = matrix(a);
    m.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(a.max_tokens >= 1, "--max-tokens must be ≥ 1");
    let started = Instant::now();
    let load_before = load_average();
    let client = http_client(a)?;
    let url = a.url.trim_end_matches('/').to_owned();
    let base_model = match (&a.model, a.api) {
        (Some(m), _) => Some(m.clone()),
        (None, Api::Openai) => client::detect_base_model(&client, &url).await,
        (None, Api::Native) => None,
    };
    let label = a
        .label
        .clone()
        .or_else(|| base_model.clone())
        .unwrap_or_else(|| "server".into());
    let target = Target {
        client: client.clone(),
        url: url.clone(),
        api: a.api,
        base_model: base_model.clone(),
        timeout: Duration::from_secs(a.timeout_s.max(1)),
    };
    let set = match &a.adapters_from {
        Some(p) => AdapterSet::read(p)?,
        None => {
            let mut s = upload_set(a, &client, &url).await?;
            s.cold_uploaded_this_run = true;
            s
        }
    };
    let scenarios = m.expand();
    if scenarios.iter().any(|s| s.mode == Mode::NAdapters) {
        let need = m.mix_adapters_needed();
        anyhow::ensure!(
            set.mix.len() >= need,
            "the n-adapters scenarios need {need} adapters; only {} available",
            set.mix.len()
        );
    }
    // Request ids: 6 digits, varying between runs, so prompts stay short and never repeat.
    let mut next_id = (unix_secs() % 90 + 10) * 10_000;
    if !a.no_warmup {
        let spec = RequestSpec {
            id: next_id,
            prompt_tokens: a.prompt_tokens.first().copied().unwrap_or(16),
            shared_prefix: 0,
            max_tokens: a.max_tokens,
            adapter: None,
        };
        next_id += 1;
        if let Err(e) = client::one_request(&target, &spec).await {
            eprintln!("warm-up request failed: {e}");
        }
    }
    let cold = if a.modes.contains(&Mode::Cold) {
        Some(cold_scenario(a, &target, &set, &mut next_id).await)
    } else {
        None
    };
    println!("{}", report::TABLE_HEADER);
    let mut reports = Vec::with_capacity(scenarios.len());
    // Reports of ratio pairs run together, kept until their turn in the table.
    let mut done: Vec<ScenarioReport> = Vec::new();
    for sc in &scenarios {
        let r = if let Some(i) = done.iter().position(|r| r.id == sc.id()) {
            done.swap_remove(i)
        } else if let Some(partner) = m.ratio_partner(sc, &scenarios) {
            let base_first = sc.mode == Mode::Base;
            let pair = if base_first {
                [sc, partner]
            } else {
                [partner, sc]
            };
            let [base, adapters] = run_interleaved(a, &target, &set, pair, &mut next_id).await;
            let (mine, theirs) = if base_first {
                (base, adapters)
            } else {
                (adapters, base)
            };
            done.push(theirs);
            mine
        } else {
            run_scenario(a, &target, &set, sc, &mut next_id).await
        };
        println!("{}", report::table_row(&label, &r));
        eprint!("{}", report::failure_lines(&r.id, &r.summary.failures));
        reports.push(r);
    }
    let peak = reports
        .iter()
        .filter_map(|r| r.peak_rss.map(|p| p.mib))
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    Ok(RunReport {
        label,
        api: a.api,
        url,
        base_model,
        date_utc: crate::adapters::now_rfc3339(),
        load_average_before: load_before,
        load_average_after: load_average(),
        max_tokens: a.max_tokens,
        server_pid: a.server_pid,
        scenarios: reports,
        cold,
        peak_rss_mib: peak,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

async fn run_scenario(
    a: &RunArgs,
    target: &Target,
    set: &AdapterSet,
    sc: &Scenario,
    next_id: &mut u64,
) -> ScenarioReport {
    warm_adapters(target, set, sc, next_id).await;
    let round = run_round(a, target, set, sc, sc.requests_per_stream, next_id).await;
    round.report(a, sc)
}

/// The two scenarios the 8-adapter ratio divides (base, n-adapters), round by round in turn, so that
/// both see the same machine: this VM's memory bandwidth drifts over minutes, and it bounds the
/// adapter pass far more than the base's arithmetic, so run back to back the two rows drifted
/// apart (BENCHMARKS.md). Each round is one request per stream; the rounds' walls add up.
async fn run_interleaved(
    a: &RunArgs,
    target: &Target,
    set: &AdapterSet,
    pair: [&Scenario; 2],
    next_id: &mut u64,
) -> [ScenarioReport; 2] {
    for sc in pair {
        warm_adapters(target, set, sc, next_id).await;
    }
    let mut totals = [Round::default(), Round::default()];
    for _ in 0..pair[0].requests_per_stream.max(pair[1].requests_per_stream) {
        for (sc, total) in pair.iter().zip(totals.iter_mut()) {
            let round = run_round(a, target, set, sc, 1, next_id).await;
            total.add(round);
        }
    }
    let [t0, t1] = totals;
    [t0.report(a, pair[0]), t1.report(a, pair[1])]
}

/// The adapter a scenario's stream uses.
fn adapter_for(set: &AdapterSet, sc: &Scenario, stream: usize) -> Option<String> {
    match sc.mode {
        Mode::Base | Mode::Cold => None,
        Mode::OneAdapter => set.mix.first().cloned(),
        Mode::NAdapters => set.mix.get(stream).cloned(),
    }
}

/// Loads every adapter the scenario uses before timing it: the cold scenario measures loads.
async fn warm_adapters(target: &Target, set: &AdapterSet, sc: &Scenario, next_id: &mut u64) {
    if !sc.mode.needs_adapters() {
        return;
    }
    let n = if sc.mode == Mode::OneAdapter {
        1
    } else {
        sc.concurrency
    };
    for s in 0..n {
        let spec = RequestSpec {
            id: *next_id,
            prompt_tokens: 8,
            shared_prefix: 0,
            max_tokens: 1,
            adapter: adapter_for(set, sc, s),
        };
        *next_id += 1;
        if let Err(e) = client::one_request(target, &spec).await {
            eprintln!("  {}: adapter warm-up failed: {e}", sc.id());
        }
    }
}

/// What one or more timed stretches of a scenario gave.
#[derive(Default)]
struct Round {
    outcomes: Vec<Result<stats::Sample, String>>,
    wall: f64,
    peak_rss: Option<rss::Peak>,
}

impl Round {
    fn add(&mut self, other: Round) {
        self.outcomes.extend(other.outcomes);
        self.wall += other.wall;
        self.peak_rss = match (self.peak_rss, other.peak_rss) {
            (Some(p), Some(q)) => Some(if q.mib > p.mib { q } else { p }),
            (p, q) => p.or(q),
        };
    }

    fn report(self, a: &RunArgs, sc: &Scenario) -> ScenarioReport {
        ScenarioReport {
            id: sc.id(),
            scenario: *sc,
            summary: stats::summarize(&self.outcomes, self.wall, a.max_tokens),
            peak_rss: self.peak_rss,
        }
    }
}

/// `per_stream` requests on each of the scenario's streams, timed.
async fn run_round(
    a: &RunArgs,
    target: &Target,
    set: &AdapterSet,
    sc: &Scenario,
    per_stream: usize,
    next_id: &mut u64,
) -> Round {
    let id0 = *next_id;
    *next_id += (sc.concurrency * per_stream) as u64;
    let watch = a.server_pid.map(rss::RssWatch::start);
    let (outcomes, wall) =
        client::run_streams(target, sc.concurrency, per_stream, |s, k| RequestSpec {
            id: id0 + (s * per_stream + k) as u64,
            prompt_tokens: sc.prompt_tokens,
            shared_prefix: a.shared_prefix_tokens,
            max_tokens: a.max_tokens,
            adapter: adapter_for(set, sc, s),
        })
        .await;
    Round {
        outcomes,
        wall,
        peak_rss: watch.and_then(rss::RssWatch::finish),
    }
}

/// For each cold adapter: a 1-token request on the base, then the same prompt on the adapter;
/// the difference in time to first token is what loading the adapter costs.
async fn cold_scenario(
    a: &RunArgs,
    target: &Target,
    set: &AdapterSet,
    next_id: &mut u64,
) -> ColdReport {
    let mut pairs = Vec::new();
    let mut errors: Vec<Result<stats::Sample, String>> = Vec::new();
    for name in &set.cold {
        let spec = |adapter: Option<String>| RequestSpec {
            id: *next_id,
            prompt_tokens: a.cold_prompt_tokens,
            shared_prefix: 0,
            max_tokens: 1,
            adapter,
        };
        let base = client::one_request(target, &spec(None)).await;
        let with = client::one_request(target, &spec(Some(name.clone()))).await;
        *next_id += 1;
        match (base, with) {
            (Ok(b), Ok(w)) => pairs.push(ColdPair {
                adapter: name.clone(),
                base_ttft_ms: b.ttft * 1e3,
                adapter_ttft_ms: w.ttft * 1e3,
                added_ms: (w.ttft - b.ttft) * 1e3,
            }),
            (b, w) => {
                errors.extend(b.err().map(|e| Err(format!("base: {e}"))));
                errors.extend(w.err().map(|e| Err(format!("{name}: {e}"))));
            }
        }
    }
    let col = |f: fn(&ColdPair) -> f64| -> Vec<f64> { pairs.iter().map(f).collect() };
    let failures = stats::summarize(&errors, 0.0, 1).failures;
    ColdReport {
        truly_cold: !set.cold_uploaded_this_run,
        prompt_tokens: a.cold_prompt_tokens,
        added_ms_p50: stats::percentile(&col(|p| p.added_ms), 50.0),
        base_ttft_ms_p50: stats::percentile(&col(|p| p.base_ttft_ms), 50.0),
        adapter_ttft_ms_p50: stats::percentile(&col(|p| p.adapter_ttft_ms), 50.0),
        failed: set.cold.len() - pairs.len(),
        failures,
        pairs,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn defaults_are_the_full_matrix() {
        let c = Cli::try_parse_from(["bench"]).unwrap();
        let m = matrix(&c.bench.run);
        assert_eq!(m.modes, Mode::ALL.to_vec());
        assert_eq!(m.concurrency, vec![1, 4, 8, 16]);
        assert_eq!(m.prompt_tokens, vec![16, 500]);
        assert_eq!(c.bench.run.max_tokens, 128);
        assert_eq!(m.expand().len(), 3 * 2 * 4);
    }

    #[test]
    fn flags_trim_the_matrix() {
        let c = Cli::try_parse_from([
            "bench",
            "--modes",
            "base,n-adapters",
            "-c",
            "1,2",
            "--prompt-tokens",
            "16",
            "--api",
            "native",
        ])
        .unwrap();
        let ids: Vec<String> = matrix(&c.bench.run)
            .expand()
            .iter()
            .map(|s| s.id())
            .collect();
        assert_eq!(
            ids,
            [
                "base/p16/c1",
                "base/p16/c2",
                "n-adapters/p16/c1",
                "n-adapters/p16/c2"
            ]
        );
        assert_eq!(c.bench.run.api, Api::Native);
        assert!(Cli::try_parse_from(["bench", "--modes", "turbo"]).is_err());
        assert!(Cli::try_parse_from(["bench", "-c", "1,x"]).is_err());
    }

    #[test]
    fn compare_is_a_subcommand_that_excludes_run_flags() {
        let c = Cli::try_parse_from(["bench", "compare", "a.json", "b.json", "--plot", "p.svg"])
            .unwrap();
        match c.bench.command {
            Some(BenchCommand::Compare(cmp)) => {
                assert_eq!(cmp.ours, PathBuf::from("a.json"));
                assert_eq!(cmp.plot, Some(PathBuf::from("p.svg")));
            }
            None => panic!("compare not parsed"),
        }
        assert!(Cli::try_parse_from(["bench", "-c", "1", "compare", "a", "b"]).is_err());
    }
}
