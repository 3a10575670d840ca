//! int8 × int8-activation kernels on x86: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI
//! (256-bit `vpdpbusd`, which multiplies unsigned by signed bytes and sums four products into
//! each 32-bit lane without the 16-bit saturation of `vpmaddubsw`).
//!
//! Both multiply an unsigned weight operand by the signed activations, so each format is
//! turned unsigned per block and the shift is paid back through the activation block sum:
//! - Q4_1: nibbles q (0..15), w = d·q + m  →  Σw·x = d·dx·Σq·qx + m·sum
//! - Q4_0: w = d·(q − 8)                   →  d·dx·Σq·qx − 8d·sum
//! - Q8_0 on VNNI: u = w + 128 (a bit flip) →  d·dx·Σu·qx − 128d·sum
//! - Q8_0 on AVX2: |w| times sign-moved activations (llama.cpp's trick): u + 128 would
//!   overflow `vpmaddubsw`'s 16-bit pair sums.
//!
//! where sum = dx·Σqx. The weight block is unpacked once and reused for a tile of up to 8
//! (VNNI) or 4 (AVX2) activation rows; the offset coefficients of up to 64 blocks are buffered
//! and dotted with the block sums afterwards, so they add no dependency chain to the hot loop.

use std::arch::x86_64::*;

use super::{ActRow, BlockFormat, QuantRows, QK};

/// Format as a const generic, so the per-block branches vanish from the hot loop.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// Blocks whose offset coefficients are buffered before being dotted with the block sums.
const CHUNK: usize = 64;

#[inline(always)]
const fn block_bytes(f: u8) -> usize {
    match f {
        Q4_0 => 18,
        Q4_1 => 20,
        _ => 34,
    }
}

/// The two f16 values at `p` (scale and, for Q4_1, min) converted with F16C.
#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let bits = (p as *const u32).read_unaligned();
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// One weight block as (unsigned bytes in value order, sign source for AVX2's Q8_0, scale d,
/// offset coefficient c).
#[inline(always)]
unsafe fn weight_block<const F: u8, const VNNI: bool>(
    b: *const u8,
) -> (__m256i, __m256i, f32, f32) {
    let (d, m) = f16x2(b);
    match F {
        Q4_0 | Q4_1 => {
            let raw = _mm_loadu_si128(b.add(if F == Q4_1 { 4 } else { 2 }) as *const __m128i);
            // Byte i holds value i in its low nibble and value i+16 in its high nibble.
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            let u = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
            let c = if F == Q4_1 { m } else { -8.0 * d };
            (u, u, d, c)
        }
        _ => {
            let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
            if VNNI {
                (
                    _mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN)),
                    w,
                    d,
                    -128.0 * d,
                )
            } else {
                (_mm256_abs_epi8(w), w, d, 0.0)
            }
        }
    }
}

/// Σ u·x over each group of 4 bytes, as 8 i32 lanes.
#[inline(always)]
unsafe fn idot<const F: u8, const VNNI: bool>(u: __m256i, wsign: __m256i, x: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
    } else {
        let x = if F == Q8_0 {
            _mm256_sign_epi8(x, wsign)
        } else {
            x
        };
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Σ a[i]·b[i] over two equal-length slices.
#[inline(always)]
unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 8;
    }
    let mut s = hsum(acc);
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// Block `b` of the weight row at `wp` into accumulator `a` of every row. A function, not a
/// closure: a closure would not inherit the caller's target features, and every intrinsic in
/// it would become an out-of-line call.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step<const F: u8, const VNNI: bool, const R: usize, const A: usize>(
    wp: *const u8,
    b: usize,
    a: usize,
    start: usize,
    rows: &[ActRow<'_>; R],
    acc: &mut [[__m256; A]; R],
    cbuf: &mut [f32; CHUNK],
) {
    let (u, ws, d, c) = weight_block::<F, VNNI>(wp.add(b * block_bytes(F)));
    *cbuf.get_unchecked_mut(b - start) = c;
    let dw = _mm256_set1_ps(d);
    for (row, acc_r) in rows.iter().zip(acc.iter_mut()) {
        let x = _mm256_loadu_si256(row.q.as_ptr().add(b * QK) as *const __m256i);
        let i = idot::<F, VNNI>(u, ws, x);
        // (Σ·dx)·d: the activation scale is a broadcast load, so each row costs one multiply
        // and one FMA after the conversion (a scalar d·dx would add a shuffle per row).
        let t = _mm256_mul_ps(
            _mm256_cvtepi32_ps(i),
            _mm256_broadcast_ss(row.d.get_unchecked(b)),
        );
        acc_r[a] = _mm256_fmadd_ps(t, dw, acc_r[a]);
    }
}

/// Activation rows r0..r0+R against one weight row, with A accumulators per row (A·R chains
/// hide the FMA latency when R is small).
#[inline(always)]
unsafe fn tile<const F: u8, const VNNI: bool, const R: usize, const A: usize>(
    w: &[u8],
    acts: &QuantRows,
    cols: usize,
    r0: usize,
) -> [f32; R] {
    let bb = block_bytes(F);
    let nb = cols / QK;
    debug_assert_eq!(w.len(), nb * bb);
    debug_assert!(acts.q.len() >= (r0 + R) * cols);
    let rows: [_; R] = std::array::from_fn(|i| acts.row(r0 + i, cols));
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    let mut off = [0f32; R];
    let mut cbuf = [0f32; CHUNK];
    let wp = w.as_ptr();
    let mut start = 0;
    while start < nb {
        let end = (start + CHUNK).min(nb);
        let mut b = start;
        while b + A <= end {
            for a in 0..A {
                step::<F, VNNI, R, A>(wp, b + a, a, start, &rows, &mut acc, &mut cbuf);
            }
            b += A;
        }
        while b < end {
            step::<F, VNNI, R, A>(wp, b, 0, start, &rows, &mut acc, &mut cbuf);
            b += 1;
        }
        if VNNI || F != Q8_0 {
            for (o, row) in off.iter_mut().zip(rows.iter()) {
                *o += dot_f32(&cbuf[..end - start], &row.sum[start..end]);
            }
        }
        start = end;
    }
    let mut out = [0f32; R];
    for ((o, acc_r), off) in out.iter_mut().zip(acc.iter()).zip(off) {
        let mut s = acc_r[0];
        for a in &acc_r[1..] {
            s = _mm256_add_ps(s, *a);
        }
        *o = hsum(s) + off;
    }
    out
}

/// All rows of `acts` (dst.len() of them) against one weight row, in tiles.
#[inline(always)]
unsafe fn dot_rows<const F: u8, const VNNI: bool>(
    w: &[u8],
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
) {
    let n = dst.len();
    let mut r = 0;
    if VNNI {
        // 8 accumulators plus the weight operand and temporaries fit the 32 AVX-512VL registers.
        while r + 8 <= n {
            dst[r..r + 8].copy_from_slice(&tile::<F, VNNI, 8, 1>(w, acts, cols, r));
            r += 8;
        }
    }
    while r + 4 <= n {
        dst[r..r + 4].copy_from_slice(&tile::<F, VNNI, 4, 1>(w, acts, cols, r));
        r += 4;
    }
    while r + 2 <= n {
        dst[r..r + 2].copy_from_slice(&tile::<F, VNNI, 2, 2>(w, acts, cols, r));
        r += 2;
    }
    if r < n {
        dst[r] = tile::<F, VNNI, 1, 4>(w, acts, cols, r)[0];
    }
}

/// AVX2 entry point. Safety: the CPU has AVX2, FMA and F16C; `acts` holds dst.len() rows of
/// `cols` values and `w` one weight row of `cols` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_avx2(
    format: BlockFormat,
    w: &[u8],
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
) {
    match format {
        BlockFormat::Q4_0 => dot_rows::<Q4_0, false>(w, acts, cols, dst),
        BlockFormat::Q4_1 => dot_rows::<Q4_1, false>(w, acts, cols, dst),
        BlockFormat::Q8_0 => dot_rows::<Q8_0, false>(w, acts, cols, dst),
    }
}

/// AVX-512 VNNI entry point. Safety: as [`dot_rows_avx2`], plus AVX512-VNNI and AVX512-VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_rows_vnni(
    format: BlockFormat,
    w: &[u8],
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
) {
    match format {
        BlockFormat::Q4_0 => dot_rows::<Q4_0, true>(w, acts, cols, dst),
        BlockFormat::Q4_1 => dot_rows::<Q4_1, true>(w, acts, cols, dst),
        BlockFormat::Q8_0 => dot_rows::<Q8_0, true>(w, acts, cols, dst),
    }
}
