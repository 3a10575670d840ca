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

use super::apply::Kernel;
use super::peft::WARM_INT8;
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

/// The int8 step for a row: its largest magnitude maps to 127 (0 for all zeros). Eight
/// running maxima, not one: a single float max chain does not vectorise (it is not
/// reassociated) and was most of an int8 copy's time.
fn row_scale<T: Copy>(row: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            let v = widen(x).abs();
            *l = if v > *l { v } else { *l };
        }
    }
    for (l, &x) in lanes.iter_mut().zip(tail) {
        let v = widen(x).abs();
        *l = if v > *l { v } else { *l };
    }
    lanes.iter().fold(0f32, |m, &l| if l > m { l } else { m }) / 127.0
}

/// v·inv rounded to nearest (ties to even) as i8 bits. |v·inv| ≤ 127 by construction.
/// Adding 1.5·2^23 rounds in float arithmetic and leaves the integer in the low mantissa bits
/// (the sum's bits are 0x4B40_0000 + k), so the byte is k's two's complement: plain float and
/// bit operations the compiler vectorises, where `f32::round` is a libm call and a
/// float-to-int `as` a scalar saturating conversion on the x86-64 baseline (either made an
/// int8 copy several times slower; this runs on every cold load).
fn round_i8(v: f32, inv: f32) -> u8 {
    const ROUNDER: f32 = 12_582_912.0;
    (v * inv + ROUNDER).to_bits() as u8
}

/// `pair` as an int8 pair (A and B as U8 tensors holding i8 bits, on the CPU). A pair that
/// is already int8 is returned as it is.
pub fn quantize_pair(pair: &LoraPair) -> Result<LoraPair> {
    if pair.int8.is_some() {
        return Ok(pair.clone());
    }
    let shape = PairShape::of(pair)?;
    let mut buf = vec![0u8; shape.len()];
    let (a, b) = buf.split_at_mut(shape.a_len());
    let scales = quantize_into(pair, shape, a, b)?;
    let storage = Tensor::from_vec(buf, shape.len(), &Device::Cpu)?;
    shape.place(pair, &storage, 0, scales)
}

/// The dimensions of a pair: A [rank, d_in], B [d_out, rank].
#[derive(Clone, Copy)]
struct PairShape {
    rank: usize,
    d_in: usize,
    d_out: usize,
}

impl PairShape {
    fn of(pair: &LoraPair) -> Result<Self> {
        let (rank, d_in) = pair.a.dims2()?;
        let (d_out, b_rank) = pair.b.dims2()?;
        if b_rank != rank || rank == 0 {
            candle_core::bail!(
                "lora int8: A [{rank}, {d_in}] and B [{d_out}, {b_rank}] do not pair"
            );
        }
        Ok(Self { rank, d_in, d_out })
    }

    fn a_len(self) -> usize {
        self.rank * self.d_in
    }

    fn len(self) -> usize {
        self.a_len() + self.d_out * self.rank
    }

    /// The int8 pair whose A and B are views of `storage` from `offset` on.
    fn place(
        self,
        pair: &LoraPair,
        storage: &Tensor,
        offset: usize,
        (a_scales, b_scales): (Vec<f32>, Vec<f32>),
    ) -> Result<LoraPair> {
        let a = storage
            .narrow(0, offset, self.a_len())?
            .reshape((self.rank, self.d_in))?;
        let b = storage
            .narrow(0, offset + self.a_len(), self.d_out * self.rank)?
            .reshape((self.d_out, self.rank))?;
        Ok(LoraPair {
            a,
            b,
            scale: pair.scale,
            int8: Some(Int8Scales {
                a: a_scales.into(),
                b: b_scales.into(),
            }),
        })
    }
}

/// Writes `pair`'s A and B as int8 into `a` and `b`; returns their scales.
fn quantize_into(
    pair: &LoraPair,
    shape: PairShape,
    a: &mut [u8],
    b: &mut [u8],
) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((
        quantize(&pair.a, shape.d_in, false, a)?,
        quantize(&pair.b, shape.rank, true, b)?,
    ))
}

/// A tensor's values into `out` as int8 with one scale per row of `width` values, or per
/// column (`columns`); returns the scales. Read in place where it is a contiguous f16 or f32
/// CPU tensor (a cold load's f16 pairs: no f32 copy, whose fresh pages cost ~1 ms per MB on
/// these VMs).
fn quantize(t: &Tensor, width: usize, columns: bool, out: &mut [u8]) -> Result<Vec<f32>> {
    fn run<T: Copy>(
        v: &[T],
        widen: impl Fn(T) -> f32 + Copy,
        width: usize,
        columns: bool,
        out: &mut [u8],
    ) -> Result<Vec<f32>> {
        if v.len() != out.len() {
            candle_core::bail!("lora int8: {} values for {} slots", v.len(), out.len());
        }
        Ok(if columns {
            quantize_columns(v, widen, width, out)
        } else {
            quantize_rows(v, widen, width, out)
        })
    }
    let (storage, layout) = t.storage_and_layout();
    if let Some((o0, o1)) = layout.contiguous_offsets() {
        match &*storage {
            Storage::Cpu(CpuStorage::F16(v)) => {
                let v = &v[o0..o1];
                #[cfg(target_arch = "x86_64")]
                if v.len() == out.len() && Kernel::detect() == Kernel::Avx2 {
                    // SAFETY: the CPU has AVX2 and F16C (`Kernel::detect`).
                    return Ok(unsafe {
                        if columns {
                            x86::quantize_columns_f16(v, width, out)
                        } else {
                            x86::quantize_rows_f16(v, width, out)
                        }
                    });
                }
                return run(v, super::apply::widen, width, columns, out);
            }
            Storage::Cpu(CpuStorage::F32(v)) => {
                return run(&v[o0..o1], |x: f32| x, width, columns, out)
            }
            _ => {}
        }
    }
    drop(storage);
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    run(&v, |x: f32| x, width, columns, out)
}

/// One scale per row of `width` values (A: per rank index).
fn quantize_rows<T: Copy>(
    v: &[T],
    widen: impl Fn(T) -> f32,
    width: usize,
    q: &mut [u8],
) -> Vec<f32> {
    let width = width.max(1);
    let mut scales = Vec::with_capacity(v.len() / width);
    for (row, out) in v.chunks(width).zip(q.chunks_mut(width)) {
        let s = row_scale(row, &widen);
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, &x) in out.iter_mut().zip(row) {
            *o = round_i8(widen(x), inv);
        }
        scales.push(s);
    }
    scales
}

/// One scale per column of a row-major matrix `width` wide (B: per rank index).
fn quantize_columns<T: Copy>(
    v: &[T],
    widen: impl Fn(T) -> f32,
    width: usize,
    q: &mut [u8],
) -> Vec<f32> {
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
    for (row, out) in v.chunks(width).zip(q.chunks_mut(width)) {
        for ((o, &x), &i) in out.iter_mut().zip(row).zip(&inv) {
            *o = round_i8(widen(x), i);
        }
    }
    scales
}

/// `adapter` with every pair in int8. All pairs' values go into one buffer that a helper
/// thread touched after the previous such copy (this runs on a cold load, where first touches
/// of fresh memory cost ~1 ms per MB on our VMs), the pairs quantized in parallel; each A and
/// B is a view of it.
pub fn quantize_adapter(adapter: &LoraAdapter) -> Result<LoraAdapter> {
    let mut jobs = Vec::new();
    let mut total = 0usize;
    for (l, layer) in adapter.layers.iter().enumerate() {
        for (m, pair) in layer.modules.iter().enumerate() {
            let Some(pair) = pair.as_ref().filter(|p| p.int8.is_none()) else {
                continue;
            };
            let shape = PairShape::of(pair)?;
            jobs.push((l, m, pair, shape, total));
            total += shape.len();
        }
    }
    let mut buf = WARM_INT8.take(total);
    let mut work = Vec::with_capacity(jobs.len());
    let mut rest: &mut [u8] = &mut buf;
    for &(_, _, pair, shape, _) in &jobs {
        let (a, tail) = rest.split_at_mut(shape.a_len());
        let (b, tail) = tail.split_at_mut(shape.len() - shape.a_len());
        rest = tail;
        work.push((pair, shape, a, b));
    }
    let scales = work
        .into_par_iter()
        .map(|(pair, shape, a, b)| quantize_into(pair, shape, a, b))
        .collect::<Result<Vec<_>>>()?;
    let storage = Tensor::from_vec(buf, total, &Device::Cpu)?;
    // Pairs that were int8 already stay as they are.
    let mut layers: Vec<LayerLora> = adapter
        .layers
        .iter()
        .map(|layer| {
            let mut out = LayerLora::default();
            for (slot, pair) in out.modules.iter_mut().zip(&layer.modules) {
                *slot = pair.as_ref().filter(|p| p.int8.is_some()).cloned();
            }
            out
        })
        .collect();
    for ((l, m, pair, shape, offset), scales) in jobs.into_iter().zip(scales) {
        layers[l].modules[m] = Some(shape.place(pair, &storage, offset, scales)?);
    }
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
        packed: Default::default(),
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
}

/// The f16 cases (a cold load's serving copy) with F16C widening and `cvtps` rounding, eight
/// values at a time: the same bytes and scales as the portable loops (maxima are exact, and
/// both round to nearest, ties to even).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Eight f32 rounded to i32 and narrowed to eight i8 bytes at `out`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store8(v: __m256, out: *mut u8) {
        let i = _mm256_cvtps_epi32(v);
        let w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i));
        _mm_storel_epi64(out.cast(), _mm_packs_epi16(w, w));
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn quantize_rows_f16(v: &[f16], width: usize, q: &mut [u8]) -> Vec<f32> {
        let width = width.max(1);
        let sign = _mm256_set1_ps(-0.0);
        let mut scales = Vec::with_capacity(v.len() / width);
        for (row, out) in v.chunks(width).zip(q.chunks_mut(width)) {
            let n8 = row.len() / 8 * 8;
            let mut m = _mm256_setzero_ps();
            let mut i = 0;
            while i < n8 {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load8(row.as_ptr().add(i))));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let peak = lanes
                .iter()
                .copied()
                .chain(row[n8..].iter().map(|x| x.to_f32().abs()))
                .fold(0f32, |a, b| if b > a { b } else { a });
            let s = peak / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let vi = _mm256_set1_ps(inv);
            let mut i = 0;
            while i < n8 {
                store8(
                    _mm256_mul_ps(load8(row.as_ptr().add(i)), vi),
                    out.as_mut_ptr().add(i),
                );
                i += 8;
            }
            for (o, x) in out[n8..].iter_mut().zip(&row[n8..]) {
                *o = super::round_i8(x.to_f32(), inv);
            }
            scales.push(s);
        }
        scales
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn quantize_columns_f16(v: &[f16], width: usize, q: &mut [u8]) -> Vec<f32> {
        let width = width.max(1);
        if !width.is_multiple_of(8) || width > 64 {
            return super::quantize_columns(v, super::super::apply::widen, width, q);
        }
        let sign = _mm256_set1_ps(-0.0);
        let mut peaks = [_mm256_setzero_ps(); 8];
        for row in v.chunks_exact(width) {
            for (k, p) in peaks.iter_mut().take(width / 8).enumerate() {
                *p = _mm256_max_ps(*p, _mm256_andnot_ps(sign, load8(row.as_ptr().add(k * 8))));
            }
        }
        let mut scales = vec![0f32; width];
        for (k, p) in peaks.iter().take(width / 8).enumerate() {
            _mm256_storeu_ps(scales.as_mut_ptr().add(k * 8), *p);
        }
        for s in &mut scales {
            *s /= 127.0;
        }
        let inv: Vec<__m256> = scales
            .chunks_exact(8)
            .map(|c| {
                let mut l = [0f32; 8];
                for (o, &s) in l.iter_mut().zip(c) {
                    *o = if s > 0.0 { 1.0 / s } else { 0.0 };
                }
                _mm256_loadu_ps(l.as_ptr())
            })
            .collect();
        for (row, out) in v.chunks_exact(width).zip(q.chunks_exact_mut(width)) {
            for (k, vi) in inv.iter().enumerate() {
                store8(
                    _mm256_mul_ps(load8(row.as_ptr().add(k * 8)), *vi),
                    out.as_mut_ptr().add(k * 8),
                );
            }
        }
        scales
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn halves(n: usize, seed: u32) -> Vec<f16> {
        (0..n)
            .map(|i| {
                let r = ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 20011;
                f16::from_f32((r as f32 / 20011.0 - 0.5) * 0.37)
            })
            .collect()
    }

    #[test]
    fn the_avx2_copy_gives_the_portable_bytes_and_scales() {
        if Kernel::detect() != Kernel::Avx2 {
            return;
        }
        let widen = crate::engine::lora::apply::widen;
        for (rows, width) in [(16, 576), (5, 37), (3, 8), (1, 1)] {
            let v = halves(rows * width, 3);
            let (mut want, mut got) = (vec![0u8; v.len()], vec![0u8; v.len()]);
            let ws = quantize_rows(&v, widen, width, &mut want);
            // SAFETY: AVX2 and F16C checked above.
            let gs = unsafe { x86::quantize_rows_f16(&v, width, &mut got) };
            assert_eq!((ws, want), (gs, got), "rows of {width}");
        }
        for (rows, width) in [(576, 16), (37, 8), (40, 64), (20, 24), (9, 5)] {
            let v = halves(rows * width, 7);
            let (mut want, mut got) = (vec![0u8; v.len()], vec![0u8; v.len()]);
            let ws = quantize_columns(&v, widen, width, &mut want);
            // SAFETY: as above.
            let gs = unsafe { x86::quantize_columns_f16(&v, width, &mut got) };
            assert_eq!((ws, want), (gs, got), "columns of {width}");
        }
    }
}
