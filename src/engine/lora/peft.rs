//! Hugging Face PEFT LoRA adapters on disk: [`parse_peft`] reads `adapter_config.json` and
//! `adapter_model.safetensors`, validates every field and tensor against the base model's
//! [`ModelConfig`] and the server's [`LoraLimits`], and yields the engine's [`LoraAdapter`];
//! [`save_peft`] writes an adapter back in the same format, so adapters trained here load in
//! PEFT, vLLM and LoRAX. Every refusal is a [`LoraError`] whose message names the field or
//! tensor at fault, because it goes back to the uploader as a 422. What does not live here:
//! the on-disk store and versions, the resident cache, and applying the deltas in the forward.
//!
//! No q/k row permutation happens here: PEFT adapters are in Hugging Face row order, and our
//! base weights are in that order too (a GGUF base's q/k rows, permuted for interleaved RoPE,
//! are un-permuted at load; candle-notes pitfall 7), so A and B are used exactly as stored.

mod config;
mod file;
mod int8_copy;
mod save;
#[cfg(test)]
mod tests;
mod weights;

use candle_core::Device;

use super::LoraAdapter;
use crate::engine::model::config::ModelConfig;

pub use file::refill_warm_buffers;
pub use file::WeightsFile;
pub(crate) use file::WARM_INT8;
pub use int8_copy::{int8_weights, parse_int8_file, Int8File};
pub use save::{save_peft, serving_weights};

/// Server-side bounds on what an uploaded adapter may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraLimits {
    /// Largest rank accepted, for `r` and every `rank_pattern` value.
    pub max_rank: usize,
    /// Largest size accepted, both for the safetensors file and for the f32 tensors in memory.
    pub max_bytes: usize,
}

impl Default for LoraLimits {
    fn default() -> Self {
        Self {
            max_rank: 64,
            max_bytes: 256 << 20,
        }
    }
}

/// Why an adapter was refused (or could not be written). Every message names the field of
/// `adapter_config.json` or the tensor of `adapter_model.safetensors` at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A field of adapter_config.json is malformed or out of range.
    #[error("adapter_config.json: `{field}`: {message}")]
    Config { field: String, message: String },
    /// A field asks for something this server does not implement (DoRA, bias training, …).
    #[error("adapter_config.json: `{field}`: {message}")]
    Unsupported { field: String, message: String },
    /// The weights file is not a well-formed safetensors file.
    #[error("adapter_model.safetensors: {message}")]
    Safetensors { message: String },
    /// A tensor is misnamed, misshaped, of the wrong dtype, or holds a non-finite value.
    #[error("adapter_model.safetensors: tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
    /// The adapter (file or f32 tensors) exceeds `LoraLimits::max_bytes`.
    #[error("adapter_model.safetensors: {what} is {bytes} bytes, over the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        max: usize,
    },
    /// Writing an adapter failed.
    #[error("writing {path}: {message}")]
    Io { path: String, message: String },
}

impl LoraError {
    /// The config field (`r`, `rank_pattern.q_proj`, …), tensor name, or file at fault.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Config { field, .. } | Self::Unsupported { field, .. } => Some(field),
            Self::Tensor { tensor, .. } => Some(tensor),
            Self::Safetensors { .. } | Self::TooLarge { .. } => Some("adapter_model.safetensors"),
            Self::Io { path, .. } => Some(path),
        }
    }

    fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    fn unsupported(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unsupported {
            field: field.into(),
            message: message.into(),
        }
    }

    fn tensor(tensor: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Tensor {
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}

/// Parses and validates a Hugging Face PEFT LoRA adapter against the base model config.
///
/// `config_json` is the content of `adapter_config.json`, `weights` that of
/// `adapter_model.safetensors`. The A/B tensors come back as f32 on `device`.
pub fn parse_peft(
    config_json: &[u8],
    weights: &[u8],
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    let cfg = config::AdapterConfig::parse(config_json, base, limits)?;
    let (layers, size_bytes) = weights::load(weights, &cfg, base, limits, device)?;
    Ok(adapter(&cfg, layers, size_bytes))
}

/// [`parse_peft`] of a weights file already in memory as a [`WeightsFile`]: the same checks
/// and refusals, but an all-f16 file on the CPU (the serving copy a cold load reads) is served
/// from the file's own memory rather than copied into fresh tensors.
pub fn parse_peft_file(
    config_json: &[u8],
    weights: &WeightsFile,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<LoraAdapter, LoraError> {
    let cfg = config::AdapterConfig::parse(config_json, base, limits)?;
    let (layers, size_bytes) = weights::load_shared(weights, &cfg, base, limits, device)?;
    Ok(adapter(&cfg, layers, size_bytes))
}

fn adapter(
    cfg: &config::AdapterConfig,
    layers: Vec<super::LayerLora>,
    size_bytes: usize,
) -> LoraAdapter {
    LoraAdapter {
        layers,
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        use_rslora: cfg.use_rslora,
        target_modules: cfg.module_names(),
        size_bytes,
        packed: Default::default(),
    }
}
