//! Integer kernels on x86 for int8 activations (the opt-in `Int8` precision) on weights in
//! GGUF block order: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI (256-bit `vpdpbusd`,
//! which multiplies unsigned by signed bytes and sums four products into each 32-bit lane
//! without the 16-bit saturation of `vpmaddubsw`). Int16 activations run on weight strips
//! instead (`strips`, `strips_avx2`), and the activation quantizers of both live here.
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
//! (VNNI) or 4 (AVX2) activation rows; a single activation row (single-stream decode) takes two
//! weight rows at once instead, sharing its loads. A call covers several weight rows, so the
//! per-call set-up is paid once for them. The offset coefficients of up to 64 blocks are
//! buffered and dotted with the block sums afterwards, so they add no dependency chain to the
//! hot loop.

use std::arch::x86_64::*;

use super::avx2::hsum;
use super::format_id::{block_bytes, Q4_0, Q4_1, Q8_0};
use super::{ActRow, BlockFormat, QuantRows, QK};

/// Blocks whose offset coefficients are buffered before being dotted with the block sums.
const CHUNK: usize = 64;

/// The two f16 values at `p` (scale and, for Q4_1, min) converted with F16C. It loads 8 bytes
/// (still inside the block: every format's block is at least 18 bytes) as one vector load: a
/// scalar load here was merged by LLVM across the unrolled blocks into a slow `vpgatherqd`.
#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The integer dot product of one weight block with one activation block at `x`, as 8 i32
/// lanes (their sum is the block's): Σ u·x over groups of 4 bytes (`ws`: the signed weight
/// bytes, the sign source of AVX2's Q8_0).
#[inline(always)]
unsafe fn idot<const F: u8, const VNNI: bool>(u: __m256i, ws: __m256i, x: *const i8) -> __m256i {
    let x = _mm256_loadu_si256(x as *const __m256i);
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
    } else {
        let x = if F == Q8_0 {
            _mm256_sign_epi8(x, ws)
        } else {
            x
        };
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    }
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

/// The weight operand of one block: the unsigned bytes in value order and, for AVX2's Q8_0,
/// the signed bytes as sign source. Scales are read apart, in `tile`.
#[inline(always)]
unsafe fn weight_bytes<const F: u8, const VNNI: bool>(b: *const u8) -> (__m256i, __m256i) {
    match F {
        Q4_0 | Q4_1 => {
            let raw = _mm_loadu_si128(b.add(if F == Q4_1 { 4 } else { 2 }) as *const __m128i);
            // Byte i holds value i in its low nibble and value i+16 in its high nibble.
            let mask = _mm_set1_epi8(0x0F);
            let (lo, hi) = (
                _mm_and_si128(raw, mask),
                _mm_and_si128(_mm_srli_epi16(raw, 4), mask),
            );
            let u = _mm256_set_m128i(hi, lo);
            (u, u)
        }
        _ => {
            let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
            if VNNI {
                (_mm256_xor_si256(w, _mm256_set1_epi8(i8::MIN)), w)
            } else {
                (_mm256_abs_epi8(w), w)
            }
        }
    }
}

/// Block `b` (index `k` within its chunk) of the weight row at `wp` into accumulator `a` of
/// every row: per row one integer dot, one conversion and one FMA by the precomputed scale
/// product. A function, not a closure: a closure would not inherit the caller's target
/// features, and every intrinsic in it would become an out-of-line call.
#[inline(always)]
unsafe fn step<const F: u8, const VNNI: bool, const R: usize, const A: usize>(
    wp: *const u8,
    b: usize,
    k: usize,
    a: usize,
    rows: &[ActRow<'_>; R],
    scale: &[[f32; CHUNK]; R],
    acc: &mut [[__m256; A]; R],
) {
    let (u, ws) = weight_bytes::<F, VNNI>(wp.add(b * block_bytes(F)));
    for ((row, acc_r), sc) in rows.iter().zip(acc.iter_mut()).zip(scale) {
        let i = idot::<F, VNNI>(u, ws, row.q.as_ptr().add(b * QK));
        let s = _mm256_broadcast_ss(sc.get_unchecked(k));
        acc_r[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, acc_r[a]);
    }
}

/// For blocks start..start+len of the weight row at `wp`: each block's scale into `dw[k]` and
/// its offset coefficient (the term the activation block sum multiplies) into `cw[k]`.
#[inline(always)]
unsafe fn block_scales<const F: u8, const VNNI: bool>(
    wp: *const u8,
    start: usize,
    len: usize,
    dw: *mut f32,
    cw: *mut f32,
) {
    for k in 0..len {
        let (d, m) = f16x2(wp.add((start + k) * block_bytes(F)));
        *dw.add(k) = d;
        *cw.add(k) = match F {
            Q4_1 => m,
            Q4_0 => -8.0 * d,
            _ if VNNI => -128.0 * d,
            _ => 0.0,
        };
    }
}

/// Activation rows r0..r0+R against one weight row, with A accumulators per row (A·R chains
/// hide the FMA latency when R is small). Per chunk of up to 64 blocks, a first pass reads the
/// block scales and offset coefficients and forms the products d·dx for every row eight at a
/// time, so the hot loop spends one FMA per row and block on scaling instead of a multiply
/// and an FMA.
#[inline(always)]
unsafe fn tile<const F: u8, const VNNI: bool, const R: usize, const A: usize>(
    w: &[u8],
    all_rows: &[ActRow<'_>],
    cols: usize,
    r0: usize,
) -> [f32; R] {
    let bb = block_bytes(F);
    let nb = cols / QK;
    debug_assert_eq!(w.len(), nb * bb);
    debug_assert!(all_rows.len() >= r0 + R);
    let rows: [_; R] = std::array::from_fn(|i| all_rows[r0 + i]);
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    let mut off = [0f32; R];
    // Left unzeroed: every pass writes the first `end - start` entries before reading them.
    let mut dw = std::mem::MaybeUninit::<[f32; CHUNK]>::uninit();
    let mut cw = std::mem::MaybeUninit::<[f32; CHUNK]>::uninit();
    let mut scale = std::mem::MaybeUninit::<[[f32; CHUNK]; R]>::uninit();
    let (dw, cw, scale) = (
        dw.as_mut_ptr() as *mut f32,
        cw.as_mut_ptr() as *mut f32,
        &mut *scale.as_mut_ptr(),
    );
    let wp = w.as_ptr();
    let mut start = 0;
    while start < nb {
        let end = (start + CHUNK).min(nb);
        let len = end - start;
        block_scales::<F, VNNI>(wp, start, len, dw, cw);
        let dw_s = std::slice::from_raw_parts(dw, len);
        for (row, sc) in rows.iter().zip(scale.iter_mut()) {
            mul_f32(dw_s, &row.d[start..end], sc.as_mut_ptr());
        }
        let mut b = start;
        while b + A <= end {
            for a in 0..A {
                step::<F, VNNI, R, A>(wp, b + a, b + a - start, a, &rows, scale, &mut acc);
            }
            b += A;
        }
        while b < end {
            step::<F, VNNI, R, A>(wp, b, b - start, 0, &rows, scale, &mut acc);
            b += 1;
        }
        if F != Q8_0 || VNNI {
            let cw_s = std::slice::from_raw_parts(cw, len);
            for (o, row) in off.iter_mut().zip(rows.iter()) {
                *o += dot_f32(cw_s, &row.sum[start..end]);
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

/// out[i] = a[i]·b[i] for i < a.len() (b at least as long).
#[inline(always)]
unsafe fn mul_f32(a: &[f32], b: &[f32], out: *mut f32) {
    let n = a.len();
    debug_assert!(b.len() >= n);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_mul_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
        );
        _mm256_storeu_ps(out.add(i), v);
        i += 8;
    }
    while i < n {
        *out.add(i) = a[i] * b[i];
        i += 1;
    }
}

/// One activation row against two weight rows at once (single-stream decode): the two rows'
/// dot products share each activation load and give two independent chains per accumulator
/// slot, where one weight row at a time needed four accumulators of one row for the same
/// overlap and paid the per-row set-up (scales, sums, horizontal sums) for less work.
#[inline(always)]
unsafe fn tile_pair<const F: u8, const VNNI: bool>(
    w0: &[u8],
    w1: &[u8],
    row: &ActRow<'_>,
    cols: usize,
) -> [f32; 2] {
    let bb = block_bytes(F);
    let nb = cols / QK;
    debug_assert!(w0.len() == nb * bb && w1.len() == nb * bb);
    const A: usize = 2;
    let mut acc = [[_mm256_setzero_ps(); A]; 2];
    let mut off = [0f32; 2];
    let mut dw = std::mem::MaybeUninit::<[[f32; CHUNK]; 2]>::uninit();
    let mut cw = std::mem::MaybeUninit::<[[f32; CHUNK]; 2]>::uninit();
    let mut scale = std::mem::MaybeUninit::<[[f32; CHUNK]; 2]>::uninit();
    // Left unzeroed: every pass writes the first `end - start` entries before reading them.
    let (dw, cw, scale) = (
        &mut *dw.as_mut_ptr(),
        &mut *cw.as_mut_ptr(),
        &mut *scale.as_mut_ptr(),
    );
    let wps = [w0.as_ptr(), w1.as_ptr()];
    let rows = [*row];
    let mut start = 0;
    while start < nb {
        let end = (start + CHUNK).min(nb);
        let len = end - start;
        for (j, wp) in wps.iter().enumerate() {
            block_scales::<F, VNNI>(*wp, start, len, dw[j].as_mut_ptr(), cw[j].as_mut_ptr());
            mul_f32(&dw[j][..len], &row.d[start..end], scale[j].as_mut_ptr());
        }
        let mut b = start;
        while b + A <= end {
            for a in 0..A {
                for (j, wp) in wps.iter().enumerate() {
                    let (sc, accj) = (
                        std::array::from_ref(&scale[j]),
                        std::array::from_mut(&mut acc[j]),
                    );
                    step::<F, VNNI, 1, A>(*wp, b + a, b + a - start, a, &rows, sc, accj);
                }
            }
            b += A;
        }
        while b < end {
            for (j, wp) in wps.iter().enumerate() {
                let (sc, accj) = (
                    std::array::from_ref(&scale[j]),
                    std::array::from_mut(&mut acc[j]),
                );
                step::<F, VNNI, 1, A>(*wp, b, b - start, 0, &rows, sc, accj);
            }
            b += 1;
        }
        if F != Q8_0 || VNNI {
            for (o, c) in off.iter_mut().zip(cw.iter()) {
                *o += dot_f32(&c[..len], &row.sum[start..end]);
            }
        }
        start = end;
    }
    let mut out = [0f32; 2];
    for ((o, acc_j), off) in out.iter_mut().zip(acc.iter()).zip(off) {
        *o = hsum(_mm256_add_ps(acc_j[0], acc_j[1])) + off;
    }
    out
}

/// All rows of `acts` (n = dst.len() / nw of them) against `nw` consecutive weight rows `w`;
/// weight row k's results go to dst[k·n..(k+1)·n]. One activation row takes the weight rows in
/// pairs; several take them one at a time, in tiles of activation rows.
#[inline(always)]
unsafe fn dot_rows<const F: u8, const VNNI: bool>(
    w: &[u8],
    nw: usize,
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
) {
    let n = dst.len() / nw.max(1);
    let row_bytes = cols / QK * block_bytes(F);
    debug_assert!(w.len() >= nw * row_bytes);
    // The rows' slices once per call, on the stack for the usual batch sizes.
    const NONE: ActRow<'static> = ActRow {
        q: &[],
        q16: &[],
        d: &[],
        sum: &[],
    };
    let mut on_stack = [NONE; 16];
    let on_heap: Vec<ActRow<'_>>;
    let rows: &[ActRow<'_>] = if n <= on_stack.len() {
        for (r, slot) in on_stack.iter_mut().enumerate().take(n) {
            *slot = acts.row(r, cols);
        }
        &on_stack[..n]
    } else {
        on_heap = (0..n).map(|r| acts.row(r, cols)).collect();
        &on_heap
    };
    let wrow = |k: usize| &w[k * row_bytes..(k + 1) * row_bytes];
    let mut k = 0;
    if n == 1 {
        while k + 2 <= nw {
            let [a, b] = tile_pair::<F, VNNI>(wrow(k), wrow(k + 1), &rows[0], cols);
            dst[k] = a;
            dst[k + 1] = b;
            k += 2;
        }
    }
    while k < nw {
        let (w, dst) = (wrow(k), &mut dst[k * n..(k + 1) * n]);
        let mut r = 0;
        if VNNI {
            // 8 accumulators plus the weight operand and temporaries fit the 32 AVX-512VL
            // registers.
            while r + 8 <= n {
                dst[r..r + 8].copy_from_slice(&tile::<F, VNNI, 8, 1>(w, rows, cols, r));
                r += 8;
            }
        }
        while r + 4 <= n {
            dst[r..r + 4].copy_from_slice(&tile::<F, VNNI, 4, 1>(w, rows, cols, r));
            r += 4;
        }
        while r + 2 <= n {
            dst[r..r + 2].copy_from_slice(&tile::<F, VNNI, 2, 2>(w, rows, cols, r));
            r += 2;
        }
        if r < n {
            dst[r] = tile::<F, VNNI, 1, 4>(w, rows, cols, r)[0];
        }
        k += 1;
    }
}

/// AVX2 entry point: `nw` consecutive weight rows `w` against every row of `acts` (int8),
/// weight row k's results into dst[k·n..(k+1)·n]. Safety: the CPU has AVX2, FMA and F16C;
/// `acts` holds n = dst.len() / nw int8 rows of `cols` values and `w` nw weight rows of
/// `cols` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_avx2(
    format: BlockFormat,
    w: &[u8],
    nw: usize,
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
) {
    debug_assert!(!acts.wide, "int16 activations run on strips");
    match format {
        BlockFormat::Q4_0 => dot_rows::<Q4_0, false>(w, nw, acts, cols, dst),
        BlockFormat::Q4_1 => dot_rows::<Q4_1, false>(w, nw, acts, cols, dst),
        BlockFormat::Q8_0 => dot_rows::<Q8_0, false>(w, nw, acts, cols, dst),
    }
}

/// AVX-512 VNNI entry point. Safety: as [`dot_rows_avx2`], plus AVX512-VNNI and AVX512-VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_rows_vnni(
    format: BlockFormat,
    w: &[u8],
    nw: usize,
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
) {
    debug_assert!(!acts.wide, "int16 activations run on strips");
    match format {
        BlockFormat::Q4_0 => dot_rows::<Q4_0, true>(w, nw, acts, cols, dst),
        BlockFormat::Q4_1 => dot_rows::<Q4_1, true>(w, nw, acts, cols, dst),
        BlockFormat::Q8_0 => dot_rows::<Q8_0, true>(w, nw, acts, cols, dst),
    }
}

/// One 32-value block at `p` scaled so its largest magnitude maps to `qmax` and rounded to
/// nearest-even (`vcvtps2dq`, as the scalar trick rounds): the rounded values as four vectors
/// of eight i32, the scale, and the sum of the rounded values.
#[inline(always)]
unsafe fn quantize_block(p: *const f32, qmax: f32) -> ([__m256i; 4], f32, i32) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
        _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let scale = amax / qmax;
    let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    // A loop, not `array::map`: a closure would not inherit the caller's target features.
    let mut i = [_mm256_setzero_si256(); 4];
    for (ik, vk) in i.iter_mut().zip(v) {
        *ik = _mm256_cvtps_epi32(_mm256_mul_ps(vk, inv));
    }
    let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    (i, scale, _mm_cvtsi128_si32(s))
}

/// Quantizes whole 32-value blocks of `x` into `q`, with per-block scale `d` and sum
/// d·Σq; bit-identical to the scalar loop in `QuantRows::quantize` (same scale, same
/// multiply, same rounding).
/// Safety: the CPU has AVX2; `q` is as long as `x`, `d` and `sum` one per block.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32]) {
    let nb = x.len() / QK;
    debug_assert!(q.len() >= nb * QK && d.len() >= nb && sum.len() >= nb);
    for b in 0..nb {
        let (i, scale, isum) = quantize_block(x.as_ptr().add(b * QK), 127.0);
        // The packs interleave 128-bit lanes; the permute puts the 32 bytes back in order.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(p01, p23),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
        *d.get_unchecked_mut(b) = scale;
        *sum.get_unchecked_mut(b) = scale * isum as f32;
    }
}

/// As [`quantize_blocks`] to i16 (scale amax/32767), bit-identical to the scalar loop.
/// Safety: the CPU has AVX2; `q` is as long as `x`, `d` and `sum` one per block.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_blocks16(x: &[f32], q: &mut [i16], d: &mut [f32], sum: &mut [f32]) {
    let nb = x.len() / QK;
    debug_assert!(q.len() >= nb * QK && d.len() >= nb && sum.len() >= nb);
    for b in 0..nb {
        let (i, scale, isum) = quantize_block(x.as_ptr().add(b * QK), 32767.0);
        // packs interleaves 128-bit lanes; the 64-bit permute restores value order.
        let out = q.as_mut_ptr().add(b * QK) as *mut __m256i;
        _mm256_storeu_si256(
            out,
            _mm256_permute4x64_epi64(_mm256_packs_epi32(i[0], i[1]), 0b11_01_10_00),
        );
        _mm256_storeu_si256(
            out.add(1),
            _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2], i[3]), 0b11_01_10_00),
        );
        *d.get_unchecked_mut(b) = scale;
        *sum.get_unchecked_mut(b) = scale * isum as f32;
    }
}
