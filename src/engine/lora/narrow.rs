//! Little-endian f32 bytes from a safetensors file to the f16 values the engine serves, in one
//! pass that also checks every value is finite and inside f16's range: the cold-load step that
//! touches every weight, so it runs F16C eight values at a time where the CPU has it (about a
//! fifth of the time of decoding, checking and converting in separate passes).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Why a tensor could not be narrowed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Refusal {
    /// Element `index` is NaN or infinite: the file is refused.
    NotFinite { index: usize, value: f32 },
    /// A finite value beyond ±65504: the tensor has to stay f32.
    OutOfRange,
}

/// Writes the f32 values in `src` (little-endian, any alignment) into `dst` as f16. `dst`
/// must hold `src.len() / 4` values; a non-finite value takes precedence over one out of range
/// wherever they are, so the same file always gets the same answer.
pub fn f32_le_to_f16(src: &[u8], dst: &mut [f16]) -> Result<(), Refusal> {
    let n = dst.len().min(src.len() / 4);
    let (src, dst) = (&src[..n * 4], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: the features are present; the function reads and writes within the slices.
        let all_fit = unsafe { x86::narrow(src, dst) };
        return if all_fit { Ok(()) } else { classify(src) };
    }
    portable(src, dst)
}

fn portable(src: &[u8], dst: &mut [f16]) -> Result<(), Refusal> {
    const BLOCK: usize = 1024;
    let mut wide = [0f32; BLOCK];
    for (s, d) in src.chunks(BLOCK * 4).zip(dst.chunks_mut(BLOCK)) {
        let wide = &mut wide[..d.len()];
        for (w, c) in wide.iter_mut().zip(s.chunks_exact(4)) {
            *w = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        if !wide.iter().all(|v| fits(*v)) {
            return classify(src);
        }
        d.convert_from_f32_slice(wide);
    }
    Ok(())
}

fn fits(v: f32) -> bool {
    // False for NaN as well.
    v.abs() <= f16::MAX.to_f32()
}

/// The slow path, only for a tensor that does not narrow: which refusal, and where.
fn classify(src: &[u8]) -> Result<(), Refusal> {
    let values = src
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    if let Some((index, value)) = values.clone().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Refusal::NotFinite { index, value });
    }
    if values.clone().any(|v| !fits(v)) {
        return Err(Refusal::OutOfRange);
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Narrows every value; returns whether all were finite and within f16's range (when not,
    /// `dst` holds garbage and the caller classifies).
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn narrow(src: &[u8], dst: &mut [f16]) -> bool {
        let n = dst.len().min(src.len() / 4);
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let max = _mm256_set1_ps(f16::MAX.to_f32());
        // All-ones while every lane so far fits; an ordered compare is false for NaN.
        let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_loadu_ps(ps.add(i * 4).cast());
            ok = _mm256_and_ps(
                ok,
                _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(v, abs_mask), max),
            );
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(pd.add(i).cast(), h);
            i += 8;
        }
        let mut fits = _mm256_movemask_ps(ok) == 0xff;
        for j in i..n {
            let c = &src[j * 4..j * 4 + 4];
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            fits &= super::fits(v);
            dst[j] = f16::from_f32(v);
        }
        fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn narrows_like_half_and_from_any_alignment() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.0173).collect();
        let mut b = vec![0u8];
        b.extend(bytes(&v));
        let mut out = vec![f16::ZERO; v.len()];
        assert_eq!(f32_le_to_f16(&b[1..], &mut out), Ok(()));
        for (o, x) in out.iter().zip(&v) {
            assert_eq!(o.to_bits(), f16::from_f32(*x).to_bits(), "{x}");
        }
        let mut p = vec![f16::ZERO; v.len()];
        assert_eq!(portable(&b[1..], &mut p), Ok(()));
        assert_eq!(p, out);
    }

    #[test]
    fn non_finite_wins_over_out_of_range_and_names_its_index() {
        for at in [3usize, 20] {
            let mut v = vec![0.5f32; 24];
            v[1] = 1e6;
            v[at] = f32::NAN;
            let mut out = vec![f16::ZERO; v.len()];
            match f32_le_to_f16(&bytes(&v), &mut out) {
                Err(Refusal::NotFinite { index, value }) => {
                    assert_eq!(index, at);
                    assert!(value.is_nan());
                }
                other => panic!("{other:?}"),
            }
        }
        let mut v = vec![0.5f32; 24];
        v[22] = -70000.0;
        let mut out = vec![f16::ZERO; v.len()];
        assert_eq!(
            f32_le_to_f16(&bytes(&v), &mut out),
            Err(Refusal::OutOfRange)
        );
        assert_eq!(portable(&bytes(&v), &mut out), Err(Refusal::OutOfRange));
        v[22] = f32::INFINITY;
        assert!(matches!(
            portable(&bytes(&v), &mut out),
            Err(Refusal::NotFinite { index: 22, .. })
        ));
    }
}
