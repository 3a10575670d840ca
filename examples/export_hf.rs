//! Exports a GGUF model as a Hugging Face directory (f32 safetensors, config, tokenizer) that
//! `transformers` loads offline: `cargo run --release --example export_hf -- [MODEL.gguf] OUT_DIR`.
//! Without MODEL, the default model is fetched into adapterd's cache (or found there).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, out) = match args.as_slice() {
        [out] => (adapterd::model_fetch::ensure_default_model(None)?, out),
        [model, out] => (PathBuf::from(model), out),
        _ => anyhow::bail!("usage: export_hf [MODEL.gguf] OUT_DIR"),
    };
    adapterd::engine::model::export::export_hf_dir(&model, std::path::Path::new(out))?;
    println!("wrote {out} from {}", model.display());
    Ok(())
}
