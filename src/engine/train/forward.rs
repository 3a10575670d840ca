//! The training forward: the same llama computation as serving, written only with ops candle
//! can differentiate (no fused rms_norm, softmax or rope — they silently cut the graph), over a
//! packed batch of whole sequences (rows stacked, attention per sequence, no padding), with the
//! base projections frozen ([`Frozen`]) and LoRA deltas from trainable [`TrainableLora`].
//! It returns the log-probability of each target token, which is all the losses need.

use candle_core::{DType, Result, Tensor};

use super::frozen::Frozen;
use super::kernels::{Attention, HeadLogProb, LoraLinear, RmsNorm, Rope, SiluMul};
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
    // Only the rows that predict a target go through the final norm and the large head.
    let h = hidden.index_select(&rows, 0)?;
    let h = rms_norm(&h, &model.norm, model.cfg.rms_norm_eps)?;
    let weight = if model.cfg.tie_word_embeddings {
        model.embed.clone()
    } else {
        model.lm_head.dense_weight()?
    };
    h.apply_op1(HeadLogProb::new(weight, labels)?)
}

/// The RoPE op shared by every layer's q and k.
type RopeOp = std::sync::Arc<Box<dyn candle_core::CustomOp1 + Send + Sync>>;

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
    let cos: Vec<f32> = cos.index_select(&pos, 0)?.flatten_all()?.to_vec1()?;
    let sin: Vec<f32> = sin.index_select(&pos, 0)?.flatten_all()?.to_vec1()?;
    if cos.len() != total * half {
        candle_core::bail!("rope tables do not have head_dim/2 columns");
    }
    let rope: RopeOp = std::sync::Arc::new(Box::new(Rope { cos, sin }));
    let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();

    let mut xs = model.embed.index_select(&ids, 0)?;
    for (li, layer) in model.layers.iter().enumerate() {
        let h = rms_norm(&xs, &layer.input_norm, cfg.rms_norm_eps)?;
        let h = attention(model, lora, li, &h, &rope, &lens)?;
        let xs2 = (xs + h)?;
        let h = rms_norm(&xs2, &layer.post_attn_norm, cfg.rms_norm_eps)?;
        let gate = project(&layer.mlp.gate_proj, &h, lora, li, Module::Gate)?;
        let up = project(&layer.mlp.up_proj, &h, lora, li, Module::Up)?;
        let act = gate.apply_op2(&up, SiluMul)?;
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
    match lora.and_then(|l| l.get(layer, m)) {
        Some(p) => {
            let y = x.contiguous()?.apply_op3(
                p.a.as_tensor(),
                p.b.as_tensor(),
                LoraLinear {
                    base: Frozen::Linear(lin.clone()),
                    scale: p.scale as f32,
                },
            )?;
            match lin.bias() {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        }
        None => Frozen::Linear(lin.clone()).forward(x),
    }
}

/// RMSNorm with a frozen weight (a fused op with its own backward).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm::new(weight, eps)?)
}

fn attention(
    model: &Llama,
    lora: Option<&TrainableLora>,
    li: usize,
    xs: &Tensor,
    rope: &RopeOp,
    lens: &[usize],
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let attn = &model.layers[li].attn;
    let (rows, _) = xs.dims2()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let q = project(&attn.q_proj, xs, lora, li, Module::Q)?.reshape((rows, nh, hd))?;
    let k = project(&attn.k_proj, xs, lora, li, Module::K)?.reshape((rows, nkv, hd))?;
    let v = project(&attn.v_proj, xs, lora, li, Module::V)?.reshape((rows, nkv, hd))?;
    let q = q.apply_op1_arc(rope.clone())?;
    let k = k.apply_op1_arc(rope.clone())?;
    let o = q.apply_op3(&k, &v, Attention::new(lens.to_vec(), nh, nkv, hd))?;
    project(&attn.o_proj, &o, lora, li, Module::O)
}
