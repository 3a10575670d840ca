//! Fused training kernels as candle custom ops with hand-written backward passes: the output
//! head's log-softmax + target gather, RMSNorm, RoPE and SiLU·up. Each replaces a chain of
//! composed candle ops (each a full pass over memory, a fresh allocation and, for binary ops,
//! single-threaded work) by one pass parallel over rows. Rows are independent, so rayon's
//! scheduling never changes a result: every reduction runs sequentially within its row.
//! Tests in this module check each against the composed form it replaces.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 data of a custom-op input.
pub(crate) fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let v = match storage {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("fused kernels expect f32"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused kernels expect a contiguous input"),
    }
}

/// The contiguous f32 data of a tensor (copied only if it is not contiguous f32 already).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(f32_slice(s, layout)?),
        _ => candle_core::bail!("fused kernels run on the CPU"),
    }
}

fn parallelism() -> gemm::Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// dst[m, n] (row-major) = (acc ? dst : 0) + alpha·lhs·rhs, where lhs is [m, k] and rhs is
/// [k, n], each given by (row stride, column stride). The same gemm call candle's matmul makes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    alpha: f32,
) {
    gemm_with(
        dst,
        (m, n, k),
        acc,
        (lhs, lhs_rs, lhs_cs),
        (rhs, rhs_rs, rhs_cs),
        alpha,
        parallelism(),
    )
}

/// A matrix operand: data, row stride, column stride.
type Mat<'a> = (&'a [f32], usize, usize);

/// [`gemm_into`] single-threaded, for small products inside a rayon task.
fn gemm_seq(dst: &mut [f32], mnk: (usize, usize, usize), acc: bool, lhs: Mat, rhs: Mat) {
    gemm_with(dst, mnk, acc, lhs, rhs, 1.0, gemm::Parallelism::None)
}

fn gemm_with(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    acc: bool,
    (lhs, lhs_rs, lhs_cs): Mat,
    (rhs, rhs_rs, rhs_cs): Mat,
    alpha: f32,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the bounds of all three matrices are checked above; dst does not alias.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if acc { 1.0 } else { 0.0 },
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// Output head + log-softmax + gather: `h` [rows, hidden] (after the final norm) ->
/// log p(label_r) [rows] under logits h·Wᵀ. The backward, g·(onehot − softmax)·W, needs only
/// the softmax, which the forward keeps (one [rows, vocab] buffer, turned into the logits'
/// gradient in place) instead of the ~10 [rows, vocab] temporaries of the composed ops.
pub struct HeadLogProb {
    /// [vocab, hidden], dense f32 contiguous.
    pub weight: Tensor,
    pub labels: Vec<u32>,
    probs: Mutex<Option<Vec<f32>>>,
}

impl HeadLogProb {
    pub fn new(weight: Tensor, labels: Vec<u32>) -> Result<Self> {
        Ok(Self {
            weight: weight.contiguous()?,
            labels,
            probs: Mutex::new(None),
        })
    }

    /// Softmax rows [rows, vocab] and the target log-probabilities [rows].
    fn probs_and_logp(&self, h: &[f32], rows: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (vocab, hidden) = self.weight.dims2()?;
        if h.len() != rows * hidden || self.labels.len() != rows {
            candle_core::bail!("head: shape mismatch");
        }
        let mut logits = vec![0f32; rows * vocab];
        with_f32(&self.weight, |w| {
            gemm_into(
                &mut logits,
                rows,
                vocab,
                hidden,
                false,
                h,
                hidden,
                1,
                w,
                1,
                hidden,
                1.0,
            );
            Ok(())
        })?;
        let mut logp = vec![0f32; rows];
        logits
            .par_chunks_mut(vocab)
            .zip(logp.par_iter_mut())
            .zip(self.labels.par_iter())
            .for_each(|((row, lp), &label)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let target = row[label as usize] - max;
                let mut sum = 0f32;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let log_sum = sum.ln();
                // log p = (l − max) − log Σ exp(l − max), as candle's log_softmax.
                *lp = target - log_sum;
                let inv = 1.0 / sum;
                for v in row.iter_mut() {
                    *v *= inv;
                }
            });
        Ok((logits, logp))
    }
}

impl CustomOp1 for HeadLogProb {
    fn name(&self) -> &'static str {
        "adapterd-head-logprob"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(storage, layout)?;
        let (rows, _) = layout.shape().dims2()?;
        let (probs, logp) = self.probs_and_logp(h, rows)?;
        if let Ok(mut p) = self.probs.lock() {
            *p = Some(probs);
        }
        Ok((CpuStorage::F32(logp), Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, hidden) = arg.dims2()?;
        let (vocab, _) = self.weight.dims2()?;
        let stored = self.probs.lock().ok().and_then(|mut p| p.take());
        let mut probs = match stored {
            Some(p) => p,
            None => with_f32(arg, |h| Ok(self.probs_and_logp(h, rows)?.0))?,
        };
        let g: Vec<f32> = grad_res.to_vec1()?;
        // d log p(label) / d logit_j = onehot_j − p_j, times the incoming gradient.
        probs
            .par_chunks_mut(vocab)
            .zip(g.par_iter())
            .zip(self.labels.par_iter())
            .for_each(|((row, &g), &label)| {
                for v in row.iter_mut() {
                    *v *= -g;
                }
                row[label as usize] += g;
            });
        let mut dx = vec![0f32; rows * hidden];
        with_f32(&self.weight, |w| {
            gemm_into(
                &mut dx, rows, hidden, vocab, false, &probs, vocab, 1, w, hidden, 1, 1.0,
            );
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, (rows, hidden), arg.device())?))
    }
}

/// Rows per rayon task for the row-wise kernels (rows are a few hundred to a few thousand
/// floats; smaller tasks cost more in scheduling than they save).
const MIN_ROWS: usize = 8;

/// RMSNorm with a frozen weight: `x` [rows, n] -> x / √(mean(x²) + eps) · w. Backward: only dX,
/// dx = r·w∘g − x·r³/n·Σ(g∘w∘x) with r = (mean(x²) + eps)^(−1/2).
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(weight: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.flatten_all()?.to_vec1()?,
            eps: eps as f32,
        })
    }

    fn inv_rms(&self, row: &[f32]) -> f32 {
        let n = row.len();
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let ms = ss * (1.0 / n as f32);
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "adapterd-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let n = layout.shape().dims().last().copied().unwrap_or(0);
        if n != self.weight.len() {
            candle_core::bail!("rms_norm: {n} columns, weight {}", self.weight.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(MIN_ROWS)
            .for_each(|(y, x)| {
                let d = (x.iter().map(|v| v * v).sum::<f32>() * (1.0 / n as f32) + self.eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(&self.weight) {
                    *y = x / d * w;
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let n = self.weight.len();
        let dx = with_f32(arg, |x| {
            with_f32(grad_res, |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(n)
                    .zip(x.par_chunks(n).zip(g.par_chunks(n)))
                    .with_min_len(MIN_ROWS)
                    .for_each(|(dx, (x, g))| {
                        let r = self.inv_rms(x);
                        let dot: f32 = x
                            .iter()
                            .zip(g)
                            .zip(&self.weight)
                            .map(|((x, g), w)| x * g * w)
                            .sum();
                        let c = r * r * r * dot / n as f32;
                        for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&self.weight) {
                            *dx = r * w * g - x * c;
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Half-rotated RoPE on `x` [rows, heads, head_dim] with per-row tables `cos`, `sin`
/// [rows, head_dim/2]. The backward is the inverse rotation.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    fn apply(&self, x: &[f32], heads: usize, hd: usize, inverse: bool) -> Vec<f32> {
        let half = hd / 2;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(heads * hd)
            .zip(x.par_chunks(heads * hd))
            .enumerate()
            .with_min_len(MIN_ROWS)
            .for_each(|(r, (y, x))| {
                let cos = &self.cos[r * half..(r + 1) * half];
                let sin = &self.sin[r * half..(r + 1) * half];
                for (y, x) in y.chunks_mut(hd).zip(x.chunks(hd)) {
                    let (x1, x2) = x.split_at(half);
                    let (y1, y2) = y.split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (cos[i], sin[i]);
                        if inverse {
                            y1[i] = x1[i] * c + x2[i] * s;
                            y2[i] = x2[i] * c - x1[i] * s;
                        } else {
                            y1[i] = x1[i] * c - x2[i] * s;
                            y2[i] = x2[i] * c + x1[i] * s;
                        }
                    }
                }
            });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "adapterd-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let (rows, heads, hd) = layout.shape().dims3()?;
        if self.cos.len() != rows * hd / 2 || self.sin.len() != self.cos.len() {
            candle_core::bail!("rope: tables do not match {rows} rows");
        }
        let y = self.apply(x, heads, hd, false);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, heads, hd) = arg.dims3()?;
        let dx = with_f32(grad_res, |g| Ok(self.apply(g, heads, hd, true)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// silu(gate)·up, elementwise over two same-shaped tensors.
pub struct SiluMul;

const SILU_CHUNK: usize = 4096;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "adapterd-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu_mul: shapes differ");
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(SILU_CHUNK)
            .zip(g.par_chunks(SILU_CHUNK).zip(u.par_chunks(SILU_CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let mut dg = vec![0f32; n];
        let mut du = vec![0f32; n];
        with_f32(gate, |g| {
            with_f32(up, |u| {
                with_f32(grad_res, |d| {
                    dg.par_chunks_mut(SILU_CHUNK)
                        .zip(du.par_chunks_mut(SILU_CHUNK))
                        .zip(g.par_chunks(SILU_CHUNK))
                        .zip(u.par_chunks(SILU_CHUNK).zip(d.par_chunks(SILU_CHUNK)))
                        .for_each(|(((dg, du), g), (u, d))| {
                            for i in 0..dg.len() {
                                let x = g[i];
                                let s = 1.0 / (1.0 + (-x).exp());
                                let silu = x * s;
                                du[i] = d[i] * silu;
                                dg[i] = d[i] * u[i] * (s * (1.0 - silu) + silu);
                            }
                        });
                    Ok(())
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ in one op: the frozen base projection `weight` [out, in] (dense f32,
/// dequantized by the caller) plus a trainable LoRA pair A [r, in], B [out, r]. The backward
/// gives dX = g·W + s·(g·B)·A, dA = s·(g·B)ᵀ·x and dB = s·gᵀ·(x·Aᵀ) — never a gradient for W —
/// with the LoRA terms accumulated by gemm into the same buffers (no adds, no scaling passes).
pub struct LoraLinear {
    pub base: super::frozen::Frozen,
    pub scale: f32,
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "adapterd-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (rows, inp) = l1.shape().dims2()?;
        let (r, a_in) = l2.shape().dims2()?;
        let (out, b_r) = l3.shape().dims2()?;
        if a_in != inp || b_r != r {
            candle_core::bail!("lora linear: shapes do not match");
        }
        let mut y = self.base.matmul_t(x, rows, inp)?;
        if y.len() != rows * out {
            candle_core::bail!("lora linear: B has {out} rows, base another count");
        }
        let mut xa = vec![0f32; rows * r];
        gemm_into(&mut xa, rows, r, inp, false, x, inp, 1, a, 1, inp, 1.0);
        gemm_into(&mut y, rows, out, r, true, &xa, r, 1, b, 1, r, self.scale);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let s = self.scale;
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(grad_res, |g| {
                        // gb = g·B [rows, r]; xa = x·Aᵀ [rows, r]
                        let mut gb = vec![0f32; rows * r];
                        gemm_into(&mut gb, rows, r, out, false, g, out, 1, b, r, 1, 1.0);
                        let mut xa = vec![0f32; rows * r];
                        gemm_into(&mut xa, rows, r, inp, false, x, inp, 1, a, 1, inp, 1.0);
                        let mut dx = self.base.matmul(g, rows, out)?;
                        gemm_into(&mut dx, rows, inp, r, true, &gb, r, 1, a, inp, 1, s);
                        let mut da = vec![0f32; r * inp];
                        gemm_into(&mut da, r, inp, rows, false, &gb, 1, r, x, inp, 1, s);
                        let mut db = vec![0f32; out * r];
                        gemm_into(&mut db, out, r, rows, false, g, 1, out, &xa, r, 1, s);
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (rows, inp), dev)?),
            Some(Tensor::from_vec(da, a.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// Causal multi-head attention with grouped kv heads over a packed batch: `q` [rows, nh, hd],
/// `k`, `v` [rows, nkv, hd] (after RoPE), sequences of `lens` rows stacked -> [rows, nh·hd].
/// One rayon task per (sequence, kv head) runs that head's `nh/nkv` query heads with
/// single-threaded gemm and a fused causal softmax; the probabilities are kept for the
/// backward. Each task owns its outputs (dK, dV summed over its query heads in a fixed
/// order), so results do not depend on scheduling.
pub struct Attention {
    pub lens: Vec<usize>,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    probs: Mutex<Option<Vec<Vec<f32>>>>,
}

impl Attention {
    pub fn new(lens: Vec<usize>, nh: usize, nkv: usize, hd: usize) -> Self {
        Self {
            lens,
            nh,
            nkv,
            hd,
            probs: Mutex::new(None),
        }
    }

    /// (sequence offset, length, kv head) of every task.
    fn tasks(&self) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut off = 0;
        for &n in &self.lens {
            for kh in 0..self.nkv {
                out.push((off, n, kh));
            }
            off += n;
        }
        out
    }

    fn group(&self) -> usize {
        self.nh / self.nkv
    }

    /// Per task: its query heads' outputs [group, n, hd] and probabilities [group, n, n].
    fn forward_tasks(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<(Vec<f32>, Vec<f32>)> {
        let (nh, nkv, hd, group) = (self.nh, self.nkv, self.hd, self.group());
        let scale = 1.0 / (hd as f32).sqrt();
        self.tasks()
            .into_par_iter()
            .map(|(off, n, kh)| {
                let mut o = vec![0f32; group * n * hd];
                let mut p = vec![0f32; group * n * n];
                let kmat = (&k[off * nkv * hd + kh * hd..], nkv * hd, 1);
                let kt = (kmat.0, 1, nkv * hd);
                let vmat = (&v[off * nkv * hd + kh * hd..], nkv * hd, 1);
                for g in 0..group {
                    let qh = kh * group + g;
                    let qmat = (&q[off * nh * hd + qh * hd..], nh * hd, 1);
                    let pg = &mut p[g * n * n..(g + 1) * n * n];
                    gemm_seq(pg, (n, n, hd), false, qmat, kt);
                    for (i, row) in pg.chunks_mut(n).enumerate() {
                        let (live, masked) = row.split_at_mut(i + 1);
                        let mut max = f32::NEG_INFINITY;
                        for s in live.iter_mut() {
                            *s *= scale;
                            max = max.max(*s);
                        }
                        let mut sum = 0f32;
                        for s in live.iter_mut() {
                            *s = (*s - max).exp();
                            sum += *s;
                        }
                        for s in live.iter_mut() {
                            *s /= sum;
                        }
                        masked.fill(0.0);
                    }
                    let og = &mut o[g * n * hd..(g + 1) * n * hd];
                    gemm_seq(og, (n, hd, n), false, (pg, n, 1), vmat);
                }
                (o, p)
            })
            .collect()
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "adapterd-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (rows, nh, hd) = l1.shape().dims3()?;
        let rows_total: usize = self.lens.iter().sum();
        if nh != self.nh
            || hd != self.hd
            || rows != rows_total
            || self.nkv == 0
            || !self.nh.is_multiple_of(self.nkv)
            || l2.shape().dims3()? != (rows, self.nkv, hd)
            || l3.shape().dims3()? != (rows, self.nkv, hd)
        {
            candle_core::bail!("attention: shapes do not match");
        }
        let results = self.forward_tasks(q, k, v);
        let group = self.group();
        let mut out = vec![0f32; rows * nh * hd];
        let mut probs = Vec::with_capacity(results.len());
        for ((off, n, kh), (o, p)) in self.tasks().into_iter().zip(results) {
            for g in 0..group {
                let qh = kh * group + g;
                for i in 0..n {
                    let dst = (off + i) * nh * hd + qh * hd;
                    out[dst..dst + hd].copy_from_slice(&o[(g * n + i) * hd..(g * n + i + 1) * hd]);
                }
            }
            probs.push(p);
        }
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, nh * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, nh, hd) = q.dims3()?;
        let (nkv, group) = (self.nkv, self.group());
        let scale = 1.0 / (hd as f32).sqrt();
        let tasks = self.tasks();
        let stored = self.probs.lock().ok().and_then(|mut p| p.take());
        let (dq, dk, dv) = with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(grad_res, |d_o| {
                        let probs = match stored {
                            Some(p) => p,
                            None => self
                                .forward_tasks(q, k, v)
                                .into_iter()
                                .map(|r| r.1)
                                .collect(),
                        };
                        let per_task: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
                            .par_iter()
                            .zip(probs.par_iter())
                            .map(|(&(off, n, kh), p)| {
                                let mut dq = vec![0f32; group * n * hd];
                                let mut dk = vec![0f32; n * hd];
                                let mut dv = vec![0f32; n * hd];
                                let mut ds = vec![0f32; n * n];
                                let kmat = (&k[off * nkv * hd + kh * hd..], nkv * hd, 1);
                                let vt = (&v[off * nkv * hd + kh * hd..], 1, nkv * hd);
                                for g in 0..group {
                                    let qh = kh * group + g;
                                    let qmat = (&q[off * nh * hd + qh * hd..], nh * hd, 1);
                                    let domat = (&d_o[off * nh * hd + qh * hd..], nh * hd, 1);
                                    let pg = &p[g * n * n..(g + 1) * n * n];
                                    // dP = dO·Vᵀ; dS = P∘(dP − Σ P∘dP), times the score scale.
                                    gemm_seq(&mut ds, (n, n, hd), false, domat, vt);
                                    for (i, (dsr, pr)) in
                                        ds.chunks_mut(n).zip(pg.chunks(n)).enumerate()
                                    {
                                        let dot: f32 = dsr[..=i]
                                            .iter()
                                            .zip(&pr[..=i])
                                            .map(|(a, b)| a * b)
                                            .sum();
                                        for (d, p) in dsr[..=i].iter_mut().zip(&pr[..=i]) {
                                            *d = p * (*d - dot) * scale;
                                        }
                                        dsr[i + 1..].fill(0.0);
                                    }
                                    let dqg = &mut dq[g * n * hd..(g + 1) * n * hd];
                                    gemm_seq(dqg, (n, hd, n), false, (&ds, n, 1), kmat);
                                    gemm_seq(&mut dk, (n, hd, n), g > 0, (&ds, 1, n), qmat);
                                    gemm_seq(&mut dv, (n, hd, n), g > 0, (pg, 1, n), domat);
                                }
                                (dq, dk, dv)
                            })
                            .collect();
                        let mut dq = vec![0f32; rows * nh * hd];
                        let mut dk = vec![0f32; rows * nkv * hd];
                        let mut dv = vec![0f32; rows * nkv * hd];
                        for (&(off, n, kh), (tq, tk, tv)) in tasks.iter().zip(&per_task) {
                            for i in 0..n {
                                for g in 0..group {
                                    let qh = kh * group + g;
                                    let dst = (off + i) * nh * hd + qh * hd;
                                    let src = (g * n + i) * hd;
                                    dq[dst..dst + hd].copy_from_slice(&tq[src..src + hd]);
                                }
                                let dst = (off + i) * nkv * hd + kh * hd;
                                dk[dst..dst + hd].copy_from_slice(&tk[i * hd..(i + 1) * hd]);
                                dv[dst..dst + hd].copy_from_slice(&tv[i * hd..(i + 1) * hd]);
                            }
                        }
                        Ok((dq, dk, dv))
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    use crate::engine::model::linear::{Linear, Weight};
    use candle_core::quantized::QMatMul;

    fn rand_t(rng: &mut rand::rngs::StdRng, shape: &[usize], s: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-s..s)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * scale + 1e-5 * y.abs(),
                "{what}[{i}]: fused {x} vs composed {y}"
            );
        }
    }

    /// Runs `fused` and `composed` on the same variables, checks the outputs agree, then
    /// backpropagates the same random linear functional through both and compares gradients.
    fn check(
        vars: &[Var],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yc) = (fused(&ts), composed(&ts));
        assert_close(&yf, &yc, "forward");
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let w = rand_t(&mut rng, yc.dims(), 1.0);
        let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v.as_tensor()).expect("fused gradient");
            let b = gc.get(v.as_tensor()).expect("composed gradient");
            assert_close(a, b, &format!("gradient {i}"));
        }
    }

    #[test]
    fn head_logprob_matches_log_softmax_and_gather() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (rows, hidden, vocab) = (7, 16, 50);
        let h = Var::from_tensor(&rand_t(&mut rng, &[rows, hidden], 2.0)).unwrap();
        let w = rand_t(&mut rng, &[vocab, hidden], 1.0);
        let labels: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let lt = Tensor::from_vec(labels.clone(), (rows, 1), &Device::Cpu).unwrap();
        check(
            &[h],
            |t| {
                t[0].apply_op1(HeadLogProb::new(w.clone(), labels.clone()).unwrap())
                    .unwrap()
            },
            |t| {
                let logits = t[0].matmul(&w.t().unwrap()).unwrap();
                candle_nn::ops::log_softmax(&logits, D::Minus1)
                    .unwrap()
                    .gather(&lt, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let x = Var::from_tensor(&rand_t(&mut rng, &[9, 24], 3.0)).unwrap();
        let w = rand_t(&mut rng, &[24], 1.5);
        check(
            &[x],
            |t| t[0].apply_op1(RmsNorm::new(&w, 1e-5).unwrap()).unwrap(),
            |t| {
                let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&w)
                    .unwrap()
            },
        );
    }

    #[test]
    fn rope_matches_the_composed_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (rows, heads, hd) = (6, 3, 8);
        let x = Var::from_tensor(&rand_t(&mut rng, &[rows, heads, hd], 2.0)).unwrap();
        let ang = rand_t(&mut rng, &[rows, 1, hd / 2], 3.0);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let op = |t: &Tensor| {
            t.apply_op1(Rope {
                cos: cos.flatten_all().unwrap().to_vec1().unwrap(),
                sin: sin.flatten_all().unwrap().to_vec1().unwrap(),
            })
            .unwrap()
        };
        check(
            &[x],
            |t| op(&t[0]),
            |t| {
                let half = hd / 2;
                let x1 = t[0].narrow(D::Minus1, 0, half).unwrap();
                let x2 = t[0].narrow(D::Minus1, half, half).unwrap();
                let r1 =
                    (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
                let r2 =
                    (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
                Tensor::cat(&[r1, r2], D::Minus1).unwrap()
            },
        );
    }

    #[test]
    fn silu_mul_matches_the_composed_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let g = Var::from_tensor(&rand_t(&mut rng, &[5, 4100], 6.0)).unwrap();
        let u = Var::from_tensor(&rand_t(&mut rng, &[5, 4100], 2.0)).unwrap();
        check(
            &[g, u],
            |t| t[0].apply_op2(&t[1], SiluMul).unwrap(),
            |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
        );
    }

    #[test]
    fn lora_linear_matches_the_composed_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, inp, out, r) = (11, 20, 13, 4);
        let x = Var::from_tensor(&rand_t(&mut rng, &[rows, inp], 1.0)).unwrap();
        let a = Var::from_tensor(&rand_t(&mut rng, &[r, inp], 0.5)).unwrap();
        let b = Var::from_tensor(&rand_t(&mut rng, &[out, r], 0.5)).unwrap();
        let w = rand_t(&mut rng, &[out, inp], 0.5);
        let lin = Linear::new(Weight::Candle(QMatMul::Tensor(w.clone())), None, out, inp);
        check(
            &[x, a, b],
            |t| {
                t[0].apply_op3(
                    &t[1],
                    &t[2],
                    LoraLinear {
                        base: super::super::frozen::Frozen::Linear(lin.clone()),
                        scale: 2.5,
                    },
                )
                .unwrap()
            },
            |t| {
                let y = t[0].matmul(&w.t().unwrap()).unwrap();
                let d = t[0]
                    .matmul(&t[1].t().unwrap())
                    .unwrap()
                    .matmul(&t[2].t().unwrap())
                    .unwrap();
                (y + (d * 2.5).unwrap()).unwrap()
            },
        );
    }
    /// The composed attention the fused op replaced (per sequence, additive causal mask).
    fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize]) -> Tensor {
        let (_, nh, hd) = q.dims3().unwrap();
        let nkv = k.dim(1).unwrap();
        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::new();
        let mut offset = 0;
        for &n in lens {
            let tr = |t: &Tensor| {
                t.narrow(0, offset, n)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q_s, k_s, v_s) = (tr(q), tr(k), tr(v));
            offset += n;
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| (0..n).map(move |j| if j > i { -1e30 } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (n, n), &Device::Cpu).unwrap();
            let q_g = q_s.reshape((nkv, group * n, hd)).unwrap();
            let scores = (q_g.matmul(&k_s.t().unwrap()).unwrap() * scale)
                .unwrap()
                .reshape((nkv, group, n, n))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)
                .unwrap()
                .reshape((nkv, group * n, n))
                .unwrap();
            let o = probs
                .matmul(&v_s)
                .unwrap()
                .reshape((nh, n, hd))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((n, nh * hd))
                .unwrap();
            outs.push(o);
        }
        Tensor::cat(&outs, 0).unwrap()
    }

    #[test]
    fn attention_matches_the_composed_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (nh, nkv, hd) = (6, 2, 8);
        let lens = vec![5, 1, 9];
        let rows: usize = lens.iter().sum();
        let q = Var::from_tensor(&rand_t(&mut rng, &[rows, nh, hd], 2.0)).unwrap();
        let k = Var::from_tensor(&rand_t(&mut rng, &[rows, nkv, hd], 2.0)).unwrap();
        let v = Var::from_tensor(&rand_t(&mut rng, &[rows, nkv, hd], 2.0)).unwrap();
        check(
            &[q, k, v],
            |t| {
                t[0].apply_op3(&t[1], &t[2], Attention::new(lens.clone(), nh, nkv, hd))
                    .unwrap()
            },
            |t| composed_attention(&t[0], &t[1], &t[2], &lens),
        );
    }
}
