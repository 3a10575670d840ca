//! The training forward: the same llama computation as serving, written only with ops candle
//! can differentiate, over a packed batch of whole sequences (rows stacked, attention per
//! sequence, no padding), with the base projections frozen and LoRA deltas from trainable
//! [`TrainableLora`]. It returns the log-probability of each target token, which is all the
//! losses need. The layer loop is written once over [`TrainOps`]: fused custom ops with
//! hand-written backward passes for a model on the native CPU kernels ([`Fused`]), candle's
//! composed ops for a portable one, i.e. on a GPU ([`super::composed::Composed`]).

use candle_core::{DType, Result, Tensor};

use super::composed::Composed;
use super::frozen::Frozen;
use super::kernels::{Attention, HeadLogProb, LoraLinear, RmsNorm, Rope, SiluMul};
use super::params::{TrainPair, TrainableLora};
use crate::engine::lora::Module;
use crate::engine::model::linear::Linear;
use crate::engine::model::{Kernels, Llama};

/// One sequence and the positions whose tokens are scored.
pub struct Scored<'a> {
    pub tokens: &'a [u32],
    /// `targets[i]`: score token `i` given `tokens[..i]` (`targets[0]` must be false).
    pub targets: &'a [bool],
}

/// The differentiable operations of one training forward, set up for one packed batch (the
/// RoPE rows and the sequence lengths are the batch's).
pub(super) trait TrainOps {
    /// `x` [rows, n] normalised with a frozen weight.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor>;
    /// Half-rotated RoPE of `x` [rows, heads, hd] at each row's position.
    fn rope(&self, x: &Tensor) -> Result<Tensor>;
    /// Causal attention per sequence: q [rows, nh, hd], k/v [rows, nkv, hd] -> [rows, nh·hd].
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// silu(gate)·up.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// x·Wᵀ (+ bias) with W frozen, plus scale·B(A·x) when `pair` is given.
    fn project(&self, lin: &Linear, x: &Tensor, pair: Option<&TrainPair>) -> Result<Tensor>;
    /// log p(label) of each row of `h` [rows, hidden] under logits h·Wᵀ.
    fn head_logprob(&self, h: &Tensor, weight: Tensor, labels: Vec<u32>) -> Result<Tensor>;
}

/// The fused CPU training kernels ([`super::kernels`], [`Frozen`]).
struct Fused {
    rope: RopeOp,
    attention: (Vec<usize>, usize, usize, usize),
}

/// The RoPE op shared by every layer's q and k.
type RopeOp = std::sync::Arc<Box<dyn candle_core::CustomOp1 + Send + Sync>>;

impl TrainOps for Fused {
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        x.contiguous()?.apply_op1(RmsNorm::new(weight, eps)?)
    }

    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_arc(self.rope.clone())
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (lens, nh, nkv, hd) = &self.attention;
        q.apply_op3(k, v, Attention::new(lens.clone(), *nh, *nkv, *hd))
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.apply_op2(up, SiluMul)
    }

    fn project(&self, lin: &Linear, x: &Tensor, pair: Option<&TrainPair>) -> Result<Tensor> {
        let Some(p) = pair else {
            return Frozen::Linear(lin.clone()).forward(x);
        };
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

    fn head_logprob(&self, h: &Tensor, weight: Tensor, labels: Vec<u32>) -> Result<Tensor> {
        h.apply_op1(HeadLogProb::new(weight, labels)?)
    }
}

/// A packed batch: token ids, positions and sequence lengths.
struct Packed {
    ids: Tensor,
    pos: Tensor,
    lens: Vec<usize>,
}

fn pack(model: &Llama, seqs: &[Scored<'_>]) -> Result<Packed> {
    let cfg = &model.cfg;
    let device = model.device();
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
    Ok(Packed {
        ids: Tensor::from_vec(tokens, total, device)?,
        pos: Tensor::from_vec(positions, total, device)?,
        lens: seqs.iter().map(|s| s.tokens.len()).collect(),
    })
}

/// The operations for `model`'s kernels, set up for `packed`.
fn ops_for(model: &Llama, packed: &Packed) -> Result<Box<dyn TrainOps>> {
    let cfg = &model.cfg;
    let (cos, sin) = model.rope_tables();
    let cos = cos.index_select(&packed.pos, 0)?;
    let sin = sin.index_select(&packed.pos, 0)?;
    let attention = (
        packed.lens.clone(),
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    if model.kernels() == Kernels::Portable {
        return Ok(Box::new(Composed::new(cos, sin, attention)?));
    }
    let total = packed.lens.iter().sum::<usize>();
    let cos: Vec<f32> = cos.flatten_all()?.to_vec1()?;
    let sin: Vec<f32> = sin.flatten_all()?.to_vec1()?;
    if cos.len() != total * (cfg.head_dim / 2) {
        candle_core::bail!("rope tables do not have head_dim/2 columns");
    }
    Ok(Box::new(Fused {
        rope: std::sync::Arc::new(Box::new(Rope { cos, sin })),
        attention,
    }))
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
    let packed = pack(model, seqs)?;
    let ops = ops_for(model, &packed)?;
    let hidden = hidden_states(model, lora, &packed, ops.as_ref())?;
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
    let h = ops.rms_norm(&h, &model.norm, model.cfg.rms_norm_eps)?;
    let weight = if model.cfg.tie_word_embeddings {
        model.embed.clone()
    } else {
        model.lm_head.dense_weight()?
    };
    ops.head_logprob(&h, weight, labels)
}

/// Hidden states after the last decoder layer (before the final norm), [total tokens, hidden].
fn hidden_states(
    model: &Llama,
    lora: Option<&TrainableLora>,
    packed: &Packed,
    ops: &dyn TrainOps,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let pair = |li: usize, m: Module| lora.and_then(|l| l.get(li, m));
    let mut xs = model.embed.index_select(&packed.ids, 0)?;
    for (li, layer) in model.layers.iter().enumerate() {
        let h = ops.rms_norm(&xs, &layer.input_norm, cfg.rms_norm_eps)?;
        let h = attention(model, lora, li, &h, ops)?;
        let xs2 = (xs + h)?;
        let h = ops.rms_norm(&xs2, &layer.post_attn_norm, cfg.rms_norm_eps)?;
        let gate = ops.project(&layer.mlp.gate_proj, &h, pair(li, Module::Gate))?;
        let up = ops.project(&layer.mlp.up_proj, &h, pair(li, Module::Up))?;
        let act = ops.silu_mul(&gate, &up)?;
        let h = ops.project(&layer.mlp.down_proj, &act, pair(li, Module::Down))?;
        xs = (xs2 + h)?;
    }
    Ok(xs)
}

fn attention(
    model: &Llama,
    lora: Option<&TrainableLora>,
    li: usize,
    xs: &Tensor,
    ops: &dyn TrainOps,
) -> Result<Tensor> {
    let cfg = &model.cfg;
    let attn = &model.layers[li].attn;
    let pair = |m: Module| lora.and_then(|l| l.get(li, m));
    let (rows, _) = xs.dims2()?;
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let q = ops
        .project(&attn.q_proj, xs, pair(Module::Q))?
        .reshape((rows, nh, hd))?;
    let k = ops
        .project(&attn.k_proj, xs, pair(Module::K))?
        .reshape((rows, nkv, hd))?;
    let v = ops
        .project(&attn.v_proj, xs, pair(Module::V))?
        .reshape((rows, nkv, hd))?;
    let o = ops.attention(&ops.rope(&q)?, &ops.rope(&k)?, &v)?;
    ops.project(&attn.o_proj, &o, pair(Module::O))
}
