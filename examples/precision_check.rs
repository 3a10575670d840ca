//! How much int8 (or int16) activations change the real model's output, against the exact f32
//! path.
//!
//! For each prompt: greedy decoding with f32 activations (the reference), then the int8 path
//! (1) teacher-forced on the reference tokens — per step, whether its argmax agrees and how far
//! the log-probability of the reference token moved — and (2) free-running greedy, counting
//! tokens equal to the reference before the first divergence. Decoding runs as serving does:
//! one prefill, then one token per step against the KV cache.
//!
//! `cargo run --release --example precision_check -- MODEL.gguf [TOKENS [int8|int16]]`

use adapterd::engine::model::load::{load_gguf, read_gguf_header};
use adapterd::engine::model::qmatmul::ActivationPrecision;
use adapterd::engine::model::{Kernels, Llama, SeqCache, SeqInput};
use adapterd::engine::tokenizer::Tokenizer;
use candle_core::Device;

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a hash map works.",
    "List three uses of baking soda.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your steps.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
];

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = v.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
    v.iter().map(|x| x - lse).collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// Feeds `prompt` then, for `n` steps, either the model's own argmax (`forced` = None) or the
/// given tokens; returns the chosen tokens and each step's log-probabilities.
fn decode(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    forced: Option<&[u32]>,
) -> anyhow::Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut cache = SeqCache::new(model.cfg.num_layers);
    let mut input = prompt.to_vec();
    let (mut toks, mut lps) = (Vec::new(), Vec::new());
    for i in 0..n {
        let logits = model
            .forward(&mut [SeqInput {
                tokens: &input,
                cache: &mut cache,
                all_logits: false,
                adapter: None,
            }])?
            .to_vec2::<f32>()?
            .remove(0);
        let lp = log_softmax(&logits);
        let next = match forced {
            Some(f) => f[i],
            None => argmax(&lp),
        };
        toks.push(next);
        lps.push(lp);
        input = vec![next];
    }
    Ok((toks, lps))
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| {
        anyhow::anyhow!("usage: precision_check MODEL.gguf [TOKENS [int8|int16]]")
    })?;
    let candidate: ActivationPrecision = match std::env::args().nth(3) {
        Some(s) => s.parse().map_err(anyhow::Error::msg)?,
        None => ActivationPrecision::Int8,
    };
    let n: usize = match std::env::args().nth(2) {
        Some(s) => s.parse()?,
        None => 64,
    };
    let path = std::path::Path::new(&path);
    let (ct, mut f) = read_gguf_header(path)?;
    let tok = Tokenizer::from_gguf(&ct)?;
    let mut model = load_gguf(path, &ct, &mut f, &Device::Cpu, Kernels::Native)?;
    let (mut agree, mut total, mut worst_lp, mut worst_gap) = (0usize, 0usize, 0f32, 0f32);
    let mut dlp_all = Vec::new();
    let mut prefix_sum = 0usize;
    for p in PROMPTS {
        let text = format!("<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n");
        let prompt = tok.encode(&text, false)?;
        model.set_activation_precision(ActivationPrecision::F32);
        let (ref_toks, ref_lps) = decode(&model, &prompt, n, None)?;
        model.set_activation_precision(candidate);
        let (_, int8_lps) = decode(&model, &prompt, n, Some(&ref_toks))?;
        let (free, _) = decode(&model, &prompt, n, None)?;
        let prefix = free
            .iter()
            .zip(&ref_toks)
            .take_while(|(a, b)| a == b)
            .count();
        prefix_sum += prefix;
        let mut p_agree = 0;
        let mut p_worst = 0f32;
        for ((t, r), q) in ref_toks.iter().zip(&ref_lps).zip(&int8_lps) {
            let d = (r[*t as usize] - q[*t as usize]).abs();
            dlp_all.push(d);
            p_worst = p_worst.max(d);
            if argmax(q) == *t {
                p_agree += 1;
            } else {
                // How close the reference's own top two were where the candidate chose differently.
                let mut s = r.clone();
                s.sort_by(|a, b| b.total_cmp(a));
                worst_gap = worst_gap.max(s[0] - s[1]);
            }
        }
        agree += p_agree;
        total += n;
        worst_lp = worst_lp.max(p_worst);
        println!(
            "{p:50} teacher-forced argmax agree {p_agree:2}/{n} · max |Δ logprob| {p_worst:.4} · free-running identical prefix {prefix:2}/{n}"
        );
        println!("    f32 : {:?}", tok.decode(&ref_toks, true)?);
        if prefix < n {
            println!("    {candidate:?}: {:?}", tok.decode(&free, true)?);
        }
    }
    dlp_all.sort_by(|a, b| a.total_cmp(b));
    let mean = dlp_all.iter().sum::<f32>() / dlp_all.len() as f32;
    println!(
        "overall: argmax agree {agree}/{total} · |Δ logprob| of the chosen token: mean {mean:.4}, median {:.4}, p99 {:.4}, max {worst_lp:.4} · largest f32 top-2 gap where the candidate disagreed {worst_gap:.4} · mean identical prefix {:.1}/{n}",
        dlp_all[dlp_all.len() / 2],
        dlp_all[dlp_all.len() * 99 / 100],
        prefix_sum as f64 / PROMPTS.len() as f64
    );
    Ok(())
}
