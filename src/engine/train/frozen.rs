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
        let x = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("frozen matmul expects f32 activations"),
        };
        let (rows, cols) = layout.shape().dims2()?;
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &x[a..b],
            None => candle_core::bail!("frozen matmul expects a contiguous input"),
        };
        let w = self.weight()?;
        let (out, inp) = w.dims2()?;
        if inp != cols {
            candle_core::bail!("frozen matmul: input has {cols} columns, weight has {inp}");
        }
        let x = Tensor::from_slice(x, (rows, cols), &candle_core::Device::Cpu)?;
        let y = x.matmul(&w.t()?)?;
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let w = self.weight()?;
        Ok(Some(grad_res.matmul(&w)?))
    }
}
