//! Model-level speed: prefill and decode tokens/s of the forward alone (no HTTP, no sampling),
//! for batch sizes 1, 4, 8. `cargo run --release --example forward_speed -- MODEL.gguf`

use adapterd::engine::model::load::{load_gguf, load_hf_dir, read_gguf_header};
use adapterd::engine::model::{SeqCache, SeqInput};
use candle_core::Device;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // Run inside the rayon pool, as the engine thread does, so this thread works instead of waiting.
    rayon::ThreadPoolBuilder::new().build()?.install(run)
}

fn run() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: forward_speed MODEL"))?;
    let path = std::path::Path::new(&path);
    let model = if path.is_dir() {
        load_hf_dir(path, &Device::Cpu)?
    } else {
        let (ct, mut f) = read_gguf_header(path)?;
        load_gguf(path, &ct, &mut f, &Device::Cpu)?
    };
    let layers = model.cfg.num_layers;
    // Prefill: one 128-token prompt.
    let prompt: Vec<u32> = (0..128u32).map(|i| 100 + i * 7).collect();
    let mut cache = SeqCache::new(layers);
    let t = Instant::now();
    model.forward(&mut [SeqInput {
        tokens: &prompt,
        cache: &mut cache,
        all_logits: false,
        adapter: None,
    }])?;
    println!(
        "prefill 128 tokens: {:.1} tok/s",
        128.0 / t.elapsed().as_secs_f64()
    );
    for batch in [1usize, 4, 8, 16] {
        let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(layers)).collect();
        // A short prompt per sequence first.
        for c in caches.iter_mut() {
            model.forward(&mut [SeqInput {
                tokens: &prompt[..16],
                cache: c,
                all_logits: false,
                adapter: None,
            }])?;
        }
        let steps = 32;
        let tok = [200u32];
        let t = Instant::now();
        for _ in 0..steps {
            let mut inputs: Vec<SeqInput> = caches
                .iter_mut()
                .map(|c| SeqInput {
                    tokens: &tok,
                    cache: c,
                    all_logits: false,
                    adapter: None,
                })
                .collect();
            model.forward(&mut inputs)?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "decode batch {batch:2}: {:.1} tok/s aggregate, {:.1} ms/step",
            (steps * batch) as f64 / secs,
            secs * 1000.0 / steps as f64
        );
    }
    Ok(())
}
