//! Writes a random LoRA adapter in Hugging Face PEFT format for a base model (all seven
//! projections of every layer), for trying the adapter API by hand:
//! `cargo run --release --example make_adapter -- MODEL OUT_DIR [RANK] [SEED]`.
//! The benchmark harness makes the same adapters itself (`adapterd::bench::adapters`).

use adapterd::bench::adapters::{model_config, write_random_adapter};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(out)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: make_adapter MODEL OUT_DIR [RANK] [SEED]");
    };
    let rank: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let seed: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let model = std::path::Path::new(model);
    let cfg = model_config(model)?;
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_random_adapter(&cfg, &name, rank, seed, std::path::Path::new(out))?;
    println!("{out}");
    Ok(())
}
