//! The f32-activation kernel on AVX-512F: each block unpacked once into two 16-float vectors,
//! then two FMAs per input row — the batched-decode and prefill path.
//!
//! Why it beats the integer kernels from a few rows on: an int8/int16 block costs, per row, an
//! integer dot, a conversion and a scaled FMA (the block scales differ, so integer sums cannot
//! run across blocks), plus per-row scale and offset passes. Here the scale and offset are
//! applied once, while unpacking, and the per-row work is two FMAs with the activations as
//! memory operands; the result is the exact product of the dequantized weights.

use super::format_id::{block_bytes, Q4_0, Q4_1, Q8_0};
use super::{BlockFormat, QK};
use std::arch::x86_64::*;

/// Scale (and, for Q4_1, min) of the block at `b` as two broadcast vectors; Q4_0's offset is
/// −8·d, Q8_0 has none. One 8-byte load covers both f16 values (every block is ≥ 18 bytes).
#[inline(always)]
unsafe fn scales<const F: u8>(b: *const u8) -> (__m512, __m512) {
    let v = _mm_cvtph_ps(_mm_loadl_epi64(b as *const __m128i));
    let d = _mm512_broadcastss_ps(v);
    let m = match F {
        Q4_1 => _mm512_broadcastss_ps(_mm_movehdup_ps(v)),
        Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
        _ => _mm512_setzero_ps(),
    };
    (d, m)
}

/// One block as values 0-15 and 16-31.
#[inline(always)]
unsafe fn unpack<const F: u8>(b: *const u8) -> [__m512; 2] {
    let (d, m) = scales::<F>(b);
    match F {
        Q4_0 | Q4_1 => {
            let qs = b.add(if F == Q4_1 { 4 } else { 2 });
            // Byte i holds value i in its low nibble and value i+16 in its high nibble. The
            // block has only 16 distinct values, d·q + m for q in 0..15: one FMA makes that
            // table and `vpermps` (which reads only the low 4 bits of each index) looks the
            // nibbles up, instead of a conversion and an FMA per half on the FMA ports.
            let raw = _mm_loadu_si128(qs as *const __m128i);
            let table = _mm512_fmadd_ps(
                _mm512_setr_ps(
                    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                    15.0,
                ),
                d,
                m,
            );
            let lo = _mm512_cvtepu8_epi32(raw);
            let hi = _mm512_cvtepu8_epi32(_mm_srli_epi16(raw, 4));
            [
                _mm512_permutexvar_ps(lo, table),
                _mm512_permutexvar_ps(hi, table),
            ]
        }
        _ => {
            let p = b.add(2);
            let (v0, v1) = (
                _mm_loadu_si128(p as *const __m128i),
                _mm_loadu_si128(p.add(16) as *const __m128i),
            );
            [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1)), d),
            ]
        }
    }
}

/// Input rows r0..r0+R of `x` against J consecutive weight rows at `w` (each `row_bytes`
/// long): every activation vector loaded is used by J FMAs and every unpacked weight vector
/// by R, which keeps the FMA units rather than the loads the limit. Returns out[j][r].
/// J·R accumulators + 2·J weight vectors stay under the 32 AVX-512 registers.
#[inline(always)]
unsafe fn tile<const F: u8, const R: usize, const J: usize>(
    w: *const u8,
    row_bytes: usize,
    x: *const f32,
    cols: usize,
) -> [[f32; R]; J] {
    let bb = block_bytes(F);
    let nb = cols / QK;
    let mut acc = [[_mm512_setzero_ps(); J]; R];
    for bi in 0..nb {
        // A loop, not `array::from_fn`: a closure would not inherit the caller's target
        // features, and every intrinsic in it would become an out-of-line call.
        let mut wv = [[_mm512_setzero_ps(); 2]; J];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = unpack::<F>(w.add(j * row_bytes + bi * bb));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xp = x.add(r * cols + bi * QK);
            let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
            for (a, [w0, w1]) in acc_r.iter_mut().zip(wv.iter()) {
                *a = _mm512_fmadd_ps(*w0, x0, *a);
                *a = _mm512_fmadd_ps(*w1, x1, *a);
            }
        }
    }
    let mut out = [[0f32; R]; J];
    for (r, acc_r) in acc.iter().enumerate() {
        for (o, a) in out.iter_mut().zip(acc_r.iter()) {
            o[r] = _mm512_reduce_add_ps(*a);
        }
    }
    out
}

/// Every row of `x` (n rows of `cols` values) against `nw` consecutive weight rows at `w`
/// (`nw` = 1 or 2); `dst` [nw][n] receives the results.
/// Safety: the CPU has AVX-512F and F16C; `x` holds n·cols values, `w` nw weight rows of
/// `cols` values in `format`, and dst nw·n values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dot_rows(
    format: BlockFormat,
    w: &[u8],
    nw: usize,
    x: &[f32],
    cols: usize,
    dst: &mut [f32],
) {
    match format {
        BlockFormat::Q4_0 => dot_rows_of::<Q4_0>(w, nw, x, cols, dst),
        BlockFormat::Q4_1 => dot_rows_of::<Q4_1>(w, nw, x, cols, dst),
        BlockFormat::Q8_0 => dot_rows_of::<Q8_0>(w, nw, x, cols, dst),
    }
}

#[inline(always)]
unsafe fn dot_rows_of<const F: u8>(w: &[u8], nw: usize, x: &[f32], cols: usize, dst: &mut [f32]) {
    let n = dst.len() / nw;
    let row_bytes = cols / QK * block_bytes(F);
    debug_assert!(x.len() >= n * cols && w.len() >= nw * row_bytes && (nw == 1 || nw == 2));
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    macro_rules! run {
        ($r:expr, $rows:literal) => {
            if nw == 2 {
                let v = tile::<F, $rows, 2>(wp, row_bytes, xp.add($r * cols), cols);
                dst[$r..$r + $rows].copy_from_slice(&v[0]);
                dst[n + $r..n + $r + $rows].copy_from_slice(&v[1]);
            } else {
                let v = tile::<F, $rows, 1>(wp, row_bytes, xp.add($r * cols), cols);
                dst[$r..$r + $rows].copy_from_slice(&v[0]);
            }
        };
    }
    let mut r = 0;
    while r + 4 <= n {
        run!(r, 4);
        r += 4;
    }
    while r + 2 <= n {
        run!(r, 2);
        r += 2;
    }
    if r < n {
        run!(r, 1);
    }
}
