//! The training forward's operations composed from candle's own differentiable ops, for a model
//! on the portable kernels (a GPU): no custom op, so they run on any device. They compute what
//! the fused CPU kernels compute (tests compare values and gradients); the price is memory and
//! work candle's autograd adds: every [rows, vocab] temporary of the log-softmax is kept for the
//! backward, and candle's matmul backward also forms a gradient for each frozen weight, which
//! is then dropped.

use candle_core::{Result, Tensor, D};

use super::forward::TrainOps;
use super::params::TrainPair;
use crate::engine::model::linear::Linear;

pub(super) struct Composed {
    /// [rows, 1, head_dim/2]: each row's RoPE angle terms.
    cos: Tensor,
    sin: Tensor,
    lens: Vec<usize>,
    nh: usize,
    nkv: usize,
    hd: usize,
}

impl Composed {
    /// `cos`/`sin` [rows, head_dim/2] at each row's position; `attention` is (sequence lengths,
    /// query heads, kv heads, head dim).
    pub(super) fn new(
        cos: Tensor,
        sin: Tensor,
        attention: (Vec<usize>, usize, usize, usize),
    ) -> Result<Self> {
        let (lens, nh, nkv, hd) = attention;
        if nkv == 0 || !nh.is_multiple_of(nkv) || !hd.is_multiple_of(2) {
            candle_core::bail!("{nh} query heads do not share {nkv} kv heads of size {hd}");
        }
        let (rows, half) = cos.dims2()?;
        if half != hd / 2 || rows != lens.iter().sum::<usize>() {
            candle_core::bail!("rope rows [{rows}, {half}] do not match the batch");
        }
        Ok(Self {
            cos: cos.reshape((rows, 1, half))?,
            sin: sin.reshape((rows, 1, half))?,
            lens,
            nh,
            nkv,
            hd,
        })
    }
}

/// Softmax over the last dimension; the row maximum is a constant for autograd (softmax does
/// not depend on it, and candle would otherwise route gradient through the max).
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// [n, n] additive causal mask.
fn causal_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}

impl TrainOps for Composed {
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?
            .broadcast_mul(&weight.detach())
    }

    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        let half = self.hd / 2;
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let (cos, sin) = (&self.cos, &self.sin);
        let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Tensor::cat(&[first, second], 2)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.nh, self.nkv, self.hd);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(self.lens.len());
        let mut off = 0;
        for &n in &self.lens {
            // Query heads that share a kv head are stacked along the row axis (head h reads kv
            // head h / group), so no key is copied per query head.
            let q_s = q.narrow(0, off, n)?.transpose(0, 1)?.contiguous()?;
            let q_g = q_s.reshape((nkv, group * n, hd))?;
            let k_s = k.narrow(0, off, n)?.transpose(0, 1)?.contiguous()?;
            let v_s = v.narrow(0, off, n)?.transpose(0, 1)?.contiguous()?;
            let scores = (q_g.matmul(&k_s.t()?)? * scale)?
                .reshape((nkv, group, n, n))?
                .broadcast_add(&causal_mask(n, q.device())?)?
                .reshape((nkv, group * n, n))?;
            let o = softmax_last(&scores)?.matmul(&v_s)?;
            outs.push(
                o.reshape((nh, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, nh * hd))?,
            );
            off += n;
        }
        Tensor::cat(&outs, 0)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    fn project(&self, lin: &Linear, x: &Tensor, pair: Option<&TrainPair>) -> Result<Tensor> {
        let w = lin.dense_weight()?.detach();
        let mut y = x.matmul(&w.t()?)?;
        if let Some(p) = pair {
            let delta = x
                .matmul(&p.a.as_tensor().t()?)?
                .matmul(&p.b.as_tensor().t()?)?;
            y = (y + (delta * p.scale)?)?;
        }
        match lin.bias() {
            Some(b) => y.broadcast_add(&b.detach()),
            None => Ok(y),
        }
    }

    fn head_logprob(&self, h: &Tensor, weight: Tensor, labels: Vec<u32>) -> Result<Tensor> {
        let rows = labels.len();
        let logits = h.matmul(&weight.detach().t()?)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let labels = Tensor::from_vec(labels, (rows, 1), h.device())?;
        (shifted.gather(&labels, 1)? - lse)?.reshape(rows)
    }
}
