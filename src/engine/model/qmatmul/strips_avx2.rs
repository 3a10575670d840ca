//! The strip kernel (see `strips`) on AVX2, for CPUs without AVX-512 VNNI: int16 dot products
//! with `vpmaddwd` on the two 8-row halves of each 16-row strip.
//!
//! The strip layout serves both kernels unchanged: the first 16 bytes of a 32-byte k-step
//! group hold rows 0-7 and the next 16 rows 8-15, so widened to 16 bits a k-step is two
//! vectors whose 32-bit lanes hold one row's value pair each. As on VNNI, the float work of a
//! block (convert, scale, offset) is paid once per 8 weight rows instead of once per row, which
//! is what held the row kernels behind the f32 path from a few input rows on.
//!
//! Q4 values are widened in-lane (`vpunpcklbw`/`vpunpckhbw` against zero on 256-bit loads), so
//! their two vectors hold rows [0-3, 8-11] and [4-7, 12-15]; the block scales are put in that
//! order and the results back in row order at the store. Widening each 16-byte half with
//! `vpmovzxbw` instead kept the single-row kernel ~25% slower on Zen 3 (`kernel_speed`).

use super::format_id::{Q4_0, Q4_1, Q8_0};
use super::strips::{record_bytes_of, SCALE_BYTES, STRIP};
use super::QK;
use std::arch::x86_64::*;

/// The scales and offset coefficients of a record's two 8-row halves.
#[inline(always)]
unsafe fn scales<const F: u8>(rec: *const u8) -> [(__m256, __m256); 2] {
    let mut d = [_mm256_setzero_ps(); 2];
    let mut m = [_mm256_setzero_ps(); 2];
    for h in 0..2 {
        d[h] = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * h) as *const __m128i));
        m[h] = match F {
            Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(rec.add(32 + 16 * h) as *const __m128i)),
            Q4_0 => _mm256_mul_ps(d[h], _mm256_set1_ps(-8.0)),
            _ => _mm256_setzero_ps(),
        };
    }
    if F != Q8_0 {
        (d, m) = (swap_quarters(d), swap_quarters(m));
    }
    [(d[0], m[0]), (d[1], m[1])]
}

/// Rows [0-7], [8-15] of a pair of vectors into the in-lane order the Q4 unpack gives,
/// [0-3, 8-11], [4-7, 12-15] — and back: the map is its own inverse.
#[inline(always)]
unsafe fn swap_quarters([a, b]: [__m256; 2]) -> [__m256; 2] {
    [
        _mm256_permute2f128_ps(a, b, 0x20),
        _mm256_permute2f128_ps(a, b, 0x31),
    ]
}

/// Adds the two halves' k-step `w` times the activation pair at `x + e` of each of the R rows
/// (rows `cols` values apart) into `dots`.
#[inline(always)]
unsafe fn madd_rows<const R: usize>(
    dots: &mut [[__m256i; 2]; R],
    w: [__m256i; 2],
    x: *const i16,
    e: usize,
    cols: usize,
) {
    for (r, dot) in dots.iter_mut().enumerate() {
        let pair = _mm256_set1_epi32(std::ptr::read_unaligned(x.add(r * cols + e) as *const i32));
        dot[0] = _mm256_add_epi32(dot[0], _mm256_madd_epi16(w[0], pair));
        dot[1] = _mm256_add_epi32(dot[1], _mm256_madd_epi16(w[1], pair));
    }
}

/// R input rows against one strip: `q`, `d`, `sum` point at the first row's int16 values,
/// block scales and block sums (rows `cols` values apart); out[r] holds the strip's 16 rows
/// for input row r, in row order for Q8_0 and in the in-lane order of [`swap_quarters`] for Q4.
#[inline(always)]
unsafe fn tile<const F: u8, const R: usize>(
    strip: *const u8,
    nb: usize,
    q: *const i16,
    d: *const f32,
    sum: *const f32,
    cols: usize,
) -> [[__m256; 2]; R] {
    let rb = record_bytes_of(F);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mask = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let rec = strip.add(b * rb);
        let vals = rec.add(SCALE_BYTES);
        let mut dots = [[_mm256_setzero_si256(); 2]; R];
        if F == Q8_0 {
            for k in 0..QK / 2 {
                let p = vals.add(k * 32);
                let w = [
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const __m128i)),
                ];
                madd_rows::<R>(&mut dots, w, q, b * QK + 2 * k, cols);
            }
        } else {
            // Chunk c, bytes 32t..32t+32: k-step 4c+t in the low nibbles, 4c+t+2 in the high.
            // Widened in-lane, so the halves hold rows [0-3, 8-11] and [4-7, 12-15].
            for c in 0..4 {
                for t in 0..2 {
                    let v = _mm256_loadu_si256(vals.add(c * 64 + t * 32) as *const __m256i);
                    let l = _mm256_and_si256(v, mask);
                    let h = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    let z = _mm256_setzero_si256();
                    let lo = [_mm256_unpacklo_epi8(l, z), _mm256_unpackhi_epi8(l, z)];
                    let hi = [_mm256_unpacklo_epi8(h, z), _mm256_unpackhi_epi8(h, z)];
                    let k = 4 * c + t;
                    madd_rows::<R>(&mut dots, lo, q, b * QK + 2 * k, cols);
                    madd_rows::<R>(&mut dots, hi, q, b * QK + 2 * (k + 2), cols);
                }
            }
        }
        let sc = scales::<F>(rec);
        for (r, (a, dot)) in acc.iter_mut().zip(dots).enumerate() {
            let dx = _mm256_set1_ps(*d.add(r * nb + b));
            let s = _mm256_set1_ps(*sum.add(r * nb + b));
            for h in 0..2 {
                let (dw, mw) = sc[h];
                a[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), _mm256_mul_ps(dw, dx), a[h]);
                if F != Q8_0 {
                    a[h] = _mm256_fmadd_ps(mw, s, a[h]);
                }
            }
        }
    }
    acc
}

/// Input rows 0..n (int16 values `q`, scales `d`, sums `sum`; `cols` values a row) against
/// the strip at `strip`; row r's 16 results go to `out[r·stride..]`, the first `lanes` of
/// them (a partial last strip stores fewer).
/// Safety: the CPU has AVX2, FMA and F16C; `strip` holds cols/32 records of format `F`; q has
/// n·cols values, d and sum n·cols/32; `out` has room for every store.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_strip<const F: u8>(
    strip: &[u8],
    q: &[i16],
    d: &[f32],
    sum: &[f32],
    cols: usize,
    out: *mut f32,
    stride: usize,
    lanes: usize,
) {
    let nb = cols / QK;
    let n = q.len() / cols;
    debug_assert!(strip.len() >= nb * record_bytes_of(F));
    debug_assert!(d.len() >= n * nb && sum.len() >= n * nb && lanes <= STRIP);
    let (sp, qp, dp, spp) = (strip.as_ptr(), q.as_ptr(), d.as_ptr(), sum.as_ptr());
    macro_rules! run {
        ($r:expr, $rows:literal) => {{
            let off = $r * nb;
            let v = tile::<F, $rows>(sp, nb, qp.add($r * cols), dp.add(off), spp.add(off), cols);
            for (i, v) in v.iter().enumerate() {
                let v = if F == Q8_0 { *v } else { swap_quarters(*v) };
                let dst = out.add(($r + i) * stride);
                if lanes >= STRIP {
                    _mm256_storeu_ps(dst, v[0]);
                    _mm256_storeu_ps(dst.add(8), v[1]);
                } else {
                    let mut all = [0f32; STRIP];
                    _mm256_storeu_ps(all.as_mut_ptr(), v[0]);
                    _mm256_storeu_ps(all.as_mut_ptr().add(8), v[1]);
                    std::ptr::copy_nonoverlapping(all.as_ptr(), dst, lanes);
                }
            }
        }};
    }
    let mut r = 0;
    while r + 4 <= n {
        run!(r, 4);
        r += 4;
    }
    if r + 2 <= n {
        run!(r, 2);
        r += 2;
    }
    if r < n {
        run!(r, 1);
    }
}
