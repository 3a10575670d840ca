//! The delta pass for int8 pairs ([`crate::engine::lora::int8`]), one row at a time: the row
//! is rounded to int16 (its largest magnitude to 32767), A·x is summed in integers, the
//! rank vector t (both scales folded in) is rounded to int16 in turn, and B·t is summed in
//! integers too. The integer sums are exact, so the AVX2 and portable kernels give the same
//! bits; the only rounding is the two int16 steps (2^-15 of each vector's largest value).

use super::Kernel;

/// Elements of one A row summed in eight i32 lanes before the lanes move to i64: each lane
/// then holds at most 256 products of |i8| ≤ 127 and |i16| ≤ 32767, under 2^31 (their total
/// need not be, so lanes are added in i64).
const CHUNK: usize = 2048;

/// Adding 1.5·2^23 rounds an f32 of magnitude < 2^22 to the nearest integer, ties to even
/// (what `cvtps` does), in plain float operations the compiler vectorises (`f32::round` is a
/// libm call on the x86-64 baseline).
const ROUNDER: f32 = 12_582_912.0;

/// An int8 pair as the pass reads it.
#[derive(Clone, Copy)]
pub(super) struct Int8Ab<'a> {
    /// [rank, in], row k scaled by `a_scales[k]`.
    pub a: &'a [i8],
    pub a_scales: &'a [f32],
    /// [out, rank], column k scaled by `b_scales[k]`.
    pub b: &'a [i8],
    pub b_scales: &'a [f32],
}

impl Int8Ab<'_> {
    /// A [rank, in] and B [out, rank] as f32 values (each int8 value times its scale).
    pub fn widen(&self) -> (Vec<f32>, Vec<f32>) {
        let rank = self.a_scales.len().max(1);
        let in_dim = (self.a.len() / rank).max(1);
        let mut a = vec![0f32; self.a.len()];
        let a_rows = a.chunks_mut(in_dim).zip(self.a.chunks(in_dim));
        for ((out, row), &s) in a_rows.zip(self.a_scales) {
            for (o, &q) in out.iter_mut().zip(row) {
                *o = f32::from(q) * s;
            }
        }
        let mut b = vec![0f32; self.b.len()];
        for (out, row) in b.chunks_mut(rank).zip(self.b.chunks(rank)) {
            for ((o, &q), &s) in out.iter_mut().zip(row).zip(self.b_scales) {
                *o = f32::from(q) * s;
            }
        }
        (a, b)
    }
}

/// Rounds `v` to int16 with one scale (returned; 0 when every value is 0, or when one is not
/// finite, which leaves the row without a delta rather than with garbage).
fn to_i16(kernel: Kernel, v: &[f32], out: &mut Vec<i16>) -> f32 {
    let max = kernel.max_abs(v);
    out.clear();
    out.resize(v.len(), 0);
    if max == 0.0 || !max.is_finite() {
        return 0.0;
    }
    let inv = 32767.0 / max;
    kernel.round_i16(v, inv, out);
    max / 32767.0
}

/// y += B·(scale·A·x) for one row `x` [in] → `y` [out].
pub(super) fn delta_row(kernel: Kernel, ab: Int8Ab<'_>, scale: f32, x: &[f32], y: &mut [f32]) {
    let rank = ab.a_scales.len();
    if rank == 0 || ab.b_scales.len() != rank {
        return;
    }
    let in_dim = ab.a.len() / rank;
    if in_dim != x.len() || ab.b.len() != y.len() * rank {
        return;
    }
    // Per-thread scratch: a decode step runs ~1,700 of these.
    thread_local! {
        static SCRATCH: std::cell::RefCell<(Vec<i16>, Vec<i16>, Vec<f32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    }
    SCRATCH.with(|s| {
        let (xq, tq, t) = &mut *s.borrow_mut();
        let sx = to_i16(kernel, x, xq);
        if sx == 0.0 {
            return;
        }
        t.clear();
        for k in 0..rank {
            let row = &ab.a[k * in_dim..(k + 1) * in_dim];
            let dot = kernel.dot_i8_i16(row, xq) as f32;
            t.push(scale * ab.a_scales[k] * sx * dot * ab.b_scales[k]);
        }
        let st = to_i16(kernel, t, tq);
        if st == 0.0 {
            return;
        }
        kernel.b_pass_i8(ab.b, tq, st, y);
    });
}

impl Kernel {
    /// The largest |v| (NaN when one is NaN: the caller's finiteness check catches it).
    fn max_abs(self, v: &[f32]) -> f32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_i8_i16`.
            Kernel::Avx2 => unsafe { x86::max_abs(v) },
            _ => max_abs(v),
        }
    }

    /// out[i] = v[i]·inv rounded to nearest, ties to even (|v[i]·inv| ≤ 32767 by the caller).
    fn round_i16(self, v: &[f32], inv: f32, out: &mut [i16]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_i8_i16`.
            Kernel::Avx2 => unsafe { x86::round_i16(v, inv, out) },
            _ => round_i16(v, inv, out, 0),
        }
    }

    /// Σ a[i]·x[i] over min(len) elements, exactly.
    fn dot_i8_i16(self, a: &[i8], x: &[i16]) -> i64 {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` reaches here only when the CPU has it (checked in
            // `add_deltas_cpu_with`).
            Kernel::Avx2 => unsafe { x86::dot_i8_i16(a, x) },
            _ => dot_i8_i16(a, x),
        }
    }

    /// y[o] += st·Σ_k b[o, k]·t[k] for b [y.len(), t.len()].
    fn b_pass_i8(self, b: &[i8], t: &[i16], st: f32, y: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_i8_i16`.
            Kernel::Avx2 => unsafe { x86::b_pass_i8(b, t, st, y) },
            _ => b_pass_i8(b, t, st, y, 0),
        }
    }
}

fn max_abs(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut nan = false;
    for c in v.chunks(8) {
        for (l, x) in lanes.iter_mut().zip(c) {
            nan |= x.is_nan();
            *l = if x.abs() > *l { x.abs() } else { *l };
        }
    }
    if nan {
        return f32::NAN;
    }
    lanes.iter().fold(0f32, |m, &l| if l > m { l } else { m })
}

/// The portable rounding from element `from` on (the AVX2 one hands it its tail).
fn round_i16(v: &[f32], inv: f32, out: &mut [i16], from: usize) {
    for (o, x) in out.iter_mut().zip(v).skip(from) {
        // The sum's bits are 0x4B40_0000 + k: the low half is k's two's complement (no
        // saturating float-to-int conversion, which stays scalar).
        *o = (x * inv + ROUNDER).to_bits() as u16 as i16;
    }
}

fn dot_i8_i16(a: &[i8], x: &[i16]) -> i64 {
    let n = a.len().min(x.len());
    let mut total = 0i64;
    for (ca, cx) in a[..n].chunks(CHUNK).zip(x[..n].chunks(CHUNK)) {
        let mut lanes = [0i32; 8];
        for (pa, px) in ca.chunks(8).zip(cx.chunks(8)) {
            for ((l, &p), &q) in lanes.iter_mut().zip(pa).zip(px) {
                *l += i32::from(p) * i32::from(q);
            }
        }
        total += lanes.iter().map(|&l| i64::from(l)).sum::<i64>();
    }
    total
}

/// The portable B pass from output `from` on (the AVX2 one hands it its tail).
fn b_pass_i8(b: &[i8], t: &[i16], st: f32, y: &mut [f32], from: usize) {
    let rank = t.len();
    for (o, yo) in y.iter_mut().enumerate().skip(from) {
        let row = &b[o * rank..(o + 1) * rank];
        // i64: exact for any rank (the AVX2 pass, which sums in i32, takes ranks ≤ 64 only).
        let s: i64 = row
            .iter()
            .zip(t)
            .map(|(&p, &q)| i64::from(p) * i64::from(q))
            .sum();
        *yo += st * s as f32;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHUNK;

    /// The eight lanes' sum, in i64 (each lane fits i32, their total may not).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum_i64(v: __m256i) -> i64 {
        let lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v));
        let hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256::<1>(v));
        let s = _mm256_add_epi64(lo, hi);
        let s = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        _mm_cvtsi128_si64(s) + _mm_extract_epi64::<1>(s)
    }

    /// Sixteen i8 at `p` times sixteen i16 at `q`, pairwise summed into eight i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn madd16(p: *const i8, q: *const i16) -> __m256i {
        let a = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast()));
        _mm256_madd_epi16(a, _mm256_loadu_si256(q.cast()))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i8_i16(a: &[i8], x: &[i16]) -> i64 {
        let n = a.len().min(x.len());
        let (pa, px) = (a.as_ptr(), x.as_ptr());
        let mut total = 0i64;
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let mut i = start;
            while i + 32 <= end {
                s0 = _mm256_add_epi32(s0, madd16(pa.add(i), px.add(i)));
                s1 = _mm256_add_epi32(s1, madd16(pa.add(i + 16), px.add(i + 16)));
                i += 32;
            }
            if i + 16 <= end {
                s0 = _mm256_add_epi32(s0, madd16(pa.add(i), px.add(i)));
                i += 16;
            }
            // s0 + s1 per lane: ≤ 256 products, as CHUNK promises.
            let mut s = hsum_i64(_mm256_add_epi32(s0, s1));
            for j in i..end {
                s += i64::from(a[j]) * i64::from(x[j]);
            }
            total += s;
            start = end;
        }
        total
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn max_abs(v: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        // Any NaN sets its lane here; the caller then treats the row as unusable.
        let mut nan = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= v.len() {
            let x = _mm256_loadu_ps(v.as_ptr().add(i));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, x));
            i += 8;
        }
        if _mm256_movemask_ps(nan) != 0 || v[i..].iter().any(|x| x.is_nan()) {
            return f32::NAN;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .iter()
            .chain(&v[i..])
            .map(|x| x.abs())
            .fold(0f32, |m, l| if l > m { l } else { m })
    }

    /// Rounds to nearest, ties to even (`cvtps` in the default rounding mode), as the
    /// portable loop does; |v·inv| ≤ 32767, so the saturating pack never saturates.
    #[target_feature(enable = "avx2")]
    pub unsafe fn round_i16(v: &[f32], inv: f32, out: &mut [i16]) {
        let n = v.len().min(out.len());
        let vi = _mm256_set1_ps(inv);
        let mut i = 0;
        while i + 16 <= n {
            let lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v.as_ptr().add(i)), vi));
            let hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v.as_ptr().add(i + 8)), vi));
            // packs interleaves 128-bit halves; the permute puts them back in order.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(lo, hi));
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), packed);
            i += 16;
        }
        super::round_i16(&v[..n], inv, &mut out[..n], i);
    }

    /// Eight vectors' horizontal sums as one vector, in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce8_i32(v: &[__m256i; 8]) -> __m256i {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h45 = _mm256_hadd_epi32(v[4], v[5]);
        let h67 = _mm256_hadd_epi32(v[6], v[7]);
        let lo = _mm256_hadd_epi32(h01, h23);
        let hi = _mm256_hadd_epi32(h45, h67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(lo, hi),
            _mm256_permute2x128_si256::<0x31>(lo, hi),
        )
    }

    /// The B pass eight outputs at a time for ranks that are multiples of 8 up to 64 (every
    /// i32 lane then sums at most 8 products, and a whole sum stays under 2^31); others, and
    /// the last outputs, take the portable loop.
    #[target_feature(enable = "avx2")]
    pub unsafe fn b_pass_i8(b: &[i8], t: &[i16], st: f32, y: &mut [f32]) {
        let rank = t.len();
        let out = y.len().min(b.len() / rank.max(1));
        let mut o = 0;
        if rank.is_multiple_of(8) && (8..=64).contains(&rank) {
            // t in 16-value pieces; an 8-value remainder in the low half of a 128-bit piece.
            let (pb, pt) = (b.as_ptr(), t.as_ptr());
            let vst = _mm256_set1_ps(st);
            while o + 8 <= out {
                let mut acc = [_mm256_setzero_si256(); 8];
                for (i, a) in acc.iter_mut().enumerate() {
                    let row = pb.add((o + i) * rank);
                    let mut k = 0;
                    while k + 16 <= rank {
                        *a = _mm256_add_epi32(*a, madd16(row.add(k), pt.add(k)));
                        k += 16;
                    }
                    if k < rank {
                        let bq = _mm_cvtepi8_epi16(_mm_loadl_epi64(row.add(k).cast()));
                        let p = _mm_madd_epi16(bq, _mm_loadu_si128(pt.add(k).cast()));
                        *a = _mm256_add_epi32(*a, _mm256_zextsi128_si256(p));
                    }
                }
                let sums = _mm256_cvtepi32_ps(reduce8_i32(&acc));
                let yp = y.as_mut_ptr().add(o);
                _mm256_storeu_ps(
                    yp,
                    _mm256_add_ps(_mm256_loadu_ps(yp), _mm256_mul_ps(vst, sums)),
                );
                o += 8;
            }
        }
        super::b_pass_i8(b, t, st, &mut y[..out], o);
    }
}
