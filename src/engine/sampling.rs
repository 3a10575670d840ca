//! Validated sampling parameters and the next-token choice (greedy, temperature, top-k, top-p,
//! seed), with log-probabilities.
//!
//! The API layer turns raw client values into a [`SamplingParams`] with
//! [`SamplingParams::validate`]; from then on the engine trusts them. Each sequence owns one
//! [`Sampler`], which owns that sequence's random generator, so a seeded request draws the same
//! tokens no matter what else is in the batch.
//!
//! For one position, [`Sampler::sample`] processes the raw logits in this order:
//!
//! 1. **Sanitise.** NaN counts as `-inf` (the token can never be chosen) and `+inf` as
//!    `f32::MAX`, so a broken logit cannot poison the arithmetic or panic. If every logit is
//!    `-inf`/NaN there is no distribution at all: the result is token 0 with logprob `-inf` and
//!    an empty `top` list (the caller should treat that as a model failure).
//! 2. **Report logprobs.** Branch-free, vectorisable passes find the maximum, the argmax and
//!    the log-sum-exp of the raw logits; that is all greedy decoding costs, plus the top-n scan
//!    when alternatives are asked for. The reported logprobs are the log-softmax of the *raw*
//!    logits at temperature 1, whatever the sampling settings, as OpenAI and vLLM report them.
//!    When the request asks for penalties (presence, frequency, repetition) or a `logit_bias`,
//!    steps 3–6 then choose from an adjusted copy of the logits ([`super::logit_adjust`]); in
//!    JSON mode they are repeated without each token [`super::json_mode`] refuses.
//! 3. **Temperature.** `0` (anything below 1e-5, as in vLLM) means greedy: the argmax, ties
//!    going to the lowest token id, with no random draw. Otherwise the weights are
//!    `exp((x - max) / T)`.
//! 4. **Top-k.** Keep the `k` largest logits (ties to the lower id), found with a small sorted
//!    buffer for `k <= 256` and a partial selection above that, never a sort. Scaling by a
//!    positive temperature never changes the order, so selecting on raw logits is the same as
//!    selecting after scaling.
//! 5. **Top-p.** Over the survivors, renormalised, keep the smallest prefix in descending
//!    probability whose mass reaches `top_p`; the token that crosses the threshold is kept, so
//!    at least one token always survives. Tokens too light to matter are dropped first, and the
//!    prefix is then found by bisecting with partial selections, never a sort of the vocabulary.
//!    Then **min-p** (when asked): of the survivors, keep those whose weight is at least `min_p`
//!    times the largest (the maximum always stays), as vLLM applies it, after top-k and top-p.
//! 6. **Draw.** One uniform number from the sequence's generator picks a token from the kept
//!    weights (categorical draw by cumulative sum).
//!
//! The same seed gives the same tokens for the same logits with the same build; the generator is
//! `rand`'s `StdRng`, which does not promise the same stream across `rand` versions.

use super::json_mode::JsonConstraint;
use super::logit_adjust::{Adjuster, LogitAdjust};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;

/// Largest `top_logprobs` a client may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Largest temperature a client may ask for (OpenAI's limit).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Already-validated parameters; the engine never re-checks them.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// `0` = greedy; otherwise in `(0, 2]`.
    pub temperature: f32,
    /// `None` = off; otherwise `>= 1`.
    pub top_k: Option<usize>,
    /// `None` = off (also what `1.0` becomes); otherwise in `(0, 1)`.
    pub top_p: Option<f32>,
    /// `None` = seeded from OS entropy.
    pub seed: Option<u64>,
    /// How many most-likely alternatives to report per position, `0..=20`.
    pub top_logprobs: usize,
    /// Penalties and logit bias (default: none).
    pub adjust: LogitAdjust,
    /// `None` = off; otherwise in `(0, 1]`: drop tokens less likely than `min_p` times the
    /// most likely one (after temperature, top-k and top-p, as vLLM applies it).
    pub min_p: Option<f32>,
}

/// A client value outside its allowed range; the API maps it to 422.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("{message}")]
    OutOfRange {
        field: &'static str,
        message: String,
    },
}

impl SamplingError {
    /// The request field at fault, for the error envelope.
    pub fn field(&self) -> &'static str {
        match self {
            SamplingError::OutOfRange { field, .. } => field,
        }
    }

    pub(crate) fn out_of_range(
        field: &'static str,
        rule: &str,
        got: impl std::fmt::Display,
    ) -> Self {
        SamplingError::OutOfRange {
            field,
            message: format!("{field} must be {rule}, got {got}"),
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding, no logprob alternatives.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: None,
            top_logprobs: 0,
            adjust: LogitAdjust::default(),
            min_p: None,
        }
    }

    /// Validates raw client values and returns an error naming the field and the allowed range.
    ///
    /// - `temperature`: finite, in `[0, 2]`, `0` = greedy; `None` takes `default_temperature`
    ///   (OpenAI routes pass 1.0, the native API its own default), which is validated too.
    /// - `top_p`: in `(0, 1]`; `1` and `None` both mean off.
    /// - `top_k`: `>= 1`; `0`, `-1` (vLLM's spelling of "off") and `None` mean off.
    /// - `top_logprobs`: `0..=20`; `None` = 0.
    pub fn validate(
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<i64>,
        seed: Option<u64>,
        top_logprobs: Option<i64>,
        default_temperature: f32,
    ) -> Result<Self, SamplingError> {
        let temperature = temperature.unwrap_or(default_temperature);
        if !(temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&temperature)) {
            return Err(SamplingError::out_of_range(
                "temperature",
                "a finite number between 0 and 2",
                temperature,
            ));
        }

        let top_p = match top_p {
            None => None,
            Some(p) if p.is_finite() && p > 0.0 && p <= 1.0 => (p < 1.0).then_some(p),
            Some(p) => {
                return Err(SamplingError::out_of_range(
                    "top_p",
                    "a number greater than 0 and at most 1",
                    p,
                ))
            }
        };

        let top_k = match top_k {
            None | Some(0) | Some(-1) => None,
            Some(k) => match usize::try_from(k) {
                Ok(k) => Some(k),
                Err(_) => {
                    return Err(SamplingError::out_of_range(
                        "top_k",
                        "a positive integer (0 or -1 to disable)",
                        k,
                    ))
                }
            },
        };

        let top_logprobs = match top_logprobs {
            None => 0,
            Some(n) => match usize::try_from(n) {
                Ok(n) if n <= MAX_TOP_LOGPROBS => n,
                _ => {
                    return Err(SamplingError::out_of_range(
                        "top_logprobs",
                        "an integer between 0 and 20",
                        n,
                    ))
                }
            },
        };

        Ok(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            top_logprobs,
            adjust: LogitAdjust::default(),
            min_p: None,
        })
    }

    /// `min_p`: in `[0, 1]`; `0` and `None` both mean off.
    pub fn with_min_p(mut self, min_p: Option<f32>) -> Result<Self, SamplingError> {
        self.min_p = match min_p {
            None => None,
            Some(p) if p.is_finite() && (0.0..=1.0).contains(&p) => (p > 0.0).then_some(p),
            Some(p) => {
                return Err(SamplingError::out_of_range(
                    "min_p",
                    "a number between 0 and 1 (0 is off)",
                    p,
                ))
            }
        };
        Ok(self)
    }

    fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }
}

/// JSON mode: refused draws before every token is checked at once. Each draw scans the logits
/// (tens of microseconds over a 49k vocabulary) and the full check is one allocation-free
/// pass over the vocabulary's bytes, so a client that biases refused tokens up (which forces
/// the full check every step) costs about a millisecond per step; most steps need one draw.
const REDRAWS: usize = 8;

/// Temperatures below this are treated as 0 (greedy), as vLLM does: `1 / T` would overflow
/// long before, and the distribution is a point mass in all but exact ties anyway.
const GREEDY_BELOW: f32 = 1e-5;
/// `top_k` up to this size is found with a small sorted buffer (one comparison for most
/// logits); larger ones with a partial selection over the whole vocabulary.
const SMALL_K: usize = 256;
/// Independent accumulators per reduction, so the compiler can keep them in SIMD lanes.
const LANES: usize = 8;
/// Partial sums are carried in f32 within a block and in f64 across blocks, for accuracy.
const BLOCK: usize = 256;

/// The token chosen for one position.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-softmax of the raw logits (temperature 1) at `token`.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the raw distribution, most likely first
    /// (ties to the lower id). Tokens with probability zero are left out, so it can be shorter.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler: parameters, random generator and reusable scratch space.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// `(logit, token)` candidates for top-k/top-p; kept between calls so a vocab-sized buffer
    /// is allocated once per sequence, not once per token.
    pairs: Vec<(f32, u32)>,
    /// Per-token weights for plain temperature sampling, reused for the same reason.
    weights: Vec<f32>,
    /// Penalties and bias, with the counts of the tokens this sequence generated.
    adjuster: Adjuster,
    /// JSON mode: only tokens that keep the text a JSON object prefix (see `json_mode`).
    constraint: Option<JsonConstraint>,
}

/// Which tokens survived temperature/top-k/top-p, and their total unnormalised weight.
enum Kept {
    /// Every token; weights in `Sampler::weights`, indexed by token id.
    All { total: f64 },
    /// `Sampler::pairs[..len]`; weights recomputed from the logits (the set is small), summed
    /// into `total` in this same order.
    Pairs { len: usize, total: f64 },
}

/// NaN → `-inf` (never chosen), `+inf` → `f32::MAX` (so `x - max` stays finite). Written as
/// selects so loops over it still vectorise.
#[inline(always)]
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x > f32::MAX {
        f32::MAX
    } else {
        x
    }
}

/// `exp(x)` for `x <= 0` (weights relative to the maximum), accurate to a couple of ulp
/// (Cephes' `expf` polynomial). Exactly 0 below -87 and for NaN, so `-inf` and NaN logits
/// have no weight at all; 1 for `x >= 0`, which is what `+inf` (clamped to the maximum)
/// should get. No libm call and no branch, so loops over it vectorise: `f32::exp` is an
/// opaque call and was most of the cost of a step over a 49k vocabulary.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    // `max`/`min` rather than `clamp`, which would keep a NaN.
    #[allow(clippy::manual_clamp)]
    let xc = x.max(-87.0).min(0.0);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n by building the exponent bits. `shifted`'s low mantissa bits hold n (two's
    // complement, n in [-126, 0] after the clamp), which avoids a float-to-int cast: Rust's
    // saturating cast keeps the loop from vectorising.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    // All ones if x >= -87 (false for NaN), else zero: a mask rather than an `if`, which the
    // compiler turns into a branch around the whole computation and then cannot vectorise.
    let keep = 0u32.wrapping_sub(u32::from(x >= -87.0));
    f32::from_bits((y * scale).to_bits() & keep)
}

/// Sum of `f` over `xs` in a fixed order: `LANES` running sums per block, blocks added in f64.
fn blocked_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    xs.chunks(BLOCK)
        .map(|block| f64::from(lane_sum(block, &f)))
        .sum()
}

fn lane_sum(xs: &[f32], f: &impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(x);
    }
    acc.iter().sum()
}

/// Maximum of the sanitised logits (`-inf` if none is above it).
fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            // NaN compares false, so it never becomes the maximum.
            *a = if x > *a { x } else { *a };
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if x > *a { x } else { *a };
    }
    clean(acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)))
}

/// Max, argmax (lowest id among ties) and log-sum-exp of the sanitised logits: a max pass, an
/// early-exit scan for its first position and an exp-sum pass, all cheap and vectorisable.
/// Returns `None` when no logit is above `-inf`.
fn max_argmax_lse(logits: &[f32]) -> Option<(f32, u32, f32)> {
    let max = lane_max(logits);
    if max == f32::NEG_INFINITY {
        return None;
    }
    // `>=` rather than `==` so a `+inf` logit matches when the maximum is its stand-in
    // `f32::MAX`; nothing else can exceed the maximum, and NaN never matches.
    let arg = logits.iter().position(|&x| x >= max).unwrap_or(0);
    // NaN and -inf give exactly 0 and +inf gives 1 (see `exp_neg`), so no sanitising here.
    let sum = blocked_sum(logits, |x| exp_neg(x - max));
    // The maximum contributes exactly 1, so the sum is >= 1 and the log is finite.
    Some((max, arg as u32, max + (sum as f32).ln()))
}

/// Descending by logit, then ascending by id: a total order, so selections are deterministic.
#[inline(always)]
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The `n` largest sanitised logits as `(logit, token)`, descending, ties to the lower id,
/// `-inf` excluded, written into `out`. Keeps a small sorted buffer instead of sorting the
/// vocabulary, and skips whole blocks whose maximum cannot enter it.
fn top_n_into(logits: &[f32], n: usize, out: &mut Vec<(f32, u32)>) {
    out.clear();
    if n == 0 {
        return;
    }
    const SKIP: usize = 64;
    for (b, block) in logits.chunks(SKIP).enumerate() {
        if out.len() == n && lane_max(block) <= out[n - 1].0 {
            continue;
        }
        for (j, &x) in block.iter().enumerate() {
            let x = clean(x);
            if x == f32::NEG_INFINITY || (out.len() == n && x <= out[n - 1].0) {
                continue;
            }
            // Ids arrive in increasing order, so equal values go after the ones already there.
            let pos = out.partition_point(|&(v, _)| v >= x);
            out.insert(pos, (x, (b * SKIP + j) as u32));
            out.truncate(n);
        }
    }
}

/// The reported alternatives: top `n` raw logprobs.
fn top_logprobs(logits: &[f32], n: usize, lse: f32) -> Vec<(u32, f32)> {
    let mut top = Vec::with_capacity(n + 1);
    top_n_into(logits, n, &mut top);
    top.into_iter().map(|(x, id)| (id, x - lse)).collect()
}

/// The raw logprob of a given token (prompt scoring) and the `top_n` most likely tokens, with
/// the same sanitising as [`Sampler::sample`].
pub fn score(logits: &[f32], token: u32, top_n: usize) -> Sampled {
    let Some((_, _, lse)) = max_argmax_lse(logits) else {
        return Sampled {
            token,
            logprob: f32::NEG_INFINITY,
            top: Vec::new(),
        };
    };
    let logprob = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&x| clean(x) - lse);
    Sampled {
        token,
        logprob,
        top: top_logprobs(logits, top_n, lse),
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::for_prompt(params, &[])
    }

    /// A sampler for a sequence with this `prompt` (which a repetition penalty covers).
    pub fn for_prompt(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            adjuster: Adjuster::new(params.adjust.clone(), prompt),
            constraint: None,
            params,
            rng,
            pairs: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// Constrains every later choice to `constraint` (JSON mode).
    pub fn constrain(&mut self, constraint: JsonConstraint) {
        self.constraint = Some(constraint);
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// `logits`: raw model logits for one position (vocab-sized). Returns the chosen token with
    /// its logprob under the model's raw distribution and, if `top_logprobs > 0`, the top-n
    /// `(token, logprob)` pairs sorted descending. See the module docs for the order of steps.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let Some((max, argmax, lse)) = max_argmax_lse(logits) else {
            return Sampled {
                token: 0,
                logprob: f32::NEG_INFINITY,
                top: Vec::new(),
            };
        };
        let top = top_logprobs(logits, self.params.top_logprobs, lse);
        let token = if let Some(mut c) = self.constraint.take() {
            let token = self.choose_constrained(logits, argmax, &c);
            c.accept(token);
            self.constraint = Some(c);
            token
        } else if self.adjuster.is_noop() {
            self.choose(logits, max, argmax)
        } else {
            let adjusted = self.adjuster.apply(logits);
            let token = match max_argmax_lse(&adjusted) {
                Some((max, argmax, _)) => self.choose(&adjusted, max, argmax),
                None => argmax,
            };
            self.adjuster.give_back(adjusted);
            token
        };
        self.adjuster.record(token);
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| clean(x) - lse);
        Sampled {
            token,
            logprob,
            top,
        }
    }

    /// JSON mode: the end-of-sequence token once the object is complete; otherwise the usual
    /// choice (after any adjustments), redrawn without each token the constraint refuses. After
    /// [`REDRAWS`] refusals every token is checked at once instead.
    fn choose_constrained(&mut self, logits: &[f32], argmax: u32, c: &JsonConstraint) -> u32 {
        if c.finished() {
            if let Some(eos) = c.eos() {
                return eos;
            }
        }
        let mut buf = if self.adjuster.is_noop() {
            logits.to_vec()
        } else {
            self.adjuster.apply(logits)
        };
        let mut chosen = None;
        for _ in 0..REDRAWS {
            let Some((max, top, _)) = max_argmax_lse(&buf) else {
                break;
            };
            let t = self.choose(&buf, max, top);
            if c.allows(t) {
                chosen = Some(t);
                break;
            }
            if let Some(x) = buf.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        let token = chosen.unwrap_or_else(|| {
            for (t, x) in buf.iter_mut().enumerate() {
                if *x > f32::NEG_INFINITY && !c.allows(t as u32) {
                    *x = f32::NEG_INFINITY;
                }
            }
            match max_argmax_lse(&buf) {
                Some((max, top, _)) => self.choose(&buf, max, top),
                // Nothing can continue the text: end if possible, else the raw argmax.
                None => c.eos().unwrap_or(argmax),
            }
        });
        if !self.adjuster.is_noop() {
            self.adjuster.give_back(buf);
        }
        token
    }

    /// Steps 3–6 on `logits` (raw or adjusted), whose maximum and argmax are given.
    fn choose(&mut self, logits: &[f32], max: f32, argmax: u32) -> u32 {
        if self.params.is_greedy() {
            argmax
        } else {
            let kept = self.filter(logits, max);
            self.draw(max, &kept).unwrap_or(argmax)
        }
    }

    /// Steps 3–5: decide which tokens stay in the running and their total weight.
    fn filter(&mut self, logits: &[f32], max: f32) -> Kept {
        let kept = self.truncate(logits, max);
        match self.params.min_p {
            Some(min_p) => self.apply_min_p(kept, max, min_p),
            None => kept,
        }
    }

    /// Min-p, last: keeps the survivors whose weight (relative to the maximum's, which is 1
    /// and always kept) reaches `min_p`, i.e. logit ≥ max + T·ln(min_p).
    fn apply_min_p(&mut self, kept: Kept, max: f32, min_p: f32) -> Kept {
        let inv_t = 1.0 / self.params.temperature;
        match kept {
            Kept::All { .. } => {
                for w in &mut self.weights {
                    if *w < min_p {
                        *w = 0.0;
                    }
                }
                Kept::All {
                    total: blocked_sum(&self.weights, |w| w),
                }
            }
            Kept::Pairs { len, .. } => {
                let floor = max + self.params.temperature * min_p.ln();
                let mut n = 0;
                for i in 0..len {
                    if self.pairs[i].0 >= floor {
                        self.pairs.swap(n, i);
                        n += 1;
                    }
                }
                let total = self.pairs[..n]
                    .iter()
                    .map(|&(x, _)| f64::from(exp_neg((x - max) * inv_t)))
                    .sum();
                Kept::Pairs { len: n, total }
            }
        }
    }

    /// Temperature, top-k and top-p: which tokens stay in the running, and their total weight.
    fn truncate(&mut self, logits: &[f32], max: f32) -> Kept {
        let temperature = self.params.temperature;
        let inv_t = 1.0 / temperature;
        let weight = move |x: f32| exp_neg((x - max) * inv_t);
        let top_k = self.params.top_k.filter(|&k| k < logits.len());
        let top_p = self.params.top_p.filter(|&p| p < 1.0);
        let pairs = &mut self.pairs;

        match (top_k, top_p) {
            (None, None) => {
                self.weights.clear();
                self.weights.extend(logits.iter().map(|&x| weight(x)));
                let total = blocked_sum(&self.weights, |w| w);
                return Kept::All { total };
            }
            (Some(k), _) if k <= SMALL_K => top_n_into(logits, k, pairs),
            (Some(k), _) => {
                pairs.clear();
                pairs.extend(finite_pairs(logits, f32::NEG_INFINITY));
                if k < pairs.len() {
                    pairs.select_nth_unstable_by(k - 1, by_logit_desc);
                    pairs.truncate(k);
                }
            }
            (None, Some(p)) => {
                // Any token lighter than tau = (1-p) Z / (2V) is outside the nucleus: all of
                // them together weigh under (1-p) Z / 2, so the heavier ones alone already
                // reach p Z. Dropping them first makes the nucleus search small whenever the
                // distribution is peaked (the margin of 2 absorbs rounding).
                let z = blocked_sum(logits, weight);
                let tau = (1.0 - f64::from(p)) * z / (2.0 * logits.len() as f64);
                let threshold = max + temperature * (tau as f32).ln();
                pairs.clear();
                pairs.extend(finite_pairs(logits, threshold));
                let target = f64::from(p) * z;
                return nucleus(pairs, target, weight);
            }
        }

        match top_p {
            Some(p) => {
                let total: f64 = pairs.iter().map(|&(x, _)| f64::from(weight(x))).sum();
                nucleus(pairs, f64::from(p) * total, weight)
            }
            None => {
                let total = pairs.iter().map(|&(x, _)| f64::from(weight(x))).sum();
                Kept::Pairs {
                    len: pairs.len(),
                    total,
                }
            }
        }
    }

    /// Step 6: one uniform draw over the kept weights. `None` only if nothing has weight
    /// (cannot happen while the maximum is kept, as it has weight 1); the caller falls back to
    /// the argmax.
    fn draw(&mut self, max: f32, kept: &Kept) -> Option<u32> {
        let u: f64 = self.rng.random();
        match *kept {
            Kept::All { total } => draw_blocked(&self.weights, u * total),
            Kept::Pairs { len, total } => {
                let inv_t = 1.0 / self.params.temperature;
                let weights = self.pairs[..len]
                    .iter()
                    .map(|&(x, id)| (id, f64::from(exp_neg((x - max) * inv_t))));
                draw_linear(weights, u * total)
            }
        }
    }

    /// The normalised distribution the draw would use, sorted by token id (tests only).
    #[cfg(test)]
    fn distribution(&mut self, logits: &[f32]) -> Vec<(u32, f64)> {
        let Some((max, _, _)) = max_argmax_lse(logits) else {
            return Vec::new();
        };
        let inv_t = 1.0 / self.params.temperature;
        let mut out: Vec<(u32, f64)> = match self.filter(logits, max) {
            Kept::All { total } => self
                .weights
                .iter()
                .enumerate()
                .filter(|(_, &w)| w > 0.0)
                .map(|(i, &w)| (i as u32, f64::from(w) / total))
                .collect(),
            Kept::Pairs { len, total } => self.pairs[..len]
                .iter()
                .map(|&(x, i)| (i, f64::from(exp_neg((x - max) * inv_t)) / total))
                .collect(),
        };
        out.sort_by_key(|&(i, _)| i);
        out
    }
}

/// `(logit, token)` for every token at or above `threshold` that can be drawn at all.
fn finite_pairs(logits: &[f32], threshold: f32) -> impl Iterator<Item = (f32, u32)> + '_ {
    logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (clean(x), i as u32))
        .filter(move |&(x, _)| x > f32::NEG_INFINITY && x >= threshold)
}

/// Step 5 over `pairs`: keep the best tokens up to and including the one whose cumulative
/// weight, in descending order, first reaches `target`. Bisects with partial selections
/// (each halves the range that holds that boundary token, so the work is linear) and sorts
/// only the last small range; the kept tokens need no order for the draw.
fn nucleus(pairs: &mut [(f32, u32)], target: f64, weight: impl Fn(f32) -> f32) -> Kept {
    let mass = |s: &[(f32, u32)]| s.iter().map(|&(x, _)| f64::from(weight(x))).sum::<f64>();
    // Invariant: pairs[..lo] are the best `lo` tokens and weigh `below` < target; the
    // boundary token is in pairs[lo..hi], and everything from `hi` on is worse than it.
    let (mut lo, mut hi) = (0, pairs.len());
    let mut below = 0.0f64;
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        pairs[lo..hi].select_nth_unstable_by(mid - lo, by_logit_desc);
        let upper = mass(&pairs[lo..mid]);
        if below + upper >= target {
            hi = mid;
        } else {
            below += upper;
            lo = mid;
        }
    }
    pairs[lo..hi].sort_unstable_by(by_logit_desc);
    // If rounding keeps the running sum just under the target, the whole range stays.
    let mut len = hi;
    for (i, &(x, _)) in pairs.iter().enumerate().take(hi).skip(lo) {
        below += f64::from(weight(x));
        if below >= target {
            len = i + 1;
            break;
        }
    }
    // Totalled in the order the draw walks, so the draw's target always falls inside.
    let total = mass(&pairs[..len]);
    Kept::Pairs { len, total }
}

/// Categorical draw: the first token whose running weight exceeds `target`, skipping
/// weightless ones; the last token with weight if rounding leaves `target` unreached.
fn draw_linear(weights: impl Iterator<Item = (u32, f64)>, target: f64) -> Option<u32> {
    let mut acc = 0.0f64;
    let mut last = None;
    for (id, w) in weights {
        if w <= 0.0 {
            continue;
        }
        acc += w;
        last = Some(id);
        if target < acc {
            return Some(id);
        }
    }
    last
}

/// Categorical draw over per-token weights whose total was taken by `blocked_sum`: skip whole
/// blocks by their sums (in the same order, so `target` falls in the block it should), then
/// walk the one block it falls in.
fn draw_blocked(weights: &[f32], target: f64) -> Option<u32> {
    let mut acc = 0.0f64;
    let mut last = None;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let sum = f64::from(lane_sum(block, &|w| w));
        if sum <= 0.0 {
            continue;
        }
        if target < acc + sum {
            let ids = (b * BLOCK) as u32..;
            let found = draw_linear(
                ids.zip(block).map(|(id, &w)| (id, f64::from(w))),
                target - acc,
            );
            // Within the block, sequential rounding may differ from the lane sum.
            return found;
        }
        acc += sum;
        last = Some(b);
    }
    // Rounding at the very end: the last token with weight.
    let b = last?;
    let block = weights.chunks(BLOCK).nth(b)?;
    let j = block.iter().rposition(|&w| w > 0.0)?;
    Some((b * BLOCK + j) as u32)
}

#[cfg(test)]
mod tests;
