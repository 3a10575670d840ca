//! `Linear`: y = x·Wᵀ (+ b) over a frozen weight kept as loaded — quantized GGUF blocks or a
//! dense tensor. This is the one place the forward multiplies by base weights, so it is where
//! per-row LoRA deltas attach.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

use super::qmatmul::{self, ActivationPrecision, QWeight};

/// How the frozen weight is stored and multiplied.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Q4_0/Q4_1/Q8_0 blocks through our own kernel (`qmatmul`).
    Blocks(Arc<QWeight>),
    /// Anything else: candle's quantized matmul, or a dense tensor (`QMatMul::Tensor`).
    Candle(QMatMul),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// `weight` is [out, in] (quantized or dense f32); `bias` is [out].
    pub fn new(
        weight: Weight,
        bias: Option<Tensor>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            in_features,
            out_features,
        }
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The weight as a dense f32 tensor [out, in]: a temporary, dequantized copy for quantized
    /// weights (training multiplies by it and drops it), the tensor itself for dense ones.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Blocks(w) => Tensor::from_vec(
                w.dequantize(),
                (w.rows(), w.cols()),
                &candle_core::Device::Cpu,
            ),
            Weight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device()),
            Weight::Candle(QMatMul::Tensor(t)) => t.to_dtype(DType::F32),
            Weight::Candle(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32),
        }
    }

    /// `xs`: [rows, in] -> [rows, out]. `precision` applies to block weights (our kernel);
    /// candle's own matmul ignores it.
    pub fn forward(&self, xs: &Tensor, precision: ActivationPrecision) -> Result<Tensor> {
        let ys = match &self.weight {
            Weight::Blocks(w) => w.forward(&xs.contiguous()?, precision)?,
            Weight::Candle(w) => w.forward(xs)?,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }

    /// Several projections of the same input (q/k/v, gate/up): block weights go through one
    /// fused kernel call (activations quantized once, one parallel region), others one by one.
    pub fn forward_many(
        lins: &[&Linear],
        xs: &Tensor,
        precision: ActivationPrecision,
    ) -> Result<Vec<Tensor>> {
        let blocks: Option<Vec<&QWeight>> = lins
            .iter()
            .map(|l| match &l.weight {
                Weight::Blocks(w) => Some(&**w),
                Weight::Candle(_) => None,
            })
            .collect();
        let Some(blocks) = blocks else {
            return lins.iter().map(|l| l.forward(xs, precision)).collect();
        };
        let ys = qmatmul::forward_multi(&blocks, xs, precision)?;
        ys.into_iter()
            .zip(lins)
            .map(|(y, l)| match &l.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            })
            .collect()
    }
}
