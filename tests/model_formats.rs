//! The two weight formats agree: a tiny llama written as a Hugging Face directory and as a GGUF
//! file (q/k rows permuted the way llama.cpp's converter does) produce the same logits.

use std::collections::HashMap;

use adapterd::engine::model::load::{load_gguf, load_hf_dir, read_gguf_header};
use adapterd::engine::model::{Kernels, Llama, SeqCache, SeqInput};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

const H: usize = 64;
const FFN: usize = 128;
const HD: usize = 16;
const NH: usize = 4;
const NKV: usize = 2;
const VOCAB: usize = 96;
const LAYERS: usize = 2;

fn random_weights(seed: u64) -> HashMap<String, Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), t(&[VOCAB, H], 1.0));
    w.insert(
        "model.norm.weight".to_string(),
        (t(&[H], 0.2) + 1.0).unwrap(),
    );
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        w.insert(
            format!("{p}.input_layernorm.weight"),
            (t(&[H], 0.2) + 1.0).unwrap(),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (t(&[H], 0.2) + 1.0).unwrap(),
        );
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            t(&[NH * HD, H], 0.4),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            t(&[NKV * HD, H], 0.4),
        );
        w.insert(
            format!("{p}.self_attn.v_proj.weight"),
            t(&[NKV * HD, H], 0.4),
        );
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            t(&[H, NH * HD], 0.3),
        );
        w.insert(format!("{p}.mlp.gate_proj.weight"), t(&[FFN, H], 0.3));
        w.insert(format!("{p}.mlp.up_proj.weight"), t(&[FFN, H], 0.3));
        w.insert(format!("{p}.mlp.down_proj.weight"), t(&[H, FFN], 0.3));
    }
    w
}

/// llama.cpp's convert_hf_to_gguf `permute`: reshape (heads, 2, hd/2, in), swap axes 1 and 2.
fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
        .contiguous()
        .unwrap()
}

fn write_pair(
    w: &HashMap<String, Tensor>,
    dtype: GgmlDType,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    // Hugging Face directory.
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "vocab_size": VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(w, dir.join("model.safetensors")).unwrap();

    // GGUF file with the same weights; norms stay f32 as llama.cpp writes them.
    let q = |t: &Tensor, dt: GgmlDType| QTensor::quantize(t, dt).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(&w["model.embed_tokens.weight"], dtype),
        ),
        (
            "output_norm.weight".into(),
            q(&w["model.norm.weight"], GgmlDType::F32),
        ),
    ];
    for l in 0..LAYERS {
        let (p, g) = (format!("model.layers.{l}"), format!("blk.{l}"));
        let get = |n: &str| &w[&format!("{p}.{n}.weight")];
        tensors.push((
            format!("{g}.attn_norm.weight"),
            q(get("input_layernorm"), GgmlDType::F32),
        ));
        tensors.push((
            format!("{g}.ffn_norm.weight"),
            q(get("post_attention_layernorm"), GgmlDType::F32),
        ));
        tensors.push((
            format!("{g}.attn_q.weight"),
            q(&permute_for_gguf(get("self_attn.q_proj"), NH), dtype),
        ));
        tensors.push((
            format!("{g}.attn_k.weight"),
            q(&permute_for_gguf(get("self_attn.k_proj"), NKV), dtype),
        ));
        tensors.push((
            format!("{g}.attn_v.weight"),
            q(get("self_attn.v_proj"), dtype),
        ));
        tensors.push((
            format!("{g}.attn_output.weight"),
            q(get("self_attn.o_proj"), dtype),
        ));
        tensors.push((
            format!("{g}.ffn_gate.weight"),
            q(get("mlp.gate_proj"), dtype),
        ));
        tensors.push((format!("{g}.ffn_up.weight"), q(get("mlp.up_proj"), dtype)));
        tensors.push((
            format!("{g}.ffn_down.weight"),
            q(get("mlp.down_proj"), dtype),
        ));
    }
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(H as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.attention.head_count", Value::U32(NH as u32)),
        ("llama.attention.head_count_kv", Value::U32(NKV as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.context_length", Value::U32(128)),
    ];
    let path = dir.join("tiny.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    path
}

/// Logits of every position of `tokens` fed in two chunks (exercising the cache), flattened.
fn logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let (a, b) = tokens.split_at(tokens.len() / 2);
    let mut out = Vec::new();
    for chunk in [a, b] {
        let l = model
            .forward(&mut [SeqInput {
                tokens: chunk,
                cache: &mut cache,
                all_logits: true,
                adapter: None,
            }])
            .unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn load_pair(dtype: GgmlDType) -> (Llama, Llama) {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(11);
    let gguf = write_pair(&w, dtype, dir.path());
    let (ct, mut f) = read_gguf_header(&gguf).unwrap();
    let q = load_gguf(&gguf, &ct, &mut f, &Device::Cpu, Kernels::Native).unwrap();
    let hf = load_hf_dir(dir.path(), &Device::Cpu, Kernels::Native).unwrap();
    (q, hf)
}

const TOKENS: [u32; 10] = [1, 17, 42, 5, 88, 3, 3, 60, 91, 12];

#[test]
fn an_f32_gguf_with_permuted_qk_matches_the_safetensors_model_exactly() {
    let (q, hf) = load_pair(GgmlDType::F32);
    let (a, b) = (logits(&q, &TOKENS), logits(&hf, &TOKENS));
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "max logit difference {max_diff}");
}

#[test]
fn a_q8_0_gguf_stays_close_to_the_safetensors_model() {
    let (q, hf) = load_pair(GgmlDType::Q8_0);
    let (a, b) = (logits(&q, &TOKENS), logits(&hf, &TOKENS));
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(
        max_diff < 0.05 * scale,
        "max logit difference {max_diff} (scale {scale})"
    );
}

/// Several sequences of different lengths decoding one token each per step (the fused
/// one-token attention, run in parallel over sequences) give the logits each gets from one
/// prompt pass over the same tokens (the tensor attention path with a causal mask).
#[test]
fn batched_one_token_steps_equal_a_prompt_pass() {
    let (mut model, _) = load_pair(GgmlDType::Q8_0);
    // One precision for both (`auto` would take int16 for the few-row steps).
    model.set_activation_precision(adapterd::engine::model::qmatmul::ActivationPrecision::F32);
    let seqs: [&[u32]; 3] = [&TOKENS[..], &TOKENS[3..], &TOKENS[1..8]];
    let whole: Vec<Vec<f32>> = seqs
        .iter()
        .map(|t| {
            let mut cache = SeqCache::new(model.cfg.num_layers);
            model
                .forward(&mut [SeqInput {
                    tokens: t,
                    cache: &mut cache,
                    all_logits: true,
                    adapter: None,
                }])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let mut caches: Vec<SeqCache> = seqs
        .iter()
        .map(|_| SeqCache::new(model.cfg.num_layers))
        .collect();
    let mut stepped: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    for step in 0..TOKENS.len() {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| step < seqs[i].len()).collect();
        let mut batch: Vec<SeqInput> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| live.contains(i))
            .map(|(i, cache)| SeqInput {
                tokens: &seqs[i][step..step + 1],
                cache,
                all_logits: false,
                adapter: None,
            })
            .collect();
        let rows = model.forward(&mut batch).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in live.iter().zip(rows) {
            stepped[*i].extend(row);
        }
    }
    for (i, (w, s)) in whole.iter().zip(&stepped).enumerate() {
        assert_eq!(w.len(), s.len(), "sequence {i}");
        let diff = w
            .iter()
            .zip(s)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "sequence {i}: max logit difference {diff}");
    }
}

#[test]
fn without_unpermuting_the_models_would_differ() {
    // Guards the test itself: permuted q/k must matter, or the checks above prove nothing.
    let w = random_weights(11);
    let q = &w["model.layers.0.self_attn.q_proj.weight"];
    let diff = (permute_for_gguf(q, NH) - q)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1.0);
}

#[test]
fn an_unsupported_architecture_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":8}"#,
    )
    .unwrap();
    let err = load_hf_dir(dir.path(), &Device::Cpu, Kernels::Native)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GPT2LMHeadModel") || err.contains("gpt2lmheadmodel"),
        "{err}"
    );
}

mod lora {
    //! LoRA applied at request time equals the merged weights W + scale·B·A, and rows with
    //! different adapters (or none) in one batch each get exactly their own delta.

    use super::*;
    use adapterd::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
    use std::sync::Arc;

    fn rand_t(rng: &mut rand::rngs::StdRng, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// An adapter on layer 1's q_proj and down_proj only, rank 4.
    fn adapter(seed: u64) -> LoraAdapter {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let r = 4;
        let mut layers = vec![LayerLora::default(), LayerLora::default()];
        layers[1].modules[Module::Q.index()] = Some(LoraPair {
            a: rand_t(&mut rng, &[r, H], 0.3),
            b: rand_t(&mut rng, &[NH * HD, r], 0.3),
            scale: 2.0,
            int8: None,
        });
        layers[1].modules[Module::Down.index()] = Some(LoraPair {
            a: rand_t(&mut rng, &[r, FFN], 0.3),
            b: rand_t(&mut rng, &[H, r], 0.3),
            scale: 2.0,
            int8: None,
        });
        LoraAdapter {
            layers,
            rank: r,
            alpha: 8.0,
            use_rslora: false,
            target_modules: vec!["down_proj".into(), "q_proj".into()],
            size_bytes: 0,
            packed: Default::default(),
        }
    }

    fn merged(w: &HashMap<String, Tensor>, a: &LoraAdapter) -> HashMap<String, Tensor> {
        let mut m = w.clone();
        for (li, layer) in a.layers.iter().enumerate() {
            for module in Module::ALL {
                if let Some(p) = layer.get(module) {
                    let key = format!(
                        "model.layers.{li}.{}.{}.weight",
                        module.hf_parent(),
                        module.hf_name()
                    );
                    let delta = (p.b.matmul(&p.a).unwrap() * p.scale).unwrap();
                    let merged = (&m[&key] + delta).unwrap();
                    m.insert(key, merged);
                }
            }
        }
        m
    }

    fn last_logits(model: &Llama, tokens: &[u32], adapter: Option<Arc<LoraAdapter>>) -> Vec<f32> {
        let mut cache = SeqCache::new(model.cfg.num_layers);
        model
            .forward(&mut [SeqInput {
                tokens,
                cache: &mut cache,
                all_logits: false,
                adapter,
            }])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn an_adapter_applied_per_request_equals_the_merged_model() {
        let w = random_weights(11);
        let a = adapter(5);
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_pair(&w, GgmlDType::F32, d1.path());
        write_pair(&merged(&w, &a), GgmlDType::F32, d2.path());
        let base = load_hf_dir(d1.path(), &Device::Cpu, Kernels::Native).unwrap();
        let merged = load_hf_dir(d2.path(), &Device::Cpu, Kernels::Native).unwrap();
        let with = last_logits(&base, &TOKENS, Some(Arc::new(a)));
        let want = last_logits(&merged, &TOKENS, None);
        let without = last_logits(&base, &TOKENS, None);
        assert!(
            max_diff(&with, &want) < 1e-3,
            "adapter vs merged: {}",
            max_diff(&with, &want)
        );
        assert!(
            max_diff(&with, &without) > 1e-2,
            "the adapter must change the output"
        );
    }

    #[test]
    fn rows_with_different_adapters_in_one_batch_each_get_their_own_delta() {
        let w = random_weights(11);
        let d = tempfile::tempdir().unwrap();
        write_pair(&w, GgmlDType::Q8_0, d.path());
        let gguf = d.path().join("tiny.gguf");
        let (ct, mut f) = read_gguf_header(&gguf).unwrap();
        let model = load_gguf(&gguf, &ct, &mut f, &Device::Cpu, Kernels::Native).unwrap();
        let (a1, a2) = (Arc::new(adapter(5)), Arc::new(adapter(6)));
        let prompts: [&[u32]; 4] = [&TOKENS[..4], &TOKENS[2..9], &TOKENS[..6], &TOKENS[5..]];
        let adapters = [Some(a1.clone()), None, Some(a2.clone()), Some(a1.clone())];
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .zip(&adapters)
            .map(|(p, a)| last_logits(&model, p, a.clone()))
            .collect();
        let mut caches: Vec<SeqCache> = (0..4).map(|_| SeqCache::new(LAYERS)).collect();
        let mut batch: Vec<SeqInput> = caches
            .iter_mut()
            .zip(prompts.iter().zip(&adapters))
            .map(|(cache, (p, a))| SeqInput {
                tokens: p,
                cache,
                all_logits: false,
                adapter: a.clone(),
            })
            .collect();
        let together = model.forward(&mut batch).unwrap().to_vec2::<f32>().unwrap();
        for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
            assert!(max_diff(t, a) < 1e-3, "row {i}: {}", max_diff(t, a));
        }
    }
}

mod portable {
    //! The portable kernels (candle's ops only: what a GPU runs) agree with the native CPU
    //! kernels on prompts and on batched decode steps with mixed adapters, so the code that
    //! serves on a GPU is tested here without one.

    use super::*;
    use adapterd::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
    use adapterd::engine::model::qmatmul::ActivationPrecision;
    use candle_core::DType;
    use std::sync::Arc;

    /// Rank-4 pairs on every module of both layers; `dtype` is how A/B are held (f16 is what
    /// the CPU serving path keeps, and the portable path must widen it).
    fn adapter(seed: u64, dtype: DType) -> LoraAdapter {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let r = 4;
        let dims = |m: Module| match m {
            Module::Q | Module::O => (NH * HD, H),
            Module::K | Module::V => (NKV * HD, H),
            Module::Gate | Module::Up => (FFN, H),
            Module::Down => (H, FFN),
        };
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3f32..0.3)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let layers = (0..LAYERS)
            .map(|_| {
                let mut l = LayerLora::default();
                for m in Module::ALL {
                    let (out, inp) = dims(m);
                    l.modules[m.index()] = Some(LoraPair {
                        a: t(&[r, inp]),
                        b: t(&[out, r]),
                        scale: 2.0,
                        int8: None,
                    });
                }
                l
            })
            .collect();
        LoraAdapter {
            layers,
            rank: r,
            alpha: 8.0,
            use_rslora: false,
            target_modules: Module::ALL.iter().map(|m| m.hf_name().into()).collect(),
            size_bytes: 0,
            packed: Default::default(),
        }
    }

    /// Three sequences (adapter 1, none, adapter 2) through a prompt step and four batched
    /// decode steps; the logits of every step, flattened.
    fn run(model: &Llama, adapters: &[Option<Arc<LoraAdapter>>; 3]) -> Vec<Vec<f32>> {
        let prompts: [&[u32]; 3] = [&TOKENS[..4], &TOKENS[2..9], &TOKENS[5..]];
        let mut caches: Vec<SeqCache> = (0..3).map(|_| SeqCache::new(LAYERS)).collect();
        let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut steps = Vec::new();
        for _ in 0..5 {
            let mut batch: Vec<SeqInput> = caches
                .iter_mut()
                .zip(next.iter().zip(adapters))
                .map(|(cache, (tokens, a))| SeqInput {
                    tokens,
                    cache,
                    all_logits: false,
                    adapter: a.clone(),
                })
                .collect();
            let logits = model.forward(&mut batch).unwrap().to_vec2::<f32>().unwrap();
            // Both models are fed the same tokens (from a fixed rule, not their own argmax),
            // so a difference in one step cannot change what later steps see.
            next = (0..3)
                .map(|i| vec![(steps.len() * 7 + i * 13) as u32 % VOCAB as u32])
                .collect();
            steps.push(logits.concat());
        }
        steps
    }

    fn argmax(row: &[f32]) -> usize {
        row.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0
    }

    /// Largest and mean absolute difference of two runs, per step.
    fn diffs(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<(f32, f32)> {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let d: Vec<f32> = x.iter().zip(y).map(|(u, v)| (u - v).abs()).collect();
                let max = d.iter().copied().fold(0.0, f32::max);
                (max, d.iter().sum::<f32>() / d.len() as f32)
            })
            .collect()
    }

    /// Native (f32 activations) and portable runs of the tiny model in `dtype`, with two
    /// adapters whose A/B are held as `ab`; also the native run without adapters.
    fn runs(dtype: GgmlDType, ab: DType) -> [Vec<Vec<f32>>; 3] {
        let dir = tempfile::tempdir().unwrap();
        write_pair(&random_weights(11), dtype, dir.path());
        let gguf = dir.path().join("tiny.gguf");
        let load = |k: Kernels| {
            let (ct, mut f) = read_gguf_header(&gguf).unwrap();
            load_gguf(&gguf, &ct, &mut f, &Device::Cpu, k).unwrap()
        };
        let mut native = load(Kernels::Native);
        native.set_activation_precision(ActivationPrecision::F32);
        let portable = load(Kernels::Portable);
        assert_eq!(native.kernels(), Kernels::Native);
        assert_eq!(portable.kernels(), Kernels::Portable);
        let adapters = [
            Some(Arc::new(adapter(5, ab))),
            None,
            Some(Arc::new(adapter(6, ab))),
        ];
        [
            run(&native, &adapters),
            run(&portable, &adapters),
            run(&native, &[None, None, None]),
        ]
    }

    fn agree_exactly(ab: DType) {
        let [native, portable, plain] = runs(GgmlDType::F32, ab);
        for (step, ((max, _), (moved, _))) in diffs(&native, &portable)
            .into_iter()
            .zip(diffs(&native, &plain))
            .enumerate()
        {
            assert!(max < 1e-3, "{ab:?} step {step}: {max}");
            // The adapters matter, so agreeing is not agreeing on the base alone.
            assert!(
                moved > 0.1,
                "step {step}: the adapters moved logits by {moved}"
            );
            for (row, (w, g)) in native[step]
                .chunks(VOCAB)
                .zip(portable[step].chunks(VOCAB))
                .enumerate()
            {
                assert_eq!(argmax(w), argmax(g), "step {step} row {row}");
            }
        }
    }

    /// `adapter`'s f16 pairs copied into one buffer with every A and B a view of it, as a cold
    /// load parses a serving copy.
    fn in_one_buffer(adapter: &LoraAdapter) -> LoraAdapter {
        let pairs = || {
            adapter
                .layers
                .iter()
                .flat_map(|l| l.modules.iter().flatten())
        };
        let mut values: Vec<half::f16> = Vec::new();
        for p in pairs() {
            for t in [&p.a, &p.b] {
                values.extend(t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap());
            }
        }
        let n = values.len();
        let buffer = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
        let mut at = 0;
        let mut view = |t: &Tensor| {
            let v = buffer
                .narrow(0, at, t.elem_count())
                .unwrap()
                .reshape(t.dims())
                .unwrap();
            at += t.elem_count();
            v
        };
        let mut packed = adapter.clone();
        for p in packed
            .layers
            .iter_mut()
            .flat_map(|l| l.modules.iter_mut().flatten())
        {
            p.a = view(&p.a);
            p.b = view(&p.b);
        }
        packed
    }

    /// The delta pass reads an adapter whose pairs share one buffer through its packed table
    /// (f16 serving copies, int8 copies) and others through their tensors: the same logits,
    /// bit for bit, in batched decode steps beside a base-only sequence.
    #[test]
    fn packed_adapters_give_the_logits_of_their_tensors() {
        use adapterd::engine::lora::int8::quantize_adapter;
        let dir = tempfile::tempdir().unwrap();
        write_pair(&random_weights(11), GgmlDType::F32, dir.path());
        let gguf = dir.path().join("tiny.gguf");
        let (ct, mut f) = read_gguf_header(&gguf).unwrap();
        let mut model = load_gguf(&gguf, &ct, &mut f, &Device::Cpu, Kernels::Native).unwrap();
        model.set_activation_precision(ActivationPrecision::F32);
        let separate = [adapter(5, DType::F16), adapter(6, DType::F16)];
        let packed = separate.each_ref().map(in_one_buffer);
        let int8_packed = packed.each_ref().map(|a| quantize_adapter(a).unwrap());
        let int8_separate = int8_packed.each_ref().map(|a| {
            let mut s = a.clone();
            for p in s
                .layers
                .iter_mut()
                .flat_map(|l| l.modules.iter_mut().flatten())
            {
                // The same int8 values, each tensor in a buffer of its own.
                p.a = p.a.copy().unwrap();
                p.b = p.b.copy().unwrap();
            }
            s
        });
        let logits = |[a, b]: &[LoraAdapter; 2]| {
            run(
                &model,
                &[Some(Arc::new(a.clone())), None, Some(Arc::new(b.clone()))],
            )
        };
        for (label, with_table, without) in [
            ("f16", &packed, &separate),
            ("int8", &int8_packed, &int8_separate),
        ] {
            assert!(with_table.iter().all(|a| a.packed().is_some()), "{label}");
            assert!(without.iter().all(|a| a.packed().is_none()), "{label}");
            assert_eq!(logits(with_table), logits(without), "{label}");
        }
        // The tables are read: the packed adapters move the logits as the tensors do.
        let plain = run(&model, &[None, None, None]);
        assert!(diffs(&logits(&packed), &plain)
            .iter()
            .all(|&(max, _)| max > 0.1));
    }

    #[test]
    fn f32_weights_and_adapters_agree() {
        agree_exactly(DType::F32);
    }

    #[test]
    fn f16_adapters_are_widened_on_the_portable_path() {
        agree_exactly(DType::F16);
    }

    /// A Hugging Face directory on the portable path holds its matrices in f16 (as on a GPU)
    /// and its norms, biases and embeddings in f32; it agrees with the f32 native model to f16
    /// rounding. (Before, a GPU load made the norms f16 too, which the f32 activations cannot
    /// meet: the first request would have failed.)
    #[test]
    fn f16_matrices_of_a_safetensors_model_agree() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(&random_weights(11), GgmlDType::F32, dir.path());
        let native = load_hf_dir(dir.path(), &Device::Cpu, Kernels::Native).unwrap();
        let portable = load_hf_dir(dir.path(), &Device::Cpu, Kernels::Portable).unwrap();
        assert_eq!(portable.kernels(), Kernels::Portable);
        let adapters = [
            Some(Arc::new(adapter(5, DType::F16))),
            None,
            Some(Arc::new(adapter(6, DType::F32))),
        ];
        let (want, got) = (run(&native, &adapters), run(&portable, &adapters));
        for (step, (max, mean)) in diffs(&want, &got).into_iter().enumerate() {
            // Measured: max 0.014–0.041, mean 0.004–0.007 (logits up to ~18; candle's f16
            // matmul also rounds the activations to f16).
            assert!(
                max < 0.1 && mean < 0.02,
                "step {step}: max {max}, mean {mean}"
            );
        }
    }

    #[test]
    fn q4_1_weights_agree_within_activation_rounding() {
        // candle's quantized matmul rounds activations to 8 bits (Q8_1) where the native f32
        // path does not; on this tiny random model (logits up to ~18) that rounding alone moves
        // logits by up to ~0.5 (native int8 against native f32). A wrong computation (a q/k
        // row order, a missing delta) moves them by whole units.
        let [native, portable, plain] = runs(GgmlDType::Q4_1, DType::F16);
        for (step, ((max, mean), (_, moved))) in diffs(&native, &portable)
            .into_iter()
            .zip(diffs(&native, &plain))
            .enumerate()
        {
            // Measured: max 0.28–0.53, mean 0.07–0.13; the adapters move the mean by ~3.
            assert!(
                max < 1.0 && mean < 0.25,
                "step {step}: max {max}, mean {mean}"
            );
            assert!(
                moved > 10.0 * mean,
                "step {step}: adapters moved {moved}, diff {mean}"
            );
        }
    }
}
