//! Times one decode step's LoRA deltas (every adapted projection of every layer, 8 adapters ×
//! 1 row each, real shapes of MODEL) per kernel, element type (f32, f16, int8) and threading,
//! the int8 pass read through packed tables and the cost of building one, then a cold
//! adapter's first request piece by piece (read, BLAKE3, parse and the whole verified load, of
//! the f32 upload and of the f16 serving copy a cold load reads, then a 16-token prefill with
//! the adapter against the base): `cargo run --release --example
//! lora_speed -- MODEL.gguf [THREADS] [REPS]`. Prints medians; compare variants within a run.

use std::time::Instant;

use std::sync::Arc;

use adapterd::adapters::{load_verified, Recorded, CONFIG_FILE, SERVING_FILE, WEIGHTS_FILE};
use adapterd::bench::adapters::{model_config, random_adapter, write_random_adapter};
use adapterd::engine::lora::apply::{add_deltas_cpu_with, add_pairs_cpu, Kernel};
use adapterd::engine::lora::int8::quantize_adapter;
use adapterd::engine::lora::packed::PackedAdapter;
use adapterd::engine::lora::peft::{
    parse_peft, parse_peft_file, serving_weights, LoraLimits, WeightsFile,
};
use adapterd::engine::lora::{LoraAdapter, Module};
use adapterd::engine::model::load::{load_gguf, read_gguf_header};
use adapterd::engine::model::{Kernels, Llama, ModelConfig, SeqCache, SeqInput};
use anyhow::Context;
use candle_core::{DType, Device, Tensor};

const ADAPTERS: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .context("usage: lora_speed MODEL [THREADS] [REPS]")?;
    let threads: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let reps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(21);
    let cfg = model_config(std::path::Path::new(model))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;

    let f32s: Vec<LoraAdapter> = (0..ADAPTERS as u64)
        .map(|s| random_adapter(&cfg, 16, s))
        .collect::<anyhow::Result<_>>()?;
    let to_f16 = |a: &LoraAdapter| -> anyhow::Result<LoraAdapter> {
        let mut h = a.clone();
        for l in &mut h.layers {
            for p in l.modules.iter_mut().flatten() {
                p.a = p.a.to_dtype(DType::F16)?;
                p.b = p.b.to_dtype(DType::F16)?;
            }
        }
        Ok(h)
    };
    let f16s: Vec<LoraAdapter> = f32s.iter().map(to_f16).collect::<anyhow::Result<_>>()?;
    let int8s: Vec<LoraAdapter> = f16s
        .iter()
        .map(|a| pool.install(|| quantize_adapter(a)))
        .collect::<candle_core::Result<_>>()?;

    let rows: Vec<[u32; 1]> = (0..ADAPTERS as u32).map(|i| [i]).collect();
    let x_of = |width: usize| {
        let v: Vec<f32> = (0..ADAPTERS * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        Tensor::from_vec(v, (ADAPTERS, width), &Device::Cpu)
    };
    let xs_hidden = x_of(cfg.hidden_size)?;
    let xs_ffn = x_of(cfg.intermediate_size)?;
    let xs_q = x_of(cfg.num_heads * cfg.head_dim)?;

    // The input rows a projection takes.
    let input = |m: Module| match m {
        Module::Down => &xs_ffn,
        Module::O => &xs_q,
        _ => &xs_hidden,
    };
    // One projection's deltas for every adapter, one row each.
    let deltas = |adapters: &[LoraAdapter],
                  layer: usize,
                  m: Module,
                  kernel: Kernel,
                  parallel: bool|
     -> anyhow::Result<()> {
        let xs = input(m);
        let groups: Vec<_> = adapters
            .iter()
            .zip(&rows)
            .filter_map(|(a, r)| Some((a.layers[layer].get(m)?, r.as_slice())))
            .collect();
        let out = groups.first().map_or(0, |(p, _)| p.b.dims()[0]);
        let ys = Tensor::zeros((ADAPTERS, out), DType::F32, &Device::Cpu)?;
        add_deltas_cpu_with(&ys, xs, &groups, kernel, parallel)?;
        Ok(())
    };
    println!(
        "{} layers, 8 adapters x 1 row, rank 16, {threads} threads, median of {reps} steps",
        cfg.num_layers
    );
    for (label, adapters, kernel, parallel) in [
        (
            "f32 portable 1 thread (before)",
            &f32s,
            Kernel::Portable,
            false,
        ),
        ("f32 avx2 1 thread", &f32s, Kernel::Avx2, false),
        ("f32 avx2 threaded", &f32s, Kernel::Avx2, true),
        ("f16 portable threaded", &f16s, Kernel::Portable, true),
        ("f16 avx2 1 thread", &f16s, Kernel::Avx2, false),
        ("f16 avx2 threaded", &f16s, Kernel::Avx2, true),
        ("int8 portable threaded", &int8s, Kernel::Portable, true),
        ("int8 avx2 1 thread", &int8s, Kernel::Avx2, false),
        ("int8 avx2 threaded", &int8s, Kernel::Avx2, true),
    ] {
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = Instant::now();
            pool.install(|| -> anyhow::Result<()> {
                for layer in 0..cfg.num_layers {
                    for m in Module::ALL {
                        deltas(adapters, layer, m, kernel, parallel)?;
                    }
                }
                Ok(())
            })?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        println!("{label:32} {:7.2} ms/step", median(times));
    }
    // How much of the threaded pass is fork-join overhead: the same work with fewer parallel
    // regions (each call sequential inside), per layer and for the whole step at once.
    {
        use rayon::prelude::*;
        let call = |layer: usize, m: Module| deltas(&f16s, layer, m, Kernel::Avx2, false);
        for (label, per_layer) in [
            ("f16 avx2, 1 region per layer", true),
            ("f16 avx2, 1 region per step", false),
        ] {
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                let t0 = Instant::now();
                pool.install(|| -> anyhow::Result<()> {
                    if per_layer {
                        for layer in 0..cfg.num_layers {
                            Module::ALL.par_iter().try_for_each(|&m| call(layer, m))?;
                        }
                    } else {
                        let all: Vec<(usize, Module)> = (0..cfg.num_layers)
                            .flat_map(|l| Module::ALL.map(|m| (l, m)))
                            .collect();
                        all.par_iter().try_for_each(|&(l, m)| call(l, m))?;
                    }
                    Ok(())
                })?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            println!("{label:32} {:7.2} ms/step", median(times));
        }
    }
    // A prompt on one adapter: 17 rows (the bench's cold prompt length) and 128 (a prompt
    // chunk, where the blocks are sixteen rows).
    for rows in [17usize, 128] {
        let prompt_rows: Vec<u32> = (0..rows as u32).collect();
        let xs_of = |width: usize| {
            let v: Vec<f32> = (0..rows * width)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            Tensor::from_vec(v, (rows, width), &Device::Cpu)
        };
        let (ph, pf, pq) = (
            xs_of(cfg.hidden_size)?,
            xs_of(cfg.intermediate_size)?,
            xs_of(cfg.num_heads * cfg.head_dim)?,
        );
        for (label, adapter, kernel, parallel) in [
            ("f32 portable 1 thread", &f32s[0], Kernel::Portable, false),
            ("f16 avx2 threaded", &f16s[0], Kernel::Avx2, true),
            ("int8 avx2 threaded", &int8s[0], Kernel::Avx2, true),
        ] {
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                let t0 = Instant::now();
                pool.install(|| -> anyhow::Result<()> {
                    for layer in &adapter.layers {
                        for m in Module::ALL {
                            let Some(p) = layer.get(m) else { continue };
                            let xs = match m {
                                Module::Down => &pf,
                                Module::O => &pq,
                                _ => &ph,
                            };
                            let ys =
                                Tensor::zeros((rows, p.b.dims()[0]), DType::F32, &Device::Cpu)?;
                            add_deltas_cpu_with(&ys, xs, &[(p, &prompt_rows)], kernel, parallel)?;
                        }
                    }
                    Ok(())
                })?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            let label = format!("prefill {rows} rows, {label}");
            println!("{label:40} {:7.2} ms", median(times));
        }
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        // Spaced like cold loads, so the warm buffer for the next copy is ready.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t0 = Instant::now();
        let copy = pool.install(|| quantize_adapter(&f16s[0]))?;
        times.push(ms(t0));
        drop(copy);
    }
    println!("{:32} {:7.2} ms", "int8 copy of one adapter", median(times));
    // The packed table a cold adapter builds on its first step (the int8 copy is one buffer).
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let table = PackedAdapter::build(&int8s[0]).context("the int8 copy packs")?;
        times.push(ms(t0));
        drop(table);
    }
    println!(
        "{:32} {:7.3} ms",
        "packed table of one adapter",
        median(times)
    );
    // The pass as the server runs it for such adapters: one table entry per projection.
    let tables: Vec<PackedAdapter> = int8s
        .iter()
        .map(|a| PackedAdapter::build(a).context("packs"))
        .collect::<anyhow::Result<_>>()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        pool.install(|| -> anyhow::Result<()> {
            let views: Vec<_> = tables.iter().map(PackedAdapter::lock).collect();
            for layer in 0..cfg.num_layers {
                for m in Module::ALL {
                    let groups: Vec<_> = views
                        .iter()
                        .zip(&rows)
                        .filter_map(|(v, r)| Some((v.pair(layer, m)?, r.as_slice())))
                        .collect();
                    let out = match m {
                        Module::Q => cfg.num_heads * cfg.head_dim,
                        Module::O | Module::Down => cfg.hidden_size,
                        Module::K | Module::V => cfg.num_kv_heads * cfg.head_dim,
                        Module::Gate | Module::Up => cfg.intermediate_size,
                    };
                    let ys = Tensor::zeros((ADAPTERS, out), DType::F32, &Device::Cpu)?;
                    add_pairs_cpu(&ys, input(m), &groups)?;
                }
            }
            Ok(())
        })?;
        times.push(ms(t0));
    }
    println!(
        "{:32} {:7.2} ms/step",
        "int8 avx2 threaded, packed",
        median(times)
    );
    pool.install(|| cold(std::path::Path::new(model), &cfg, reps))
}

/// Milliseconds since `t0`.
fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// A 16-token prefill (the bench's cold prompt length) with `adapter`, in ms.
fn prefill(model: &Llama, adapter: Option<Arc<LoraAdapter>>) -> anyhow::Result<f64> {
    let prompt: Vec<u32> = (0..16u32).map(|i| 100 + i * 7).collect();
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let t0 = Instant::now();
    model.forward(&mut [SeqInput {
        tokens: &prompt,
        cache: &mut cache,
        all_logits: false,
        adapter,
    }])?;
    Ok(ms(t0))
}

/// A cold adapter's first request, piece by piece, over `reps` fresh adapters on disk.
fn cold(path: &std::path::Path, cfg: &ModelConfig, reps: usize) -> anyhow::Result<()> {
    let (ct, mut f) = read_gguf_header(path)?;
    let model = load_gguf(path, &ct, &mut f, &Device::Cpu, Kernels::Native)?;
    let limits = LoraLimits::default();
    let scratch = tempfile::tempdir()?;
    let names = [
        "read",
        "blake3",
        "parse",
        "verified load",
        "serving copy: read",
        "serving copy: blake3",
        "serving copy: parse",
        "serving copy: verified load",
        "serving copy: parse in place",
        "prefill base",
        "prefill cold",
        "prefill warm",
    ];
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let reps = reps.min(9);
    for i in 0..reps {
        let dir = scratch.path().join(i.to_string());
        write_random_adapter(cfg, "bench-base", 16, 1000 + i as u64, &dir)?;
        // The upload, then the serving copy the registry writes beside it and a cold load
        // reads instead: read, hash, parse, and the whole verified load, each.
        let config = std::fs::read(dir.join(CONFIG_FILE))?;
        let weights = std::fs::read(dir.join(WEIGHTS_FILE))?;
        let serving = serving_weights(&parse_peft(&config, &weights, cfg, &limits, &Device::Cpu)?)?;
        std::fs::write(dir.join(SERVING_FILE), &serving)?;
        let mut adapter = None;
        for (k, file) in [WEIGHTS_FILE, SERVING_FILE].into_iter().enumerate() {
            let t0 = Instant::now();
            let weights = std::fs::read(dir.join(file))?;
            t[4 * k].push(ms(t0));
            let t0 = Instant::now();
            let mut h = blake3::Hasher::new();
            h.update(&config);
            h.update(&weights);
            let hash = h.finalize().to_hex().to_string();
            t[4 * k + 1].push(ms(t0));
            let t0 = Instant::now();
            drop(parse_peft(&config, &weights, cfg, &limits, &Device::Cpu)?);
            t[4 * k + 2].push(ms(t0));
            let t0 = Instant::now();
            let loaded = load_verified(
                &dir,
                file,
                &Recorded::Blake3(hash),
                cfg,
                &limits,
                &Device::Cpu,
            )?
            .0;
            t[4 * k + 3].push(ms(t0));
            adapter = Some(Arc::new(loaded));
        }
        let file = WeightsFile::from_bytes(&serving)?;
        let t0 = Instant::now();
        drop(parse_peft_file(&config, &file, cfg, &limits, &Device::Cpu)?);
        t[8].push(ms(t0));
        let adapter = adapter.context("two loads ran")?;
        t[9].push(prefill(&model, None)?);
        t[10].push(prefill(&model, Some(adapter.clone()))?);
        t[11].push(prefill(&model, Some(adapter))?);
    }
    println!("cold adapter, rank 16 on all modules, median of {reps}:");
    for (name, v) in names.iter().zip(t) {
        println!("{name:32} {:7.2} ms", median(v));
    }
    Ok(())
}
