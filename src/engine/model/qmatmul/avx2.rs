//! The f32-activation kernel on AVX2+FMA+F16C: blocks unpacked to f32, FMA against f32 rows.

use super::{BlockFormat, QK};
use std::arch::x86_64::*;

/// f16 scale at byte `i` of a block, converted inline with F16C: a call into a generic
/// conversion routine here would force every accumulator register to be spilled.
#[inline(always)]
unsafe fn f16_at(b: &[u8], i: usize) -> f32 {
    let bits = u16::from_le_bytes([*b.get_unchecked(i), *b.get_unchecked(i + 1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Unpacks one block into four vectors of 8 floats (values 0-7, 8-15, 16-23, 24-31).
#[inline(always)]
unsafe fn unpack(format: BlockFormat, b: &[u8]) -> [__m256; 4] {
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let (d, m, qs) = if format == BlockFormat::Q4_1 {
                (f16_at(b, 0), f16_at(b, 2), b.as_ptr().add(4))
            } else {
                let d = f16_at(b, 0);
                (d, -8.0 * d, b.as_ptr().add(2))
            };
            let raw = _mm_loadu_si128(qs as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let dv = _mm256_set1_ps(d);
            let mv = _mm256_set1_ps(m);
            let cvt = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            [
                _mm256_fmadd_ps(cvt(lo), dv, mv),
                _mm256_fmadd_ps(cvt(_mm_srli_si128(lo, 8)), dv, mv),
                _mm256_fmadd_ps(cvt(hi), dv, mv),
                _mm256_fmadd_ps(cvt(_mm_srli_si128(hi, 8)), dv, mv),
            ]
        }
        BlockFormat::Q8_0 => {
            let dv = _mm256_set1_ps(f16_at(b, 0));
            let p = b.as_ptr().add(2);
            let cvt = |o: usize| {
                let v = _mm_loadl_epi64(p.add(o) as *const __m128i);
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), dv)
            };
            [cvt(0), cvt(8), cvt(16), cvt(24)]
        }
    }
}

/// The sum of the eight lanes of `v` (also used by the integer kernels).
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// R input rows at once with A independent accumulators each (A·R + 4 registers stay
/// under the 16 AVX2 registers; several chains hide the FMA latency).
#[inline(always)]
unsafe fn tile<const R: usize, const A: usize>(
    format: BlockFormat,
    w: &[u8],
    x: *const f32,
    cols: usize,
) -> [f32; R] {
    let bb = format.block_bytes();
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    for (bi, block) in w.chunks_exact(bb).enumerate() {
        let wv = unpack(format, block);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xp = x.add(r * cols + bi * QK);
            for (k, wk) in wv.iter().enumerate() {
                let a = &mut acc_r[k % A];
                *a = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(xp.add(8 * k)), *a);
            }
        }
    }
    let mut out = [0f32; R];
    for (o, acc_r) in out.iter_mut().zip(acc.iter()) {
        let mut s = acc_r[0];
        for a in &acc_r[1..] {
            s = _mm256_add_ps(s, *a);
        }
        *o = hsum(s);
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows(
    format: BlockFormat,
    w: &[u8],
    x: &[f32],
    cols: usize,
    dst: &mut [f32],
) {
    let n = dst.len();
    debug_assert!(x.len() >= n * cols);
    let mut r = 0;
    while r + 4 <= n {
        let v = tile::<4, 2>(format, w, x.as_ptr().add(r * cols), cols);
        dst[r..r + 4].copy_from_slice(&v);
        r += 4;
    }
    while r + 2 <= n {
        let v = tile::<2, 4>(format, w, x.as_ptr().add(r * cols), cols);
        dst[r..r + 2].copy_from_slice(&v);
        r += 2;
    }
    if r < n {
        dst[r] = tile::<1, 4>(format, w, x.as_ptr().add(r * cols), cols)[0];
    }
}
