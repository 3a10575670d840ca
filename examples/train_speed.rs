//! LoRA SFT training throughput of the trainer alone (no HTTP, no database): tokens/s for
//! `--batch` sequences of `--seq-len` tokens, rank 16 on all seven projections, loss on every
//! token — the same workload as scripts/bench_train_torch.py.
//! `cargo run --release --example train_speed -- MODEL [seq_len] [batch] [steps]`

use std::sync::Arc;

use adapterd::engine::train::data::{Examples, Method, SftExample};
use adapterd::engine::train::hyper::{HyperLimits, HyperRequest};
use adapterd::engine::train::Trainer;

fn main() -> anyhow::Result<()> {
    rayon::ThreadPoolBuilder::new().build()?.install(run)
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: train_speed MODEL [seq_len] [batch] [steps]"))?;
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (seq_len, batch, steps) = (arg(2, 128), arg(3, 8), arg(4, 5));
    let loaded =
        adapterd::engine::load_model(std::path::Path::new(path), &candle_core::Device::Cpu)?;
    // Deterministic text-like ids spread over the vocabulary, one distinct sequence per row.
    let examples: Vec<SftExample> = (0..batch)
        .map(|b| {
            let tokens: Vec<u32> = (0..seq_len)
                .map(|i| ((b * 7919 + i * 104_729) % 40_000 + 100) as u32)
                .collect();
            let mut targets = vec![true; seq_len];
            targets[0] = false;
            SftExample { tokens, targets }
        })
        .collect();
    let hyper = HyperRequest {
        rank: Some(16),
        alpha: Some(32.0),
        batch_size: Some(batch),
        max_steps: Some(steps + 1),
        learning_rate: Some(1e-4),
        max_seq_len: Some(seq_len),
        ..Default::default()
    }
    .resolve(
        Method::Sft,
        &HyperLimits {
            max_rank: 64,
            max_seq_len: 8192,
            max_steps: 1_000_000,
        },
    )?;
    let mut t = Trainer::new(Arc::new(loaded.model), hyper, Examples::Sft(examples))?;
    let warm = t.step()?;
    println!("warmup step: {:.2}s loss {:.3}", warm.seconds, warm.loss);
    let mut secs = Vec::new();
    while !t.is_done() {
        let r = t.step()?;
        println!(
            "step {}: {:.2}s loss {:.3} {:.0} tok/s",
            r.step, r.seconds, r.loss, r.tokens_per_s
        );
        secs.push(r.seconds);
    }
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    println!(
        "{{\"tokens_per_s\": {:.1}, \"step_seconds_median\": {:.3}, \"seq_len\": {seq_len}, \"batch\": {batch}, \"threads\": {}}}",
        (seq_len * batch) as f64 / median,
        median,
        rayon::current_num_threads()
    );
    Ok(())
}
