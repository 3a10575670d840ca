//! `ModelConfig`: the shape of a llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`. Architectures other than llama, mistral and qwen2 are refused here, by name.

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use super::ModelError;

/// Architectures whose forward is the llama one (qwen2 adds q/k/v biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    fn parse(name: &str) -> Result<Self, ModelError> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Ok(Self::Llama),
            "mistral" | "mistralforcausallm" => Ok(Self::Mistral),
            "qwen2" | "qwen2forcausallm" => Ok(Self::Qwen2),
            other => Err(ModelError::Unsupported(format!(
                "architecture `{other}` is not supported (supported: llama, mistral, qwen2)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    /// Whether q/k/v projections carry a bias.
    pub fn attention_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Checks the relations the forward relies on, so a bad file fails at load, not mid-request.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return bad("num_heads, num_kv_heads and num_layers must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad("hidden_size, intermediate_size and vocab_size must be positive".into());
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        Ok(())
    }

    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, ModelError> {
        let get = |key: &str| {
            ct.metadata
                .get(key)
                .ok_or_else(|| ModelError::InvalidConfig(format!("GGUF metadata lacks `{key}`")))
        };
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|e| ModelError::InvalidConfig(format!("general.architecture: {e}")))?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let p = arch_name.as_str();
        let u = |key: &str| -> Result<usize, ModelError> {
            let full = format!("{p}.{key}");
            let v = get(&full)?;
            v.to_u32()
                .map(|v| v as usize)
                .or_else(|_| v.to_u64().map(|v| v as usize))
                .map_err(|e| ModelError::InvalidConfig(format!("{full}: {e}")))
        };
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads = u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = u("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let rope_theta = ct
            .metadata
            .get(&format!("{p}.rope.freq_base"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let rms_norm_eps = get(&format!("{p}.attention.layer_norm_rms_epsilon"))?
            .to_f32()
            .map_err(|e| ModelError::InvalidConfig(format!("rms epsilon: {e}")))?
            as f64;
        let vocab_size = match ct.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(ModelError::InvalidConfig(
                    "GGUF has no token_embd.weight".into(),
                ))
            }
        };
        let cfg = Self {
            arch,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rope_theta,
            rms_norm_eps,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(raw.model_type.clone())
            .ok_or_else(|| ModelError::InvalidConfig("config.json names no architecture".into()))?;
        let arch = Arch::parse(&arch_name)?;
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ModelError::Unsupported(
                "config.json sets rope_scaling, which this server does not implement".into(),
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let cfg = Self {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The Hugging Face `config.json` for this shape (used to export a safetensors copy).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let arch = match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": self.arch.name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "hidden_act": "silu",
        })
    }
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f32>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

#[cfg(test)]
impl ModelConfig {
    /// A tiny llama shape for unit tests of adapters (hidden 64, 2 layers, 4 heads of 16, 2 kv
    /// heads, intermediate 128, vocabulary 100).
    pub(crate) fn tiny_for_tests() -> Self {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 100,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
        }
    }
}
