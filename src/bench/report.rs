//! What a run writes and prints: the run report (JSON, read back by `bench compare`), its
//! markdown table, and the comparison of two runs — ours/peer ratios per scenario, llama-bench's
//! reference rates, and issue 7's targets, each marked met or not. Pure: reading and writing
//! files is the caller's.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rss::Peak;
use super::scenario::{Mode, Scenario};
use super::sse::Api;
use super::stats::Summary;

/// One throughput scenario's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub id: String,
    #[serde(flatten)]
    pub scenario: Scenario,
    #[serde(flatten)]
    pub summary: Summary,
    /// Peak RSS of the server during the scenario (None without `--server-pid`).
    pub peak_rss: Option<Peak>,
}

/// One cold-adapter pair: the same 1-token request on the base, then on a fresh adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdPair {
    pub adapter: String,
    pub base_ttft_ms: f64,
    pub adapter_ttft_ms: f64,
    pub added_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdReport {
    /// false when the adapters were uploaded by this run: adapterd keeps uploads resident, so
    /// the difference is then the adapter's compute cost, not its load cost.
    pub truly_cold: bool,
    pub prompt_tokens: usize,
    pub pairs: Vec<ColdPair>,
    pub added_ms_p50: Option<f64>,
    pub base_ttft_ms_p50: Option<f64>,
    pub adapter_ttft_ms_p50: Option<f64>,
    pub failed: usize,
    pub failures: BTreeMap<String, usize>,
}

/// Everything one run against one server measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub label: String,
    pub api: Api,
    pub url: String,
    pub base_model: Option<String>,
    pub date_utc: String,
    pub load_average_before: Option<String>,
    pub load_average_after: Option<String>,
    pub max_tokens: usize,
    pub server_pid: Option<u32>,
    pub scenarios: Vec<ScenarioReport>,
    pub cold: Option<ColdReport>,
    /// The largest peak of any scenario (MiB).
    pub peak_rss_mib: Option<f64>,
    pub wall_s: f64,
}

impl RunReport {
    pub fn find(&self, mode: Mode, prompt_tokens: usize, concurrency: usize) -> Option<&Summary> {
        self.find_scenario(mode, prompt_tokens, concurrency)
            .map(|s| &s.summary)
    }

    pub fn find_scenario(
        &self,
        mode: Mode,
        prompt_tokens: usize,
        concurrency: usize,
    ) -> Option<&ScenarioReport> {
        self.scenarios.iter().find(|s| {
            s.scenario.mode == mode
                && s.scenario.prompt_tokens == prompt_tokens
                && s.scenario.concurrency == concurrency
        })
    }
}

pub fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "—".into(),
    }
}

fn fmt_ratio(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.2}×"),
        _ => "—".into(),
    }
}

pub const TABLE_HEADER: &str = "| server | scenario | streams | prompt tok | requests ok/failed | TTFT p50 ms | TTFT p99 ms | decode tok/s per stream (p50) | aggregate tok/s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|";

/// One markdown row; `*` after the ok count marks requests that generated fewer tokens than
/// asked, `~` before the RSS a sampled (not exact) peak.
pub fn table_row(label: &str, s: &ScenarioReport) -> String {
    let m = &s.summary;
    let short = if m.short > 0 {
        format!(" ({} short*)", m.short)
    } else {
        String::new()
    };
    let rss = match s.peak_rss {
        Some(p) if p.exact => format!("{:.0}", p.mib),
        Some(p) => format!("~{:.0}", p.mib),
        None => "—".into(),
    };
    format!(
        "| {label} | {} | {} | {} | {}/{}{short} | {} | {} | {} | {:.1} | {rss} |",
        s.scenario.mode.as_str(),
        s.scenario.concurrency,
        fmt_opt(m.prompt_tokens_p50, 0),
        m.ok,
        m.failed,
        fmt_opt(m.ttft_ms_p50, 0),
        fmt_opt(m.ttft_ms_p99, 0),
        fmt_opt(m.decode_tps_per_stream_p50, 1),
        m.aggregate_tps,
    )
}

/// Failure reasons of a scenario, one indented line each, for stderr.
pub fn failure_lines(id: &str, failures: &BTreeMap<String, usize>) -> String {
    let mut s = String::new();
    for (reason, n) in failures {
        let _ = writeln!(s, "  {id}: {n} failed: {reason}");
    }
    s
}

/// The whole run as markdown: the scenario table and the cold-adapter result.
pub fn render_run(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{TABLE_HEADER}");
    for sc in &r.scenarios {
        let _ = writeln!(s, "{}", table_row(&r.label, sc));
    }
    if let Some(c) = &r.cold {
        let _ = writeln!(s);
        let _ = writeln!(s, "{}", render_cold(&r.label, c));
    }
    s
}

pub fn render_cold(label: &str, c: &ColdReport) -> String {
    let mut s = String::new();
    let kind = if c.truly_cold {
        "cold (never loaded since the server started)"
    } else {
        "WARM: uploaded in this run and still resident; restart the server between --prepare-adapters and --adapters-from for a cold load"
    };
    let _ = writeln!(
        s,
        "{label} adapter first-request cost, {} adapters, {kind}:",
        c.pairs.len()
    );
    write_table(
        &mut s,
        &["adapter", "base TTFT ms", "adapter TTFT ms", "added ms"],
        c.pairs.iter().map(|p| {
            vec![
                p.adapter.clone(),
                format!("{:.1}", p.base_ttft_ms),
                format!("{:.1}", p.adapter_ttft_ms),
                format!("{:.1}", p.added_ms),
            ]
        }),
    );
    let _ = write!(
        s,
        "added to TTFT, p50: {} ms (failed pairs: {})",
        fmt_opt(c.added_ms_p50, 1),
        c.failed
    );
    s
}

/// Appends a markdown table: the header row, its separator, then one line per row of cells.
fn write_table(s: &mut String, header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let _ = writeln!(
        s,
        "| {} |\n|{}",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for cells in rows {
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
}

/// One llama-bench test: `pp500` (prompt processing) or `tg128` (generation), tokens/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    pub test: String,
    pub tokens_per_s: f64,
    pub stddev: f64,
}

/// llama-bench's `-o json` rows.
pub fn llama_bench_rows(v: &Value) -> Vec<BenchRow> {
    let mut out = Vec::new();
    for t in v.as_array().into_iter().flatten() {
        let n_prompt = t.get("n_prompt").and_then(Value::as_u64).unwrap_or(0);
        let n_gen = t.get("n_gen").and_then(Value::as_u64).unwrap_or(0);
        let (Some(ts), sd) = (
            t.get("avg_ts").and_then(Value::as_f64),
            t.get("stddev_ts").and_then(Value::as_f64).unwrap_or(0.0),
        ) else {
            continue;
        };
        let name = match (n_prompt, n_gen) {
            (p, 0) if p > 0 => format!("pp{p}"),
            (0, g) if g > 0 => format!("tg{g}"),
            (p, g) => format!("pp{p}+tg{g}"),
        };
        out.push(BenchRow {
            test: name,
            tokens_per_s: ts,
            stddev: sd,
        });
    }
    out
}

/// Ours against the peer on one scenario (the peer's base row at the same prompt length and
/// concurrency: llama.cpp serves no per-request adapters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioRow {
    pub id: String,
    pub decode_per_stream: Option<f64>,
    pub aggregate: Option<f64>,
    /// ours/peer: below 1 is better.
    pub ttft_p50: Option<f64>,
    pub peak_rss: Option<f64>,
    /// This mode's aggregate over our own base at the same prompt and concurrency.
    pub aggregate_vs_our_base: Option<f64>,
}

/// One of issue 7's targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRow {
    pub target: String,
    pub measured: String,
    pub value: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub ours: String,
    pub peer: String,
    pub ratios: Vec<RatioRow>,
    pub llama_bench: Vec<BenchRow>,
    pub targets: Vec<TargetRow>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) if y > 0.0 && x.is_finite() => Some(x / y),
        _ => None,
    }
}

/// Prefill estimate of a 1-stream scenario: prompt tokens / TTFT. TTFT includes HTTP and the
/// first decode step, so this understates prefill a little.
fn prefill_est(s: &Summary) -> Option<f64> {
    ratio(s.prompt_tokens_p50, s.ttft_ms_p50.map(|t| t / 1e3))
}

pub fn compare(ours: &RunReport, peer: &RunReport, llama_bench: Option<&Value>) -> Comparison {
    let mut ratios = Vec::new();
    for s in &ours.scenarios {
        let sc = s.scenario;
        let p = peer.find(Mode::Base, sc.prompt_tokens, sc.concurrency);
        let our_base = ours.find(Mode::Base, sc.prompt_tokens, sc.concurrency);
        let peer_rss = peer
            .find_scenario(Mode::Base, sc.prompt_tokens, sc.concurrency)
            .and_then(|x| x.peak_rss);
        ratios.push(RatioRow {
            id: s.id.clone(),
            decode_per_stream: ratio(
                s.summary.decode_tps_per_stream_p50,
                p.and_then(|p| p.decode_tps_per_stream_p50),
            ),
            aggregate: ratio(Some(s.summary.aggregate_tps), p.map(|p| p.aggregate_tps)),
            ttft_p50: ratio(s.summary.ttft_ms_p50, p.and_then(|p| p.ttft_ms_p50)),
            peak_rss: ratio(s.peak_rss.map(|x| x.mib), peer_rss.map(|x| x.mib)),
            aggregate_vs_our_base: if sc.mode == Mode::Base {
                None
            } else {
                ratio(
                    Some(s.summary.aggregate_tps),
                    our_base.map(|b| b.aggregate_tps),
                )
            },
        });
    }
    let lb = llama_bench.map(llama_bench_rows).unwrap_or_default();
    let targets = targets(ours, peer, &lb);
    Comparison {
        ours: ours.label.clone(),
        peer: peer.label.clone(),
        ratios,
        llama_bench: lb,
        targets,
    }
}

fn at_least(target: &str, measured: String, value: Option<f64>, goal: f64) -> TargetRow {
    TargetRow {
        target: target.to_owned(),
        measured,
        value,
        met: value.map(|v| v >= goal),
    }
}

/// Fewer rounds of requests than this at 8 streams make the adapter-vs-base ratio too noisy
/// to quote without a warning.
const FEW_ROUNDS: usize = 3;

/// A target on the ratio of two throughputs: "a / b tok/s = ratio", then `note`.
fn ratio_at_least(
    target: &str,
    a: Option<f64>,
    b: Option<f64>,
    note: &str,
    goal: f64,
) -> TargetRow {
    let v = ratio(a, b);
    at_least(
        target,
        format!(
            "{} / {} tok/s = {}{note}",
            fmt_opt(a, 1),
            fmt_opt(b, 1),
            fmt_ratio(v)
        ),
        v,
        goal,
    )
}

/// Issue 7's targets from the rows present (a target whose rows were not run says so).
fn targets(ours: &RunReport, peer: &RunReport, lb: &[BenchRow]) -> Vec<TargetRow> {
    let (on, pn) = (&ours.label, &peer.label);
    let mut prompts: Vec<usize> = ours
        .scenarios
        .iter()
        .map(|s| s.scenario.prompt_tokens)
        .collect();
    prompts.sort_unstable();
    prompts.dedup();
    let mut out = Vec::new();
    let (Some(&short), Some(&long)) = (prompts.first(), prompts.last()) else {
        return out;
    };
    let dec = |r: &RunReport| {
        r.find(Mode::Base, short, 1)
            .and_then(|s| s.decode_tps_per_stream_p50)
    };
    let od = dec(ours);
    out.push(ratio_at_least(
        "single-stream decode ≥ 1.0× llama.cpp (server, 1 stream)",
        od,
        dec(peer),
        &format!(" (base/p{short}/c1, {on}/{pn})"),
        1.0,
    ));
    if let Some(BenchRow {
        test: name,
        tokens_per_s: tg,
        ..
    }) = lb.iter().find(|r| r.test.starts_with("tg"))
    {
        // llama-bench's rates come from JSON numbers, always finite: fmt_opt prints them as
        // `{tg:.1}` would.
        out.push(ratio_at_least(
            &format!("single-stream decode ≥ 1.0× llama-bench {name}"),
            od,
            Some(*tg),
            "",
            1.0,
        ));
    }
    let ope = ours.find(Mode::Base, long, 1).and_then(prefill_est);
    let pp = lb
        .iter()
        .find(|r| r.test == format!("pp{long}"))
        .or_else(|| lb.iter().find(|r| r.test.starts_with("pp")));
    let (ref_name, ref_v) = match pp {
        Some(r) => (format!("llama-bench {}", r.test), Some(r.tokens_per_s)),
        None => (
            format!("{pn} prompt/TTFT"),
            peer.find(Mode::Base, long, 1).and_then(prefill_est),
        ),
    };
    let v = ratio(ope, ref_v);
    out.push(at_least(
        "prompt processing ≥ 0.8× llama.cpp",
        format!(
            "{on} prompt/TTFT at base/p{long}/c1 {} vs {ref_name} {} tok/s = {} (TTFT includes HTTP and one decode step)",
            fmt_opt(ope, 0),
            fmt_opt(ref_v, 0),
            fmt_ratio(v)
        ),
        v,
        0.8,
    ));
    let agg8 = |r: &RunReport, mode: Mode, p: usize| r.find(mode, p, 8).map(|s| s.aggregate_tps);
    for &p in &prompts {
        out.push(ratio_at_least(
            &format!("aggregate at 8 streams ≥ 1.5× llama-server (p{p})"),
            agg8(ours, Mode::Base, p),
            agg8(peer, Mode::Base, p),
            "",
            1.5,
        ));
    }
    for &p in &prompts {
        // One round of 8 requests per scenario moves this ratio by ±10% between runs (the
        // base row it divides by is as noisy as the adapter row): say so next to the number.
        let rounds = [Mode::NAdapters, Mode::Base]
            .iter()
            .filter_map(|m| ours.find(*m, p, 8))
            .map(|s| s.ok / 8)
            .min()
            .unwrap_or(0);
        let note = if rounds < FEW_ROUNDS {
            format!(
                " (from {rounds} round(s) of 8 requests: ±10% run to run; \
                 --ratio-rounds 5 for a stable ratio)"
            )
        } else {
            format!(" ({rounds} rounds of 8 requests)")
        };
        out.push(ratio_at_least(
            &format!("8 streams over 8 adapters ≥ 0.85× 8 streams on the base (p{p})"),
            agg8(ours, Mode::NAdapters, p),
            agg8(ours, Mode::Base, p),
            &note,
            0.85,
        ));
    }
    let cold = ours.cold.as_ref();
    let added = cold.and_then(|c| c.added_ms_p50);
    out.push(TargetRow {
        target: "cold adapter (rank 16, all seven modules) adds < 20 ms to TTFT".into(),
        measured: match cold {
            Some(c) if !c.truly_cold => format!(
                "{} ms p50, but the adapters were resident (not a cold load)",
                fmt_opt(added, 1)
            ),
            Some(c) => format!("{} ms p50 of {} adapters", fmt_opt(added, 1), c.pairs.len()),
            None => "not run".into(),
        },
        value: added,
        met: match cold {
            Some(c) if c.truly_cold => added.map(|a| a < 20.0),
            _ => None,
        },
    });
    out
}

pub fn render_comparison(c: &Comparison) -> String {
    let mut s = String::new();
    let (on, pn) = (&c.ours, &c.peer);
    let _ = writeln!(
        s,
        "Ratios {on}/{pn} (the peer's base row at the same prompt length and streams; TTFT and RSS: lower is better):\n"
    );
    let vs_base = format!("aggregate vs {on} base");
    write_table(
        &mut s,
        &[
            "scenario",
            "decode per stream",
            "aggregate",
            "TTFT p50",
            "peak RSS",
            &vs_base,
        ],
        c.ratios.iter().map(|r| {
            vec![
                r.id.clone(),
                fmt_ratio(r.decode_per_stream),
                fmt_ratio(r.aggregate),
                fmt_ratio(r.ttft_p50),
                fmt_ratio(r.peak_rss),
                fmt_ratio(r.aggregate_vs_our_base),
            ]
        }),
    );
    if !c.llama_bench.is_empty() {
        let _ = writeln!(s, "\nllama-bench (same model file and threads):\n");
        write_table(
            &mut s,
            &["test", "tok/s"],
            c.llama_bench.iter().map(|r| {
                vec![
                    r.test.clone(),
                    format!("{:.1} ± {:.1}", r.tokens_per_s, r.stddev),
                ]
            }),
        );
    }
    let _ = writeln!(s, "\nIssue 7 targets:\n");
    write_table(
        &mut s,
        &["target", "measured", "verdict"],
        c.targets.iter().map(|t| {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            vec![t.target.clone(), t.measured.clone(), verdict.to_owned()]
        }),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: Mode, p: usize, c: usize, agg: f64, decode: f64, ttft_ms: f64) -> ScenarioReport {
        let scenario = Scenario {
            mode,
            prompt_tokens: p,
            concurrency: c,
            requests_per_stream: 1,
        };
        ScenarioReport {
            id: scenario.id(),
            scenario,
            summary: Summary {
                requests: c,
                ok: c,
                failed: 0,
                short: 0,
                failures: BTreeMap::new(),
                prompt_tokens_p50: Some(p as f64),
                ttft_ms_p50: Some(ttft_ms),
                ttft_ms_p99: Some(ttft_ms),
                decode_tps_per_stream_p50: Some(decode),
                aggregate_tps: agg,
                generated_tokens: 128 * c,
                wall_s: 1.0,
            },
            peak_rss: Some(Peak {
                mib: 200.0,
                exact: true,
            }),
        }
    }

    fn run(label: &str, scenarios: Vec<ScenarioReport>, cold: Option<ColdReport>) -> RunReport {
        RunReport {
            label: label.into(),
            api: Api::Openai,
            url: String::new(),
            base_model: None,
            date_utc: String::new(),
            load_average_before: None,
            load_average_after: None,
            max_tokens: 128,
            server_pid: None,
            scenarios,
            cold,
            peak_rss_mib: None,
            wall_s: 1.0,
        }
    }

    /// A cold-adapter result with no pairs listed, only its p50.
    fn cold_report(truly_cold: bool, added_ms_p50: f64) -> ColdReport {
        ColdReport {
            truly_cold,
            prompt_tokens: 16,
            pairs: Vec::new(),
            added_ms_p50: Some(added_ms_p50),
            base_ttft_ms_p50: None,
            adapter_ttft_ms_p50: None,
            failed: 0,
            failures: BTreeMap::new(),
        }
    }

    #[test]
    fn ratios_use_the_peers_base_row_and_targets_are_judged() {
        let cold = cold_report(true, 12.0);
        let ours = run(
            "ours",
            vec![
                row(Mode::Base, 16, 1, 60.0, 100.0, 50.0),
                row(Mode::Base, 16, 8, 300.0, 40.0, 80.0),
                row(Mode::NAdapters, 16, 8, 240.0, 30.0, 90.0),
                row(Mode::Base, 500, 1, 50.0, 90.0, 2000.0),
            ],
            Some(cold),
        );
        let peer = run(
            "peer",
            vec![
                row(Mode::Base, 16, 1, 70.0, 110.0, 40.0),
                row(Mode::Base, 16, 8, 170.0, 22.0, 100.0),
                row(Mode::Base, 500, 1, 60.0, 100.0, 1800.0),
            ],
            None,
        );
        // llama-bench -o json rows (abridged).
        let lb = serde_json::json!([
            {"n_prompt": 500, "n_gen": 0, "avg_ts": 312.5, "stddev_ts": 4.0},
            {"n_prompt": 0, "n_gen": 128, "avg_ts": 112.0, "stddev_ts": 1.5}
        ]);
        let c = compare(&ours, &peer, Some(&lb));
        let n8 = c
            .ratios
            .iter()
            .find(|r| r.id == "n-adapters/p16/c8")
            .unwrap();
        assert!((n8.aggregate.unwrap() - 240.0 / 170.0).abs() < 1e-9);
        assert!((n8.aggregate_vs_our_base.unwrap() - 0.8).abs() < 1e-9);
        assert!((n8.ttft_p50.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(c.llama_bench[0].test, "pp500");
        assert_eq!(c.llama_bench[1].test, "tg128");
        let verdict = |prefix: &str| {
            c.targets
                .iter()
                .find(|t| t.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("no target {prefix}"))
                .met
        };
        assert_eq!(
            verdict("single-stream decode ≥ 1.0× llama.cpp"),
            Some(false)
        );
        assert_eq!(
            verdict("single-stream decode ≥ 1.0× llama-bench tg128"),
            Some(false)
        );
        // 500 tokens / 2 s = 250 tok/s vs pp500 312.5 = 0.8×: met (≥).
        assert_eq!(verdict("prompt processing"), Some(true));
        assert_eq!(
            verdict("aggregate at 8 streams ≥ 1.5× llama-server (p16)"),
            Some(true)
        );
        // p500 has no 8-stream rows: not measured rather than failed.
        assert_eq!(
            verdict("aggregate at 8 streams ≥ 1.5× llama-server (p500)"),
            None
        );
        assert_eq!(
            verdict("8 streams over 8 adapters ≥ 0.85× 8 streams on the base (p16)"),
            Some(false)
        );
        let adapters = c
            .targets
            .iter()
            .find(|t| t.target.starts_with("8 streams over 8 adapters"))
            .expect("the adapter target");
        assert!(
            adapters.measured.contains("from 1 round(s) of 8 requests"),
            "{}",
            adapters.measured
        );
        assert_eq!(verdict("cold adapter"), Some(true));
        let text = render_comparison(&c);
        assert!(
            text.contains("| n-adapters/p16/c8 | 1.36× | 1.41× | 0.90× | 1.00× | 0.80× |"),
            "{text}"
        );
    }

    #[test]
    fn a_warm_cold_scenario_is_not_judged() {
        let mut cold = cold_report(false, 1.0);
        let ours = run(
            "ours",
            vec![row(Mode::Base, 16, 1, 1.0, 1.0, 1.0)],
            Some(cold.clone()),
        );
        let c = compare(&ours, &ours, None);
        let t = c
            .targets
            .iter()
            .find(|t| t.target.starts_with("cold"))
            .unwrap();
        assert_eq!(t.met, None);
        assert!(t.measured.contains("resident"));
        cold.truly_cold = true;
        assert!(render_cold("x", &cold).contains("cold (never loaded"));
    }
}
