//! What a client may do to the logits before the choice: OpenAI's presence and frequency
//! penalties over the tokens generated so far and per-token `logit_bias`, and the
//! `repetition_penalty` of Hugging Face and vLLM over the prompt and the generated tokens.
//!
//! In the order vLLM applies them, for token `j`: if `j` is in the prompt or was generated, a
//! repetition penalty `r` divides a positive logit by `r` and multiplies a negative one by `r`;
//! then, with `j` generated `c[j]` times so far, `- frequency_penalty * c[j] - presence_penalty *
//! (c[j] > 0)` (prompt tokens do not count here, as in OpenAI's API); then `+ bias[j]`. The logprobs a response reports stay
//! those of the raw model (see `sampling`), so the adjustments change which token is chosen,
//! not the scores shown for it.

use std::collections::{HashMap, HashSet};

use super::sampling::SamplingError;

/// Largest penalty magnitude a client may ask for (OpenAI's limit).
pub const MAX_PENALTY: f32 = 2.0;
/// Largest bias magnitude (OpenAI's limit: -100 bans a token, 100 forces it).
pub const MAX_BIAS: f32 = 100.0;
/// Most tokens one `logit_bias` may name (OpenAI's limit).
pub const MAX_BIASED_TOKENS: usize = 300;
/// Largest `repetition_penalty` (1 is off; 1.1–1.3 is the usual range for small models).
pub const MAX_REPETITION_PENALTY: f32 = 2.0;

/// Validated adjustments; all zero (the default) leaves the logits alone.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitAdjust {
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 = off; otherwise in `(0, 2]`.
    pub repetition_penalty: f32,
    /// `(token, bias)`, sorted by token id, one entry per token, no zero biases.
    pub bias: Vec<(u32, f32)>,
}

impl Default for LogitAdjust {
    fn default() -> Self {
        LogitAdjust {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            bias: Vec::new(),
        }
    }
}

impl LogitAdjust {
    /// `repetition_penalty`: finite, in `(0, 2]`; `None` = 1 (off).
    pub fn with_repetition_penalty(mut self, r: Option<f32>) -> Result<Self, SamplingError> {
        let r = r.unwrap_or(1.0);
        if !(r.is_finite() && r > 0.0 && r <= MAX_REPETITION_PENALTY) {
            return Err(SamplingError::out_of_range(
                "repetition_penalty",
                "a number greater than 0 and at most 2 (1 is off)",
                r,
            ));
        }
        self.repetition_penalty = r;
        Ok(self)
    }

    /// Checks raw client values: penalties finite in `[-2, 2]` (`None` = 0), biases finite in
    /// `[-100, 100]` on token ids below `vocab_size`, at most 300 of them.
    pub fn validate(
        presence_penalty: Option<f32>,
        frequency_penalty: Option<f32>,
        bias: Vec<(u32, f32)>,
        vocab_size: usize,
    ) -> Result<Self, SamplingError> {
        let penalty = |field: &'static str, v: Option<f32>| {
            let v = v.unwrap_or(0.0);
            if v.is_finite() && v.abs() <= MAX_PENALTY {
                Ok(v)
            } else {
                Err(SamplingError::out_of_range(
                    field,
                    "a finite number between -2 and 2",
                    v,
                ))
            }
        };
        let presence_penalty = penalty("presence_penalty", presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", frequency_penalty)?;
        if bias.len() > MAX_BIASED_TOKENS {
            return Err(SamplingError::out_of_range(
                "logit_bias",
                "at most 300 tokens",
                format!("{} tokens", bias.len()),
            ));
        }
        let mut sorted = Vec::with_capacity(bias.len());
        for (token, b) in bias {
            if token as usize >= vocab_size {
                return Err(SamplingError::out_of_range(
                    "logit_bias",
                    &format!("keyed by token ids below the vocabulary size {vocab_size}"),
                    token,
                ));
            }
            if !(b.is_finite() && b.abs() <= MAX_BIAS) {
                return Err(SamplingError::out_of_range(
                    "logit_bias",
                    "a map of token ids to numbers between -100 and 100",
                    format!("{b} for token {token}"),
                ));
            }
            if b != 0.0 {
                sorted.push((token, b));
            }
        }
        sorted.sort_unstable_by_key(|&(t, _)| t);
        // A JSON object cannot repeat a key in a way serde keeps, but "7" and "07" name the
        // same token: the last one wins, as it would in a map keyed by id.
        sorted.dedup_by_key(|&mut (t, _)| t);
        Ok(LogitAdjust {
            presence_penalty,
            frequency_penalty,
            repetition_penalty: 1.0,
            bias: sorted,
        })
    }

    pub fn is_noop(&self) -> bool {
        self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.bias.is_empty()
    }

    fn repeats(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    fn penalizes(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// One sequence's adjuster: the counts of the tokens it generated, the tokens it has seen
/// (prompt and generated, for the repetition penalty) and a reusable buffer.
#[derive(Debug, Default)]
pub struct Adjuster {
    params: LogitAdjust,
    counts: HashMap<u32, u32>,
    seen: HashSet<u32>,
    scratch: Vec<f32>,
}

impl Adjuster {
    /// `prompt`: the sequence's prompt tokens, which the repetition penalty covers.
    pub fn new(params: LogitAdjust, prompt: &[u32]) -> Self {
        let seen = if params.repeats() {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Adjuster {
            params,
            counts: HashMap::new(),
            seen,
            scratch: Vec::new(),
        }
    }

    pub fn is_noop(&self) -> bool {
        self.params.is_noop()
    }

    /// The adjusted logits, in a buffer this adjuster keeps (taken out so the caller can use
    /// it while borrowing itself mutably; give it back with [`Adjuster::give_back`]).
    pub fn apply(&mut self, logits: &[f32]) -> Vec<f32> {
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        out.extend_from_slice(logits);
        let p = &self.params;
        for &token in &self.seen {
            if let Some(x) = out.get_mut(token as usize) {
                *x = if *x > 0.0 {
                    *x / p.repetition_penalty
                } else {
                    *x * p.repetition_penalty
                };
            }
        }
        for (&token, &c) in &self.counts {
            if let Some(x) = out.get_mut(token as usize) {
                *x -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
        // Ids past the logits (a tokenizer larger than the model's output) are skipped.
        for &(token, b) in &p.bias {
            if let Some(x) = out.get_mut(token as usize) {
                *x += b;
            }
        }
        out
    }

    pub fn give_back(&mut self, buffer: Vec<f32>) {
        self.scratch = buffer;
    }

    /// Counts a generated token (only needed while a penalty is on).
    pub fn record(&mut self, token: u32) {
        if self.params.penalizes() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
        if self.params.repeats() {
            self.seen.insert(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_openai_and_count_only_generated_tokens() {
        let params = LogitAdjust::validate(Some(0.5), Some(0.25), vec![(3, -1.0)], 4).unwrap();
        let mut a = Adjuster::new(params, &[]);
        let logits = [1.0, 2.0, 3.0, 4.0];
        let buf = a.apply(&logits);
        assert_eq!(
            buf,
            vec![1.0, 2.0, 3.0, 3.0],
            "nothing generated yet: bias only"
        );
        a.give_back(buf);
        a.record(1);
        a.record(1);
        a.record(2);
        let buf = a.apply(&logits);
        // token 1: 2 - 0.25*2 - 0.5; token 2: 3 - 0.25 - 0.5
        assert_eq!(buf, vec![1.0, 1.0, 2.25, 3.0]);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        for (p, f, field) in [
            (Some(2.5), None, "presence_penalty"),
            (None, Some(-3.0), "frequency_penalty"),
            (Some(f32::NAN), None, "presence_penalty"),
        ] {
            let e = LogitAdjust::validate(p, f, vec![], 10).unwrap_err();
            assert_eq!(e.field(), field);
        }
        for bias in [vec![(10, 1.0)], vec![(1, 101.0)], vec![(1, f32::INFINITY)]] {
            let e = LogitAdjust::validate(None, None, bias, 10).unwrap_err();
            assert_eq!(e.field(), "logit_bias");
        }
        let many = (0..301).map(|t| (t, 1.0)).collect();
        assert!(LogitAdjust::validate(None, None, many, 1000).is_err());
        let ok = LogitAdjust::validate(Some(0.0), Some(0.0), vec![(2, 0.0)], 10).unwrap();
        assert!(ok.is_noop(), "zeros adjust nothing");
    }

    #[test]
    fn a_bias_past_the_logits_is_skipped_not_a_panic() {
        let params = LogitAdjust::validate(None, None, vec![(9, 5.0)], 10).unwrap();
        let mut a = Adjuster::new(params, &[]);
        assert_eq!(a.apply(&[0.0, 1.0]), vec![0.0, 1.0]);
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output_as_hugging_face_does() {
        let params = LogitAdjust::default()
            .with_repetition_penalty(Some(2.0))
            .unwrap();
        let mut a = Adjuster::new(params, &[0, 1]);
        let logits = [4.0, -4.0, 4.0, -4.0];
        let buf = a.apply(&logits);
        assert_eq!(buf, vec![2.0, -8.0, 4.0, -4.0], "prompt tokens 0 and 1");
        a.give_back(buf);
        a.record(3);
        assert_eq!(
            a.apply(&logits),
            vec![2.0, -8.0, 4.0, -8.0],
            "and generated 3"
        );
        for bad in [0.0, -1.0, 2.5, f32::NAN] {
            let e = LogitAdjust::default()
                .with_repetition_penalty(Some(bad))
                .unwrap_err();
            assert_eq!(e.field(), "repetition_penalty");
        }
        let off = LogitAdjust::default().with_repetition_penalty(Some(1.0));
        assert!(off.unwrap().is_noop());
    }
}
