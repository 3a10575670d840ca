//! Frozen base projections for training: y = x·Wᵀ as a custom op whose backward returns only
//! the input gradient dX = dY·W. candle's own matmul backward would also compute (and keep) a
//! gradient for every frozen base matrix — the 49152×576 tied head included — which is pure
//! waste for LoRA, and the quantized base has no differentiable matmul at all.
//!
//! Quantized weights are unpacked into a temporary dense copy for each call (forward and
//! backward alike) and multiplied with candle's GEMM: with the hundreds of rows a training
//! micro-batch has, that is several times faster than the block kernel serving uses, and the
//! copy lives for one projection only, so the base stays shared with serving.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::kernels::{gemm_into, with_f32};
use crate::engine::model::linear::Linear;

/// A frozen weight [out, in] as a differentiable-in-x operation.
#[derive(Clone, Debug)]
pub enum Frozen {
    /// A base projection, quantized or dense.
    Linear(Linear),
    /// A dense f32 matrix (the tied embedding used as the output head).
    Dense(Tensor),
}

impl Frozen {
    fn weight(&self) -> Result<Tensor> {
        match self {
            Frozen::Linear(l) => l.dense_weight(),
            Frozen::Dense(t) => Ok(t.clone()),
        }
    }

    /// x·Wᵀ for `x` [rows, inp] (row-major) -> [rows, out], without bias.
    pub fn matmul_t(&self, x: &[f32], rows: usize, inp: usize) -> Result<Vec<f32>> {
        let w = self.weight()?;
        let (out, cols) = w.dims2()?;
        if cols != inp || x.len() != rows * inp {
            candle_core::bail!("frozen matmul: input has {inp} columns, weight has {cols}");
        }
        let mut y = vec![0f32; rows * out];
        with_f32(&w, |w| {
            gemm_into(&mut y, rows, out, inp, false, x, inp, 1, w, 1, inp, 1.0);
            Ok(())
        })?;
        Ok(y)
    }

    /// g·W for `g` [rows, out] -> [rows, in].
    pub fn matmul(&self, g: &[f32], rows: usize, out: usize) -> Result<Vec<f32>> {
        let w = self.weight()?;
        let (wo, inp) = w.dims2()?;
        if wo != out || g.len() != rows * out {
            candle_core::bail!("frozen matmul backward: gradient has {out} columns, weight {wo}");
        }
        let mut dx = vec![0f32; rows * inp];
        with_f32(&w, |w| {
            gemm_into(&mut dx, rows, inp, out, false, g, out, 1, w, inp, 1, 1.0);
            Ok(())
        })?;
        Ok(dx)
    }

    /// `x` [rows, in] -> [rows, out] (+ bias for linear layers that have one).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.contiguous()?.apply_op1(self.clone())?;
        match self {
            Frozen::Linear(l) => match l.bias() {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            },
            Frozen::Dense(_) => Ok(y),
        }
    }
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "adapterd-frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::kernels::f32_slice(storage, layout)?;
        let (rows, cols) = layout.shape().dims2()?;
        let y = self.matmul_t(x, rows, cols)?;
        let out = y.len() / rows.max(1);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, out) = grad_res.dims2()?;
        let dx = with_f32(grad_res, |g| self.matmul(g, rows, out))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
