//! Model-level speed of the forward alone (no HTTP, no sampling): prefill of a 128- and a
//! 500-token prompt, and decode steps of 1, 4, 8 and 16 sequences, for each activation
//! precision, interleaved so both see the same machine noise; medians over `--repeat` rounds.
//!
//! `cargo run --release --example forward_speed -- MODEL.gguf [--threads 2] [--repeat 3]
//!  [--precision int8,f32] [--only prefill128,prefill500,decode1,decode4,decode8,decode16]
//!  [--steps 32]`
//!
//! `decodeB@C` (any B, C ≤ 500) decodes B sequences after a C-token prompt each, for attention
//! over a long cache (e.g. `--only decode1@500,decode8@500`). A suffix `xA` gives the B
//! sequences A distinct random rank-16 adapters on all seven modules, in f16 as the server
//! holds them, sequence i on adapter i mod A (e.g. `decode8x8`, `decode8@500x8`); a further
//! `i` holds them in int8 as `adapters.precision = "int8"` does (`decode8x8i`).
//!
//! Thread settings mirror `adapterd serve --threads N`: candle's own pool at 1, our rayon pool
//! at N, and the forward runs on a thread of that pool as the engine's does.

use adapterd::engine::lora::LoraAdapter;
use adapterd::engine::model::load::{load_gguf, load_hf_dir, read_gguf_header};
use adapterd::engine::model::qmatmul::ActivationPrecision;
use adapterd::engine::model::{Kernels, Llama, SeqCache, SeqInput};
use candle_core::{DType, Device};
use std::sync::Arc;
use std::time::Instant;

struct Args {
    model: String,
    threads: usize,
    repeat: usize,
    steps: usize,
    precisions: Vec<ActivationPrecision>,
    only: Vec<String>,
}

const SCENARIOS: [&str; 6] = [
    "prefill128",
    "prefill500",
    "decode1",
    "decode4",
    "decode8",
    "decode16",
];

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        model: String::new(),
        threads: 2,
        repeat: 3,
        steps: 32,
        precisions: vec![ActivationPrecision::Int8, ActivationPrecision::F32],
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--threads" => a.threads = val()?.parse()?,
            "--repeat" => a.repeat = val()?.parse()?,
            "--steps" => a.steps = val()?.parse()?,
            "--precision" => {
                a.precisions = val()?
                    .split(',')
                    .map(|p| p.parse().map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?
            }
            "--only" => a.only = val()?.split(',').map(str::to_string).collect(),
            m if a.model.is_empty() && !m.starts_with("--") => a.model = m.to_string(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if a.model.is_empty() {
        anyhow::bail!("usage: forward_speed MODEL [--threads N] [--repeat N] [--steps N] [--precision int8,f32] [--only LIST]");
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    // As `adapterd serve` does before the first tensor op.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?
        .install(|| run(&args))
}

/// Tokens per second of one scenario, one round.
fn scenario(model: &Llama, name: &str, steps: usize) -> anyhow::Result<f64> {
    let layers = model.cfg.num_layers;
    let prompt: Vec<u32> = (0..500u32).map(|i| 100 + (i * 7) % 4000).collect();
    if let Some(n) = name.strip_prefix("prefill") {
        let n: usize = n.parse()?;
        let mut cache = SeqCache::new(layers);
        let t = Instant::now();
        model.forward(&mut [SeqInput {
            tokens: &prompt[..n],
            cache: &mut cache,
            all_logits: false,
            adapter: None,
        }])?;
        return Ok(n as f64 / t.elapsed().as_secs_f64());
    }
    // decodeB or decodeB@C: B sequences, each after a C-token prompt (16 by default).
    let spec = name
        .strip_prefix("decode")
        .ok_or_else(|| anyhow::anyhow!("unknown scenario {name}"))?;
    let (spec, adapters) = spec.split_once('x').unwrap_or((spec, "0"));
    let (batch, context) = spec.split_once('@').unwrap_or((spec, "16"));
    let (batch, context): (usize, usize) = (batch.parse()?, context.parse()?);
    let (adapters, int8) = match adapters.strip_suffix('i') {
        Some(a) => (a, true),
        None => (adapters, false),
    };
    let adapters: Vec<Arc<LoraAdapter>> = (0..adapters.parse::<u64>()?)
        .map(|seed| served_adapter(model, seed, int8))
        .collect::<anyhow::Result<_>>()?;
    let adapter_of = |i: usize| match adapters.len() {
        0 => None,
        a => Some(adapters[i % a].clone()),
    };
    anyhow::ensure!(
        (1..=prompt.len()).contains(&context),
        "context of {name} must be 1..={}",
        prompt.len()
    );
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(layers)).collect();
    // A prompt per sequence first, so attention has a cache to read.
    for (i, c) in caches.iter_mut().enumerate() {
        model.forward(&mut [SeqInput {
            tokens: &prompt[..context],
            cache: c,
            all_logits: false,
            adapter: adapter_of(i),
        }])?;
    }
    let tok = [200u32];
    let t = Instant::now();
    for _ in 0..steps {
        let mut inputs: Vec<SeqInput> = caches
            .iter_mut()
            .enumerate()
            .map(|(i, c)| SeqInput {
                tokens: &tok,
                cache: c,
                all_logits: false,
                adapter: adapter_of(i),
            })
            .collect();
        model.forward(&mut inputs)?;
    }
    Ok((steps * batch) as f64 / t.elapsed().as_secs_f64())
}

/// A random rank-16 adapter on every module, with A and B in f16 as the server parses them,
/// or in int8 as `adapters.precision = "int8"` holds them.
fn served_adapter(model: &Llama, seed: u64, int8: bool) -> anyhow::Result<Arc<LoraAdapter>> {
    let mut a = adapterd::bench::adapters::random_adapter(&model.cfg, 16, seed)?;
    for l in &mut a.layers {
        for p in l.modules.iter_mut().flatten() {
            p.a = p.a.to_dtype(DType::F16)?;
            p.b = p.b.to_dtype(DType::F16)?;
        }
    }
    if int8 {
        a = adapterd::engine::lora::int8::quantize_adapter(&a)?;
    }
    Ok(Arc::new(a))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run(args: &Args) -> anyhow::Result<()> {
    let path = std::path::Path::new(&args.model);
    let mut model = if path.is_dir() {
        load_hf_dir(path, &Device::Cpu, Kernels::Native)?
    } else {
        let (ct, mut f) = read_gguf_header(path)?;
        load_gguf(path, &ct, &mut f, &Device::Cpu, Kernels::Native)?
    };
    println!(
        "threads {} · repeat {} · steps {} · isa {:?}",
        args.threads,
        args.repeat,
        args.steps,
        adapterd::engine::model::qmatmul::Isa::detect()
    );
    for name in &args.only {
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); args.precisions.len()];
        for _ in 0..args.repeat {
            for (p, res) in args.precisions.iter().zip(results.iter_mut()) {
                model.set_activation_precision(*p);
                res.push(scenario(&model, name, args.steps)?);
            }
        }
        for (p, res) in args.precisions.iter().zip(results.iter_mut()) {
            let all: Vec<String> = res.iter().map(|v| format!("{v:.1}")).collect();
            println!(
                "{name:>10} {:>5}: median {:7.1} tok/s  (runs: {})",
                format!("{p:?}"),
                median(res),
                all.join(" ")
            );
        }
    }
    Ok(())
}
