//! The training forward: the same llama computation as serving, written only with ops candle
//! can differentiate (no fused rms_norm, softmax or rope — they silently cut the graph), over a
//! packed batch of whole sequences (rows stacked, attention per sequence, no padding), with the
//! base projections frozen ([`Frozen`]) and LoRA deltas from trainable [`TrainableLora`].
//! It returns the log-probability of each target token, which is all the losses need.

use candle_core::{DType, Device, Result, Tensor, D};

use super::frozen::Frozen;
use super::params::TrainableLora;
use crate::engine::lora::Module;
use crate::engine::model::linear::Linear;
use crate::engine::model::Llama;

/// One sequence and the positions whose tokens are scored.
pub struct Scored<'a> {
    pub tokens: &'a [u32],
    /// `targets[i]`: score token `i` given `tokens[..i]` (`targets[0]` must be false).
    pub targets: &'a [bool],
}

/// Log-probabilities of the target tokens of every sequence, concatenated in order
/// (sequence by sequence, position by position): shape [total targets]. With `lora` `None`
/// this is the frozen base (the DPO reference).
pub fn target_logprobs(
    model: &Llama,
    lora: Option<&TrainableLora>,
    seqs: &[Scored<'_>],
) -> Result<Tensor> {
    let device = model.device().clone();
    let hidden = hidden_states(model, lora, seqs)?;
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    let mut offset = 0u32;
    for s in seqs {
        if s.targets.len() != s.tokens.len() {
            candle_core::bail!("targets and tokens differ in length");
        }
        for (i, (&t, &is_target)) in s.tokens.iter().zip(s.targets).enumerate() {
            if is_target {
                if i == 0 {
                    candle_core::bail!("the first token of a sequence cannot be a target");
                }
                rows.push(offset + i as u32 - 1);
                labels.push(t);
            }
        }
        offset += s.tokens.len() as u32;
    }
    let m = rows.len();
    if m == 0 {
        return Tensor::zeros(0, DType::F32, &device);
    }
    let rows = Tensor::from_vec(rows, m, &device)?;
    let labels = Tensor::from_vec(labels, (m, 1), &device)?;
    // Only the rows that predict a target go through the final norm and the large head.
    let h = hidden.index_select(&rows, 0)?;
    let h = rms_norm(&h, &model.norm, model.cfg.rms_norm_eps)?;
    let head = if model.cfg.tie_word_embeddings {
        Frozen::Dense(model.embed.clone())
    } else {
        Frozen::Linear(model.lm_head.clone())
    };
    let logits = head.forward(&h)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    logp.gather(&labels, 1)?.squeeze(1)
}

/// Hidden states after the last decoder layer (before the final norm), [total tokens, hidden].
fn hidden_states(
    model: &Llama,
    lora: Option<&TrainableLora>,
    seqs: &[Scored<'_>],
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let device = model.device().clone();
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    for s in seqs {
        if s.tokens.is_empty() {
            candle_core::bail!("an empty sequence in a training batch");
        }
        if s.tokens.len() > cfg.max_position_embeddings {
            candle_core::bail!(
                "a sequence of {} tokens exceeds the context of {}",
                s.tokens.len(),
                cfg.max_position_embeddings
            );
        }
        tokens.extend_from_slice(s.tokens);
        positions.extend(0..s.tokens.len() as u32);
    }
    let total = tokens.len();
    let ids = Tensor::from_vec(tokens, total, &device)?;
    let pos = Tensor::from_vec(positions, total, &device)?;
    let half = cfg.head_dim / 2;
    let (cos, sin) = model.rope_tables();
    let cos = cos.index_select(&pos, 0)?.reshape((total, 1, half))?;
    let sin = sin.index_select(&pos, 0)?.reshape((total, 1, half))?;
    let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();

    let mut xs = model.embed.index_select(&ids, 0)?;
    for (li, layer) in model.layers.iter().enumerate() {
        let h = rms_norm(&xs, &layer.input_norm, cfg.rms_norm_eps)?;
        let h = attention(model, lora, li, &h, &cos, &sin, &lens, &device)?;
        let xs2 = (xs + h)?;
        let h = rms_norm(&xs2, &layer.post_attn_norm, cfg.rms_norm_eps)?;
        let gate = project(&layer.mlp.gate_proj, &h, lora, li, Module::Gate)?;
        let up = project(&layer.mlp.up_proj, &h, lora, li, Module::Up)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        let h = project(&layer.mlp.down_proj, &act, lora, li, Module::Down)?;
        xs = (xs2 + h)?;
    }
    Ok(xs)
}

/// Frozen base projection plus this layer's trainable delta scale·B(A·x), if any.
fn project(
    lin: &Linear,
    x: &Tensor,
    lora: Option<&TrainableLora>,
    layer: usize,
    m: Module,
) -> Result<Tensor> {
    let y = Frozen::Linear(lin.clone()).forward(x)?;
    match lora.and_then(|l| l.get(layer, m)) {
        Some(p) => {
            let delta = x
                .matmul(&p.a.as_tensor().t()?)?
                .matmul(&p.b.as_tensor().t()?)?;
            y + (delta * p.scale)?
        }
        None => Ok(y),
    }
}

/// RMSNorm from differentiable primitives.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// Half-rotated RoPE on [rows, heads, head_dim] with per-row tables [rows, 1, head_dim/2].
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// [n, n] additive causal mask.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    // A large finite value rather than -inf keeps every intermediate finite in the backward.
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { -1e30 } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}

#[allow(clippy::too_many_arguments)]
fn attention(
    model: &Llama,
    lora: Option<&TrainableLora>,
    li: usize,
    xs: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    lens: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let attn = &model.layers[li].attn;
    let (rows, _) = xs.dims2()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let group = nh / nkv;
    let q = project(&attn.q_proj, xs, lora, li, Module::Q)?.reshape((rows, nh, hd))?;
    let k = project(&attn.k_proj, xs, lora, li, Module::K)?.reshape((rows, nkv, hd))?;
    let v = project(&attn.v_proj, xs, lora, li, Module::V)?.reshape((rows, nkv, hd))?;
    let q = rope(&q, cos, sin)?;
    let k = rope(&k, cos, sin)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(lens.len());
    let mut offset = 0;
    for &n in lens {
        let q_s = q.narrow(0, offset, n)?.transpose(0, 1)?.contiguous()?; // [nh, n, hd]
        let k_s = k.narrow(0, offset, n)?.transpose(0, 1)?.contiguous()?; // [nkv, n, hd]
        let v_s = v.narrow(0, offset, n)?.transpose(0, 1)?.contiguous()?;
        offset += n;
        // The `group` query heads sharing a kv head are stacked along the row axis.
        let q_g = q_s.reshape((nkv, group * n, hd))?;
        let scores = (q_g.matmul(&k_s.t()?)? * scale)?
            .reshape((nkv, group, n, n))?
            .broadcast_add(&causal_mask(n, device)?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((nkv, group * n, n))?;
        let o = probs
            .matmul(&v_s)?
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .reshape((n, nh * hd))?;
        outs.push(o);
    }
    let o = Tensor::cat(&outs, 0)?;
    project(&attn.o_proj, &o, lora, li, Module::O)
}
