//! Portable reference kernels: the definition the SIMD paths are tested against, and the
//! fallback on CPUs without AVX2.

use super::{dequant_block, f16_at, ActRow, BlockFormat, QK};

/// One weight row `w` against every f32 row of `x` (row r at `x[r·cols..]`); into `dst[r]`.
pub(super) fn dot_rows_f32(format: BlockFormat, w: &[u8], x: &[f32], cols: usize, dst: &mut [f32]) {
    let bb = format.block_bytes();
    let mut wf = [0f32; QK];
    dst.iter_mut().for_each(|d| *d = 0.0);
    for (bi, block) in w.chunks_exact(bb).enumerate() {
        dequant_block(format, block, &mut wf);
        for (r, d) in dst.iter_mut().enumerate() {
            let xs = &x[r * cols + bi * QK..r * cols + (bi + 1) * QK];
            *d += wf.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// One weight row against one int8 or int16 activation row: per block, the exact integer dot
/// product of the weight's integer values with the activation's, times both scales (plus
/// Q4_1's min times the activation block sum).
pub(super) fn dot_int(format: BlockFormat, w: &[u8], x: ActRow<'_>) -> f32 {
    let bb = format.block_bytes();
    let xv = |i: usize| -> i32 {
        if x.q16.is_empty() {
            x.q[i] as i32
        } else {
            x.q16[i] as i32
        }
    };
    let mut acc = 0f32;
    for (bi, b) in w.chunks_exact(bb).enumerate() {
        let o = bi * QK;
        let dx = x.d[bi];
        acc += match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let (qs, offset) = if format == BlockFormat::Q4_0 {
                    (&b[2..18], 8)
                } else {
                    (&b[4..20], 0)
                };
                let mut isum = 0i32;
                for (i, &q) in qs.iter().enumerate() {
                    isum += ((q & 0x0F) as i32 - offset) * xv(o + i);
                    isum += ((q >> 4) as i32 - offset) * xv(o + i + 16);
                }
                let dot = f16_at(b, 0) * dx * isum as f32;
                if format == BlockFormat::Q4_1 {
                    dot + f16_at(b, 2) * x.sum[bi]
                } else {
                    dot
                }
            }
            BlockFormat::Q8_0 => {
                let isum: i32 = (0..QK).map(|i| (b[2 + i] as i8) as i32 * xv(o + i)).sum();
                f16_at(b, 0) * dx * isum as f32
            }
        };
    }
    acc
}
