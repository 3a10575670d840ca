//! Trainer tests on a tiny random llama built in memory: the training forward agrees with the
//! serving forward, LoRA gradients match finite differences, every variable gets a gradient,
//! SFT learns its completions (checked through the serving path), DPO widens the preference
//! margin, and training is reproducible and resumable bit for bit.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::data::{DpoExample, Examples, Method, SftExample};
use super::forward::{target_logprobs, Scored};
use super::hyper::{HyperLimits, HyperRequest, Schedule};
use super::params::TrainableLora;
use super::trainer::Trainer;
use super::Hyper;
use crate::engine::lora::Module;
use crate::engine::model::config::Arch;
use crate::engine::model::linear::{Linear, Weight};
use crate::engine::model::llama::{Attention, Layer, Mlp};
use crate::engine::model::qmatmul::QWeight;
use crate::engine::model::{Llama, ModelConfig, SeqCache, SeqInput};

const LIMITS: HyperLimits = HyperLimits {
    max_rank: 64,
    max_seq_len: 64,
    max_steps: 10_000,
};

fn cfg() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 32,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
    }
}

/// A random tiny llama; `quantized` stores the projections as Q8_0 blocks (the kernel path).
fn tiny(seed: u64, quantized: bool) -> Llama {
    let c = cfg();
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mat = |r: usize, k: usize, s: f32| {
        let v: Vec<f32> = (0..r * k).map(|_| rng.random_range(-s..s)).collect();
        Tensor::from_vec(v, (r, k), &dev).unwrap()
    };
    let mut lin = |out: usize, inp: usize| {
        let w = mat(out, inp, 0.3);
        let weight = if quantized {
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            Weight::Blocks(Arc::new(QWeight::from_qtensor(&q).unwrap().unwrap()))
        } else {
            Weight::Candle(QMatMul::Tensor(w))
        };
        Linear::new(weight, None, out, inp)
    };
    let (h, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let layers = (0..c.num_layers)
        .map(|_| Layer {
            input_norm: Tensor::ones(h, candle_core::DType::F32, &dev).unwrap(),
            attn: Attention {
                q_proj: lin(c.num_heads * hd, h),
                k_proj: lin(c.num_kv_heads * hd, h),
                v_proj: lin(c.num_kv_heads * hd, h),
                o_proj: lin(h, c.num_heads * hd),
            },
            post_attn_norm: Tensor::ones(h, candle_core::DType::F32, &dev).unwrap(),
            mlp: Mlp {
                gate_proj: lin(f, h),
                up_proj: lin(f, h),
                down_proj: lin(h, f),
            },
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let embed: Vec<f32> = (0..c.vocab_size * h)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let embed = Tensor::from_vec(embed, (c.vocab_size, h), &dev).unwrap();
    let head = Linear::new(
        Weight::Candle(QMatMul::Tensor(embed.clone())),
        None,
        c.vocab_size,
        h,
    );
    let norm = Tensor::ones(h, candle_core::DType::F32, &dev).unwrap();
    Llama::new(c, embed, layers, norm, head, &dev).unwrap()
}

fn hyper(method: Method, f: impl FnOnce(&mut HyperRequest)) -> Hyper {
    let mut r = HyperRequest {
        rank: Some(4),
        alpha: Some(8.0),
        batch_size: Some(2),
        learning_rate: Some(1e-2),
        seed: Some(7),
        lr_scheduler: Some(Schedule::Constant),
        warmup_steps: Some(0),
        ..Default::default()
    };
    f(&mut r);
    r.resolve(method, &LIMITS).unwrap()
}

/// log p of every token after the first, from the serving forward (all_logits).
fn serving_logprobs(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let logits = model
        .forward(&mut [SeqInput {
            tokens,
            cache: &mut cache,
            all_logits: true,
            adapter: None,
        }])
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
    let logp = logp.to_vec2::<f32>().unwrap();
    (1..tokens.len())
        .map(|i| logp[i - 1][tokens[i] as usize])
        .collect()
}

#[test]
fn training_forward_matches_the_serving_forward() {
    for quantized in [false, true] {
        let mut model = tiny(1, quantized);
        // The exact serving path: integer activations (the serving default) differ by rounding.
        model.set_activation_precision(crate::engine::model::qmatmul::ActivationPrecision::F32);
        let a: Vec<u32> = vec![1, 5, 9, 2, 7, 3];
        let b: Vec<u32> = vec![4, 4, 8];
        let ma = vec![false, true, true, true, true, true];
        let mb = vec![false, true, true];
        let got = target_logprobs(
            &model,
            None,
            &[
                Scored {
                    tokens: &a,
                    targets: &ma,
                },
                Scored {
                    tokens: &b,
                    targets: &mb,
                },
            ],
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let mut want = serving_logprobs(&model, &a);
        want.extend(serving_logprobs(&model, &b));
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            // The serving path multiplies blocks directly, training a dequantized copy.
            assert!(
                (g - w).abs() < 1e-4,
                "quantized={quantized}: {got:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn masked_positions_contribute_nothing() {
    let model = tiny(2, false);
    let tokens: Vec<u32> = vec![3, 1, 4, 1, 5];
    let all = target_logprobs(
        &model,
        None,
        &[Scored {
            tokens: &tokens,
            targets: &[false, true, true, true, true],
        }],
    )
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    let some = target_logprobs(
        &model,
        None,
        &[Scored {
            tokens: &tokens,
            targets: &[false, false, false, true, true],
        }],
    )
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    // Only the last two positions are scored, and they are scored identically.
    assert_eq!(some, all[2..].to_vec());
}

/// Loss of one fixed SFT batch under `lora`.
fn sft_loss_of(model: &Llama, lora: &TrainableLora) -> candle_core::Tensor {
    let tokens: Vec<u32> = vec![2, 7, 1, 8, 2, 8];
    let targets = vec![false, false, true, true, true, true];
    let logp = target_logprobs(
        model,
        Some(lora),
        &[Scored {
            tokens: &tokens,
            targets: &targets,
        }],
    )
    .unwrap();
    super::loss::sft_loss(&logp, 4).unwrap()
}

/// PEFT starts B at zero, where A's gradient vanishes: random B values exercise both.
fn perturb_b(lora: &TrainableLora, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, var) in lora.named_vars() {
        if name.ends_with(".b") {
            let n = var.as_tensor().elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.2..0.2)).collect();
            var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences_and_reach_every_variable() {
    let model = tiny(3, true);
    let h = hyper(Method::Sft, |_| {});
    let lora = TrainableLora::init(&model, &h, &Device::Cpu).unwrap();
    perturb_b(&lora, 9);
    let loss = sft_loss_of(&model, &lora);
    let grads = loss.backward().unwrap();
    let named = lora.named_vars();
    assert_eq!(named.len(), 2 * 7 * 2);
    for (name, var) in &named {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name}"
        );
    }
    // Central differences on a few elements of A and B in both layers.
    let eps = 1e-2f32;
    for (name, var) in named.iter().filter(|(n, _)| {
        n.starts_with("0.q_proj") || n.starts_with("1.down_proj") || n.starts_with("1.k_proj")
    }) {
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f32>().unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = sft_loss_of(&model, &lora).to_scalar::<f32>().unwrap();
                l as f64
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            at(0.0);
            let analytic = g[idx] as f64;
            let tol = 2e-3 + 2e-2 * analytic.abs().max(numeric.abs());
            assert!(
                (numeric - analytic).abs() < tol,
                "{name}[{idx}]: numeric {numeric} vs analytic {analytic}"
            );
        }
    }
}

fn sft_data() -> Vec<SftExample> {
    // Four prompts, each with its own 3-token completion (+ a shared end token 31).
    let prompts = [[1u32, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]];
    let completions = [[20u32, 21, 22], [23, 24, 25], [26, 27, 28], [29, 30, 19]];
    prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| {
            let mut tokens = p.to_vec();
            tokens.extend_from_slice(c);
            tokens.push(31);
            let mut targets = vec![false; p.len()];
            targets.extend([true; 4]);
            SftExample { tokens, targets }
        })
        .collect()
}

/// Greedy continuation through the serving forward with `adapter`.
fn greedy(
    model: &Llama,
    adapter: Option<Arc<crate::engine::lora::LoraAdapter>>,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = model
            .forward(&mut [SeqInput {
                tokens: &input,
                cache: &mut cache,
                all_logits: false,
                adapter: adapter.clone(),
            }])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        out.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn sft_learns_its_completions_and_serving_reproduces_them() {
    let model = Arc::new(tiny(4, true));
    let data = sft_data();
    let h = hyper(Method::Sft, |r| r.max_steps = Some(80));
    let mut t = Trainer::new(model.clone(), h, Examples::Sft(data.clone())).unwrap();
    let first = t.step().unwrap();
    let mut last = first.clone();
    while !t.is_done() {
        last = t.step().unwrap();
    }
    assert!(
        last.loss < first.loss / 10.0,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
    assert!(last.loss < 0.1, "final loss {}", last.loss);
    let adapter = Arc::new(t.adapter().unwrap());
    for ex in &data {
        let (prompt, completion) = ex.tokens.split_at(3);
        assert_eq!(greedy(&model, Some(adapter.clone()), prompt, 4), completion);
        assert_ne!(
            greedy(&model, None, prompt, 4),
            completion,
            "the base already knew it"
        );
    }
}

fn margin(model: &Llama, lora: Option<&TrainableLora>, pairs: &[DpoExample]) -> f32 {
    let mut total = 0.0;
    for p in pairs {
        let mut sums = [0f32; 2];
        for (k, completion) in [&p.chosen, &p.rejected].into_iter().enumerate() {
            let mut tokens = p.prompt.clone();
            tokens.extend_from_slice(completion);
            let mut targets = vec![false; p.prompt.len()];
            targets.extend(vec![true; completion.len()]);
            let lp = target_logprobs(
                model,
                lora,
                &[Scored {
                    tokens: &tokens,
                    targets: &targets,
                }],
            )
            .unwrap();
            sums[k] = lp.sum_all().unwrap().to_scalar::<f32>().unwrap();
        }
        total += sums[0] - sums[1];
    }
    total / pairs.len() as f32
}

#[test]
fn dpo_widens_the_preference_margin_over_the_base() {
    let model = Arc::new(tiny(5, false));
    let pairs: Vec<DpoExample> = (0..4u32)
        .map(|i| DpoExample {
            prompt: vec![1 + i, 2 + i],
            chosen: vec![10 + i, 11],
            rejected: vec![20 + i, 21],
        })
        .collect();
    let h = hyper(Method::Dpo, |r| {
        r.max_steps = Some(30);
        r.beta = Some(0.5);
    });
    let mut t = Trainer::new(model.clone(), h, Examples::Dpo(pairs.clone())).unwrap();
    let first = t.step().unwrap();
    // At step one the policy is the reference: rewards are exactly zero.
    let stats = first.dpo.unwrap();
    assert_eq!(stats.reward_margin, 0.0);
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-5,
        "{}",
        first.loss
    );
    let mut last = first;
    while !t.is_done() {
        last = t.step().unwrap();
    }
    let stats = last.dpo.unwrap();
    assert!(
        stats.reward_margin > 0.0 && stats.reward_accuracy == 1.0,
        "{stats:?}"
    );
    let before = margin(&model, None, &pairs);
    let after = margin(&model, Some(t.lora()), &pairs);
    assert!(after > before + 1.0, "margin {before} -> {after}");
}

fn adapter_values(t: &Trainer) -> Vec<Vec<f32>> {
    t.lora()
        .named_vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn same_seed_same_adapter_and_resume_continues_exactly() {
    let model = Arc::new(tiny(6, true));
    let h = hyper(Method::Sft, |r| {
        r.max_steps = Some(6);
        r.batch_size = Some(3);
        r.lr_scheduler = Some(Schedule::Cosine);
        r.warmup_steps = Some(2);
        r.target_modules = Some(vec!["q_proj".into(), "down_proj".into()]);
    });
    let run = || {
        let mut t = Trainer::new(model.clone(), h.clone(), Examples::Sft(sft_data())).unwrap();
        while !t.is_done() {
            t.step().unwrap();
        }
        adapter_values(&t)
    };
    let a = run();
    assert_eq!(a, run(), "same seed and data must give the same adapter");

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let mut t = Trainer::new(model.clone(), h.clone(), Examples::Sft(sft_data())).unwrap();
    for _ in 0..4 {
        t.step().unwrap();
    }
    t.save_checkpoint(&ck).unwrap();
    drop(t);
    let mut resumed = Trainer::new(model.clone(), h.clone(), Examples::Sft(sft_data())).unwrap();
    resumed
        .restore(&super::checkpoint::Checkpoint::load(&ck).unwrap())
        .unwrap();
    assert_eq!(resumed.steps_done(), 4);
    while !resumed.is_done() {
        resumed.step().unwrap();
    }
    assert_eq!(adapter_values(&resumed), a, "resume must continue exactly");

    // A checkpoint of another job is refused.
    let other = hyper(Method::Sft, |r| r.max_steps = Some(7));
    let mut t = Trainer::new(model, other, Examples::Sft(sft_data())).unwrap();
    assert!(t
        .restore(&super::checkpoint::Checkpoint::load(&ck).unwrap())
        .is_err());
    let _ = Module::ALL;
}

/// The composed ops a portable model (a GPU) trains with give the fused CPU kernels' loss and
/// gradients, on a packed batch of two sequences of different lengths.
#[test]
fn composed_training_ops_match_the_fused_kernels() {
    let fused = tiny(3, false);
    let mut composed = fused.clone();
    composed.use_portable_kernels();
    let h = hyper(Method::Sft, |_| {});
    let lora = TrainableLora::init(&fused, &h, &Device::Cpu).unwrap();
    perturb_b(&lora, 9);
    let (t1, t2): (Vec<u32>, Vec<u32>) =
        (vec![2, 7, 1, 8, 2, 8], vec![5, 9, 3, 3, 14, 30, 6, 1, 0]);
    let (m1, m2) = (
        vec![false, false, true, true, true, true],
        vec![false, true, false, true, true, true, true, false, true],
    );
    let seqs = [
        Scored {
            tokens: &t1,
            targets: &m1,
        },
        Scored {
            tokens: &t2,
            targets: &m2,
        },
    ];
    let run = |model: &Llama| {
        let logp = target_logprobs(model, Some(&lora), &seqs).unwrap();
        let loss = super::loss::sft_loss(&logp, 10).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Vec<f32>> = lora
            .named_vars()
            .iter()
            .map(|(name, v)| {
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name} got no gradient"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        (logp.to_vec1::<f32>().unwrap(), g)
    };
    let (lp_f, g_f) = run(&fused);
    let (lp_c, g_c) = run(&composed);
    assert_eq!(lp_f.len(), 10);
    for (a, b) in lp_f.iter().zip(&lp_c) {
        assert!((a - b).abs() < 1e-4, "log-prob {a} vs {b}");
    }
    for (i, (a, b)) in g_f.iter().zip(&g_c).enumerate() {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "variable {i} has a zero gradient");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-3 * scale + 1e-6,
                "variable {i}: {x} vs {y}"
            );
        }
    }
}

/// A trainer over a portable model takes the same steps as over the fused kernels.
#[test]
fn a_portable_model_trains_like_the_cpu_one() {
    let fused = Arc::new(tiny(6, false));
    let mut portable = (*fused).clone();
    portable.use_portable_kernels();
    let portable = Arc::new(portable);
    let h = hyper(Method::Sft, |r| r.max_steps = Some(3));
    let losses = |model: &Arc<Llama>| {
        let mut t = Trainer::new(model.clone(), h.clone(), Examples::Sft(sft_data())).unwrap();
        let mut out = Vec::new();
        while !t.is_done() {
            out.push(t.step().unwrap().loss);
        }
        (out, adapter_values(&t))
    };
    let ((lf, af), (lp, ap)) = (losses(&fused), losses(&portable));
    assert_eq!(lf.len(), 3);
    for (a, b) in lf.iter().zip(&lp) {
        assert!((a - b).abs() < 1e-4, "loss {a} vs {b}");
    }
    for (a, b) in af.iter().flatten().zip(ap.iter().flatten()) {
        assert!((a - b).abs() < 1e-4, "adapter value {a} vs {b}");
    }
}
