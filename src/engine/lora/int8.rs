//! Int8 serving copies of adapters (`adapters.precision = "int8"`): A and B rounded to int8
//! with one f32 scale per rank index, which halves the bytes the delta pass reads per
//! adapter and step (the pass is bound by those reads when many adapters share a step) and
//! the memory the resident cache holds per adapter.
//!
//! Scales: A per row (rank values) and B per column (rank values), so both fold into the rank
//! vector t = scale·A·x between the two halves of the pass and B needs no per-output multiply.
//! Rounding to nearest keeps each value within half a step (max|row or column| / 254) of the
//! f16 copy; what that does to outputs is measured in BENCHMARKS.md.

use std::str::FromStr;
use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::{LayerLora, LoraAdapter, LoraPair};

/// How resident adapters hold A and B on the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterPrecision {
    /// f16 (f32 for a pair beyond f16's range): what PEFT, vLLM and LoRAX serve.
    #[default]
    F16,
    /// int8 with per-rank scales: half the bytes, at a small cost in fidelity.
    Int8,
}

impl FromStr for AdapterPrecision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            other => Err(format!("`{other}` is not one of \"f16\", \"int8\"")),
        }
    }
}

/// The scales of an int8 pair: A's row k holds A[k, :] / `a[k]`, B's column k holds
/// B[:, k] / `b[k]`.
#[derive(Clone, Debug)]
pub struct Int8Scales {
    pub a: Arc<[f32]>,
    pub b: Arc<[f32]>,
}

/// The int8 step for a row or column: its largest magnitude maps to 127 (0 for all zeros).
fn scale_for(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(0f32, |m, v| m.max(v.abs())) / 127.0
}

/// v·inv rounded to nearest (ties to even) as i8 bits. |v·inv| ≤ 127 by construction; adding
/// and subtracting 1.5·2^23 rounds in float operations the compiler vectorises, where
/// `f32::round` is a libm call on the x86-64 baseline (this runs on every cold load).
fn round_i8(v: f32, inv: f32) -> u8 {
    const ROUNDER: f32 = 12_582_912.0;
    (((v * inv + ROUNDER) - ROUNDER) as i8) as u8
}

/// `pair` as an int8 pair (A and B as U8 tensors holding i8 bits, on the CPU). A pair that
/// is already int8 is returned as it is.
pub fn quantize_pair(pair: &LoraPair) -> Result<LoraPair> {
    if pair.int8.is_some() {
        return Ok(pair.clone());
    }
    let (rank, d_in) = pair.a.dims2()?;
    let (d_out, b_rank) = pair.b.dims2()?;
    if b_rank != rank || rank == 0 {
        candle_core::bail!("lora int8: A [{rank}, {d_in}] and B [{d_out}, {b_rank}] do not pair");
    }
    let (a_scales, aq) = quantize(&pair.a, d_in, false)?;
    let (b_scales, bq) = quantize(&pair.b, rank, true)?;
    Ok(LoraPair {
        a: Tensor::from_vec(aq, (rank, d_in), &Device::Cpu)?,
        b: Tensor::from_vec(bq, (d_out, rank), &Device::Cpu)?,
        scale: pair.scale,
        int8: Some(Int8Scales {
            a: a_scales.into(),
            b: b_scales.into(),
        }),
    })
}

/// A tensor's values in int8 with one scale per row of `width` values, or per column
/// (`columns`). Read in place where it is a contiguous f16 or f32 CPU tensor (a cold load's
/// f16 pairs: no f32 copy, whose fresh pages cost ~1 ms per MB on these VMs).
fn quantize(t: &Tensor, width: usize, columns: bool) -> Result<(Vec<f32>, Vec<u8>)> {
    fn run<T: Copy>(
        v: &[T],
        widen: impl Fn(T) -> f32 + Copy,
        w: usize,
        c: bool,
    ) -> (Vec<f32>, Vec<u8>) {
        if c {
            quantize_columns(v, widen, w)
        } else {
            quantize_rows(v, widen, w)
        }
    }
    let (storage, layout) = t.storage_and_layout();
    if let Some((o0, o1)) = layout.contiguous_offsets() {
        match &*storage {
            Storage::Cpu(CpuStorage::F16(v)) => {
                return Ok(run(&v[o0..o1], super::apply::widen, width, columns))
            }
            Storage::Cpu(CpuStorage::F32(v)) => {
                return Ok(run(&v[o0..o1], |x: f32| x, width, columns))
            }
            _ => {}
        }
    }
    drop(storage);
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(run(&v, |x: f32| x, width, columns))
}

/// One scale per row of `width` values (A: per rank index).
fn quantize_rows<T: Copy>(v: &[T], widen: impl Fn(T) -> f32, width: usize) -> (Vec<f32>, Vec<u8>) {
    let width = width.max(1);
    let mut scales = Vec::with_capacity(v.len() / width);
    let mut q = vec![0u8; v.len()];
    for (row, out) in v.chunks(width).zip(q.chunks_mut(width)) {
        let s = scale_for(row.iter().map(|&x| widen(x)));
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, &x) in out.iter_mut().zip(row) {
            *o = round_i8(widen(x), inv);
        }
        scales.push(s);
    }
    (scales, q)
}

/// One scale per column of a row-major matrix `width` wide (B: per rank index).
fn quantize_columns<T: Copy>(
    v: &[T],
    widen: impl Fn(T) -> f32,
    width: usize,
) -> (Vec<f32>, Vec<u8>) {
    let width = width.max(1);
    let mut peaks = vec![0f32; width];
    for row in v.chunks(width) {
        for (m, &x) in peaks.iter_mut().zip(row) {
            *m = m.max(widen(x).abs());
        }
    }
    let scales: Vec<f32> = peaks.iter().map(|m| m / 127.0).collect();
    let inv: Vec<f32> = scales
        .iter()
        .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    let mut q = vec![0u8; v.len()];
    for (row, out) in v.chunks(width).zip(q.chunks_mut(width)) {
        for ((o, &x), &i) in out.iter_mut().zip(row).zip(&inv) {
            *o = round_i8(widen(x), i);
        }
    }
    (scales, q)
}

/// `adapter` with every pair in int8 (pairs quantized in parallel: this runs on a cold load).
pub fn quantize_adapter(adapter: &LoraAdapter) -> Result<LoraAdapter> {
    let layers = adapter
        .layers
        .par_iter()
        .map(|layer| {
            let mut out = LayerLora::default();
            for (slot, pair) in out.modules.iter_mut().zip(&layer.modules) {
                *slot = pair.as_ref().map(quantize_pair).transpose()?;
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    let size_bytes = layers
        .iter()
        .flat_map(|l| l.modules.iter().flatten())
        .map(LoraPair::size_bytes)
        .sum();
    Ok(LoraAdapter {
        layers,
        rank: adapter.rank,
        alpha: adapter.alpha,
        use_rslora: adapter.use_rslora,
        target_modules: adapter.target_modules.clone(),
        size_bytes,
    })
}

/// The i8 values of an int8 pair's tensor (`t` a contiguous U8 CPU tensor), as f32 times the
/// scale of each value's rank index (`row_scales`: one per row; else one per column).
fn dequantize(t: &Tensor, scales: &[f32], row_scales: bool) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(CpuStorage::U8(bytes)), Some((o0, o1))) =
        (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("lora int8: weights must be contiguous u8 on the CPU");
    };
    let values: Vec<f32> = bytes[o0..o1]
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let s = if row_scales {
                scales[i / cols]
            } else {
                scales[i % cols]
            };
            f32::from(q as i8) * s
        })
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu)
}

impl LoraPair {
    /// A and B as f32 tensors on their device (int8 pairs dequantized): for the tensor path
    /// and for writing the adapter out.
    pub fn dense_f32(&self) -> Result<(Tensor, Tensor)> {
        match &self.int8 {
            None => Ok((self.a.to_dtype(DType::F32)?, self.b.to_dtype(DType::F32)?)),
            Some(s) => Ok((
                dequantize(&self.a, &s.a, true)?,
                dequantize(&self.b, &s.b, false)?,
            )),
        }
    }

    /// Bytes A, B and any scales take in memory.
    pub fn size_bytes(&self) -> usize {
        let weights = (self.a.elem_count() + self.b.elem_count()) * self.a.dtype().size_in_bytes();
        let scales = self
            .int8
            .as_ref()
            .map_or(0, |s| (s.a.len() + s.b.len()) * std::mem::size_of::<f32>());
        weights + scales
    }
}
