//! Weights re-laid out in strips of 16 rows for int16 dot products, the default kernel at
//! every row count: `vpdpwssd` on AVX-512 VNNI here, `vpmaddwd` on AVX2 in `strips_avx2`.
//!
//! Why another layout: in GGUF order a block's 32 values belong to one weight row, so an
//! integer dot product of a block ends in one 32-bit sum per row and block, which must be
//! converted and scaled before the next block (the block scales differ). That per-block float
//! work kept the integer kernels behind the f32 one from a few rows on. Here each 32-bit lane
//! of a vector belongs to a different weight row of the strip: one `vpdpwssd` multiplies two
//! values of each of 16 rows by the same two activations (a broadcast), 16 of them cover a
//! block for 16 rows, and the float work (convert, scale, offset) is paid once per block for
//! all 16 rows. On Zen 4 `vpdpwssd` issues ~1.7× as often as a 512-bit FMA and does twice the
//! multiply-adds, so the integer work runs ~3× the f32 kernel's multiply-add rate.
//!
//! Per strip and block, one record:
//! - the 16 rows' scales `d` as f16, then their offset coefficients `m` as f16 (Q4_1's min;
//!   zero for Q4_0, whose −8·d is made in the kernel, and for Q8_0), 64 bytes;
//! - the values: Q4 as 4 chunks of 64 bytes, chunk c holding in byte i (i < 32) the low
//!   nibble of k-step 4c and the high nibble of k-step 4c+2 at position i, and in byte 32+i
//!   those of k-steps 4c+1 and 4c+3; Q8_0 as 16 k-steps of 32 signed bytes. Position p of a
//!   k-step k is row p/2's value 2k + p%2: widened to 16 bits, a k-step is one vector whose
//!   lane l holds row l's pair (2k, 2k+1), the operand order `vpdpwssd` wants.
//!
//! Rows past the weight's last (a partial last strip) are zero and never stored.
//! The result equals the scalar int16 path (same activation rounding, exact
//! integer sums), up to float summation order.

use super::format_id::{Q4_0, Q4_1, Q8_0};
use super::{BlockFormat, Isa, QWeight, QuantRows, SharedOut, PARALLEL_MIN_MACS, QK};
use rayon::prelude::*;

/// Weight rows per strip: one per 32-bit lane of a 512-bit vector.
pub(super) const STRIP: usize = 16;

/// Bytes of the scale half of a record (16 f16 scales, 16 f16 offsets).
pub(super) const SCALE_BYTES: usize = 64;

/// Bytes of one strip's record for one block of format `f` (a `format_id`).
pub(super) const fn record_bytes_of(f: u8) -> usize {
    SCALE_BYTES
        + if f == Q8_0 {
            STRIP * QK
        } else {
            STRIP * QK / 2
        }
}

/// [`record_bytes_of`] for a [`BlockFormat`].
fn record_bytes(format: BlockFormat) -> usize {
    record_bytes_of(match format {
        BlockFormat::Q4_0 => Q4_0,
        BlockFormat::Q4_1 => Q4_1,
        BlockFormat::Q8_0 => Q8_0,
    })
}

/// Where value `e` (0..32) of lane `l`'s block sits among a record's value bytes: the byte,
/// and whether it is the high nibble (Q4 only; see the module docs for the layout).
fn value_slot(format: BlockFormat, l: usize, e: usize) -> (usize, bool) {
    let (k, p) = (e / 2, 2 * l + e % 2);
    if format == BlockFormat::Q8_0 {
        (k * 32 + p, false)
    } else {
        let (c, t) = (k / 4, k % 4);
        (c * 64 + (t % 2) * 32 + p, t >= 2)
    }
}

/// A weight [rows, cols] in strip layout: `strips` strips of `cols/32` records each.
#[derive(Debug)]
pub(super) struct Strips {
    pub data: Vec<u8>,
    pub strips: usize,
}

impl Strips {
    /// Re-lays out `data` (GGUF blocks, `rows` × `cols/32`) into strips.
    pub fn build(format: BlockFormat, data: &[u8], rows: usize, cols: usize) -> Self {
        let nb = cols / QK;
        let bb = format.block_bytes();
        let rb = record_bytes(format);
        let strips = rows.div_ceil(STRIP);
        let mut out = vec![0u8; strips * nb * rb];
        // In parallel: at load, every weight of the model passes through here once.
        out.par_chunks_exact_mut(nb * rb)
            .enumerate()
            .for_each(|(s, strip)| {
                let mut vals = [0u8; QK];
                for (b, rec) in strip.chunks_exact_mut(rb).enumerate() {
                    let (scales, quants) = rec.split_at_mut(SCALE_BYTES);
                    for l in 0..STRIP.min(rows - s * STRIP) {
                        let row = s * STRIP + l;
                        let blk = &data[(row * nb + b) * bb..(row * nb + b + 1) * bb];
                        scales[2 * l..2 * l + 2].copy_from_slice(&blk[0..2]);
                        if format == BlockFormat::Q4_1 {
                            scales[32 + 2 * l..32 + 2 * l + 2].copy_from_slice(&blk[2..4]);
                        }
                        block_values(format, blk, &mut vals);
                        for (e, &v) in vals.iter().enumerate() {
                            let (byte, high) = value_slot(format, l, e);
                            quants[byte] |= if high { v << 4 } else { v };
                        }
                    }
                }
            });
        Self { data: out, strips }
    }

    /// The GGUF blocks back (`rows` × `cols/32`), for the kernels that read that layout.
    pub fn to_gguf(&self, format: BlockFormat, rows: usize, cols: usize) -> Vec<u8> {
        let nb = cols / QK;
        let (bb, rb) = (format.block_bytes(), record_bytes(format));
        let mut out = vec![0u8; rows * nb * bb];
        for (row, blocks) in out.chunks_exact_mut(nb * bb).enumerate() {
            let (s, l) = (row / STRIP, row % STRIP);
            for (b, blk) in blocks.chunks_exact_mut(bb).enumerate() {
                let rec = &self.data[(s * nb + b) * rb..(s * nb + b + 1) * rb];
                let (scales, quants) = rec.split_at(SCALE_BYTES);
                blk[0..2].copy_from_slice(&scales[2 * l..2 * l + 2]);
                let vals: [u8; QK] = std::array::from_fn(|e| match value_slot(format, l, e) {
                    (byte, false) if format == BlockFormat::Q8_0 => quants[byte],
                    (byte, false) => quants[byte] & 0x0F,
                    (byte, true) => quants[byte] >> 4,
                });
                match format {
                    BlockFormat::Q8_0 => blk[2..].copy_from_slice(&vals),
                    _ => {
                        let qs = if format == BlockFormat::Q4_1 {
                            blk[2..4].copy_from_slice(&scales[32 + 2 * l..32 + 2 * l + 2]);
                            &mut blk[4..]
                        } else {
                            &mut blk[2..]
                        };
                        for i in 0..QK / 2 {
                            qs[i] = vals[i] | (vals[i + QK / 2] << 4);
                        }
                    }
                }
            }
        }
        out
    }
}

/// A block's 32 stored values in order: Q4 nibbles 0..15, Q8_0 bytes as stored (signed).
fn block_values(format: BlockFormat, blk: &[u8], out: &mut [u8; QK]) {
    match format {
        BlockFormat::Q8_0 => out.copy_from_slice(&blk[2..2 + QK]),
        _ => {
            let qs = &blk[if format == BlockFormat::Q4_1 { 4 } else { 2 }..];
            for i in 0..QK / 2 {
                out[i] = qs[i] & 0x0F;
                out[i + QK / 2] = qs[i] >> 4;
            }
        }
    }
}

/// Input rows per panel: a panel's int16 activations (32 × 1536 × 2 bytes = 96 KiB at the
/// widest projection of the default model) stay in L2 while a task's strips pass over them.
const PANEL: usize = 32;

/// `acts` (n rows of `cols` values, quantized to int16) against every weight of `ws`, all of
/// which have strips; `outs[i]` receives [n, ws[i].rows]. Split over the rayon pool by strips
/// of all weights together, like the other kernels' output rows.
/// On `isa` AVX-512 VNNI, or AVX2 (`strips_avx2`).
/// Safety: the CPU has `isa`, which is at least AVX2; each `outs[i]` has n·rows_i values.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn matmul(
    ws: &[&QWeight],
    acts: &QuantRows,
    n: usize,
    cols: usize,
    outs: &[SharedOut],
    isa: Isa,
) {
    let nb = cols / QK;
    let total: usize = ws
        .iter()
        .filter_map(|w| w.strips.as_ref())
        .map(|s| s.strips)
        .sum();
    let run = |g0: usize, g1: usize| {
        for r0 in (0..n).step_by(PANEL) {
            let r1 = (r0 + PANEL).min(n);
            let (q, d, sum) = (
                &acts.q16[r0 * cols..r1 * cols],
                &acts.d[r0 * nb..r1 * nb],
                &acts.sum[r0 * nb..r1 * nb],
            );
            let mut base = 0;
            for (w, out) in ws.iter().zip(outs) {
                let Some(s) = w.strips.as_ref() else { continue };
                let rb = nb * record_bytes(w.format);
                let dot_strip = strip_kernel(isa, w.format);
                for st in g0.max(base)..g1.min(base + s.strips) {
                    let local = st - base;
                    // SAFETY: the caller's contract; the strip is inside `s.data`, and row
                    // r0..r1's columns local·16.. (lanes of them) are inside out_i and
                    // written by no other task.
                    unsafe {
                        dot_strip(
                            &s.data[local * rb..(local + 1) * rb],
                            q,
                            d,
                            sum,
                            cols,
                            out.get().add(r0 * w.rows + local * STRIP),
                            w.rows,
                            (w.rows - local * STRIP).min(STRIP),
                        )
                    };
                }
                base += s.strips;
            }
        }
    };
    let macs = total * STRIP * cols * n;
    if macs < PARALLEL_MIN_MACS || rayon::current_num_threads() == 1 {
        run(0, total);
        return;
    }
    let chunk = total.div_ceil(4 * rayon::current_num_threads()).max(1);
    (0..total.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| run(c * chunk, ((c + 1) * chunk).min(total)));
}

/// One strip against input rows 0..n: (strip, q, d, sum, cols, out, stride, lanes), see
/// `x86::dot_strip`.
#[cfg(target_arch = "x86_64")]
type StripKernel = unsafe fn(&[u8], &[i16], &[f32], &[f32], usize, *mut f32, usize, usize);

/// The strip kernel of `isa` (AVX-512 VNNI, else AVX2) for `format`.
#[cfg(target_arch = "x86_64")]
fn strip_kernel(isa: Isa, format: BlockFormat) -> StripKernel {
    use super::strips_avx2 as avx2;
    match (isa >= Isa::Avx512Vnni, format) {
        (true, BlockFormat::Q4_0) => x86::dot_strip::<Q4_0>,
        (true, BlockFormat::Q4_1) => x86::dot_strip::<Q4_1>,
        (true, BlockFormat::Q8_0) => x86::dot_strip::<Q8_0>,
        (false, BlockFormat::Q4_0) => avx2::dot_strip::<Q4_0>,
        (false, BlockFormat::Q4_1) => avx2::dot_strip::<Q4_1>,
        (false, BlockFormat::Q8_0) => avx2::dot_strip::<Q8_0>,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The 16 rows' scales and offset coefficients of a record.
    #[inline(always)]
    unsafe fn scales<const F: u8>(rec: *const u8) -> (__m512, __m512) {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec as *const __m256i));
        let m = match F {
            Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(32) as *const __m256i)),
            Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            _ => _mm512_setzero_ps(),
        };
        (d, m)
    }

    /// The four k-steps 4c..4c+3 of a Q4 record as 16-bit vectors.
    #[inline(always)]
    unsafe fn unpack_q4(chunk: *const u8) -> [__m512i; 4] {
        let v = _mm512_loadu_si512(chunk as *const _);
        let mask = _mm512_set1_epi8(0x0F);
        let lo = _mm512_and_si512(v, mask);
        let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        [
            _mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)),
            _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
            _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)),
            _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1)),
        ]
    }

    /// acc + Σ per lane of `w` times the activation pair of k-step `k` of the block at `x`
    /// (broadcast to every lane). Written out because LLVM loaded most of these broadcasts
    /// with a separate `vpbroadcastd` instead of folding them into the dot product as an
    /// embedded-broadcast operand, one extra vector µop per dot product.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot_pair(acc: __m512i, w: __m512i, x: *const i16, k: usize) -> __m512i {
        let mut acc = acc;
        std::arch::asm!(
            "vpdpwssd {a}, {w}, dword ptr [{p}]{{1to16}}",
            a = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            p = in(reg) x.add(2 * k),
            options(pure, readonly, nostack, preserves_flags),
        );
        acc
    }

    /// R input rows against one strip: `q`, `d`, `sum` point at the first row's int16 values,
    /// block scales and block sums (rows `cols` values apart); out[r][l] for row l of the strip.
    #[inline(always)]
    unsafe fn tile<const F: u8, const R: usize>(
        strip: *const u8,
        nb: usize,
        q: *const i16,
        d: *const f32,
        sum: *const f32,
        cols: usize,
    ) -> [__m512; R] {
        let rb = record_bytes_of(F);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let rec = strip.add(b * rb);
            let mut dots = [_mm512_setzero_si512(); R];
            if F == Q8_0 {
                for k in 0..QK / 2 {
                    let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                        rec.add(SCALE_BYTES + k * 32) as *const __m256i
                    ));
                    for (r, dot) in dots.iter_mut().enumerate() {
                        let x = q.add(r * cols + b * QK);
                        *dot = dot_pair(*dot, w, x, k);
                    }
                }
            } else {
                for c in 0..4 {
                    let w = unpack_q4(rec.add(SCALE_BYTES + c * 64));
                    for (t, wt) in w.iter().enumerate() {
                        for (r, dot) in dots.iter_mut().enumerate() {
                            let x = q.add(r * cols + b * QK);
                            *dot = dot_pair(*dot, *wt, x, 4 * c + t);
                        }
                    }
                }
            }
            let (dw, mw) = scales::<F>(rec);
            for (r, (a, dot)) in acc.iter_mut().zip(dots).enumerate() {
                let dx = _mm512_set1_ps(*d.add(r * nb + b));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), *a);
                if F != Q8_0 {
                    *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(*sum.add(r * nb + b)), *a);
                }
            }
        }
        acc
    }

    /// Input rows 0..n (int16 values `q`, scales `d`, sums `sum`; `cols` values a row) against
    /// the strip at `strip`; row r's 16 results go to `out[r·stride..]`, the first `lanes` of
    /// them (a partial last strip stores fewer).
    /// Safety: the CPU has AVX-512F, BW and VNNI and F16C; `strip` holds cols/32 records of
    /// format `F`; q has n·cols values, d and sum n·cols/32; `out` has room for every store.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
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
        let mask: __mmask16 = if lanes >= STRIP {
            0xFFFF
        } else {
            (1u16 << lanes) - 1
        };
        let (sp, qp, dp, spp) = (strip.as_ptr(), q.as_ptr(), d.as_ptr(), sum.as_ptr());
        macro_rules! run {
            ($r:expr, $rows:literal) => {{
                let off = $r * nb;
                let v =
                    tile::<F, $rows>(sp, nb, qp.add($r * cols), dp.add(off), spp.add(off), cols);
                for (i, v) in v.iter().enumerate() {
                    _mm512_mask_storeu_ps(out.add(($r + i) * stride), mask, *v);
                }
            }};
        }
        let mut r = 0;
        while r + 8 <= n {
            run!(r, 8);
            r += 8;
        }
        if r + 4 <= n {
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
}
