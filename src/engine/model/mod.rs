//! The llama-family model: configuration, loading (GGUF kept quantized, or Hugging Face
//! safetensors), the ragged-batch forward and per-sequence KV caches.

pub mod cache;
pub mod config;
pub mod export;
mod fused_attention;
pub mod linear;
pub mod llama;
pub mod load;
pub mod qmatmul;

pub use cache::SeqCache;
pub use config::{Arch, ModelConfig};
pub use llama::{Kernels, Llama, SeqInput};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    #[error("model file {path}: {message}")]
    File { path: String, message: String },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}
