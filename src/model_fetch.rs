//! TEMPORARY stub (replaced by the real module being written in parallel).
use std::path::{Path, PathBuf};
pub fn ensure_default_model(_cache: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from("/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}
