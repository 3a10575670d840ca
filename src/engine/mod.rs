//! The engine: model weights, tokenizer, sampling and the scheduler thread. Nothing here knows
//! HTTP or SQL; the API talks to it through an `EngineHandle`.

pub mod device;
pub mod json_mode;
pub mod json_schema;
pub mod logit_adjust;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod stop;
pub mod tokenizer;
pub mod train;

use std::path::Path;

use candle_core::Device;

use model::{load, Kernels, Llama, ModelError};
use tokenizer::Tokenizer;

/// A loaded base model and its tokenizer.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Served name: the file stem of a GGUF file or the directory's name.
    pub name: String,
}

/// Loads a `.gguf` file or a Hugging Face model directory onto `device`.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel, ModelError> {
    load_model_with(path, device, Kernels::for_device(device))
}

/// [`load_model`] with the kernels chosen: `Portable` on the CPU runs exactly the ops a GPU
/// would (the tests compare it with `Native`).
pub fn load_model_with(
    path: &Path,
    device: &Device,
    kernels: Kernels,
) -> Result<LoadedModel, ModelError> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned());
    let tok_err = |e: tokenizer::TokenizerError| ModelError::File {
        path: path.display().to_string(),
        message: format!("tokenizer: {e}"),
    };
    if path.is_dir() {
        let model = load::load_hf_dir(path, device, kernels)?;
        let tokenizer = Tokenizer::from_hf_dir(path).map_err(tok_err)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            name,
        })
    } else {
        let (content, mut file) = load::read_gguf_header(path)?;
        let tokenizer = Tokenizer::from_gguf(&content).map_err(tok_err)?;
        let model = load::load_gguf(path, &content, &mut file, device, kernels)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            name,
        })
    }
}
pub mod lora;
