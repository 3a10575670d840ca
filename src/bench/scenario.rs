//! What a benchmark run measures: the scenario matrix (adapter mode × prompt length ×
//! concurrent streams) expanded from the command line, how many requests each scenario sends,
//! and the prompts themselves. Pure; no I/O.

use serde::{Deserialize, Serialize};

/// How a scenario uses adapters.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every stream on the base model (the only mode a server without adapters can run).
    Base,
    /// Every stream on the same adapter.
    OneAdapter,
    /// Stream i on adapter i: N concurrent streams over N distinct adapters.
    NAdapters,
    /// Not a throughput scenario: for each freshly uploaded adapter, a 1-token request on the
    /// base and the same prompt on the adapter; the TTFT difference is the cold load cost.
    Cold,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Base, Mode::OneAdapter, Mode::NAdapters, Mode::Cold];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Base => "base",
            Mode::OneAdapter => "one-adapter",
            Mode::NAdapters => "n-adapters",
            Mode::Cold => "cold",
        }
    }

    /// Whether the scenario needs adapters uploaded to the server under test.
    pub fn needs_adapters(self) -> bool {
        self != Mode::Base
    }
}

/// One throughput scenario: `concurrency` streams, each sending `requests_per_stream`
/// streamed requests back to back, every one with a prompt of about `prompt_tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    pub mode: Mode,
    pub prompt_tokens: usize,
    pub concurrency: usize,
    pub requests_per_stream: usize,
}

impl Scenario {
    /// A stable key such as `n-adapters/p500/c8`, used to match rows across servers.
    pub fn id(&self) -> String {
        format!(
            "{}/p{}/c{}",
            self.mode.as_str(),
            self.prompt_tokens,
            self.concurrency
        )
    }

    pub fn requests(&self) -> usize {
        self.concurrency * self.requests_per_stream
    }
}

/// The axes of a run as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pub modes: Vec<Mode>,
    pub prompt_tokens: Vec<usize>,
    pub concurrency: Vec<usize>,
    /// Requests each stream sends at least.
    pub requests_per_stream: usize,
    /// Requests a scenario sends at least, spread over its streams, so that one stream still
    /// yields enough samples for a median and a p99 without every level paying for 16 × K.
    pub min_requests: usize,
    /// Rounds (requests per stream) at least for the base and n-adapters scenarios at
    /// [`RATIO_STREAMS`] streams when both modes run: the 8-adapter target divides those two
    /// aggregates, and from one round each the ratio moves ±10% between runs.
    pub ratio_rounds: usize,
}

/// The stream count of the adapters-against-base target.
pub const RATIO_STREAMS: usize = 8;

impl Matrix {
    /// Refuses axes that cannot run (empty lists, zeros) with a sentence naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.modes.is_empty() {
            return Err("--modes is empty".into());
        }
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            return Err("--concurrency needs one or more values ≥ 1".into());
        }
        let throughput = self.modes.iter().any(|m| *m != Mode::Cold);
        if throughput && (self.prompt_tokens.is_empty() || self.prompt_tokens.contains(&0)) {
            return Err("--prompt-tokens needs one or more values ≥ 1".into());
        }
        if self.requests_per_stream == 0 {
            return Err("--requests-per-stream must be ≥ 1".into());
        }
        Ok(())
    }

    /// The throughput scenarios in run order: mode, then prompt length, then concurrency, each
    /// in the order given (duplicates dropped). The cold scenario is not part of the matrix.
    pub fn expand(&self) -> Vec<Scenario> {
        let mut out: Vec<Scenario> = Vec::new();
        for &mode in dedup(&self.modes).iter().filter(|m| **m != Mode::Cold) {
            for &prompt_tokens in &dedup(&self.prompt_tokens) {
                for &concurrency in &dedup(&self.concurrency) {
                    let mut per_stream = self
                        .requests_per_stream
                        .max(self.min_requests.div_ceil(concurrency));
                    if self.judges_ratio(mode, concurrency) {
                        per_stream = per_stream.max(self.ratio_rounds);
                    }
                    out.push(Scenario {
                        mode,
                        prompt_tokens,
                        concurrency,
                        requests_per_stream: per_stream,
                    });
                }
            }
        }
        out
    }

    /// For either of the two scenarios the adapters-against-base ratio divides, the other one
    /// (same prompt length and streams, from `scenarios`): the two run interleaved.
    pub fn ratio_partner<'s>(
        &self,
        sc: &Scenario,
        scenarios: &'s [Scenario],
    ) -> Option<&'s Scenario> {
        if !self.judges_ratio(sc.mode, sc.concurrency) {
            return None;
        }
        let other = if sc.mode == Mode::Base {
            Mode::NAdapters
        } else {
            Mode::Base
        };
        scenarios.iter().find(|o| {
            o.mode == other
                && o.prompt_tokens == sc.prompt_tokens
                && o.concurrency == sc.concurrency
        })
    }

    /// Whether this scenario is one of the two the adapters-against-base ratio divides.
    fn judges_ratio(&self, mode: Mode, concurrency: usize) -> bool {
        concurrency == RATIO_STREAMS
            && matches!(mode, Mode::Base | Mode::NAdapters)
            && self.modes.contains(&Mode::Base)
            && self.modes.contains(&Mode::NAdapters)
    }

    /// Distinct adapters the N-adapter scenarios need: one per stream of the widest level.
    pub fn mix_adapters_needed(&self) -> usize {
        let mut n = 0;
        if self.modes.contains(&Mode::NAdapters) {
            n = self.concurrency.iter().copied().max().unwrap_or(0);
        }
        if self.modes.contains(&Mode::OneAdapter) {
            n = n.max(1);
        }
        n
    }
}

fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for x in v {
        if !out.contains(x) {
            out.push(*x);
        }
    }
    out
}

/// Common words that each make about one token (with their leading space) in the Llama/GPT-2
/// style BPE vocabularies of the models benchmarked here.
const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "then", "runs",
    "back", "to", "the", "old", "farm", "where", "it", "was", "born", "in", "the", "spring", "of",
    "that", "year", "when", "the", "river", "was", "high",
];

/// A prompt of roughly `tokens` tokens that starts with `id`, so no two requests of a run share
/// a prefix and no server's prefix cache can skip prefill — unless `shared` > 0: then every
/// prompt starts with the same `shared` words (a common system prompt), and only what follows
/// is the request's own. The servers report the exact count (`usage.prompt_tokens`), which the
/// report shows.
pub fn build_prompt(tokens: usize, id: u64, shared: usize) -> String {
    let shared = shared.min(tokens.saturating_sub(1));
    let mut s: String = (0..shared)
        .map(|i| WORDS[i % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let id_text = id.to_string();
    if !s.is_empty() {
        s.push(' ');
    }
    s.push_str(&format!("Request {id_text}:"));
    // "Request", ":" and one token per digit (Llama-family tokenizers split digits).
    let prefix_tokens = shared + 2 + id_text.len();
    let offset = (id as usize).wrapping_mul(7) % WORDS.len();
    for i in 0..tokens.saturating_sub(prefix_tokens).max(1) {
        s.push(' ');
        s.push_str(WORDS[(offset + i) % WORDS.len()]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix() -> Matrix {
        Matrix {
            modes: vec![Mode::Base, Mode::NAdapters, Mode::Cold],
            prompt_tokens: vec![16, 500],
            concurrency: vec![1, 4, 8, 16],
            requests_per_stream: 1,
            min_requests: 8,
            ratio_rounds: 1,
        }
    }

    #[test]
    fn matrix_expands_modes_then_prompts_then_concurrency_without_the_cold_mode() {
        let s = matrix().expand();
        assert_eq!(s.len(), 2 * 2 * 4);
        assert_eq!(s[0].id(), "base/p16/c1");
        assert_eq!(s[3].id(), "base/p16/c16");
        assert_eq!(s[4].id(), "base/p500/c1");
        assert_eq!(s[15].id(), "n-adapters/p500/c16");
        assert!(s.iter().all(|x| x.mode != Mode::Cold));
    }

    #[test]
    fn every_scenario_sends_at_least_min_requests_spread_over_its_streams() {
        let per_stream: Vec<(usize, usize)> = matrix()
            .expand()
            .iter()
            .take(4)
            .map(|s| (s.requests_per_stream, s.requests()))
            .collect();
        assert_eq!(per_stream, vec![(8, 8), (2, 8), (1, 8), (1, 16)]);
        let mut m = matrix();
        m.requests_per_stream = 3;
        assert_eq!(m.expand()[3].requests(), 48);
    }

    #[test]
    fn the_two_scenarios_of_the_adapter_ratio_get_more_rounds_when_both_run() {
        let mut m = matrix();
        m.modes = vec![Mode::Base, Mode::OneAdapter, Mode::NAdapters];
        m.ratio_rounds = 5;
        // Without the flag every 8-stream scenario sends one round (see the test above).
        let rounds = |m: &Matrix| -> Vec<String> {
            m.expand()
                .iter()
                .filter(|s| s.requests_per_stream == 5)
                .map(|s| s.id())
                .collect()
        };
        assert_eq!(
            rounds(&m),
            [
                "base/p16/c8",
                "base/p500/c8",
                "n-adapters/p16/c8",
                "n-adapters/p500/c8"
            ]
        );
        // A run without one of the two (llama.cpp's base-only run) keeps its plain counts.
        m.modes = vec![Mode::Base];
        assert!(rounds(&m).is_empty());
        // More requests asked for by the other flags win.
        m.modes = vec![Mode::Base, Mode::NAdapters];
        m.requests_per_stream = 7;
        m.min_requests = 1;
        assert!(m.expand().iter().all(|s| s.requests_per_stream == 7));
    }

    #[test]
    fn the_ratio_pairs_are_base_and_n_adapters_at_8_streams_and_the_same_prompt() {
        let mut m = matrix();
        m.modes = vec![Mode::NAdapters, Mode::OneAdapter, Mode::Base];
        let s = m.expand();
        let partner = |id: &str| {
            let sc = s.iter().find(|x| x.id() == id).unwrap();
            m.ratio_partner(sc, &s).map(|p| p.id())
        };
        assert_eq!(partner("base/p16/c8").as_deref(), Some("n-adapters/p16/c8"));
        assert_eq!(
            partner("n-adapters/p500/c8").as_deref(),
            Some("base/p500/c8")
        );
        assert_eq!(partner("base/p16/c4"), None);
        assert_eq!(partner("one-adapter/p16/c8"), None);
        // Without both modes there is no ratio to judge.
        m.modes = vec![Mode::Base];
        let s = m.expand();
        assert!(s.iter().all(|sc| m.ratio_partner(sc, &s).is_none()));
    }

    #[test]
    fn duplicates_in_a_list_run_once() {
        let mut m = matrix();
        m.concurrency = vec![4, 1, 4];
        let ids: Vec<String> = m.expand().iter().take(2).map(|s| s.id()).collect();
        assert_eq!(ids, vec!["base/p16/c4", "base/p16/c1"]);
        assert_eq!(m.expand().len(), 2 * 2 * 2);
    }

    #[test]
    fn impossible_axes_are_refused_with_the_flag_named() {
        let mut m = matrix();
        m.concurrency = vec![1, 0];
        assert!(m.validate().unwrap_err().contains("--concurrency"));
        let mut m = matrix();
        m.prompt_tokens.clear();
        assert!(m.validate().unwrap_err().contains("--prompt-tokens"));
        let mut m = matrix();
        m.modes = vec![Mode::Cold];
        m.prompt_tokens.clear();
        assert!(m.validate().is_ok(), "the cold scenario has no prompt axis");
        let mut m = matrix();
        m.requests_per_stream = 0;
        assert!(m.validate().is_err());
        assert!(matrix().validate().is_ok());
    }

    #[test]
    fn n_adapter_scenarios_need_one_adapter_per_stream_of_the_widest_level() {
        assert_eq!(matrix().mix_adapters_needed(), 16);
        let mut m = matrix();
        m.modes = vec![Mode::OneAdapter];
        assert_eq!(m.mix_adapters_needed(), 1);
        m.modes = vec![Mode::Base, Mode::Cold];
        assert_eq!(m.mix_adapters_needed(), 0);
    }

    #[test]
    fn prompts_start_with_their_id_and_have_about_the_requested_length() {
        let p = build_prompt(16, 42, 0);
        assert!(p.starts_with("Request 42: "));
        // 16 tokens ≈ prefix (4) + 12 words.
        assert_eq!(p.split(' ').count(), 2 + 12);
        assert_ne!(build_prompt(500, 1, 0), build_prompt(500, 2, 0));
        assert_eq!(build_prompt(500, 7, 0).split(' ').count(), 2 + 497);
        assert!(build_prompt(1, 123456, 0).ends_with(|c: char| c.is_alphabetic()));
    }

    #[test]
    fn a_shared_prefix_is_the_same_words_then_the_request_id() {
        let (a, b) = (build_prompt(500, 1, 400), build_prompt(500, 2, 400));
        let shared = |p: &str| p.split(' ').take(400).collect::<Vec<_>>().join(" ");
        assert_eq!(shared(&a), shared(&b));
        assert_ne!(a, b);
        assert_eq!(a.split(' ').nth(400), Some("Request"));
        assert_eq!(a.split(' ').count(), 400 + 2 + 97);
        // Never longer than the prompt itself.
        assert!(build_prompt(16, 3, 400).split(' ').count() < 20);
    }
}
