//! TEMPORARY stub (replaced by the real module being written in parallel).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams { pub temperature: f32, pub top_k: Option<usize>, pub top_p: Option<f32>, pub seed: Option<u64>, pub top_logprobs: usize }
impl SamplingParams {
  pub fn greedy() -> Self { Self { temperature: 0.0, top_k: None, top_p: None, seed: None, top_logprobs: 0 } }
  pub fn validate(temperature: Option<f32>, top_p: Option<f32>, top_k: Option<i64>, seed: Option<u64>, top_logprobs: Option<i64>, default_temperature: f32) -> Result<Self, SamplingError> {
    let _ = (top_p, top_k, top_logprobs);
    Ok(Self { temperature: temperature.unwrap_or(default_temperature), top_k: None, top_p: None, seed, top_logprobs: 0 })
  }
}
#[derive(Debug, thiserror::Error)]
pub enum SamplingError { #[error("{field}: {message}")] OutOfRange { field: &'static str, message: String } }
pub struct Sampler { params: SamplingParams }
impl Sampler {
  pub fn new(params: SamplingParams) -> Self { Self { params } }
  pub fn sample(&mut self, logits: &[f32]) -> Sampled {
    let _ = &self.params;
    let (mut best, mut bv) = (0usize, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() { if v > bv { bv = v; best = i; } }
    let lse = bv + logits.iter().map(|v| (v - bv).exp()).sum::<f32>().ln();
    Sampled { token: best as u32, logprob: bv - lse, top: vec![] }
  }
}
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled { pub token: u32, pub logprob: f32, pub top: Vec<(u32, f32)> }
