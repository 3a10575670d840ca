//! Training hyperparameters: what a job may set, the defaults a user can start from on a
//! ~100M–1B base on CPU, and their validation (each failure names the field).

use serde::{Deserialize, Serialize};

use super::data::Method;
use crate::engine::lora::Module;

/// How the learning rate decays after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// Hyperparameters as a request gives them; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperRequest {
    pub epochs: Option<usize>,
    pub max_steps: Option<usize>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<usize>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub target_modules: Option<Vec<String>>,
    pub use_rslora: Option<bool>,
    pub max_seq_len: Option<usize>,
    pub beta: Option<f64>,
    pub seed: Option<u64>,
    pub checkpoint_every: Option<usize>,
    pub warmup_steps: Option<usize>,
    pub lr_scheduler: Option<Schedule>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
}

/// Resolved hyperparameters: defaults filled in, validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub method: Method,
    pub epochs: usize,
    /// Overrides `epochs` when set: exactly this many optimizer steps.
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    /// Examples (SFT) or preference pairs (DPO) per optimizer step; micro-batches accumulate.
    pub batch_size: usize,
    pub rank: usize,
    pub alpha: f64,
    /// PEFT names, in the canonical q, k, v, o, gate, up, down order.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub max_seq_len: usize,
    /// DPO temperature β.
    pub beta: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Steps of linear warmup; default 10% of the total steps.
    pub warmup_steps: Option<usize>,
    pub lr_scheduler: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
}

/// A hyperparameter that failed validation: the field and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`hyperparameters.{field}`: {message}")]
pub struct HyperError {
    pub field: &'static str,
    pub message: String,
}

/// Upper bounds a deployment sets (ranks beyond the adapter store's limit could never be saved).
#[derive(Clone, Copy, Debug)]
pub struct HyperLimits {
    pub max_rank: usize,
    pub max_seq_len: usize,
    pub max_steps: usize,
}

fn err(field: &'static str, message: impl Into<String>) -> HyperError {
    HyperError {
        field,
        message: message.into(),
    }
}

impl HyperRequest {
    /// Fills defaults for `method` and validates against `limits`.
    pub fn resolve(&self, method: Method, limits: &HyperLimits) -> Result<Hyper, HyperError> {
        let default_lr = match method {
            Method::Sft => 2e-4,
            Method::Dpo => 5e-5,
        };
        let h = Hyper {
            method,
            epochs: self.epochs.unwrap_or(3),
            max_steps: self.max_steps,
            learning_rate: self.learning_rate.unwrap_or(default_lr),
            batch_size: self.batch_size.unwrap_or(8),
            rank: self.rank.unwrap_or(16),
            alpha: self.alpha.unwrap_or(32.0),
            target_modules: canonical_modules(self.target_modules.as_deref())?,
            use_rslora: self.use_rslora.unwrap_or(false),
            max_seq_len: self.max_seq_len.unwrap_or(512.min(limits.max_seq_len)),
            beta: self.beta.unwrap_or(0.1),
            seed: self.seed.unwrap_or(42),
            checkpoint_every: self.checkpoint_every.unwrap_or(50),
            warmup_steps: self.warmup_steps,
            lr_scheduler: self.lr_scheduler.unwrap_or(Schedule::Linear),
            weight_decay: self.weight_decay.unwrap_or(0.0),
            max_grad_norm: self.max_grad_norm.unwrap_or(1.0),
        };
        let range = |field, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(err(
                    field,
                    format!("must be between {lo} and {hi} (got {v})"),
                ))
            }
        };
        range("epochs", h.epochs, 1, 1000)?;
        if let Some(s) = h.max_steps {
            range("max_steps", s, 1, limits.max_steps)?;
        }
        range("batch_size", h.batch_size, 1, 1024)?;
        range("rank", h.rank, 1, limits.max_rank)?;
        range("max_seq_len", h.max_seq_len, 2, limits.max_seq_len)?;
        range("checkpoint_every", h.checkpoint_every, 1, 1_000_000)?;
        let positive = |field, v: f64, hi: f64| {
            if v.is_finite() && v > 0.0 && v <= hi {
                Ok(())
            } else {
                Err(err(field, format!("must be > 0 and <= {hi} (got {v})")))
            }
        };
        positive("learning_rate", h.learning_rate, 1.0)?;
        positive("alpha", h.alpha, 1e6)?;
        positive("beta", h.beta, 100.0)?;
        positive("max_grad_norm", h.max_grad_norm, 1e6)?;
        if !(h.weight_decay.is_finite() && (0.0..=1.0).contains(&h.weight_decay)) {
            return Err(err("weight_decay", "must be between 0 and 1"));
        }
        if method == Method::Sft && self.beta.is_some() {
            return Err(err("beta", "applies to DPO jobs only"));
        }
        Ok(h)
    }
}

/// Validates module names and orders them canonically; default: all seven projections.
fn canonical_modules(names: Option<&[String]>) -> Result<Vec<String>, HyperError> {
    let Some(names) = names else {
        return Ok(Module::ALL.iter().map(|m| m.hf_name().to_owned()).collect());
    };
    if names.is_empty() {
        return Err(err("target_modules", "must name at least one module"));
    }
    let mut picked = [false; 7];
    for n in names {
        match Module::from_hf_name(n) {
            Some(m) => picked[m.index()] = true,
            None => {
                return Err(err(
                    "target_modules",
                    format!(
                        "unknown module {:?}; allowed: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
                        n.chars().take(40).collect::<String>()
                    ),
                ))
            }
        }
    }
    Ok(Module::ALL
        .iter()
        .filter(|m| picked[m.index()])
        .map(|m| m.hf_name().to_owned())
        .collect())
}

impl Hyper {
    pub fn modules(&self) -> Vec<Module> {
        self.target_modules
            .iter()
            .filter_map(|n| Module::from_hf_name(n))
            .collect()
    }

    /// LoRA scale: alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Optimizer steps for `n_examples`.
    pub fn total_steps(&self, n_examples: usize) -> usize {
        match self.max_steps {
            Some(s) => s,
            None => self.epochs * n_examples.div_ceil(self.batch_size).max(1),
        }
    }

    pub fn warmup(&self, total: usize) -> usize {
        self.warmup_steps.unwrap_or(total / 10).min(total)
    }

    /// Learning rate for optimizer step `step` (0-based) of `total`: linear warmup to the peak
    /// over `warmup` steps (the first step already at peak/warmup, not zero), then the decay.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = self.warmup(total);
        let peak = self.learning_rate;
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
        match self.lr_scheduler {
            Schedule::Constant => peak,
            Schedule::Linear => peak * (1.0 - progress),
            Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HyperLimits = HyperLimits {
        max_rank: 64,
        max_seq_len: 4096,
        max_steps: 100_000,
    };

    #[test]
    fn defaults_are_filled_and_modules_ordered() {
        let h = HyperRequest::default()
            .resolve(Method::Sft, &LIMITS)
            .unwrap();
        assert_eq!(h.rank, 16);
        assert_eq!(h.target_modules.len(), 7);
        let r = HyperRequest {
            target_modules: Some(vec!["v_proj".into(), "q_proj".into(), "q_proj".into()]),
            ..Default::default()
        };
        let h = r.resolve(Method::Dpo, &LIMITS).unwrap();
        assert_eq!(h.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(h.learning_rate, 5e-5);
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let cases: Vec<(HyperRequest, &str)> = vec![
            (
                HyperRequest {
                    rank: Some(0),
                    ..Default::default()
                },
                "rank",
            ),
            (
                HyperRequest {
                    rank: Some(65),
                    ..Default::default()
                },
                "rank",
            ),
            (
                HyperRequest {
                    learning_rate: Some(f64::NAN),
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                HyperRequest {
                    learning_rate: Some(-1.0),
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                HyperRequest {
                    batch_size: Some(0),
                    ..Default::default()
                },
                "batch_size",
            ),
            (
                HyperRequest {
                    max_seq_len: Some(1),
                    ..Default::default()
                },
                "max_seq_len",
            ),
            (
                HyperRequest {
                    target_modules: Some(vec!["lm_head".into()]),
                    ..Default::default()
                },
                "target_modules",
            ),
            (
                HyperRequest {
                    target_modules: Some(vec![]),
                    ..Default::default()
                },
                "target_modules",
            ),
            (
                HyperRequest {
                    beta: Some(0.5),
                    ..Default::default()
                },
                "beta",
            ),
            (
                HyperRequest {
                    max_steps: Some(0),
                    ..Default::default()
                },
                "max_steps",
            ),
        ];
        for (req, field) in cases {
            let e = req.resolve(Method::Sft, &LIMITS).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let h = HyperRequest {
            learning_rate: Some(1.0),
            warmup_steps: Some(2),
            ..Default::default()
        }
        .resolve(Method::Sft, &LIMITS)
        .unwrap();
        let lrs: Vec<f64> = (0..6).map(|s| h.lr_at(s, 6)).collect();
        // warmup 0.5, 1.0; then linear from 1 towards 0 over the remaining 4 steps.
        assert_eq!(lrs, vec![0.5, 1.0, 1.0, 0.75, 0.5, 0.25]);
        let cos = Hyper {
            lr_scheduler: Schedule::Cosine,
            ..h.clone()
        };
        assert!((cos.lr_at(4, 6) - 0.5).abs() < 1e-12);
        assert_eq!(h.total_steps(10), 3 * 2); // 3 epochs of ceil(10 / 8)
        let scaled = Hyper {
            use_rslora: true,
            rank: 16,
            alpha: 32.0,
            ..h
        };
        assert_eq!(scaled.scale(), 8.0);
    }
}
