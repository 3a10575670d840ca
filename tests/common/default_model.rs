//! The real default model (SmolLM2-135M-Instruct Q4_1, fetched once into the cache by the
//! project's own fetcher) for the tests that run it: its path, its GGUF file and the f32 Hugging
//! Face copy adapterd exports from it loaded side by side, and greedy decoding straight on a
//! model.

use std::path::PathBuf;
use std::sync::Arc;

use adapterd::engine::lora::LoraAdapter;
use adapterd::engine::model::{Llama, SeqCache, SeqInput};
use adapterd::engine::tokenizer::Tokenizer;
use candle_core::Device;

pub fn default_model() -> PathBuf {
    adapterd::model_fetch::ensure_default_model(None).expect("fetch the default model")
}

pub struct Models {
    pub gguf: Llama,
    pub f32: Llama,
    /// The GGUF file's tokenizer.
    pub tokenizer: Tokenizer,
}

/// The default model as loaded from its GGUF file, and the f32 Hugging Face copy adapterd
/// exports from it. The exporter un-permutes q/k with tensor reshapes, independently of the
/// loader's byte moves, so comparing the two also checks one against the other.
pub fn gguf_and_f32_copy() -> Models {
    let gguf = default_model();
    let dev = Device::Cpu;
    let q = adapterd::engine::load_model(&gguf, &dev).expect("load the GGUF");
    let dir = tempfile::tempdir().unwrap();
    adapterd::engine::model::export::export_hf_dir(&gguf, dir.path()).expect("export");
    // The loader copies the weights out of the files, so the directory can go right away.
    let hf = adapterd::engine::load_model(dir.path(), &dev).expect("load the f32 copy");
    Models {
        gguf: q.model,
        f32: hf.model,
        tokenizer: q.tokenizer,
    }
}

/// Greedy decoding with the KV cache, as serving does it (one prefill, then one token per
/// step): each step's chosen token and its log-probability.
pub fn greedy(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    adapter: Option<&Arc<LoraAdapter>>,
) -> (Vec<u32>, Vec<f32>) {
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let mut input = prompt.to_vec();
    let (mut toks, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let logits = model
            .forward(&mut [SeqInput {
                tokens: &input,
                cache: &mut cache,
                all_logits: false,
                adapter: adapter.cloned(),
            }])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        let (best, max) =
            logits
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (i, v)| if v > a.1 { (i, v) } else { a },
                );
        let lse = max + logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        toks.push(best as u32);
        lps.push(max - lse);
        input = vec![best as u32];
    }
    (toks, lps)
}
