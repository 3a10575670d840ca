//! The llama forward over a ragged batch: the new tokens of every sequence in a step are
//! stacked into one [tokens, hidden] matrix, so each weight matrix is multiplied once per step
//! for all sequences; attention then runs per sequence against that sequence's own cache.
//! Weights use the Hugging Face row layout and half-rotated RoPE (GGUF q/k rows are
//! un-permuted at load), so PEFT adapters apply to q/k as published.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::cache::SeqCache;
use super::config::ModelConfig;
use super::fused_attention::attention_cpu;
use super::linear::Linear;
use super::qmatmul::ActivationPrecision;
use crate::engine::lora::packed::PackedView;
use crate::engine::lora::{self, LoraAdapter, LoraPair, Module};

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub attn: Attention,
    pub post_attn_norm: Tensor,
    pub mlp: Mlp,
}

/// Which code runs the forward's heavy operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// adapterd's CPU kernels: the quantized matmul (`qmatmul`), the fused decode attention and
    /// the fused LoRA pass. CPU only.
    Native,
    /// candle's own ops only (quantized matmul, rope, softmax, matmul, index_add): what runs on
    /// a GPU. On the CPU it is the reference the GPU path is tested by.
    Portable,
}

impl Kernels {
    /// Native on the CPU, portable elsewhere.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self::Native
        } else {
            Self::Portable
        }
    }
}

/// Frozen weights and the RoPE tables; immutable, shared (`Arc`) by every sequence.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    kernels: Kernels,
    precision: ActivationPrecision,
}

/// One sequence's part of a forward step.
pub struct SeqInput<'a> {
    /// New tokens; their positions continue from `cache.len()`.
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    /// Logits for every new token (prompt scoring) instead of only the last one.
    pub all_logits: bool,
    /// The LoRA adapter this sequence runs with, if any.
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// The rows of one step that share an adapter (S-LoRA/Punica style: the base matmul runs once
/// for all rows, then each group adds its own low-rank delta).
struct AdapterGroup {
    adapter: Arc<LoraAdapter>,
    rows: Tensor,
    row_ids: Vec<u32>,
}

/// Groups the rows of `batch` by adapter (pointer identity: one resident copy per version).
fn adapter_groups(batch: &[SeqInput<'_>], device: &Device) -> Result<Vec<AdapterGroup>> {
    let mut groups: Vec<(Arc<LoraAdapter>, Vec<u32>)> = Vec::new();
    let mut offset = 0u32;
    for s in batch {
        let n = s.tokens.len() as u32;
        if let Some(a) = &s.adapter {
            match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, a)) {
                Some((_, rows)) => rows.extend(offset..offset + n),
                None => groups.push((a.clone(), (offset..offset + n).collect())),
            }
        }
        offset += n;
    }
    groups
        .into_iter()
        .map(|(adapter, rows)| {
            let n = rows.len();
            Ok(AdapterGroup {
                adapter,
                rows: Tensor::from_vec(rows.clone(), n, device)?,
                row_ids: rows,
            })
        })
        .collect()
}

/// A step's adapter groups, each with its adapter's packed table locked for the step where it
/// has one ([`lora::packed`]): the fused CPU pass then reads one table entry per projection
/// and group instead of the pair's tensors.
struct StepAdapters<'a> {
    groups: &'a [AdapterGroup],
    /// One per group; all empty off the native CPU path.
    packed: Vec<Option<PackedView<'a>>>,
}

impl<'a> StepAdapters<'a> {
    fn lock(groups: &'a [AdapterGroup], native: bool) -> Self {
        let packed = groups
            .iter()
            .map(|g| {
                native
                    .then(|| g.adapter.packed().map(|p| p.lock()))
                    .flatten()
            })
            .collect();
        Self { groups, packed }
    }
}

/// `base(xs)` plus, for every adapter group that adapts this projection, scale·B(A·x) on the
/// group's rows.
fn project(
    lin: &Linear,
    xs: &Tensor,
    layer: usize,
    module: Module,
    adapters: &StepAdapters<'_>,
    precision: ActivationPrecision,
    native: bool,
) -> Result<Tensor> {
    let ys = lin.forward(xs, precision)?;
    add_deltas(ys, xs, layer, module, adapters, native)
}

/// `ys` plus scale·B(A·x) on the rows of every group whose adapter adapts `module` here: one
/// fused pass with the native kernels ([`lora::apply`]), candle ops otherwise.
fn add_deltas(
    mut ys: Tensor,
    xs: &Tensor,
    layer: usize,
    module: Module,
    adapters: &StepAdapters<'_>,
    native: bool,
) -> Result<Tensor> {
    if native && !adapters.packed.is_empty() && adapters.packed.iter().all(Option::is_some) {
        let pairs: Vec<_> = adapters
            .groups
            .iter()
            .zip(&adapters.packed)
            .filter_map(|(g, view)| Some((view.as_ref()?.pair(layer, module)?, &g.row_ids[..])))
            .collect();
        if pairs.is_empty() {
            return Ok(ys);
        }
        // In place: `ys` is this projection's fresh output, owned here.
        if lora::apply::add_pairs_cpu(&ys, xs, &pairs)? {
            return Ok(ys);
        }
    }
    let adapted: Vec<(&AdapterGroup, &LoraPair)> = adapters
        .groups
        .iter()
        .filter_map(|g| {
            let pair = g.adapter.layers.get(layer).and_then(|l| l.get(module))?;
            Some((g, pair))
        })
        .collect();
    if adapted.is_empty() {
        return Ok(ys);
    }
    if native {
        let fused: Vec<(&LoraPair, &[u32])> = adapted
            .iter()
            .map(|(g, p)| (*p, g.row_ids.as_slice()))
            .collect();
        // In place: `ys` is this projection's fresh output, owned here.
        if lora::apply::add_deltas_cpu(&ys, xs, &fused)? {
            return Ok(ys);
        }
    }
    for (g, pair) in adapted {
        let x = xs.index_select(&g.rows, 0)?;
        // A/B are f16 or int8 when they were made for the CPU's fused pass; candle's matmul
        // wants one dtype.
        let (a, b) = pair.dense_f32()?;
        let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
        let delta = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * pair.scale)?;
        ys = ys.index_add(&g.rows, &delta.to_dtype(ys.dtype())?, 0)?;
    }
    Ok(ys)
}

/// [`project`] for several projections of the same input, their base matmuls fused.
fn project_many<const N: usize>(
    lins: [(&Linear, Module); N],
    xs: &Tensor,
    layer: usize,
    adapters: &StepAdapters<'_>,
    precision: ActivationPrecision,
    native: bool,
) -> Result<[Tensor; N]> {
    let bases = Linear::forward_many(&lins.map(|(l, _)| l), xs, precision)?;
    let mut out = Vec::with_capacity(N);
    for (ys, (_, module)) in bases.into_iter().zip(lins) {
        out.push(add_deltas(ys, xs, layer, module, adapters, native)?);
    }
    out.try_into()
        .map_err(|_| candle_core::Error::Msg("fused projection count".into()))
}

impl Llama {
    pub fn new(
        cfg: ModelConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            kernels: Kernels::for_device(device),
            precision: ActivationPrecision::default(),
        })
    }

    /// How activations meet quantized weights in the forward (int16 by default: see
    /// [`ActivationPrecision`]).
    pub fn set_activation_precision(&mut self, precision: ActivationPrecision) {
        self.precision = precision;
    }

    pub fn activation_precision(&self) -> ActivationPrecision {
        self.precision
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Runs the forward on candle's ops alone, as on a GPU (the loader also keeps quantized
    /// weights in candle's form for such a model: see `load::load_gguf`).
    pub(crate) fn use_portable_kernels(&mut self) {
        self.kernels = Kernels::Portable;
    }

    fn native(&self) -> bool {
        self.kernels == Kernels::Native
    }

    /// The RoPE tables, cos and sin, each [max_positions, head_dim/2] (half-rotated layout).
    pub fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Runs one step for every sequence in `batch` and returns logits [rows, vocab] (f32):
    /// one row per sequence, or one per new token for sequences with `all_logits`, in batch
    /// order. Every sequence's cache grows by its number of new tokens.
    pub fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for s in batch.iter() {
            if s.tokens.is_empty() {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            let start = s.cache.len();
            if start + s.tokens.len() > cfg.max_position_embeddings {
                candle_core::bail!(
                    "sequence of {} positions exceeds the context of {}",
                    start + s.tokens.len(),
                    cfg.max_position_embeddings
                );
            }
            tokens.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }
        let total = tokens.len();
        let ids = Tensor::from_vec(tokens, total, &self.device)?;
        let pos = Tensor::from_vec(positions, total, &self.device)?;
        let half = cfg.head_dim / 2;
        // [rows, 1, head_dim/2]: rope() treats every row as its own batch entry, so each row
        // is rotated by its own position in a single op.
        let cos = self.cos.index_select(&pos, 0)?.reshape((total, 1, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((total, 1, half))?;

        let groups = adapter_groups(batch, &self.device)?;
        let adapters = StepAdapters::lock(&groups, self.native());
        let mut xs = self.embed.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &xs;
            let h = candle_nn::ops::rms_norm(&xs, &layer.input_norm, cfg.rms_norm_eps as f32)?;
            let h = self.attention(li, &layer.attn, &h, &cos, &sin, batch, &adapters)?;
            let xs2 = (residual + h)?;
            let h = candle_nn::ops::rms_norm(&xs2, &layer.post_attn_norm, cfg.rms_norm_eps as f32)?;
            let [gate, up] = project_many(
                [
                    (&layer.mlp.gate_proj, Module::Gate),
                    (&layer.mlp.up_proj, Module::Up),
                ],
                &h,
                li,
                &adapters,
                self.precision,
                self.native(),
            )?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            let h = project(
                &layer.mlp.down_proj,
                &act,
                li,
                Module::Down,
                &adapters,
                self.precision,
                self.native(),
            )?;
            xs = (xs2 + h)?;
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }

        // Only the rows whose logits are wanted go through the (large) output projection.
        let mut rows = Vec::with_capacity(batch.len());
        let mut offset = 0u32;
        for s in batch.iter() {
            let n = s.tokens.len() as u32;
            if s.all_logits {
                rows.extend(offset..offset + n);
            } else {
                rows.push(offset + n - 1);
            }
            offset += n;
        }
        let n_rows = rows.len();
        let rows = Tensor::from_vec(rows, n_rows, &self.device)?;
        let xs = xs.index_select(&rows, 0)?;
        let xs = candle_nn::ops::rms_norm(&xs, &self.norm, cfg.rms_norm_eps as f32)?;
        self.lm_head
            .forward(&xs, self.precision)?
            .to_dtype(DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer_idx: usize,
        attn: &Attention,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &mut [SeqInput<'_>],
        adapters: &StepAdapters<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (rows, _) = xs.dims2()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let group = nh / nkv;
        let [q, k, v] = project_many(
            [
                (&attn.q_proj, Module::Q),
                (&attn.k_proj, Module::K),
                (&attn.v_proj, Module::V),
            ],
            xs,
            layer_idx,
            adapters,
            self.precision,
            self.native(),
        )?;
        let q = q.reshape((rows, nh, 1, hd))?;
        let k = k.reshape((rows, nkv, 1, hd))?;
        let v = v.reshape((rows, nkv, hd))?;
        let q = candle_nn::rotary_emb::rope(&q.contiguous()?, cos, sin)?.reshape((rows, nh, hd))?;
        let k =
            candle_nn::rotary_emb::rope(&k.contiguous()?, cos, sin)?.reshape((rows, nkv, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();

        // Each sequence attends over its own cache: a dozen small tensor ops per sequence and
        // layer, which with several sequences would leave the second thread idle between the
        // matmuls; they run in parallel over sequences instead.
        let mut offsets = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for s in batch.iter() {
            offsets.push(offset);
            offset += s.tokens.len();
        }
        // The queries as plain values for the fused CPU pass.
        let q_host: Option<Vec<f32>> = if self.native() && q.dtype() == DType::F32 {
            Some(q.flatten_all()?.to_vec1()?)
        } else {
            None
        };
        let one = |s: &mut SeqInput<'_>, offset: usize| -> Result<Tensor> {
            let n = s.tokens.len();
            let start = s.cache.len();
            // [n, heads, hd] -> [heads, n, hd]
            let k_s = k.narrow(0, offset, n)?.transpose(0, 1)?.contiguous()?;
            let v_s = v.narrow(0, offset, n)?.transpose(0, 1)?.contiguous()?;
            // Views of the preallocated cache, [nkv, len, hd] with a batch stride of its
            // capacity: candle's matmul takes that stride as it is, so no per-step copy of the
            // whole cache.
            let (k_all, v_all) = s.cache.append(layer_idx, &k_s, &v_s)?;
            if let Some(qv) = &q_host {
                let q_rows = &qv[offset * nh * hd..(offset + n) * nh * hd];
                if let Some(o) = attention_cpu(q_rows, &k_all, &v_all, nh, scale as f32)? {
                    return Tensor::from_vec(o, (n, nh * hd), &self.device);
                }
            }
            let q_s = q.narrow(0, offset, n)?.transpose(0, 1)?.contiguous()?;
            let len = start + n;
            // Grouped-query attention without copying keys: the `group` query heads that share
            // a kv head are stacked along the row axis.
            let q_g = q_s.reshape((nkv, group * n, hd))?;
            let scores = (q_g.matmul(&k_all.t()?)? * scale)?;
            let scores = if n > 1 {
                let mask = causal_mask(n, start, &self.device)?;
                scores
                    .reshape((nkv, group, n, len))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, group * n, len))?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&v_all)?; // [nkv, group*n, hd]
            o.reshape((nh, n, hd))?
                .transpose(0, 1)?
                .reshape((n, nh * hd))
        };
        let mut outs = if batch.len() > 1 && self.device.is_cpu() {
            batch
                .par_iter_mut()
                .zip(offsets)
                .map(|(s, off)| one(s, off))
                .collect::<Result<Vec<_>>>()?
        } else {
            batch
                .iter_mut()
                .zip(offsets)
                .map(|(s, off)| one(s, off))
                .collect::<Result<Vec<_>>>()?
        };
        let o = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| candle_core::Error::Msg("empty batch".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        project(
            &attn.o_proj,
            &o,
            layer_idx,
            Module::O,
            adapters,
            self.precision,
            self.native(),
        )
    }
}

/// [n, start+n] additive mask: query i (at position start+i) sees keys 0..=start+i.
pub(super) fn causal_mask(n: usize, start: usize, device: &Device) -> Result<Tensor> {
    let len = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..len).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, len), device)
}

/// cos/sin tables [max_positions, head_dim/2] for half-rotated RoPE.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim;
    let inv_freq: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / hd as f32))
        .collect();
    let n = cfg.max_position_embeddings;
    let inv_freq = Tensor::from_vec(inv_freq, (1, hd / 2), device)?;
    let t = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
