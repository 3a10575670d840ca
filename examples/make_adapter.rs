//! Writes a random LoRA adapter in Hugging Face PEFT format for a base model (all seven
//! projections of every layer unless told otherwise), for benchmarks and trying the adapter API:
//! `cargo run --release --example make_adapter -- MODEL OUT_DIR [RANK] [SEED]`.

use adapterd::engine::lora::peft::save_peft;
use adapterd::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
use adapterd::engine::model::load::read_gguf_header;
use adapterd::engine::model::ModelConfig;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(out)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: make_adapter MODEL OUT_DIR [RANK] [SEED]");
    };
    let rank: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let seed: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let model = std::path::Path::new(model);
    let cfg = if model.is_dir() {
        ModelConfig::from_hf_json(&std::fs::read_to_string(model.join("config.json"))?)?
    } else {
        ModelConfig::from_gguf(&read_gguf_header(model)?.0)?
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |rows: usize, cols: usize, scale: f32| -> anyhow::Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    };
    let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let alpha = 2.0 * rank as f64;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let mut l = LayerLora::default();
        for m in Module::ALL {
            let (inp, out) = match m {
                Module::Q => (h, q),
                Module::K | Module::V => (h, kv),
                Module::O => (q, h),
                Module::Gate | Module::Up => (h, ffn),
                Module::Down => (ffn, h),
            };
            // Small B so the adapted model stays fluent, non-zero so its output changes.
            l.modules[m.index()] = Some(LoraPair {
                a: t(rank, inp, 0.05)?,
                b: t(out, rank, 0.01)?,
                scale: alpha / rank as f64,
            });
        }
        layers.push(l);
    }
    let adapter = LoraAdapter {
        layers,
        rank,
        alpha,
        use_rslora: false,
        target_modules: Module::ALL.iter().map(|m| m.hf_name().to_owned()).collect(),
        size_bytes: 0,
    };
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    save_peft(&adapter, &name, std::path::Path::new(out))?;
    println!("{out}");
    Ok(())
}
